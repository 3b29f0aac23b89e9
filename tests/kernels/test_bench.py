"""``python -m kvplug.kernels.bench --smoke``: the GPU benchmark script end to end at
tiny shapes on CPU (kernels under the interpreter here), writing its report."""

import json

from kvplug.kernels.bench import main


def test_smoke_run_writes_every_kernel_row(tmp_path):
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
    text = (tmp_path / "results.md").read_text()
    assert "| context | batch | kernel |" in text
