"""Peer comparison: NVIDIA kvpress's presses on kvplug's offline RULER-style suite.

Scores kvpress presses, and a dense reference (``dense``) in the same run, on the
prompts ``kvplug eval`` feeds lm-eval (``kvplug.evals.ruler.synth`` samples under the
chat template, the reply started with ``gen_prefix``), with the task YAMLs' generation
settings (greedy, ``max_gen_toks``, stop on EOS and ``until``, output cut as lm-eval's
``hf`` model cuts it) and RULER's scoring, and writes ``kvplug eval``'s outputs:
``cells/*.json`` (one per config and length; finished cells are skipped on a rerun)
and ``results.json`` / ``results.csv`` / ``results.md``.  kvpress pins
``transformers<5.3``, so this runs in its own venv, ``.venv-kvpress``::

    .venv-kvpress/bin/python evals/peers/kvpress_ruler.py --presses snapkv,tova \\
        --budgets 0.25,0.125 --lengths 4096 --num-samples 20 --protocol query_agnostic \\
        --out evals/results/kvpress

Protocols, as the suite defines them (``kvplug.evals.ruler``):

* ``query_agnostic``: the press compresses the prompt's first ``context_tokens``
  tokens; the question, the assistant turn start and the answer prefix are then read
  over the compressed cache, outside the press (kvpress's own pipeline).
* ``query_aware``: the press compresses the whole prompt, question included.

A budget is kvplug's ``budget_ratio``, the fraction of the compressed tokens kept;
kvpress's ``compression_ratio`` is ``1 - budget`` (the fraction removed).  Both count
a press's protected tokens (SnapKV's window, sinks) inside the budget; kvpress keeps
``int(n * (1 - ratio))`` tokens of ``n``, kvplug ``ceil(budget * n)`` (a token apart at
most).  Tokens after the compressed part keep their original positions, as in
kvpress's pipeline.  ``observed_attention`` needs eager attention (a second model is
loaded for it); every other press runs on SDPA.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import yaml
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as transformers_logging

from kvpress import (AdaKVPress, BasePress, ExpectedAttentionPress, KnormPress, KVzipPress,
                     ObservedAttentionPress, SnapKVPress, StreamingLLMPress, TOVAPress)
from kvplug.eval import comma_separated, summarize_cells, write_tables
from kvplug.evals.ruler import LM_EVAL_TASKS_DIR, synth
from kvplug.evals.ruler.scoring import postprocess, string_match_all

DEFAULT_MODEL = Path.home() / ".cache/kvplug/models/SmolLM2-135M-Instruct"
DENSE = "dense"
PROTOCOLS = ("query_aware", "query_agnostic")


@dataclass(frozen=True)
class PressSpec:
    """A kvpress press by name: its constructor from a compression ratio, and the
    attention implementation it needs."""

    build: Callable[[float], BasePress]
    attention: str = "sdpa"


PRESSES = {
    "snapkv": PressSpec(lambda ratio: SnapKVPress(compression_ratio=ratio)),
    "tova": PressSpec(lambda ratio: TOVAPress(compression_ratio=ratio)),
    "expected_attention": PressSpec(lambda ratio: ExpectedAttentionPress(compression_ratio=ratio)),
    # AdaKV masks the pruned keys per head (it frees no memory) and refuses eager attention
    "adakv_expected_attention": PressSpec(
        lambda ratio: AdaKVPress(ExpectedAttentionPress(compression_ratio=ratio))),
    "knorm": PressSpec(lambda ratio: KnormPress(compression_ratio=ratio)),
    # kvpress's strongest query-agnostic press: scores each pair by how much the model attends
    # to it while repeating the context (a second, chunked pass over it: 4.4x the dense time
    # per 8k sample in peers/); per-layer budgets, same total kept
    "kvzip": PressSpec(lambda ratio: KVzipPress(compression_ratio=ratio)),
    "streaming_llm": PressSpec(lambda ratio: StreamingLLMPress(compression_ratio=ratio)),
    # H2O-style: scores by the attention weights the prefill returns, which only eager does
    "observed_attention": PressSpec(lambda ratio: ObservedAttentionPress(compression_ratio=ratio),
                                    attention="eager"),
}


@dataclass(frozen=True)
class Config:
    """One row of the results: a press at a budget, or the dense reference."""

    press: str | None = None
    budget: float | None = None

    @property
    def label(self) -> str:
        return DENSE if self.press is None else f"kvpress-{self.press}@{self.budget:g}"

    @property
    def attention(self) -> str:
        return "sdpa" if self.press is None else PRESSES[self.press].attention

    def build_press(self) -> BasePress | None:
        return None if self.press is None else PRESSES[self.press].build(1 - self.budget)


@dataclass(frozen=True)
class Generation:
    """A task's lm-eval generation settings: new-token limit and stop strings (EOS's too)."""

    max_gen_toks: int
    until: tuple[str, ...]


def lm_eval_task(task: str, protocol: str) -> str:
    """The lm-eval task name ``kvplug eval`` scores ``task`` under (its YAML's name)."""
    return f"kvplug_ruler_{task}" if protocol == "query_aware" else \
        f"kvplug_ruler_query_agnostic_{task}"


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads the task YAMLs, leaving their ``!function`` references as strings."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, tag, node: loader.construct_scalar(node))


def yaml_generation_kwargs(name: str) -> dict:
    """``generation_kwargs`` of an lm-eval task YAML, following its ``include`` chain."""
    path = LM_EVAL_TASKS_DIR / name
    config = yaml.load(path.read_text(), Loader=_TaskYamlLoader)
    if "generation_kwargs" in config:
        return config["generation_kwargs"]
    return yaml_generation_kwargs(config["include"])


@cache
def generation_for(task: str, protocol: str, eos: str) -> Generation:
    """What lm-eval's ``hf`` model generates with for ``task``: its ``until`` plus EOS."""
    kwargs = yaml_generation_kwargs(lm_eval_task(task, protocol) + ".yaml")
    if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) != 0.0:
        raise ValueError(f"{task}: only greedy tasks are supported, got {kwargs}")
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    return Generation(int(kwargs["max_gen_toks"]), tuple(until + [eos] * (eos not in until)))


def stop_string_reached(tokenizer, generated: list[int], until: tuple[str, ...]) -> bool:
    """lm-eval's ``MultiTokenEOSCriteria``: a stop string in the decoded last
    ``len(stop tokens) + 2`` tokens, special tokens kept."""
    for stop in until:
        lookback = len(tokenizer.encode(stop, add_special_tokens=False)) + 2
        if stop in tokenizer.decode(generated[-lookback:]):
            return True
    return False


def cut_at_stop_strings(text: str, until: tuple[str, ...]) -> str:
    """lm-eval's ``postprocess_generated_text``: the text before each stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def forward(model, ids: torch.Tensor, kv_cache: DynamicCache, first_position: int) -> torch.Tensor:
    """Next-token logits after reading ``ids`` at positions ``first_position..`` over the
    cache (a compressed cache is shorter than the positions it holds)."""
    positions = torch.arange(first_position, first_position + ids.shape[1]).unsqueeze(0)
    out = model(input_ids=ids, past_key_values=kv_cache, position_ids=positions, logits_to_keep=1)
    return out.logits[0, -1]


def prefill(model, ids: torch.Tensor, context_tokens: int, press: BasePress | None,
            protocol: str) -> tuple[torch.Tensor, DynamicCache]:
    """The prompt read under ``protocol``: the logits of its last token and the cache."""
    kv_cache = DynamicCache()
    applied = press(model) if press is not None else contextlib.nullcontext()
    if protocol == "query_aware":
        with applied:
            return forward(model, ids, kv_cache, 0), kv_cache
    with applied:
        model.model(input_ids=ids[:, :context_tokens], past_key_values=kv_cache)
    return forward(model, ids[:, context_tokens:], kv_cache, context_tokens), kv_cache


def greedy_decode(model, tokenizer, logits: torch.Tensor, kv_cache: DynamicCache,
                  prompt_tokens: int, generation: Generation, eos_ids: set[int]) -> str:
    """Greedy tokens from ``logits`` on, until EOS, a stop string or ``max_gen_toks``;
    decoded and cut as lm-eval's ``hf`` model does."""
    generated: list[int] = []
    while True:
        generated.append(int(logits.argmax()))
        if (generated[-1] in eos_ids or len(generated) == generation.max_gen_toks
                or stop_string_reached(tokenizer, generated, generation.until)):
            break
        logits = forward(model, torch.tensor([generated[-1:]]), kv_cache,
                         prompt_tokens + len(generated) - 1)
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return cut_at_stop_strings(text, generation.until)


def prompt_ids(tokenizer, sample: synth.Sample) -> torch.Tensor:
    """The prompt's tokens as lm-eval encodes them (the template holds the special tokens)."""
    ids = tokenizer(sample.prompt(tokenizer, chat=True), add_special_tokens=False,
                    return_tensors="pt")["input_ids"]
    if ids.shape != (1, sample.num_tokens):
        raise ValueError(f"{sample.task}#{sample.index}: the prompt is {ids.shape[1]} tokens, "
                         f"the suite sized it as {sample.num_tokens}")
    return ids


def run_sample(model, tokenizer, sample: synth.Sample, press: BasePress | None, protocol: str,
               generation: Generation, eos_ids: set[int]) -> str:
    ids = prompt_ids(tokenizer, sample)
    logits, kv_cache = prefill(model, ids, sample.context_tokens, press, protocol)
    return greedy_decode(model, tokenizer, logits, kv_cache, ids.shape[1], generation, eos_ids)


def run_cell(model, tokenizer, samples: list[synth.Sample], config: Config, protocol: str,
             eos_ids: set[int]) -> dict:
    """One config at one length: ``kvplug eval``'s cell (per-task scores, per-sample
    depths and scores), plus each sample's prediction and seconds."""
    press = config.build_press()
    rows = []
    for sample in tqdm(samples, desc=f"{config.label} @{samples[0].max_length}", unit="sample"):
        start = time.monotonic()
        generation = generation_for(sample.task, protocol, tokenizer.eos_token)
        prediction = run_sample(model, tokenizer, sample, press, protocol, generation, eos_ids)
        rows.append({"task": lm_eval_task(sample.task, protocol), "index": sample.index,
                     "depths": sample.depths,
                     "score": string_match_all([postprocess(prediction)], [sample.outputs]),
                     "prediction": prediction,
                     "seconds": round(time.monotonic() - start, 2)})
    by_task: dict[str, list[float]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row["score"])
    return {"scores": {task: sum(s) / len(s) for task, s in by_task.items()}, "samples": rows,
            "seconds": round(sum(row["seconds"] for row in rows), 1)}


def load_cell(path: Path, tasks: list[str], num_samples: int) -> dict:
    """A finished cell, checked to hold this run's tasks and sample count."""
    cell = json.loads(path.read_text())
    if sorted(cell["scores"]) != sorted(tasks) or len(cell["samples"]) != len(tasks) * num_samples:
        raise ValueError(f"{path} was written by a run with other --tasks or --num-samples; "
                         "delete it or pass another --out")
    return cell


@cache
def load_model(model_dir: str, attention: str):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=attention)
    return model.eval()


def stop_token_ids(model, tokenizer) -> set[int]:
    """EOS ids that end generation: the generation config's (as ``generate``) and the
    tokenizer's (lm-eval's ``eot_token_id``)."""
    configured = model.generation_config.eos_token_id
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return set(configured) | {tokenizer.eos_token_id}


def versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in ("kvpress", "transformers", "torch")}


def machine() -> str:
    """The CPU's model name (``lscpu``), else what ``platform`` knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in out.splitlines()
             if line.startswith("Model name:")]
    return names[0] if names else platform.machine()


def configs_for(presses: list[str], budgets: list[float]) -> list[Config]:
    return [Config()] + [Config(press, budget) for press in presses for budget in budgets]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="HF model directory")
    p.add_argument("--presses", type=comma_separated(str), default=["snapkv"],
                   help=f"comma-separated kvpress presses: {', '.join(PRESSES)}")
    p.add_argument("--budgets", type=comma_separated(float), default=[0.25, 0.125, 0.0625],
                   help="fractions of the compressed tokens kept (kvplug's budget_ratio; "
                        "kvpress compression_ratio = 1 - budget)")
    p.add_argument("--lengths", type=comma_separated(int), default=[4096])
    p.add_argument("--num-samples", type=int, default=20, help="samples per task and length")
    p.add_argument("--tasks", type=comma_separated(str), default=list(synth.TASKS),
                   help=f"comma-separated suite tasks (default all: {', '.join(synth.TASKS)})")
    p.add_argument("--protocol", choices=PROTOCOLS, default="query_agnostic")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads (on a machine busy with other jobs, 1 runs far faster)")
    p.add_argument("--out", default="evals/results/kvpress", help="output directory")
    args = p.parse_args(argv)
    unknown = [name for name in args.presses if name not in PRESSES]
    unknown += [name for name in args.tasks if name not in synth.TASKS]
    if unknown:
        p.error(f"unknown presses or tasks {unknown}; presses: {', '.join(PRESSES)}; "
                f"tasks: {', '.join(synth.TASKS)}")
    if not all(0 < b <= 1 for b in args.budgets):
        p.error(f"--budgets must be in (0, 1], got {args.budgets}")
    if args.num_samples < 1 or args.threads < 1:
        p.error(f"--num-samples and --threads must be >= 1, got {args.num_samples}, "
                f"{args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    transformers_logging.disable_progress_bar()  # the weight-loading bar, not ours
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    configs = configs_for(args.presses, args.budgets)

    def cell_path(config: Config, length: int) -> Path:
        return out / "cells" / f"{config.label}-{args.protocol}-{length}.json"

    @cache
    def samples_at(length: int) -> list[synth.Sample]:
        return [s for task in args.tasks
                for s in synth.generate(task, tokenizer, [length], args.num_samples)]

    for config in configs:
        for length in args.lengths:
            if cell_path(config, length).exists():
                continue
            model = load_model(args.model, config.attention)
            cell = run_cell(model, tokenizer, samples_at(length), config, args.protocol,
                            stop_token_ids(model, tokenizer))
            cell_path(config, length).write_text(json.dumps(cell))
    tasks = [lm_eval_task(t, args.protocol) for t in args.tasks]
    cells = {c.label: {n: load_cell(cell_path(c, n), tasks, args.num_samples)
                       for n in args.lengths} for c in configs}

    rows = summarize_cells(cells)
    python = Path(sys.executable)
    if python.is_relative_to(Path.cwd()):   # the runner's venv inside the checkout
        python = python.relative_to(Path.cwd())
    command = shlex.join([str(python), *sys.argv])
    found = versions()
    cpu = machine()
    header = (f"RULER-style suite ({args.protocol}), {args.num_samples} samples per task and "
              f"length, engine kvpress {found['kvpress']} (transformers "
              f"{found['transformers']}, torch {found['torch']}), model {Path(args.model).name}, "
              f"float32, batch 1, {torch.get_num_threads()} threads on {cpu}.\n"
              f"Command: `{command}`")
    (out / "results.json").write_text(json.dumps({
        "command": command, "engine": "kvpress", "versions": found, "machine": cpu,
        "protocol": args.protocol, "tasks": tasks,
        "num_samples": args.num_samples,
        "attention": {c.label: c.attention for c in configs}, "rows": rows}, indent=1))
    write_tables(rows, out, header)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
