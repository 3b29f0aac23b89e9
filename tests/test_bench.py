"""kvplug bench without an engine: argument checks, the arithmetic on fake
measurements, and the JSON / markdown / PNG it writes."""

import argparse
import json

import pytest

from kvplug import bench
from kvplug.policies import build_policy

N = 32
BPT = 46080  # SmolLM2-135M, float32: 30 layers x 2 x 3 kv heads x 64 x 4 bytes


def _parser():
    p = argparse.ArgumentParser(prog="kvplug bench")
    bench.add_arguments(p)
    return p


def test_defaults_and_lists():
    args = _parser().parse_args([])
    assert (args.batch, args.context, args.decode_tokens, args.repeats) == (
        [1, 4, 8], [1024, 4096, 8192], 32, 1)
    args = _parser().parse_args(["--batch", "4,1,4", "--context", "2048, 1024"])
    assert args.batch == [1, 4] and args.context == [1024, 2048]


@pytest.mark.parametrize("argv, named", [
    (["--batch", "1,x"], "'x'"),
    (["--batch", "1,0"], "0 must be >= 1"),
    (["--context", "1024,-5"], "-5 must be >= 1"),
    (["--context", "1k"], "'1k'"),
    (["--decode-tokens", "0"], "0 must be >= 1"),
    (["--repeats", "two"], "'two'"),
])
def test_bad_values_are_named(argv, named, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(argv)
    err = capsys.readouterr().err
    assert argv[0] in err and named in err


@pytest.mark.parametrize("argv, named", [
    (["--policy", "nonsense"], "'nonsense'"),
    (["--config", "{policy"], "--config is not valid JSON"),
    (["--config", "[1]"], "JSON object"),
    (["--config", '{"policy": "quest"}'], "budget"),
])
def test_bad_policy_fails_before_any_engine(argv, named, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    args = _parser().parse_args(["--model", str(tmp_path), "--out", str(tmp_path / "o"), *argv])
    with pytest.raises(ValueError, match=named):
        bench.run(args)
    assert not (tmp_path / "o").exists()


def _result(backend, ttft, decode, pool_blocks=10, groups=1):
    """``groups``: the KV-cache groups a token takes a block of (one per layer with layer
    groups)."""
    runs = [{"ttft_s": t, "decode_s": d, "first_token_spread_s": 0.0, "wall_s": t + d}
            for t, d in zip(ttft, decode)]
    return {"backend": backend, "block_size": 128, "pool_blocks": pool_blocks,
            "pool_tokens": pool_blocks * 128 // groups,
            "kv_bytes_per_token": BPT, "side_bytes_per_token": 0.0,
            "cells": [{"batch": 4, "context": 1000, "runs": runs}]}


def test_rows_speedup_and_fit():
    results = [_result("kvplug", [1.0, 3.0, 2.0], [2.0, 1.0, 4.0]),  # medians 2 and 2
               _result("default", [1.0], [4.0])]
    policy = build_policy("streamingllm", {"budget": 256})
    rows = bench.build_rows(results, N, policy)
    assert [r["backend"] for r in rows] == ["default", "kvplug"]
    default, kv = rows
    assert kv["ttft_s"] == 2.0 and kv["decode_s"] == 2.0
    assert kv["tpot_ms"] == pytest.approx(1000 * 2.0 / N)
    assert kv["decode_tok_s"] == pytest.approx(4 * N / 2.0)
    assert default["decode_tok_s"] == pytest.approx(4 * N / 4.0)
    assert kv["speedup"] == pytest.approx(2.0) and default["speedup"] == pytest.approx(1.0)
    # the policy's read budget for kvplug, the whole context for vLLM's backend
    assert kv["kv_tokens_read_per_step"] == 256 and default["kv_tokens_read_per_step"] == 1000
    assert kv["kv_bytes_read_per_step"] == 256 * BPT
    # 1000 + 32 tokens take 9 blocks of 128 (1152 tokens); a 10-block pool fits one request
    assert bench.ceil_to_block(1032, 128) == 1152
    assert default["requests_fit"] == 1
    big = bench.build_rows([_result("default", [1.0], [1.0], pool_blocks=728)], N, policy)
    assert big[0]["requests_fit"] == 728 * 128 // 1152
    # a block per layer (30 KV-cache groups): the same tokens in 30x the blocks
    layers = bench.build_rows([_result("kvplug", [1.0], [1.0], pool_blocks=728 * 30,
                                       groups=30)], N, policy)
    assert layers[0]["requests_fit"] == 728 * 128 // 1152


def test_no_default_cell_means_no_speedup():
    rows = bench.build_rows([_result("kvplug", [1.0], [1.0])], N, build_policy("full"))
    assert rows[0]["speedup"] is None


def _report(long_len=False):
    results = [_result("kvplug", [1.0], [2.0]), _result("default", [1.0], [4.0])]
    results[0]["side_bytes_per_token"] = 23040.0      # e.g. a row-major copy of half the keys
    return {"command": "kvplug bench --batch 4 --context 1000", "wall_s": 12.0,
            "machine": {"cpu": "Test CPU", "cores": 2, "platform": "linux"},
            "versions": {"kvplug": "0.1.0", "vllm": "0.32.0", "torch": "2.13.0"},
            "settings": {"policy": "full", "model": "/m", "decode_tokens": N, "repeats": 1,
                         "kv_space_gb": 4, "long_max_model_len": long_len,
                         "engine": {"dtype": "float32", "enforce_eager": True}},
            "pool_tokens": 1280, "rows": bench.build_rows(results, N, build_policy("full"))}


def test_outputs(tmp_path):
    report = _report()
    md = bench.write_outputs(report, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "bench.json").read_text()) == report
    assert (tmp_path / "out" / "bench.md").read_text() == md
    assert (tmp_path / "out" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = md.splitlines()
    assert "Test CPU, 2 cores" in md and "vllm 0.32.0" in md and report["command"] in md
    assert "dtype=float32, enforce_eager=True" in md
    header = next(i for i, line in enumerate(lines) if line.startswith("| backend"))
    assert lines[header + 2:header + 4] == [
        "| default | 4 | 1000 | 1.00 | 125.0 | 32.0 | 1.00x | 46080 | 0 | 43.9 MiB | 1 |",
        "| kvplug | 4 | 1000 | 1.00 | 62.5 | 64.0 | 2.00x | 46080 | 23040 | 43.9 MiB | 1 |"]
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN" not in md
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1" in bench.markdown(_report(long_len=True))


def test_acceptance_of_a_speculating_engine():
    kv = _result("kvplug", [1.0, 1.0], [2.0, 2.0])
    for run, (drafts, accepted, steps, kept) in zip(kv["cells"][0]["runs"],
                                                    [(40, 30, 10, 6), (40, 10, 10, 3)]):
        run.update(draft_tokens=drafts, accepted_tokens=accepted, verify_steps=steps,
                   first_tier_tokens_proposed=10, first_tier_tokens_accepted=kept)
    rows = bench.build_rows([kv, _result("default", [1.0], [4.0])], N, build_policy("full"))
    default, spec = rows
    # summed over the cell's runs: 40 of 80 drafts accepted in 20 verification steps
    assert spec["acceptance"] == 0.5 and spec["mean_accepted_length"] == 3.0
    assert default["acceptance"] is None and default["mean_accepted_length"] is None
    assert spec["first_tier_acceptance"] == 0.45 and default["first_tier_acceptance"] is None
    report = _report()
    report["rows"] = rows
    assert "acceptance" not in bench.markdown(report)
    report["settings"]["speculative_config"] = {"method": "custom_class",
                                                "num_speculative_tokens": 4}
    md = bench.markdown(report).splitlines()
    assert md[-2].endswith("| - | - | - |") and md[-1].endswith("| 0.5 | 3.0 | 0.45 |")


def test_bad_speculative_config_fails_before_any_engine(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    args = _parser().parse_args(["--model", str(tmp_path), "--out", str(tmp_path / "o"),
                                 "--speculative-config", "{gamma: 4}"])
    with pytest.raises(ValueError, match="--speculative-config is not valid JSON"):
        bench.run(args)
    assert not (tmp_path / "o").exists()
