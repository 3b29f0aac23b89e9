"""ZipCache's mixed-precision KV in fixed-size pages, so a paged KV pool can hold it.

A page is one block of ``T`` tokens of one kv-head, ``T·C`` bytes (``C`` =
:attr:`PageLayout.slot_bytes`, what an engine allocates per token and kv-head):

==========  ==============  =====================================================
field       shape           meaning
==========  ==============  =====================================================
k codes     ``[T, F]`` u8   ``F = D·bits_salient/8``, planes as ``pack_codes``;
v codes     ``[T, F]`` u8   a group-1 token's codes are ``< 2^bits_other``
v zero      ``[T]`` f16     token-wise value range (ZipCache's channel-separable
v step      ``[T]`` f16     token-wise scheme)
group       ``[T]`` u8      0: salient (``bits_salient``), 1: other (``bits_other``)
k zero      ``[2, D]`` f16  channel-wise key range of each group's tokens
k step      ``[2, D]`` f16
v scale     ``[2, D]`` f16  ``sqrt(max |v|)`` per channel over each group's tokens
==========  ==============  =====================================================

Every slot is sized for ``bits_salient``: an engine's page has one size, so a token at
``bits_other`` saves no pool memory and is stored at the same code width (with
``2^bits_other`` levels), which lets attention unpack every token alike and apply each
group's parameters to the scores and the weighted sums, not to every element.  Ranges
are per page and group (block-local: a page never reads another's), finer than
ZipCache's per-sequence ranges.  :func:`pack_pages` quantizes whole pages from K/V and
a group per token; :func:`unpack_pages` is its inverse up to quantization error;
:func:`pages_attention` attends one decode query per sequence to its pages (Triton: a
page's codes unpacked and dequantized in registers, online softmax; on CPU the same in
C++, a token's codes at a time, ``csrc/quant_pages_cpu.cpp``; its torch reference
:func:`pages_attention_ref` reads a tile of pages at a time and applies each group's
parameters to the scores and weights: never a full-precision copy of the past).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import LOG2E, merge_attention_states, next_pow2, use_triton
from .cpu_ext import optional_cpu_ext
from .online_softmax import online_softmax_step
from .quant_pack import PARAM_DTYPE, check_bits, pack_codes, range_params, unpack_codes

_F16 = 2   # bytes of a stored parameter


@dataclass(frozen=True)
class PageLayout:
    """Where each field of a page lies (see the module doc)."""

    block_size: int
    head_dim: int
    bits_salient: int
    bits_other: int

    def __post_init__(self) -> None:
        for bits in (self.bits_salient, self.bits_other):
            check_bits(bits, self.head_dim)
        if self.bits_other > self.bits_salient:
            raise ValueError(f"bits_other={self.bits_other} exceeds bits_salient="
                             f"{self.bits_salient}: the code fields are sized for salient tokens")

    @property
    def bits(self) -> tuple[int, int]:
        return self.bits_salient, self.bits_other

    @property
    def code_bytes(self) -> int:
        return self.head_dim * self.bits_salient // 8

    @property
    def used_bytes(self) -> int:
        """Bytes of a page's fields, before padding."""
        T, D = self.block_size, self.head_dim
        return T * (2 * self.code_bytes + 2 * _F16 + 1) + 3 * 2 * D * _F16

    @property
    def slot_bytes(self) -> int:
        """Bytes per token and kv-head: the page's fields spread over its tokens, rounded up
        to a multiple of 4 (an engine may view the pool as float32)."""
        per_token = -(-self.used_bytes // self.block_size)
        return -(-per_token // 4) * 4

    @property
    def page_bytes(self) -> int:
        return self.block_size * self.slot_bytes

    def fields(self, pages: Tensor) -> dict[str, Tensor]:
        """Views of every field of ``pages`` ``[..., page_bytes]`` uint8 (last dim contiguous)."""
        if pages.shape[-1] != self.page_bytes or pages.dtype != torch.uint8:
            raise ValueError(f"pages of {self.page_bytes} uint8 bytes expected, got "
                             f"{tuple(pages.shape)} {pages.dtype}")
        T, D, F = self.block_size, self.head_dim, self.code_bytes
        lead = pages.shape[:-1]
        out, offset = {}, 0
        for name, size, dtype, shape in (
                ("k_codes", T * F, torch.uint8, (T, F)), ("v_codes", T * F, torch.uint8, (T, F)),
                ("v_zero", T * _F16, PARAM_DTYPE, (T,)), ("v_step", T * _F16, PARAM_DTYPE, (T,)),
                ("group", T, torch.uint8, (T,)),
                ("k_zero", 2 * D * _F16, PARAM_DTYPE, (2, D)),
                ("k_step", 2 * D * _F16, PARAM_DTYPE, (2, D)),
                ("v_scale", 2 * D * _F16, PARAM_DTYPE, (2, D))):
            out[name] = pages[..., offset:offset + size].view(dtype).view(*lead, *shape)
            offset += size
        return out


def _masked_range(x: Tensor, member: Tensor) -> tuple[Tensor, Tensor]:
    """Min and max over the tokens (dim -2) of ``x`` ``[..., T, D]`` where ``member``
    ``[..., T]``; 0 for a group without tokens."""
    m = member[..., None]
    lo = torch.where(m, x, torch.inf).amin(dim=-2)
    hi = torch.where(m, x, -torch.inf).amax(dim=-2)
    empty = ~member.any(dim=-1, keepdim=True)
    return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)


def _codes(x: Tensor, zero: Tensor, step: Tensor, bits: int) -> Tensor:
    return torch.floor((x - zero.float()) / step.float() + 0.5).clamp_(0, (1 << bits) - 1)


def pack_pages(layout: PageLayout, keys: Tensor, values: Tensor, other: Tensor) -> Tensor:
    """Quantize whole pages.

    ``keys``/``values`` ``[..., T, D]`` (post-RoPE), ``other`` ``[..., T]`` bool: True for
    a token stored at ``bits_other``.  Returns ``[..., page_bytes]`` uint8.
    """
    k, v = keys.float(), values.float()
    pages = torch.zeros(*k.shape[:-2], layout.page_bytes, dtype=torch.uint8, device=k.device)
    f = layout.fields(pages)
    f["group"].copy_(other)
    k_codes = v_codes = torch.zeros_like(k)
    for group, bits in enumerate(layout.bits):
        member = other if group else ~other
        zero, step = range_params(*_masked_range(k, member), bits)                 # [..., D]
        f["k_zero"][..., group, :] = zero
        f["k_step"][..., group, :] = step
        absmax = torch.where(member[..., None], v.abs(), 0.0).amax(dim=-2).sqrt()
        scale = torch.where(absmax > 0, absmax, 1.0).to(PARAM_DTYPE)               # [..., D]
        f["v_scale"][..., group, :] = scale
        scaled = v / scale.float()[..., None, :]
        v_zero, v_step = range_params(scaled.amin(dim=-1), scaled.amax(dim=-1), bits)  # [..., T]
        f["v_zero"].copy_(torch.where(member, v_zero, f["v_zero"]))
        f["v_step"].copy_(torch.where(member, v_step, f["v_step"]))
        k_codes = torch.where(member[..., None],
                              _codes(k, zero[..., None, :], step[..., None, :], bits), k_codes)
        v_codes = torch.where(member[..., None],
                              _codes(scaled, v_zero[..., None], v_step[..., None], bits), v_codes)
    f["k_codes"].copy_(pack_codes(k_codes, layout.bits_salient))
    f["v_codes"].copy_(pack_codes(v_codes, layout.bits_salient))
    return pages


def unpack_pages(layout: PageLayout, pages: Tensor) -> tuple[Tensor, Tensor]:
    """The keys and values ``[..., T, D]`` float32 that ``pages`` ``[..., page_bytes]``
    stand for."""
    f = layout.fields(pages)
    other = f["group"].bool()[..., None]                                           # [..., T, 1]

    def per_token(param: Tensor) -> Tensor:                   # [..., 2, D] -> [..., T, D]
        p = param.float()
        return torch.where(other, p[..., 1:, :], p[..., :1, :])

    keys = (unpack_codes(f["k_codes"], layout.bits_salient).float() * per_token(f["k_step"])
            + per_token(f["k_zero"]))
    values = (unpack_codes(f["v_codes"], layout.bits_salient).float() * f["v_step"].float()[..., None]
              + f["v_zero"].float()[..., None]) * per_token(f["v_scale"])
    return keys, values


def chunk_pages_attention(layout: PageLayout, query: Tensor, pages: Tensor, block_table: Tensor,
                          *, scale: float, tile: int = 32) -> tuple[Tensor, Tensor]:
    """A prefill chunk's ``n`` queries ``[n, H_q, D]`` attending to every token of one
    sequence's pages ``block_table`` ``[num_pages]``: ``tile`` pages dequantized at a time
    (as vLLM's TurboQuant does for continuation chunks), each read by
    :func:`attention_with_lse`.  Returns ``out`` ``[n, H_q, D]`` float32 and ``lse``
    ``[n, H_q]``."""
    outs, lses = [], []
    for start in range(0, max(block_table.shape[0], 1), tile):
        keys, values = unpack_pages(layout, _gather(pages, block_table[start:start + tile].long()))
        out, lse = attention_with_lse(query, keys.transpose(1, 2).flatten(0, 1),
                                      values.transpose(1, 2).flatten(0, 1), scale=scale)
        outs.append(out)
        lses.append(lse)
    return merge_attention_states(torch.stack(outs, dim=-2), torch.stack(lses, dim=-1), dim=-2)


def attention_with_lse(query: Tensor, keys: Tensor, values: Tensor, *, scale: float,
                       causal: bool = False) -> tuple[Tensor, Tensor]:
    """``query`` ``[n, H_q, D]`` over ``keys``/``values`` ``[e, H_kv, D]`` (``causal``: query
    ``i`` sees keys ``<= i``, ``n == e``) with torch's fused CPU attention, which keeps no
    ``n x e`` scores and returns the LSE: ``out`` ``[n, H_q, D]`` float32, ``lse`` ``[n, H_q]``."""
    G = query.shape[1] // keys.shape[1]
    q = query.float().transpose(0, 1)[None]
    k = keys.float().repeat_interleave(G, dim=1).transpose(0, 1)[None]
    v = values.float().repeat_interleave(G, dim=1).transpose(0, 1)[None]
    if query.is_cuda:
        s = (q @ k.transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool,
                                         device=s.device).triu(1), -torch.inf)
        lse = torch.logsumexp(s, dim=-1)
        out = torch.exp(s - lse[..., None]) @ v
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


def pages_attention_ref(layout: PageLayout, query: Tensor, pages: Tensor, block_table: Tensor,
                        num_pages: Tensor, *, scale: float,
                        tile: int = 32) -> tuple[Tensor, Tensor]:
    """Queries attending to every token of their sequence's pages (no causal mask: the
    pages precede every query).

    Parameters
    ----------
    query : Tensor
        ``[R, n, H_q, D]``: ``n`` queries of each of ``R`` sequences; head ``h`` reads
        kv-head ``h // G``.
    pages : Tensor
        ``[num_blocks, H_kv, page_bytes]`` uint8: one layer's pool.
    block_table : Tensor
        ``[R, >= max(num_pages)]`` the pages of each sequence, in order.
    num_pages : Tensor
        ``[R]`` how many of its table each sequence reads (0 allowed).
    tile : int
        Pages unpacked at a time.

    Returns
    -------
    out : Tensor
        ``[R, n, H_q, D]`` float32 (0 where a sequence has no pages).
    lse : Tensor
        ``[R, n, H_q]`` float32 natural-log softmax denominators (``-inf``: no pages).
    """
    R, n, H_q, D = query.shape
    H_kv, T = pages.shape[1], layout.block_size
    G = H_q // H_kv
    bits = layout.bits_salient
    qg = (query.float() * scale).view(R, n, H_kv, G, D).permute(0, 2, 3, 1, 4)    # [R,H,G,n,D]
    qg = qg.reshape(R, 1, H_kv, 1, G * n, D)
    most = int(num_pages.max()) if R else 0
    outs, lses = [], []
    for start in range(0, max(most, 1), tile):
        ids = block_table[:, start:start + tile].long()
        width = ids.shape[1]
        batch = R * width * H_kv                                          # (row, page, head)
        f = layout.fields(_gather(pages, ids))                            # [R, w, H, ...]
        other = f["group"].bool()                                         # [R, w, H, T]
        # scores: q · (code * step_g + zero_g) = (q * step_g) · code + q · zero_g, the codes
        # read a plane (every (8/bits)-th channel) at a time
        q_step = (qg * f["k_step"].float()[..., None, :]).view(batch, -1, D)  # [b, 2·Gn, D]
        q_zero = (qg * f["k_zero"].float()[..., None, :]).sum(-1)        # [R, w, H, 2, Gn]
        s = sum(torch.bmm(q_step[..., channels], plane.transpose(1, 2))
                for channels, plane in _planes(f["k_codes"], bits, batch))
        s = s.view(R, width, H_kv, 2, G * n, T)
        o = other[:, :, :, None, :]
        s = (torch.where(o, s[:, :, :, 1], s[:, :, :, 0])
             + torch.where(o, q_zero[:, :, :, 1, :, None], q_zero[:, :, :, 0, :, None]))
        valid = (start + torch.arange(width, device=ids.device)) < num_pages[:, None]
        s = s.masked_fill_(~valid[:, :, None, None, None], -torch.inf)     # [R, w, H, Gn, T]
        s = s.permute(0, 2, 3, 1, 4).reshape(R, H_kv, G * n, width * T)
        lse = torch.logsumexp(s, dim=-1)                                  # [R, H, Gn]
        p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        p = p.view(R, H_kv, G * n, width, T).permute(0, 3, 1, 2, 4)[:, :, :, None]
        # values: sum over group g's tokens of p_t (code_t * step_t + zero_t), times scale_g
        p = p * torch.stack([~other, other], dim=3)[..., None, :]         # [R, w, H, 2, Gn, T]
        w = (p * f["v_step"].float()[:, :, :, None, None, :]).reshape(batch, -1, T)
        weighted = torch.cat([torch.bmm(w, plane) for _, plane in _planes(f["v_codes"], bits,
                                                                         batch)], dim=-1)
        weighted = weighted.view(R, width, H_kv, 2, G * n, D)
        biased = (p * f["v_zero"].float()[:, :, :, None, None, :]).sum(-1, keepdim=True)
        v_scale = f["v_scale"].float()[:, :, :, :, None, :]               # [R, w, H, 2, 1, D]
        outs.append(((weighted + biased) * v_scale).sum(dim=(1, 3)))      # [R, H, Gn, D]
        lses.append(lse)
    out, lse = merge_attention_states(torch.stack(outs, dim=2), torch.stack(lses, dim=2), dim=2)
    out = out.view(R, H_kv, G, n, D).permute(0, 3, 1, 2, 4).reshape(R, n, H_q, D)
    return out, lse.view(R, H_kv, G, n).permute(0, 3, 1, 2).reshape(R, n, H_q)


def _planes(packed: Tensor, bits: int, batch: int):
    """``(channels, codes)`` per plane of ``packed`` ``[..., T, D·bits/8]`` (``pack_codes``'
    layout: plane ``i`` holds channels ``i·F .. (i+1)·F``): the plane's channel slice and
    its codes ``[batch, T, F]`` float32."""
    F = packed.shape[-1]
    mask = (1 << bits) - 1
    for i in range(8 // bits):
        codes = (packed >> (i * bits)) & mask if i else packed & mask
        yield slice(i * F, (i + 1) * F), codes.float().reshape(batch, -1, F)


def _gather(pages: Tensor, ids: Tensor) -> Tensor:
    """``pages[ids]``, copied in 4-byte words (byte-wise indexing is several times slower)."""
    return pages.view(torch.int32)[ids].view(torch.uint8)


# -- Triton: one decode query per sequence over its pages -------------------------
@triton.jit
def _pages_decode_kernel(
    q_ptr, pages_ptr, table_ptr, num_pages_ptr, out_ptr, lse_ptr, qk_scale,
    stride_qr, stride_qh, stride_qd, stride_pb, stride_ph, stride_tr, stride_tp,
    stride_or, stride_oh, stride_od, stride_lr, stride_lh,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr, BITS: tl.constexpr,
):
    """One (sequence, kv-head): online softmax (log2 domain) over its pages, a page per
    iteration; each token's group picks its key and value-scale parameters."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    NUM_BYTES: tl.constexpr = HEAD_DIM * BITS // 8
    MASK: tl.constexpr = (1 << BITS) - 1
    # field offsets in a page (see PageLayout.fields)
    V_CODES: tl.constexpr = BLOCK * NUM_BYTES
    V_ZERO: tl.constexpr = 2 * BLOCK * NUM_BYTES
    V_STEP: tl.constexpr = V_ZERO + 2 * BLOCK
    GROUPS: tl.constexpr = V_STEP + 2 * BLOCK
    K_ZERO: tl.constexpr = GROUPS + BLOCK
    K_STEP: tl.constexpr = K_ZERO + 4 * HEAD_DIM
    V_SCALE: tl.constexpr = K_STEP + 4 * HEAD_DIM

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    t = tl.arange(0, BLOCK)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    byte = d % NUM_BYTES                       # code d sits in byte d % NUM_BYTES ...
    shift = (d // NUM_BYTES) * BITS            # ... at this shift (the plane layout)
    hq = h * GROUP + g
    q = tl.load(q_ptr + r * stride_qr + hq[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    tile = d_ok[None, :] & (t[:, None] < BLOCK)

    for i in range(0, tl.load(num_pages_ptr + r)):
        block = tl.load(table_ptr + r * stride_tr + i * stride_tp).to(tl.int64)
        page = pages_ptr + block * stride_pb + h * stride_ph
        half = page.to(tl.pointer_type(tl.float16))
        other = tl.load(page + GROUPS + t) != 0                                     # [T]
        k_zero = tl.where(other[:, None],
                          tl.load(half + (K_ZERO + 2 * HEAD_DIM) // 2 + d, mask=d_ok)[None, :],
                          tl.load(half + K_ZERO // 2 + d, mask=d_ok)[None, :]).to(tl.float32)
        k_step = tl.where(other[:, None],
                          tl.load(half + (K_STEP + 2 * HEAD_DIM) // 2 + d, mask=d_ok)[None, :],
                          tl.load(half + K_STEP // 2 + d, mask=d_ok)[None, :]).to(tl.float32)
        kb = tl.load(page + t[:, None] * NUM_BYTES + byte[None, :], mask=tile, other=0)
        k = ((kb.to(tl.int32) >> shift[None, :]) & MASK).to(tl.float32) * k_step + k_zero
        qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        m_new, alpha, p, l_i = online_softmax_step(m_i, l_i, qk)
        vb = tl.load(page + V_CODES + t[:, None] * NUM_BYTES + byte[None, :], mask=tile, other=0)
        v_zero = tl.load(half + V_ZERO // 2 + t).to(tl.float32)
        v_step = tl.load(half + V_STEP // 2 + t).to(tl.float32)
        v_scale = tl.where(other[:, None],
                           tl.load(half + (V_SCALE + 2 * HEAD_DIM) // 2 + d, mask=d_ok)[None, :],
                           tl.load(half + V_SCALE // 2 + d, mask=d_ok)[None, :]).to(tl.float32)
        v = (((vb.to(tl.int32) >> shift[None, :]) & MASK).to(tl.float32) * v_step[:, None]
             + v_zero[:, None]) * v_scale
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634,
                   float("-inf"))
    tl.store(out_ptr + r * stride_or + hq[:, None] * stride_oh + d[None, :] * stride_od,
             out, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + r * stride_lr + hq * stride_lh, lse, mask=g_ok)


def cpu_page_read():
    """The fused C++ page read (:mod:`kvplug.kernels.cpu_ext`), or None with a warning
    when it cannot be built (the torch reference then reads the pages: same result,
    slower).  An engine calls it at start, so the build does not stall a step."""
    return optional_cpu_ext("decode reads the packed pages with the torch reference")


def pages_attention(layout: PageLayout, query: Tensor, pages: Tensor, block_table: Tensor,
                    num_pages: Tensor, *, scale: float) -> tuple[Tensor, Tensor]:
    """:func:`pages_attention_ref`'s contract.  One query per sequence (``n = 1``) runs the
    Triton kernel where Triton runs and the fused C++ kernel (``csrc/quant_pages_cpu.cpp``)
    on CPU; everything else the reference."""
    R, n, H_q, D = query.shape
    if n == 1 and query.device.type == "cpu" and not use_triton(_pages_decode_kernel, query):
        kernel = cpu_page_read()
        if kernel is not None and kernel.supports(H_q // pages.shape[1], D, layout.bits_salient):
            out, lse = kernel.pages_decode((query[:, 0].float() * scale).contiguous(), pages,
                                           block_table.long(), num_pages.long(),
                                           layout.block_size, layout.bits_salient)
            return out[:, None], lse[:, None]
    if n != 1 or not use_triton(_pages_decode_kernel, query):
        return pages_attention_ref(layout, query, pages, block_table, num_pages, scale=scale)
    H_kv = pages.shape[1]
    if layout.block_size & (layout.block_size - 1) or layout.block_size < 16:
        raise ValueError(f"the Triton page read needs a power-of-two block size >= 16, got "
                         f"{layout.block_size}")
    G = H_q // H_kv
    q = query[:, 0]
    out = torch.empty(R, H_q, D, device=query.device, dtype=torch.float32)
    lse = torch.empty(R, H_q, device=query.device, dtype=torch.float32)
    _pages_decode_kernel[(R, H_kv)](
        q, pages, block_table, num_pages.to(torch.int32), out, lse, scale * LOG2E,
        *q.stride(), pages.stride(0), pages.stride(1), *block_table.stride(), *out.stride(),
        *lse.stride(), GROUP=G, G_PAD=max(16, next_pow2(G)), HEAD_DIM=D,
        BLOCK_D=max(16, next_pow2(D)), BLOCK=layout.block_size, BITS=layout.bits_salient)
    return out[:, None], lse[:, None]
