"""The main job: ``vllm serve`` with kvplug, one long-context request, result printed.

Starts a real ``vllm serve MODEL --attention-backend kvplug`` on 127.0.0.1,
sends a passkey hidden in a long prompt through the ``openai`` client, prints
the answer, the latency and kvplug's per-request stats (read from the
server's log line for that request), then stops the server and everything it
spawned.
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {proc.returncode}; "
                               f"last log lines:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vllm serve was not ready after {READY_TIMEOUT_S}s:\n{_tail(log)}")


def _tail(log: Path, n: int = 30) -> str:
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


def run(args: argparse.Namespace) -> int:
    from openai import OpenAI
    from transformers import AutoTokenizer

    from kvplug import models
    from kvplug.evals.passkey import passkey_sample

    model = args.model or str(models.model_dir(None))
    if not Path(model).is_dir():
        raise FileNotFoundError(f"model directory {model!r} does not exist; run "
                                "`kvplug models fetch` or pass --model DIR")
    sample = passkey_sample(AutoTokenizer.from_pretrained(model), args.context_tokens,
                            depth=args.depth, seed=args.seed)
    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="kvplug-demo-")) / "vllm-serve.log"
    vllm_cli = Path(sys.executable).with_name("vllm")  # the `vllm` console script of this env
    cmd = [str(vllm_cli), "serve", model,
           "--attention-backend", "kvplug", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", str(args.max_model_len),
           "--served-model-name", "kvplug-demo"]
    if not args.compile:
        cmd.append("--enforce-eager")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.kv_space_gb))
    # vLLM-cpu keeps one core for the frontend by default: half the cores on a 2-core box.
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    print(f"[kvplug demo] policy={env.get('KVPLUG_POLICY', 'full (default)')} "
          f"model={model} prompt={sample.num_tokens} tokens, needle depth={sample.depth}")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    print(f"[kvplug demo] started server pid {proc.pid}: {' '.join(cmd)}  (log: {log})",
          flush=True)
    try:
        t0 = time.monotonic()
        _wait_ready(proc, url, log)
        print(f"[kvplug demo] server ready in {time.monotonic() - t0:.0f}s", flush=True)
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        t0 = time.monotonic()
        resp = client.completions.create(model="kvplug-demo", prompt=sample.prompt,
                                         max_tokens=12, temperature=0.0)
        latency = time.monotonic() - t0
        answer = resp.choices[0].text
        correct = sample.answer in answer
        print(f"[kvplug demo] answer: {answer.strip()!r}")
        print(f"[kvplug demo] expected passkey {sample.answer}: "
              f"{'CORRECT' if correct else 'WRONG'}")
        print(f"[kvplug demo] latency {latency:.2f}s, prompt_tokens={resp.usage.prompt_tokens} "
              f"completion_tokens={resp.usage.completion_tokens}")
        stats = request_stats(log, resp.id)
        print(f"[kvplug demo] kvplug stats: {stats or 'not found in the server log'}")
        return 0 if correct and stats else 1
    finally:
        stop_server(proc)
        print("[kvplug demo] server stopped", flush=True)
