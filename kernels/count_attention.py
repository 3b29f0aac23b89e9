"""Decode attention over a merged KV cache: each key slot stands for ``c`` tokens.

A slot made by merging ``c`` tokens into one centroid (Chelsea, ToMe) must weigh in the
softmax as ``c`` identical copies of itself, which is a ``log c`` bias on its score::

    out = sum_j p_j v_j,   p = softmax_j(q . k_j * scale + log c_j)

For sequence ``b`` and kv-head ``h`` the slots are ``keys[b, h, :lens[b]]``; a slot of
count 0 is empty (masked), so rows may hold different numbers of slots.  Counts may be
integer or float.  Query heads of a GQA group share their kv-head's slots (the
:mod:`kvplug.kernels.common` order); the Triton kernel runs one program per (sequence,
kv-head, split), loads each K/V tile once for the whole group, and merges split-K
partials by their LSEs, as :mod:`kvplug.kernels.sparse_decode` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (LOG2E, default_scale, dot_in_fp32, group_size, merge_attention_states,
                     next_pow2, use_triton)
from .online_softmax import online_softmax_step
from .sparse_decode import _default_splits


@triton.jit
def _count_weighted_decode_kernel(
    q_ptr, k_ptr, v_ptr, c_ptr, lens_ptr, out_ptr, lse_ptr,
    qk_scale, n_slots, span,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_cb, stride_ch, stride_cn,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
):
    """One (sequence, kv-head, split): online softmax (log2 domain) over ``span`` slots,
    each score biased by ``log2 c``."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)

    lo = split * span
    hi = tl.minimum(tl.minimum(lo + span, tl.load(lens_ptr + b)), n_slots)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    hq = h * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + hq[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)

    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        c = tl.load(c_ptr + b * stride_cb + h * stride_ch + n * stride_cn, mask=n < hi,
                    other=0).to(tl.float32)
        valid = (n < hi) & (c > 0)
        kv_mask = valid[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + n[:, None] * stride_kn
                    + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        if DOT_F32:
            qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        bias = tl.log2(tl.where(valid, c, 1.0))
        qk = tl.where(valid[None, :], qk * qk_scale + bias[None, :], float("-inf"))

        m_new, alpha, p, l_i = online_softmax_step(m_i, l_i, qk)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + n[:, None] * stride_vn
                    + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634,
                   float("-inf"))
    tl.store(out_ptr + b * stride_ob + hq[:, None] * stride_oh + split * stride_os
             + d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + b * stride_lb + hq * stride_lh + split * stride_ls, lse, mask=g_ok)


def _check_inputs(q, keys, values, counts, lens):
    if q.dim() != 3 or keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(f"q must be [B, H_q, D] and keys/values [B, H_kv, N, D] of one "
                         f"shape; got {tuple(q.shape)}, {tuple(keys.shape)}, "
                         f"{tuple(values.shape)}")
    B, H_q, D = q.shape
    if keys.shape[0] != B or keys.shape[3] != D:
        raise ValueError(f"keys {tuple(keys.shape)} do not match q {tuple(q.shape)} "
                         f"(batch and head_dim)")
    if not (q.dtype == keys.dtype == values.dtype):
        raise ValueError(f"q, keys and values must share a dtype; got {q.dtype}, "
                         f"{keys.dtype}, {values.dtype}")
    if counts.shape != keys.shape[:3] or lens.shape != (B,):
        raise ValueError(f"counts must be [B, H_kv, N] = {list(keys.shape[:3])} and lens "
                         f"[{B}]; got {tuple(counts.shape)}, {tuple(lens.shape)}")
    return B, H_q, keys.shape[1], keys.shape[2], D, group_size(H_q, keys.shape[1])


def count_weighted_decode(q: Tensor, keys: Tensor, values: Tensor, counts: Tensor, lens: Tensor,
                    *, scale: float | None = None, out: Tensor | None = None,
                    return_lse: bool = False, num_splits: int | None = None):
    """Count-weighted decode attention (Triton; see :func:`count_weighted_decode_ref`)."""
    B, H_q, H_kv, N, D, G = _check_inputs(q, keys, values, counts, lens)
    if not use_triton(_count_weighted_decode_kernel, q):
        return count_weighted_decode_ref(q, keys, values, counts, lens, scale=scale, out=out,
                                   return_lse=return_lse)
    block_n = 64 if q.is_cuda else 32
    S = num_splits or _default_splits(q, B * H_kv, N, block_n)
    span = triton.cdiv(triton.cdiv(max(N, 1), S), block_n) * block_n
    if out is None:
        out = torch.empty_like(q)
    part_lse = torch.empty(B, H_q, S, device=q.device, dtype=torch.float32)
    # single split: the kernel writes the final output directly
    part_out = (out.unsqueeze(2) if S == 1 else
                torch.empty(B, H_q, S, D, device=q.device, dtype=torch.float32))
    _count_weighted_decode_kernel[(B, H_kv, S)](
        q, keys, values, counts, lens, part_out, part_lse,
        default_scale(D, scale) * LOG2E, N, span,
        *q.stride(), *keys.stride(), *values.stride(), *counts.stride(), *part_out.stride(),
        *part_lse.stride(),
        GROUP=G, G_PAD=max(16, next_pow2(G)), HEAD_DIM=D, BLOCK_D=max(16, next_pow2(D)),
        BLOCK_N=block_n, DOT_F32=dot_in_fp32(_count_weighted_decode_kernel, q.dtype),
    )
    if S == 1:
        lse = part_lse.squeeze(2)
    else:
        merged, lse = merge_attention_states(part_out, part_lse, dim=2)
        out.copy_(merged)
    return (out, lse) if return_lse else out


def count_weighted_decode_ref(q: Tensor, keys: Tensor, values: Tensor, counts: Tensor,
                        lens: Tensor, *, scale: float | None = None,
                        out: Tensor | None = None, return_lse: bool = False):
    """Decode attention where slot ``j`` weighs as ``counts[..., j]`` identical tokens.

    Parameters
    ----------
    q : Tensor
        ``[B, H_q, D]`` one decode query per sequence.
    keys, values : Tensor
        ``[B, H_kv, N, D]`` the slots (any strides), dtype of ``q``.
    counts : Tensor
        ``[B, H_kv, N]`` tokens each slot stands for (int or float; ``<= 0``: empty).
    lens : Tensor
        ``[B]`` slots in use per sequence (the slots at and after ``lens[b]`` are masked).
    scale : float, optional
        Softmax scale (default ``1 / sqrt(D)``).
    out : Tensor, optional
        ``[B, H_q, D]`` buffer to write the output into.
    return_lse : bool
        Also return the natural-log softmax denominator (with the ``log c`` biases).

    Returns
    -------
    out : Tensor
        ``[B, H_q, D]`` in ``q.dtype`` (zeros for a row with no slot).
    lse : Tensor
        ``[B, H_q]`` fp32, only if ``return_lse`` (``-inf`` for a row with no slot).
    """
    B, H_q, H_kv, N, D, G = _check_inputs(q, keys, values, counts, lens)
    c = counts.float()
    valid = (c > 0) & (torch.arange(N, device=q.device) < lens[:, None, None])
    bias = torch.where(valid, c.log(), float("-inf"))                         # [B, H, N]
    qg = q.float().view(B, H_kv, G, D)
    s = torch.einsum("bhgd,bhnd->bhgn", qg, keys.float()) * default_scale(D, scale)
    # masked, not just biased: an empty slot's K/V may be garbage (nan)
    s = (s + bias[:, :, None, :]).masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                          # [B, H, G]
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    v = torch.where(valid[..., None], values.float(), 0.0)
    o = torch.einsum("bhgn,bhnd->bhgd", p, v).reshape(B, H_q, D)
    if out is None:
        out = torch.empty_like(q)
    out.copy_(o)
    return (out, lse.reshape(B, H_q)) if return_lse else out
