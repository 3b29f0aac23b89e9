"""Count-weighted decode attention: Triton kernel vs torch reference, and the reference
vs plain attention over the slots duplicated ``count`` times."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from kvplug.kernels import (common, count_attention, count_weighted_decode,
                            count_weighted_decode_ref)


@dataclass(frozen=True)
class Case:
    lens: tuple[int, ...]
    num_kv_heads: int
    group: int
    head_dim: int
    slots: int
    dtype: torch.dtype = torch.float32
    count_dtype: torch.dtype = torch.int32           # floating: counts need not be whole

    @property
    def id(self) -> str:
        dt, ct = (str(t).removeprefix("torch.").replace("float", "f")
                  for t in (self.dtype, self.count_dtype))
        return (f"B{len(self.lens)}-G{self.group}-Hkv{self.num_kv_heads}-D{self.head_dim}"
                f"-N{self.slots}-{dt}-counts_{ct}")


CASES = [
    Case((37, 70, 5), 2, 1, 64, 70, count_dtype=torch.int64),              # MHA, varlen
    Case((40, 17), 2, 3, 32, 48, torch.float16),                           # GQA 3
    Case((64, 33), 1, 4, 64, 64, torch.bfloat16, torch.float32),           # GQA 4
    Case((45, 77), 2, 2, 48, 80),                                          # head_dim not 2^k
]


def _inputs(case: Case, device, seed: int = 0):
    """Random q/K/V and counts in {0: empty, 1, 2, 3} (or floats in [0.5, 4)), with
    garbage (nan) in every slot the attention must not read."""
    g = torch.Generator().manual_seed(seed)
    B, H, N, D = len(case.lens), case.num_kv_heads, case.slots, case.head_dim
    q = torch.randn(B, H * case.group, D, generator=g)
    keys, values = torch.randn(2, B, H, N, D, generator=g)
    if case.count_dtype.is_floating_point:
        counts = torch.rand(B, H, N, generator=g) * 3.5 + 0.5
    else:
        counts = torch.randint(0, 4, (B, H, N), generator=g, dtype=case.count_dtype)
    lens = torch.tensor(case.lens, dtype=torch.int32)
    unread = (counts <= 0) | (torch.arange(N) >= lens[:, None, None])
    keys[unread], values[unread] = float("nan"), float("nan")
    to = dict(device=device)
    return (q.to(case.dtype).to(**to), keys.to(case.dtype).to(**to),
            values.to(case.dtype).to(**to), counts.to(**to), lens.to(**to))


IMPLS = pytest.mark.parametrize("impl", [count_weighted_decode, count_weighted_decode_ref],
                                ids=["triton", "ref"])


def test_launcher_runs_triton_not_the_reference(device):
    """Otherwise the kernel-vs-reference tests would compare the reference with itself."""
    assert common.use_triton(count_attention._count_weighted_decode_kernel,
                             torch.empty(1, device=device))


@pytest.mark.parametrize("splits", [1, 3], ids=["split1", "split3"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_ref(case, splits, device, assert_close):
    args = _inputs(case, device)
    out, lse = count_weighted_decode(*args, return_lse=True, num_splits=splits)
    ref_out, ref_lse = count_weighted_decode_ref(*args, return_lse=True)
    assert out.dtype == case.dtype and out.shape == args[0].shape
    assert_close("out", out, ref_out, case.dtype)
    assert_close("lse", lse, ref_lse, torch.float32, scale=10)


@pytest.mark.parametrize("case", [c for c in CASES if not c.count_dtype.is_floating_point],
                         ids=lambda c: c.id)
def test_ref_equals_attention_over_duplicated_slots(case, assert_close):
    """A slot of count c weighs exactly as c identical keys (and values)."""
    q, keys, values, counts, lens = _inputs(case, "cpu")
    out, lse = count_weighted_decode_ref(q, keys, values, counts, lens, return_lse=True)
    G, D = case.group, case.head_dim
    for b, L in enumerate(case.lens):
        for h in range(case.num_kv_heads):
            c = counts[b, h, :L].long()
            k = keys[b, h, :L].float().repeat_interleave(c, dim=0)
            v = values[b, h, :L].float().repeat_interleave(c, dim=0)
            for hq in range(h * G, (h + 1) * G):
                s = k @ q[b, hq].float() / math.sqrt(D)
                assert_close(f"out b{b} h{hq}", out[b, hq], (torch.softmax(s, 0) @ v)
                             .to(case.dtype), case.dtype)
                assert_close(f"lse b{b} h{hq}", lse[b, hq], torch.logsumexp(s, 0),
                             torch.float32, scale=10)


@IMPLS
def test_empty_rows_give_zeros_not_nan(impl, device):
    """A row of length 0 and a row whose slots all have count 0: zeros and LSE -inf."""
    q = torch.randn(2, 2, 32, device=device)
    keys = torch.full((2, 1, 8, 32), float("nan"), device=device)
    counts = torch.zeros(2, 1, 8, device=device)
    lens = torch.tensor([0, 8], device=device)
    out, lse = impl(q, keys, keys, counts, lens, return_lse=True)
    assert torch.equal(out.cpu(), torch.zeros(2, 2, 32))
    assert torch.isneginf(lse).all()


@IMPLS
def test_strided_views_scale_and_out_buffer(impl, device, assert_close):
    """K/V stored ``[B, N, H_kv, D]`` passed transposed, counts as a strided view, a custom
    scale and an ``out=`` buffer that is filled and returned."""
    case = CASES[1]
    q, keys, values, counts, lens = _inputs(case, device)
    expected = count_weighted_decode_ref(q, keys, values, counts, lens, scale=0.3)
    k_nhd = keys.transpose(1, 2).contiguous().transpose(1, 2)
    v_nhd = values.transpose(1, 2).contiguous().transpose(1, 2)
    c_strided = counts.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.empty_like(q)
    got = impl(q, k_nhd, v_nhd, c_strided, lens, scale=0.3, out=out)
    assert got is out
    assert_close("out", out, expected, case.dtype)


def test_shapes_are_checked():
    q, keys = torch.randn(2, 4, 16), torch.randn(2, 2, 8, 16)
    with pytest.raises(ValueError, match=r"counts must be \[B, H_kv, N\] = \[2, 2, 8\]"):
        count_weighted_decode_ref(q, keys, keys, torch.ones(2, 8), torch.tensor([8, 8]))
    with pytest.raises(ValueError, match="num_q_heads=3 is not a multiple of num_kv_heads=2"):
        count_weighted_decode_ref(q[:, :3], keys, keys, torch.ones(2, 2, 8),
                                  torch.tensor([8, 8]))
