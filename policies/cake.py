"""CAKE: per-layer budgets that follow each layer's attention pattern.

Based on https://arxiv.org/abs/2503.12491 (ICLR 2025) and its official code
(antgroup/cakekv).  At the end of prefill each layer looks at the attention ``A`` of
the prompt's last ``window_size`` queries over the keys before the window:

* its preference ``P = H^(1/tau1) * V^(1/tau2)``, from the spatial dispersion
  ``H = -sum A log(A + 1e-10)`` (how spread the attention is) and the temporal
  shift ``V = sum var_q(A)`` (how much it moves from query to query), both summed
  over heads, queries and keys, decides the layer's share of the sequence's
  budget: a layer with spread or shifting attention needs more tokens;
* the eviction indicator ``mean_q(A) + gamma * var_q(A)`` (average-pooled, averaged
  over the GQA group) ranks its tokens: a token whose importance varies across the
  window may matter to a later query even when its mean is low.

The window itself is always kept.  During decode (``CakeDecodingKVCache_LayerWise``)
a layer that holds more than its budget after a forward keeps its last
``window_size`` slots and the ``budget - window_size`` others the forward's
queries attend to most (average-pooled, averaged over the GQA group), so it never
holds more than its budget between steps.  ``tau1``/``tau2`` were tuned per model and
budget in the paper (``experiments/LongBench/config/model2tau.json``, e.g.
Llama-3.1-8B at 1024 tokens: 1.6/0.4); 1.0/1.0 is the official fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvplug.policies.base import param, register_policy
from kvplug.policies.compression import (CompressionPolicy, LayerScores, check_pooling,
                                         group_mean, pool_scores, top_tokens,
                                         window_attention, with_window)


def share(preferences: list[float], total: int, cap: int) -> list[int]:
    """Split ``total`` tokens across layers in proportion to ``preferences``, none over
    ``cap`` (every layer gets ``cap`` when that is all they can hold).

    A layer whose share passes the cap gets the cap and the excess goes to the
    others, again in proportion to their preferences: each layer gets
    ``min(cap, lam * P)`` for the ``lam`` that makes the sum ``total``.  (The official
    ``adjust_budgets`` splits the excess evenly instead; the proportional split keeps
    the paper's ratios between uncapped layers and lets the cascade shrink budgets
    only, see :meth:`CAKE.layer_budgets`.)  Integers: every share is rounded down and
    the remaining tokens go one each to the largest fractional parts (ties to the
    larger preference), so a layer with a larger preference never gets less.
    """
    num_layers = len(preferences)
    if num_layers * cap <= total:
        return [cap] * num_layers
    weights = torch.tensor(preferences, dtype=torch.float64)
    if not (weights.isfinite().all() and weights.sum() > 0):     # no preference: share evenly
        weights = torch.ones_like(weights)
    ranks = weights.tolist()
    capped = torch.zeros(num_layers, dtype=torch.bool)
    while True:    # each round caps at least one more layer; one stays below (total < L * cap)
        free = torch.where(capped, 0.0, weights)
        if free.sum() == 0:                   # only zero-preference layers left: evenly
            free = (~capped).double()
        shares = torch.where(capped, float(cap), free / free.sum() * (total - cap * capped.sum()))
        over = shares > cap
        if not over.any():
            break
        capped |= over
    kept = shares.floor()
    fraction = (shares - kept).tolist()
    order = sorted((l for l in range(num_layers) if kept[l] < cap),
                   key=lambda l: (-fraction[l], -ranks[l]))
    for l in order[:total - int(kept.sum())]:
        kept[l] += 1
    return [int(k) for k in kept]


@register_policy("cake")
@dataclass
class CAKE(CompressionPolicy):
    # budgets differ per layer: an engine must read (and may free) each layer apart; and a
    # layer is evicted again as decode grows it past its budget
    stages = frozenset({"prefill_compress", "layer_budgets", "decode_compress"})
    summary = ("gives each layer its own budget from its attention dispersion and shift and "
               "keeps its most important tokens; the rest is evicted at prefill and again as "
               "decode grows a layer past its budget (memory)")
    window_size: int = param(32, "observation window: last prompt queries that score the "
                                 "tokens (always kept; 2+ for the variance)", min=2)
    gamma: float = param(200.0, "weight of the attention variance in the eviction indicator "
                                "mean + gamma * var", min=0.0)
    tau1: float = param(1.0, "temperature of the spatial dispersion in the preference "
                             "H^(1/tau1) * V^(1/tau2) (> 0)")
    tau2: float = param(1.0, "temperature of the temporal shift in the preference (> 0)")
    kernel_size: int = param(5, "average-pooling width over neighbouring tokens (odd; 1: "
                                "none)", min=1)
    max_layer_ratio: float = param(2.0, "kvplug engine limit, not CAKE's: no layer keeps more "
                                         "than this times the budget (an engine storing every "
                                         "layer in the same blocks reserves that for each)",
                                   min=1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("tau1", "tau2"):
            if not getattr(self, name) > 0:
                raise ValueError(f"policy 'cake': {name}={getattr(self, name)!r} is out of "
                                 "range (0, inf)")
        check_pooling(self.name, self.kernel_size)

    @property
    def observation_window(self) -> int:
        return self.window_size

    def prefill_scores(self, layer_idx, queries, keys, scale):
        """Token indicator and layer preference (``modify_llama.py``,
        ``llama_attn_forward_cake``; ``utils.py``, ``calculate_entropy``).  The variance is
        torch's default, unbiased, as there."""
        context = keys.shape[0]
        window = min(self.window_size, queries.shape[0], context)
        probs = window_attention(queries[-window:], keys, scale)[..., :context - window]
        var = probs.var(dim=1)                                          # [H_q, N - W]
        dispersion = -(probs * torch.log(probs + 1e-10)).sum()
        # float64 and a tensor power: an extreme tau gives inf (share() then splits evenly)
        preference = (dispersion.double() ** (1 / self.tau1)
                      * var.sum().double() ** (1 / self.tau2)).item()
        indicator = pool_scores(probs.mean(dim=1) + self.gamma * var, self.kernel_size)
        scores = group_mean(indicator, keys.shape[1])
        return LayerScores(with_window(scores, context, window), preference)

    def decode_keep(self, layer_idx, queries, keys, budget, scale):
        """CAKE's decode-time eviction (``cake_cache.py``, ``CakeDecodingKVCache_LayerWise``,
        called after the step's attention, which read every slot): the attention of the
        forward's last ``window_size`` queries (one at a decode step) over every slot,
        averaged over those queries, on the slots before the last ``window_size``;
        average-pooled, averaged over the GQA group; the top ``budget - window_size`` and
        the window stay.  No variance term, as there.  The official cache keeps its slots
        in top-k order, so its pooling there runs over neighbours in score order; kvplug
        keeps slots in position order and pools over neighbouring kept tokens."""
        slots = keys.shape[0]
        if slots <= budget:
            return None
        window = min(self.window_size, budget)
        probs = window_attention(queries[-self.window_size:], keys, scale)
        scores = pool_scores(probs[..., :slots - window].mean(dim=1), self.kernel_size)
        return top_tokens(with_window(group_mean(scores, keys.shape[1]), slots, window),
                          budget, slots)

    def largest_layer_budget(self, budget, span):
        """``max_layer_ratio * budget`` tokens, clipped to the span: known before any layer
        scores, so an engine that stores every layer in the same blocks can free the
        rest.  CAKE itself caps a layer only at the prompt."""
        return min(span, math.floor(self.max_layer_ratio * budget))

    def layer_budgets(self, scores, budget, span):
        """CAKE's allocation (``cake_cache.py``, ``CakeprefillKVCache``): the window part
        inside ``[0, span)`` for every layer, and the ``L * (min(budget, span) - window part)``
        other tokens shared in proportion to the preferences, capped at
        :meth:`largest_layer_budget` (:func:`share`).  The budgets add up to
        ``L * min(budget, span)``, each between the window part and the cap.

        The official code allocates in a cascade: after each layer's prefill every
        layer seen so far is re-allocated the same total and evicted to its new budget
        (top-k of its fixed indicator), which bounds prefill memory.  Allocating once
        after the last layer keeps the same tokens: adding a layer to ``min(cap, lam * P)``
        at the same total can only lower ``lam``, so a layer's budget only shrinks as
        layers arrive, and the top-k of a top-k' (k <= k') by the same scores is the
        top-k (prefill attention reads every key, so eviction does not change the
        scores).  Rounding aside, the kept sets are equal, so an engine may allocate once.
        """
        keep = min(budget, span)
        if keep == span:
            return [span] * len(scores)
        context = scores[0].token.shape[-1]
        window = min(self.window_size, context)
        in_span = min(max(span - (context - window), 0), window)
        extra = share([s.preference for s in scores], len(scores) * (keep - in_span),
                      self.largest_layer_budget(budget, span) - in_span)
        return [in_span + e for e in extra]
