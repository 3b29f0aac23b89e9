"""Low-bit KV: pack 2/4/8-bit codes into bytes, and decode attention that reads the
packed codes directly.

A :class:`PackedKV` holds ``n`` tokens per (sequence, kv-head) quantized at one bit
width with ZipCache's two schemes (arXiv 2405.14256, ThisisBillhe/ZipCache):

* **keys, channel-wise**: ``k = code * k_step[c] + k_zero[c]``, one zero point and
  step per channel over the part's tokens (the outlier channels of keys get their own
  range);
* **values, channel-separable token-wise**: every channel is first divided by
  ``v_scale[c] = sqrt(max |v[:, c]|)`` over the part's tokens, then each token gets its
  own zero point and step: ``v = (code * v_step[t] + v_zero[t]) * v_scale[c]``.

Codes are ``round((x - zero) / step)`` clamped to ``[0, 2^bits - 1]`` (``floor(y + 0.5)``:
ties round up, where the official code's ``torch.round`` rounds half to even).  A byte
holds ``8 / bits`` codes in planes, as the official packer does: byte ``i`` of a row of
``D`` codes holds codes ``i, i + D·bits/8, ...`` at shifts ``0, bits, ...``; a row takes
``D·bits/8`` bytes.  Zero points, steps and channel scales are stored in float16.

:func:`quantized_decode` is one decode step's attention over a part: each program loads
a tile of packed codes, unpacks and dequantizes it in registers and runs the online
softmax, so no full-precision copy of the part is ever made.  Parts of different bit
widths (ZipCache's 4-bit salient and 2-bit other tokens of each kv-head) are attended
to separately and merged by their LSEs (:func:`~kvplug.kernels.common.merge_attention_states`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (LOG2E, default_scale, group_size, merge_attention_states, next_pow2,
                     use_triton)
from .online_softmax import online_softmax_step

BITS = (2, 4, 8)
PARAM_DTYPE = torch.float16


class PackedKV(NamedTuple):
    """``n`` tokens per (sequence, kv-head) at ``bits`` bits (see the module doc).

    ``k_codes``/``v_codes`` ``[B, H_kv, n, D·bits/8]`` uint8; ``k_zero``/``k_step``
    ``[B, H_kv, 1, D]``; ``v_zero``/``v_step`` ``[B, H_kv, n, 1]``; ``v_scale``
    ``[B, H_kv, 1, D]``; parameters in float16.
    """

    bits: int
    k_codes: Tensor
    k_zero: Tensor
    k_step: Tensor
    v_codes: Tensor
    v_zero: Tensor
    v_step: Tensor
    v_scale: Tensor

    @property
    def num_tokens(self) -> int:
        return self.k_codes.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_zero.shape[-1]

    def nbytes(self) -> int:
        """Bytes the part stores, parameters included."""
        return sum(t.numel() * t.element_size() for t in self[1:])


def check_bits(bits: int, head_dim: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not one of {list(BITS)}")
    if head_dim % (8 // bits):
        raise ValueError(f"head_dim={head_dim} does not pack into bytes at {bits} bits "
                         f"(a multiple of {8 // bits} is needed)")


# -- packing (torch) ------------------------------------------------------------
def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """``[..., D]`` integer codes in ``[0, 2^bits)`` -> ``[..., D·bits/8]`` uint8, planes."""
    check_bits(bits, codes.shape[-1])
    per_byte = 8 // bits
    planes = codes.to(torch.uint8).unflatten(-1, (per_byte, -1))        # [..., P, D/P]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (planes << shifts[:, None]).sum(dim=-2, dtype=torch.uint8)


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``[..., D·bits/8]`` uint8 -> ``[..., D]`` uint8."""
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not one of {list(BITS)}")
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    planes = (packed[..., None, :] >> shifts[:, None]) & ((1 << bits) - 1)
    return planes.flatten(-2)


# -- quantization parameters (torch) -------------------------------------------
def range_params(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Stored (float16) zero point and step of the range ``[lo, hi]``; a step of 0 (a
    constant range) becomes 1, so its codes are 0 and dequantize to ``lo``."""
    zero = lo.to(PARAM_DTYPE)
    step = ((hi - lo) / ((1 << bits) - 1)).to(PARAM_DTYPE)
    return zero, torch.where(step > 0, step, torch.ones_like(step))


def key_params(keys: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Channel-wise zero point and step of ``keys`` ``[B, H, n, D]`` -> ``[B, H, 1, D]``."""
    if keys.shape[2] == 0:
        zeros = keys.new_zeros(*keys.shape[:2], 1, keys.shape[3], dtype=torch.float32)
        return range_params(zeros, zeros, bits)
    k = keys.float()
    return range_params(k.amin(dim=2, keepdim=True), k.amax(dim=2, keepdim=True), bits)


def value_scale(values: Tensor) -> Tensor:
    """ZipCache's channel scale ``sqrt(max |v|)`` per channel over ``values``'s tokens,
    ``[B, H, n, D]`` -> ``[B, H, 1, D]`` (float16; 1 for an all-zero channel)."""
    if values.shape[2] == 0:
        return values.new_ones(*values.shape[:2], 1, values.shape[3], dtype=PARAM_DTYPE)
    scale = values.float().abs().amax(dim=2, keepdim=True).sqrt().to(PARAM_DTYPE)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def value_params(values: Tensor, scale: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Token-wise zero point and step of ``values / scale`` -> ``[B, H, n, 1]``."""
    v = values.float() / scale.float()
    return range_params(v.amin(dim=3, keepdim=True), v.amax(dim=3, keepdim=True), bits)


# -- quantize + pack ------------------------------------------------------------
@triton.jit
def _quantize_pack_kernel(
    x_ptr, zero_ptr, step_ptr, out_ptr, n_rows,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_zb, stride_zh, stride_zn, stride_zd,
    stride_sb, stride_sh, stride_sn, stride_sd,
    stride_ob, stride_oh, stride_on, stride_od,
    BITS: tl.constexpr, NUM_BYTES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (sequence, kv-head, tile of rows): every byte of the tile's packed rows."""
    h = tl.program_id(0)
    b = tl.program_id(2)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    i = tl.arange(0, BLOCK_B)
    ok = (n[:, None] < n_rows) & (i[None, :] < NUM_BYTES)
    packed = tl.zeros([BLOCK_N, BLOCK_B], tl.int32)
    for p in tl.static_range(8 // BITS):
        c = p * NUM_BYTES + i
        x = tl.load(x_ptr + b * stride_xb + h * stride_xh + n[:, None] * stride_xn
                    + c[None, :] * stride_xd, mask=ok, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + b * stride_zb + h * stride_zh + n[:, None] * stride_zn
                       + c[None, :] * stride_zd, mask=ok, other=0.0).to(tl.float32)
        step = tl.load(step_ptr + b * stride_sb + h * stride_sh + n[:, None] * stride_sn
                       + c[None, :] * stride_sd, mask=ok, other=1.0).to(tl.float32)
        code = tl.floor((x - zero) / step + 0.5)
        code = tl.minimum(tl.maximum(code, 0.0), (1 << BITS) - 1).to(tl.int32)
        packed = packed | (code << (p * BITS))
    tl.store(out_ptr + b * stride_ob + h * stride_oh + n[:, None] * stride_on
             + i[None, :] * stride_od, packed.to(tl.uint8), mask=ok)


def quantize_pack(x: Tensor, zero: Tensor, step: Tensor, bits: int) -> Tensor:
    """Codes of ``x`` ``[B, H, n, D]`` at ``zero``/``step`` (broadcast to ``x``), packed
    (Triton; see :func:`quantize_pack_ref`)."""
    if not use_triton(_quantize_pack_kernel, x):
        return quantize_pack_ref(x, zero, step, bits)
    B, H, N, D = x.shape
    check_bits(bits, D)
    num_bytes = D * bits // 8
    out = torch.empty(B, H, N, num_bytes, dtype=torch.uint8, device=x.device)
    if out.numel() == 0:
        return out
    zero, step = zero.expand_as(x), step.expand_as(x)
    block_n = 16
    _quantize_pack_kernel[(H, triton.cdiv(N, block_n), B)](
        x, zero, step, out, N, *x.stride(), *zero.stride(), *step.stride(), *out.stride(),
        BITS=bits, NUM_BYTES=num_bytes, BLOCK_B=max(16, next_pow2(num_bytes)), BLOCK_N=block_n,
    )
    return out


def quantize_pack_ref(x: Tensor, zero: Tensor, step: Tensor, bits: int) -> Tensor:
    """``round((x - zero) / step)`` clamped to ``[0, 2^bits)`` and packed (:func:`pack_codes`)."""
    check_bits(bits, x.shape[-1])
    codes = torch.floor((x.float() - zero.float()) / step.float() + 0.5)
    return pack_codes(codes.clamp(0, (1 << bits) - 1), bits)


def quantize_kv(keys: Tensor, values: Tensor, bits: int) -> PackedKV:
    """``keys``/``values`` ``[B, H, n, D]`` quantized at ``bits`` with ZipCache's schemes."""
    check_bits(bits, keys.shape[-1])
    k_zero, k_step = key_params(keys, bits)
    v_scale = value_scale(values)
    v_zero, v_step = value_params(values, v_scale, bits)
    scaled = values.float() / v_scale.float()
    return PackedKV(bits, quantize_pack(keys, k_zero, k_step, bits), k_zero, k_step,
                    quantize_pack(scaled, v_zero, v_step, bits), v_zero, v_step, v_scale)


def dequantize_kv(part: PackedKV, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The keys and values ``[B, H, n, D]`` a part stands for (reference and tests)."""
    k = unpack_codes(part.k_codes, part.bits).float() * part.k_step.float() + part.k_zero.float()
    v = unpack_codes(part.v_codes, part.bits).float() * part.v_step.float() + part.v_zero.float()
    return k.to(dtype), (v * part.v_scale.float()).to(dtype)


# -- decode attention over a packed part ---------------------------------------
@triton.jit
def _quantized_decode_kernel(
    q_ptr, kc_ptr, kz_ptr, ks_ptr, vc_ptr, vz_ptr, vs_ptr, vsc_ptr, out_ptr, lse_ptr,
    qk_scale, n_tokens,
    stride_qb, stride_qh, stride_qd,
    stride_kcb, stride_kch, stride_kcn, stride_kcd,
    stride_kzb, stride_kzh, stride_kzd,
    stride_ksb, stride_ksh, stride_ksd,
    stride_vcb, stride_vch, stride_vcn, stride_vcd,
    stride_vzb, stride_vzh, stride_vzn,
    stride_vsb, stride_vsh, stride_vsn,
    stride_vscb, stride_vsch, stride_vscd,
    stride_ob, stride_oh, stride_od,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BITS: tl.constexpr,
):
    """One (sequence, kv-head): online softmax (log2 domain) over the part's tokens, each
    tile of codes unpacked and dequantized in registers (fp32 math: the dequantized tile
    is fp32 whatever the query's dtype)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    NUM_BYTES: tl.constexpr = HEAD_DIM * BITS // 8
    MASK: tl.constexpr = (1 << BITS) - 1

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    byte = d % NUM_BYTES                       # code d sits in byte d % NUM_BYTES ...
    shift = (d // NUM_BYTES) * BITS            # ... at this shift (the plane layout)
    hq = h * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + hq[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    k_zero = tl.load(kz_ptr + b * stride_kzb + h * stride_kzh + d * stride_kzd, mask=d_ok,
                     other=0.0).to(tl.float32)
    k_step = tl.load(ks_ptr + b * stride_ksb + h * stride_ksh + d * stride_ksd, mask=d_ok,
                     other=0.0).to(tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)

    for start in range(0, n_tokens, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < n_tokens
        tile = valid[:, None] & d_ok[None, :]
        kb = tl.load(kc_ptr + b * stride_kcb + h * stride_kch + n[:, None] * stride_kcn
                     + byte[None, :] * stride_kcd, mask=tile, other=0).to(tl.int32)
        k = ((kb >> shift[None, :]) & MASK).to(tl.float32) * k_step[None, :] + k_zero[None, :]
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))

        m_new, alpha, p, l_i = online_softmax_step(m_i, l_i, qk)
        vb = tl.load(vc_ptr + b * stride_vcb + h * stride_vch + n[:, None] * stride_vcn
                     + byte[None, :] * stride_vcd, mask=tile, other=0).to(tl.int32)
        v_zero = tl.load(vz_ptr + b * stride_vzb + h * stride_vzh + n * stride_vzn, mask=valid,
                         other=0.0).to(tl.float32)
        v_step = tl.load(vs_ptr + b * stride_vsb + h * stride_vsh + n * stride_vsn, mask=valid,
                         other=0.0).to(tl.float32)
        v = ((vb >> shift[None, :]) & MASK).to(tl.float32) * v_step[:, None] + v_zero[:, None]
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new

    # the channel scale is the same for every token: applied once, to the weighted sum
    v_scale = tl.load(vsc_ptr + b * stride_vscb + h * stride_vsch + d * stride_vscd, mask=d_ok,
                      other=0.0).to(tl.float32)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None] * v_scale[None, :]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634,
                   float("-inf"))
    tl.store(out_ptr + b * stride_ob + hq[:, None] * stride_oh + d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + b * stride_lb + hq * stride_lh, lse, mask=g_ok)


def _check_decode(q: Tensor, part: PackedKV) -> tuple[int, int, int, int, int]:
    if q.dim() != 3 or part.k_codes.dim() != 4:
        raise ValueError(f"q must be [B, H_q, D] and the part's codes [B, H_kv, n, bytes]; got "
                         f"{tuple(q.shape)}, {tuple(part.k_codes.shape)}")
    B, H_q, D = q.shape
    check_bits(part.bits, D)
    if part.k_codes.shape[0] != B or part.head_dim != D \
            or part.k_codes.shape[-1] != D * part.bits // 8:
        raise ValueError(f"part of {part.bits}-bit codes {tuple(part.k_codes.shape)}, head_dim "
                         f"{part.head_dim} does not match q {tuple(q.shape)}")
    H_kv = part.k_codes.shape[1]
    return B, H_q, H_kv, D, group_size(H_q, H_kv)


def quantized_decode(q: Tensor, part: PackedKV, *, scale: float | None = None) -> tuple[Tensor,
                                                                                        Tensor]:
    """Decode attention over a packed part (Triton; see :func:`quantized_decode_ref`)."""
    B, H_q, H_kv, D, G = _check_decode(q, part)
    if not use_triton(_quantized_decode_kernel, q):
        return quantized_decode_ref(q, part, scale=scale)
    out = torch.empty(B, H_q, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, H_q, device=q.device, dtype=torch.float32)
    _quantized_decode_kernel[(B, H_kv)](
        q, part.k_codes, part.k_zero, part.k_step, part.v_codes, part.v_zero, part.v_step,
        part.v_scale, out, lse, default_scale(D, scale) * LOG2E, part.num_tokens,
        *q.stride(), *part.k_codes.stride(),
        *(part.k_zero.stride(i) for i in (0, 1, 3)), *(part.k_step.stride(i) for i in (0, 1, 3)),
        *part.v_codes.stride(),
        *(part.v_zero.stride(i) for i in (0, 1, 2)), *(part.v_step.stride(i) for i in (0, 1, 2)),
        *(part.v_scale.stride(i) for i in (0, 1, 3)), *out.stride(), *lse.stride(),
        GROUP=G, G_PAD=max(16, next_pow2(G)), HEAD_DIM=D, BLOCK_D=max(16, next_pow2(D)),
        BLOCK_N=32 if q.is_cuda else 16, BITS=part.bits,
    )
    return out, lse


def quantized_decode_ref(q: Tensor, part: PackedKV, *, scale: float | None = None,
                         tile: int = 4096) -> tuple[Tensor, Tensor]:
    """One decode query per sequence attending to every token of a packed part.

    The CPU path: ``tile`` tokens at a time are unpacked and dequantized, attended to,
    and merged by LSE, so no full-precision copy of the part is made.

    Parameters
    ----------
    q : Tensor
        ``[B, H_q, D]``; query head ``h`` reads kv-head ``h // G``.
    part : PackedKV
        ``n`` tokens per (sequence, kv-head) (``n`` may be 0).
    scale : float, optional
        Softmax scale (default ``1 / sqrt(D)``).
    tile : int
        Tokens dequantized at once.

    Returns
    -------
    out : Tensor
        ``[B, H_q, D]`` float32 (zeros when ``n`` is 0).
    lse : Tensor
        ``[B, H_q]`` float32 natural-log softmax denominators (``-inf`` when ``n`` is 0),
        to merge with attention over other tokens.
    """
    B, H_q, H_kv, D, G = _check_decode(q, part)
    qg = q.float().view(B, H_kv, G, D) * default_scale(D, scale)
    outs, lses = [], []
    for start in range(0, max(part.num_tokens, 1), tile):
        keys, values = dequantize_kv(_tokens(part, slice(start, start + tile)))
        s = qg @ keys.transpose(-1, -2)                                       # [B, H, G, t]
        lse = torch.logsumexp(s, dim=-1)                                      # [B, H, G]
        p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        outs.append((p @ values).reshape(B, H_q, D))
        lses.append(lse.reshape(B, H_q))
    if len(outs) == 1:
        return outs[0], lses[0]
    return merge_attention_states(torch.stack(outs, dim=2), torch.stack(lses, dim=2), dim=2)


def _tokens(part: PackedKV, tokens: slice) -> PackedKV:
    """The tokens ``tokens`` of a part, as a part (views)."""
    return part._replace(k_codes=part.k_codes[:, :, tokens], v_codes=part.v_codes[:, :, tokens],
                         v_zero=part.v_zero[:, :, tokens], v_step=part.v_step[:, :, tokens])
