"""ShadowKV low-rank key reconstruction with RoPE, fused.

ShadowKV (https://arxiv.org/abs/2410.21465) keeps the *pre-RoPE* prompt keys
of a layer as a rank-``r`` factorization from one SVD over all kv-heads::

    K_pre[b, s, :] ~= U[b, s, :] @ SV[b]        U: [B, S, r], SV: [B, r, H_kv * D]

(``SV = diag(sigma[:r]) @ Vh[:r]``; ShadowKV's default ``r = 160``).  At decode
the keys of the selected positions are rebuilt and rotated at their original
positions, then attended with the values fetched for the same positions.
Per-head factors (Loki-style, ``U: [B, H_kv, S, r]``, ``SV: [B, H_kv, r, D]``)
are accepted as well.

The kernel computes both halves of the head (``U[pos] @ SV[:, :D/2]`` and
``U[pos] @ SV[:, D/2:]``) so the rotate-half RoPE needs no data shuffle, with
``cos/sin`` of ``pos * inv_freq`` computed in fp32 on the fly (cheaper than
reading a cos/sin cache row per key).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import apply_rope, dot_in_fp32, next_pow2, use_triton


@triton.jit
def _lowrank_rope_keys_kernel(
    u_ptr, sv_ptr, pos_ptr, inv_freq_ptr, out_ptr,
    n_pos, rank,
    stride_ub, stride_uh, stride_us, stride_ur,
    stride_sb, stride_sh, stride_sr, stride_sd,
    stride_pb, stride_ph, stride_pn,
    stride_ob, stride_oh, stride_on, stride_od,
    HALF_D: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_F32: tl.constexpr,
):
    """``BLOCK_N`` positions of one (sequence, kv-head): (U[pos] @ SV) then RoPE at pos."""
    b = tl.program_id(0).to(tl.int64)       # U of a 128k prompt: b * stride_ub can pass 2**31
    h = tl.program_id(1)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_pos
    pos = tl.load(pos_ptr + b * stride_pb + h * stride_ph + n * stride_pn, mask=n_ok, other=-1)
    valid = pos >= 0
    pos_safe = tl.where(valid, pos, 0).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF_D

    u_row = u_ptr + b * stride_ub + h * stride_uh + pos_safe * stride_us
    sv_base = sv_ptr + b * stride_sb + h * stride_sh
    k1 = tl.zeros([BLOCK_N, BLOCK_HALF], tl.float32)
    k2 = tl.zeros([BLOCK_N, BLOCK_HALF], tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < rank
        u = tl.load(u_row[:, None] + r[None, :] * stride_ur,
                    mask=valid[:, None] & r_ok[None, :], other=0.0)
        sv_mask = r_ok[:, None] & d_ok[None, :]
        sv1 = tl.load(sv_base + r[:, None] * stride_sr + d[None, :] * stride_sd,
                      mask=sv_mask, other=0.0)
        sv2 = tl.load(sv_base + r[:, None] * stride_sr + (d[None, :] + HALF_D) * stride_sd,
                      mask=sv_mask, other=0.0)
        if DOT_F32:
            u = u.to(tl.float32)
            k1 += tl.dot(u, sv1.to(tl.float32), input_precision="ieee")
            k2 += tl.dot(u, sv2.to(tl.float32), input_precision="ieee")
        else:
            k1 += tl.dot(u, sv1)
            k2 += tl.dot(u, sv2)

    inv_freq = tl.load(inv_freq_ptr + d, mask=d_ok, other=0.0)
    angle = pos_safe.to(tl.float32)[:, None] * inv_freq[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    out1 = k1 * cos - k2 * sin
    out2 = k2 * cos + k1 * sin
    mask = n_ok[:, None] & d_ok[None, :]
    o_row = out_ptr + b * stride_ob + h * stride_oh + n[:, None] * stride_on
    tl.store(o_row + d[None, :] * stride_od, out1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + (d[None, :] + HALF_D) * stride_od, out2.to(out_ptr.dtype.element_ty),
             mask=mask)


def _views(u: Tensor, sv: Tensor, positions: Tensor, inv_freq: Tensor):
    """Views U [B, H, S, r], SV [B, H, r, D] and pos [B, H, N] of the inputs (no copies)."""
    D = 2 * inv_freq.numel()
    B = u.shape[0]
    if sv.dim() == 3:
        if sv.shape[2] % D:
            raise ValueError(f"sv last dim {sv.shape[2]} is not a multiple of head_dim {D}")
        sv = sv.unflatten(2, (sv.shape[2] // D, D)).permute(0, 2, 1, 3)
    if sv.dim() != 4 or sv.shape[3] != D:
        raise ValueError(f"sv must be [B, r, H_kv*D] or [B, H_kv, r, D] with D={D}; "
                         f"got {tuple(sv.shape)}")
    H, r = sv.shape[1], sv.shape[2]
    if u.dim() == 3:
        u = u.unsqueeze(1).expand(B, H, *u.shape[1:])
    if u.dim() != 4 or u.shape[:2] != (B, H) or u.shape[3] != r:
        raise ValueError(f"u must be [B, S, r] or [B, H_kv, S, r] with B={B}, H_kv={H}, r={r}; "
                         f"got {tuple(u.shape)}")
    if positions.dim() == 2:
        positions = positions.unsqueeze(1).expand(B, H, positions.shape[1])
    if positions.dim() != 3 or positions.shape[:2] != (B, H):
        raise ValueError(f"positions must be [B, N] or [B, H_kv, N]; got {tuple(positions.shape)}")
    return u, sv, positions, D


def lowrank_rope_keys(u: Tensor, sv: Tensor, positions: Tensor, inv_freq: Tensor, *,
                      out: Tensor | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """Fused low-rank key reconstruction + RoPE (Triton; see :func:`lowrank_rope_keys_ref`)."""
    u4, sv4, pos, D = _views(u, sv, positions, inv_freq)
    if not use_triton(_lowrank_rope_keys_kernel, u):
        return lowrank_rope_keys_ref(u, sv, positions, inv_freq, out=out, out_dtype=out_dtype)
    B, H, _, r = u4.shape
    N = pos.shape[2]
    if out is None:
        out = torch.empty(B, H, N, D, device=u.device, dtype=out_dtype or sv.dtype)
    inv_freq = inv_freq.float().contiguous()
    BLOCK_N = 32 if u.is_cuda else 16
    _lowrank_rope_keys_kernel[(B, H, triton.cdiv(N, BLOCK_N))](
        u4, sv4, pos, inv_freq, out, N, r,
        *u4.stride(), *sv4.stride(), *pos.stride(), *out.stride(),
        HALF_D=D // 2, BLOCK_HALF=max(16, next_pow2(D // 2)), BLOCK_N=BLOCK_N,
        BLOCK_R=32, DOT_F32=dot_in_fp32(_lowrank_rope_keys_kernel, u.dtype),
    )
    return out


def lowrank_rope_keys_ref(u: Tensor, sv: Tensor, positions: Tensor, inv_freq: Tensor, *,
                          out: Tensor | None = None,
                          out_dtype: torch.dtype | None = None) -> Tensor:
    """Low-rank key reconstruction + RoPE, torch reference and CPU path.

    Parameters
    ----------
    u : Tensor
        ``[B, S, r]`` left factor shared by all kv-heads (ShadowKV), or
        ``[B, H_kv, S, r]`` per kv-head.
    sv : Tensor
        ``[B, r, H_kv * D]`` (ShadowKV's layout) or ``[B, H_kv, r, D]``.
    positions : Tensor
        ``[B, H_kv, N]`` (per kv-head selection) or ``[B, N]`` int positions
        into ``S``; also the RoPE positions.  ``-1`` = unused slot (zeros out).
    inv_freq : Tensor
        ``[D / 2]`` RoPE inverse frequencies; :func:`~kvplug.kernels.common.rope_inv_freq`
        gives the default from ``rope_theta``, or pass the model's (scaled) one.
    out : Tensor, optional
        ``[B, H_kv, N, D]`` preallocated output.
    out_dtype : torch.dtype, optional
        Output dtype when ``out`` is not given; default ``sv.dtype``.

    Returns
    -------
    Tensor
        ``[B, H_kv, N, D]`` post-RoPE keys (reconstruction and RoPE in fp32).
    """
    u4, sv4, pos, D = _views(u, sv, positions, inv_freq)
    B, H = u4.shape[:2]
    valid = pos >= 0
    p = pos.clamp_min(0).long()
    b_idx = torch.arange(B, device=u.device)[:, None, None]
    h_idx = torch.arange(H, device=u.device)[None, :, None]
    k_pre = u4[b_idx, h_idx, p].float() @ sv4.float()                     # [B, H, N, D]
    k = apply_rope(k_pre, p, inv_freq.to(u.device)) * valid[..., None]
    if out is None:
        return k.to(out_dtype or sv.dtype)
    return out.copy_(k)
