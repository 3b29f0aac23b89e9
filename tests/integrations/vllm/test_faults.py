"""A step that raises inside kvplug reaches the caller, and once aborted leaves no state.

One kvplug engine (quest) runs in this process (no engine-core or worker process), so the
fault is injected with monkeypatch: in kvplug's per-step bookkeeping after the step's
request states exist, or inside an attention layer (the policy's selection).  The fault reaches the caller as the exception raised; once the
failed request is aborted, kvplug holds no request state and its open step is closed, and
the same prompt then gets the same greedy tokens as before the fault.
"""

import pytest

import kvplug.integrations.vllm as kv_vllm
from kvplug.integrations.vllm import lifecycle
from kvplug.policies.selection import Quest

pytestmark = pytest.mark.engine
PROMPT = list(range(1000, 1300))  # 300 tokens: 5 prefill chunks of 64


class InjectedFault(RuntimeError):
    pass


@pytest.fixture(scope="module")
def llm(model_dir):
    from vllm import LLM

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        engine = LLM(str(model_dir), attention_backend="kvplug", dtype="float32",
                     max_model_len=512, enforce_eager=True, distributed_executor_backend="uni",
                     enable_chunked_prefill=True, max_num_batched_tokens=64,
                     enable_prefix_caching=False,
                     additional_config={"kvplug": {"policy": "quest", "budget": 64}})
    yield engine
    engine.llm_engine.engine_core.shutdown()


def _greedy(llm) -> list[int]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)],
                       SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def _fault_after_begin_step(original):
    """kvplug's begin_step, then a fault: the step's request states exist when it fails."""
    def wrapped(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise InjectedFault("injected fault after kvplug's begin_step")
    return wrapped


def _fault_in_select(*args, **kwargs):
    """A fault inside an attention layer: the policy's decode-time selection."""
    raise InjectedFault("injected fault in Quest.select")


@pytest.mark.parametrize("where", ["begin_step", "attention layer"])
def test_a_failing_step_raises_and_leaves_no_kvplug_state(llm, monkeypatch, where):
    reference = _greedy(llm)
    if where == "begin_step":
        monkeypatch.setattr(lifecycle.RequestTracker, "begin_step",
                            _fault_after_begin_step(lifecycle.RequestTracker.begin_step))
    else:
        monkeypatch.setattr(Quest, "select", _fault_in_select)
    with pytest.raises(InjectedFault):
        _greedy(llm)
    monkeypatch.undo()

    engine = llm.llm_engine
    failed = list(engine.output_processor.request_states)    # the engine's internal ids
    assert failed, "the failed request should still be known to the engine"
    engine.abort_request(failed, internal=True)
    assert not engine.has_unfinished_requests(), "the aborted request is still unfinished"
    tracker = lifecycle.tracker()
    assert tracker is not None and tracker.current is None, "the failed step stayed open"
    assert _live_states(llm) == 0
    assert _greedy(llm) == reference
    assert _live_states(llm) == 0


def _live_states(llm) -> int:
    """kvplug's live states once the engine has told the worker what finished: that rides
    on the next step, which an engine in this process runs only when asked."""
    llm.llm_engine.step()
    return kv_vllm.request_states(llm)["live"]
