"""Self-speculation: the model drafts for itself through a sparse read, vLLM verifies.

Prompts of 100 to 1300 tokens batched together (chunked prefill, prefix caching,
a second pass from the prefix cache); the kvplug engine drafts 4 tokens per
step reading through StreamingLLM (64 tokens: the sink block and the recent
one; the cheapest draft read, Quest's chunk scoring is slow on 2 cores),
verifies with ``full``.  Its greedy output must be vLLM's default backend's
without speculation, token for token.  Each engine runs in its own process
(greedy_generate.py).
"""

import json

import pytest

from kvplug.integrations.vllm.speculation import SELF_DRAFTER_PATH
from greedy_runs import passkey_prompts, run

pytestmark = pytest.mark.engine
LENGTHS = [100, 333, 1300]
DRAFT_BUDGET = 64
SPECULATIVE = {"method": "custom_class", "model": SELF_DRAFTER_PATH, "num_speculative_tokens": 4}
KVPLUG = {"policy": "full",
          "draft": {"policy": "streamingllm", "budget": DRAFT_BUDGET}}


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speculation")
    prompts_file = tmp / "prompts.json"
    prompts_file.write_text(json.dumps(passkey_prompts(
        model_dir, LENGTHS, [i / len(LENGTHS) for i in range(len(LENGTHS))])))
    speculating = run(model_dir, "kvplug", prompts_file, tmp / "spec.json",
                      {"KVPLUG_CONFIG": json.dumps(KVPLUG),
                       "KVPLUG_TEST_SPECULATIVE_CONFIG": json.dumps(SPECULATIVE)})
    dense = run(model_dir, "default", prompts_file, tmp / "dense.json")
    return speculating, dense


def test_greedy_output_is_dense_token_for_token(runs):
    speculating, dense = runs
    reference = dense["passes"][0]
    assert all(len(ids) == 32 for ids in reference)
    for spec_pass in speculating["passes"]:    # cold, then from the prefix cache
        for i, (got, want) in enumerate(zip(spec_pass, reference)):
            assert got == want, f"prompt {i} ({LENGTHS[i]} tokens) differs"


def test_drafts_read_sparse_and_verification_dense(runs):
    states = runs[0]["states"]
    assert states["draft_forwards"] > 0 and states["draft_sparse_layers"] > 0
    # within the draft budget per (row, layer, kv-head), and far below the context
    num_kv_heads = 3
    assert states["draft_kv_tokens_read"] <= DRAFT_BUDGET * num_kv_heads * states["draft_row_layers"]
    assert states["draft_kv_tokens_read"] < 0.25 * states["draft_kv_tokens_context"]
    assert states.get("sparse_decode_layers", 0) == 0   # verification read every token


def test_acceptance_is_counted_and_states_freed(runs):
    states = runs[0]["states"]
    assert 0 < states["draft_tokens_accepted"] <= states["draft_tokens_proposed"]
    assert states["live"] == 0 and states["finished"] == 2 * len(LENGTHS)
