"""One KV-cache group per layer, so that each layer of a compacted request frees its own
blocks.

vLLM allocates the blocks of every layer in a KV-cache group together: a block id holds
a token's KV in each layer of the group.  A policy whose layers keep different budgets
(``"layer_budgets"``, CAKE) can then free only down to its largest layer budget.  Given
one spec per layer that no other layer's spec merges with, vLLM makes a group per layer
(its hybrid allocator: one block pool shared by the groups, a manager and a block table
per group, one block of one layer per block id), and the scheduler frees each layer's
blocks before that layer's kept region.  The worker writes and reads each layer through
the block table of its own group, as it does with one group.
"""

from __future__ import annotations

import dataclasses
import functools

from vllm.v1.kv_cache_interface import FullAttentionSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerKVSpec(FullAttentionSpec):
    """A full-attention layer's spec that makes a KV-cache group of its own."""

    layer: int

    @classmethod
    def merge(cls, specs):
        if len({spec.layer for spec in specs}) > 1:   # vLLM's sign of specs that differ
            raise AssertionError("kvplug: each layer is a KV-cache group of its own")
        return specs[0]

    def is_uniform_with_collection(self, specs) -> bool:
        return False


@functools.cache
def register_layer_spec() -> None:
    """Register :class:`LayerKVSpec` with vLLM's full-attention manager.  vLLM registers its
    built-in specs only into an empty registry, so they are registered first."""
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(LayerKVSpec, FullAttentionManager, FullAttentionSpec)


def layer_specs(specs: dict) -> dict:
    """Each full-attention layer's spec as a :class:`LayerKVSpec` of its layer index."""
    from vllm.model_executor.models.utils import extract_layer_index

    register_layer_spec()
    out = {}
    for name, spec in specs.items():
        if type(spec) is not FullAttentionSpec:
            raise ValueError(f"kvplug: one KV-cache group per layer needs full-attention "
                             f"layers; layer {name} has {type(spec).__name__} (set the kvplug "
                             "config's layer_groups to false)")
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
        out[name] = LayerKVSpec(**fields, layer=extract_layer_index(name))
    return out


def patch_kv_cache_spec() -> None:
    """Wrap the runner's ``get_kv_cache_spec``: an engine whose policies keep per-layer
    budgets (:attr:`WorkerPolicy.layer_groups`) gets a KV-cache group per layer."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from kvplug.integrations.vllm.lifecycle import worker_policy
    from kvplug.integrations.vllm.selection import uses_kvplug

    get_kv_cache_spec = GPUModelRunner.get_kv_cache_spec
    if getattr(get_kv_cache_spec, "_kvplug_wrapped", False):
        return

    @functools.wraps(get_kv_cache_spec)
    def _get_kv_cache_spec(self):
        specs = get_kv_cache_spec(self)
        if uses_kvplug(self.vllm_config) and worker_policy(self.vllm_config).layer_groups:
            return layer_specs(specs)
        return specs

    _get_kv_cache_spec._kvplug_wrapped = True
    GPUModelRunner.get_kv_cache_spec = _get_kv_cache_spec


def group_layers(kv_cache_manager) -> list[int | None]:
    """Per KV-cache group of a scheduler's manager, the layer it stores where each layer is
    a group of its own (else None)."""
    groups = kv_cache_manager.coordinator.kv_cache_config.kv_cache_groups
    return [group.kv_cache_spec.layer if isinstance(group.kv_cache_spec, LayerKVSpec)
            else None for group in groups]
