"""Policies that keep less: at the end of a prompt's prefill they choose, per layer
and kv-head, which KV tokens stay stored (eviction) or what they become (merging);
an engine then stores only that and frees the rest.

The contract (docs/design.md, "Keeping less"):

* ``prefill_scores(layer, queries, keys, scale)`` runs once per layer when a
  prompt's prefill ends: ``queries`` are the prompt's last ``observation_window``
  post-RoPE queries, ``keys`` every key of the context.  It returns what
  ``keep_plan`` needs (a :class:`LayerScores`), and nothing is stored yet;
* ``layer_budgets(scores, keep, span)`` turns the per-sequence budget into a
  budget per layer once every layer has scored (uniform here; CAKE allocates);
* ``keep_plan(scores, budget, span, keys, values, cell)`` is what one layer keeps of
  the tokens ``[0, span)``: a :class:`KeepPlan`.  The engine keeps the tokens at
  and after ``span`` (the prompt's partial last block, and every decode token)
  as they are;
* policies that also declare ``decode_compress`` keep less again as decode adds
  tokens: once a layer holds more than its budget, ``decode_keep(layer, queries,
  keys, budget, scale)`` says which of its slots stay (CAKE's decode-time eviction);
* policies that declare ``replay`` (:class:`ReplayPolicy`) score by having the model
  read its context again instead of by the prefill's own queries: the engine feeds
  the prompts ``replay_chunks`` names over the context's cache, one forward each, hands
  every layer's queries to ``replay_scores`` and keeps none of the replay's KV.

Budget means KV tokens kept per sequence (averaged over layers), window
included, as ``budget`` (tokens) or ``budget_ratio`` (fraction of the prompt).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kvplug.policies.base import Policy, param


@dataclass(frozen=True)
class LayerScores:
    """What one layer's scoring at the end of prefill found.

    ``token``: ``[H_kv, N]`` importance of each key of the context (higher is kept
    first; the observation window scores ``+inf``).  ``preference``: one number per
    layer for policies that allocate budgets across layers (CAKE), else None.
    """

    token: Tensor
    preference: float | None = None


@dataclass(frozen=True)
class KeepPlan:
    """What one layer keeps of the span ``[0, span)``, per kv-head.

    ``indices``: ``[H_kv, n]`` ascending positions of the kept tokens (for a
    merge, of each cluster's representative).  ``counts``: ``[H_kv, n]`` tokens each
    kept slot stands for, None when every slot is one token (eviction); attention
    over a slot of count ``c`` must weigh it as ``c`` identical keys (a ``log c``
    bias on its score).  ``keys``/``values``: ``[H_kv, n, D]`` what to store when
    it is not the kept tokens' own K/V (merged centroids), else None.
    """

    indices: Tensor
    counts: Tensor | None = None
    keys: Tensor | None = None
    values: Tensor | None = None

    @property
    def size(self) -> int:
        return self.indices.shape[-1]


def window_attention(queries: Tensor, keys: Tensor, scale: float) -> Tensor:
    """Softmax attention of the last ``W`` queries over all ``N`` keys, causal inside the
    window: ``queries`` ``[W, H_q, D]``, ``keys`` ``[N, H_kv, D]`` -> ``[H_q, W, N]``
    (float32).  Query ``i`` sits at position ``N - W + i``."""
    W, num_heads, _ = queries.shape
    N, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    k = keys.float().permute(1, 2, 0).repeat_interleave(group, dim=0)   # [H_q, D, N]
    logits = torch.bmm(queries.float().transpose(0, 1), k) * scale       # [H_q, W, N]
    future = torch.arange(N, device=keys.device) > (N - W + torch.arange(W, device=keys.device))[:, None]
    return logits.masked_fill_(future, float("-inf")).softmax(dim=-1)


def pool_scores(scores: Tensor, kernel_size: int) -> Tensor:
    """Average-pool ``[..., N]`` scores over ``kernel_size`` neighbours (same length),
    so a token next to an important one is kept with it (SnapKV's clustering).  The
    zero padding counts at the edges, as in SnapKV's and CAKE's code."""
    if kernel_size <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    pooled = F.avg_pool1d(scores.reshape(-1, 1, shape[-1]), kernel_size, stride=1,
                          padding=kernel_size // 2)
    return pooled.reshape(shape)


def group_mean(scores: Tensor, num_kv_heads: int) -> Tensor:
    """``[H_q, N]`` scores averaged over each kv-head's query group -> ``[H_kv, N]``."""
    return scores.unflatten(0, (num_kv_heads, scores.shape[0] // num_kv_heads)).mean(dim=1)


def with_window(scores: Tensor, context_len: int, window: int) -> Tensor:
    """``[H_kv, context_len - window]`` scores extended to the whole context, the last
    ``window`` tokens at ``+inf`` (always kept)."""
    pad = scores.new_full((scores.shape[0], min(window, context_len)), float("inf"))
    return torch.cat([scores, pad], dim=-1)


def top_tokens(scores: Tensor, budget: int, span: int) -> Tensor:
    """The ``budget`` best-scored tokens of ``[0, span)`` per kv-head, ascending
    (``[H_kv, budget]``); ties keep the earlier token."""
    budget = min(budget, span)
    if budget == span:
        return torch.arange(span, device=scores.device).expand(scores.shape[0], span)
    return scores[:, :span].topk(budget, dim=-1, sorted=False).indices.sort(dim=-1).values


def check_pooling(policy: str, kernel_size: int) -> None:
    """Pooled scores keep the context's length only with an odd kernel."""
    if kernel_size % 2 == 0:
        raise ValueError(f"policy {policy!r}: kernel_size={kernel_size} must be odd "
                         "(the pooled scores keep the context's length)")


@dataclass(frozen=True)
class ReplayChunk:
    """One forward of a replay: ``input_ids`` (``[B, L]``) read after the whole context,
    whose queries score the context tokens ``[start, end)``."""

    start: int
    end: int
    input_ids: Tensor


@dataclass
class CompressionPolicy(Policy):
    """Base of the policies that keep fewer KV tokens than the context (prefill eviction
    or merging).  Subclasses implement :meth:`prefill_scores` and may override
    :meth:`layer_budgets` and :meth:`keep_plan`."""

    stages: ClassVar[frozenset[str]] = frozenset({"prefill_compress"})
    store: ClassVar[str] = "evicted"

    budget: int = param(0, "KV tokens kept per sequence (averaged over layers), observation "
                           "window included (0: use budget_ratio)", min=0)
    budget_ratio: float = param(0.0, "the same as a fraction of the prompt (0: use budget)",
                                min=0.0, max=1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.budget > 0) == (self.budget_ratio > 0):
            raise ValueError(f"policy {self.name!r}: set exactly one of budget (tokens) and "
                             f"budget_ratio (fraction of the prompt); got budget={self.budget}, "
                             f"budget_ratio={self.budget_ratio}")

    @property
    def observation_window(self) -> int:
        """Last prompt queries the scoring reads; those tokens are always kept."""
        raise NotImplementedError

    def token_budget(self, context_len: int) -> int:
        """KV tokens kept of a ``context_len``-token prompt, at least the window."""
        return min(context_len, self.kept_budget(context_len))

    def kept_budget(self, prompt_len: int) -> int:
        """KV tokens per layer (on average) a sequence with a ``prompt_len``-token prompt may
        keep, not clipped to the prompt: what decode-time compression holds a layer to where
        the prompt fitted its budget."""
        if self.budget > 0:
            kept = self.budget
        else:
            kept = math.ceil(self.budget_ratio * prompt_len)
        return max(kept, self.observation_window)

    def kv_tokens_kept(self, context_len: int, prompt_len: int | None = None) -> int:
        """KV tokens stored once a ``prompt_len``-token prompt is compressed and the context
        has grown to ``context_len`` (decode tokens are kept as they come, or, with
        ``decode_compress``, up to the budget)."""
        prompt_len = context_len if prompt_len is None else prompt_len
        if "decode_compress" in self.stages:
            return min(context_len, self.kept_budget(prompt_len))
        return min(context_len, self.token_budget(prompt_len) + context_len - prompt_len)

    def account_step(self, state, computed_before: int, new_tokens: int,
                     is_prefill: bool) -> None:
        """Like every policy's, with what a decode step reads and what stays stored counted
        after the prompt's compression."""
        context = computed_before + new_tokens
        kept = self.kv_tokens_kept(context, min(state.stats.prompt_tokens, context))
        if is_prefill:
            state.stats.prefill_tokens += new_tokens
        else:
            state.stats.decode_steps += 1
            state.stats.kv_tokens_read += kept
        state.stats.kv_tokens_stored = kept

    def largest_layer_budget(self, budget: int, span: int) -> int:
        """The most tokens of ``[0, span)`` any layer (any kv-head of it, with
        ``uneven_heads``) may keep when the layers share ``budget`` (what an engine that
        stores every layer alike must reserve)."""
        return min(budget, span)

    def prefill_scores(self, layer_idx: int, queries: Tensor, keys: Tensor,
                       scale: float) -> LayerScores:
        raise NotImplementedError

    def layer_budgets(self, scores: list[LayerScores], budget: int, span: int) -> list[int]:
        """Tokens of ``[0, span)`` each layer keeps when the sequence keeps ``budget``
        of them per layer on average: the same for every layer."""
        return [min(budget, span)] * len(scores)

    def decode_keep(self, layer_idx: int, queries: Tensor, keys: Tensor, budget: int,
                    scale: float) -> Tensor | None:
        """Policies declaring ``decode_compress``: which slots a layer keeps once a forward
        after the prompt's compression has left it more than ``budget`` slots.  ``queries``
        ``[Q, H_q, D]``: that forward's post-RoPE queries, the last at the last slot;
        ``keys`` ``[S, H_kv, D]``: every slot the layer holds, in position order, the
        forward's tokens last.  Returns ``[H_kv, budget]`` ascending slot indices, or None
        when ``S <= budget`` (nothing to evict)."""
        raise NotImplementedError

    def keep_plan(self, scores: LayerScores, budget: int, span: int, keys: Tensor,
                  values: Tensor, cell: int | None = None) -> KeepPlan:
        """The ``budget`` best-scored tokens of ``[0, span)`` per kv-head (``keys``/``values``
        ``[N, H_kv, D]`` are there for policies that merge).  ``cell``: an engine that stores
        each kv-head's slots in cells of that many passes it for policies whose heads keep
        uneven numbers (``uneven_heads``), which then round each head's up to whole cells."""
        return KeepPlan(top_tokens(scores.token, budget, span))


@dataclass
class ReplayPolicy(CompressionPolicy):
    """Base of the policies that score a context by the model's attention while it reads
    the context again (``"replay"`` stage): after the context's prefill the engine runs
    each of :meth:`replay_chunks` as a forward over the context's cache, gives every
    layer's queries to :meth:`replay_scores` and drops the replay's own KV; the scores,
    starting from :meth:`unscored`, then go through ``layer_budgets`` and ``keep_plan``
    as a prefill's would.  Nothing of the context is always kept but what the scores say,
    so the observation window is empty."""

    stages: ClassVar[frozenset[str]] = frozenset({"prefill_compress", "layer_budgets", "replay"})

    @property
    def observation_window(self) -> int:
        return 0

    def prefill_scores(self, layer_idx, queries, keys, scale):
        raise TypeError(f"policy {self.name!r} scores a context by replaying it "
                        "(replay_chunks / replay_scores), not by the prefill's queries")

    def replay_chunks(self, context_ids: Tensor, scored_from: int,
                      encode: Callable[[str], list[int]],
                      turn_end: list[int]) -> list[ReplayChunk]:
        """The replay of ``context_ids`` (``[B, N]``, no padding) whose tokens from
        ``scored_from`` on are the context proper (before: the chat template's preamble);
        ``encode`` tokenizes text without special tokens, ``turn_end`` ends a user turn
        and opens the reply (the chat template's)."""
        raise NotImplementedError

    def unscored(self, num_kv_heads: int, context_len: int) -> Tensor:
        """``[H_kv, N]`` scores of one layer before any replay chunk scored it."""
        raise NotImplementedError

    def replay_scores(self, layer_idx: int, queries: Tensor, keys: Tensor, chunk: ReplayChunk,
                      scale: float) -> Tensor:
        """``[H_kv, end - start]`` scores of the context tokens ``chunk`` replays, from one
        layer's replay ``queries`` ``[L, H_q, D]`` (post-RoPE) and ``keys`` ``[N + L, H_kv, D]``
        (the context's, then the replay's)."""
        raise NotImplementedError
