"""ShadowKV: low-rank pre-RoPE keys plus a few exact chunks, read by landmark.

Based on https://arxiv.org/abs/2410.21465 (bytedance/ShadowKV).  At prefill,
per layer: one SVD of the prompt's pre-RoPE keys reshaped ``[L, H_kv·D]``
(all kv-heads together), keeping ``U[:, :rank]`` and ``SV``; per chunk of
``chunk_size`` post-RoPE keys the landmark (mean key) and the least cosine of
a key to it.  At each decode step a layer reads

* the **local window**: the last ``local_chunks`` chunks plus the partial
  current one, exactly;
* the **outliers**: the chunks before the window whose ``min_cos`` is lowest
  (a key pointing away from its landmark), exactly;
* the **top chunks** by ``softmax(q·landmark / sqrt(D))``, maxed over the
  GQA group, outliers excluded, with keys rebuilt as RoPE(``U[pos] @ SV``).

Budget.  As for every selection policy, ``budget`` counts *all* tokens read
per step (window, outliers and top chunks); ShadowKV's ``sparse_budget``
counts the top chunks only.  With ``outlier_chunks=-1`` outliers take 3/16 of
the budget, in whole chunks: ShadowKV's 48 outlier chunks of 8 tokens per
2048-token budget (``(budget // 1024) * 24`` chunks at multiples of 1024),
so never more than a quarter of it (with 8-token chunks the first outlier
comes at a 43-token budget).  The current chunk is read even when the budget
is smaller than a chunk.

What is saved, and where:

* **HF transformers (CPU or GPU):** ``generate`` gets kvplug's ShadowKV cache
  (``kvplug.integrations.hf_shadowkv``).  Per layer it keeps ``U``, ``SV``,
  the landmarks and exact keys and values of the window and the outliers on
  the model's device, the prompt's values in host memory (pinned on CUDA),
  and drops the prompt's exact keys.  Generated tokens are always read and
  never compressed; the budget they leave is spent on the prompt (once they
  fill it, only the prompt's current chunk is read besides them).  The top
  chunks' keys are rebuilt as RoPE(``U[pos] @ SV``) and only their values
  are copied back from host memory.
* **vLLM:** selection only.  Landmarks come from the KV writes, the selected
  tokens' exact keys and values are read from vLLM's paged cache, there is
  no low-rank store, and the window is counted from the end of the sequence
  (generated tokens are chunked like the prompt).  Memory is not reduced; the
  saving is the KV blocks read per decode step (on CUDA, the tokens read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from kvplug.kernels import apply_rope, chunk_scores, gather_pages, select_topk
from kvplug.policies.base import param, register_policy
from kvplug.policies.selection import (KeySummary, Selection, SelectionPolicy, SummarySpec,
                                       check_chunk, recent_tokens)

# ShadowKV's settings (test/eval_acc.py): rank 160 for Llama-3-8B's H_kv·D = 8·128,
# 48 outlier chunks of 8 tokens at a 2048-token sparse budget.
_PAPER_RANK, _PAPER_KEY_WIDTH = 160, 1024
_PAPER_OUTLIER_TOKENS, _PAPER_BUDGET = 48 * 8, 2048


def undo_rope(keys: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Pre-RoPE keys (fp32) of post-RoPE ``keys`` ``[*P, D]`` at ``positions`` ``[*P]``.

    RoPE rotates each pair of dimensions by ``position * inv_freq``; its
    inverse is the rotation by the negated angle.
    """
    return apply_rope(keys, -positions, inv_freq)


def lowrank_keys(pre_rope_keys: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """ShadowKV's low-rank key store: ``U[:, :rank]`` and ``SV`` of one SVD per sequence.

    ``pre_rope_keys`` ``[B, L, H_kv, D]`` is reshaped to ``[B, L, H_kv·D]`` (one
    SVD for all kv-heads of the layer) and factored in fp32.  Returns ``u``
    ``[B, L, r]`` and ``sv = diag(s_r) @ Vh_r`` ``[B, r, H_kv·D]``, the layout
    :func:`kvplug.kernels.lowrank_rope_keys` takes, with ``r = min(rank, L,
    H_kv·D)`` (an SVD has no more factors; at that rank the store is exact).
    """
    B, L, H, D = pre_rope_keys.shape
    U, s, Vh = torch.linalg.svd(pre_rope_keys.float().reshape(B, L, H * D), full_matrices=False)
    r = min(rank, s.shape[-1])
    return U[..., :r], s[..., :r, None] * Vh[..., :r, :]


@register_policy("shadowkv")
@dataclass
class ShadowKV(SelectionPolicy):
    summary = ("reads a local window, outlier chunks and the top chunks by landmark per "
               "decode step, their keys rebuilt from a low-rank store in HF (bandwidth)")
    # HF keeps the prompt's keys low-rank and its values offloaded; vLLM-cpu keeps no such
    # store, so there ShadowKV selects over the dense cache
    store = "lowrank"
    fallback_store = "dense"
    rank: int = param(0, "rank of the per-layer SVD of pre-RoPE keys, HF path (0: 160 per "
                         "1024 of H_kv·head_dim, ShadowKV's Llama-3-8B setting)", min=0)
    chunk_size: int = param(8, "tokens per chunk (vLLM-cpu reads whole 32-token blocks "
                                 "fastest: chunk_size=32)", min=1)
    local_chunks: int = param(4, "chunks of the local window, besides the current one", min=0)
    outlier_chunks: int = param(-1, "outlier chunks read exactly (-1: 3/16 of the budget, "
                                    "ShadowKV's 48 per 2048 tokens)", min=-1)

    def chunk(self, unit: int) -> int:
        return check_chunk(self.name, "chunk_size", self.chunk_size, unit)

    def key_rank(self, num_kv_heads: int, head_dim: int) -> int:
        """The SVD rank for a layer of ``num_kv_heads`` heads of ``head_dim``."""
        width = num_kv_heads * head_dim
        if self.rank > width:
            raise ValueError(f"policy 'shadowkv': rank={self.rank} exceeds H_kv·head_dim="
                             f"{width} of this model")
        return self.rank or max(1, round(_PAPER_RANK * width / _PAPER_KEY_WIDTH))

    def outlier_budget(self, budgets: Tensor, chunk: int) -> Tensor:
        """Outlier chunks per row (``[B]``) before the budget caps them."""
        if self.outlier_chunks >= 0:
            return torch.full_like(budgets, self.outlier_chunks)
        return budgets * _PAPER_OUTLIER_TOKENS // (_PAPER_BUDGET * chunk)

    def summary_spec(self, layer_idx, unit):
        return SummarySpec("landmarks", self.chunk(unit))

    def read_chunk(self, layer_idx, unit):
        return self.chunk(unit)

    def plan_step(self, seq_lens, unit):
        """Every layer splits the budget the same way."""
        return self.budget_split(seq_lens, self.token_budgets(seq_lens), unit)

    def select(self, layer_idx, q, summary, seq_lens, ctx):
        return None if ctx.plan is None else self.choose(q, summary, ctx.plan)[0]

    def choose(self, q: Tensor, summary: KeySummary,
               split: BudgetSplit) -> tuple[Selection, Tensor]:
        """The key set of one layer's step under ``split`` (:meth:`budget_split`).

        Returns the selection (window, then outliers and top chunks merged in
        ``chunk_ids``) and the top chunks alone (``[B, H_kv, k]``, ``-1``
        padded): those ShadowKV rebuilds from its low-rank store.
        """
        exact = self.exact_part(summary, split)
        top = self.top_chunks(q, summary, exact)
        ids = ascending(torch.cat([exact.outliers, top], dim=-1))
        return Selection(ids, summary.chunk_size, 0, split.window), top

    def budget_split(self, seq_lens: Tensor, budgets: Tensor, unit: int) -> BudgetSplit | None:
        """How rows of ``seq_lens`` tokens spend ``budgets`` (``[B]``) tokens: the local
        window, then outlier chunks, then top chunks.  The same at every layer of a
        step.  None: every row reads its whole context."""
        chunk = self.chunk(unit)
        window = recent_tokens(seq_lens, (budgets // chunk).clamp(1, self.local_chunks + 1), chunk)
        window = torch.where(budgets >= seq_lens, seq_lens, window)
        if bool((window >= seq_lens).all()):
            return None
        n_before = (seq_lens - window) // chunk              # full chunks before the window
        left = (budgets - window).clamp_min(0)
        n_out = torch.minimum(torch.minimum(self.outlier_budget(budgets, chunk), left // chunk),
                              n_before)
        n_top = torch.minimum((left - n_out * chunk) // chunk, n_before - n_out)
        return BudgetSplit(chunk, window, n_before, n_out, n_top, int(n_out.max()),
                           int(n_top.max()))

    def exact_part(self, summary: KeySummary, split: BudgetSplit) -> ExactPart:
        """What a layer's step reads exactly: the local window and the outlier chunks.

        Neither depends on the query, and what a smaller budget reads exactly
        a larger one reads exactly too (ties in ``min_cos`` aside), so a store
        can keep just the exact part of the largest budget it will see.
        """
        if summary is None or summary.min_cos is None or summary.chunk_size != split.chunk:
            raise ValueError(f"policy 'shadowkv' needs landmarks with min_cos over "
                             f"{split.chunk}-token chunks; got {summary!r}")
        min_cos = _per_row(summary.min_cos, summary.table).transpose(1, 2)   # [B, H_kv, C]
        outliers = select_topk(-min_cos, min_cos.shape[1], split.n_before, split.max_out,
                               k_per_seq=split.n_out, softmax=False)
        # chunks never scored (+inf, e.g. filled over several vLLM writes) are no outliers
        never = min_cos.gather(2, outliers.long().clamp_min(0)).isinf()
        return ExactPart(split, ascending(outliers.masked_fill(never, -1)))

    def top_chunks(self, q: Tensor, summary: KeySummary, exact: ExactPart) -> Tensor:
        """The top chunks by landmark before the window, outliers excluded: ``[B, H_kv, k]``."""
        split = exact.split
        scores = chunk_scores(q, summary.lo, split.n_before,
                              summary_table=summary.table)                # [B, H_q, C]
        B, H, _ = exact.outliers.shape
        C = scores.shape[-1]
        G = scores.shape[1] // H
        picked = torch.zeros(B, H, C + 1, dtype=torch.bool, device=q.device)
        picked.scatter_(2, torch.where(exact.outliers < 0, C, exact.outliers).long(), True)
        picked = picked[..., :C]
        scores = scores.masked_fill(picked.repeat_interleave(G, dim=1), float("-inf"))
        # ShadowKV: softmax over the landmarks per query head, then max over the group
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).view(B, H, G, C).amax(dim=2)
        probs = probs.masked_fill(picked, float("-inf"))  # below any chunk, even one at p = 0
        return select_topk(probs, H, split.n_before, split.max_top, k_per_seq=split.n_top,
                           softmax=False)


class BudgetSplit(NamedTuple):
    """How a ShadowKV step spends each row's budget (see :meth:`ShadowKV.budget_split`)."""

    chunk: int        # tokens per chunk
    window: Tensor    # [B] tokens of the local window (the partial current chunk included)
    n_before: Tensor  # [B] full chunks before the window: the outlier and top candidates
    n_out: Tensor     # [B] outlier chunks the budget buys
    n_top: Tensor     # [B] top chunks the rest of the budget buys
    max_out: int      # n_out.max() and n_top.max(), the widths of their id tensors
    max_top: int


class ExactPart(NamedTuple):
    """The part of a ShadowKV step read with exact keys (see :meth:`ShadowKV.exact_part`):
    the split's window, and the outlier chunks."""

    split: BudgetSplit
    outliers: Tensor  # [B, H_kv, k] outlier chunk ids, ascending, -1 unused


def _per_row(x: Tensor, table: Tensor | None) -> Tensor:
    """Per-chunk values ``[N, P, H_kv]`` as ``[B, C, H_kv]`` rows (see :class:`KeySummary`)."""
    return x if table is None else gather_pages(x, table)


def ascending(ids: Tensor) -> Tensor:
    """Chunk ids sorted ascending along the last axis, ``-1`` (unused) last."""
    big = torch.iinfo(ids.dtype).max
    ids = torch.where(ids < 0, big, ids).sort(dim=-1).values
    return torch.where(ids == big, -1, ids)
