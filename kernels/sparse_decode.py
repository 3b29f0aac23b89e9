"""Sparse paged decode attention: one query token per sequence attends to
the sink, the recent window and the selected chunks of its paged KV cache.

For sequence ``b`` (length ``L = seq_lens[b]``) and kv-head ``h`` the key set is

* the sink ``[0, min(n_sink, L))`` (StreamingLLM's attention sinks),
* the recent window ``[max(L - n_recent, sink end), L)``,
* every token of each selected chunk ``c = chunk_ids[b, h, j] >= 0``, i.e.
  ``[c * chunk_size, (c + 1) * chunk_size)``, clipped to ``[0, L)``,

as a *set*: tokens of a chunk that overlap the sink or window count once.
``chunk_size=1`` makes ``chunk_ids`` plain token positions (TidalDecode,
ShadowKV with its outliers); ``chunk_ids=None`` is StreamingLLM; ``n_recent >=
L`` is dense attention.  ``n_recent`` may be one int, a ``[B]`` tensor (a
window per sequence) or a ``[B, H_kv]`` tensor (per kv-head: a head whose
window is ``L`` reads densely, DuoAttention's retrieval heads).  Ids within a
row must be distinct (top-k output is).

All query heads of a GQA group share their kv-head's selection; the kernel
runs one program per (sequence, kv-head, split) and loads each K/V tile once
for the whole group.  The softmax is computed online in fp32 (log2 domain);
splits (flash-decoding) are merged with their LSEs.

The KV layout is described in :mod:`kvplug.kernels.common`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (LOG2E, block_offsets, default_scale, dot_in_fp32, gather_rows,
                     group_size, merge_attention_states, next_pow2, use_triton)
from .online_softmax import online_softmax_step


@triton.jit
def _sparse_paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, seq_lens_ptr, ids_ptr, recent_ptr, out_ptr, lse_ptr,
    qk_scale, n_sink, n_recent, chunk_size, n_ids, span,
    stride_qb, stride_qh, stride_qd,
    stride_kn, stride_kt, stride_kh, stride_kd,
    stride_vn, stride_vt, stride_vh, stride_vd,
    stride_tb, stride_tm,
    stride_ib, stride_ih, stride_ij,
    stride_rb, stride_rh,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_IDS: tl.constexpr,
    RECENT_TENSOR: tl.constexpr, DOT_F32: tl.constexpr,
):
    """One (sequence, kv-head, split): online softmax over a range of the key list.

    The key list is enumerated without materializing it: virtual index ``v``
    runs over the sink, then the recent window, then ``n_ids * chunk_size``
    chunk slots; slots of unused ids or tokens already in sink/window are masked.
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)

    L = tl.load(seq_lens_ptr + b)
    if RECENT_TENSOR:
        n_recent = tl.load(recent_ptr + b * stride_rb + h * stride_rh)
    s_end = tl.minimum(n_sink, L)
    r_start = tl.maximum(L - n_recent, s_end)
    n_dense = s_end + (L - r_start)
    n_virt = n_dense
    if HAS_IDS:
        n_virt += n_ids * chunk_size
    lo = split * span
    hi = tl.minimum(lo + span, n_virt)

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
        v_idx = start + tl.arange(0, BLOCK_N)
        in_range = v_idx < hi
        t = tl.where(v_idx < s_end, v_idx, r_start + (v_idx - s_end))
        valid = in_range
        if HAS_IDS:
            is_sel = v_idx >= n_dense
            u = tl.maximum(v_idx - n_dense, 0)
            cid = tl.load(ids_ptr + b * stride_ib + h * stride_ih + (u // chunk_size) * stride_ij,
                          mask=in_range & is_sel, other=-1)
            t_sel = cid * chunk_size + u % chunk_size
            # chunk tokens inside the sink or window are already counted
            sel_ok = (cid >= 0) & (t_sel >= s_end) & (t_sel < r_start)
            t = tl.where(is_sel, t_sel, t)
            valid = in_range & (sel_ok | (v_idx < n_dense))
        t = tl.where(valid, t, 0)
        blk = tl.load(table_ptr + b * stride_tb + (t // PAGE_SIZE) * stride_tm,
                      mask=valid, other=0).to(tl.int64)
        slot = t % PAGE_SIZE
        kv_mask = valid[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + blk[:, None] * stride_kn + slot[:, None] * stride_kt
                    + h * stride_kh + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        if DOT_F32:
            qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))

        m_new, alpha, p, l_i = online_softmax_step(m_i, l_i, qk)
        v = tl.load(v_ptr + blk[:, None] * stride_vn + slot[:, None] * stride_vt
                    + h * stride_vh + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
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


def _check_inputs(q, k_cache, v_cache, block_table, seq_lens, chunk_ids, chunk_size):
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be [B, H_q, D] and k/v caches [num_blocks, block_size, H_kv, D] "
                         f"of one shape; got {tuple(q.shape)}, {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    B, H_q, D = q.shape
    H_kv = k_cache.shape[2]
    if k_cache.shape[3] != D:
        raise ValueError(f"cache head_dim {k_cache.shape[3]} != q head_dim {D}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q, k_cache and v_cache must share a dtype; got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError(f"block_table must be [B, max_blocks] and seq_lens [B] with B={B}")
    if chunk_ids is not None and chunk_ids.shape[:2] != (B, H_kv):
        raise ValueError(f"chunk_ids must be [B, H_kv, K] = [{B}, {H_kv}, K], "
                         f"got {tuple(chunk_ids.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return B, H_q, H_kv, D, group_size(H_q, H_kv)


def _max_keys(block_table, page_size, chunk_ids, chunk_size, n_sink, n_recent) -> int:
    """Upper bound of a row's key-list length, from shapes only (no device sync)."""
    n = min(n_sink + n_recent, block_table.shape[1] * page_size)
    return n + (0 if chunk_ids is None else chunk_ids.shape[2] * chunk_size)


def _recent_strides(n_recent: int | Tensor, B: int,
                    H_kv: int) -> tuple[Tensor, tuple[int, int]] | None:
    """A tensor window as the kernel reads it: ``(tensor, (stride_b, stride_h))``; None for
    an int."""
    if not isinstance(n_recent, Tensor):
        return None
    if n_recent.shape == (B,):
        return n_recent, (n_recent.stride(0), 0)
    if n_recent.shape == (B, H_kv):
        return n_recent, n_recent.stride()
    raise ValueError(f"n_recent must be an int, [B]={B} or [B, H_kv]=[{B}, {H_kv}]; got "
                     f"{tuple(n_recent.shape)}")


def _default_splits(q: Tensor, n_programs: int, max_keys: int, block_n: int) -> int:
    if not q.is_cuda:
        return 1
    # flash-decoding: enough programs to fill the GPU, >= 4 tiles of work each
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    want = triton.cdiv(2 * sms, n_programs)
    return max(1, min(want, triton.cdiv(max_keys, 4 * block_n)))


@dataclass(frozen=True)
class SparseDecodePlan:
    """Host-side decisions of one decode step for :func:`sparse_paged_decode`.

    Made once per step by :func:`plan_sparse_decode` and passed to every
    layer's call (same shapes), so the per-layer call does no host work and
    no allocation, which also keeps it capturable in a CUDA graph.
    """

    num_splits: int
    span: int                  # keys per split, a multiple of block_n
    block_n: int
    part_out: Tensor | None    # [B, H_q, S, D] fp32 split partials (None when S == 1)
    part_lse: Tensor           # [B, H_q, S] fp32


def plan_sparse_decode(q: Tensor, k_cache: Tensor, block_table: Tensor,
                       chunk_ids: Tensor | None, chunk_size: int = 1, n_sink: int = 0,
                       n_recent: int = 0, *, num_splits: int | None = None) -> SparseDecodePlan:
    """Plan a decode step: split count and workspaces, from shapes only (no sync).

    Parameters are those of :func:`sparse_paged_decode_ref`; only their shapes,
    device and the three ints are used (a tensor window: pass its largest value).  ``num_splits`` overrides the
    heuristic (1 on CPU; on CUDA enough (sequence, kv-head, split) programs
    to cover the SMs twice).
    """
    B, H_q, D = q.shape
    H_kv, page_size = k_cache.shape[2], k_cache.shape[1]
    block_n = 64 if q.is_cuda else 32
    max_keys = _max_keys(block_table, page_size, chunk_ids, chunk_size, n_sink, n_recent)
    S = num_splits or _default_splits(q, B * H_kv, max_keys, block_n)
    span = triton.cdiv(triton.cdiv(max(max_keys, 1), S), block_n) * block_n
    part_out = (None if S == 1 else
                torch.empty(B, H_q, S, D, device=q.device, dtype=torch.float32))
    part_lse = torch.empty(B, H_q, S, device=q.device, dtype=torch.float32)
    return SparseDecodePlan(S, span, block_n, part_out, part_lse)


def sparse_paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                        seq_lens: Tensor, chunk_ids: Tensor | None, chunk_size: int = 1,
                        n_sink: int = 0, n_recent: int | Tensor = 0, *,
                        scale: float | None = None, out: Tensor | None = None,
                        return_lse: bool = False, num_splits: int | None = None,
                        plan: SparseDecodePlan | None = None):
    """Sparse paged decode attention (Triton; see :func:`sparse_paged_decode_ref`).

    A tensor ``n_recent`` without a ``plan`` costs one device sync (its largest
    value sizes the splits); a plan made once per step avoids it."""
    B, H_q, H_kv, D, G = _check_inputs(q, k_cache, v_cache, block_table, seq_lens,
                                       chunk_ids, chunk_size)
    recent = _recent_strides(n_recent, B, H_kv)
    if not use_triton(_sparse_paged_decode_kernel, q):
        return sparse_paged_decode_ref(q, k_cache, v_cache, block_table, seq_lens, chunk_ids,
                                       chunk_size, n_sink, n_recent, scale=scale, out=out,
                                       return_lse=return_lse, num_splits=num_splits, plan=plan)
    if plan is None:
        widest = n_recent if recent is None else recent_window(n_recent)[1]
        plan = plan_sparse_decode(q, k_cache, block_table, chunk_ids, chunk_size, n_sink,
                                  widest, num_splits=num_splits)
    elif plan.part_lse.shape[:2] != (B, H_q):
        raise ValueError(f"plan was made for [B, H_q] = {list(plan.part_lse.shape[:2])}, "
                         f"got {[B, H_q]}")
    S = plan.num_splits
    if out is None:
        out = torch.empty_like(q)
    # single split: the kernel writes the final output directly
    part_out = out.unsqueeze(2) if S == 1 else plan.part_out
    ids = chunk_ids if chunk_ids is not None else seq_lens.new_full((B, H_kv, 1), -1)
    _sparse_paged_decode_kernel[(B, H_kv, S)](
        q, k_cache, v_cache, block_table, seq_lens, ids,
        seq_lens if recent is None else recent[0], part_out, plan.part_lse,
        default_scale(D, scale) * LOG2E, n_sink, 0 if recent is not None else n_recent,
        chunk_size, 0 if chunk_ids is None else chunk_ids.shape[2], plan.span,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_table.stride(),
        *ids.stride(), *((0, 0) if recent is None else recent[1]),
        *part_out.stride(), *plan.part_lse.stride(),
        GROUP=G, G_PAD=max(16, next_pow2(G)), HEAD_DIM=D, BLOCK_D=max(16, next_pow2(D)),
        PAGE_SIZE=k_cache.shape[1], BLOCK_N=plan.block_n, HAS_IDS=chunk_ids is not None,
        RECENT_TENSOR=recent is not None, DOT_F32=dot_in_fp32(_sparse_paged_decode_kernel, q.dtype),
    )
    if S == 1:
        lse = plan.part_lse.squeeze(2)
    else:
        merged, lse = merge_attention_states(plan.part_out, plan.part_lse, dim=2)
        out.copy_(merged)
    return (out, lse) if return_lse else out


def recent_window(n_recent: int | Tensor) -> tuple[int | Tensor, int]:
    """``n_recent`` shaped to broadcast against ``[B, H_kv, N]`` (an int stays an int), and
    its largest value (one device sync for a tensor)."""
    if not isinstance(n_recent, Tensor):
        return n_recent, n_recent
    widest = int(n_recent.max())
    n_recent = n_recent.long()
    return (n_recent[:, None, None] if n_recent.dim() == 1 else n_recent[..., None]), widest


def _key_lists(seq_lens: Tensor, chunk_ids: Tensor | None, chunk_size: int, n_sink: int,
               n_recent: int | Tensor, max_len: int):
    """The key list split as the kernel walks it: the sink + window part
    (``[B, 1, N_d]`` positions and validity, the same for every kv-head, or
    ``[B, H_kv, N_d]`` for a window per kv-head) and the per-kv-head chunk part
    (``[B, H_kv, K * chunk_size]``, or None).  ``n_recent`` as in
    :func:`sparse_paged_decode_ref`."""
    dev = seq_lens.device
    L = seq_lens.long()[:, None, None]
    n_recent, widest = recent_window(n_recent)
    v = torch.arange(min(n_sink + widest, max_len), device=dev)[None, None, :]
    s_end = L.clamp_max(n_sink)
    r_start = torch.maximum(L - n_recent, s_end)
    dense_valid = v < s_end + (L - r_start)
    dense_pos = torch.where(dense_valid, torch.where(v < s_end, v, r_start + (v - s_end)), 0)
    if chunk_ids is None:
        return dense_pos, dense_valid, None, None
    B, H, K = chunk_ids.shape
    cid = chunk_ids.long()[..., None]                                          # [B, H, K, 1]
    t = (cid * chunk_size + torch.arange(chunk_size, device=dev)).reshape(B, H, K * chunk_size)
    # chunk tokens inside the sink or window are already in the dense part
    sel_valid = ((cid >= 0).expand(-1, -1, -1, chunk_size).reshape(B, H, K * chunk_size)
                 & (t >= s_end) & (t < r_start))
    return dense_pos, dense_valid, torch.where(sel_valid, t, 0), sel_valid


def selected_positions(seq_lens: Tensor, chunk_ids: Tensor | None, chunk_size: int,
                       n_sink: int, n_recent: int | Tensor, num_kv_heads: int,
                       max_len: int) -> tuple[Tensor, Tensor]:
    """The key list of every (sequence, kv-head), as the kernel enumerates it.

    Parameters
    ----------
    seq_lens : Tensor
        ``[B]`` sequence lengths.
    chunk_ids : Tensor or None
        ``[B, H_kv, K]`` chunk ids, ``-1`` = unused.
    chunk_size, n_sink, n_recent
        As in :func:`sparse_paged_decode_ref`.
    num_kv_heads : int
        ``H_kv`` (used when ``chunk_ids`` is None).
    max_len : int
        Capacity of a row, ``max_blocks * block_size``.

    Returns
    -------
    positions : Tensor
        ``[B, H_kv, N]`` int64 token positions (``N`` from shapes only; 0 where invalid).
    valid : Tensor
        ``[B, H_kv, N]`` bool; each attended token appears exactly once.
    """
    dense_pos, dense_valid, sel_pos, sel_valid = _key_lists(seq_lens, chunk_ids, chunk_size,
                                                           n_sink, n_recent, max_len)
    B = seq_lens.shape[0]
    pos = dense_pos.expand(B, num_kv_heads, -1)
    valid = dense_valid.expand(B, num_kv_heads, -1)
    if sel_pos is not None:
        pos, valid = torch.cat([pos, sel_pos], -1), torch.cat([valid, sel_valid], -1)
    return pos, valid


def sparse_paged_decode_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                            seq_lens: Tensor, chunk_ids: Tensor | None, chunk_size: int = 1,
                            n_sink: int = 0, n_recent: int | Tensor = 0, *, scale: float | None = None,
                            out: Tensor | None = None, return_lse: bool = False,
                            num_splits: int | None = None,
                            plan: SparseDecodePlan | None = None):
    """Sparse paged decode attention, torch reference and CPU path.

    Vectorized over batch and heads: it gathers only the selected keys
    (``O(n_sink + n_recent + K * chunk_size)`` per row, not ``O(L)``) and runs
    a masked fp32 softmax.

    Parameters
    ----------
    q : Tensor
        ``[B, H_q, D]`` one decode query per sequence (fp32, fp16 or bf16).
    k_cache, v_cache : Tensor
        ``[num_blocks, block_size, H_kv, D]`` paged keys (post-RoPE) and values.
    block_table : Tensor
        ``[B, max_blocks]`` int physical block ids.
    seq_lens : Tensor
        ``[B]`` int tokens in each sequence, the current token included.
    chunk_ids : Tensor or None
        ``[B, H_kv, K]`` int selected chunk ids per (sequence, kv-head),
        distinct within a row, ``-1`` = unused slot.  ``None``: no selection.
    chunk_size : int
        Tokens per chunk (``1``: ``chunk_ids`` are token positions).
    n_sink, n_recent : int
        Leading and trailing tokens always attended; ``n_recent`` may also be
        a ``[B]`` tensor (one window per sequence) or ``[B, H_kv]`` (one per
        kv-head; a window of ``L`` reads the head densely).
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.
    out : Tensor, optional
        ``[B, H_q, D]`` preallocated output (``q.dtype``).
    return_lse : bool
        Also return the natural-log softmax denominator.
    num_splits : int, optional
        Split-K count of the Triton launcher; ignored here.
    plan : SparseDecodePlan, optional
        From :func:`plan_sparse_decode`, for the Triton launcher; ignored here.

    Returns
    -------
    out : Tensor
        ``[B, H_q, D]`` in ``q.dtype`` (zeros for an empty key set).
    lse : Tensor
        ``[B, H_q]`` fp32, only if ``return_lse`` (``-inf`` for an empty set).
    """
    B, H_q, H_kv, D, G = _check_inputs(q, k_cache, v_cache, block_table, seq_lens,
                                       chunk_ids, chunk_size)
    max_len = block_table.shape[1] * k_cache.shape[1]
    pos, valid = selected_positions(seq_lens, chunk_ids, chunk_size, n_sink, n_recent, H_kv,
                                    max_len)                                   # [B, H, N]
    # one index for K and V (they share the block table): two gathers, two products
    blocks, offsets = block_offsets(block_table, pos, k_cache.shape[1])
    heads = torch.arange(H_kv, device=q.device)[None, :, None]
    qg = q.float().view(B, H_kv, G, D)
    s = torch.einsum("bhgd,bhnd->bhgn", qg, gather_rows(k_cache, blocks, offsets, heads).float())
    s = (s * default_scale(D, scale)).masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                          # [B, H, G]
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    o = torch.einsum("bhgn,bhnd->bhgd", p,
                     gather_rows(v_cache, blocks, offsets, heads).float()).reshape(B, H_q, D)
    if out is None:
        out = torch.empty_like(q)
    out.copy_(o)
    return (out, lse.reshape(B, H_q)) if return_lse else out
