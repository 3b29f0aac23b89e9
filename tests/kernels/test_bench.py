"""``python -m kvplug.kernels.bench --smoke``: the GPU benchmark script end to end at
tiny shapes on CPU (kernels under the interpreter here), writing its report."""

import json

from kvplug.kernels.bench import main


def test_smoke_run_writes_every_kernel_and_hf_row(tmp_path):
    report = main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["kernels"] == report["kernels"] and saved["command"].endswith("--smoke --out "
                                                                               + str(tmp_path))
    cells = {(r["context"], r["batch"]) for r in saved["kernels"]}
    assert cells == {(256, 1), (256, 2), (512, 1), (512, 2)}
    for cell in cells:
        kernels = [r["kernel"].split(" (")[0] for r in saved["kernels"]
                   if (r["context"], r["batch"]) == cell]
        assert kernels == ["sdpa dense", "paged dense", "paged sparse", "chunk scores",
                           "lowrank keys"]
    assert all(r["us"] > 0 and r["gbs"] >= 0 for r in saved["kernels"])
    for r in saved["kernels"]:
        if r["kernel"] == "paged dense":             # the paged kernel reads what SDPA reads
            assert float(r["check"].split("=")[1]) < 1e-4
    hf = {r["policy"]: r for r in saved["hf_decode"]}
    assert list(hf) == ["full", "quest", "shadowkv"]
    assert all(r["decode_ms_per_token"] > 0 and r["new_tokens"] == 4 for r in hf.values())
    assert hf["full"]["kv_host_bytes"] == 0 and hf["shadowkv"]["kv_host_bytes"] > 0
    assert hf["quest"]["kv_device_bytes"] == hf["full"]["kv_device_bytes"] > 0
    text = (tmp_path / "results.md").read_text()
    assert "| context | batch | kernel |" in text and "## HF path decode" in text
