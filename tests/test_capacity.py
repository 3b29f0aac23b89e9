"""``kvplug capacity``: requests that fit in one KV pool, read from the engine."""

import json
import sys

from engine_process import run_engine_script


def test_a_packed_pool_holds_more_blocks_and_reports_its_own_bytes(model_dir, tmp_path):
    run_engine_script([sys.executable, "-m", "kvplug", "capacity", "--model", str(model_dir),
                       "--config", '{"policy": "zipcache"}', "--context", "128",
                       "--requests", "2", "--decode-tokens", "4", "--out", str(tmp_path)],
                      timeout=600)
    default, zipcache = json.loads((tmp_path / "capacity.json").read_text())["results"]
    assert default["label"] == "vLLM default"
    assert default["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 4        # fp32 K and V
    assert zipcache["kv_bytes_per_token"] == 30 * 3 * 76                 # packed pages
    # the same pool bytes hold proportionally more blocks (block sizes may differ)
    tokens = [r["pool_blocks"] * r["block_size"] for r in (default, zipcache)]
    assert tokens[1] > 5.5 * tokens[0]
    assert all(r["max_decoding"] == 2 and r["preemptions"] == 0 for r in (default, zipcache))
    assert "| vLLM default |" in (tmp_path / "capacity.md").read_text()


def test_a_config_keeps_its_engine_keys_and_names_a_bad_one():
    import pytest

    from kvplug.capacity import _config

    config = _config('{"policy": "cake", "budget_ratio": 0.125, "layer_groups": false}')
    assert config["layer_groups"] is False and config["budget_ratio"] == 0.125
    plain = _config('{"policy": "cake", "budget_ratio": 0.125}')
    assert plain == {k: v for k, v in config.items() if k != "layer_groups"}
    with pytest.raises(ValueError, match="'layer_groups' must be bool"):
        _config('{"policy": "cake", "budget_ratio": 0.125, "layer_groups": 1}')
