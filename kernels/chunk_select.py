"""Query-aware chunk (page) scoring and top-k selection for decode.

Two kinds of per-chunk key summary are scored against the decode query:

* **Landmarks** (ShadowKV, TriForce, and TidalDecode with ``chunk_size=1``):
  one summary key per chunk, usually the mean of the chunk's post-RoPE keys.
  Score ``scale * q . landmark``.  ShadowKV: https://arxiv.org/abs/2410.21465
* **Quest** min/max bounds: element-wise min and max of the chunk's keys.
  Score ``scale * sum_d max(q_d * min_d, q_d * max_d)``, an upper bound of
  ``scale * q . k`` over every key of the chunk.  https://arxiv.org/abs/2406.10774

GQA.  Selection is per (sequence, kv-head), because K/V are read per kv-head.
The ``G`` query heads of a group are reduced as the papers do:

* ShadowKV: softmax over chunks per query head, then **max** over the group
  (``softmax=True, reduce="max"``, the landmark default).
* Quest is an MHA method that selects per query head.  With ``reduce="max"``
  (and no softmax, the Quest default) the group's score is the bound of the
  best query head, so a page any head might need is ranked as that head would
  rank it; with ``G = 1`` this is exactly Quest.
* ``reduce="sum"`` (of softmax probabilities) ranks by total group mass.

Summaries are stored per sequence or paged:

* dense: ``[B, C, H_kv, D]`` with ``summary_table=None``;
* paged: ``[num_pages, P, H_kv, D]`` with ``summary_table [B, max_pages]``;
  chunk ``c`` of sequence ``b`` is ``summary[summary_table[b, c // P], c % P]``.
  Quest with one page per vLLM block is ``P = 1`` and ``summary_table = block_table``.

Chunk ``c`` covers tokens ``[c * chunk_size, (c + 1) * chunk_size)``; chunks at
index ``>= num_chunks[b]`` are masked (a policy sets ``num_chunks`` to e.g.
``cdiv(seq_len, chunk_size)``, or excludes its local window).

The Triton kernel computes the per-query-head scores (the bandwidth-heavy part:
each summary tile is read once and scored for all ``G`` heads of its group);
the group reduction and top-k run in torch on the small ``[B, H_q, C]`` score
matrix, where ``torch.topk`` is the right tool for rows of up to ~16k chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import default_scale, gather_pages, group_size, next_pow2, use_triton


@triton.jit
def _chunk_scores_kernel(
    q_ptr, lo_ptr, hi_ptr, table_ptr, num_chunks_ptr, out_ptr,
    scale, n_cols, chunks_per_page,
    stride_qb, stride_qh, stride_qd,
    stride_ln, stride_lp, stride_lh, stride_ld,
    stride_hn, stride_hp, stride_hh, stride_hd,
    stride_tb, stride_tp,
    stride_ob, stride_oh, stride_oc,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr, QUEST: tl.constexpr,
):
    """Scores of ``BLOCK_C`` chunks of one (sequence, kv-head) for its ``GROUP`` query heads."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    n_valid = tl.load(num_chunks_ptr + b)
    valid = (c < n_valid) & (c < n_cols)
    page = tl.load(table_ptr + b * stride_tb + (c // chunks_per_page) * stride_tp,
                   mask=valid, other=0).to(tl.int64)
    row = c % chunks_per_page
    tile_mask = valid[:, None] & d_ok[None, :]
    lo = tl.load(lo_ptr + page[:, None] * stride_ln + row[:, None] * stride_lp
                 + h * stride_lh + d[None, :] * stride_ld, mask=tile_mask, other=0.0).to(tl.float32)
    if QUEST:
        hi = tl.load(hi_ptr + page[:, None] * stride_hn + row[:, None] * stride_hp
                     + h * stride_hh + d[None, :] * stride_hd, mask=tile_mask,
                     other=0.0).to(tl.float32)

    # the summary tile is loaded once and reused by every query head of the group
    for g in tl.static_range(GROUP):
        hq = h * GROUP + g
        q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + d * stride_qd,
                    mask=d_ok, other=0.0).to(tl.float32)
        if QUEST:
            s = tl.sum(tl.maximum(q[None, :] * lo, q[None, :] * hi), axis=1)
        else:
            s = tl.sum(q[None, :] * lo, axis=1)
        s = tl.where(valid, s * scale, float("-inf"))
        tl.store(out_ptr + b * stride_ob + hq * stride_oh + c * stride_oc, s, mask=c < n_cols)


def _check_inputs(q, summary, summary_max, num_chunks, summary_table):
    if q.dim() != 3 or summary.dim() != 4:
        raise ValueError(f"q must be [B, H_q, D] and summary [N, C, H_kv, D]; got "
                         f"{tuple(q.shape)} and {tuple(summary.shape)}")
    B, H_q, D = q.shape
    H_kv = summary.shape[2]
    if summary.shape[3] != D:
        raise ValueError(f"summary head_dim {summary.shape[3]} != q head_dim {D}")
    if summary_max is not None and summary_max.shape != summary.shape:
        raise ValueError(f"summary_max shape {tuple(summary_max.shape)} != summary shape "
                         f"{tuple(summary.shape)}")
    if summary_table is None and summary.shape[0] != B:
        raise ValueError(f"dense summaries need one row per sequence: {summary.shape[0]} != B={B}")
    if num_chunks.shape != (B,):
        raise ValueError(f"num_chunks must be [B]={B}, got {tuple(num_chunks.shape)}")
    return B, H_q, H_kv, D, group_size(H_q, H_kv)


def _num_cols(summary: Tensor, summary_table: Tensor | None) -> int:
    P = summary.shape[1]
    return P if summary_table is None else summary_table.shape[1] * P


def chunk_scores(q: Tensor, summary: Tensor, num_chunks: Tensor, *,
                 summary_max: Tensor | None = None, summary_table: Tensor | None = None,
                 scale: float | None = None) -> Tensor:
    """Per-query-head chunk scores (Triton; see :func:`chunk_scores_ref`)."""
    B, H_q, H_kv, D, G = _check_inputs(q, summary, summary_max, num_chunks, summary_table)
    if not use_triton(_chunk_scores_kernel, q):
        return chunk_scores_ref(q, summary, num_chunks, summary_max=summary_max,
                                summary_table=summary_table, scale=scale)
    n_cols = _num_cols(summary, summary_table)
    out = torch.empty(B, H_q, n_cols, device=q.device, dtype=torch.float32)
    if n_cols == 0:
        return out
    if summary_table is None:
        # dense = paged with one page per sequence holding all its chunks
        summary_table = torch.arange(B, device=q.device, dtype=torch.int32)[:, None]
    hi = summary if summary_max is None else summary_max
    BLOCK_C = min(64, next_pow2(max(n_cols, 16)))
    grid = (B, H_kv, triton.cdiv(n_cols, BLOCK_C))
    _chunk_scores_kernel[grid](
        q, summary, hi, summary_table, num_chunks, out,
        # chunks per page is a runtime int: as a constexpr, a dense summary
        # (one page of C chunks) would recompile for every context length
        default_scale(D, scale), n_cols, summary.shape[1],
        *q.stride(), *summary.stride(), *hi.stride(), *summary_table.stride(), *out.stride(),
        GROUP=G, HEAD_DIM=D, BLOCK_D=next_pow2(D), BLOCK_C=BLOCK_C,
        QUEST=summary_max is not None,
    )
    return out


def chunk_scores_ref(q: Tensor, summary: Tensor, num_chunks: Tensor, *,
                     summary_max: Tensor | None = None, summary_table: Tensor | None = None,
                     scale: float | None = None) -> Tensor:
    """Per-query-head chunk scores, torch reference and CPU path.

    Parameters
    ----------
    q : Tensor
        ``[B, H_q, D]`` decode queries (post-RoPE), any float dtype.
    summary : Tensor
        Landmarks, or Quest per-chunk key minima when ``summary_max`` is given:
        ``[B, C, H_kv, D]`` (dense) or ``[num_pages, P, H_kv, D]`` (paged).
    num_chunks : Tensor
        ``[B]`` int, valid chunks per sequence; later chunks score ``-inf``.
    summary_max : Tensor, optional
        Quest per-chunk key maxima, same shape as ``summary``.  Selects the
        Quest upper bound instead of the landmark dot product.
    summary_table : Tensor, optional
        ``[B, max_pages]`` int page table for paged summaries.
    scale : float, optional
        Score scale, default ``1 / sqrt(D)`` (ShadowKV's softmax temperature).

    Returns
    -------
    Tensor
        ``[B, H_q, C_cols]`` fp32, ``C_cols = C`` (dense) or ``max_pages * P``.
    """
    B, H_q, H_kv, D, G = _check_inputs(q, summary, summary_max, num_chunks, summary_table)
    n_cols = _num_cols(summary, summary_table)
    qg = q.float().view(B, H_kv, G, D)
    if summary_max is None:
        s = _per_kv_head_dots(qg, summary, summary_table)
    else:
        # max(q_d * min_d, q_d * max_d) = max(q_d, 0) * max_d + min(q_d, 0) * min_d
        # (min <= max): products with [max(q, 0), min(q, 0)], not a [.., C, D] temporary
        q_pos, q_neg = qg.clamp_min(0), qg.clamp_max(0)
        bounds = side_by_side(summary_max, summary)
        if bounds is not None:  # one gather and one product for both
            s = _per_kv_head_dots(torch.cat([q_pos, q_neg], dim=-1), bounds, summary_table)
        else:
            s = (_per_kv_head_dots(q_pos, summary_max, summary_table)
                 + _per_kv_head_dots(q_neg, summary, summary_table))
    return _mask_past_chunks(s.reshape(B, H_q, n_cols) * default_scale(D, scale), num_chunks)


def _mask_past_chunks(s: Tensor, num_chunks: Tensor) -> Tensor:
    """``s`` (``[B, H, C]``) with the columns at or past each row's ``num_chunks`` set to
    ``-inf``, in place."""
    cols = torch.arange(s.shape[-1], device=s.device)
    return s.masked_fill_(cols >= num_chunks.to(s.device)[:, None, None], float("-inf"))


def side_by_side(left: Tensor, right: Tensor) -> Tensor | None:
    """``[..., 2·D]``: the view whose rows are ``left``'s then ``right``'s ``D`` values,
    when the two ``[..., D]`` tensors are the two halves of one tensor's last axis;
    else None.  Quest bounds kept so (max, then min) are gathered and scored in one go."""
    D = left.shape[-1]
    if (left.shape != right.shape or left.stride() != right.stride() or left.stride(-1) != 1
            or left.dtype != right.dtype or left.device != right.device
            or right.data_ptr() != left.data_ptr() + D * left.element_size()):
        return None
    return left.as_strided((*left.shape[:-1], 2 * D), left.stride())


def _per_kv_head_dots(qg: Tensor, keys: Tensor, table: Tensor | None) -> Tensor:
    """``[B, H_kv, G, D]`` queries · each row's keys -> ``[B, H_kv, G, C]`` fp32.

    ``keys`` are ``[B, C, H_kv, D]`` (``table`` None) or pages ``[N, P, H_kv, D]``
    of ``table`` ``[B, pages]``, gathered whole.  One ``bmm`` per kv-head on a
    strided view: a single batched matmul over ``(B, H_kv)`` would first copy
    the keys into ``[B, H_kv, D, C]``, and gathering them kv-head-major instead
    reads the pages in small pieces; both cost more than the products on CPU.
    """
    keys = (keys if table is None else gather_pages(keys, table)).float()
    return torch.stack([torch.bmm(qg[:, h], keys[:, :, h].transpose(1, 2))
                        for h in range(qg.shape[1])], dim=1)


def select_topk(scores: Tensor, num_kv_heads: int, num_chunks: Tensor, k: int, *,
                k_per_seq: Tensor | None = None, softmax: bool = True,
                reduce: str = "max") -> Tensor:
    """Reduce per-query-head scores over each GQA group and pick the top-k chunks.

    Parameters
    ----------
    scores : Tensor
        ``[B, H_q, C]`` fp32 from :func:`chunk_scores` (``-inf`` = masked).
    num_kv_heads : int
        ``H_kv``; the ``G = H_q / H_kv`` heads of a group are reduced.
    num_chunks : Tensor
        ``[B]`` valid chunks per sequence.
    k : int
        Output width (the largest budget, in chunks).
    k_per_seq : Tensor, optional
        ``[B]`` int budget per sequence (``<= k``); default ``k`` for all.
    softmax : bool
        Normalize each query head over its chunks before reducing (ShadowKV).
    reduce : {"max", "sum"}
        How the group's ``G`` heads are combined.

    Returns
    -------
    Tensor
        ``[B, H_kv, k]`` int32 chunk ids, ascending, padded with ``-1`` where
        the slot is unused (``j >= min(k_per_seq[b], num_chunks[b])``).
    """
    if reduce not in ("max", "sum"):
        raise ValueError(f"reduce must be 'max' or 'sum', got {reduce!r}")
    B, H_q, C = scores.shape
    G = group_size(H_q, num_kv_heads)
    s = scores.float().view(B, num_kv_heads, G, C)
    if softmax:
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        # sequences without valid chunks have lse=-inf; keep them at -inf, not nan
        s = torch.where(torch.isfinite(lse), torch.exp(s - lse), torch.full_like(s, float("-inf")))
    s = _mask_past_chunks(s.amax(dim=2) if reduce == "max" else s.sum(dim=2), num_chunks)

    kk = min(k, C)
    ids = torch.topk(s, kk, dim=-1).indices if kk > 0 else s.new_empty(B, num_kv_heads, 0,
                                                                         dtype=torch.long)
    if kk < k:
        ids = torch.cat([ids, ids.new_full((B, num_kv_heads, k - kk), C)], dim=-1)
    limit = num_chunks.to(s.device).long().clamp_max(k)
    if k_per_seq is not None:
        limit = torch.minimum(limit, k_per_seq.to(s.device).long())
    # ascending ids, the unused slots (chunk id C) last, so the decode kernel walks the
    # cache forwards
    slots = torch.arange(k, device=s.device)
    ids = ids.masked_fill_(slots >= limit[:, None, None], C).sort(dim=-1).values
    return ids.masked_fill_(ids == C, -1).to(torch.int32)


def chunk_topk(q: Tensor, summary: Tensor, num_chunks: Tensor, k: int, *,
               summary_max: Tensor | None = None, summary_table: Tensor | None = None,
               k_per_seq: Tensor | None = None, softmax: bool | None = None,
               reduce: str = "max", scale: float | None = None) -> Tensor:
    """Top-k chunk ids per (sequence, kv-head); Triton scoring (see :func:`chunk_topk_ref`)."""
    scores = chunk_scores(q, summary, num_chunks, summary_max=summary_max,
                          summary_table=summary_table, scale=scale)
    return select_topk(scores, summary.shape[2], num_chunks, k, k_per_seq=k_per_seq,
                       softmax=(summary_max is None) if softmax is None else softmax,
                       reduce=reduce)


def chunk_topk_ref(q: Tensor, summary: Tensor, num_chunks: Tensor, k: int, *,
                   summary_max: Tensor | None = None, summary_table: Tensor | None = None,
                   k_per_seq: Tensor | None = None, softmax: bool | None = None,
                   reduce: str = "max", scale: float | None = None) -> Tensor:
    """Top-k chunk ids per (sequence, kv-head), torch reference and CPU path.

    Parameters
    ----------
    q, summary, num_chunks, summary_max, summary_table, scale
        As in :func:`chunk_scores_ref`.
    k : int
        Output width: chunks selected per (sequence, kv-head).  ``k`` larger
        than the number of chunks is allowed (the excess slots are ``-1``).
    k_per_seq : Tensor, optional
        ``[B]`` int per-sequence budget ``<= k``.
    softmax : bool, optional
        Default: True for landmarks (ShadowKV), False for Quest bounds.
    reduce : {"max", "sum"}
        GQA group reduction (see the module docstring).

    Returns
    -------
    Tensor
        ``[B, H_kv, k]`` int32 ascending chunk ids, ``-1`` padded.
    """
    scores = chunk_scores_ref(q, summary, num_chunks, summary_max=summary_max,
                              summary_table=summary_table, scale=scale)
    return select_topk(scores, summary.shape[2], num_chunks, k, k_per_seq=k_per_seq,
                       softmax=(summary_max is None) if softmax is None else softmax,
                       reduce=reduce)


def _chunked(keys: Tensor, chunk_size: int, seq_lens: Tensor | None) -> tuple[Tensor, Tensor]:
    """Keys ``[B, S, H, D]`` as fp32 chunks ``[B, C, chunk_size, H, D]`` (zero-padded) and
    which slots hold a key (``[B, C, chunk_size]``)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, S, H, D = keys.shape
    C = -(-S // chunk_size)
    x = torch.cat([keys.float(), keys.new_zeros(B, C * chunk_size - S, H, D, dtype=torch.float32)],
                  dim=1).view(B, C, chunk_size, H, D)
    limit = (torch.full((B,), S, device=keys.device) if seq_lens is None
             else seq_lens.to(keys.device))
    present = torch.arange(C * chunk_size, device=keys.device)[None, :] < limit[:, None]
    return x, present.view(B, C, chunk_size)


def chunk_summaries(keys: Tensor, chunk_size: int,
                    seq_lens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Landmarks and Quest bounds of contiguous keys (a helper for policies and tests).

    Parameters
    ----------
    keys : Tensor
        ``[B, S, H_kv, D]`` post-RoPE keys; ``S`` need not be a multiple of
        ``chunk_size`` (the last chunk is partial).
    chunk_size : int
        Tokens per chunk.
    seq_lens : Tensor, optional
        ``[B]`` valid keys per sequence; keys at ``t >= seq_lens[b]`` are ignored.

    Returns
    -------
    mean, kmin, kmax : Tensor
        ``[B, cdiv(S, chunk_size), H_kv, D]`` each, in ``keys.dtype``.  A
        partial chunk is summarized over the keys it has; chunks with no key
        are mean ``nan``, min ``+inf``, max ``-inf`` (callers mask them).
    """
    x, present = _chunked(keys, chunk_size, seq_lens)
    x = x.masked_fill(~present[..., None, None], float("nan"))
    mean = x.nanmean(dim=2)
    kmin = x.nan_to_num(nan=float("inf")).amin(dim=2)
    kmax = x.nan_to_num(nan=float("-inf")).amax(dim=2)
    return mean.to(keys.dtype), kmin.to(keys.dtype), kmax.to(keys.dtype)


def landmarks(keys: Tensor, chunk_size: int,
              seq_lens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ShadowKV's per-chunk landmark and outlier score of contiguous keys.

    The landmark is the chunk's mean key; ``min_cos`` is the least cosine
    similarity between a key of the chunk and that mean.  A low ``min_cos``
    means one key points away from the rest, so the mean represents it badly:
    ShadowKV reads such *outlier* chunks exactly instead of by landmark.
    https://arxiv.org/abs/2410.21465

    Parameters
    ----------
    keys, chunk_size, seq_lens
        As in :func:`chunk_summaries`.

    Returns
    -------
    mean : Tensor
        ``[B, cdiv(S, chunk_size), H_kv, D]`` in ``keys.dtype`` (averaged in fp32).
    min_cos : Tensor
        ``[B, cdiv(S, chunk_size), H_kv]`` fp32.  A partial chunk is summarized
        over the keys it has; a chunk with no key has mean ``nan`` and
        ``min_cos`` ``+inf`` (never an outlier).
    """
    x, present = _chunked(keys, chunk_size, seq_lens)
    x = x * present[..., None, None]
    count = present.sum(dim=2)[..., None, None]                              # [B, C, 1, 1]
    mean = x.sum(dim=2) / count                                              # 0 / 0 = nan
    cos = torch.nn.functional.cosine_similarity(x, mean[:, :, None], dim=-1)  # [B, C, cs, H]
    min_cos = cos.masked_fill(~present[..., None], float("inf")).amin(dim=2)
    return mean.to(keys.dtype), min_cos
