"""Decode-step kernel timings against dense SDPA decode.

    python -m kvplug.kernels.bench --out DIR            # CUDA if available, else CPU
    python -m kvplug.kernels.bench --peak-gbs 3350      # H100 SXM HBM3: adds % of peak
    python -m kvplug.kernels.bench --smoke --out DIR    # tiny shapes on CPU, seconds

Random data, real shapes (Llama-3.1-8B attention: H_q=32, H_kv=8, D=128,
bf16 on CUDA), per context length and batch.  Rows:

* ``sdpa dense``: ``F.scaled_dot_product_attention`` over contiguous K/V, the
  GQA group folded into the query length (no K/V expansion);
* ``paged dense``: :func:`sparse_paged_decode` with every token selected;
* ``paged sparse``: sink + recent window + ``budget`` tokens in chunks (ShadowKV's
  2048-token budget in 8-token chunks by default);
* ``chunk scores``: :func:`chunk_topk` over landmarks of every chunk;
* ``lowrank keys``: :func:`lowrank_rope_keys` for the ``budget`` positions (rank 160).

``GB/s`` counts the bytes a kernel must move at least (K/V of the keys it
attends, summaries, factors, outputs); with ``--peak-gbs`` (4800 by default
on an H200) it is also given as a fraction of peak.  On CPU the torch paths
(the references) are timed at small sizes instead.

``--out`` writes ``results.md`` and ``results.json`` (every number, the
device, the command).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from .chunk_select import chunk_topk
from .common import rope_inv_freq
from .lowrank_rope import lowrank_rope_keys
from .sparse_decode import sparse_paged_decode


def _time_us(fn, device: str, reps: int) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=max(reps, 20)) * 1e3   # flushes L2 between runs
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def bench_context(L: int, B: int, args, device: str, dtype: torch.dtype) -> list[dict]:
    Hq, Hkv, D = args.num_q_heads, args.num_kv_heads, args.head_dim
    bs = args.block_size
    G, elt = Hq // Hkv, torch.finfo(dtype).bits // 8
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    q = randn(B, Hq, D)
    n_blk = -(-L // bs)
    k_cache, v_cache = randn(B * n_blk, bs, Hkv, D), randn(B * n_blk, bs, Hkv, D)
    table = torch.randperm(B * n_blk, device=device, generator=gen).view(B, n_blk).int()
    seq_lens = torch.full((B,), L, device=device, dtype=torch.int32)
    # SDPA's best case: contiguous [B, H_kv, L, D] K/V, the group as G queries per kv-head
    k_dense, v_dense = (c[table.long()].reshape(B, n_blk * bs, Hkv, D)[:, :L].transpose(1, 2)
                        .contiguous() for c in (k_cache, v_cache))
    q_grp = q.view(B, Hkv, G, D)

    cs = args.chunk_size
    n_chunks = L // cs
    k_sel = args.budget // cs
    chunk_ids = torch.argsort(torch.rand(B, Hkv, n_chunks, device=device, generator=gen), -1)
    chunk_ids = chunk_ids[..., :k_sel].sort(-1).values.int()
    landmarks = randn(B, n_chunks, Hkv, D)
    num_chunks = torch.full((B,), n_chunks, device=device, dtype=torch.int32)
    u, sv = randn(B, L, args.rank), randn(B, args.rank, Hkv * D)
    positions = (chunk_ids.long()[..., None] * cs + torch.arange(cs, device=device)).flatten(2)
    inv_freq = rope_inv_freq(D, 500000.0, device=device)

    kv_bytes = 2 * B * L * Hkv * D * elt
    n_keys = min(args.sink + args.recent + k_sel * cs, L)
    rows = []

    def add(kernel, fn, nbytes, check=""):
        us = _time_us(fn, device, args.reps)
        rows.append({"context": L, "batch": B, "kernel": kernel, "us": round(us, 2),
                     "bytes": nbytes, "gbs": round(nbytes / us / 1e3, 1), "check": check})

    sdpa = lambda: F.scaled_dot_product_attention(q_grp, k_dense, v_dense)          # noqa: E731
    dense = lambda: sparse_paged_decode(q, k_cache, v_cache, table, seq_lens, None,  # noqa: E731
                                        n_recent=L)
    err = (dense().float() - sdpa().reshape(B, Hq, D).float()).abs().max().item()
    add("sdpa dense", sdpa, kv_bytes)
    add("paged dense", dense, kv_bytes, f"max|paged-sdpa|={err:.1e}")
    add(f"paged sparse ({n_keys} keys)",
        lambda: sparse_paged_decode(q, k_cache, v_cache, table, seq_lens, chunk_ids, cs,
                                    args.sink, args.recent),
        2 * B * n_keys * Hkv * D * elt)
    add(f"chunk scores ({n_chunks} chunks)",
        lambda: chunk_topk(q, landmarks, num_chunks, k_sel),
        B * n_chunks * Hkv * D * elt + B * Hq * n_chunks * 4)
    N = positions.shape[-1]
    add(f"lowrank keys ({N} pos, r={args.rank})",
        lambda: lowrank_rope_keys(u, sv, positions, inv_freq),
        B * Hkv * N * (args.rank + D) * elt + B * args.rank * Hkv * D * elt)
    base = rows[0]["us"]
    for row in rows:
        row["vs_sdpa"] = round(base / row["us"], 2)
        row["peak_frac"] = (round(row["gbs"] / args.peak_gbs, 3) if args.peak_gbs else None)
    return rows


# tiny shapes for a CPU check of the whole script (CI): seconds, not minutes
SMOKE = dict(device="cpu", contexts=[256, 512], batches=[1, 2], num_q_heads=4, num_kv_heads=2,
             head_dim=32, block_size=16, budget=64, chunk_size=8, sink=4, recent=16, rank=16,
             reps=2)
# HBM peaks (GB/s) by device name, for the fraction-of-peak column
PEAK_GBS = {"H200": 4800.0, "H100": 3350.0}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m kvplug.kernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--contexts", type=int, nargs="+", default=None,
                   help="context lengths (default: 32k 64k 128k on CUDA, 2k 8k on CPU)")
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="batch sizes (default: 1 8 on CUDA, 1 on CPU)")
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=None,
                   help="KV page size (default 16 on CUDA, 128 on CPU as in vLLM)")
    p.add_argument("--budget", type=int, default=2048, help="selected tokens (ShadowKV: 2048)")
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--sink", type=int, default=16)
    p.add_argument("--recent", type=int, default=64)
    p.add_argument("--rank", type=int, default=160)
    p.add_argument("--peak-gbs", type=float, default=None,
                   help="peak memory bandwidth in GB/s (default: known for H200 4800, "
                        "H100 3350)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (on a busy box, 1 avoids OpenMP wake-up stalls)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU: checks the script end to end in seconds")
    p.add_argument("--out", default=None, help="directory for results.md and results.json")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args.contexts = args.contexts or ([32768, 65536, 131072] if device == "cuda" else [2048, 8192])
    args.batches = args.batches or ([1, 8] if device == "cuda" else [1])
    args.block_size = args.block_size or (16 if device == "cuda" else 128)
    name = (torch.cuda.get_device_name() if device == "cuda"
            else f"cpu, {torch.get_num_threads()} threads (torch reference paths)")
    if args.peak_gbs is None:
        args.peak_gbs = next((gbs for key, gbs in PEAK_GBS.items() if key in name), None)
    setting = (f"{name}, {dtype}, H_q={args.num_q_heads} H_kv={args.num_kv_heads} "
               f"D={args.head_dim} block={args.block_size} budget={args.budget} "
               f"chunk={args.chunk_size} sink={args.sink} recent={args.recent} rank={args.rank}")
    print(f"# {setting}", flush=True)
    rows = []
    for L in args.contexts:
        for B in args.batches:
            for row in bench_context(L, B, args, device, dtype):
                rows.append(row)
                print(_kernel_line(row), flush=True)
    report = {"device": name, "dtype": str(dtype).removeprefix("torch."), "setting": setting,
              "peak_gbs": args.peak_gbs, "torch": torch.__version__,
              "triton": getattr(triton, "__version__", None),
              "command": "python -m kvplug.kernels.bench " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "kernels": rows}
    _write(report, args.out)
    return report


def _write(report: dict, out: str | None) -> None:
    if out is None:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "results.md").write_text(markdown(report))
    print(f"# wrote {out / 'results.md'} and results.json", flush=True)


def _kernel_line(row: dict) -> str:
    peak = "" if row["peak_frac"] is None else f"{100 * row['peak_frac']:>6.1f}%"
    return (f"{row['context']:>8} B={row['batch']:<3} {row['kernel']:<34}{row['us']:>10.1f}"
            f"{row['gbs']:>9.1f}{peak}{row['vs_sdpa']:>8.2f}x  {row['check']}")


def markdown(report: dict) -> str:
    """The report as a markdown table."""
    lines = [f"# Decode kernels: {report['device']}", "", f"Setting: {report['setting']}; "
             f"HBM peak {report['peak_gbs'] or 'not given'} GB/s.", "",
             f"Command: `{report['command']}`", "",
             "| context | batch | kernel | µs | GB/s | % of peak | vs SDPA | check |",
             "|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in report["kernels"]:
        frac = "" if r["peak_frac"] is None else f"{100 * r['peak_frac']:.1f}%"
        lines.append(f"| {r['context']} | {r['batch']} | {r['kernel']} | {r['us']:.1f} | "
                     f"{r['gbs']:.1f} | {frac} | {r['vs_sdpa']:.2f}x | {r['check']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
