"""ShadowKV in HF transformers: the prompt kept the way ShadowKV keeps it.

transformers hands an attention function only what its cache's ``update``
returns, so ShadowKV's saving has to live in the cache: :class:`ShadowKVCache`
(one :class:`ShadowKVLayer` per layer) is what ``generate`` builds for a model
with the ``shadowkv`` policy attached.  At the prompt's forward each layer keeps

* the low-rank store of the prompt's pre-RoPE keys (``U`` ``[P, rank]`` and
  ``SV``), the chunks' landmarks and ``min_cos``, on the model's device;
* exact keys and values of the local window and the outlier chunks (those of
  the first decode step's budget, the largest any step has), on the device;
* the prompt's values in host memory (pinned when the model is on CUDA);

and drops the prompt's exact keys.  Generated tokens are kept exactly on the
device.  Each decode step attends to the window, the outliers and the
generated tokens exactly, and to the top chunks by landmark with keys rebuilt
as RoPE(``U[pos] @ SV``) and values copied from host memory: only those chunks
come back.  Unlike ShadowKV's CUDA engine, the copy is not overlapped with
compute and chunks already copied at the previous step are copied again.  The
store itself is engine-free (:mod:`kvplug.policies.lowrank_store`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import Cache

from kvplug.integrations.hf_cache import FixedPastLayer
from kvplug.kernels import rope_inv_freq
from kvplug.policies import ShadowKV
from kvplug.policies.lowrank_store import PromptStore, build_store

# attribute of the key tensor a ShadowKVLayer returns: the layer itself, for the attention function
_LAYER_TAG = "_kvplug_shadowkv_layer"


def rope_inv_freq_of(config: Any, head_dim: int) -> Tensor:
    """The model's RoPE frequencies; only plain (unscaled, full-width) RoPE can be undone here."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                  or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if (rope_type != "default" or not isinstance(theta, (int, float))
            or params.get("partial_rotary_factor", 1.0) != 1.0):
        raise ValueError(f"kvplug policy 'shadowkv' in the HF path stores pre-RoPE keys and "
                         f"supports plain RoPE only (rope_type 'default'); this model has "
                         f"{params or 'no rope_theta'}")
    return rope_inv_freq(head_dim, float(theta))


class ShadowKVLayer(FixedPastLayer):
    """One layer's cache: the prompt as a :class:`PromptStore`, generated tokens exact.

    The prompt must come in one forward (ShadowKV compresses it at prefill);
    later forwards add one token each.  Cache edits that would have to edit
    the store too (beam reordering, cropping, batch repeats) are refused.
    """

    keeps = "low-rank prompt store"

    is_croppable = False

    def __init__(self, policy: ShadowKV, config: Any):
        super().__init__()
        self.policy, self.config = policy, config
        self.store: PromptStore | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if self.store is None:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            inv_freq = rope_inv_freq_of(self.config, key_states.shape[-1]).to(key_states.device)
            self.store = build_store(key_states, value_states, self.policy, inv_freq)
            return key_states, value_states                      # dense prefill
        if key_states.shape[-2] != 1:
            raise ValueError(f"kvplug policy 'shadowkv' in the HF path compresses the prompt at "
                             f"its prefill, so the prompt must come in one forward; got "
                             f"{key_states.shape[-2]} new tokens after {self.get_seq_length()} "
                             f"cached ones")
        keys, values = super().update(key_states, value_states)
        setattr(keys, _LAYER_TAG, self)
        return keys, values

    def get_seq_length(self) -> int:
        return (0 if self.store is None else self.store.length) + super().get_seq_length()

    def reset(self) -> None:
        super().reset()
        self.store = None

    def stored_bytes(self) -> dict[str, int]:
        """Bytes this layer keeps on the model's device and in host memory."""
        if self.store is None:
            return {"device": 0, "host": 0}
        generated = [t for t in (self.keys, self.values) if t is not None]
        device = sum(t.numel() * t.element_size() for t in (*self.store.device_tensors(),
                                                             *generated))
        host = self.store.host_values
        return {"device": device, "host": host.numel() * host.element_size()}


class ShadowKVCache(DynamicCache):
    """``past_key_values`` for ``generate`` with the ``shadowkv`` policy (see module doc)."""

    def __init__(self, policy: ShadowKV, config: Any):
        config = config.get_text_config(decoder=True)
        policy.check_model(config.num_hidden_layers, config.num_key_value_heads, 1)
        Cache.__init__(self, layers=[ShadowKVLayer(policy, config)
                                     for _ in range(config.num_hidden_layers)])
        self.policy = policy

    def stored_bytes(self) -> dict[str, int]:
        """Bytes kept on the model's device and in host memory, summed over layers."""
        per_layer = [layer.stored_bytes() for layer in self.layers]
        return {kind: sum(b[kind] for b in per_layer) for kind in ("device", "host")}


def layer_of(key: Tensor) -> ShadowKVLayer | None:
    """The :class:`ShadowKVLayer` that returned ``key``, if one did."""
    return getattr(key, _LAYER_TAG, None)
