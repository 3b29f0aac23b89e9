"""Keeping less in vLLM: a compressed request gives its blocks back to the pool.

When a request's prefill ends (the step whose chunk reaches its last token),
every layer scores the context (the policy's ``prefill_scores``), the policy
plans what each layer keeps of the span ``[0, span)`` (``span``: the prompt's
whole blocks; the partial last block stays in place and decode writes after it),
and the kept tokens are written into the span's *last* ``kept_blocks`` blocks.
The blocks before them are then freed: vLLM's own sliding-window mechanism
(``remove_skipped_blocks``) puts the null block in their place, so the request's
block list keeps its logical length, new tokens are written at their true
positions, and attention reads the request from block ``first_block`` on.

Both sides derive the layout from the same numbers (the policy, the block size
and the context length when the prefill run starts), so nothing travels from the
worker to the scheduler (but, where each layer is a KV-cache group of its own,
:mod:`.layer_groups`, the blocks each layer keeps, which its scores decide):

* the scheduler (:class:`BlockReclaimer`) frees ``[0, first_block)`` once the
  prefill is committed, caps the request's prefix-cache hits at ``first_block``
  and publishes only those blocks to the prefix cache: they are freed with their
  content intact (compaction only reads them), while the blocks at and after
  ``first_block`` are rewritten, so no other request may share them;
* the worker (:class:`CompactionStep`) scores and moves the KV during the step that
  ends the prefill, after that step's attention, and shifts the reads of later
  steps by ``first_block``.

Policies that also compress at decode (``"decode_compress"``) re-compact block by
block: each time a decode step fills a block past the kept region, every layer
keeps what ``decode_keep`` names of its region and that block, written into the
region's blocks moved one block on (ending at the block that receives the next
token), and the scheduler frees the block before them.  The layout stays a function
of the same numbers and of the request's token count
(:meth:`CompactionLayout.first_block_at`), so both sides still derive it alone; a
request then holds its kept region and one partial block however long it decodes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvplug.policies import CompressionPolicy, LayerScores, Policy


@dataclass(frozen=True)
class CompactionLayout:
    """Where a compressed request's KV lives after its prefill of ``context`` tokens."""

    context: int
    block_size: int
    kept_blocks: int   # full blocks of kept span tokens, just before the tail block
    span_budget: int   # span tokens a layer keeps on average (the rest of the budget is the tail)
    recompacts: bool = False  # decode_compress: the kept region moves on as blocks fill

    @property
    def tail_block(self) -> int:
        """Block index of the prompt's partial last block (or of the next one)."""
        return self.context // self.block_size

    @property
    def span(self) -> int:
        return self.tail_block * self.block_size

    @property
    def first_block(self) -> int:
        """The first block attention reads after the prefill; the ones before are freed."""
        return max(0, self.tail_block - self.kept_blocks)

    def first_block_at(self, tokens: int, kept_blocks: int | None = None) -> int:
        """The first block a layer keeping ``kept_blocks`` blocks (default: the region) reads
        once ``tokens >= context`` tokens are computed.  A re-compacting layout's region ends
        at the block that receives the next token, so it moves on one block each time a
        block fills."""
        kept = self.kept_blocks if kept_blocks is None else kept_blocks
        tail = tokens // self.block_size if self.recompacts else self.tail_block
        return max(0, tail - kept)

    def recompacts_in(self, computed: int, new: int) -> bool:
        """Whether the step that takes the request from ``computed`` to ``computed + new``
        tokens (a decode step, after the prefill) moves its region on."""
        return (self.recompacts and computed >= self.context
                and self.first_block_at(computed + new) > self.first_block_at(computed))

    def layer_blocks(self, budget: int) -> int:
        """Blocks a layer keeping ``budget`` span tokens fills: rounded up (the next best
        tokens fill the last one), at most the kept region."""
        return min(self.kept_blocks, -(-budget // self.block_size))


def compaction_layout(policy: CompressionPolicy, context: int,
                      block_size: int) -> CompactionLayout:
    """The layout of a ``context``-token prefill: the budget less the tail block's tokens is
    what a layer keeps of the span on average; the kept region is the largest layer budget
    the policy may give, in whole blocks (rounded up; with ``uneven_heads``, room for each
    kv-head's pairs in whole cells, :class:`HeadCells`), and at least the observation
    window's part inside the span."""
    span_blocks = context // block_size
    tail = context - span_blocks * block_size
    span_budget = max(policy.token_budget(context) - tail, 0)
    keep = policy.largest_layer_budget(span_budget, span_blocks * block_size)
    if policy.uneven_heads:           # each kv-head's pairs rounded up to whole cells
        keep += block_size - 1
    keep = max(keep, min(policy.observation_window, context) - tail)
    kept_blocks = min(span_blocks, -(-keep // block_size))
    recompacts = "decode_compress" in policy.stages
    if recompacts and kept_blocks == span_blocks:   # the prompt fits: decode fills the budget
        kept_blocks = max(span_blocks, -(-policy.kept_budget(context) // block_size))
    return CompactionLayout(context, block_size, kept_blocks, span_budget, recompacts)


class BlockReclaimer:
    """Scheduler side: which blocks of each compressed request are freed, shared, cached.

    A request's layout is fixed when its prefill run starts (no token computed yet:
    a new request, or a preempted one that is recomputed), by the policy the engine
    runs then (``policy_now``: an engine may switch between its configured policies
    while no request runs), and dropped when vLLM frees the request.

    Where each layer is a KV-cache group of its own (:mod:`.layer_groups`), each layer's
    manager frees the blocks before that layer's own kept blocks, which ``layer_kept``
    (request id -> blocks per layer, or None while every layer keeps the region) reads
    from the worker once it compacted the request; until then, the region's.
    """

    def __init__(self, policy_now: Callable[[], Policy], block_size: int,
                 layer_kept: Callable[[str], tuple[int, ...] | None] | None = None) -> None:
        self.policy_now = policy_now
        self.block_size = block_size
        self.layer_kept = layer_kept
        self.layouts: dict[str, CompactionLayout] = {}

    def start(self, request) -> CompactionLayout | None:
        layout = self.layouts.get(request.request_id)
        if layout is None and request.num_computed_tokens == 0:
            policy = self.policy_now()
            if "prefill_compress" in policy.stages:
                layout = self.layouts[request.request_id] = compaction_layout(
                    policy, request.num_tokens, self.block_size)
        return layout

    def shareable_tokens(self, request_id: str) -> int | None:
        """Tokens of the request that may be read from or published to the prefix cache:
        those of the blocks compaction frees without writing; None: no limit."""
        layout = self.layouts.get(request_id)
        return None if layout is None else layout.first_block * self.block_size

    def freed_blocks(self, request_id: str, committed_tokens: int,
                     layer: int | None = None) -> int:
        """Blocks ``[0, n)`` to free once ``committed_tokens`` are computed and committed (of
        ``layer``'s KV-cache group where each layer is one; None: the groups of every layer)."""
        layout = self.layouts.get(request_id)
        if layout is None or committed_tokens < layout.context:
            return 0
        kept = None if layer is None or self.layer_kept is None else self.layer_kept(request_id)
        return layout.first_block_at(committed_tokens, None if kept is None else kept[layer])

    def drop(self, request_id: str) -> None:
        self.layouts.pop(request_id, None)


def patch_kv_cache_manager() -> None:
    """Route vLLM's KV cache manager through the scheduler's :class:`BlockReclaimer`
    (``_kvplug_reclaimer``, set by :func:`attach_reclaimer`); without one every patched
    method is vLLM's own."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    if getattr(KVCacheManager.allocate_slots, "_kvplug_wrapped", False):
        return
    get_computed_blocks = KVCacheManager.get_computed_blocks
    allocate_slots = KVCacheManager.allocate_slots
    free = KVCacheManager.free
    remove_skipped_blocks = FullAttentionManager.remove_skipped_blocks
    cache_blocks = FullAttentionManager.cache_blocks

    @functools.wraps(get_computed_blocks)
    def _get_computed_blocks(self, request):
        blocks, hit, boundary = get_computed_blocks(self, request)
        reclaimer = getattr(self, "_kvplug_reclaimer", None)
        if reclaimer is None or reclaimer.start(request) is None:
            return blocks, hit, boundary
        shareable = reclaimer.shareable_tokens(request.request_id)
        if hit > shareable:
            keep = shareable // reclaimer.block_size
            blocks = self.create_kv_cache_blocks(tuple(group[:keep] for group in blocks.blocks))
            hit = shareable
        return blocks, hit, boundary

    @functools.wraps(allocate_slots)
    def _allocate_slots(self, request, *args, **kwargs):
        reclaimer = getattr(self, "_kvplug_reclaimer", None)
        if reclaimer is not None:
            reclaimer.start(request)
        return allocate_slots(self, request, *args, **kwargs)

    @functools.wraps(free)
    def _free(self, request):
        free(self, request)
        reclaimer = getattr(self, "_kvplug_reclaimer", None)
        if reclaimer is not None:
            reclaimer.drop(request.request_id)

    @functools.wraps(remove_skipped_blocks)
    def _remove_skipped_blocks(self, request_id, processed_computed_tokens,
                               num_prompt_tokens=None):
        reclaimer = getattr(self, "_kvplug_reclaimer", None)
        if reclaimer is None:
            return remove_skipped_blocks(self, request_id, processed_computed_tokens,
                                         num_prompt_tokens)
        self._remove_blocks_in_range(request_id, 0, reclaimer.freed_blocks(
            request_id, processed_computed_tokens, self._kvplug_layer))

    @functools.wraps(cache_blocks)
    def _cache_blocks(self, request, num_tokens, *args, **kwargs):
        reclaimer = getattr(self, "_kvplug_reclaimer", None)
        shareable = None if reclaimer is None else reclaimer.shareable_tokens(request.request_id)
        if shareable is not None:
            num_tokens = min(num_tokens, shareable)
        return cache_blocks(self, request, num_tokens, *args, **kwargs)

    _allocate_slots._kvplug_wrapped = True
    KVCacheManager.get_computed_blocks = _get_computed_blocks
    KVCacheManager.allocate_slots = _allocate_slots
    KVCacheManager.free = _free
    FullAttentionManager.remove_skipped_blocks = _remove_skipped_blocks
    FullAttentionManager.cache_blocks = _cache_blocks


def patch_scheduler() -> None:
    """Give the scheduler of an engine that may run a compressing policy a
    :class:`BlockReclaimer` that follows the worker's policy, and make it hold the requests
    whose replay the worker has pending (the scheduler and the worker share one process:
    engine-start checks refuse a switching or replaying compressing engine with more than
    one worker)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from kvplug.integrations.vllm.lifecycle import tracker, worker_policy
    from kvplug.integrations.vllm.selection import uses_kvplug

    init = Scheduler.__init__
    if getattr(init, "_kvplug_wrapped", False):
        return
    schedule = Scheduler.schedule

    @functools.wraps(init)
    def __init__(self, vllm_config, *args, **kwargs):
        init(self, vllm_config, *args, **kwargs)
        if uses_kvplug(vllm_config):
            worker = worker_policy(vllm_config)
            if any("prefill_compress" in p.stages for p in worker.policies):
                attach_reclaimer(self.kv_cache_manager, worker)

    @functools.wraps(schedule)
    def _schedule(self, *args, **kwargs):
        requests = tracker()
        if requests is None or not requests.replays:
            return schedule(self, *args, **kwargs)
        # out of this step: no token, no block allocated, freed or preempted; each still
        # takes one of the engine's request slots
        held = [r for r in self.running if r.request_id in requests.replays]
        self.running[:] = [r for r in self.running if r.request_id not in requests.replays]
        limits = (self.max_num_running_reqs, self.max_num_active_reqs,
                  self.max_num_scheduled_tokens)
        self.max_num_running_reqs -= len(held)
        self.max_num_active_reqs -= len(held)
        # the step's replay chunk takes its share of the token budget (a token each for
        # the running requests is always left)
        self.max_num_scheduled_tokens = max(
            self.max_num_scheduled_tokens - requests.next_replay_tokens(), len(self.running))
        try:
            return schedule(self, *args, **kwargs)
        finally:
            self.running[:0] = held
            (self.max_num_running_reqs, self.max_num_active_reqs,
             self.max_num_scheduled_tokens) = limits

    __init__._kvplug_wrapped = True
    Scheduler.__init__ = __init__
    Scheduler.schedule = _schedule


def attach_reclaimer(kv_cache_manager, worker) -> BlockReclaimer:
    """Give a scheduler's KV cache manager (and each of its full-attention managers) a
    reclaimer that follows ``worker`` (its :class:`WorkerPolicy`); refuse layer kinds whose
    blocks kvplug cannot reclaim."""
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    from kvplug.integrations.vllm.layer_groups import group_layers

    managers = kv_cache_manager.coordinator.single_type_managers
    others = sorted({type(m).__name__ for m in managers if type(m) is not FullAttentionManager})
    if others:
        name = next(p.name for p in worker.policies if "prefill_compress" in p.stages)
        raise ValueError(f"kvplug policy {name!r} frees KV blocks of full-attention "
                         f"layers only; this model also has {others}")
    layers = group_layers(kv_cache_manager)
    reclaimer = BlockReclaimer(lambda: worker.next_policy, managers[0].block_size,
                               layer_kept_blocks if any(l is not None for l in layers) else None)
    kv_cache_manager._kvplug_reclaimer = reclaimer
    for manager, layer in zip(managers, layers):
        manager._kvplug_reclaimer = reclaimer
        manager._kvplug_layer = layer
    return reclaimer


def layer_kept_blocks(request_id: str) -> tuple[int, ...] | None:
    """The blocks each layer of a compacted request keeps, read from the worker's tracker
    (this process's); None while every layer keeps the region (not compacted yet, or its
    layers keep alike)."""
    from kvplug.integrations.vllm.lifecycle import tracker

    requests = tracker()
    record = None if requests is None else requests.compactions.get(request_id)
    return None if record is None else record.layer_kept_blocks


# -- worker side ----------------------------------------------------------------------

@dataclass(frozen=True)
class HeadCells:
    """A compacted request whose kv-heads keep uneven numbers of pairs (``uneven_heads``):
    a layer's kept region of ``blocks`` blocks is ``blocks * H_kv`` cells (a block of one
    kv-head, ``block_size`` slots), and each kv-head of each layer holds
    ``cells[layer, head]`` of them, the heads one after another from the region's first
    cell on; ``ids`` are those cells in the cache viewed as cells (block ``* H_kv +``
    kv-head slot), fixed while the request runs.  A region then holds a layer's pairs
    summed over its heads, not ``H_kv`` times its widest head's."""

    blocks: int
    cells: torch.Tensor    # [L, H_kv] int64
    ids: torch.Tensor      # [L, H_kv, most cells] int64, past a head's cells: padding


def cell_tables(rows: list[HeadCells | None], block_table: torch.Tensor,
                seq_lens: torch.Tensor, block_size: int, num_layers: int,
                num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, what each (decode row, kv-head) reads over the cache viewed as cells
    (``[num_blocks * H_kv, 1, block, 2·D]``): its own cells of the row's kept region, then
    its cell of every block after it (the tail block and decode's); rows without
    ``HeadCells`` read every block of theirs.  ``block_table``/``seq_lens``: the rows'
    reads from their region's first block on.  Returns ``table`` ``[L, R·H_kv, W]`` and
    ``lens`` ``[L, R·H_kv]`` (int32), a row's heads consecutive."""
    heads = torch.arange(num_kv_heads)
    tables, lens = [], []
    for row, kept in enumerate(rows):
        if kept is None:                       # not compacted: no cells, every block after
            region, cells = 0, torch.zeros(num_layers, num_kv_heads, dtype=torch.long)
            ids = cells[..., None][..., :0]
        else:
            region, cells, ids = kept.blocks, kept.cells, kept.ids
        seq_len = int(seq_lens[row])
        tail = block_table[row, region:-(-seq_len // block_size)].long()
        slot = torch.arange(ids.shape[-1] + tail.shape[0])
        after = tail[(slot - cells[..., None]).clamp(0, tail.shape[0] - 1)] * num_kv_heads \
            + heads[:, None]
        own = torch.nn.functional.pad(ids, (0, tail.shape[0]))
        tables.append(torch.where(slot < cells[..., None], own, after))
        lens.append(cells * block_size + seq_len - region * block_size)
    width = max(t.shape[-1] for t in tables)
    table = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in tables],
                      dim=1)
    return table.to(torch.int32), torch.cat(lens, dim=1).to(torch.int32)


@dataclass
class RequestCompaction:
    """Worker-side compaction record of one request's prefill run."""

    layout: CompactionLayout | None = None                       # set when its prefill ends
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> last queries
    # the blocks each layer keeps once compacted, where layers keep different numbers of
    # blocks (else every layer keeps layout.kept_blocks)
    layer_kept_blocks: tuple[int, ...] | None = None
    head_cells: HeadCells | None = None    # where its kv-heads keep uneven numbers of cells

    def kept_blocks(self, layer_idx: int) -> int:
        """Blocks of kept tokens layer ``layer_idx`` holds before the tail block."""
        if self.layer_kept_blocks is None:
            return self.layout.kept_blocks
        return self.layer_kept_blocks[layer_idx]

    def layer_first_blocks(self, tokens: int) -> tuple[int, ...] | None:
        """The first block each layer reads once ``tokens`` are computed, where layers keep
        different numbers of blocks; None: each reads from the region's first block."""
        if self.layer_kept_blocks is None:
            return None
        return tuple(self.layout.first_block_at(tokens, kept) for kept in self.layer_kept_blocks)


@dataclass
class CompactionStep:
    """This step's prefill rows of a compressing policy: ``ending`` (row, record) pairs
    end their prefill here and are scored layer by layer, then compacted after the
    step's last layer (a policy may budget layers by every layer's scores);
    ``continuing`` ones keep their chunk's last queries for the ending chunk;
    ``recompacting`` (row, record, tokens computed before the step) decode a token that
    fills a block past their region, and each layer re-compacts after its attention."""

    ending: tuple[tuple[int, RequestCompaction], ...]
    continuing: tuple[tuple[int, RequestCompaction], ...]
    recompacting: tuple[tuple[int, RequestCompaction, int], ...] = ()
    scores: dict[int, list[LayerScores]] = field(default_factory=dict)  # row -> per layer
    # replay policies: (row, record, block table, isa) of the ending rows, scored by the
    # replay forwards that run after the step's own (.replay.run_replays)
    replays: list[tuple] = field(default_factory=list)
    caches: dict[int, torch.Tensor] = field(default_factory=dict)        # layer -> its cache
    tables: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its block table
    log_counts: dict[int, torch.Tensor] = field(default_factory=dict)    # layer -> its counts


def gather_kept(plan, keys: torch.Tensor, values: torch.Tensor):
    """The ``[n, H_kv, D]`` keys and values a :class:`KeepPlan` stores of the context's
    ``keys``/``values`` ``[N, H_kv, D]`` (its merged ones where it has them), and the
    ``[n, H_kv]`` log of the tokens each slot stands for (None: one each)."""
    index = plan.indices.t()                                       # [n, H_kv]
    heads = torch.arange(keys.shape[1])
    kept_keys = keys[index, heads] if plan.keys is None else plan.keys.transpose(0, 1)
    kept_values = values[index, heads] if plan.values is None else plan.values.transpose(0, 1)
    log_counts = None if plan.counts is None else plan.counts.t().float().log()
    return kept_keys.to(keys.dtype), kept_values.to(values.dtype), log_counts
