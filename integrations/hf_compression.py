"""HF transformers cache for the policies that keep fewer KV tokens after prefill
(``"prefill_compress" in policy.stages``, see :mod:`kvplug.policies.compression`).

transformers hands an attention function only what its cache's ``update``
returns, so the saving has to live in the cache: :class:`CompressedCache` (one
:class:`CompressedLayer` per layer) is what ``generate`` builds for such a policy.

* The prompt comes in one forward.  Each layer stores it densely, attends to it
  with transformers' SDPA (so the prefill's outputs are sdpa's), and the policy
  scores it (:meth:`CompressedCache.score_prompt`).
* Once the last layer has scored, the policy's per-layer budgets and keep plans
  are applied to every layer: per batch row and kv-head it keeps the slots its
  plan names, and the dense prompt is dropped.  (A budget that covers the prompt
  keeps all of it, unscored.)
* Later forwards append their tokens and attend to the kept slots and the tokens
  stored since (causally among themselves): decode steps, or the question that
  follows a context compressed before it was seen (:func:`compress_context`, the
  query-agnostic protocol).  A slot standing for ``c`` tokens (a merge) gets ``log c`` on
  its logit, which is attention over ``c`` identical keys; rows of a batch that
  keep fewer slots than others are padded with slots of count 0 (``-inf``).
* A policy that scores by replaying its context (``"replay"``) does not score at the
  prefill: the prompt stays dense until :func:`~kvplug.integrations.hf_replay.replay_context`
  has run the policy's replay forwards over it (:meth:`CompressedCache.replaying`; each
  layer scores the replay's queries and drops the replay's KV right after its
  attention) and :meth:`CompressedCache.compress_replayed` applies the plans.
* A policy that also compresses at decode (``"decode_compress"``) gives each layer
  a budget per row (its prefill budget; where the prompt was kept whole, the
  policy's budget): after a forward's attention has read every slot, a row holding
  more than its budget keeps what ``policy.decode_keep`` names of its slots, so
  between forwards no layer holds more than its budget.

Positions stay those of the uncompressed sequence: ``generate`` advances its
``position_ids`` itself, and a forward given none takes them from
``get_seq_length``, which counts the sequence's tokens, not the slots kept.  The
causal mask transformers builds is therefore over that logical length; attention
after the compression reads it only to refuse padding (every slot is in the past
of the new tokens) and passes its own mask instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import Cache

from kvplug.integrations.hf_cache import FixedPastLayer, full_attention_layers
from kvplug.policies import CompressionPolicy, KeepPlan, LayerScores, ReplayChunk

# attribute of the key tensor a CompressedCache returns: the cache, for the attention function
_CACHE_TAG = "_kvplug_compressed_cache"


def kept_kv(plan: KeepPlan, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """What ``plan`` stores of one row's prompt ``keys``/``values`` ``[H_kv, N, D]``: its
    own ``keys``/``values`` when it has them (merged), else the kept tokens' (``[H_kv, n, D]``)."""
    index = plan.indices.to(keys.device)[..., None]
    if plan.keys is None:
        kept_keys = keys.gather(1, index.expand(-1, -1, keys.shape[-1]))
    else:
        kept_keys = plan.keys.to(keys)
    if plan.values is None:
        kept_values = values.gather(1, index.expand(-1, -1, values.shape[-1]))
    else:
        kept_values = plan.values.to(values)
    return kept_keys, kept_values


def slot_counts(plan: KeepPlan) -> Tensor:
    """``[H_kv, n]`` tokens each slot of ``plan`` stands for, as floats."""
    if plan.counts is None:
        return torch.ones(plan.indices.shape, device=plan.indices.device)
    return plan.counts.float()


class CompressedLayer(FixedPastLayer):
    """One layer's cache: the prompt dense until :meth:`keep` applies the policy's plans,
    then only the kept slots; generated tokens are appended exactly.

    Cache edits that would have to plan again (cropping, beam reordering, batch
    repeats) are refused.
    """

    keeps = "compressed cache"

    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.tokens = 0         # tokens of the sequence stored so far, kept or not
        self.prompt_len = 0     # tokens of the prompt
        self.counted_slots = 0  # leading slots log_counts covers (the prompt's until compressed)
        self.compressed = False  # the prompt is stored as kept (plans applied, or all kept)
        # [B, H_kv, counted_slots] log of the tokens each slot stands for; None: one each
        self.log_counts: Tensor | None = None
        # per batch row, the slots a forward may leave (decode_compress); None: no limit
        self.budgets: list[int] | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.prompt_len = self.counted_slots = key_states.shape[-2]
        self.tokens += key_states.shape[-2]
        return super().update(key_states, value_states, *args, **kwargs)

    def keep(self, plans: list[KeepPlan]) -> None:
        """Store only what ``plans`` (one per batch row) keep of the prompt, dropping its
        dense K/V; rows that keep fewer slots than the others get slots of count 0."""
        slots = max(plan.size for plan in plans)
        weighted = any(plan.size != slots
                       or plan.counts is not None and bool((plan.counts != 1).any())
                       for plan in plans)
        kept = [kept_kv(plan, self.keys[row], self.values[row]) for row, plan in enumerate(plans)]
        self.keys, self.values = (torch.stack([F.pad(t, (0, 0, 0, slots - t.shape[1])) for t in ts])
                                  for ts in zip(*kept))
        self.log_counts = None
        if weighted:
            counts = [F.pad(slot_counts(plan), (0, slots - plan.size)) for plan in plans]
            self.log_counts = torch.stack(counts).to(self.keys.device).log()
        self.counted_slots, self.compressed = slots, True

    def evict(self, policy: CompressionPolicy, layer_idx: int, query: Tensor,
              scale: float) -> None:
        """Decode-time compression, after a forward's attention read every slot: each batch
        row holding more than its budget keeps the slots ``policy.decode_keep`` names, scored
        by the forward's ``query`` ``[B, H_q, Q, D]`` over the row's slots (padding
        excluded); rows that then keep fewer slots than others are padded with count 0."""
        num_kv_heads, slots = self.keys.shape[1], self.keys.shape[-2]
        log_counts = self.slot_log_counts()
        kept, evicted = [], False
        for row, budget in enumerate(self.budgets):
            real = torch.arange(slots, device=self.keys.device)
            if log_counts is not None:
                real = real[log_counts[row, 0] > float("-inf")]
            keep = policy.decode_keep(layer_idx, query[row].transpose(0, 1),
                                      self.keys[row, :, real].transpose(0, 1), budget, scale)
            evicted |= keep is not None
            kept.append(real.expand(num_kv_heads, -1) if keep is None
                        else real[keep.to(real.device)])
        if not evicted:
            return
        width = max(index.shape[-1] for index in kept)
        rows = []
        for row, index in enumerate(kept):
            gathered = [t[row].gather(1, index[..., None].expand(-1, -1, t.shape[-1]))
                        for t in (self.keys, self.values)]
            counts = (torch.zeros(index.shape, device=index.device) if log_counts is None
                      else log_counts[row].gather(1, index))
            pad = width - index.shape[-1]
            rows.append([F.pad(t, (0, 0, 0, pad)) for t in gathered]
                        + [F.pad(counts, (0, pad), value=float("-inf"))])
        self.keys, self.values, counts = (torch.stack(ts) for ts in zip(*rows))
        self.log_counts = counts if bool(counts.ne(0).any()) else None
        self.counted_slots = width

    def drop_tokens_after_prompt(self) -> None:
        """Forget what a forward stored after the dense prompt (a replay's KV)."""
        self.keys = self.keys[:, :, :self.prompt_len]
        self.values = self.values[:, :, :self.prompt_len]
        self.tokens = self.prompt_len

    def slot_log_counts(self) -> Tensor | None:
        """``[B, H_kv, slots]`` log of the tokens each slot stands for (0 after the counted
        ones); None when every slot is one token."""
        if self.log_counts is None:
            return None
        return F.pad(self.log_counts, (0, self.keys.shape[-2] - self.counted_slots))

    def attention_bias(self, num_heads: int, num_new: int, dtype: torch.dtype) -> Tensor | None:
        """The additive SDPA mask ``[B, H_q or 1, num_new, S]`` of a forward after the
        compression (a decode step, or the tokens that follow a compressed context):
        ``log count`` on the kept slots, 0 on the tokens stored after them, causal among
        the ``num_new`` new ones; None when no slot is weighed and one token is new."""
        slots = self.keys.shape[-2]
        counts = self.slot_log_counts()
        if counts is not None:
            group = num_heads // counts.shape[1]
            counts = counts.repeat_interleave(group, dim=1)[:, :, None].to(dtype)
        if num_new == 1:            # a decode step sees every slot: no causal part
            return counts
        causal = torch.ones(num_new, num_new, dtype=torch.bool, device=self.keys.device).tril()
        visible = F.pad(causal, (slots - num_new, 0), value=True)
        bias = torch.zeros(num_new, slots, dtype=dtype, device=self.keys.device)
        bias = bias.masked_fill(~visible, float("-inf"))[None, None]
        return bias if counts is None else bias + counts

    def get_seq_length(self) -> int:
        """Tokens of the sequence, not slots stored: positions and masks stay those of the
        uncompressed sequence."""
        return self.tokens

    def reset(self) -> None:
        super().reset()
        self.tokens = self.prompt_len = self.counted_slots = 0
        self.compressed, self.log_counts, self.budgets = False, None, None


class CompressedCache(DynamicCache):
    """``past_key_values`` for ``generate`` with a policy that compresses at prefill (see
    the module doc)."""

    def __init__(self, policy: CompressionPolicy, config: Any):
        _, layer_types = full_attention_layers(policy, config, "compresses")
        Cache.__init__(self, layers=[CompressedLayer() for _ in layer_types])
        self.policy = policy
        self._scores: list[list[LayerScores] | None] = [None] * len(self.layers)  # per layer, row
        self._replay: ReplayChunk | None = None      # the replay forward running, if one is
        self._replay_scores: list[list[Tensor]] | None = None  # per layer, row: [H_kv, N]

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if layer.is_initialized and not layer.compressed and self._replay is None:
            if "replay" in self.policy.stages:
                raise RuntimeError(f"kvplug policy {self.policy.name!r} compresses a prompt "
                                   "after replaying it: run generate(), or "
                                   "compress_context() before reading more tokens")
            raise RuntimeError(f"kvplug policy {self.policy.name!r}: layer {layer_idx}'s prompt "
                               "was never scored (its attention did not run kvplug's compression "
                               "path); run the model with attn_implementation='kvplug' and the "
                               "cache's policy attached")
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        setattr(keys, _CACHE_TAG, self)
        return keys, values

    def score_prompt(self, layer_idx: int, query: Tensor, key: Tensor, scale: float) -> None:
        """The policy's scores of layer ``layer_idx``'s prompt, from its prefill's ``query``
        ``[B, H_q, N, D]`` and ``key`` ``[B, H_kv, N, D]``, per batch row; the last layer
        to score compresses every layer (budgets may depend on all layers' scores).  A
        budget that covers the prompt keeps all of it, unscored.  During a replay forward
        the replay's queries score the prompt instead (:meth:`replaying`); a replay policy's
        own prefill scores nothing."""
        if self._replay is not None:
            self._score_replay(layer_idx, query, key, scale)
            return
        span = key.shape[2]
        if self.policy.token_budget(span) >= span:
            layer = self.layers[layer_idx]
            layer.compressed = True
            if "decode_compress" in self.policy.stages:
                layer.budgets = [self.policy.kept_budget(span)] * key.shape[0]
            return
        if "replay" in self.policy.stages:
            return
        window = min(self.policy.observation_window, query.shape[2])
        queries = query[:, :, -window:].transpose(1, 2)                 # [B, W, H_q, D]
        self._scores[layer_idx] = [self.policy.prefill_scores(layer_idx, q, k, scale)
                                   for q, k in zip(queries, key.transpose(1, 2))]
        if all(scores is not None for scores in self._scores):
            self._compress()

    @property
    def awaits_replay(self) -> bool:
        """A replay policy's prompt is stored dense and not yet compressed."""
        return "replay" in self.policy.stages and any(
            layer.is_initialized and not layer.compressed for layer in self.layers)

    @contextmanager
    def replaying(self, chunk: ReplayChunk) -> Iterator[None]:
        """The forward run inside reads ``chunk.input_ids`` after the dense prompt: every
        layer attends densely, scores the prompt by the forward's queries
        (``policy.replay_scores``) and forgets the forward's KV."""
        if not self.awaits_replay:
            raise RuntimeError(f"kvplug policy {self.policy.name!r}: nothing to replay (no dense "
                               "prompt in the cache, or it is compressed already)")
        if self._replay_scores is None:
            rows, num_kv_heads, span = self.layers[0].keys.shape[:3]
            self._replay_scores = [[self.policy.unscored(num_kv_heads, span).to(layer.keys.device)
                                    for _ in range(rows)] for layer in self.layers]
        self._replay = chunk
        try:
            yield
        finally:
            self._replay = None
            for layer in self.layers:
                layer.drop_tokens_after_prompt()

    def _score_replay(self, layer_idx: int, query: Tensor, key: Tensor, scale: float) -> None:
        chunk, scores = self._replay, self._replay_scores[layer_idx]
        for row, (q, k) in enumerate(zip(query.transpose(1, 2), key.transpose(1, 2))):
            scores[row][:, chunk.start:chunk.end] = self.policy.replay_scores(
                layer_idx, q, k, chunk, scale).to(scores[row])
        self.layers[layer_idx].drop_tokens_after_prompt()

    def compress_replayed(self) -> None:
        """Keep what the policy's plans name of the prompt, from the replay's scores."""
        if self._replay_scores is None:
            raise RuntimeError(f"kvplug policy {self.policy.name!r}: no replay forward ran "
                               "over the prompt, so nothing scored it")
        self._scores = [[LayerScores(t) for t in rows] for rows in self._replay_scores]
        self._replay_scores = None
        self._compress()

    def _compress(self) -> None:
        span = self.layers[0].prompt_len
        budget = self.policy.token_budget(span)
        rows = range(len(self._scores[0]))
        budgets = [self.policy.layer_budgets([scores[row] for scores in self._scores], budget, span)
                   for row in rows]
        for idx, (layer, scores) in enumerate(zip(self.layers, self._scores)):
            layer.keep([self.policy.keep_plan(scores[row], budgets[row][idx], span,
                                              layer.keys[row].transpose(0, 1),
                                              layer.values[row].transpose(0, 1))
                        for row in rows])
            if "decode_compress" in self.policy.stages:
                layer.budgets = [budgets[row][idx] for row in rows]
        self._scores = [None] * len(self.layers)

    def compress_decode(self, layer_idx: int, query: Tensor, scale: float) -> None:
        """Decode-time compression of layer ``layer_idx`` after a forward's attention (see
        :meth:`CompressedLayer.evict`); nothing for a policy that keeps every later token."""
        layer = self.layers[layer_idx]
        if layer.budgets is not None:
            layer.evict(self.policy, layer_idx, query, scale)

    def reset(self) -> None:
        super().reset()
        self._scores = [None] * len(self.layers)
        self._replay, self._replay_scores = None, None


def cache_of(key: Tensor) -> CompressedCache | None:
    """The :class:`CompressedCache` that returned ``key``, if one did."""
    return getattr(key, _CACHE_TAG, None)
