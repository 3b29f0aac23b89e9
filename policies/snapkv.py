"""SnapKV: keep the tokens the prompt's last queries attend to.

Based on https://arxiv.org/abs/2404.14469 and kvpress's ``SnapKVPress`` (the
baseline every eviction paper compares with): the attention of the last
``window_size`` queries over the earlier keys, averaged over those queries,
average-pooled over ``kernel_size`` neighbours and averaged over each GQA group,
ranks the tokens of every kv-head; the top ones and the window itself are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvplug.policies.base import param, register_policy
from kvplug.policies.compression import (CompressionPolicy, LayerScores, check_pooling,
                                         group_mean, pool_scores, window_attention,
                                         with_window)


@register_policy("snapkv")
@dataclass
class SnapKV(CompressionPolicy):
    summary = ("keeps the tokens the prompt's last queries attend to, per kv-head; "
               "the rest is evicted at prefill (memory)")
    window_size: int = param(64, "observation window: last prompt queries that score the "
                                 "tokens (always kept)", min=1)
    kernel_size: int = param(5, "average-pooling width over neighbouring tokens (odd; 1: "
                                "none)", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_pooling(self.name, self.kernel_size)

    @property
    def observation_window(self) -> int:
        return self.window_size

    def prefill_scores(self, layer_idx, queries, keys, scale):
        context = keys.shape[0]
        window = min(self.window_size, queries.shape[0], context)
        probs = window_attention(queries[-window:], keys, scale)[..., :context - window]
        scores = group_mean(pool_scores(probs.mean(dim=1), self.kernel_size), keys.shape[1])
        return LayerScores(with_window(scores, context, window))
