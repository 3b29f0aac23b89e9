"""TidalDecode: a few layers choose the tokens, the others reuse the choice.

Based on https://arxiv.org/abs/2410.05076 (DerrickYLJ/TidalDecode).  Decode
only; prefill is dense and every KV token stays stored.  Per decode step:

* layers ``< dense_layers`` attend densely;
* each *selection layer* attends densely and also ranks every key by ``q·k``
  (per kv-head: the max over its GQA group; the paper's code is MHA-only),
  keeping the top ``budget`` positions, the current token included;
* every later layer reads exactly the positions the last selection layer
  chose ("position persistence"), each from its own K/V.

Defaults follow the paper's scripts for 32-layer Llama (dense 0-1, selection
at layer 2 and a correction layer at 13), scaled to the model's depth.  The
paper selects tokens (``granularity="token"``, the default); with
``granularity="block"`` it selects the engine's read units (vLLM: KV blocks),
a unit scored by its best key, which the paged kernel reads fastest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.kernels import chunk_scores, select_topk
from kvplug.policies.base import param, register_policy
from kvplug.policies.selection import (Selection, SelectionPolicy, SummarySpec, recent_tokens)

_PAPER_LAYERS = 32
_PAPER_CORRECTION_LAYER = 13


@register_policy("tidaldecode")
@dataclass
class TidalDecode(SelectionPolicy):
    summary = "2 layers pick the top-k tokens by q·k, later layers reuse them (bandwidth)"
    dense_layers: int = param(2, "first layers kept dense; the first selection layer follows",
                              min=0)
    correction_layer: int = param(-1, "second selection layer (-1: 13 of 32 layers, scaled to "
                                      "the model's depth)", min=-1)
    granularity: str = param("token", "select tokens (the paper) or the engine's KV blocks "
                                      "(a block scored by its best key)",
                             choices=("token", "block"))

    def selection_layers(self, num_layers: int) -> tuple[int, ...]:
        correction = self.correction_layer
        if correction < 0:
            correction = round(_PAPER_CORRECTION_LAYER * num_layers / _PAPER_LAYERS)
        if not self.dense_layers < correction < num_layers:
            raise ValueError(f"policy 'tidaldecode': correction_layer={correction} must lie "
                             f"after the first selection layer {self.dense_layers} and before "
                             f"the model's {num_layers} layers")
        return (self.dense_layers, correction)

    def check_model(self, num_layers, num_kv_heads, unit):
        self._selecting = self.selection_layers(num_layers)
        super().check_model(num_layers, num_kv_heads, unit)

    def _bound_selection_layers(self) -> tuple[int, ...]:
        if not hasattr(self, "_selecting"):
            raise RuntimeError("policy 'tidaldecode': check_model() binds it to a model first")
        return self._selecting

    def summary_spec(self, layer_idx, unit):
        """Only selection layers score keys: they need every key."""
        return SummarySpec("keys", 1) if layer_idx in self._bound_selection_layers() else None

    def read_chunk(self, layer_idx, unit):
        """Layers after the first selection layer read its choice, selection layers excepted."""
        if layer_idx < self.dense_layers or layer_idx in self._bound_selection_layers():
            return None
        return 1 if self.granularity == "token" else unit

    def plan_step(self, seq_lens, unit):
        return TidalStep()

    def select(self, layer_idx, q, summary, seq_lens, ctx):
        if layer_idx < self.dense_layers:
            return None
        if layer_idx in self._selecting:
            unit = 1 if self.granularity == "token" else ctx.unit
            ctx.plan.chosen = self._choose(q, summary, seq_lens, unit)
            return None  # a selection layer attends densely
        return ctx.plan.chosen

    def _choose(self, q, keys, seq_lens, unit) -> Selection | None:
        """Top units by their best ``q·k`` (max over the GQA group); the current unit always."""
        budget = self.token_budgets(seq_lens)
        fits = budget >= seq_lens
        if bool(fits.all()):
            return None
        scores = chunk_scores(q, keys.lo, seq_lens, summary_table=keys.table)  # [B, H_q, L]
        if unit > 1:
            B, H_q, L = scores.shape
            pad = -L % unit
            scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
            scores = scores.view(B, H_q, -1, unit).amax(-1)
        last = recent_tokens(seq_lens, 1, unit)
        k_per_seq = ((budget - last) // unit).clamp_min(0)
        ids = select_topk(scores, keys.lo.shape[2], (seq_lens - 1) // unit, int(k_per_seq.max()),
                          k_per_seq=k_per_seq, softmax=False)
        return Selection(ids, unit, 0, torch.where(fits, seq_lens, last))


@dataclass
class TidalStep:
    """One decode step of TidalDecode: the last selection layer's choice, which the layers
    after it read (None before the first selection layer, or where every row fits)."""

    chosen: Selection | None = None
