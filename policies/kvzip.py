"""KVzip: keep the KV pairs the model needs to reconstruct its context.

Based on https://arxiv.org/abs/2505.23416 (Kim et al. 2025, official code
snu-mllab/KVzip) as kvpress's ``KVzipPress`` runs it.  Query-agnostic: after the
context's prefill the model is prompted to repeat the context and reads it again,
chunk by chunk (``chunk_size`` tokens: "Repeat the previous context exactly.", later
chunks "Repeat the part of the previous context exactly, starting with" and the last
``prev_postfix`` tokens of the chunk before, then the end of the user turn and the
chunk itself).  Each replay query attends to the attention sinks, the chunk's cached
KV and the replay so far (causally); a context pair's score is the most attention any
replay query of its GQA group gives it.  The first ``n_sink`` tokens are always kept;
the chat template's preamble after them is not replayed and scores 0.

The budget is shared across heads and layers (KVzip's default): the pairs with the
highest scores of the whole sequence are kept, so each layer, and each kv-head in it,
keeps its own number of pairs; ``layerwise`` gives every layer the same number (still
shared among its heads).  kvplug caps what one layer keeps at ``max_layer_ratio`` times
the budget (an engine limit, as CAKE's): an engine that stores every layer of a token in
the same blocks reserves that much for each layer, so the cap is what lets it free the
rest.  A layer's share past the cap goes to the other layers; inside a layer the kv-heads
share its pairs as their scores say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug.policies.base import param, register_policy
from kvplug.policies.cake import share
from kvplug.policies.compression import KeepPlan, ReplayChunk, ReplayPolicy

FIRST_CHUNK_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_CHUNK_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
REPLAY_ROWS = 256    # replay queries scored at a time


@register_policy("kvzip")
@dataclass
class KVzip(ReplayPolicy):
    summary = ("keeps the KV pairs the model attends to most while it reads the context "
               "again (prompted to repeat it), budget shared across heads and layers; "
               "query-agnostic, the rest is evicted after prefill (memory)")
    n_sink: int = param(4, "first tokens always kept (attention sinks)", min=0)
    chunk_size: int = param(2048, "context tokens replayed per forward", min=1)
    prev_postfix: int = param(8, "tokens of the previous chunk that open a later chunk's "
                                 "repeat prompt", min=0)
    layerwise: bool = param(False, "give every layer the same budget (shared among its "
                                   "kv-heads) instead of sharing it across layers")
    max_layer_ratio: float = param(2.0, "kvplug engine limit, not KVzip's: no layer keeps "
                                        "more than this times the budget (the engine reserves "
                                        "that for every layer; large: uncapped, as KVzip)",
                                   min=1.0)

    uneven_heads = True

    def replay_chunks(self, context_ids, scored_from, encode, turn_end):
        batch = context_ids.shape[0]
        as_ids = lambda ids: torch.tensor(ids, dtype=context_ids.dtype).expand(batch, -1)
        chunks = []
        for start in range(scored_from, context_ids.shape[1], self.chunk_size):
            end = min(start + self.chunk_size, context_ids.shape[1])
            if start == scored_from:
                prompt = as_ids(encode(FIRST_CHUNK_PROMPT))
            else:
                previous = context_ids[:, max(start - self.prev_postfix, scored_from):start]
                prompt = torch.cat([as_ids(encode(NEXT_CHUNK_PROMPT)), previous], dim=1)
            chunks.append(ReplayChunk(start, end, torch.cat(
                [prompt, as_ids(turn_end), context_ids[:, start:end]], dim=1)))
        return chunks

    def unscored(self, num_kv_heads, context_len):
        scores = torch.zeros(num_kv_heads, context_len)
        scores[:, :self.n_sink] = float("inf")
        return scores

    def replay_scores(self, layer_idx, queries, keys, chunk, scale):
        """Softmax of each replay query over the sinks, the chunk and the replay up to
        itself; the chunk's part, max over the replay queries and the GQA group.  Queries
        go ``REPLAY_ROWS`` at a time, each block reading only the replay before its end
        (1.7x faster than one pass over all of them at 4k on 1 CPU thread)."""
        replayed, num_heads, _ = queries.shape
        num_kv_heads = keys.shape[1]
        group = num_heads // num_kv_heads
        context = keys.shape[0] - replayed
        sink = min(self.n_sink, chunk.start)
        read = torch.cat([keys[:sink], keys[chunk.start:chunk.end], keys[context:]])
        k = read.float().permute(1, 2, 0).repeat_interleave(group, dim=0)    # [H_q, D, S]
        prefix = sink + chunk.end - chunk.start
        best = torch.zeros(num_heads, chunk.end - chunk.start, device=keys.device)
        for lo in range(0, replayed, REPLAY_ROWS):
            hi = min(lo + REPLAY_ROWS, replayed)
            logits = torch.bmm(queries[lo:hi].float().transpose(0, 1),
                               k[..., :prefix + hi]) * scale                   # [H_q, r, S']
            ahead = (torch.arange(hi, device=keys.device)[None]
                     > torch.arange(lo, hi, device=keys.device)[:, None])
            logits[..., prefix:].masked_fill_(ahead, float("-inf"))
            best = torch.maximum(best, logits.softmax(dim=-1)[..., sink:prefix].amax(dim=1))
        return best.unflatten(0, (num_kv_heads, group)).amax(dim=1)

    def largest_layer_budget(self, budget, span):
        """``max_layer_ratio * budget`` pairs per kv-head, clipped to the span: the most one
        layer keeps, known before the replay scores anything."""
        return min(span, math.floor(self.max_layer_ratio * budget))

    def layer_budgets(self, scores, budget, span):
        """The ``L * H_kv * min(budget, span)`` best pairs of ``[0, span)`` over every layer
        and kv-head (ties to the earlier layer, head and token), as pairs per kv-head of each
        layer, none past the cap (the excess shared among the other layers in proportion to
        their pairs); ``layerwise``: ``min(budget, span)`` each."""
        keep = min(budget, span)
        if keep == span or self.layerwise:
            return [keep] * len(scores)
        pairs = torch.stack([s.token[:, :span].float() for s in scores])
        num_layers, num_kv_heads = pairs.shape[:2]
        best = pairs.flatten().topk(num_layers * num_kv_heads * keep, sorted=False).indices
        per_layer = torch.bincount(best // (num_kv_heads * span), minlength=num_layers)
        return share(per_layer.tolist(), num_layers * keep,
                     self.largest_layer_budget(budget, span))    # pairs / kv-heads, rounded

    def keep_plan(self, scores, budget, span, keys, values, cell=None):
        """The ``H_kv * budget`` best pairs of the layer's ``[0, span)``, however they fall on
        its kv-heads; a head keeping fewer than the most-keeping one is padded with slots of
        count 0 (after its last kept token).  With ``cell``, each head keeps its pairs rounded
        up to whole cells, its next best filling its last."""
        token = scores.token[:, :span]
        num_kv_heads = token.shape[0]
        best = token.flatten().topk(min(budget, span) * num_kv_heads, sorted=False).indices
        kept = torch.zeros_like(token, dtype=torch.bool).flatten()
        kept[best] = True
        kept = kept.view_as(token)
        per_head = kept.sum(dim=1)
        if cell is not None:             # each head's pairs rounded up to whole cells
            per_head = -(-per_head // cell) * cell
            rank = torch.empty_like(token, dtype=torch.long).scatter_(
                1, token.float().argsort(dim=1, descending=True, stable=True),
                torch.arange(span, device=token.device).expand_as(token))
            kept = rank < per_head[:, None]
        width = int(per_head.max())
        if width == 0:                                  # the layer keeps none of the span
            return KeepPlan(torch.zeros(num_kv_heads, 0, dtype=torch.long, device=token.device))
        # each head's kept positions first (ascending), then its last one again as padding
        # (a head keeping none: the span's last)
        positions = torch.arange(span, device=token.device)
        order = torch.where(kept, positions, span).sort(dim=1).values[:, :width]
        last = order.gather(1, (per_head - 1).clamp(min=0)[:, None]).clamp(max=span - 1)
        slot = torch.arange(width, device=token.device)
        real = slot < per_head[:, None]
        indices = torch.where(real, order, last)
        if bool(real.all()):
            return KeepPlan(indices)
        return KeepPlan(indices, counts=real.long())
