"""Which request each batch row belongs to, and per-request kvplug state.

vLLM's attention metadata carries no request ids.  The model runner's
``_update_states`` is where the batch is settled for a step: finished and
aborted requests are dropped (``finished_req_ids``), preempted ones
(``preempted_req_ids``) lose their KV, new and resumed ones join, and
``input_batch.req_ids`` then lists the rows in the order every attention
builder sees them.  We wrap it once per worker process and publish the rows
as the current :class:`Step`; the wrapper of ``execute_model`` closes the
step, so dummy/profiling runs see no step.

Per-request state is created when a request first appears in a batch (its
first prefill, also after a preemption) and dropped when it finishes, is
aborted or is preempted.

The worker's policy lives in one :class:`WorkerPolicy` shared by the tracker,
the builders and every layer.  It can be switched (RPC ``kvplug_set_policy``)
to one of the config's ``switch_to`` policies; the switch takes effect at the
start of the next step, once finished requests are dropped, and is refused if
a request is still running there.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import torch

from kvplug.config import KVPlugConfig, PolicyConfig, resolve_config
from kvplug.integrations.vllm.compaction import (CompactionStep, HeadCells,
                                                 RequestCompaction, compaction_layout)
from kvplug.integrations.vllm.quantized import (QuantizedRequest, QuantizedRow, new_record,
                                                plan_row)
from kvplug.integrations.vllm.selection import logger, uses_kvplug
from kvplug.policies import Policy, RequestState, SelectionPolicy


@dataclass(frozen=True)
class Step:
    """The rows of one engine step, in the builders' row order.

    With a compressing policy, ``read_from`` is the first KV block each row's
    attention reads (0: all; compacted requests freed the blocks before it) and
    ``compaction`` the rows whose prefill this step scores or ends, or whose kept region
    it moves on.
    """

    req_ids: tuple[str, ...]
    states: tuple[RequestState, ...]
    read_from: tuple[int, ...] | None = None
    compaction: CompactionStep | None = None
    # per row, the first block each layer reads, where its layers keep different numbers of
    # blocks (else None); None when no row's layers differ
    layer_read_from: tuple[tuple[int, ...] | None, ...] | None = None
    # per row, the cells its kv-heads keep, where they keep uneven numbers (else None);
    # None when no row's do
    head_cells: tuple[HeadCells | None, ...] | None = None
    # a self-speculation draft forward (reads through the config's draft policy)
    draft: bool = False
    # with the quantized store: what each row reads and packs (else None)
    quantized: tuple[QuantizedRow, ...] | None = None
    # self-speculation's verification: per token of the step, whether it is a draft under
    # verification, whose key enters the summaries only once accepted (else None)
    unverified: torch.Tensor | None = None

    def summary_slots(self, slot_mapping: torch.Tensor) -> torch.Tensor:
        """The slots whose keys enter the key summaries in this step's KV write: all
        but the drafts under verification (``-1``: skipped)."""
        if self.unverified is None:
            return slot_mapping
        slots = slot_mapping.clone()
        slots[:self.unverified.shape[0]].masked_fill_(self.unverified, -1)
        return slots


def evicts_by_layer(policy: Policy) -> bool:
    """Whether a policy only evicts, by budgets that differ per layer (CAKE): what a KV-cache
    group per layer frees by each layer's budget (no selection, replay, merged or packed
    store, or kv-heads in cells of their own)."""
    return ("layer_budgets" in policy.stages and policy.store == "evicted"
            and not policy.uneven_heads and not policy.stages & {"select", "replay"})


class WorkerPolicy:
    """The policy a worker runs now, and the ones it may be switched to.

    Every policy of the config is built and bound to the model up front, so
    a switch cannot fail half-way and every layer keeps the key summaries of
    all of them (:attr:`policies`).
    """

    def __init__(self, config: KVPlugConfig, num_layers: int, num_kv_heads: int,
                 unit: int, workers: int = 1) -> None:
        self.config = config
        self.num_layers = num_layers
        self.choices: list[tuple[PolicyConfig, Policy]] = []
        for choice in config.policy_configs():
            policy = choice.build_policy()
            policy.check_model(num_layers, num_kv_heads, unit)
            self.choices.append((choice, policy))
        self.active, self.policy = self.choices[0]
        self.pending: tuple[PolicyConfig, Policy] | None = None
        # the policy draft forwards read through (self-speculation), else None
        self.draft: Policy | None = None
        if config.draft is not None:
            self.draft = config.draft.build_policy()
            self.draft.check_model(num_layers, num_kv_heads, unit)
        # the store policy the KV is kept by, under the reading policy (config 'store')
        self.store: Policy | None = None
        if config.store is not None:
            self.store = config.store.build_policy()
            self.store.check_model(num_layers, num_kv_heads, unit)
        # the quantized store's pages are sized at engine start: one policy keeps them
        packed = [p for p in [*self.policies, self.store] if p is not None
                  and p.store == "quantized"]
        if packed and len(self.policies) > 1:
            raise ValueError(f"kvplug policy {packed[0].name!r} keeps the KV pool in packed "
                             "pages whose size is fixed at engine start; it cannot be switched "
                             "to or from, nor draft: leave switch_to and draft empty")
        # the policy whose hooks write the packed pool (the store, or the policy itself)
        self.packer: Policy | None = packed[0] if packed else None
        self.quantized = self.packer is not None
        for p in self.policies if self.quantized else ():
            chunks = {p.read_chunk(layer, unit) or unit for layer in range(num_layers)
                      if isinstance(p, SelectionPolicy)}
            if any(chunk < unit for chunk in chunks):
                raise ValueError(f"kvplug policy {p.name!r} reads {min(chunks)}-token chunks; "
                                 f"over the packed pool of {self.packer.name!r} a selection "
                                 f"reads whole {unit}-token pages: make its chunk a multiple "
                                 f"of the KV block size {unit}")
        self.any_selection = any(isinstance(p, SelectionPolicy) for p in self.policies)
        # kvplug reads decode rows apart for merged slots (weighed by their counts) and for
        # kv-heads that keep uneven numbers of pairs (each in its own cells)
        self.merged = any(p.store == "merged" for _, p in self.choices)
        self.head_cells = any(p.uneven_heads for _, p in self.choices)
        # each layer a KV-cache group of its own, freeing its own blocks (.layer_groups);
        # the scheduler reads each layer's kept blocks from this process's tracker
        self.layer_groups = (config.layer_groups and workers == 1 and self.store is None
                             and all(map(evicts_by_layer, self.policies)))

    @property
    def next_policy(self) -> Policy:
        """The policy the next step runs: a queued switch, else the active one (the
        scheduler plans a new request's blocks before the worker applies the switch)."""
        return (self.pending or (self.active, self.policy))[1]

    @property
    def policies(self) -> list[Policy]:
        """Every policy this worker may switch to or draft with (each layer keeps all their
        summaries)."""
        return [p for _, p in self.choices] + ([] if self.draft is None else [self.draft])

    def policy_for(self, step: Step | None) -> Policy:
        """The policy a step's forward reads through: the draft policy in draft forwards."""
        return self.draft if step is not None and step.draft else self.policy

    def request_switch(self, data: dict, running: int) -> None:
        """Validate and queue a switch to a configured policy (applied by :meth:`apply`).

        ``running`` is the requests holding state now.  The RPC runs between engine
        steps, so refusing here (not in the next step's :meth:`apply`, where an error
        would fail the step) closes the gap between a caller's idle check and the
        switch, in which a request may have started."""
        if running:
            raise RuntimeError(f"kvplug: a policy switch needs an idle engine; {running} "
                               "requests hold kvplug state")
        wanted = PolicyConfig.parse(data, "kvplug set_policy").build_policy()
        match = next((c for c in self.choices if c[1] == wanted), None)
        if match is None:
            raise ValueError(f"kvplug: policy config {data} is not one this engine keeps "
                             f"summaries for; valid choices (the config's policy and "
                             f"switch_to): {[c.as_dict() for c, _ in self.choices]}")
        self.pending = match

    def apply(self, running: int) -> None:
        if self.pending is None:
            return
        if running:
            raise RuntimeError(f"kvplug: cannot switch policy to {self.pending[0].as_dict()} "
                               f"while {running} requests are running")
        (self.active, self.policy), self.pending = self.pending, None
        logger.info("kvplug: switched to policy %s", self.active.as_dict())


@dataclass
class DraftStats:
    """Self-speculation of one request, per tier: ``draft`` (drafts verified, accepted)
    and ``first_tier`` (guesses the draft checked, kept), as ``[proposed, accepted]``."""

    tiers: dict[str, list[int]] = field(default_factory=dict)

    def record(self, tier: str, proposed: int, accepted: int) -> None:
        counts = self.tiers.setdefault(tier, [0, 0])
        counts[0] += proposed
        counts[1] += accepted

    def as_dict(self) -> dict[str, float]:
        return {key: value for tier, (proposed, accepted) in self.tiers.items()
                for key, value in ((f"{tier}_proposed", proposed),
                                   (f"{tier}_accepted", accepted),
                                   (f"{tier}_acceptance", round(accepted / max(proposed, 1), 3)))}


class RequestTracker:
    """Per-request policy state of one worker process."""

    def __init__(self, worker: WorkerPolicy, kv_bytes_per_token: int, block_size: int) -> None:
        self.config = worker.config
        self.worker = worker
        self.kv_bytes_per_token = kv_bytes_per_token
        self.block_size = block_size
        self.states: dict[str, RequestState] = {}
        self.compactions: dict[str, RequestCompaction] = {}  # requests of compressing policies
        self.drafts: dict[str, DraftStats] = {}  # requests that had drafts verified
        self.quantized: dict[str, QuantizedRequest] = {}  # requests of the quantized store
        # requests whose replay is pending, oldest first (.replay.PendingReplay); the
        # scheduler leaves them out of its steps until their replay is done
        self.replays: dict[str, object] = {}
        self.counts: Counter[str] = Counter()  # created / finished / preempted / resumed
        self.steps = 0
        self.current: Step | None = None

    def live(self) -> int:
        return len(self.states)

    def next_replay_tokens(self) -> int:
        """Tokens of the replay chunk the next step runs (0: none is pending)."""
        if not self.replays:
            return 0
        return next(iter(self.replays.values())).chunks[0].input_ids.shape[1]

    def drop(self, req_id: str, why: str) -> None:
        self.compactions.pop(req_id, None)
        self.replays.pop(req_id, None)
        self.quantized.pop(req_id, None)
        drafts = self.drafts.pop(req_id, None)
        state = self.states.pop(req_id, None)
        if state is None:
            return
        self.counts[why] += 1
        if self.config.log_request_stats:
            stats = state.stats.as_dict()
            stats["kv_bytes_stored"] = stats["kv_tokens_stored"] * self.kv_bytes_per_token
            if drafts is not None:
                stats.update(drafts.as_dict())
            logger.info("kvplug request %s %s: policy=%s %s", req_id, why,
                        self.worker.active.policy, " ".join(f"{k}={v}" for k, v in stats.items()))

    def begin_step(self, runner, scheduler_output) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self.drop(req_id, "finished")
        for req_id in scheduler_output.preempted_req_ids or ():
            self.drop(req_id, "preempted")
        for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            self.drop(req_id, "resumed")  # recomputed from scratch: fresh state
        self.worker.apply(running=self.live())
        policy = self.worker.policy

        batch = runner.input_batch
        req_ids = tuple(batch.req_ids[: batch.num_reqs])
        compressing = "prefill_compress" in policy.stages
        quantized = [] if self.worker.quantized else None
        states, read_from, layer_read_from, head_cells, unverified = [], [], [], [], []
        ending, continuing, recompacting = [], [], []
        for row, req_id in enumerate(req_ids):
            if req_id in self.replays:
                raise RuntimeError(f"kvplug: request {req_id} was scheduled while its replay "
                                   "is pending (the scheduler must hold it)")
            request = runner.requests[req_id]
            state = self.states.get(req_id)
            if state is None:
                state = self.states[req_id] = policy.new_request_state(
                    request.num_prompt_tokens)
                self.counts["created"] += 1
            computed = int(batch.num_computed_tokens_cpu[row])
            new = scheduler_output.num_scheduled_tokens[req_id]
            # a verification step schedules the last token and its drafts
            drafts = len(scheduler_output.scheduled_spec_decode_tokens.get(req_id, ()))
            is_prefill = computed < request.num_prompt_tokens or new > 1 + drafts
            unverified += [False] * (new - drafts) + [True] * drafts
            policy.account_step(state, computed, new, is_prefill)
            states.append(state)
            if quantized is not None:
                record = self.quantized.get(req_id)
                if record is None:
                    record = self.quantized[req_id] = new_record(request.num_tokens, computed,
                                                                 self.block_size)
                quantized.append(plan_row(self.worker.packer, record, computed, new,
                                          self.block_size))
            if not compressing:
                continue
            record = self.compactions.setdefault(req_id, RequestCompaction())
            if record.layout is not None:
                read_from.append(record.layout.first_block_at(computed))
                layer_read_from.append(record.layer_first_blocks(computed))
                head_cells.append(record.head_cells)
                if record.layout.recompacts_in(computed, new):
                    recompacting.append((row, record, computed))
                continue
            read_from.append(0)
            layer_read_from.append(None)
            head_cells.append(None)
            if computed + new == request.num_tokens:  # the prefill run ends in this step
                record.layout = compaction_layout(policy, computed + new, self.block_size)
                if record.layout.first_block:        # else it keeps every token as it is
                    ending.append((row, record))
            elif policy.observation_window:   # keeps its chunk's last queries for the end
                continuing.append((row, record))
        compaction = (CompactionStep(tuple(ending), tuple(continuing), tuple(recompacting))
                      if compressing else None)
        self.current = Step(req_ids, tuple(states), tuple(read_from) if compressing else None,
                            compaction, tuple(layer_read_from)
                            if any(f is not None for f in layer_read_from) else None,
                            head_cells=tuple(head_cells)
                            if any(c is not None for c in head_cells) else None,
                            quantized=None if quantized is None else tuple(quantized),
                            # kvplug's drafter folds the accepted drafts' keys in itself
                            unverified=torch.tensor(unverified) if self.worker.draft is not None
                            and any(unverified) else None)

        self.steps += 1
        every = self.config.log_every_steps
        if every and self.steps % every == 0:
            logger.info("kvplug: %d live request states after %d steps", self.live(), self.steps)

    def end_step(self) -> None:
        self.current = None

    def record_drafts(self, req_id: str, tier: str, proposed: int, accepted: int) -> None:
        """Of ``req_id``'s ``proposed`` tokens of ``tier``, ``accepted`` were kept: drafts
        accepted by verification (``draft``), guesses kept by the draft (``first_tier``)."""
        self.drafts.setdefault(req_id, DraftStats()).record(tier, proposed, accepted)
        self.counts[f"{tier}_tokens_proposed"] += proposed
        self.counts[f"{tier}_tokens_accepted"] += accepted

    def begin_draft(self, req_ids: tuple[str, ...]) -> None:
        """Publish a draft forward over ``req_ids`` (closed by :meth:`end_step`)."""
        self.current = Step(req_ids, tuple(self.states[r] for r in req_ids), draft=True)
        self.counts["draft_forwards"] += 1


_TRACKER: RequestTracker | None = None
_WORKER: WorkerPolicy | None = None


def worker_policy(vllm_config) -> WorkerPolicy:
    """This process's policies (bound to the model), shared by the tracker and every layer."""
    global _WORKER
    if _WORKER is None:
        model = vllm_config.model_config
        _WORKER = WorkerPolicy(resolve_config(vllm_config.additional_config),
                               model.get_num_layers(vllm_config.parallel_config),
                               model.get_total_num_kv_heads(),
                               vllm_config.cache_config.block_size,
                               vllm_config.parallel_config.world_size)
    return _WORKER


def current_worker() -> WorkerPolicy | None:
    """This process's policies once a kvplug layer was built (model load), else None."""
    return _WORKER


def tracker() -> RequestTracker | None:
    """This process's tracker, or None when kvplug is not the engine's backend."""
    return _TRACKER


def _kv_bytes_per_token(runner) -> int:
    total = 0
    for group in runner.kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        total += spec.page_size_bytes // spec.block_size * len(group.layer_names)
    return total


def _tracker_for(runner) -> RequestTracker | None:
    global _TRACKER
    if _TRACKER is None and uses_kvplug(runner.vllm_config):
        _TRACKER = RequestTracker(worker_policy(runner.vllm_config), _kv_bytes_per_token(runner),
                                  runner.cache_config.block_size)
    return _TRACKER


def patch_model_runner() -> None:
    """Wrap the runner's ``_update_states`` and ``execute_model`` (once)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._update_states, "_kvplug_wrapped", False):
        return
    update_states = GPUModelRunner._update_states
    execute_model = GPUModelRunner.execute_model

    @functools.wraps(update_states)
    def _update_states(self, scheduler_output):
        result = update_states(self, scheduler_output)
        t = _tracker_for(self)
        if t is not None:
            t.begin_step(self, scheduler_output)
        return result

    @functools.wraps(execute_model)
    def _execute_model(self, *args, **kwargs):
        try:
            output = execute_model(self, *args, **kwargs)
            if _TRACKER is not None and _TRACKER.current is not None:
                from kvplug.integrations.vllm.replay import advance_replays
                advance_replays(self)
            return output
        finally:
            if _TRACKER is not None:
                _TRACKER.end_step()

    _update_states._kvplug_wrapped = True
    GPUModelRunner._update_states = _update_states
    GPUModelRunner.execute_model = _execute_model


def worker_request_states(worker) -> dict[str, int]:
    """RPC target (``collective_rpc("kvplug_request_states")``): live and lifetime counts."""
    if _TRACKER is None:
        return {"live": 0}
    return {"live": _TRACKER.live(), "replaying": len(_TRACKER.replays), **_TRACKER.counts}


def worker_set_policy(worker, data: dict) -> None:
    """RPC target (``collective_rpc("kvplug_set_policy", args=(config,))``)."""
    if _WORKER is None:
        raise RuntimeError("kvplug is not this engine's attention backend")
    _WORKER.request_switch(data, running=0 if _TRACKER is None else _TRACKER.live())


def _attention_layers(worker) -> list:
    from vllm.model_executor.layers.attention import Attention

    context = worker.model_runner.vllm_config.compilation_config.static_forward_context
    return [layer for layer in context.values() if isinstance(layer, Attention)]


def layer_cache(layer) -> torch.Tensor:
    """The KV cache vLLM bound to an attention layer."""
    return layer.kv_cache[0] if isinstance(layer.kv_cache, list) else layer.kv_cache


def worker_attention_backends(worker) -> dict[str, int]:
    """RPC target: how many attention layers run on each backend (by name)."""
    return dict(Counter(layer.attn_backend.get_name() for layer in _attention_layers(worker)))


def worker_side_bytes(worker) -> int:
    """RPC target: bytes kvplug keeps beside the KV cache (key summaries, row-major keys)."""
    return sum(store.nbytes for layer in _attention_layers(worker)
               for store in getattr(layer.impl, "summaries", {}).values())


def worker_pool_bytes(worker) -> tuple[int, int]:
    """RPC target: bytes of the KV pool the engine allocated to its attention layers (each
    tensor once: with a KV-cache group per layer every layer views the same one), and the
    tokens the pool holds (a token takes a block slot in every group)."""
    storages = {}
    for layer in _attention_layers(worker):
        storage = layer_cache(layer).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    config = worker.model_runner.kv_cache_config
    tokens = config.num_blocks * worker.model_runner.cache_config.block_size \
        // len(config.kv_cache_groups)
    return sum(storages.values()), tokens


def patch_worker_rpc() -> None:
    from vllm.v1.worker.worker_base import WorkerBase

    WorkerBase.kvplug_request_states = worker_request_states
    WorkerBase.kvplug_attention_backends = worker_attention_backends
    WorkerBase.kvplug_set_policy = worker_set_policy
    WorkerBase.kvplug_side_bytes = worker_side_bytes
    WorkerBase.kvplug_pool_bytes = worker_pool_bytes
