"""Shared kernel helpers, and a guard that the kernel tests really run Triton."""

from __future__ import annotations

import pytest
import torch

from kvplug.kernels import chunk_select, common, lowrank_rope, quant_pages, sparse_decode


@pytest.mark.parametrize("kernel", [chunk_select._chunk_scores_kernel,
                                    sparse_decode._sparse_paged_decode_kernel,
                                    lowrank_rope._lowrank_rope_keys_kernel,
                                    quant_pages._pages_decode_kernel],
                         ids=["chunk_scores", "sparse_paged_decode", "lowrank_rope_keys",
                              "pages_decode"])
def test_launchers_run_triton_not_the_reference(kernel, device):
    """Otherwise every kernel-vs-reference test would compare the reference with itself."""
    assert common.use_triton(kernel, torch.empty(1, device=device)), (
        "the Triton kernels are not interpreted: triton was imported before "
        "tests/kernels/conftest.py could set TRITON_INTERPRET=1; run `pytest tests/kernels` "
        "alone or export TRITON_INTERPRET=1")


def _paged(layout: str) -> torch.Tensor:
    """A ``[6 blocks, 4 tokens, 2 heads, 3]`` cache in one of the layouts kernels meet."""
    if layout == "NHD":
        return torch.randn(6, 4, 2, 3)
    if layout == "HND-view":                                            # strides do not flatten
        return torch.randn(6, 2, 4, 3).transpose(1, 2)
    if layout == "vllm-cpu-V":      # [blocks, H, 2 halves, bs, D]: the V half, offset storage
        return torch.randn(6, 2, 2, 4, 3)[:, :, 1].transpose(1, 2)
    return torch.randn(6, 2, 3, 4).permute(0, 3, 1, 2)                  # keys stored [D, bs]


def _gather(cache, table, positions, heads):
    """``gather_rows`` at token ``positions`` of the rows' blocks."""
    blocks, offsets = common.block_offsets(table, positions, cache.shape[1])
    return common.gather_rows(cache, blocks, offsets, heads)


@pytest.mark.parametrize("layout", ["NHD", "HND-view", "vllm-cpu-V", "transposed-keys"])
def test_gather_rows_follows_block_table(layout):
    cache = _paged(layout)
    table = torch.tensor([[5, 0], [2, 3]])
    pos = torch.tensor([[[0, 5, -1], [3, 4, 7]], [[7, 1, 2], [0, 6, 6]]])  # [B, H, N]
    per_head = _gather(cache, table, pos, torch.arange(2)[None, :, None])  # [B, H, N, D]
    all_heads = _gather(cache, table, pos[:, 0, :, None], torch.arange(2))  # [B, N, H, D]
    for b in range(2):
        for h in range(2):
            for n in range(3):
                t = max(int(pos[b, h, n]), 0)
                assert torch.equal(per_head[b, h, n], cache[table[b, t // 4], t % 4, h])
                t0 = max(int(pos[b, 0, n]), 0)
                assert torch.equal(all_heads[b, n, h], cache[table[b, t0 // 4], t0 % 4, h])


@pytest.mark.parametrize("block_size", [1, 3, 4, 32])
def test_block_offsets_of_any_block_size(block_size):
    table = torch.randperm(80).view(2, 40)
    pos = torch.tensor([[[-1, 0, 5], [block_size, 17, 2]], [[39, 1, 0], [6, 6, 19]]])
    blocks, offsets = common.block_offsets(table, pos, block_size)
    t = pos.clamp_min(0)
    assert torch.equal(offsets, t % block_size)
    assert torch.equal(blocks, table.gather(1, (t // block_size).flatten(1)).view_as(t))


def test_gather_pages_equals_gathering_every_position():
    paged = torch.randn(7, 4, 2, 3)                                     # [pages, P, H, D]
    table = torch.tensor([[6, 0, 3], [2, 2, 5]])
    positions = torch.arange(12)[None, :, None].expand(2, -1, -1)
    assert torch.equal(common.gather_pages(paged, table),
                       _gather(paged, table, positions, torch.arange(2)))
    per_chunk = torch.randn(7, 4, 2)                                    # e.g. ShadowKV's min_cos
    assert torch.equal(common.gather_pages(per_chunk, table)[1, 5], per_chunk[2, 1])


def test_apply_rope_is_a_rotation_and_identity_at_zero():
    x = torch.randn(5, 64)
    inv_freq = common.rope_inv_freq(64)
    assert torch.allclose(common.apply_rope(x, torch.zeros(5), inv_freq), x)
    rotated = common.apply_rope(x, torch.arange(5) * 1000, inv_freq)
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
