from dataclasses import dataclass

import pytest

from kvplug.policies import POLICIES, Policy, build_policy, param, register_policy
from kvplug.policies.base import POLICIES as REGISTRY


@pytest.fixture
def toy_policy():
    @register_policy("toy_for_test")
    @dataclass
    class Toy(Policy):
        summary = "test only"
        budget: int = param(64, "tokens read per step", min=1)
        ratio: float = param(0.5, "fraction", min=0.0, max=1.0)
        mode: str = param("a", "mode", choices=("a", "b"))

    yield Toy
    REGISTRY.pop("toy_for_test")


def test_full_is_registered_and_dense():
    full = build_policy("full")
    assert "full" in POLICIES and full.params() == {}
    assert full.kv_tokens_read(5000) == 5000 and full.kv_tokens_kept(5000) == 5000


def test_params_are_validated(toy_policy):
    assert build_policy("toy_for_test", {"budget": 8}).budget == 8
    with pytest.raises(ValueError, match=r"'budget' must be int, got '8'"):
        build_policy("toy_for_test", {"budget": "8"})
    with pytest.raises(ValueError, match=r"'budget' must be int, got True"):
        build_policy("toy_for_test", {"budget": True})
    with pytest.raises(ValueError, match=r"'ratio'=1.5 is out of range \[0.0, 1.0\]"):
        build_policy("toy_for_test", {"ratio": 1.5})
    with pytest.raises(ValueError, match=r"'mode'='c' is not one of \['a', 'b'\]"):
        build_policy("toy_for_test", {"mode": "c"})
    with pytest.raises(ValueError, match=r"no parameter 'rank'.*\['budget', 'ratio', 'mode'\]"):
        build_policy("toy_for_test", {"rank": 3})


def test_register_twice_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        register_policy("full")(type("Again", (Policy,), {}))


def test_accounting_separates_prefill_and_decode():
    full = build_policy("full")
    state = full.new_request_state(prompt_tokens=100)
    full.account_step(state, computed_before=0, new_tokens=60, is_prefill=True)
    full.account_step(state, computed_before=60, new_tokens=40, is_prefill=True)
    full.account_step(state, computed_before=100, new_tokens=1, is_prefill=False)
    full.account_step(state, computed_before=101, new_tokens=1, is_prefill=False)
    stats = state.stats.as_dict()
    assert stats["prefill_tokens"] == 100 and stats["decode_steps"] == 2
    assert stats["kv_tokens_read"] == 101 + 102 and stats["kv_tokens_read_per_step"] == 101.5
    assert stats["kv_tokens_stored"] == 102


def test_an_engine_without_a_stage_or_store_is_refused_by_name():
    from kvplug.integrations.capabilities import (ENGINES, HF, VLLM_CPU, VLLM_CUDA,
                                                  check_engine, supported_engines)
    from kvplug.policies import POLICIES

    with pytest.raises(ValueError, match=r"kvplug policy 'cake' needs decode_compress, "
                                         r"layer_budgets, prefill_compress, store 'evicted', "
                                         r"which vLLM on "
                                         r"CUDA does not support"):
        check_engine(POLICIES["cake"], VLLM_CUDA)
    with pytest.raises(ValueError, match=r"kvplug policy 'chelsea' needs prefill_compress, "
                                         r"store 'merged', which vLLM on CUDA does not"):
        check_engine(POLICIES["chelsea"], VLLM_CUDA)

    class LowRank(POLICIES["snapkv"]):
        store = "lowrank"
    with pytest.raises(ValueError, match=r"needs store 'lowrank', which vLLM on CPU does not "
                                         r"support \(it supports stages .* and stores "
                                         r"\['dense', 'evicted', 'merged', 'quantized'\]\)"):
        check_engine(LowRank, VLLM_CPU)
    with pytest.raises(ValueError, match=r"'snapkv' needs prefill_compress, .*vLLM on CUDA"):
        check_engine(POLICIES["snapkv"], VLLM_CUDA)
    assert supported_engines(POLICIES["snapkv"]) == [VLLM_CPU, HF]
    for name in ("streamingllm", "quest", "tidaldecode", "duoattention", "shadowkv"):
        assert supported_engines(POLICIES[name]) == [VLLM_CPU, VLLM_CUDA, HF]
    assert POLICIES["shadowkv"].store_on(ENGINES[VLLM_CUDA][1]) == "dense"


def test_a_policy_runs_with_its_fallback_store_where_its_own_is_not_kept():
    from kvplug.integrations.capabilities import ENGINES, HF, VLLM_CPU
    from kvplug.policies import POLICIES

    shadowkv = POLICIES["shadowkv"]
    assert shadowkv.store_on(ENGINES[HF][1]) == "lowrank"
    assert shadowkv.store_on(ENGINES[VLLM_CPU][1]) == "dense"
    assert POLICIES["snapkv"].store_on(frozenset({"dense"})) is None
