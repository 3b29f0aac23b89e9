"""``kvplug attn-recall``: what each layer of a decode step reads, against what it needs.

For each suite prompt, the last token's queries and keys are recorded at every
layer (HF model, one decode step after the prefill).  Each policy then selects
at every layer in order, as in a decode step of the HF path (one-token read
units).  Per layer, two measures, averaged over prompts: the attention mass,
under full attention, on the positions read (mean over query heads; 1 for a
layer read densely), and the share of the needles' tokens read (mean over
kv-heads, prompts with needles only).  The second is the one that follows
retrieval scores: needles carry little of the attention mass.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from torch import Tensor

_RECORDER = "kvplug_recall"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, action="append",
                   help="kvplug policy config as JSON, e.g. '{\"policy\": \"quest\", "
                        "\"budget_ratio\": 0.125}'; repeat it to compare policies on the "
                        "same prompts")
    p.add_argument("--model", default=None, help="HF model directory (default: kvplug models path)")
    p.add_argument("--tasks", default="niah_single_2,niah_multikey_1,niah_multivalue,vt",
                   help="comma-separated suite tasks, one prompt each")
    p.add_argument("--length", type=int, default=4096, help="prompt length in tokens")
    p.add_argument("--out", default=None, help="write recall.json and recall.md here")


def _record(store: dict):
    """An attention function that keeps the decode step's query and keys, then runs SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] == 1:
            store[module.layer_idx] = (query[0, :, 0].float(), key[0].float())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    return attention


def decode_step_records(model, prompts: list[Tensor]) -> list[list[tuple[Tensor, Tensor]]]:
    """Per prompt (``[1, L]`` ids), per layer: the decode step's ``q`` ``[H_q, D]`` and
    keys ``[H_kv, L, D]`` (the prompt's last token is decoded after the rest)."""
    from transformers import AttentionInterface

    store: dict[int, tuple[Tensor, Tensor]] = {}
    AttentionInterface.register(_RECORDER, _record(store))
    model.set_attn_implementation(_RECORDER)
    records = []
    for ids in prompts:
        with torch.no_grad():
            prefill = model(ids[:, :-1], use_cache=True)
            store.clear()
            model(ids[:, -1:], past_key_values=prefill.past_key_values, use_cache=True)
        records.append([store[layer] for layer in range(len(store))])
    return records


def attention_scores(q: Tensor, k: Tensor) -> Tensor:
    """Scaled ``q·k`` of one decode query per GQA group: ``[H_kv, G, L]``."""
    H_kv, L, D = k.shape
    return torch.einsum("hgd,hld->hgl", q.view(H_kv, -1, D), k) * D ** -0.5


def suite_prompts(args: argparse.Namespace):
    """The model (float32), one suite prompt (``[1, L]`` ids) per task of ``args.tasks``,
    and per prompt the positions of its needles' tokens (empty for tasks without needles)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvplug import models
    from kvplug.evals.ruler import synth

    path = args.model or str(models.model_dir(None))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts, needles = [], []
    for i, task in enumerate(t for t in args.tasks.split(",") if t):
        s = synth.generate(task, tok, [args.length], 1, first_sample=i)[0]
        text = synth.render_prompt(tok, s.context + s.question, s.answer_prefix, s.chat)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True,
                  return_tensors="pt")
        prompts.append(enc.input_ids)
        start = text.index(s.context)
        spans = [(start + off, start + off + len(needle))
                 for off, needle in zip(s.needle_offsets, s.needles)]
        needles.append(torch.tensor([i for i, (a, b) in enumerate(enc.offset_mapping[0].tolist())
                                     if any(a < hi and b > lo for lo, hi in spans)],
                                    dtype=torch.long))
    return Path(path).name, model, prompts, needles


def read_mask(selection, seq_len: int, num_kv_heads: int) -> Tensor:
    """``[H_kv, L]`` bool: the positions a selection reads (``None``: all of them)."""
    from kvplug.kernels import selected_positions

    if selection is None:
        return torch.ones(num_kv_heads, seq_len, dtype=torch.bool)
    n_recent = selection.n_recent
    if isinstance(n_recent, Tensor):
        n_recent = int(n_recent.max())
    pos, valid = selected_positions(torch.tensor([seq_len]), selection.chunk_ids,
                                    selection.chunk_size, selection.n_sink, n_recent,
                                    num_kv_heads, seq_len)
    heads = torch.arange(num_kv_heads)[:, None].expand_as(pos[0])
    mask = torch.zeros(num_kv_heads, seq_len, dtype=torch.bool)
    mask[heads[valid[0]], pos[0][valid[0]]] = True
    if selection.dense_kv_heads is not None:
        mask[selection.dense_kv_heads] = True
    return mask


def read_masks(policy, records: list[list[tuple[Tensor, Tensor]]]) -> list[list[Tensor]]:
    """Per prompt, per layer: the ``[H_kv, L]`` positions ``policy`` (bound to the model)
    reads, each layer selecting in order as in one decode step."""
    from kvplug.integrations.transformers import key_summary
    from kvplug.policies import POLICIES, SelectionPolicy

    if not isinstance(policy, SelectionPolicy):
        choices = sorted(n for n, cls in POLICIES.items() if issubclass(cls, SelectionPolicy))
        raise ValueError(f"attn-recall measures what a decode-time selection policy reads; "
                         f"policy {policy.name!r} does not select (choose one of {choices})")
    masks = []
    for layers in records:
        ctx = policy.step_context(torch.tensor([layers[0][1].shape[1]]), 1, len(layers))
        masks.append([])
        for layer, (q, k) in enumerate(layers):
            H_kv, L, _ = k.shape
            summary = key_summary(policy.summary_spec(layer, 1), k.transpose(0, 1)[None])
            selection = policy.select(layer, q[None], summary, torch.tensor([L]), ctx)
            masks[-1].append(read_mask(selection, L, H_kv))
    return masks


def attention_recall(records: list[list[tuple[Tensor, Tensor]]],
                     masks: list[list[Tensor]]) -> Tensor:
    """``[num_layers]``: attention mass on the read positions, mean over query heads and
    prompts."""
    return torch.stack([
        torch.stack([(torch.softmax(attention_scores(q, k), -1) * mask[:, None]).sum(-1).mean()
                     for (q, k), mask in zip(layers, layer_masks)])
        for layers, layer_masks in zip(records, masks)]).mean(0)


def needle_recall(masks: list[list[Tensor]], needles: list[Tensor]) -> Tensor | None:
    """``[num_layers]``: the share of needle tokens read, mean over kv-heads and the
    prompts that have needles (None if none has)."""
    per_prompt = [torch.stack([mask[:, pos].float().mean() for mask in layer_masks])
                  for layer_masks, pos in zip(masks, needles) if pos.numel()]
    return torch.stack(per_prompt).mean(0) if per_prompt else None


def run(args: argparse.Namespace) -> int:
    from kvplug.attn_profile import write_report
    from kvplug.config import resolve_config

    policies = [resolve_config(environ={"KVPLUG_CONFIG": c}).build_policy() for c in args.config]
    name, model, prompts, needles = suite_prompts(args)
    config = model.config
    for policy in policies:
        policy.check_model(config.num_hidden_layers, config.num_key_value_heads, 1)
    records = decode_step_records(model, prompts)
    rows = []
    for c, policy in zip(args.config, policies):
        masks = read_masks(policy, records)
        needle = needle_recall(masks, needles)
        rows.append({"config": json.loads(c),
                     "recall": _rounded(attention_recall(records, masks)),
                     "needle_recall": None if needle is None else _rounded(needle)})
    result = {"command": shlex.join(["kvplug", *sys.argv[1:]]), "model": name,
              "tasks": args.tasks, "length": args.length, "policies": rows}
    print(markdown(result))
    write_report(args.out, "recall", result, markdown(result))
    return 0


def _rounded(values: Tensor) -> list[float]:
    return [round(v, 4) for v in values.tolist()]


def markdown(result: dict) -> str:
    """Per policy, a row of attention recall and one of needle tokens read: the mean over
    layers, the lowest layer, then every layer."""
    n = len(result["policies"][0]["recall"])
    lines = [f"What each layer reads (`kvplug attn-recall`): {result['model']}, one decode step "
             f"after {result['length']}-token prompts of {result['tasks']}. `attention`: the "
             "attention mass on the read positions, mean over query heads and prompts (1 = "
             "the layer reads everything it attends to). `needles`: the share of the needles' "
             "tokens read, mean over kv-heads and the prompts with needles.", "",
             f"Command: `{result['command']}`", "",
             "| config | measure | mean | lowest (layer) | "
             + " | ".join(str(i) for i in range(n)) + " |",
             "|---|---|---:|---:|" + "---:|" * n]
    for row in result["policies"]:
        for measure, r in (("attention", row["recall"]), ("needles", row["needle_recall"])):
            if r is None:
                continue
            low = min(range(n), key=r.__getitem__)
            lines.append(f"| `{json.dumps(row['config'])}` | {measure} | {sum(r) / n:.3f} | "
                         f"{r[low]:.2f} ({low}) | " + " | ".join(f"{v:.2f}" for v in r) + " |")
    return "\n".join(lines) + "\n"
