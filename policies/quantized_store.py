"""The ``quantized`` store, engine-free: groups of tokens quantized together, each kv-head's
salient tokens at one bit width and the others at another, read by decode attention that
never dequantizes them into a full-precision copy.

A :class:`Segment` is what one quantization made: the prompt at the end of its prefill,
or ``streaming_gap`` generated tokens.  :func:`quantize_segment` builds one from exact
K/V and a score per token; :func:`decode` runs one decode step over segments and the
exact tokens not yet quantized.  Attention does not depend on the order of its keys
(positions are in the post-RoPE keys), so each kv-head's salient and other tokens are
stored as two dense parts and no positions are kept.  An engine adapter owns where the
segments live (``integrations/hf_quantized.py`` keeps them per layer in a transformers
cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug.kernels import (PackedKV, count_weighted_decode, dequantize_kv,
                            merge_attention_states, quantize_kv, quantized_decode)
from kvplug.policies.zipcache import ZipCache


@dataclass(frozen=True)
class Segment:
    """``length`` tokens per (sequence, kv-head), quantized together."""

    length: int
    salient: PackedKV   # [B, H_kv, n_salient] at policy.bits_salient
    other: PackedKV     # [B, H_kv, length - n_salient] at policy.bits_other

    def parts(self) -> tuple[PackedKV, ...]:
        return tuple(p for p in (self.salient, self.other) if p.num_tokens)

    def nbytes(self) -> int:
        return self.salient.nbytes() + self.other.nbytes()


def _split(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` ``[B, H, n, D]`` -> the rows where ``mask`` ``[B, H, n]`` is True and the others,
    each ``[B, H, count, D]`` (every (sequence, head) has the same count)."""
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
    n_true = int(mask[0, 0].sum()) if mask.numel() else 0
    rows = x.gather(2, order[..., None].expand(-1, -1, -1, x.shape[-1]))
    return rows[:, :, :n_true], rows[:, :, n_true:]


def quantize_segment(policy: ZipCache, keys: Tensor, values: Tensor, saliency: Tensor) -> Segment:
    """``keys``/``values`` ``[B, H_kv, n, D]`` quantized by ``saliency`` ``[B, H_kv, n]``:
    :meth:`ZipCache.salient_mask` decides each token's bits per kv-head."""
    mask = policy.salient_mask(saliency)
    salient_k, other_k = _split(keys, mask)
    salient_v, other_v = _split(values, mask)
    return Segment(keys.shape[2], quantize_kv(salient_k, salient_v, policy.bits_salient),
                   quantize_kv(other_k, other_v, policy.bits_other))


def decode(segments: list[Segment], query: Tensor, exact_keys: Tensor, exact_values: Tensor,
           scale: float) -> tuple[Tensor, Tensor]:
    """One decode step over ``segments`` and the exact tokens ``[B, H_kv, e, D]`` (the
    current one included): each packed part read by :func:`~kvplug.kernels.quantized_decode`,
    the exact tokens by dense attention, merged by LSE.  ``query`` ``[B, H_q, D]`` ->
    ``out`` ``[B, H_q, D]`` float32 and ``lse`` ``[B, H_q]``."""
    outs, lses = [], []
    for segment in segments:
        for part in segment.parts():
            out, lse = quantized_decode(query, part, scale=scale)
            outs.append(out)
            lses.append(lse)
    if exact_keys.shape[2]:
        B, H, e, _ = exact_keys.shape
        ones = torch.ones(B, H, e, device=query.device)
        lens = torch.full((B,), e, device=query.device, dtype=torch.int32)
        out, lse = count_weighted_decode(query, exact_keys.to(query.dtype),
                                         exact_values.to(query.dtype), ones, lens, scale=scale,
                                         return_lse=True)
        outs.append(out.float())
        lses.append(lse)
    return merge_attention_states(torch.stack(outs, dim=2), torch.stack(lses, dim=2), dim=2)


def dequantized(segments: list[Segment], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Every segment's keys and values ``[B, H_kv, n, D]`` (salient then other tokens of
    each segment): what :func:`decode` attends to, for references and tests."""
    parts = [dequantize_kv(part, dtype) for segment in segments for part in segment.parts()]
    return torch.cat([k for k, _ in parts], dim=2), torch.cat([v for _, v in parts], dim=2)
