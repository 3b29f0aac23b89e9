"""The compaction layout both vLLM sides derive alone (no engine): where a compressed
request's KV lives, and how a decode-compressing policy's region moves on block by
block as decode fills blocks."""

from types import SimpleNamespace

from kvplug.integrations.vllm.compaction import BlockReclaimer, compaction_layout
from kvplug.policies import build_policy

BLOCK = 32


def test_a_decode_compressing_layout_moves_on_one_block_per_filled_block():
    """CAKE at 48 of a 200-token prompt keeps 3 blocks before the tail block 6; each time a
    decode step fills a block the region ends one block later, so the request frees one
    block as it needs one."""
    layout = compaction_layout(build_policy("cake", {"budget": 48}), 200, BLOCK)
    assert (layout.tail_block, layout.kept_blocks, layout.first_block) == (6, 3, 3)
    assert [layout.first_block_at(n) for n in (200, 223, 224, 255, 256)] == [3, 3, 4, 4, 5]
    assert [layout.first_block_at(n, kept_blocks=1) for n in (200, 224)] == [5, 6]
    assert [n for n in range(190, 300) if layout.recompacts_in(n, 1)] == [223, 255, 287]


def test_a_prompt_within_the_budget_is_held_whole_until_decode_passes_the_budget():
    """Budget 224 (7 blocks) over a 200-token prompt: nothing is freed at prefill; the first
    re-compaction is when the eighth block fills."""
    layout = compaction_layout(build_policy("cake", {"budget": 224}), 200, BLOCK)
    assert (layout.first_block, layout.kept_blocks) == (0, 7)
    assert [n for n in range(200, 300) if layout.recompacts_in(n, 1)] == [255, 287]
    assert layout.first_block_at(256) == 1


def test_a_prefill_only_policy_keeps_its_region_where_it_is():
    layout = compaction_layout(build_policy("snapkv", {"budget": 96}), 200, BLOCK)
    assert not layout.recompacts and layout.first_block == 3
    assert layout.first_block_at(400) == 3 and not layout.recompacts_in(223, 1)


def test_the_scheduler_frees_what_the_moving_region_leaves_behind():
    policy = build_policy("cake", {"budget": 48})
    reclaimer = BlockReclaimer(lambda: policy, BLOCK)
    request = SimpleNamespace(request_id="r", num_computed_tokens=0, num_tokens=200)
    assert reclaimer.start(request).context == 200
    assert [reclaimer.freed_blocks("r", n) for n in (199, 200, 223, 224, 256)] == [0, 3, 3, 4, 5]
    assert reclaimer.shareable_tokens("r") == 3 * BLOCK     # rewritten blocks are never shared
    reclaimer.drop("r")
    assert reclaimer.freed_blocks("r", 256) == 0


def test_with_a_group_per_layer_each_layer_frees_before_its_own_kept_blocks():
    """Each layer's manager frees the blocks before that layer's kept blocks, as the worker
    reports them once it compacted; before that (or for a request whose layers keep
    alike), the region's, as with one group."""
    policy = build_policy("cake", {"budget": 48})
    kept = {}
    reclaimer = BlockReclaimer(lambda: policy, BLOCK, kept.get)
    reclaimer.start(SimpleNamespace(request_id="r", num_computed_tokens=0, num_tokens=200))
    assert [reclaimer.freed_blocks("r", 200, layer) for layer in (None, 0, 1)] == [3, 3, 3]
    kept["r"] = (1, 3, 0)
    assert [reclaimer.freed_blocks("r", 200, layer) for layer in (None, 0, 1, 2)] == [3, 5, 3, 6]
    # decode moves every layer's kept blocks on together
    assert [reclaimer.freed_blocks("r", 224, layer) for layer in (0, 1, 2)] == [6, 4, 7]
    assert reclaimer.shareable_tokens("r") == 3 * BLOCK
