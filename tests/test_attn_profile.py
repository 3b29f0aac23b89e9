import json

from kvplug.cli import main


def test_attn_profile_times_the_sparse_path_against_dense(capsys):
    assert main(["attn-profile", "--config", '{"policy": "quest", "budget": 64, "page_size": 32}',
                 "--batch", "2", "--context", "300", "--layers", "4", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)["profiles"][0]
    parts = report["ms_per_decode_step"]
    # quest: 2 dense layers, then select + block tables + kernel on the other 2
    assert {"dense kernel (vLLM default path)", "kvplug: policy select", "kvplug: dense layers",
            "kvplug: block tables", "kvplug: schedule + kernel"} == set(parts)
    assert report["kvplug_attention_ms"] > 0


def test_attn_profile_times_token_granular_tidaldecode(capsys):
    assert main(["attn-profile", "--config", '{"policy": "tidaldecode", "budget": 64}',
                 "--batch", "2", "--context", "300", "--layers", "8", "--repeats", "1"]) == 0
    parts = json.loads(capsys.readouterr().out)["profiles"][0]["ms_per_decode_step"]
    # layers 0-3 dense (2 and 3 select), 4-7 read the chosen tokens in place
    assert {"dense kernel (vLLM default path)", "kvplug: policy select", "kvplug: dense layers",
            "kvplug: token decode"} == set(parts)


def test_attn_profile_compares_several_policies_in_one_table(capsys, tmp_path):
    assert main(["attn-profile", "--config", '{"policy": "streamingllm", "budget": 64}',
                 "--config", '{"policy": "quest", "budget": 64, "page_size": 32}',
                 "--batch", "1", "--context", "200", "--layers", "4", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    profiles = json.loads((tmp_path / "profile.json").read_text())["profiles"]
    assert [p["config"]["policy"] for p in profiles] == ["streamingllm", "quest"]
    table = (tmp_path / "profile.md").read_text()
    assert '`{"policy": "quest", "budget": 64, "page_size": 32}`' in table
    assert "| kvplug: dense layers | - |" in table     # streamingllm has no dense layers


def test_attn_profile_rejects_a_bad_config_before_building_the_cache(capsys):
    assert main(["attn-profile", "--config", '{"policy": "streamingllm", "budget": 64}',
                 "--config", '{"policy": "nope"}']) == 2
    captured = capsys.readouterr()
    assert "unknown kvplug policy 'nope'" in captured.err and captured.out == ""


def test_attn_profile_gives_every_layer_its_own_cache():
    """One cache shared by all layers stays in the CPU's caches and times dense
    attention at half what a decode step pays in the engine (seen at 4 x 8k)."""
    import argparse

    import torch

    from kvplug.attn_profile import _Setup, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    setup = _Setup(parser.parse_args(["--config", "{}", "--batch", "1", "--context", "100",
                                      "--layers", "3"]))
    assert len({kv.data_ptr() for kv in setup.kv_caches}) == 3
    q = torch.randn(1, 9, 64)
    assert not torch.equal(setup.dense(q, 0), setup.dense(q, 1))
