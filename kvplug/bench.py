"""``kvplug bench``: speed and KV memory of a kvplug policy against vLLM's default backend.

Each backend runs in its own process (``python -m kvplug.bench SPEC.json
RESULT.json``, the worker below) with the offline ``vllm.LLM`` API and the
same engine settings, so neither inherits the other's engine or patches.  Per
(batch, context) cell it generates 1 + N tokens for a batch of random prompts
and reads TTFT and the decode time from the engine's per-request timestamps,
not from wall-clock differences, which a shared machine's noise swamps.
Prefix caching is off, so every call prefills.  Results go to ``bench.json``
(every number, machine, versions, settings, command line), ``bench.md`` and
``bench.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TAG = "[kvplug bench]"
BACKENDS = ("kvplug", "default")  # kvplug first: a refused policy fails before the long default run


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text.strip()!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def int_list(text: str) -> list[int]:
    """``"1,4,8"`` -> ``[1, 4, 8]`` (sorted, unique); a bad item is named in the error."""
    try:
        return sorted({positive_int(item) for item in text.split(",")})
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (in {text!r})") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: kvplug models path)")
    p.add_argument("--policy", default=None,
                   help="kvplug policy (default: KVPLUG_POLICY / KVPLUG_CONFIG, else full)")
    p.add_argument("--config", default=None,
                   help="kvplug config as inline JSON, e.g. '{\"policy\": \"full\"}' "
                        "(overrides the environment; --policy overrides its policy)")
    p.add_argument("--batch", type=int_list, default=[1, 4, 8], help="batch sizes (default 1,4,8)")
    p.add_argument("--context", type=int_list, default=[1024, 4096, 8192],
                   help="prompt lengths in tokens (default 1024,4096,8192)")
    p.add_argument("--decode-tokens", type=positive_int, default=32,
                   help="decode steps timed after the first token (default 32)")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="measurements per cell; the median is reported (default 1)")
    p.add_argument("--kv-space-gb", type=positive_int, default=4,
                   help="VLLM_CPU_KVCACHE_SPACE: the KV pool in GB (default 4)")
    p.add_argument("--speculative-config", default=None,
                   help="vLLM speculative config (JSON) for the kvplug engine only, e.g. "
                        "kvplug's self-drafting; adds acceptance to the table")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--out", default=None,
                   help="output directory (default: evals/results/bench/<policy>)")


# -- worker: one engine, every cell -----------------------------------------------------------

def _prompts(rng, allowed, batch: int, context: int) -> list:
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=rng.choice(allowed, context).tolist())
            for _ in range(batch)]


SPEC_COUNTERS = {"draft_tokens": "vllm:spec_decode_num_draft_tokens",
                 "accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
                 "verify_steps": "vllm:spec_decode_num_drafts"}


def spec_decode_counts(llm) -> dict[str, float]:
    """vLLM's speculative-decoding counters so far (zeros without speculation; needs
    ``disable_log_stats=False``)."""
    metrics = llm.get_metrics()
    return {key: sum(m.value for m in metrics if m.name == name and hasattr(m, "value"))
            for key, name in SPEC_COUNTERS.items()}


def share(part: float, whole: float) -> float | None:
    """``part / whole`` to 3 places; ``None`` when there is no whole."""
    return round(part / whole, 3) if whole else None


def speculation_stats(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Over a cell's runs: acceptance and mean accepted length (vLLM's counters), and the
    share of the first tier's guesses kvplug's draft kept."""
    total = {k: sum(r.get(k, 0) for r in runs)
             for k in (*SPEC_COUNTERS, "first_tier_tokens_proposed", "first_tier_tokens_accepted")}
    return {**acceptance(*(total[k] for k in SPEC_COUNTERS)),
            "first_tier_acceptance": share(total["first_tier_tokens_accepted"],
                                           total["first_tier_tokens_proposed"])}


def draft_counts(llm) -> dict[str, float]:
    """kvplug's draft forwards, its first tier's tokens checked and kept, and the seconds
    spent drafting so far (zeros for engines that do not draft through kvplug)."""
    import kvplug.integrations.vllm as kv_vllm

    keys = ("draft_forwards", "first_tier_tokens_proposed", "first_tier_tokens_accepted")
    if not kv_vllm.attention_backends(llm).get(kv_vllm.BACKEND_NAME):
        return {**dict.fromkeys(keys, 0), "draft_s": 0.0}
    states = kv_vllm.request_states(llm)
    return {**{k: states.get(k, 0) for k in keys}, "draft_s": states.get("draft_us", 0) / 1e6}


def acceptance(draft_tokens: float, accepted_tokens: float, verify_steps: float) -> dict:
    """Share of drafts accepted and tokens per verification step (the accepted drafts plus
    the token it samples); ``None`` without drafts."""
    return {"acceptance": share(accepted_tokens, draft_tokens),
            "mean_accepted_length": round(1 + accepted_tokens / verify_steps, 2)
            if verify_steps else None}


def timed_generate(llm, prompts, params) -> tuple[dict[str, float], list]:
    """One batch, timed by the engine's own per-request timestamps; (timing, vLLM's
    speculative-decoding counts and kvplug's drafting counts, the request outputs).

    TTFT is the slowest request's first-token latency (the batch's prefill).
    Decode time is the N decode steps of the request that got its first token
    last: no prefill is left by then.  The engine starts on the first request
    before the others arrive, so that one runs a step ahead; the token budget
    puts all the others in the next step, so the batch stays together.
    """
    def counts_now() -> dict[str, float]:
        return {**spec_decode_counts(llm), **draft_counts(llm)}

    counts = counts_now()
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    m = [o.metrics for o in outputs]
    last = max(m, key=lambda x: x.first_token_ts)
    return {"ttft_s": max(x.first_token_latency for x in m),
            "decode_s": last.last_token_ts - last.first_token_ts,
            "first_token_spread_s": last.first_token_ts - min(x.first_token_ts for x in m),
            "wall_s": wall,
            **{k: v - counts[k] for k, v in counts_now().items()}}, outputs


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    import kvplug.integrations.vllm as kv_vllm

    backend, n = spec["backend"], spec["decode_tokens"]
    extra = ({"attention_backend": "kvplug", "additional_config": {"kvplug": spec["kvplug_config"]}}
             if backend == "kvplug" else {})
    if backend == "kvplug" and spec.get("speculative_config"):
        extra["speculative_config"] = spec["speculative_config"]
    llm = LLM(spec["model"], **spec["engine"], **extra)
    backends = kv_vllm.attention_backends(llm)
    if backend == "kvplug" and set(backends) != {kv_vllm.BACKEND_NAME}:
        raise RuntimeError(f"asked for kvplug but the attention layers run {backends}")
    vc = llm.llm_engine.vllm_config
    mc, cc, sc = vc.model_config, vc.cache_config, vc.scheduler_config
    kv_bytes_per_token = kv_vllm.pool_bytes_per_token(llm)
    tok = llm.get_tokenizer()
    special = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    allowed = np.array([i for i in range(mc.get_vocab_size()) if i not in special])
    rng = np.random.default_rng(spec["seed"])
    params = SamplingParams(max_tokens=1 + n, ignore_eos=True, detokenize=False)
    timed_generate(llm, _prompts(rng, allowed, 1, 16), params)  # warm-up (kvplug's side stores too)
    pool_tokens = kv_vllm.pool_tokens(llm)
    side_bytes_per_token = kv_vllm.side_bytes(llm) / pool_tokens if backend == "kvplug" else 0
    cells = []
    for context in spec["contexts"]:
        for batch in spec["batches"]:
            runs = [timed_generate(llm, _prompts(rng, allowed, batch, context), params)[0]
                    for _ in range(spec["repeats"])]
            cells.append({"batch": batch, "context": context, "runs": runs})
            ttft = statistics.median(r["ttft_s"] for r in runs)
            decode = statistics.median(r["decode_s"] for r in runs)
            print(f"{TAG} {backend} batch={batch} context={context}: TTFT {ttft:.2f}s, "
                  f"decode {batch * n / decode:.1f} tok/s", flush=True)
    return {"backend": backend, "cells": cells,
            "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
            "attention_backends": backends,
            "pool_blocks": cc.num_gpu_blocks, "pool_tokens": pool_tokens,
            "block_size": cc.block_size,
            "kv_bytes_per_token": kv_bytes_per_token,
            "side_bytes_per_token": side_bytes_per_token,
            "engine": {"max_model_len": mc.max_model_len, "dtype": str(mc.dtype),
                       "kv_cache_dtype": cc.cache_dtype,
                       "max_num_batched_tokens": sc.max_num_batched_tokens,
                       "max_num_seqs": sc.max_num_seqs,
                       "chunked_prefill": sc.enable_chunked_prefill}}


def worker(spec_path: str, result_path: str) -> int:
    """Measure one backend; write the result, or ``{"error": ...}`` when the engine fails."""
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = _measure(spec)
    except Exception as e:  # reported by the parent, which has the user's terminal
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    Path(result_path).write_text(json.dumps(result))
    return 1 if "error" in result else 0


# -- parent: run the workers, then tables -----------------------------------------------------

def _run_worker(spec: dict[str, Any], env: dict[str, str], workdir: Path) -> dict[str, Any]:
    """Run one worker, echo its progress lines, return its result or raise with its error."""
    from kvplug.demo import stop_server

    backend = spec["backend"]
    spec_path, result_path = workdir / f"{backend}.spec.json", workdir / f"{backend}.result.json"
    log = workdir / f"{backend}.log"
    spec_path.write_text(json.dumps(spec))
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kvplug.bench", str(spec_path),
                                 str(result_path)], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    print(f"{TAG} {backend}: engine starting (log: {log})", flush=True)
    seen = 0
    try:
        while True:
            done = proc.poll() is not None
            data = log.read_bytes()
            end = data.rfind(b"\n") + 1
            for line in data[seen:end].decode(errors="replace").splitlines():
                if line.startswith(TAG):
                    print(line, flush=True)
            seen = end
            if done:
                break
            time.sleep(1)
    finally:
        stop_server(proc)  # the engine processes it spawned, too
    if not result_path.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{backend} worker exited with code {proc.returncode}; "
                           f"log {log}:\n{tail}")
    result = json.loads(result_path.read_text())
    if "error" in result:
        raise RuntimeError(f"{backend} engine failed: {result['error']} (log: {log})")
    return result


def ceil_to_block(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size) * block_size


def build_rows(results: list[dict[str, Any]], decode_tokens: int, policy) -> list[dict[str, Any]]:
    """One row per (backend, batch, context): medians, per-token rates, speedup, KV sizes."""
    n = decode_tokens
    rows = []
    for res in results:
        bs, bpt = res["block_size"], res["kv_bytes_per_token"]
        for cell in res["cells"]:
            b, ctx, runs = cell["batch"], cell["context"], cell["runs"]
            decode = statistics.median(r["decode_s"] for r in runs)
            read = policy.kv_tokens_read(ctx) if res["backend"] == "kvplug" else ctx
            rows.append({"backend": res["backend"], "batch": b, "context": ctx,
                         "ttft_s": statistics.median(r["ttft_s"] for r in runs),
                         "decode_s": decode,
                         "tpot_ms": 1000 * decode / n, "decode_tok_s": b * n / decode,
                         "kv_bytes_per_token": bpt,
                         "side_bytes_per_token": res["side_bytes_per_token"],
                         "kv_tokens_read_per_step": read,
                         "kv_bytes_read_per_step": read * bpt,
                         "requests_fit": res["pool_tokens"] // ceil_to_block(ctx + n, bs),
                         **speculation_stats(runs)})
    base = {(r["batch"], r["context"]): r["decode_tok_s"]
            for r in rows if r["backend"] == "default"}
    for r in rows:
        ref = base.get((r["batch"], r["context"]))
        r["speedup"] = r["decode_tok_s"] / ref if ref else None
    # default above kvplug in each cell, so the table reads pairwise
    return sorted(rows, key=lambda r: (r["context"], r["batch"], r["backend"] != "default"))


def _size(nbytes: float) -> str:
    units = ["B", "KiB", "MiB", "GiB"]
    while nbytes >= 1024 and len(units) > 1:
        nbytes /= 1024
        units.pop(0)
    return f"{nbytes:.1f} {units[0]}"


def or_dash(value) -> str:
    return "-" if value is None else str(value)


def markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    v = report["versions"]
    speculative = s.get("speculative_config")
    lines = [f"# kvplug bench: policy `{s['policy']}` vs vLLM default backend", "",
             f"Machine: {m['cpu']}, {m['cores']} cores. Versions: kvplug {v['kvplug']}, "
             f"vllm {v['vllm']}, torch {v['torch']}. Model `{s['model']}`, "
             f"{s['decode_tokens']} decode tokens, median of {s['repeats']}, KV pool "
             f"{s['kv_space_gb']} GB ({report['pool_tokens']} tokens). Engine (both backends): "
             + ", ".join(f"{k}={v}" for k, v in s["engine"].items()) + ".", "",
             f"Command: `{report['command']}` ({report['wall_s'] / 60:.0f} min)", "",
             "TTFT: until the batch's last first token. TPOT: the N decode steps of the request "
             "prefilled last (engine timestamps); decode tok/s = batch / TPOT; speedup: over "
             "default, same cell. KV read/step/seq: what one decode step reads per sequence "
             "(the policy's kv_tokens_read). Side bytes/token: what kvplug keeps beside the pool "
             "(key summaries, row-major key copies), per pool token, measured in the engine. "
             "Requests that fit: KV pool tokens / (context + N, rounded up to a block)."
             + (f" The kvplug engine speculates ({json.dumps(speculative)}); acceptance: drafts "
                "accepted / proposed; mean accepted length: tokens per verification step "
                "(vLLM's counters); first-tier acceptance: the first tier's guesses kvplug's draft "
                "kept / checked." if speculative else ""), "",
             "| backend | batch | context | TTFT s | TPOT ms | decode tok/s | speedup | "
             "KV bytes/token | side bytes/token | KV read/step/seq | requests that fit |"
             + (" acceptance | mean accepted length | first-tier acceptance |"
                if speculative else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
             + ("---:|---:|---:|" if speculative else "")]
    for r in report["rows"]:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        lines.append(f"| {r['backend']} | {r['batch']} | {r['context']} | {r['ttft_s']:.2f} | "
                     f"{r['tpot_ms']:.1f} | {r['decode_tok_s']:.1f} | {speedup} | "
                     f"{r['kv_bytes_per_token']} | {r['side_bytes_per_token']:.0f} | "
                     f"{_size(r['kv_bytes_read_per_step'])} | "
                     f"{r['requests_fit']} |"
                     + (f" {or_dash(r['acceptance'])} | {or_dash(r['mean_accepted_length'])} | "
                        f"{or_dash(r.get('first_tier_acceptance'))} |" if speculative else ""))
    if s["long_max_model_len"]:
        lines += ["", "Context + decode tokens exceed the model's positions: run with "
                  "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 (same compute; outputs past them are not "
                  "meaningful)."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    batches = sorted({r["batch"] for r in rows})
    colors = dict(zip(batches, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10))
    for backend, style in (("default", "--"), ("kvplug", "-")):
        for b in batches:
            pts = sorted((r["context"], r["decode_tok_s"]) for r in rows
                         if r["backend"] == backend and r["batch"] == b)
            if pts:
                ax.plot(*zip(*pts), style, marker="o", color=colors[b], label=f"{backend} b={b}")
    ax.set_xscale("log", base=2)
    contexts = sorted({r["context"] for r in rows})
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out: Path) -> str:
    """bench.json, bench.md, bench.png in ``out``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    (out / "bench.md").write_text(md)
    plot(report["rows"], out / "bench.png",
         f"decode tok/s: {report['settings']['policy']} vs default")
    return md


def print_and_save(out: str | None, name: str, result: dict, text: str) -> None:
    """Print an eval's markdown ``text``; with ``out``, write it as ``name.md`` and
    ``result`` as ``name.json`` there."""
    print(text)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        (folder / f"{name}.md").write_text(text)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "platform": platform.platform()}


def _json_object(option: str, text: str | None) -> dict:
    """An option's inline JSON object (``{}`` when not given); bad JSON is named."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{option} is not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    from kvplug import models
    from kvplug.config import resolve_config

    model = args.model or str(models.model_dir(None))
    if not Path(model).is_dir():
        raise FileNotFoundError(f"model directory {model!r} does not exist; run "
                                "`kvplug models fetch` or pass --model DIR")
    cli = _json_object("--config", args.config)
    speculative = _json_object("--speculative-config", args.speculative_config) or None
    if args.policy:
        cli["policy"] = args.policy
    config = resolve_config({"kvplug": cli})  # raises on bad names/parameters, before any engine
    policy = config.build_policy()
    kvplug_config = {"policy": config.policy, **config.params}
    n = args.decode_tokens
    max_len = max(args.context) + n
    positions = json.loads((Path(model) / "config.json").read_text()).get("max_position_embeddings")
    long_len = positions is not None and max_len > positions
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.kv_space_gb),
               VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    if long_len:
        env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    # disable_log_stats=False: per-request timestamps; the token budget: see _timed
    engine = {"dtype": "float32", "enforce_eager": True, "enable_prefix_caching": False,
              "max_model_len": max_len, "max_num_batched_tokens": max(args.batch) * max_len,
              "max_num_seqs": max(args.batch), "disable_log_stats": False, "seed": args.seed}
    out = Path(args.out or f"evals/results/bench/{config.policy}")
    print(f"{TAG} policy={config.policy} params={config.params} model={model} "
          f"batch={args.batch} context={args.context} decode_tokens={n} "
          f"repeats={args.repeats} out={out}", flush=True)
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="kvplug-bench-"))  # worker logs, kept
    results = []
    for backend in BACKENDS:
        spec = {"backend": backend, "model": model, "engine": engine,
                "kvplug_config": kvplug_config, "speculative_config": speculative,
                "batches": args.batch, "contexts": args.context,
                "decode_tokens": n, "repeats": args.repeats, "seed": args.seed}
        results.append(_run_worker(spec, env, workdir))
        print(f"{TAG} {backend} done at {time.monotonic() - t0:.0f}s", flush=True)
    default = next(r for r in results if r["backend"] == "default")
    report = {
        "command": shlex.join(["kvplug", *sys.argv[1:]]),
        "machine": machine(),
        "versions": {"kvplug": version("kvplug"), **default["versions"]},
        "settings": {"policy": config.policy, "policy_params": policy.params(),
                     "kvplug_config": kvplug_config, "speculative_config": speculative,
                     "model": Path(model).name,  # a name, not this machine's path
                     "batches": args.batch,
                     "contexts": args.context, "decode_tokens": n, "repeats": args.repeats,
                     "seed": args.seed, "kv_space_gb": args.kv_space_gb, "engine": engine,
                     "engine_resolved": default["engine"], "long_max_model_len": long_len,
                     "env": {k: env[k] for k in ("VLLM_CPU_KVCACHE_SPACE",
                                                 "VLLM_CPU_NUM_OF_RESERVED_CPU",
                                                 "VLLM_ALLOW_LONG_MAX_MODEL_LEN") if k in env}},
        "pool_tokens": default["pool_tokens"],
        "wall_s": round(time.monotonic() - t0, 1),
        "backends": {r["backend"]: {k: r[k] for k in ("attention_backends", "pool_blocks",
                                                      "block_size", "kv_bytes_per_token", "cells")}
                     for r in results},
        "rows": build_rows(results, n, policy),
    }
    md = write_outputs(report, out)
    print(md)
    print(f"{TAG} wrote {out}/bench.json, bench.md, bench.png in {report['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(worker(*sys.argv[1:]))
