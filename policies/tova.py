"""TOVA: keep the tokens the current query attends to, one keep set per layer.

Based on https://arxiv.org/abs/2401.06104 ("Transformers are Multi-State RNNs",
Oren et al. 2024) and kvpress's ``TOVAPress``: once a layer holds more than its
budget, the tokens with the lowest softmax attention from the last query, averaged
over every query head of the layer, are dropped; all kv-heads of the layer keep the
same tokens.  At the end of prefill the last prompt query scores the earlier tokens
(observation window 1); during decode each step's query scores every slot the layer
holds.  The last token is always kept, as in ``TOVAPress`` (the paper does not force
it, but its own attention weight is usually the highest).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvplug.policies.base import register_policy
from kvplug.policies.compression import (CompressionPolicy, LayerScores, top_tokens,
                                         window_attention, with_window)


def last_query_scores(queries: Tensor, keys: Tensor, scale: float) -> Tensor:
    """``[H_kv, N]`` TOVA scores: the last query's attention over the ``N - 1`` earlier
    keys averaged over all query heads, the same row for every kv-head, the last key
    at ``+inf``."""
    probs = window_attention(queries[-1:], keys, scale)[:, 0, :-1].mean(dim=0)
    return with_window(probs.expand(keys.shape[1], -1), keys.shape[0], 1)


@register_policy("tova")
@dataclass
class TOVA(CompressionPolicy):
    stages = frozenset({"prefill_compress", "decode_compress"})
    summary = ("keeps the tokens the last query attends to, averaged over all heads (one keep "
               "set per layer); the rest is evicted at prefill and again at each decode step "
               "past the budget (memory)")

    @property
    def observation_window(self) -> int:
        return 1

    def prefill_scores(self, layer_idx, queries, keys, scale):
        return LayerScores(last_query_scores(queries, keys, scale))

    def decode_keep(self, layer_idx, queries, keys, budget, scale):
        """The step's last query scores every slot; the ``budget`` best stay (the last
        slot always)."""
        slots = keys.shape[0]
        if slots <= budget:
            return None
        return top_tokens(last_query_scores(queries, keys, scale), budget, slots)
