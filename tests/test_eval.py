"""``kvplug eval``: the matrix, the tables and plots on hand-made cells, and one
real cell through lm-eval's vLLM model with the kvplug backend."""

import json
import subprocess
import sys

import pytest

from kvplug.eval import (BASELINE, CellConfig, matrix, merge_groups, plot, summarize_cells,
                         write_tables)


def test_matrix_expands_budgets_only_for_budgeted_policies():
    configs = matrix(["full", "quest"], [0.25, 0.125], "vllm", baseline=True)
    assert [c.label for c in configs] == [BASELINE, "full", "quest@0.25", "quest@0.125"]
    assert configs[2].kvplug_config() == {"policy": "quest", "budget_ratio": 0.25}
    assert [c.label for c in matrix(["full"], [0.5], "hf", baseline=True)] == ["full"]


def test_matrix_policy_parameters_reach_config_and_label():
    configs = matrix(["tidaldecode[granularity=block;dense_layers=1]"], [0.125], "hf",
                     baseline=False)
    assert configs[0].label == "tidaldecode[granularity=block;dense_layers=1]@0.125"
    assert configs[0].kvplug_config() == {"policy": "tidaldecode", "granularity": "block",
                                          "dense_layers": 1, "budget_ratio": 0.125}
    with pytest.raises(ValueError, match=r"'granularity'='page' is not one of"):
        matrix(["tidaldecode[granularity=page]"], [0.125], "hf", baseline=False)
    with pytest.raises(ValueError, match=r"'granularity' is not key=value"):
        matrix(["tidaldecode[granularity]"], [0.125], "hf", baseline=False)


def test_matrix_rejects_bad_policies_and_budgets_before_running():
    with pytest.raises(ValueError, match=r"unknown kvplug policy 'nope'"):
        matrix(["nope"], [0.5], "vllm", baseline=False)
    with pytest.raises(ValueError, match=r"'budget_ratio'=1.5 is out of range"):
        matrix(["quest"], [1.5], "hf", baseline=False)


def test_query_agnostic_with_a_compressing_policy_on_vllm_is_refused(model_dir, tmp_path):
    """vLLM compresses where the prefill ends: the run must not report query-aware numbers
    under the query-agnostic name (the HF engine runs the protocol)."""
    out = subprocess.run([sys.executable, "-m", "kvplug", "eval", "--policies", "snapkv",
                          "--budgets", "0.125", "--protocol", "query_agnostic", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "['snapkv@0.125']: kvplug's vLLM engine compresses a prompt when" in out.stderr


@pytest.mark.parametrize("command", ["eval", "demo"])
def test_kv_space_must_be_whole_gib(command):
    """vLLM reads VLLM_CPU_KVCACHE_SPACE as an int: 9.5 used to fail only inside engine start."""
    out = subprocess.run([sys.executable, "-m", "kvplug", command, "--kv-space-gb", "9.5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "argument --kv-space-gb: '9.5' is not an integer" in out.stderr


def _cell(scores, depth_scores):
    return {"scores": scores,
            "samples": [{"task": "t", "depths": [d], "score": s} for d, s in depth_scores]}


def test_tables_and_plots_from_cells(tmp_path):
    cells = {
        "full": {1024: _cell({"a": 100.0, "b": 50.0}, [(10, 100.0)]),
                 4096: _cell({"a": 80.0, "b": 40.0}, [(90, 0.0)])},
        "quest@0.25": {1024: _cell({"a": 90.0, "b": 50.0}, [(10, 100.0)]),
                       4096: _cell({"a": 60.0, "b": 20.0}, [(90, 0.0)])},
    }
    rows = summarize_cells(cells)
    assert rows[0] == {"config": "full", "1024": 75.0, "4096": 60.0, "avg": 67.5,
                       "wavg_inc": 65.0, "wavg_dec": 70.0}
    assert rows[1]["avg"] == 55.0
    write_tables(rows, tmp_path, "header")
    md = (tmp_path / "results.md").read_text()
    assert "| quest@0.25 | 70.0 | 40.0 | 55.0 |" in md
    assert (tmp_path / "results.csv").read_text().splitlines()[0] == \
        "config,1024,4096,avg,wavg_inc,wavg_dec"
    plot(rows, cells, [CellConfig("full"), CellConfig("quest", 0.25)], tmp_path)
    assert (tmp_path / "score_vs_budget.png").stat().st_size > 0
    assert (tmp_path / "depth_heatmap.png").stat().st_size > 0


def test_engine_context_stays_within_the_model_positions(tmp_path):
    from kvplug.eval import max_model_len_for

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    assert max_model_len_for(str(tmp_path), 4096) == 4352
    assert max_model_len_for(str(tmp_path), 8192) == 8192
    with pytest.raises(ValueError, match="--lengths 16384 exceeds the model's 8192 positions"):
        max_model_len_for(str(tmp_path), 16384)


def test_merge_groups_weighs_every_sample_once():
    a = {"scores": {}, "seconds": 2.0, "samples": [{"task": "t", "score": 100.0},
                                                    {"task": "u", "score": 0.0}]}
    b = {"scores": {}, "seconds": 3.0, "samples": [{"task": "t", "score": 0.0},
                                                    {"task": "t", "score": 50.0}]}
    cell = merge_groups([a, b])
    assert cell["scores"] == {"t": 50.0, "u": 0.0} and cell["seconds"] == 5.0
    assert len(cell["samples"]) == 4


@pytest.mark.engine
def test_two_configs_share_one_engine_through_lm_eval_vllm(model_dir, tmp_path):
    """full and quest on one kvplug engine, one sample per prefill group (2 groups)."""
    out = subprocess.run([sys.executable, "-m", "kvplug", "eval", "--model", str(model_dir),
                          "--no-baseline", "--policies", "full,quest", "--budgets", "0.5",
                          "--tasks", "kvplug_ruler_passkey", "--lengths", "1024",
                          "--num-samples", "2", "--samples-per-prefill", "1",
                          "--kv-space-gb", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert log.count("kvplug config: policy=full") == 1     # one engine, started on full
    assert "switched to policy {'policy': 'quest', 'budget_ratio': 0.5}" in log
    for label in ("full", "quest@0.5"):
        cell = json.loads((tmp_path / "cells" / f"{label}-query_aware-1024.json").read_text())
        assert set(cell["scores"]) == {"kvplug_ruler_passkey"}
        assert sorted(s["index"] for s in cell["samples"]) == [0, 1]
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == [
        "full-query_aware-1024.json", "quest@0.5-query_aware-1024.json"]   # groups merged
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["full", "quest@0.5"]
    assert all(0.0 <= r["avg"] <= 100.0 for r in rows)
