"""``python -m kvplug.evals.fidelity``: NLL, greedy agreement and KV bytes of each policy's
own cache against ``full`` on the essays."""

import json
import sys

import pytest

from kvplug.evals import fidelity
from engine_process import run_engine_script


def test_full_is_the_reference_and_a_quantized_cache_keeps_fewer_bytes(model_dir, tmp_path):
    result = fidelity.main(["--model", str(model_dir), "--policies", "zipcache,full",
                            "--context", "160", "--score", "6", "--greedy", "3",
                            "--windows", "1", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "fidelity.json").read_text()) == json.loads(json.dumps(result))
    full, zipcache = result["rows"]                     # full first, once
    assert [full["policy"], zipcache["policy"]] == ["full", "zipcache"]
    assert all(w["agree"] == 3 for w in full["windows"])
    for f, z in zip(full["windows"], zipcache["windows"]):
        assert 0 < f["nll"] < 20 and 0 < z["nll"] < 20
        # fp32 K and V of every token fed: the context and the scored ones but the last
        assert f["kv_bytes"]["device"] == 30 * 2 * 3 * 64 * 4 * (160 + 6 - 1)
        assert z["kv_bytes"]["device"] < f["kv_bytes"]["device"] / 4  # 4/2-bit codes + params
    table = (tmp_path / "fidelity.md").read_text()
    assert "| `full` |" in table and "| `zipcache` |" in table and "| 1.000 |" in table


def test_windows_are_spread_over_the_essays_and_bounded():
    class Tok:
        def __call__(self, text, return_tensors):
            import torch
            return type("Enc", (), {"input_ids": torch.arange(1000)[None]})

    starts = [int(w[0, 0]) for w in fidelity.windows(Tok(), 400, 3)]
    assert starts == [0, 300, 600]
    with pytest.raises(ValueError, match="--context \\+ --score = 1001 tokens"):
        fidelity.windows(Tok(), 1001, 2)


def test_a_bad_policy_is_refused_naming_it(model_dir):
    with pytest.raises(ValueError, match="nonsense"):
        fidelity.main(["--model", str(model_dir), "--policies", "nonsense", "--windows", "1"])


def test_vllm_forced_tokens_read_the_models_own_logprobs(model_dir, tmp_path):
    """Teacher forcing through a vLLM engine (a logits processor forces the scored tokens)
    gives the NLL that HF's token-by-token teacher forcing gives, and full = vLLM's own."""
    args = ["--model", str(model_dir), "--context", "160", "--score", "6", "--greedy", "3",
            "--windows", "2"]
    run_engine_script([sys.executable, "-m", "kvplug.evals.fidelity", *args, "--engine", "vllm",
                       "--policies", "vllm-default", "--kv-space-gb", "1",
                       "--out", str(tmp_path)], timeout=600)
    vllm = json.loads((tmp_path / "fidelity.json").read_text())
    hf = fidelity.main([*args, "--policies", "full"])
    full, default = vllm["rows"]
    assert [full["policy"], default["policy"]] == ["full", "vllm-default"]
    hf_nll = [w["nll"] for w in hf["rows"][0]["windows"]]
    assert [w["nll"] for w in full["windows"]] == pytest.approx(hf_nll, abs=1e-3)
    assert [w["nll"] for w in default["windows"]] == pytest.approx(hf_nll, abs=1e-3)
    assert all(w["agree"] == 3 for w in default["windows"])
    assert full["kv_bytes_per_token"] == default["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 4


def test_vllm_default_needs_the_vllm_engine(model_dir):
    with pytest.raises(ValueError, match="--engine vllm"):
        fidelity.main(["--model", str(model_dir), "--policies", "vllm-default", "--windows", "1"])
