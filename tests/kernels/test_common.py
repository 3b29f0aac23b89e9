"""Shared kernel helpers, and a guard that the kernel tests really run Triton."""

from __future__ import annotations

import pytest
import torch

from kvplug.kernels import chunk_select, common, lowrank_rope, sparse_decode


@pytest.mark.parametrize("kernel", [chunk_select._chunk_scores_kernel,
                                    sparse_decode._sparse_paged_decode_kernel,
                                    lowrank_rope._lowrank_rope_keys_kernel],
                         ids=["chunk_scores", "sparse_paged_decode", "lowrank_rope_keys"])
def test_launchers_run_triton_not_the_reference(kernel, device):
    """Otherwise every kernel-vs-reference test would compare the reference with itself."""
    assert common.use_triton(kernel, torch.empty(1, device=device)), (
        "the Triton kernels are not interpreted: triton was imported before "
        "tests/kernels/conftest.py could set TRITON_INTERPRET=1; run `pytest tests/kernels` "
        "alone or export TRITON_INTERPRET=1")


@pytest.mark.parametrize("layout", ["NHD", "HND-view"])
def test_gather_paged_follows_block_table(layout):
    cache = torch.randn(6, 4, 2, 3)                                     # [blocks, bs, H, D]
    if layout == "HND-view":                                            # strides do not flatten
        cache = cache.transpose(1, 2).contiguous().transpose(1, 2)
    table = torch.tensor([[5, 0], [2, 3]])
    pos = torch.tensor([[[0, 5, -1], [3, 4, 7]], [[7, 1, 2], [0, 6, 6]]])  # [B, H, N]
    per_head = common.gather_paged_per_head(cache, table, pos)
    all_heads = common.gather_paged(cache, table, pos[:, 0])            # [B, N, H, D]
    for b in range(2):
        for h in range(2):
            for n in range(3):
                t = max(int(pos[b, h, n]), 0)
                assert torch.equal(per_head[b, h, n], cache[table[b, t // 4], t % 4, h])
                t0 = max(int(pos[b, 0, n]), 0)
                assert torch.equal(all_heads[b, n, h], cache[table[b, t0 // 4], t0 % 4, h])


def test_apply_rope_is_a_rotation_and_identity_at_zero():
    x = torch.randn(5, 64)
    inv_freq = common.rope_inv_freq(64)
    assert torch.allclose(common.apply_rope(x, torch.zeros(5), inv_freq), x)
    rotated = common.apply_rope(x, torch.arange(5) * 1000, inv_freq)
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
