"""ShadowKV's store of a prompt, engine-free: low-rank pre-RoPE keys, landmarks, the
exact window and outliers, and the values in host memory.

:func:`build_store` keeps one layer's prompt the way ShadowKV does (one SVD of the
pre-RoPE keys, chunk landmarks, the first decode step's exact part); :func:`decode`
runs one decode step over it: exact window, outliers and generated tokens, and
the top chunks by landmark with keys rebuilt as RoPE(``U[pos] @ SV``) and values
copied back from host memory.  An engine adapter owns where the store lives
(``integrations/hf_shadowkv.py`` keeps one per layer in a transformers cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug.kernels import landmarks, lowrank_rope_keys, sparse_paged_decode
from kvplug.policies.selection import KeySummary
from kvplug.policies.shadowkv import ShadowKV, ascending, lowrank_keys, undo_rope


@dataclass
class PromptStore:
    """One layer's prompt of ``length`` tokens, as ShadowKV keeps it."""

    length: int
    u: Tensor               # [B, P, r]
    sv: Tensor              # [B, r, H_kv * D]
    inv_freq: Tensor        # [D / 2], the model's RoPE
    summary: KeySummary     # landmarks and min_cos of the prompt's chunks
    exact_pos: Tensor       # [B, H_kv, E] ascending prompt positions kept exactly; padded with P
    exact_keys: Tensor      # [B, H_kv, E, D] post-RoPE
    exact_values: Tensor    # [B, H_kv, E, D]
    host_values: Tensor     # [B, H_kv, P, D] every value of the prompt, in host memory

    def device_tensors(self) -> tuple[Tensor, ...]:
        return (self.u, self.sv, self.summary.lo, self.summary.min_cos, self.exact_pos,
                self.exact_keys, self.exact_values)

    def exact(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Exact keys and values at ``positions`` ``[B, H_kv, N]`` (``-1``: unused, zeros)."""
        used = positions >= 0
        slot = torch.searchsorted(self.exact_pos, positions.clamp_min(0).contiguous())
        slot = slot.clamp_max(self.exact_pos.shape[-1] - 1)
        if not bool((self.exact_pos.gather(2, slot) == positions)[used].all()):
            raise RuntimeError("kvplug shadowkv: a decode step read a prompt position outside "
                               "the exact part kept at the prefill")
        index = slot[..., None].expand(-1, -1, -1, self.exact_keys.shape[-1])
        keep = used[..., None]
        return (self.exact_keys.gather(2, index) * keep, self.exact_values.gather(2, index) * keep)

    def with_whole_prompt(self, gen_keys: Tensor, gen_values: Tensor) -> tuple[Tensor, Tensor]:
        """The prompt's exact keys and values followed by the generated tokens'; only when
        the budget covered the prompt at the prefill, so the store kept all of it."""
        if (self.exact_pos.shape[-1] != self.length
                or not bool((self.exact_pos[..., -1] == self.length - 1).all())):
            raise RuntimeError("kvplug shadowkv: a dense decode step after a prefill that kept "
                               "only part of the prompt exactly")
        return (torch.cat([self.exact_keys, gen_keys], dim=2),
                torch.cat([self.exact_values, gen_values], dim=2))

    def fetch_values(self, positions: Tensor) -> Tensor:
        """Values at ``positions`` ``[B, H_kv, N]`` (``-1``: zeros), copied from host memory."""
        B, H, P, D = self.host_values.shape
        host = positions.to(self.host_values.device)
        rows = (torch.arange(B * H, device=host.device).view(B, H, 1) * P + host.clamp_min(0))
        out = self.host_values.view(B * H * P, D).index_select(0, rows.flatten())
        out = out.view(B, H, -1, D).to(positions.device, non_blocking=True)
        return out * (positions >= 0)[..., None]


def chunk_positions(chunk_ids: Tensor, chunk: int) -> Tensor:
    """Token positions ``[B, H_kv, k·chunk]`` of chunk ids ``[B, H_kv, k]`` (``-1`` stays ``-1``)."""
    pos = chunk_ids.long()[..., None] * chunk + torch.arange(chunk, device=chunk_ids.device)
    return pos.masked_fill((chunk_ids < 0)[..., None], -1).flatten(2)


def build_store(key: Tensor, value: Tensor, policy: ShadowKV, inv_freq: Tensor) -> PromptStore:
    """ShadowKV's prefill of one layer: undo RoPE, one SVD of its keys, landmarks, exact part."""
    B, H, P, D = key.shape
    keys = key.transpose(1, 2)                                   # [B, P, H_kv, D] post-RoPE
    u, sv = lowrank_keys(undo_rope(keys, torch.arange(P, device=key.device)[:, None], inv_freq),
                         policy.key_rank(H, D))
    chunk = policy.chunk(1)
    mean, min_cos = landmarks(keys, chunk)
    summary = KeySummary(mean, None, None, chunk, min_cos)
    prompt_lens = torch.full((B,), P, device=key.device, dtype=torch.int64)
    # the first decode step's budget: each later step's is no larger (see decode_budgets)
    split = policy.budget_split(prompt_lens, decode_budgets(policy, P, 1, prompt_lens), 1)
    exact = None if split is None else policy.exact_part(summary, split)
    window = P if exact is None else int(split.window.max())  # rows have one length here
    pos = torch.arange(P - window, P, device=key.device).expand(B, H, window)
    if exact is not None:
        pos = torch.cat([chunk_positions(exact.outliers, chunk), pos], dim=-1)
    pos = torch.where(pos < 0, P, pos).sort(dim=-1).values
    index = pos.clamp_max(P - 1)[..., None].expand(-1, -1, -1, D)
    host = torch.device("cpu")
    host_values = value.to(host).contiguous()
    if value.is_cuda:
        host_values = host_values.pin_memory()
    return PromptStore(P, u.to(key.dtype), sv.to(key.dtype), inv_freq, summary, pos,
                       key.gather(2, index), value.gather(2, index), host_values)


def decode_budgets(policy: ShadowKV, prompt_len: int, generated: int, like: Tensor) -> Tensor:
    """Tokens of the prompt a step reads, per row: the step's budget less the generated
    tokens (always read).  It shrinks as generation goes on, never grows."""
    total = torch.full_like(like, prompt_len + generated)
    return (policy.token_budgets(total) - generated).clamp_min(0)


def decode(store: PromptStore, policy: ShadowKV, query: Tensor, gen_keys: Tensor,
           gen_values: Tensor, scale: float | None) -> Tensor | None:
    """One decode step over the prompt's store and the generated tokens ``[B, H_kv, g, D]``.

    The tokens read are laid out per (row, kv-head) as one block: the outlier
    chunks, the top chunks, then the window and the generated tokens as the
    recent part, and :func:`sparse_paged_decode` attends to it.  None: the
    step's budget covers the prompt (attend to :meth:`PromptStore.with_whole_prompt`).
    """
    B, H, g, D = gen_keys.shape
    P = store.length
    prompt_lens = torch.full((B,), P, device=query.device, dtype=torch.int64)
    split = policy.budget_split(prompt_lens, decode_budgets(policy, P, g, prompt_lens), 1)
    if split is None:
        return None
    exact = policy.exact_part(store.summary, split)
    chunk = store.summary.chunk_size
    window = int(split.window.max())                          # rows have one length here
    top = policy.top_chunks(query, store.summary, exact)
    top_pos = chunk_positions(top, chunk)
    out_keys, out_values = store.exact(chunk_positions(exact.outliers, chunk))
    window_keys, window_values = store.exact(
        torch.arange(P - window, P, device=query.device).expand(B, H, window))
    top_keys = lowrank_rope_keys(store.u, store.sv, top_pos, store.inv_freq,
                                 out_dtype=query.dtype)
    keys = torch.cat([out_keys, top_keys, window_keys, gen_keys], dim=2)     # [B, H_kv, S, D]
    values = torch.cat([out_values, store.fetch_values(top_pos), window_values, gen_values],
                       dim=2)
    ids = torch.cat([exact.outliers, top], dim=-1)
    slots = torch.arange(ids.shape[-1], device=ids.device, dtype=torch.int32)
    chunk_ids = ascending(torch.where(ids >= 0, slots, -1))
    block_table = torch.arange(B, device=query.device, dtype=torch.int32)[:, None]
    seq_lens = torch.full((B,), keys.shape[2], device=query.device, dtype=torch.int32)
    return sparse_paged_decode(query, keys.transpose(1, 2), values.transpose(1, 2), block_table,
                               seq_lens, chunk_ids, chunk, 0, window + g, scale=scale)
