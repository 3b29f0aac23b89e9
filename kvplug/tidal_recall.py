"""``kvplug tidal-recall``: how much of each layer's attention the keys chosen by an
earlier layer cover, the measure TidalDecode picks its selection layers by.

For each suite prompt, the last token's queries and keys are recorded at every
layer (HF model, one decode step after the prefill).  ``recall[j, l]`` is the
attention mass of layer ``l`` (mean over query heads) on the top keys layer
``j`` would select: per kv-head the ``fraction`` of keys with the best ``q·k``,
maxed over the GQA group, as ``policies/tidaldecode.py`` selects.  A layer
pair (first selection layer ``j1``, correction layer ``j2``) is scored by the
mean recall over the layers that reuse a selection (``j1 < l < j2`` from
``j1``, ``l > j2`` from ``j2``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from kvplug.attn_recall import attention_scores, decode_step_records, suite_prompts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: kvplug models path)")
    p.add_argument("--tasks", default="niah_single_2,niah_multikey_1,niah_multivalue,vt",
                   help="comma-separated suite tasks, one prompt each")
    p.add_argument("--length", type=int, default=4096, help="prompt length in tokens")
    p.add_argument("--fraction", type=float, default=0.125, help="keys selected (of the context)")
    p.add_argument("--first", default="2,3,4", help="first selection layers to consider")
    p.add_argument("--out", default=None, help="write recall.json here")


def recall_matrix(model, prompts: list[Tensor], fraction: float) -> Tensor:
    """``[N, N]`` recall (see module docstring), averaged over ``prompts`` (``[1, L]`` ids)."""
    total = None
    for layers in decode_step_records(model, prompts):
        probs, tops = [], []
        for q, k in layers:                                       # [H_q, D], [H_kv, L, D]
            L = k.shape[1]
            scores = attention_scores(q, k)
            probs.append(torch.softmax(scores, dim=-1))            # [H_kv, G, L]
            tops.append(scores.amax(1).topk(max(1, int(fraction * L)), dim=-1).indices)
        m = torch.stack([torch.stack([p.gather(2, top[:, None].expand(-1, p.shape[1], -1))
                                      .sum(-1).mean() for p in probs]) for top in tops])
        total = m if total is None else total + m
    return total / len(prompts)


def layer_pairs(recall: Tensor, firsts: list[int]) -> list[dict]:
    """Every (first, correction) pair with its mean recall over the reusing layers, best first."""
    n = recall.shape[0]
    pairs = []
    for j1 in firsts:
        for j2 in range(j1 + 2, n - 1):
            reused = torch.cat([recall[j1, j1 + 1:j2], recall[j2, j2 + 1:]])
            pairs.append({"first": j1, "correction": j2, "recall": round(reused.mean().item(), 4)})
    return sorted(pairs, key=lambda p: -p["recall"])


def run(args: argparse.Namespace) -> int:
    from kvplug.policies import build_policy

    name, model, prompts, _ = suite_prompts(args)
    recall = recall_matrix(model, prompts, args.fraction)
    pairs = layer_pairs(recall, [int(j) for j in args.first.split(",")])
    first, correction = build_policy("tidaldecode", {"budget": 1}).selection_layers(
        recall.shape[0])
    paper = next(p for p in layer_pairs(recall, [first]) if p["correction"] == correction)
    result = {"model": name, "tasks": args.tasks, "length": args.length,
              "fraction": args.fraction, "paper_scaled": paper, "best": pairs[:5],
              "recall": [[round(v, 4) for v in row] for row in recall.tolist()]}
    print(json.dumps({k: v for k, v in result.items() if k != "recall"}, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "recall.json").write_text(json.dumps(result, indent=1))
    return 0
