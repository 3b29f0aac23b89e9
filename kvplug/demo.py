"""The main job: ``vllm serve`` with kvplug, one long-context request, result printed.

Starts a real ``vllm serve MODEL --attention-backend kvplug`` on 127.0.0.1,
sends a passkey hidden in a long prompt through the ``openai`` client, prints
the answer, the latency, the KV pool the request held as the server reports it
(``vllm:kv_cache_usage_perc`` on ``/metrics``, polled while the request runs)
and kvplug's per-request stats (the server's log line for that request), then
stops the server and everything it spawned.  With ``--compare CONFIG`` the same
request is then served again by a server running that kvplug config (e.g. a
policy that keeps less), so the two answers, latencies and KV pools stand side
by side.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvplug.bench import positive_int

READY_TIMEOUT_S = 600


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: kvplug models path)")
    p.add_argument("--context-tokens", type=int, default=7000,
                   help="prompt length in the model's tokens (default 7000)")
    p.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1]")
    p.add_argument("--seed", type=int, default=0, help="picks the passkey")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--kv-space-gb", type=positive_int, default=2,
                   help="VLLM_CPU_KVCACHE_SPACE (GiB, an integer as vLLM reads it)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--compile", action="store_true",
                   help="let vLLM torch.compile the model (minutes of startup on a small CPU)")
    p.add_argument("--compare", default=None, metavar="CONFIG",
                   help="a kvplug config (inline JSON) to serve the same request with "
                        "afterwards, e.g. '{\"policy\": \"snapkv\", \"budget_ratio\": 0.25}'")
    p.add_argument("--max-tokens", type=positive_int, default=24, help="tokens to generate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {proc.returncode}; "
                               f"last log lines:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vllm serve was not ready after {READY_TIMEOUT_S}s:\n{tail(log)}")


def tail(log: Path, n: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGINT the server's process group, then SIGKILL whatever is left of it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # engine processes that outlived the API server
        proc.poll()  # reap the API server, else its zombie keeps the group alive
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise RuntimeError(f"processes of the server's group {proc.pid} survived SIGKILL")


def request_stats(log: Path, request_id: str, timeout: float = 30) -> str | None:
    """kvplug's finish line for ``request_id`` from the server log.

    The worker learns a request finished on the engine's next step, so the
    line can trail the HTTP response by a moment.
    """
    pattern = re.compile(rf"kvplug request {re.escape(request_id)}\S* finished: (.*)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = pattern.search(log.read_text(errors="replace"))
        if m:
            return m.group(1)
        time.sleep(0.5)
    return None


class PoolUse:
    """Polls the server's ``/metrics`` while a request runs: the share of the KV pool's
    blocks in use (``vllm:kv_cache_usage_perc``) and the pool's blocks
    (``vllm:cache_config_info``); the tokens the pool holds are the engine's own count (its
    log's ``KV cache size``: a token takes a block in each KV-cache group)."""

    def __init__(self, url: str, log: Path, every_s: float = 0.05) -> None:
        import threading

        self.url, self.every_s = url + "/metrics", every_s
        self.samples: list[float] = []
        self.blocks = self.block_size = 0
        found = re.search(r"KV cache size: ([\d,]+) tokens", log.read_text(errors="replace"))
        self.pool_tokens = int(found.group(1).replace(",", "")) if found else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> PoolUse:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        import urllib.request

        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    text = r.read().decode()
            except OSError:
                text = ""
            for line in text.splitlines():
                if line.startswith("vllm:kv_cache_usage_perc"):
                    self.samples.append(float(line.rsplit(" ", 1)[1]))
                elif line.startswith("vllm:cache_config_info"):
                    info = dict(re.findall(r'(\w+)="([^"]*)"', line))
                    self.blocks = int(info.get("num_gpu_blocks") or 0)
                    self.block_size = int(info.get("block_size") or 0)
            time.sleep(self.every_s)

    def tokens(self, share: float) -> int:
        return round(share * self.pool_tokens)

    def summary(self) -> str:
        """The most of the pool the request held, and the least once past that peak (its
        decode, after a compressing policy freed what it evicted)."""
        if not self.samples or not self.blocks or not self.pool_tokens:
            return "not reported by the server"
        peak = max(self.samples)
        after = [s for s in self.samples[self.samples.index(peak):] if s > 0] or [peak]
        return (f"peak {self.tokens(peak)} tokens ({peak:.1%}), decoding {self.tokens(min(after))} "
                f"tokens ({min(after):.1%}) of a {self.pool_tokens}-token pool ({self.blocks} "
                f"blocks of {self.block_size})")


def serve_once(args: argparse.Namespace, model: str, sample, env: dict, label: str) -> bool:
    """One server, one request: print what it answered and held; True if it was right."""
    from openai import OpenAI

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="kvplug-demo-")) / "vllm-serve.log"
    vllm_cli = Path(sys.executable).with_name("vllm")  # the `vllm` console script of this env
    cmd = [str(vllm_cli), "serve", model,
           "--attention-backend", "kvplug", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", str(args.max_model_len),
           "--served-model-name", "kvplug-demo"]
    if not args.compile:
        cmd.append("--enforce-eager")
    tag = f"[kvplug demo {label}]"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    print(f"{tag} started server pid {proc.pid}: {' '.join(cmd)}  (log: {log})", flush=True)
    try:
        t0 = time.monotonic()
        wait_ready(proc, url, log)
        print(f"{tag} server ready in {time.monotonic() - t0:.0f}s", flush=True)
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        with PoolUse(url, log) as pool:
            t0 = time.monotonic()
            resp = client.completions.create(model="kvplug-demo", prompt=sample.prompt,
                                             max_tokens=args.max_tokens, temperature=0.0)
            latency = time.monotonic() - t0
        answer = resp.choices[0].text
        correct = sample.answer in answer
        print(f"{tag} answer: {answer.strip()!r}")
        print(f"{tag} expected passkey {sample.answer}: {'CORRECT' if correct else 'WRONG'}")
        print(f"{tag} latency {latency:.2f}s, prompt_tokens={resp.usage.prompt_tokens} "
              f"completion_tokens={resp.usage.completion_tokens}")
        print(f"{tag} KV pool held (the server's metrics): {pool.summary()}")
        stats = request_stats(log, resp.id)
        print(f"{tag} kvplug stats: {stats or 'not found in the server log'}", flush=True)
        if stats is None:
            raise RuntimeError(f"kvplug's stats line for {resp.id} is not in the server log")
        return correct
    finally:
        stop_server(proc)
        print(f"{tag} server stopped", flush=True)


def run(args: argparse.Namespace) -> int:
    import json

    from transformers import AutoTokenizer

    from kvplug import models
    from kvplug.config import PolicyConfig
    from kvplug.evals.passkey import passkey_sample

    model = args.model or str(models.model_dir(None))
    if not Path(model).is_dir():
        raise FileNotFoundError(f"model directory {model!r} does not exist; run "
                                "`kvplug models fetch` or pass --model DIR")
    compare = None
    if args.compare is not None:
        compare = PolicyConfig.parse(json.loads(args.compare), "--compare").as_dict()
    sample = passkey_sample(AutoTokenizer.from_pretrained(model), args.context_tokens,
                            depth=args.depth, seed=args.seed)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.kv_space_gb))
    # vLLM-cpu keeps one core for the frontend by default: half the cores on a 2-core box.
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    policy = env.get("KVPLUG_CONFIG") or env.get("KVPLUG_POLICY") or "full (default)"
    print(f"[kvplug demo] policy={policy} model={model} prompt={sample.num_tokens} tokens, "
          f"needle depth={sample.depth}")
    correct = serve_once(args, model, sample, env, policy.split()[0])
    if compare is not None:
        print(f"[kvplug demo] the same request with {json.dumps(compare)}")
        env = {k: v for k, v in env.items() if k != "KVPLUG_POLICY"}
        serve_once(args, model, sample, env | {"KVPLUG_CONFIG": json.dumps(compare)},
                   compare["policy"])
    return 0 if correct else 1
