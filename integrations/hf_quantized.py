"""HF transformers cache for a policy keeping the ``quantized`` store (ZipCache).

transformers hands an attention function only what its cache's ``update`` returns, so
the saving lives in the cache: :class:`QuantizedCache` (one :class:`QuantizedLayer` per
layer) is what ``generate`` builds for such a policy.

* The prompt comes in one forward.  Each layer stores it densely, attends to it with
  transformers' SDPA (prefill attention runs on the exact K/V), then the policy scores it
  from its probe queries and the layer keeps it as a quantized segment
  (:func:`~kvplug.policies.quantized_store.quantize_segment`); the dense prompt is
  dropped before the next layer runs.
* Each decode step appends its token exactly and reads the segments through the packed
  decode (:func:`~kvplug.policies.quantized_store.decode`: the fused Triton kernel on
  CUDA, its torch reference on CPU) merged with the exact tokens.  Once
  ``policy.streaming_gap`` exact tokens have accumulated, the step's query scores them
  and they become a new segment.

Positions are those of the sequence: ``get_seq_length`` counts quantized and exact
tokens alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import Cache

from kvplug.integrations.hf_cache import FixedPastLayer, full_attention_layers
from kvplug.policies import Policy
from kvplug.policies.quantized_store import Segment, decode, quantize_segment

# attribute of the key tensor a QuantizedCache returns: the cache, for the attention function
_CACHE_TAG = "_kvplug_quantized_cache"


class QuantizedLayer(FixedPastLayer):
    """One layer's cache: quantized segments, then the exact tokens not yet quantized
    (``keys``/``values``).  Cache edits that would have to re-quantize (cropping, beam
    reordering, batch repeats) are refused."""

    keeps = "quantized store"
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.segments: list[Segment] = []
        self.quantized_len = 0   # tokens held by the segments

    @property
    def prompt_quantized(self) -> bool:
        return bool(self.segments)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if self.is_initialized and not self.prompt_quantized:
            raise RuntimeError("kvplug quantized store: a layer's prompt was never quantized (its "
                               "attention did not run kvplug's quantized path); run the model "
                               "with attn_implementation='kvplug' and the cache's policy attached")
        if self.prompt_quantized and key_states.shape[-2] != 1:
            raise ValueError(f"kvplug's quantized store (HF path) quantizes the prompt at its "
                             f"prefill, so the prompt must come in one forward and each later "
                             f"forward add one token; got {key_states.shape[-2]} new tokens after "
                             f"{self.get_seq_length()} cached ones")
        return super().update(key_states, value_states, *args, **kwargs)

    def quantize_prompt(self, policy: Policy, layer_idx: int, query: Tensor,
                        scale: float) -> None:
        """Score the prompt held densely by ``query`` ``[B, H_q, N, D]`` (its post-RoPE
        queries) and keep it as one segment."""
        N = self.keys.shape[2]
        positions = policy.probe_positions(N, layer_idx)
        probes = query[:, :, positions.to(query.device)].transpose(1, 2)   # [B, P, H_q, D]
        saliency = [policy.prefill_saliency(q, positions, k, scale)
                    for q, k in zip(probes, self.keys.transpose(1, 2))]
        self._quantize(policy, torch.stack(saliency))

    def decode_step(self, policy: Policy, query: Tensor, scale: float) -> Tensor:
        """One decode step's attention of ``query`` ``[B, H_q, D]`` over the segments and the
        exact tokens (the current one included) -> ``[B, H_q, D]`` in ``query.dtype``.  Once
        ``policy.streaming_gap`` exact tokens are held, this step's query scores them (its
        softmax over the whole context) and they become a segment."""
        out, lse = decode(self.segments, query, self.keys, self.values, scale)
        if self.keys.shape[2] >= policy.streaming_gap:
            self._quantize(policy, policy.stream_saliency(query, self.keys, lse, scale))
        return out.to(query.dtype)

    def _quantize(self, policy: Policy, saliency: Tensor) -> None:
        segment = quantize_segment(policy, self.keys, self.values, saliency)
        self.segments.append(segment)
        self.quantized_len += segment.length
        self.keys, self.values = self.keys[:, :, :0], self.values[:, :, :0]

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.quantized_len + self.keys.shape[-2]

    def stored_bytes(self) -> int:
        """Bytes this layer keeps: packed segments (parameters included) and exact tokens."""
        exact = 0 if not self.is_initialized else sum(t.numel() * t.element_size()
                                                      for t in (self.keys, self.values))
        return sum(segment.nbytes() for segment in self.segments) + exact

    def reset(self) -> None:
        super().reset()
        self.segments, self.quantized_len = [], 0


class QuantizedCache(DynamicCache):
    """``past_key_values`` for ``generate`` with a policy keeping the ``quantized`` store."""

    def __init__(self, policy: Policy, config: Any):
        _, layer_types = full_attention_layers(policy, config, "quantizes")
        Cache.__init__(self, layers=[QuantizedLayer() for _ in layer_types])
        self.policy = policy

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        setattr(keys, _CACHE_TAG, self)
        return keys, values

    def stored_bytes(self) -> dict[str, int]:
        """Bytes kept on the model's device (none in host memory), summed over layers."""
        return {"device": sum(layer.stored_bytes() for layer in self.layers), "host": 0}


def cache_of(key: Tensor) -> QuantizedCache | None:
    """The :class:`QuantizedCache` that returned ``key``, if one did."""
    return getattr(key, _CACHE_TAG, None)
