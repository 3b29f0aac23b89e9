"""``kvplug capacity``: how many long requests a KV pool really serves at once.

Every backend (vLLM's default, then each kvplug config) runs in its own process
(``python -m kvplug.capacity SPEC.json RESULT.json``) with the engine core in
that process, so the scheduler is read directly after every step: requests
running and waiting, the pool's free blocks, preemptions.  All requests are
queued at once (distinct random prompts, prefix caching off); the engine admits
what its pool holds.  Reported per backend: the most requests decoding at once,
the decode tokens/s of the largest batch that ran decode-only steps (no prefill, no
replay chunk; median engine step time), the fewest free blocks, preemptions, and the
whole run's output tokens/s.  Results: ``capacity.json``, ``capacity.md`` and ``capacity.png``; each
backend's run is kept (``run-*.json``) as it finishes, so a rerun only runs what is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvplug.bench import machine, positive_int

TAG = "[kvplug capacity]"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: kvplug models path)")
    p.add_argument("--config", action="append", default=[],
                   help="a kvplug config as inline JSON (repeat for several); vLLM's default "
                        "backend always runs first")
    p.add_argument("--context", type=positive_int, default=8192, help="prompt tokens (8192)")
    p.add_argument("--requests", type=positive_int, default=16,
                   help="requests queued at once (16)")
    p.add_argument("--default-requests", type=positive_int, default=None,
                   help="requests for vLLM's default backend and 'full' (default: --requests)")
    p.add_argument("--decode-tokens", type=positive_int, default=64,
                   help="tokens generated per request (64)")
    p.add_argument("--kv-space-gb", type=positive_int, default=1,
                   help="VLLM_CPU_KVCACHE_SPACE in GiB (1)")
    p.add_argument("--default-kv-dtype", action="append", default=[], choices=["fp8"],
                   help="also run vLLM's default backend with this --kv-cache-dtype (its own "
                        "quantized KV, the peer of a quantizing policy; repeatable)")
    p.add_argument("--out", type=Path, default=Path("evals/results/capacity"),
                   help="output directory")


def _config(text: str) -> dict:
    """A ``--config``: the policy with its parameters and any engine keys given (validated
    as a kvplug config; a bad name or value raises before any engine starts)."""
    from kvplug.config import ENGINE_KEYS, PolicyConfig, resolve_config

    data = json.loads(text)
    config = resolve_config({"kvplug": data}, environ={})
    engine = {key: value for key, value in data.items() if key in ENGINE_KEYS}
    return {**PolicyConfig(config.policy, config.params).as_dict(), **engine}


def run(args: argparse.Namespace) -> int:
    from kvplug.models import fetch_model

    model = str(fetch_model(args.model))
    configs = [_config(c) for c in args.config]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    backends = [(None, "auto"), *[(None, dtype) for dtype in args.default_kv_dtype],
                *[(config, "auto") for config in configs]]
    for config, kv_dtype in backends:
        dense = config is None and kv_dtype == "auto" or config and config["policy"] == "full"
        spec = {"model": model, "config": config, "context": args.context,
                "requests": (args.default_requests or args.requests) if dense else args.requests,
                "decode_tokens": args.decode_tokens, "kv_space_gb": args.kv_space_gb}
        if kv_dtype != "auto":
            spec["kv_cache_dtype"] = kv_dtype
        label = json.dumps(config) if config else (
            "vLLM default" + ("" if kv_dtype == "auto" else f", --kv-cache-dtype {kv_dtype}"))
        # each backend's run is kept as it finishes; a rerun with the same spec reuses it
        done = args.out / f"run-{hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:12]}.json"
        if not done.exists():
            print(f"{TAG} {label}: {spec['requests']} requests of {args.context} tokens",
                  flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                spec_file = Path(tmp, "spec.json")
                spec_file.write_text(json.dumps(spec))
                subprocess.run([sys.executable, "-m", "kvplug.capacity", str(spec_file),
                                str(done)], check=True)
        results.append({"label": label, **json.loads(done.read_text())})
    report = {"command": "kvplug capacity " + shlex.join(sys.argv[2:]),
              "machine": machine(),
              "model": Path(model).name, "context": args.context,
              "decode_tokens": args.decode_tokens, "kv_space_gb": args.kv_space_gb,
              "results": results}
    (args.out / "capacity.json").write_text(json.dumps(report, indent=1))
    (args.out / "capacity.md").write_text(_table(report))
    _plot(report, args.out / "capacity.png")
    print(_table(report))
    return 0


def _table(report: dict) -> str:
    base = report["results"][0]
    lines = [f"# KV pool capacity at {report['context']} tokens", "",
             f"`{report['command']}`", "",
             f"{report['model']}, float32, `VLLM_CPU_KVCACHE_SPACE={report['kv_space_gb']}`, "
             f"{report['decode_tokens']} tokens per request, {report['machine']['cpu']} "
             f"({report['machine']['cores']} cores). Every number "
             "is read from the engine's scheduler after each step.", "",
             "| backend | KV bytes per token | pool blocks (tokens) | requests "
             "| most decoding at once | vs default "
             "| decode tok/s (batch, steps) | vs default | fewest free blocks (tokens) "
             "| preemptions "
             "| output tok/s (whole run) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        # a token takes a block slot in each KV-cache group (one per layer with layer groups)
        tokens = r["block_size"] / r.get("kv_cache_groups", 1)
        lines.append(
            f"| {r['label']} | {r.get('kv_bytes_per_token', '')} | "
            f"{r['pool_blocks']} ({r['pool_blocks'] * tokens:.0f}) | "
            f"{r['requests']} | {r['max_decoding']} | {r['max_decoding'] / base['max_decoding']:.1f}x | "
            f"{r['decode_tok_s']:.1f} ({r['decode_batch']}, {r['decode_steps']}) | "
            f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x | "
            f"{r['min_free']} ({r['min_free'] * tokens:.0f}) | {r['preemptions']} | "
            f"{r['output_tok_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for r in report["results"]:
        ax.plot([s["t"] for s in r["steps"]], [s["decoding"] for s in r["steps"]],
                label=r["label"])
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests decoding")
    ax.set_title(f"{report['model']}, {report['context']}-token prompts, "
                 f"{report['kv_space_gb']} GiB KV pool")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def worker(spec_path: str, result_path: str) -> None:
    """One backend's run (in its own process; the engine core in this one)."""
    spec = json.loads(Path(spec_path).read_text())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec["kv_space_gb"])
    import torch
    from tqdm import tqdm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import kvplug.integrations.vllm as kv_vllm

    extra = {} if spec["config"] is None else {
        "attention_backend": "kvplug", "additional_config": {"kvplug": spec["config"]}}
    llm = LLM(spec["model"], dtype="float32", enforce_eager=True, enable_prefix_caching=False,
              max_model_len=spec["context"] + spec["decode_tokens"], max_num_seqs=64,
              kv_cache_dtype=spec.get("kv_cache_dtype", "auto"), **extra)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    vocab = llm.get_tokenizer().vocab_size
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=spec["decode_tokens"], temperature=0.0, ignore_eos=True)
    for i in range(spec["requests"]):
        ids = torch.randint(100, vocab - 100, (spec["context"],), generator=generator).tolist()
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=ids), params)
    steps, preempted, replayed, start = [], set(), 0, time.perf_counter()
    with tqdm(total=spec["requests"], desc="finished", unit="req") as bar:
        while engine.has_unfinished_requests():
            begin = time.perf_counter()
            outputs = engine.step()
            took = time.perf_counter() - begin
            bar.update(sum(o.finished for o in outputs))
            running = scheduler.running
            preempted |= {r.request_id for r in [*running, *scheduler.waiting]
                          if r.num_preemptions}
            # a request whose replay is pending is past its prompt but held out of the steps
            states = kv_vllm.request_states(llm)
            decoding = (sum(r.num_computed_tokens >= r.num_prompt_tokens for r in running)
                        - states.get("replaying", 0))
            replays = states.get("replay_forwards", 0) - replayed
            replayed += replays
            steps.append({"t": time.perf_counter() - start, "step_s": took,
                          "running": len(running), "decoding": decoding, "replays": replays,
                          "waiting": len(scheduler.waiting), "free": pool.get_num_free_blocks(),
                          "only_decodes": decoding == len(running) and bool(running)
                          and not replays})
    elapsed = time.perf_counter() - start
    # the largest batch that ran decode-only steps (3 at least), and its step time
    batches = {}
    for s in steps:
        if s["only_decodes"]:
            batches.setdefault(s["decoding"], []).append(s["step_s"])
    batch = max((b for b, times in batches.items() if len(times) >= 3), default=max(batches))
    result = {"requests": spec["requests"], "block_size": llm.llm_engine.vllm_config
              .cache_config.block_size, "pool_blocks": pool.num_gpu_blocks - 1,
              "kv_cache_groups": len(scheduler.kv_cache_manager.coordinator.single_type_managers),
              "kv_bytes_per_token": kv_vllm.pool_bytes_per_token(llm),
              "max_decoding": max(s["decoding"] for s in steps), "decode_batch": batch,
              "decode_steps": len(batches[batch]),
              "decode_tok_s": batch / statistics.median(batches[batch]),
              "min_free": min(s["free"] for s in steps), "preemptions": len(preempted),
              "output_tok_s": spec["requests"] * spec["decode_tokens"] / elapsed,
              "seconds": elapsed, "steps": steps}
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    worker(*sys.argv[1:])
