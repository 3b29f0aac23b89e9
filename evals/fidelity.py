"""How closely a policy's cache follows the dense model on long natural text (HF path).

``python -m kvplug.evals.fidelity --policies full,zipcache,snapkv[budget_ratio=0.25] --out DIR``

Windows of the RULER essays (``evals/ruler/data/essays.txt``, prose the model has to
continue, no question asked: query-agnostic) of ``--context`` tokens, each followed by
``--score`` tokens.  Per policy and window, with the policy's own cache
(:func:`kvplug.integrations.transformers.new_cache`):

* **NLL**: the context is prefilled (and compressed or quantized as the policy does),
  then the next ``--score`` tokens are fed one at a time (teacher forcing, as decoding
  reads its cache); the mean negative log-likelihood of each true next token;
* **greedy agreement**: ``--greedy`` tokens generated greedily after the context, and
  how many of them match ``full``'s before the first difference;
* **KV bytes**: what the cache keeps once the window is read (device and host memory,
  codes and their parameters included), per token it was fed.

``full`` always runs first and is the reference.  Writes ``fidelity.json`` (every
number per window, machine, command) and ``fidelity.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from kvplug.bench import machine, positive_int
from kvplug.eval import parse_policy

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


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from kvplug import models
    from kvplug.integrations import transformers as kvhf

    path = args.model or str(models.model_dir(None))
    tok = AutoTokenizer.from_pretrained(path)
    model = kvhf.load_model(path, "full", dtype=torch.float32).eval()
    texts = windows(tok, args.context + args.score, args.windows)
    specs = [("full", ())] + [p for p in map(parse_policy, args.policies) if p[0] != "full"]
    for name, params in specs:                    # bad names or parameters fail up front
        kvhf.attach_policy(model, name, **dict(params))
    start = time.time()
    rows, reference = [], []
    for name, params in tqdm(specs, desc="policies"):
        with kvhf.use_policy(model, name, **dict(params)) as policy:
            per_window = []
            for i, ids in enumerate(texts):
                nll, kept = score_window(model, ids, args.context)
                tokens = greedy(model, ids[:, :args.context], args.greedy)
                if name == "full":
                    reference.append(tokens)
                per_window.append({"nll": round(nll, 5), "agree": agreement(tokens, reference[i]),
                                   "kv_bytes": kept})
        rows.append({"policy": name, "given": dict(params), "params": policy.params(),
                     "windows": per_window})
    result = {
        "command": shlex.join(["python", "-m", "kvplug.evals.fidelity", *sys.argv[1:]]),
        "model": Path(path).name, "context": args.context, "score": args.score,
        "greedy": args.greedy, "windows": args.windows, "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "minutes": round((time.time() - start) / 60, 1), "rows": rows}
    return result


def _label(row: dict) -> str:
    given = ", ".join(f"{k}={v}" for k, v in row["given"].items())
    return f"`{row['policy']}`" + (f" ({given})" if given else "")


def markdown(result: dict) -> str:
    tokens = result["context"] + result["score"] - 1      # the last scored token is never fed
    full = result["rows"][0]
    full_nll = [w["nll"] for w in full["windows"]]
    full_bytes = sum(sum(w["kv_bytes"].values()) for w in full["windows"])
    lines = [f"Fidelity to the dense model on the RULER essays (`kvplug.evals.fidelity`, HF path, "
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
        kept = sum(sum(w["kv_bytes"].values()) for w in row["windows"])
        lines.append(
            f"| {_label(row)} | {math.exp(sum(nll) / len(nll)):.3f} | "
            f"{sum(delta) / len(delta):+.4f} ({min(delta):+.4f}..{max(delta):+.4f}) | "
            f"{sum(agree) / len(agree):.1f} ({min(agree)}) | "
            f"{kept / len(row['windows']) / tokens:.0f} | {kept / full_bytes:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from kvplug.eval import comma_separated

    p = argparse.ArgumentParser(prog="python -m kvplug.evals.fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: kvplug models path)")
    p.add_argument("--policies", type=comma_separated(str), required=True,
                   help="name or name[key=value;...], comma-separated; full runs first anyway")
    p.add_argument("--context", type=positive_int, default=2048, help="tokens prefilled (2048)")
    p.add_argument("--score", type=positive_int, default=256, help="tokens scored after it (256)")
    p.add_argument("--greedy", type=positive_int, default=32, help="greedy tokens compared (32)")
    p.add_argument("--windows", type=positive_int, default=4, help="text windows (4)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    p.add_argument("--out", default=None, help="directory for fidelity.md and fidelity.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    text = markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fidelity.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "fidelity.md").write_text(text)
    return result


if __name__ == "__main__":
    main()
