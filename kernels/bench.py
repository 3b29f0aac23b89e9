"""Decode-step kernel timings against dense SDPA decode.

    python -m kvplug.kernels.bench                      # CUDA if available, else CPU
    python -m kvplug.kernels.bench --peak-gbs 3350      # H100 SXM HBM3: adds % of peak

Random weights, real shapes (Llama-3-8B attention: H_q=32, H_kv=8, D=128,
bf16 on CUDA).  Rows, per context length:

* ``sdpa dense``: ``F.scaled_dot_product_attention`` over contiguous K/V, the
  GQA group folded into the query length (no K/V expansion);
* ``paged dense``: :func:`sparse_paged_decode` with every token selected;
* ``paged sparse``: sink + recent window + ``budget`` tokens in chunks (ShadowKV's
  2048-token budget in 8-token chunks by default);
* ``chunk scores``: :func:`chunk_topk` over landmarks of every chunk;
* ``lowrank keys``: :func:`lowrank_rope_keys` for the ``budget`` positions (rank 160).

``GB/s`` counts the bytes a kernel must move at least (K/V, summaries,
factors, outputs); with ``--peak-gbs`` it is also given as a fraction of peak.
On CPU the torch paths (the references) are timed at small sizes instead.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

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


def bench_context(L: int, args, device: str,
                  dtype: torch.dtype) -> list[tuple[str, float, float, str]]:
    B, Hq, Hkv, D = args.batch, args.num_q_heads, args.num_kv_heads, args.head_dim
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

    def add(name, fn, nbytes, check=""):
        us = _time_us(fn, device, args.reps)
        rows.append((name, us, nbytes / us / 1e3, check))

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
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kvplug.kernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--contexts", type=int, nargs="+", default=None,
                   help="context lengths (default: 32k 64k 128k on CUDA, 2k 8k on CPU)")
    p.add_argument("--batch", type=int, default=1)
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
                   help="peak memory bandwidth in GB/s, e.g. 3350 (H100 SXM), 4800 (H200)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (on a busy box, 1 avoids OpenMP wake-up stalls)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args.contexts = args.contexts or ([32768, 65536, 131072] if device == "cuda" else [2048, 8192])
    args.block_size = args.block_size or (16 if device == "cuda" else 128)
    name = (torch.cuda.get_device_name() if device == "cuda"
            else f"cpu, {torch.get_num_threads()} threads (torch reference paths)")
    print(f"# {name}, {dtype}, B={args.batch} H_q={args.num_q_heads} H_kv={args.num_kv_heads} "
          f"D={args.head_dim} block={args.block_size} budget={args.budget} chunk={args.chunk_size} "
          f"sink={args.sink} recent={args.recent}")
    peak = f"{'% peak':>7}" if args.peak_gbs else ""
    print(f"{'context':>8}  {'kernel':<34}{'us':>10}{'GB/s':>9}{peak}{'vs sdpa':>9}  check")
    for L in args.contexts:
        rows = bench_context(L, args, device, dtype)
        base = rows[0][1]
        for name, us, gbs, check in rows:
            frac = f"{100 * gbs / args.peak_gbs:>6.1f}%" if args.peak_gbs else ""
            print(f"{L:>8}  {name:<34}{us:>10.1f}{gbs:>9.1f}{frac}{base / us:>8.2f}x  {check}")


if __name__ == "__main__":
    main()
