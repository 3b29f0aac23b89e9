"""``python -m kvplug.evals.first_tier``: greedy agreement of layer-skipping drafts."""

import json

from kvplug.evals import first_tier


def test_dense_agrees_with_itself_and_skipping_layers_costs_agreement(model_dir, tmp_path):
    result = first_tier.main(["--model", str(model_dir), "--context", "96", "--score", "16",
                              "--windows", "2", "--gamma", "4", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "first_tier.json").read_text()) == json.loads(json.dumps(result))
    rows = {r["pattern"]: r for r in result["rows"]}
    dense = rows["none (dense)"]
    assert dense["acceptance"] == 1.0 and dense["tokens_per_verify"] == 5 and dense["layers_run"] == 30
    half = rows["every other middle layer"]
    assert half["layers_run"] == 18 and half["acceptance"] < 1.0
    assert 1 <= half["tokens_per_verify"] < 5
    assert "| every other middle layer | 18 |" in (tmp_path / "first_tier.md").read_text()
