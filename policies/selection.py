"""Decode-time selection policies: every KV token stays stored; each decode
step reads a subset of them (the *select* primitive of docs/design.md).

One meaning of budget for all of them: KV tokens read per decode step per
sequence (sink and recent window included), set either as ``budget`` (tokens)
or as ``budget_ratio`` (fraction of the current context).  Prefill is dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kvplug.kernels import chunk_summaries, chunk_topk
from kvplug.policies.base import Policy, param, register_policy


@dataclass(frozen=True)
class Selection:
    """What one decode step of one layer reads, per (sequence, kv-head).

    The key set is the sink ``[0, n_sink)``, the recent window (last
    ``n_recent`` tokens) and the chunks ``chunk_ids`` (``[B, H_kv, k]``,
    ascending, ``-1`` unused) of ``chunk_size`` tokens, each token once; this
    is exactly what :func:`kvplug.kernels.sparse_paged_decode` attends to.
    """

    chunk_ids: Tensor | None
    chunk_size: int
    n_sink: int
    n_recent: int


@dataclass
class SelectionPolicy(Policy):
    budget: int = param(0, "KV tokens read per decode step per sequence, sink and recent "
                           "window included (0: use budget_ratio)", min=0)
    budget_ratio: float = param(0.0, "the same as a fraction of the current context "
                                     "(0: use budget)", min=0.0, max=1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.budget > 0) == (self.budget_ratio > 0):
            raise ValueError(f"policy {self.name!r}: set exactly one of budget (tokens) and "
                             f"budget_ratio (fraction of the context); got budget={self.budget}, "
                             f"budget_ratio={self.budget_ratio}")

    def token_budget(self, context_len: int) -> int:
        if self.budget > 0:
            return self.budget
        return max(1, math.ceil(self.budget_ratio * context_len))

    def kv_tokens_read(self, context_len: int) -> int:
        return min(context_len, self.token_budget(context_len))

    def summarize(self, layer_idx: int, keys: Tensor) -> Any:
        """Per-layer key summary the selection needs; ``keys`` ``[B, L, H_kv, D]`` post-RoPE."""
        return None

    def select(self, layer_idx: int, q: Tensor, summary: Any, context_len: int) -> Selection | None:
        """The key set of this decode step (``q`` ``[B, H_q, D]``); None = dense."""
        raise NotImplementedError


@register_policy("streamingllm")
@dataclass
class StreamingLLM(SelectionPolicy):
    """Attention sinks plus a recent window.

    Based on https://arxiv.org/abs/2309.17453 (4 sink tokens).  Here a
    decode-time read pattern: the cache keeps every token.
    """

    summary = "reads n_sink first tokens + a recent window per decode step (bandwidth)"
    n_sink: int = param(4, "attention-sink tokens always read", min=0)

    def select(self, layer_idx, q, summary, context_len):
        budget = self.token_budget(context_len)
        if budget >= context_len:
            return None
        n_sink = min(self.n_sink, budget)
        return Selection(None, 1, n_sink, budget - n_sink)


@register_policy("quest")
@dataclass
class Quest(SelectionPolicy):
    """Query-aware page selection by the upper bound of q·k per page.

    Based on https://arxiv.org/abs/2406.10774: per page, the key-wise min and
    max give ``sum_d max(q_d·min_d, q_d·max_d) >= q·k`` for every key of the
    page; the top pages by that bound are read.  The first ``dense_layers``
    layers stay dense (as in the paper); the current (last) page is always
    read.  For GQA the bound is maxed over the query heads of a group.
    """

    summary = "reads the top pages by a min/max bound of q·k per decode step (bandwidth)"
    page_size: int = param(16, "tokens per page", min=1)
    dense_layers: int = param(2, "first layers kept dense", min=0)

    def summarize(self, layer_idx, keys):
        if layer_idx < self.dense_layers:
            return None
        _, kmin, kmax = chunk_summaries(keys, self.page_size)
        return kmin, kmax

    def select(self, layer_idx, q, summary, context_len):
        budget = self.token_budget(context_len)
        if layer_idx < self.dense_layers or budget >= context_len:
            return None
        kmin, kmax = summary
        last_page_len = context_len - (context_len - 1) // self.page_size * self.page_size
        num_pages = (context_len - 1) // self.page_size  # full pages before the last one
        k = max(0, (budget - last_page_len) // self.page_size)
        num = torch.full((q.shape[0],), num_pages, dtype=torch.int64, device=q.device)
        ids = chunk_topk(q, kmin, num, k, summary_max=kmax)
        return Selection(ids, self.page_size, 0, last_page_len)
