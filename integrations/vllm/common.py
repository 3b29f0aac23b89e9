"""What the CPU and CUDA kvplug backends share: identity, the layer kinds
they accept, binding batch rows to requests, the decode rows of a step, and
the key summaries a layer keeps beside its cache for the selection policies."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from kvplug.integrations.vllm.block_summaries import BlockSummaries, layer_summary_specs
from kvplug.integrations.vllm.lifecycle import Step, WorkerPolicy, tracker
from kvplug.integrations.vllm.selection import BACKEND_NAME
from kvplug.policies import Selection, StepContext, SummarySpec


class KVPlugBackendMixin:
    """Put first in the bases of a backend that wraps one of vLLM's.

    ``get_name`` must be ``KVPLUG``: ``Attention.__init__`` looks the backend
    up again by that name.  Layer kinds kvplug does not run are refused here,
    so vLLM's ``validate_configuration`` names them instead of kvplug running
    them wrongly.
    """

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        from vllm.v1.attention.backend import AttentionType

        return attn_type == AttentionType.DECODER


def current_rows(num_reqs: int) -> Step | None:
    """The step's rows for a builder, or None outside a real step (dummy runs)."""
    t = tracker()
    step = None if t is None else t.current
    if step is not None and len(step.req_ids) != num_reqs:
        raise RuntimeError(f"kvplug: attention metadata has {num_reqs} rows but the step "
                           f"scheduled {len(step.req_ids)} requests {step.req_ids}")
    return step


def with_rows(metadata_cls, metadata, num_reqs: int):
    """Re-make vLLM's metadata as ``metadata_cls`` carrying the step's rows."""
    step = current_rows(num_reqs)
    fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)
              if f.init}
    return metadata_cls(**fields, rows=step)


def decode_rows(common) -> int:
    """How many leading rows of the step decode one token (the builders ask vLLM to put
    decode rows first, ``reorder_batch_threshold = 1``)."""
    starts = common.query_start_loc_cpu
    is_decode = ((starts[1:] - starts[:-1]) == 1).tolist() + [False]
    return is_decode.index(False)


def step_context(policy, seq_lens: torch.Tensor, block_size: int,
                 num_layers: int) -> StepContext:
    """A decode step's context: a selection policy's plan for the step (once, before any
    layer); a merging one reads every slot."""
    if "select" in policy.stages:
        return policy.step_context(seq_lens, block_size, num_layers)
    return StepContext(block_size, num_layers)


class LayerSummaries:
    """Impl mixin: one layer's key summaries for the worker's policies, kept beside its
    cache and updated in the KV write; and the policy's selection from them.

    Both vLLM caches are ``[num_blocks, H_kv, block, 2·D]`` as the impl sees them, so
    summaries are sized from that shape.  ``row_keys``: whether token-granular reads need
    a row-major copy of the keys (vLLM-cpu stores K transposed; CUDA reads it in place).
    """

    row_keys: ClassVar[bool]
    worker: WorkerPolicy

    def _init_summaries(self, worker: WorkerPolicy) -> None:
        self.worker = worker
        self.layer_idx: int | None = None
        # one store per summary kind any of the worker's policies reads at this layer
        self.summaries: dict[SummarySpec, BlockSummaries] = {}
        self._bound_cache_shape: torch.Size | None = None

    def _bind(self, layer, kv_cache: torch.Tensor) -> bool:
        """Learn the layer index and size the summaries like the cache, once per cache;
        True when it (re)bound."""
        from vllm.model_executor.models.utils import extract_layer_index

        if kv_cache.shape == self._bound_cache_shape:
            return False
        self._bound_cache_shape = kv_cache.shape
        self.layer_idx = extract_layer_index(layer.layer_name)
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        self.summaries = {
            spec: BlockSummaries(spec, num_blocks, block_size, num_kv_heads, self.head_size,
                                 kv_cache.dtype, device=kv_cache.device)
            for spec in layer_summary_specs(self.worker.policies, self.layer_idx, block_size,
                                            row_keys=self.row_keys)}
        return True

    def _keep_summaries(self, layer, key: torch.Tensor, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
        """Fold the keys just written into every summary of this layer."""
        self._bind(layer, kv_cache)
        for store in self.summaries.values():
            store.update(key, slot_mapping)

    def _select(self, policy, query: torch.Tensor, seq_lens: torch.Tensor,
                block_table: torch.Tensor, ctx: StepContext,
                block_size: int) -> Selection | None:
        """What the decode rows (``query`` ``[B, H_q, D]``) read at this layer through
        ``policy`` (the worker's, or its draft policy in a draft forward); None: all."""
        spec = policy.summary_spec(self.layer_idx, block_size)
        summary = None if spec is None else self.summaries[spec].for_rows(block_table)
        return policy.select(self.layer_idx, query, summary, seq_lens, ctx)
