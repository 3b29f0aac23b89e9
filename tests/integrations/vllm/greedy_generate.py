"""Run one vLLM engine in its own process: greedy token ids for a prompt file.

Used by the exactness test so the kvplug engine and vLLM's default one never
share a process.  ``python greedy_generate.py MODEL BACKEND PROMPTS.json OUT.json``
(BACKEND ``default`` = no --attention-backend).
"""

import json
import os
import sys

ENGINE_ARGS = dict(dtype="float32", max_model_len=4608, enforce_eager=True,
                   enable_prefix_caching=True, enable_chunked_prefill=True,
                   max_num_batched_tokens=1024, max_num_seqs=8)


def main(model: str, backend: str, prompts_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import kvplug.integrations.vllm as kv_vllm

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    extra = {} if backend == "default" else {"attention_backend": backend}
    llm = LLM(model, **ENGINE_ARGS, **extra)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.load(open(prompts_path))]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    passes = []
    for _ in range(2):  # the second pass is served from the prefix cache
        outputs = llm.generate(prompts, params, use_tqdm=False)
        passes.append([list(o.outputs[0].token_ids) for o in outputs])
    result = {"passes": passes, "backends": kv_vllm.attention_backends(llm),
              "states": kv_vllm.request_states(llm) if backend != "default" else None}
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
