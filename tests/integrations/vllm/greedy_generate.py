"""Run one vLLM engine in its own process: greedy token ids for a prompt file.

Used by the exactness test so the kvplug engine and vLLM's default one never
share a process.  ``python greedy_generate.py MODEL BACKEND PROMPTS.json OUT.json
[SWITCH.json]`` (BACKEND ``default`` = no --attention-backend).  With
``SWITCH.json`` (a list of kvplug policy configs) the engine is switched to
each in turn (``set_policy``) and runs both passes under each.  The engine
speculates with the JSON speculative config in ``KVPLUG_TEST_SPECULATIVE_CONFIG``
when it is set.  The tests start it through ``tests/greedy_runs.py``.
"""

import json
import os
import sys

ENGINE_ARGS = dict(dtype="float32", max_model_len=4608, enforce_eager=True,
                   enable_prefix_caching=True, enable_chunked_prefill=True,
                   max_num_batched_tokens=1024, max_num_seqs=8)


def _two_passes(llm, prompts, params) -> list:
    passes = []
    for _ in range(2):  # the second pass is served from the prefix cache
        outputs = llm.generate(prompts, params, use_tqdm=False)
        passes.append([list(o.outputs[0].token_ids) for o in outputs])
    return passes


def main(model: str, backend: str, prompts_path: str, out_path: str,
         switch_path: str | None = None) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import kvplug.integrations.vllm as kv_vllm

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    extra = {} if backend == "default" else {"attention_backend": backend}
    if os.environ.get("KVPLUG_TEST_SPECULATIVE_CONFIG"):
        extra["speculative_config"] = json.loads(os.environ["KVPLUG_TEST_SPECULATIVE_CONFIG"])
    llm = LLM(model, **ENGINE_ARGS, **extra)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.load(open(prompts_path))]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    result = {"backends": kv_vllm.attention_backends(llm)}
    if switch_path is None:
        result["passes"] = _two_passes(llm, prompts, params)
    else:
        result["switched"] = []
        for config in json.load(open(switch_path)):
            try:
                kv_vllm.set_policy(llm, config)
            except Exception as e:  # the test checks the message of a refused switch
                result["switched"].append({"config": config, "error": str(e)})
                continue
            before = kv_vllm.request_states(llm).get("sparse_decode_layers", 0)
            passes = _two_passes(llm, prompts, params)
            sparse = kv_vllm.request_states(llm).get("sparse_decode_layers", 0) - before
            result["switched"].append({"config": config, "passes": passes,
                                       "sparse_decode_layers": sparse})
    result["states"] = kv_vllm.drained_request_states(llm) if backend != "default" else None
    if backend != "default":
        vc = llm.llm_engine.vllm_config
        mc, pc = vc.model_config, vc.parallel_config
        key_bytes_per_token = (mc.get_num_layers(pc) * mc.get_num_kv_heads(pc)
                               * mc.get_head_size() * 4)        # float32 keys, all layers
        result["side_bytes"] = kv_vllm.side_bytes(llm)
        result["pool_key_bytes"] = (vc.cache_config.num_gpu_blocks * vc.cache_config.block_size
                                    * key_bytes_per_token)
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
