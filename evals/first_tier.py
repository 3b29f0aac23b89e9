"""Which cheaper first tier could draft for self-speculation: acceptance of layer-skipping
drafts, measured against the dense model on prose (HF path).

``python -m kvplug.evals.first_tier --out DIR``

TriForce's hierarchy puts a cheap drafter under the sparse-cache tier.  On a CPU where a
forward's cost is mostly the weights and the framework (not the KV read), only a drafter
that runs less of the model can be much cheaper than the model itself; skipping layers
is the one that needs no second model.  For each skip pattern, every window of the
RULER essays is read once, teacher-forced, by the model without those layers (full
attention in the layers kept) and by the dense model; the share of the last ``--score``
positions where both predict the same next token is the greedy acceptance rate of a
draft token whose prefix was accepted.  ``tokens per verify`` is what γ drafts at that
rate yield per verification step, ``(1 - a^(γ+1)) / (1 - a)``.  Writes
``first_tier.json`` and ``first_tier.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from kvplug.bench import machine, positive_int, print_and_save
from kvplug.evals.fidelity import windows

# name -> layers skipped, for a 30-layer model (SmolLM2-135M); every pattern keeps the
# first and last two layers, which layer-skipping drafters keep too
PATTERNS = {
    "none (dense)": [],
    "every 4th middle layer": list(range(3, 27, 4)),
    "every 3rd middle layer": list(range(3, 27, 3)),
    "every other middle layer": list(range(3, 27, 2)),
    "layers 16-25": list(range(16, 26)),
    "layers 9-24": list(range(9, 25)),
}


def predictions(model, ids: torch.Tensor, skip: list[int], score: int) -> torch.Tensor:
    """Greedy next-token predictions at the last ``score`` positions of ``ids`` by
    ``model`` without the layers in ``skip``."""
    layers = model.model.layers
    kept = torch.nn.ModuleList(layer for i, layer in enumerate(layers) if i not in skip)
    model.model.layers = kept
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False, logits_to_keep=score + 1).logits[0, :-1]
    finally:
        model.model.layers = layers
    return logits.argmax(-1)


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvplug import models

    path = args.model or str(models.model_dir(None))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    num_layers = len(model.model.layers)
    if num_layers != 30:
        raise ValueError(f"the skip patterns are for 30 layers; {path} has {num_layers}")
    texts = windows(tok, args.context + args.score, args.windows)
    start = time.time()
    dense = [predictions(model, ids, [], args.score) for ids in tqdm(texts, desc="dense")]
    rows = []
    for name, skip in tqdm(PATTERNS.items(), desc="patterns"):
        agree = [float((predictions(model, ids, skip, args.score) == ref).float().mean())
                 for ids, ref in zip(texts, dense)]
        rate = sum(agree) / len(agree)
        per_verify = args.gamma + 1 if rate == 1 else (1 - rate ** (args.gamma + 1)) / (1 - rate)
        rows.append({"pattern": name, "skipped": skip,
                     "layers_run": num_layers - len(skip), "acceptance": round(rate, 4),
                     "acceptance_per_window": [round(a, 4) for a in agree],
                     "tokens_per_verify": round(per_verify, 2)})
    return {"command": shlex.join(["python", "-m", "kvplug.evals.first_tier", *sys.argv[1:]]),
            "model": Path(path).name, "context": args.context, "score": args.score,
            "windows": args.windows, "gamma": args.gamma, "machine": machine(),
            "minutes": round((time.time() - start) / 60, 1), "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"Layer-skipping drafts vs the dense model (`kvplug.evals.first_tier`, HF, float32): "
             f"{result['model']}, {result['windows']} windows of the RULER essays, "
             f"{result['context']} tokens of context, agreement over the next "
             f"{result['score']} positions; γ={result['gamma']}; {result['machine']['cpu']}.",
             "", f"Command: `{result['command']}`", "",
             "| layers skipped | layers run | acceptance (greedy agreement) | min..max over windows "
             "| tokens per verify at γ |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        per = r["acceptance_per_window"]
        lines.append(f"| {r['pattern']} | {r['layers_run']} | {r['acceptance']:.3f} | "
                     f"{min(per):.3f}..{max(per):.3f} | {r['tokens_per_verify']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m kvplug.evals.first_tier", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: kvplug models path)")
    p.add_argument("--context", type=positive_int, default=2048, help="tokens before the scored ones")
    p.add_argument("--score", type=positive_int, default=256, help="positions compared (256)")
    p.add_argument("--windows", type=positive_int, default=8, help="text windows (8)")
    p.add_argument("--gamma", type=positive_int, default=4, help="drafts per verification (4)")
    p.add_argument("--out", default=None, help="directory for first_tier.md and first_tier.json")
    args = p.parse_args(argv)
    result = run(args)
    print_and_save(args.out, "first_tier", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
