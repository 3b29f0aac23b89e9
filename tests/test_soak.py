"""``kvplug soak``: its seeded workload, its verdicts, and a short real soak (CI)."""

import argparse
import json
import signal
import subprocess
import sys
import time

import pytest

from kvplug import soak


def _args(**overrides) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    soak.add_arguments(p)
    args = p.parse_args([])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def test_workload_is_seeded_mixed_and_bounded():
    args = _args(requests=400, max_model_len=1024, max_new_tokens=16)
    jobs, probes = soak.make_jobs(args, vocab=49152)
    again, probes_again = soak.make_jobs(args, vocab=49152)
    assert jobs == again and probes == probes_again
    assert jobs != soak.make_jobs(_args(requests=400, max_model_len=1024, max_new_tokens=16,
                                        seed=1), vocab=49152)[0]
    lengths = [len(j.prompt) for j in jobs]
    assert min(lengths) >= 64 and max(lengths) <= 1024 - 16
    assert max(lengths) > 600 and min(lengths) < 100          # short and near max_model_len
    assert all(1 <= j.max_tokens <= 16 for j in jobs)
    streamed = [j for j in jobs if j.stream]
    hang_ups = [j for j in streamed if j.disconnect_after is not None]
    assert 0.4 < len(streamed) / len(jobs) < 0.6
    assert 0.04 < len(hang_ups) / len(streamed) < 0.2
    assert all(j.stream and 1 <= j.disconnect_after < j.max_tokens for j in hang_ups)
    assert 0.4 < sum(j.temperature > 0 for j in jobs) / len(jobs) < 0.6
    # shared prefixes: many prompts open with the same 64 tokens
    openings = [tuple(j.prompt[:64]) for j in jobs]
    assert max(openings.count(o) for o in set(openings)) > 20
    assert len(probes) == 4 and all(p for p in probes)


@pytest.mark.parametrize("overrides, match", [
    ({"max_prompt": 2040}, "max-model-len - max-new-tokens"),
    ({"min_prompt": 900, "max_prompt": 800}, "min <= max"),
    ({"pool_tokens": 1024}, "cannot hold one request"),
    ({"max_model_len": 512, "pool_tokens": 512}, "beside vLLM's null block"),
    ({"disconnect_share": 1.5}, "--disconnect-share must be in"),
])
def test_bad_workload_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        soak.make_jobs(_args(**overrides), vocab=49152)


def test_checks_fail_on_each_broken_promise():
    good = {"server_errors": 0, "server_alive": True, "failed": 0,
            "live_states_after_drain": 0, "live_states_after_probes": 0,
            "probes_unchanged": True, "rss_before_mb": 1000, "rss_after_mb": 1100,
            "orphan_processes": 0}
    assert all(soak.checks(good, rss_bound_mb=200).values())
    for key, bad, check in [("server_errors", 2, "no_5xx"), ("live_states_after_drain", 1,
                                                              "no_leaked_states"),
                            ("probes_unchanged", False, "probes_unchanged"),
                            ("rss_after_mb", 1300, "rss_within_bound"),
                            ("orphan_processes", 1, "no_orphans"),
                            ("server_alive", False, "server_alive")]:
        verdict = soak.checks({**good, key: bad}, rss_bound_mb=200)
        assert [k for k, ok in verdict.items() if not ok] == [check]
    # a server that died mid-storm reports nothing after it: every later check fails
    assert not soak.checks({"server_errors": 0, "failed": 0, "server_alive": False,
                            "orphan_processes": 0}, 200)["no_leaked_states"]


@pytest.mark.engine
def test_short_soak_full_and_snapkv(model_dir, tmp_path):
    """>= 60 requests per policy, a pool that preempts, short prompts: no 5xx, no failure,
    no leaked state, probes unchanged, no process left (what CI soaks)."""
    out = subprocess.run(
        [sys.executable, "-m", "kvplug", "soak", "--model", str(model_dir),
         "--config", '{"policy": "full"}',
         "--config", '{"policy": "snapkv", "budget_ratio": 0.25}',
         "--requests", "60", "--concurrency", "8", "--max-model-len", "512",
         "--max-new-tokens", "48", "--pool-tokens", "544", "--max-num-batched-tokens", "256",
         "--probes", "3", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    assert [r["config"]["policy"] for r in report["runs"]] == ["full", "snapkv"]
    for run in report["runs"]:
        assert all(run["checks"].values()), run["checks"]
        assert run["completed"] + run["aborted"] == 60 and run["aborted"] > 0
        assert run["prefix_cache_hit_tokens"] > 0
    # decoding requests outgrow a full pool: preemption (vLLM admits no prompt it cannot hold)
    assert sum(run["preemptions"] for run in report["runs"]) > 0, "the pool should preempt"
    assert "| all checks |" in (tmp_path / "soak.md").read_text()


@pytest.mark.engine
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_soak_stops_its_server(model_dir, tmp_path, sig):
    """SIGTERM / SIGINT to ``kvplug soak`` while its server starts: no process of the
    server's session is left."""
    # started as a shell's background job starts it: SIGINT ignored, which soak must undo
    proc = subprocess.Popen([sys.executable, "-m", "kvplug", "soak", "--model", str(model_dir),
                             "--requests", "4", "--max-model-len", "256", "--pool-tokens", "288",
                             "--out", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    for line in proc.stdout:
        if "server pid" in line:
            server = int(line.split("server pid ")[1].split()[0])
            break
    else:
        pytest.fail(f"kvplug soak exited with {proc.wait()} before starting a server")
    time.sleep(3)
    proc.send_signal(sig)
    rest = proc.communicate(timeout=180)[0]
    assert proc.returncode != 0, rest[-2000:]
    assert soak.session_processes(server) == {}, rest[-2000:]
