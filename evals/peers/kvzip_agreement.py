"""Does kvplug's ``kvzip`` keep the KV pairs kvpress's ``KVzipPress`` keeps?

On the same context (a query-agnostic sample of kvplug's suite: the prompt's first
``context_tokens``, chat template included) and budget, each library scores the
context by replaying it and keeps its share of (layer, kv-head, token) pairs:
kvplug through its HF path (``compress_context``), kvpress through its press, run in
its own venv (``.venv-kvpress``, kvpress pins ``transformers<5.3``) by this script as a
subprocess.  kvplug's pairs come uncapped, as KVzip (the algorithm's agreement), and at
each ``max_layer_ratio`` of ``--caps`` (kvplug's cap on one layer's pairs, which a paged
engine reserves for every layer: what it changes), all from one replay.  Written to
``--out``: ``results.md`` / ``results.json`` (pairs kept, their Jaccard overlap, per-layer
shares, the largest kv-head's count) and ``layers.png`` (each layer's share of its pairs
kept)::

    .venv/bin/python evals/peers/kvzip_agreement.py --lengths 4096,8192 --budget 0.125 \\
        --caps 2,3,4,6 --out evals/results/peers/kvzip_agreement
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_MODEL = Path.home() / ".cache/kvplug/models/SmolLM2-135M-Instruct"
KVPRESS_PYTHON = Path(__file__).resolve().parents[2] / ".venv-kvpress/bin/python"


def kvpress_kept(model_dir: str, ids_path: Path, budget: float, out: Path) -> None:
    """kvpress's side (its venv): the ``[L, H_kv, N]`` mask of the pairs ``KVzipPress``
    keeps of the context saved at ``ids_path``."""
    from transformers import AutoModelForCausalLM, DynamicCache
    from kvpress import KVzipPress

    ids = torch.load(ids_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    press = KVzipPress(compression_ratio=1 - budget)
    with torch.no_grad(), press(model):
        model(input_ids=ids, past_key_values=DynamicCache())
    config = model.config
    kept = torch.ones(config.num_hidden_layers, config.num_key_value_heads, ids.shape[1],
                      dtype=torch.bool)
    for idx, layer in enumerate(model.model.layers):
        _, heads, positions = layer.self_attn.masked_key_indices
        kept[idx, heads, positions] = False
    torch.save(kept, out)


def kvplug_kept(model_dir: str, ids: torch.Tensor, budget: float,
                caps: list[float]) -> dict[float, torch.Tensor]:
    """kvplug's side: per ``max_layer_ratio`` of ``caps``, the ``[L, H_kv, N]`` mask of the
    pairs its ``kvzip`` keeps (one replay: the plans of each cap from the same scores)."""
    from kvplug.integrations import transformers as kvhf
    from kvplug.policies import KVzip

    @dataclass
    class RecordedKVzip(KVzip):
        scored: list = field(default_factory=list)

        def layer_budgets(self, scores, budget, span):
            self.scored[:] = [scores, budget, span]
            return super().layer_budgets(scores, budget, span)

    policy = RecordedKVzip(budget_ratio=budget)
    model = kvhf.load_model(model_dir, policy, dtype=torch.float32)
    with torch.no_grad():
        kvhf.compress_context(model, torch.cat([ids, ids[:, -1:]], dim=1), ids.shape[1])
    scores, tokens, span = policy.scored
    masks = {}
    for cap in caps:
        capped = KVzip(budget_ratio=budget, max_layer_ratio=cap)
        kept = torch.zeros(len(scores), scores[0].token.shape[0], ids.shape[1], dtype=torch.bool)
        for idx, (layer, layer_budget) in enumerate(
                zip(scores, capped.layer_budgets(scores, tokens, span))):
            plan = capped.keep_plan(layer, layer_budget, span, None, None)
            real = torch.ones_like(plan.indices, dtype=torch.bool) if plan.counts is None \
                else plan.counts > 0
            for head in range(kept.shape[1]):
                kept[idx, head, plan.indices[head][real[head]]] = True
        masks[cap] = kept
    return masks


def context_ids(model_dir: str, task: str, length: int) -> torch.Tensor:
    """The first sample of ``task`` at ``length``: its prompt's context tokens."""
    from transformers import AutoTokenizer

    from kvplug.evals.ruler import synth

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sample = synth.generate(task, tokenizer, [length], 1)[0]
    ids = tokenizer(sample.prompt(tokenizer, chat=True), add_special_tokens=False,
                    return_tensors="pt")["input_ids"]
    return ids[:, :sample.context_tokens]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 3.5), squeeze=False)
    for ax, row in zip(axes[0], rows):
        for lib, marker, style in (("kvplug", "o", "-"), ("kvpress", "x", "--"),
                                   ("kvplug_default_cap", ".", ":")):
            ax.plot(row[f"{lib}_layer_share"], marker=marker, linestyle=style,
                    label=lib.replace("_default_cap", f" (cap {row['default_cap']}x budget)"))
        ax.set_title(f"{row['context_tokens']}-token context, budget {row['budget']}")
        ax.set_xlabel("layer")
        ax.set_ylabel("share of the layer's pairs kept")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--lengths", default="4096,8192",
                   help="comma-separated suite prompt lengths")
    p.add_argument("--budget", type=float, default=0.125, help="fraction of the pairs kept")
    p.add_argument("--task", default="niah_single_1", help="suite task whose sample is used")
    p.add_argument("--caps", default="2,3,4,6",
                   help="comma-separated max_layer_ratio values kvplug is also run at")
    p.add_argument("--out", type=Path, default=Path("evals/results/peers/kvzip_agreement"))
    p.add_argument("--kvpress-side", nargs=2, metavar=("IDS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.kvpress_side:
        kvpress_kept(args.model, Path(args.kvpress_side[0]), args.budget,
                     Path(args.kvpress_side[1]))
        return 0
    if not KVPRESS_PYTHON.exists():
        raise SystemExit(f"{KVPRESS_PYTHON} is missing: run scripts/setup_kvpress.sh first")
    if not 0 < args.budget < 1:
        raise SystemExit(f"--budget {args.budget} must be in (0, 1)")
    from kvplug.policies import KVzip

    caps = [float(c) for c in args.caps.split(",")]
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        ids = context_ids(args.model, args.task, length)
        ids_path, mask_path = args.out / f"context_{length}.pt", args.out / f"kvpress_{length}.pt"
        torch.save(ids, ids_path)
        subprocess.run([str(KVPRESS_PYTHON), __file__, "--model", args.model, "--budget",
                        str(args.budget), "--kvpress-side", str(ids_path), str(mask_path)],
                       check=True)
        theirs = torch.load(mask_path)
        uncapped = 1 / args.budget + 1          # cap >= the span: nothing capped
        masks = kvplug_kept(args.model, ids, args.budget, [uncapped, KVzip.max_layer_ratio, *caps])
        ours = masks.pop(uncapped)
        ids_path.unlink()
        mask_path.unlink()
        jaccard = lambda a, b: round(((a & b).sum() / (a | b).sum()).item(), 4)
        share = lambda mask: [round(x, 4) for x in mask.float().mean((1, 2)).tolist()]
        rows.append({
            "length": length, "context_tokens": ids.shape[1], "budget": args.budget,
            "kvplug_kept": round(ours.float().mean().item(), 4),
            "kvpress_kept": round(theirs.float().mean().item(), 4),
            "jaccard": jaccard(ours, theirs),
            "largest_head_share": round(ours.float().mean(2).max().item(), 4),
            "capped_jaccard": {str(cap): jaccard(masks[cap], theirs) for cap in caps},
            "default_cap": KVzip.max_layer_ratio,
            "kvplug_layer_share": share(ours), "kvpress_layer_share": share(theirs),
            "kvplug_default_cap_layer_share": share(masks[KVzip.max_layer_ratio]),
        })
        print(f"{length}: Jaccard {rows[-1]['jaccard']}", flush=True)
    command = "python evals/peers/kvzip_agreement.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps(
        {"command": command, "task": args.task, "machine": platform.processor() or platform.machine(),
         "rows": rows}, indent=1))
    lines = [f"`{command}` (task `{args.task}`, sample 0; SmolLM2-135M-Instruct, float32)", "",
             "kvplug uncapped against kvpress's `KVzipPress`:", "",
             "| prompt length | context tokens | budget | kvplug kept | kvpress kept | Jaccard | "
             "largest per-layer share difference | largest kv-head's share of the context |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        diff = max(abs(a - b) for a, b in zip(row["kvplug_layer_share"], row["kvpress_layer_share"]))
        lines.append(f"| {row['length']} | {row['context_tokens']} | {row['budget']} | "
                     f"{row['kvplug_kept']} | {row['kvpress_kept']} | {row['jaccard']} | "
                     f"{diff:.4f} | {row['largest_head_share']} |")
    lines += ["", "kvplug with each layer capped at `max_layer_ratio` x the budget (what a "
              "paged engine reserves for every layer: that share of the context), Jaccard "
              "against kvpress:", "",
              "| max_layer_ratio | reserved share of the context | "
              + " | ".join(f"Jaccard at {row['length']}" for row in rows) + " |",
              "|---:|---:|" + "---:|" * len(rows)]
    for cap in caps:
        lines.append(f"| {cap:g} | {min(1.0, cap * args.budget):.3g} | "
                     + " | ".join(str(row["capped_jaccard"][str(cap)]) for row in rows) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / "layers.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
