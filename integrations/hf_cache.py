"""What kvplug's HF caches that keep less than a ``DynamicCache`` share: the layers they
accept and the cache edits they refuse."""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs


class FixedPastLayer(DynamicLayer):
    """A cache layer whose past is stored transformed (compressed, quantized, low-rank):
    it cannot be reordered, cropped or repeated, so beam search, assisted decoding and
    batch expansion are refused rather than run on a past they would corrupt."""

    keeps = "cache"   # what the layer is, named in the refusal

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError(f"kvplug's {self.keeps} (HF path) cannot reorder, crop or "
                                  "repeat its past (beam search, assisted decoding, batch "
                                  "expansion); use greedy or sampled decoding with one "
                                  "sequence per prompt")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _refuse


def full_attention_layers(policy, config: Any, does: str) -> tuple[Any, list[str]]:
    """The text config and its layer types, once every layer is full attention (the only
    kind kvplug's HF caches ``does``) and the policy accepts the model's shape."""
    config = config.get_text_config(decoder=True)
    layer_types, _ = get_layer_types_and_kwargs(config)
    others = sorted(set(layer_types) - {"full_attention"})
    if others:
        raise ValueError(f"kvplug policy {policy.name!r} in the HF path {does} "
                         f"full-attention layers only; this model also has {others}")
    policy.check_model(config.num_hidden_layers, config.num_key_value_heads, 1)
    return config, layer_types
