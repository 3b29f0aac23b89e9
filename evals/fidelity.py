"""How closely a policy's cache follows the dense model on long natural text.

``python -m kvplug.evals.fidelity --policies full,zipcache,snapkv[budget_ratio=0.25] --out DIR``

Windows of the RULER essays (``evals/ruler/data/essays.txt``, prose the model has to
continue, no question asked: query-agnostic) of ``--context`` tokens, each followed by
``--score`` tokens.  Per policy and window:

* **NLL**: the context is prefilled (and compressed or quantized as the policy does),
  then the next ``--score`` tokens are fed one at a time (teacher forcing, as decoding
  reads its cache); the mean negative log-likelihood of each true next token;
* **greedy agreement**: ``--greedy`` tokens generated greedily after the context, and
  how many of them match ``full``'s before the first difference;
* **KV bytes** per token.

``--engine hf`` (default) runs each policy's own HF cache
(:func:`kvplug.integrations.transformers.new_cache`) and reads the bytes it keeps once
the window is read (device and host memory, codes and their parameters included).
``--engine vllm`` starts a vLLM engine per policy with the kvplug backend (``vllm-default``:
vLLM's own backend), runs every window as one batch, forces the scored tokens with a
logits processor (:mod:`kvplug.evals.forced_tokens`), and reads the bytes per token of the
KV pool the engine allocated.

``full`` always runs first and is the reference.  Writes ``fidelity.json`` (every
number per window, machine, command) and ``fidelity.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from kvplug.bench import machine, positive_int, print_and_save
from kvplug.eval import BASELINE, parse_policy

ESSAYS = Path(__file__).parent / "ruler" / "data" / "essays.txt"


def windows(tok, length: int, count: int) -> list[torch.Tensor]:
    """``count`` windows of ``length`` token ids, evenly spaced over the essays."""
    ids = tok(ESSAYS.read_text(encoding="utf-8"), return_tensors="pt").input_ids
    if ids.shape[1] < length:
        raise ValueError(f"--context + --score = {length} tokens, but the essays have only "
                         f"{ids.shape[1]}")
    last = ids.shape[1] - length
    starts = [round(i * last / max(count - 1, 1)) for i in range(count)]
    return [ids[:, s:s + length] for s in starts]


def score_window(model, ids: torch.Tensor, context: int) -> tuple[float, dict[str, int]]:
    """Mean NLL of ``ids[context:]`` read one token at a time after a prefill of the
    context, through the attached policy's cache; and the KV bytes it then keeps."""
    from kvplug.integrations import transformers as kvhf

    cache = kvhf.new_cache(model)
    nll = []
    with torch.no_grad():
        logits = model(ids[:, :context], past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[0, -1]
        for t in range(context, ids.shape[1]):
            nll.append(-torch.log_softmax(logits.float(), -1)[ids[0, t]])
            if t + 1 < ids.shape[1]:
                logits = model(ids[:, t:t + 1], past_key_values=cache,
                               use_cache=True).logits[0, -1]
    return float(torch.stack(nll).mean()), kvhf.cache_bytes(cache)


def greedy(model, prompt: torch.Tensor, tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def agreement(tokens: list[int], reference: list[int]) -> int:
    """Tokens of ``tokens`` equal to ``reference`` before the first difference."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return min(len(tokens), len(reference))


def _specs(args: argparse.Namespace) -> list[tuple[str, tuple, dict]]:
    """``full`` first, then the other policies, each with its resolved parameters ({} for
    vLLM's own backend): built and checked against ``--engine`` before any model loads."""
    from kvplug.integrations.capabilities import HF, VLLM_CPU, check_engine
    from kvplug.policies import build_policy

    specs = []
    for name, params in [("full", ())] + [p for p in map(parse_policy, args.policies)
                                          if p[0] != "full"]:
        if name == BASELINE:
            if args.engine != "vllm":
                raise ValueError(f"policy {BASELINE!r} is vLLM's own backend: it needs "
                                 "--engine vllm")
            specs.append((name, params, {}))
            continue
        policy = build_policy(name, dict(params))
        check_engine(policy, VLLM_CPU if args.engine == "vllm" else HF)
        specs.append((name, params, policy.params()))
    return specs


def run_hf(args: argparse.Namespace, path: str, texts: list[torch.Tensor],
           specs: list[tuple[str, tuple, dict]]) -> list[dict]:
    from tqdm import tqdm

    from kvplug.integrations import transformers as kvhf

    model = kvhf.load_model(path, "full", dtype=torch.float32).eval()
    rows, reference = [], []
    for name, params, resolved in tqdm(specs, desc="policies"):
        with kvhf.use_policy(model, name, **dict(params)):
            per_window = []
            for i, ids in enumerate(texts):
                nll, kept = score_window(model, ids, args.context)
                tokens = greedy(model, ids[:, :args.context], args.greedy)
                if name == "full":
                    reference.append(tokens)
                per_window.append({"nll": round(nll, 5), "agree": agreement(tokens, reference[i]),
                                   "kv_bytes": kept})
        fed = args.context + args.score - 1               # the last scored token is never fed
        per_token = sum(sum(w["kv_bytes"].values()) for w in per_window) / len(texts) / fed
        rows.append({"policy": name, "given": dict(params), "params": resolved,
                     "windows": per_window, "kv_bytes_per_token": round(per_token)})
    return rows


def run_vllm(args: argparse.Namespace, path: str, texts: list[torch.Tensor],
             specs: list[tuple[str, tuple, dict]]) -> list[dict]:
    """One engine per policy, every window's forced and greedy requests in one batch."""
    import gc

    from tqdm import tqdm

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_space_gb)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import kvplug.integrations.vllm as kv_vllm
    from kvplug.evals.forced_tokens import FQCN, forced_params

    prompts = [TokensPrompt(prompt_token_ids=ids[0, :args.context].tolist()) for ids in texts]
    forced = [forced_params(ids[0, args.context:].tolist()) for ids in texts]
    free_run = SamplingParams(temperature=0.0, max_tokens=args.greedy, min_tokens=args.greedy,
                              ignore_eos=True, detokenize=False)
    rows, reference = [], []
    for name, params, resolved in tqdm(specs, desc="policies"):
        config = {"policy": name, **dict(params)}
        backend = ({} if name == BASELINE else
                   {"attention_backend": "kvplug", "additional_config": {"kvplug": config}})
        llm = LLM(path, dtype="float32", enforce_eager=True, enable_prefix_caching=False,
                  max_model_len=args.context + max(args.score, args.greedy),
                  max_num_seqs=2 * len(texts), logits_processors=[FQCN],
                  logprobs_mode="raw_logprobs", seed=0, **backend)
        try:
            layers = kv_vllm.attention_backends(llm)
            if backend and set(layers) != {kv_vllm.BACKEND_NAME}:
                raise RuntimeError(f"asked for kvplug but the attention layers run {layers}")
            outs = llm.generate(prompts * 2, forced + [free_run] * len(texts), use_tqdm=False)
            per_token = kv_vllm.pool_bytes_per_token(llm)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
        per_window = []
        for i, (ids, scored, free) in enumerate(zip(texts, outs[:len(texts)], outs[len(texts):])):
            want = ids[0, args.context:].tolist()
            got = scored.outputs[0]
            if list(got.token_ids) != want:
                raise RuntimeError(f"{name}: window {i} did not output its forced tokens")
            nll = -sum(step[t].logprob for step, t in zip(got.logprobs, want)) / len(want)
            tokens = list(free.outputs[0].token_ids)
            if name == "full":
                reference.append(tokens)
            per_window.append({"nll": round(nll, 5), "agree": agreement(tokens, reference[i])})
        rows.append({"policy": name, "given": dict(params), "params": resolved,
                     "windows": per_window, "kv_bytes_per_token": per_token})
    return rows


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from kvplug import models

    path = args.model or str(models.model_dir(None))
    specs = _specs(args)                          # bad names or parameters fail up front
    tok = AutoTokenizer.from_pretrained(path)
    texts = windows(tok, args.context + args.score, args.windows)
    start = time.time()
    rows = (run_vllm if args.engine == "vllm" else run_hf)(args, path, texts, specs)
    result = {
        "command": shlex.join(["python", "-m", "kvplug.evals.fidelity", *sys.argv[1:]]),
        "engine": args.engine, "model": Path(path).name, "context": args.context,
        "score": args.score, "greedy": args.greedy, "windows": args.windows,
        "machine": machine(), "torch_threads": torch.get_num_threads(),
        "minutes": round((time.time() - start) / 60, 1), "rows": rows}
    if args.engine == "vllm":
        result["kv_space_gb"] = args.kv_space_gb
    return result


def _label(row: dict) -> str:
    given = ", ".join(f"{k}={v}" for k, v in row["given"].items())
    return f"`{row['policy']}`" + (f" ({given})" if given else "")


def markdown(result: dict) -> str:
    full = result["rows"][0]
    full_nll = [w["nll"] for w in full["windows"]]
    if result.get("engine", "hf") == "vllm":
        path = (f"vLLM-cpu, one engine per policy, the {result['windows']} windows batched, "
                f"scored tokens forced by a logits processor, KV bytes of the engine's pool")
    else:
        path = "HF path, KV bytes the cache keeps"
    lines = [f"Fidelity to the dense model on the RULER essays (`kvplug.evals.fidelity`, {path}; "
             f"float32): {result['model']}, {result['windows']} windows of {result['context']} "
             f"context + {result['score']} scored tokens, greedy agreement over "
             f"{result['greedy']} tokens; {result['machine']['cpu']}, "
             f"{result['torch_threads']} threads, {result['minutes']} min.", "",
             f"Command: `{result['command']}`", "",
             "| policy | perplexity | ΔNLL vs full, mean (min..max over windows) | greedy tokens "
             "= full's, mean (min) | KV bytes / token | KV vs full |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        nll = [w["nll"] for w in row["windows"]]
        delta = [a - b for a, b in zip(nll, full_nll)]
        agree = [w["agree"] for w in row["windows"]]
        lines.append(
            f"| {_label(row)} | {math.exp(sum(nll) / len(nll)):.3f} | "
            f"{sum(delta) / len(delta):+.4f} ({min(delta):+.4f}..{max(delta):+.4f}) | "
            f"{sum(agree) / len(agree):.1f} ({min(agree)}) | {row['kv_bytes_per_token']:.0f} | "
            f"{row['kv_bytes_per_token'] / full['kv_bytes_per_token']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from kvplug.eval import comma_separated

    p = argparse.ArgumentParser(prog="python -m kvplug.evals.fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: kvplug models path)")
    p.add_argument("--policies", type=comma_separated(str), required=True,
                   help="name or name[key=value;...], comma-separated; full runs first anyway; "
                        f"{BASELINE!r}: vLLM's own backend (--engine vllm)")
    p.add_argument("--context", type=positive_int, default=2048, help="tokens prefilled (2048)")
    p.add_argument("--score", type=positive_int, default=256, help="tokens scored after it (256)")
    p.add_argument("--greedy", type=positive_int, default=32, help="greedy tokens compared (32)")
    p.add_argument("--windows", type=positive_int, default=4, help="text windows (4)")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="hf: each policy's HF cache (default); vllm: a vLLM-cpu engine per policy")
    p.add_argument("--kv-space-gb", type=positive_int, default=2,
                   help="--engine vllm: VLLM_CPU_KVCACHE_SPACE of each engine (2)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    p.add_argument("--out", default=None, help="directory for fidelity.md and fidelity.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print_and_save(args.out, "fidelity", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
