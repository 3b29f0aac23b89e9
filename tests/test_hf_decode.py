"""``python -m kvplug.hf_decode --smoke``: the HF decode timing end to end on a tiny
random-init Llama on CPU, writing its report."""

import json

from kvplug.hf_decode import main


def test_smoke_run_times_every_policy_and_what_it_keeps(tmp_path):
    report = main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "hf_decode.json").read_text())
    assert saved == json.loads(json.dumps(report))
    hf = {r["policy"]: r for r in saved["rows"]}
    assert list(hf) == ["full", "quest", "shadowkv"]
    assert all(r["decode_ms_per_token"] > 0 and r["new_tokens"] == 4 and r["context"] == 128
               for r in hf.values())
    assert hf["full"]["kv_host_bytes"] == 0 and hf["shadowkv"]["kv_host_bytes"] > 0
    assert hf["quest"]["kv_device_bytes"] == hf["full"]["kv_device_bytes"] > 0
    assert "| policy | context | prefill s |" in (tmp_path / "hf_decode.md").read_text()
