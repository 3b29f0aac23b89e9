"""Chelsea / CentroidKV: merge similar KV tokens into centroids instead of evicting them.

Based on https://arxiv.org/abs/2506.11418 (no official code; docs/chelsea.md lists what
the paper fixes and what kvplug chose where it does not).  Keys are similar along the
sequence, so at the end of prefill every kv-head's span is reduced by *chunked soft
matching*: the tokens are cut into chunks of ``chunk_size``, each chunk's tokens are
split alternately into a set A (even places) and a set B (odd places), each A token is
matched to its most similar B token of the same chunk (cosine of keys), and the most
similar matches are merged, A into B.  As in ToMe, one round merges at most half the
tokens, so rounds repeat on the survivors until the budget is met.  A cluster stores the
count-weighted mean of its keys and of its values and its count ``c``; attention weighs
it as ``c`` copies (:func:`kvplug.kernels.count_weighted_decode`).  The first
``sink_size`` tokens and the recent window are kept exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvplug.policies.base import param, register_policy
from kvplug.policies.compression import CompressionPolicy, KeepPlan, LayerScores, with_window


@dataclass
class Clusters:
    """Every kv-head's clusters, in sequence order: the sums of their members' keys and
    values (``[H, n, D]``, fp32), their member ``counts`` (``[H, n]``) and ``positions``
    (``[H, n]``, ascending): the member that absorbed the others."""

    keys: Tensor
    values: Tensor
    counts: Tensor
    positions: Tensor

    @property
    def size(self) -> int:
        return self.counts.shape[1]

    def select(self, keep: Tensor) -> Clusters:
        """The clusters where ``keep`` ``[H, n]`` is set (the same number in every row)."""
        H, D = self.keys.shape[0], self.keys.shape[2]
        return Clusters(self.keys[keep].view(H, -1, D), self.values[keep].view(H, -1, D),
                        self.counts[keep].view(H, -1), self.positions[keep].view(H, -1))


def mergeable_sources(n: int, chunk_size: int, device) -> Tensor:
    """``[n_chunks, ceil(chunk_size / 2)]`` whether each A place of each chunk holds a
    token with at least one B token in its chunk (the same for every kv-head)."""
    valid = (torch.arange(-(-n // chunk_size) * chunk_size, device=device) < n)
    valid = valid.view(-1, chunk_size)
    return valid[:, 0::2] & valid[:, 1::2].any(dim=1, keepdim=True)


def soft_matching_round(clusters: Clusters, slots: int, chunk_size: int,
                        similarity: str) -> Clusters:
    """One round of chunked soft matching, down to ``slots`` clusters at the fewest: the A
    clusters most similar to their best B partner (ranked over every chunk of the head)
    are merged into it; one round merges at most the A clusters that have a partner."""
    H, n, D = clusters.keys.shape
    sources = mergeable_sources(n, chunk_size, clusters.keys.device)
    merges = min(n - slots, int(sources.sum()))
    centroids = clusters.keys / clusters.counts[..., None]
    metric = F.normalize(centroids, dim=-1) if similarity == "cosine" else centroids
    metric = F.pad(metric, (0, 0, 0, -n % chunk_size)).view(H, -1, chunk_size, D)
    a, b = metric[:, :, 0::2], metric[:, :, 1::2]
    sim = a @ b.transpose(-1, -2)                                          # [H, C, |A|, |B|]
    if similarity == "l2":                                                 # -|a - b|^2
        sim = 2 * sim - a.square().sum(-1)[..., None] - b.square().sum(-1)[..., None, :]
    place = torch.arange(metric.shape[1] * chunk_size, device=metric.device)
    place = place.view(-1, chunk_size)                                     # [C, chunk]
    sim = sim.masked_fill(~(place[:, 1::2] < n)[None, :, None, :], float("-inf"))
    best, partner = sim.max(dim=-1)                                        # [H, C, |A|]
    chosen = best.masked_fill(~sources, float("-inf")).flatten(1).topk(merges).indices
    src = place[:, 0::2].flatten()[chosen]                                 # [H, merges]
    dst = place[:, 1::2].expand(H, -1, -1).gather(2, partner).flatten(1).gather(1, chosen)
    for sums in (clusters.keys, clusters.values):
        sums.scatter_add_(1, dst[..., None].expand(-1, -1, D),
                          sums.gather(1, src[..., None].expand(-1, -1, D)))
    clusters.counts.scatter_add_(1, dst, clusters.counts.gather(1, src))
    merged = torch.zeros_like(clusters.counts, dtype=torch.bool).scatter_(1, src, True)
    return clusters.select(~merged)


def merge_tokens(keys: Tensor, values: Tensor, positions: Tensor, slots: int,
                 chunk_size: int, similarity: str) -> Clusters:
    """The tokens at ``positions`` (ascending) of ``keys``/``values`` ``[N, H, D]``
    merged into ``slots`` clusters per kv-head by rounds of chunked soft matching, each
    round on the survivors of the last, re-chunked in sequence order."""
    num_kv_heads = keys.shape[1]
    clusters = Clusters(keys[positions].transpose(0, 1).float(),
                        values[positions].transpose(0, 1).float(),
                        torch.ones(num_kv_heads, positions.numel(), dtype=torch.long,
                                   device=keys.device),
                        positions.expand(num_kv_heads, -1))
    while clusters.size > slots:
        clusters = soft_matching_round(clusters, slots, chunk_size, similarity)
    return clusters


@register_policy("chelsea")
@dataclass
class Chelsea(CompressionPolicy):
    summary = ("merges each kv-head's similar KV tokens (chunked soft matching on keys) "
               "into count-weighted centroids at prefill; sink and recent window kept "
               "exact (memory)")
    store = "merged"

    chunk_size: int = param(64, "tokens per chunk of the soft matching (a token merges only "
                                "with tokens of its chunk)", min=2)
    similarity: str = param("cosine", "key similarity that matches tokens: cosine (as in "
                                      "ToMe) or l2 (minus the squared distance)",
                            choices=("cosine", "l2"))
    sink_size: int = param(4, "first tokens kept exact (attention sinks)", min=0)
    window_size: int = param(64, "last prompt tokens kept exact (the recent window)", min=1)

    @property
    def observation_window(self) -> int:
        return self.window_size

    def token_budget(self, context_len: int) -> int:
        """At least the sink, the window and one slot for the merged tokens."""
        return min(context_len, max(super().token_budget(context_len),
                                    self.sink_size + self.window_size + 1))

    def prefill_scores(self, layer_idx, queries, keys, scale):
        """Which tokens stay exact: ``+inf`` on the sink and the window, 0 on the tokens
        that merge (Chelsea reads no queries)."""
        context, num_kv_heads = keys.shape[:2]
        window = min(self.window_size, context)
        scores = keys.new_zeros(num_kv_heads, context - window, dtype=torch.float32)
        scores[:, :self.sink_size] = float("inf")
        return LayerScores(with_window(scores, context, window))

    def keep_plan(self, scores: LayerScores, budget: int, span: int, keys: Tensor,
                  values: Tensor, cell: int | None = None) -> KeepPlan:
        """``min(budget, span)`` slots per kv-head for ``[0, span)``: the ``+inf``-scored
        tokens exact, the rest merged by rounds of chunked soft matching."""
        num_kv_heads = keys.shape[1]
        if budget >= span:
            every = torch.arange(span, device=keys.device).expand(num_kv_heads, span)
            return KeepPlan(every, torch.ones_like(every))
        exact = scores.token[0, :span].isinf()     # by position: the same for every kv-head
        fixed, loose = exact.nonzero().squeeze(1), (~exact).nonzero().squeeze(1)
        slots = budget - fixed.numel()
        if slots < 1:
            raise ValueError(f"policy 'chelsea': budget={budget} cannot hold a span of {span} "
                             f"tokens: {fixed.numel()} are kept exact (sink and window) and the "
                             f"other {loose.numel()} need at least one slot; budget must be "
                             f">= {min(span, fixed.numel() + 1)}")
        merged = merge_tokens(keys, values, loose, slots, self.chunk_size, self.similarity)
        positions = torch.cat([fixed.expand(num_kv_heads, -1), merged.positions], dim=1)
        order = positions.argsort(dim=1)
        counts = torch.cat([torch.ones_like(positions[:, :fixed.numel()]), merged.counts], 1)

        def stored(own: Tensor, sums: Tensor) -> Tensor:
            """Exact tokens' own rows and the clusters' means, in position order."""
            rows = torch.cat([own[fixed].transpose(0, 1).float(),
                              sums / merged.counts[..., None]], dim=1)
            return rows.gather(1, order[..., None].expand(-1, -1, rows.shape[-1])).to(own.dtype)

        return KeepPlan(positions.gather(1, order), counts.gather(1, order),
                        stored(keys, merged.keys), stored(values, merged.values))
