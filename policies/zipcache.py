"""ZipCache: every token kept, quantized, salient tokens at more bits.

Based on https://arxiv.org/abs/2405.14256 (ThisisBillhe/ZipCache, NeurIPS 2024).

* **Saliency at prefill, per layer.**  Probe queries: the last ``probe_ratio`` of the
  prompt and as many random earlier positions (5% + 5% by default, seeded per layer).
  Their causal softmax over the prompt's keys is summed over the probes and over each
  kv-head's query group; the **normalized** score of token ``j`` divides that sum by the
  number of probe queries that can attend to ``j`` (those at or after it), which removes
  the causal mask's bias towards early tokens.
* **Mixed precision.**  Per kv-head the ``floor(k_unimportant_ratio · n)`` lowest-scored
  tokens are stored at ``bits_other`` bits, the rest at ``bits_salient`` (4 and 2 by
  default); keys channel-wise, values channel-separable token-wise, each precision group
  with its own parameters (:mod:`kvplug.kernels.quant_pack`).
* **Streaming.**  Generated tokens stay exact until ``streaming_gap`` of them have
  accumulated; at that step they are quantized the same way, ranked by the attention of
  that step's query (softmax over the whole context, summed over the group, not
  normalized: the official code's choice for a single query).

Where this follows the paper rather than the official code, or an engine needs it:

* the normalization counts the probe queries that see a token (the paper's ``nnz`` of
  the probe attention's column); the official code divides by ``L - j``, the count of
  *all* queries, although only probes are summed;
* the random probes are distinct positions (the official code draws with replacement);
* value zero points and steps are per (token, kv-head); the official code ranges a row
  made of the ``i``-th salient token of every head (heads have different salient sets);
* parameters are per sequence (the official code ranges over the whole batch), and a
  streamed group is quantized on its own: the official code re-quantizes the whole
  dequantized cache with one range per precision group at every gap, which adds error
  to the past and needs a full-precision copy of it.

The engine keeps the store (``quantized``); :mod:`kvplug.policies.quantized_store` is
its engine-free part.  Every token is kept and read: the saving is bytes per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug.kernels.quant_pack import BITS
from kvplug.kernels.quant_pages import PageLayout
from kvplug.policies.base import Policy, param, register_policy

# probe queries scored together: bounds the [H_q, probes, N] attention held at once
_PROBE_CHUNK = 256


@register_policy("zipcache")
@dataclass
class ZipCache(Policy):
    summary = ("keeps every token quantized: the most attended ones per kv-head at 4 bits, "
               "the rest at 2 (memory and bandwidth)")
    store = "quantized"

    bits_salient: int = param(4, "bits of a salient token's key and value", choices=BITS)
    bits_other: int = param(2, "bits of the other tokens' keys and values", choices=BITS)
    k_unimportant_ratio: float = param(0.4, "fraction of each kv-head's tokens (the lowest "
                                            "normalized attention) stored at bits_other",
                                       min=0.0, max=1.0)
    streaming_gap: int = param(100, "generated tokens kept exact, then quantized together",
                               min=1)
    probe_ratio: float = param(0.05, "probe queries: this fraction of the prompt's last "
                                     "positions and as many random earlier ones (0, 1]",
                               min=0.0, max=1.0)
    seed: int = param(0, "seed of the random probe positions (layer l draws with seed + l)",
                      min=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.probe_ratio <= 0:
            raise ValueError(f"policy 'zipcache': probe_ratio={self.probe_ratio} must be in "
                             "(0, 1] (at least one probe query)")
        if self.bits_salient < self.bits_other:
            raise ValueError(f"policy 'zipcache': bits_salient={self.bits_salient} is below "
                             f"bits_other={self.bits_other}; salient tokens get at least as "
                             "many bits")

    def page_layout(self, block_size: int, head_dim: int) -> PageLayout:
        """How a paged engine stores a block of one kv-head (both precisions in one page)."""
        return PageLayout(block_size, head_dim, self.bits_salient, self.bits_other)

    def probe_positions(self, length: int, layer_idx: int) -> Tensor:
        """Ascending probe positions of a ``length``-token prompt: the last
        ``length - int(length·(1 - r))`` and ``int(length·r)`` distinct random earlier
        ones (``r = probe_ratio``), drawn with ``seed + layer_idx``."""
        recent_start = int(length - self.probe_ratio * length)
        n_random = min(int(self.probe_ratio * length), recent_start)
        g = torch.Generator().manual_seed(self.seed + layer_idx)
        earlier = torch.randperm(recent_start, generator=g)[:n_random]
        return torch.cat([earlier.sort().values, torch.arange(recent_start, length)])

    def prefill_saliency(self, queries: Tensor, positions: Tensor, keys: Tensor,
                         scale: float) -> Tensor:
        """Normalized attention score of every prompt token per kv-head.

        ``queries`` ``[P, H_q, D]``: the post-RoPE queries at the probe ``positions``
        ``[P]``; ``keys`` ``[N, H_kv, D]`` the prompt's.  Returns ``[H_kv, N]`` float32.
        """
        N, H_kv, _ = keys.shape
        H_q = queries.shape[1]
        group = H_q // H_kv
        k = keys.float().permute(1, 2, 0).repeat_interleave(group, dim=0)      # [H_q, D, N]
        positions = positions.to(keys.device)
        total = torch.zeros(H_q, N, device=keys.device)
        for start in range(0, queries.shape[0], _PROBE_CHUNK):
            q = queries[start:start + _PROBE_CHUNK].float().transpose(0, 1)    # [H_q, p, D]
            pos = positions[start:start + _PROBE_CHUNK]
            logits = torch.bmm(q, k) * scale                                    # [H_q, p, N]
            future = torch.arange(N, device=keys.device) > pos[:, None]
            total += logits.masked_fill_(future, float("-inf")).softmax(dim=-1).sum(dim=1)
        seen_by = (positions[None, :] >= torch.arange(N, device=keys.device)[:, None]).sum(1)
        per_kv_head = total.view(H_kv, group, N).sum(dim=1)
        return per_kv_head / seen_by.clamp_min(1)

    def stream_saliency(self, query: Tensor, keys: Tensor, lse: Tensor, scale: float) -> Tensor:
        """Score of each exact generated token at a streaming step: the step's query's
        softmax probability over the whole context (``lse``: its natural-log
        denominator, ``[B, H_q]``), summed over each kv-head's group.  ``query``
        ``[B, H_q, D]``, ``keys`` ``[B, H_kv, g, D]`` -> ``[B, H_kv, g]``."""
        B, H_q, D = query.shape
        H_kv = keys.shape[1]
        q = query.float().view(B, H_kv, H_q // H_kv, D)
        logits = q @ keys.float().transpose(-1, -2) * scale                  # [B, H, G, g]
        probs = torch.exp(logits - lse.view(B, H_kv, -1, 1).float())
        return probs.sum(dim=2)

    def salient_mask(self, saliency: Tensor) -> Tensor:
        """``[..., n]`` scores -> bool, False for the ``floor(k_unimportant_ratio · n)``
        lowest of each row (stored at ``bits_other``)."""
        n = saliency.shape[-1]
        n_other = math.floor(self.k_unimportant_ratio * n)
        mask = torch.ones_like(saliency, dtype=torch.bool)
        if n_other:
            low = saliency.topk(n_other, dim=-1, largest=False).indices
            mask.scatter_(-1, low, False)
        return mask
