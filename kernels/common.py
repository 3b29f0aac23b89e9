"""Shared pieces of the kvplug kernels: dispatch, GQA grouping, RoPE, paged
gathers and the merge of partial attention states.

Conventions used by every kernel in ``kvplug.kernels``:

* **GQA.** ``H_q = G * H_kv``; query head ``h_q`` belongs to kv-head
  ``h_q // G`` (the HF ``repeat_kv`` / vLLM order).  A tensor with a query-head
  axis is viewed as ``[.., H_kv, G, ..]`` without copying.
* **Paged KV layout (ours).** K and V are two separate tensors of logical
  shape ``[num_blocks, block_size, H_kv, D]`` (vLLM's flash-attn "NHD" page).
  Kernels take strides, so any strided view with that logical shape works:
  a ``[num_blocks, H_kv, block_size, D]`` ("HND") cache, e.g. the V half
  ``kv[..., D:]`` of vLLM CPU_ATTN's ``[num_blocks, H_kv, block_size, 2 * D]``
  cache, is passed as ``cache.transpose(1, 2)``.  Token ``t`` of sequence ``b`` lives
  at ``cache[block_table[b, t // block_size], t % block_size]``.
  We do not read vLLM-CPU's K half: with the "vec" ISA it is stored in an
  ISA-specific layout, so adapters keep their own copy (captured at KV write).
* **RoPE** is the rotate-half (Llama / HF / vLLM ``is_neox_style``) form over
  the whole head: ``x * cos + rotate_half(x) * sin`` with
  ``angle = position * inv_freq`` computed in fp32 exactly as HF does.
* **Dispatch.** A launcher runs its Triton kernel on CUDA tensors, and on CPU
  tensors only when Triton was imported with ``TRITON_INTERPRET=1`` (the
  kernels are then interpreted, which is what the tests use).  Otherwise CPU
  tensors take the vectorized torch reference: that *is* the CPU path, except
  where torch cannot read the data without a full-precision copy (ZipCache's
  packed pages), which has a C++ kernel (:mod:`kvplug.kernels.cpu_ext`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG2E = 1.4426950408889634


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def kernel_is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated while ``TRITON_INTERPRET=1`` was set."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def use_triton(kernel, tensor: Tensor) -> bool:
    """Whether a launcher should run ``kernel`` on ``tensor``'s device.

    Triton has no CPU backend here: CPU tensors can only run the interpreter,
    and only if the kernel was decorated in interpreter mode (whether a
    kernel is interpreted is fixed when its module is imported).
    """
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and kernel_is_interpreted(kernel)


def dot_in_fp32(kernel, dtype: torch.dtype) -> bool:
    """Whether a kernel should do its ``tl.dot`` in fp32 (``input_precision="ieee"``).

    fp32 inputs: always (no TF32 rounding, so fp32 results match torch).
    bf16 inputs: only under the interpreter.  Triton 3.9's interpreter keeps
    bf16 as uint16 and its ``create_dot`` multiplies the raw bit patterns
    (``np.matmul`` on uint16), so bf16 dots are garbage there; upcasting the
    operands keeps the interpreted kernel testable.  On a GPU bf16 stays bf16.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and kernel_is_interpreted(kernel))


def group_size(num_q_heads: int, num_kv_heads: int) -> int:
    """``G = H_q // H_kv``; raises if the heads do not group evenly."""
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of "
                         f"num_kv_heads={num_kv_heads}")
    return num_q_heads // num_kv_heads


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


# -- RoPE ---------------------------------------------------------------------
def rope_inv_freq(head_dim: int, rope_theta: float = 10000.0,
                  device: torch.device | str | None = None) -> Tensor:
    """Default RoPE inverse frequencies, ``[head_dim // 2]`` fp32 (HF's formula).

    Scaled variants (Llama-3 "llama3", YaRN, ...) only change ``inv_freq``: pass
    the model's own ``rotary_emb.inv_freq`` to the kernels instead.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (rope_theta ** exponent)


def apply_rope(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate-half RoPE in fp32: ``x [*P, D]`` at ``positions [*P]`` -> fp32 ``[*P, D]``.

    Equals HF's ``x * cos + rotate_half(x) * sin`` with ``cos = cat(c, c)``;
    worked on the two halves so the trig runs on ``D / 2`` angles only.
    """
    angle = positions.float()[..., None] * inv_freq.float()              # HF's fp32 angle
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# -- paged KV -----------------------------------------------------------------
def block_offsets(block_table: Tensor, positions: Tensor,
                  block_size: int) -> tuple[Tensor, Tensor]:
    """Physical block and in-block offset of each position (``< 0`` -> token 0)."""
    pos = positions.clamp_min(0).long()
    lead = pos.reshape(block_table.shape[0], -1)
    if block_size & (block_size - 1) == 0:
        # a power of two: shift and mask, ~8x faster than int64 division on CPU
        shift = block_size.bit_length() - 1
        logical, offsets = lead >> shift, pos & (block_size - 1)
    else:
        logical, offsets = lead // block_size, pos % block_size
    return block_table.long().gather(1, logical).view(pos.shape), offsets


def gather_pages(paged: Tensor, table: Tensor) -> Tensor:
    """Whole pages of ``paged`` (``[N, P, ...]``) in table order: ``[B, pages·P, ...]``.

    Row ``b``'s entry ``c`` is ``paged[table[b, c // P], c % P]``: what
    :func:`gather_rows` gives for positions ``0..pages·P-1``, one index per page.
    """
    B, pages = table.shape
    rows = paged.index_select(0, table.flatten().long())
    return rows.view(B, pages * paged.shape[1], *paged.shape[2:])


def gather_rows(cache: Tensor, blocks: Tensor, offsets: Tensor, heads: Tensor) -> Tensor:
    """``cache[blocks, offsets, heads]`` (broadcast index tensors) -> ``[*index, D]``.

    When every ``D``-vector is contiguous and the other strides are multiples
    of ``D`` (NHD pages, HND pages, vLLM-cpu's V half) the cache is one table
    of ``D``-rows and this is a single ``index_select``; otherwise advanced indexing.
    """
    D = cache.shape[-1]
    strides = cache.stride()[:3]
    if cache.stride(3) != 1 or any(s % D for s in strides) or cache.numel() == 0:
        return cache[blocks, offsets, heads]
    step_block, step_offset, step_head = (s // D for s in strides)
    n_rows = 1 + sum((n - 1) * s // D for n, s in zip(cache.shape[:3], strides))
    rows = cache.as_strided((n_rows, D), (D, 1))        # from the view's own storage offset
    index = blocks * step_block + offsets * step_offset + heads * step_head
    return rows.index_select(0, index.flatten()).view(*index.shape, D)


# -- partial attention states -------------------------------------------------
def merge_attention_states(outs: Tensor, lses: Tensor, dim: int = -2) -> tuple[Tensor, Tensor]:
    """Merge attention outputs computed over disjoint key sets.

    Parameters
    ----------
    outs : Tensor
        ``[..., S, D]`` normalized partial outputs (``S`` along ``dim``).
    lses : Tensor
        ``[..., S]`` their natural-log softmax denominators (``-inf`` = empty).
    dim : int
        The ``S`` axis of ``outs`` (``lses`` is ``outs`` without its last axis).

    Returns
    -------
    out : Tensor
        ``[..., D]`` fp32 output over the union of the key sets (0 if all empty).
    lse : Tensor
        ``[...]`` fp32 LSE over the union (``-inf`` if all empty).

    Used to combine split-K partials of the decode kernel, and by adapters to
    merge e.g. ShadowKV's reconstructed-key attention with the paged window.
    """
    lse_dim = dim + 1 if dim < 0 else dim
    lses = lses.float()
    m = lses.amax(dim=lse_dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all-empty rows stay 0, not nan
    w = torch.exp(lses - m)
    denom = w.sum(dim=lse_dim, keepdim=True)
    denom_ = denom.squeeze(lse_dim)
    out = (outs.float() * w.unsqueeze(-1)).sum(dim=dim) / denom_.clamp_min(1e-30).unsqueeze(-1)
    lse = (m.squeeze(lse_dim) + denom_.log())
    return out, lse
