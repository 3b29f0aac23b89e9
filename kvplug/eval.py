"""``kvplug eval``: the offline RULER suite over a policy × budget × length matrix.

Each cell (one policy config at one context length) is lm-eval runs of the
``kvplug_ruler`` tasks (``kvplug.evals.ruler``) with the chat template applied,
as the suite sizes its prompts.  The dense reference runs in the same matrix:
vLLM's default backend on the vLLM engine, ``full`` (= transformers' SDPA) on
the HF engine.

On the vLLM engine every kvplug config shares one engine (the others are its
``switch_to`` policies; a config whose pool holds packed pages runs alone) with the
prefix cache on: per group of
``--samples-per-prefill`` samples, the prompts are prefilled once (densely, by
the configs that keep every token, which run first) and each config then only
decodes, switched in by ``set_policy``; a compressing config recomputes only the
part of the prompt its compaction keeps (its prefix-cache hits stop at the
blocks it frees unwritten), and scores its window there over the whole context.
Groups are written as they finish and merged into a cell,
and finished groups and cells are skipped, so an interrupted run resumes.

Outputs in ``--out``: ``cells/*.json`` (scores and per-sample needle depths),
``results.json`` / ``results.csv`` / ``results.md`` (RULER per-length means,
Avg, wAvg), ``score_vs_budget.png`` and ``depth_heatmap.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kvplug.bench import positive_int

BASELINE = "vllm-default"
GROUPS = {"query_aware": "kvplug_ruler", "query_agnostic": "kvplug_ruler_query_agnostic"}


@dataclass(frozen=True)
class CellConfig:
    """One row of the matrix: a policy, its extra parameters (``((key, value), ...)``,
    from ``name[key=value;...]``) and its budget (None = no budget)."""

    policy: str
    budget_ratio: float | None = None
    params: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        name = self.policy
        if self.params:
            name += "[" + ";".join(f"{k}={v}" for k, v in self.params) + "]"
        return name if self.budget_ratio is None else f"{name}@{self.budget_ratio:g}"

    def kvplug_config(self) -> dict:
        config = {"policy": self.policy, **dict(self.params)}
        if self.budget_ratio is not None:
            config["budget_ratio"] = self.budget_ratio
        return config


def parse_policy(text: str) -> tuple[str, tuple[tuple[str, object], ...]]:
    """``name`` or ``name[key=value;...]`` (values JSON, else strings) -> (name, params)."""
    name, _, rest = text.strip().partition("[")
    if not rest:
        return name, ()
    if not rest.endswith("]"):
        raise ValueError(f"policy {text!r}: expected name[key=value;...]")
    params = []
    for item in filter(None, rest[:-1].split(";")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"policy {text!r}: {item!r} is not key=value")
        try:
            params.append((key.strip(), json.loads(value)))
        except json.JSONDecodeError:
            params.append((key.strip(), value.strip()))
    return name, tuple(params)


def comma_separated(kind):
    """An argparse type: a comma-separated list of ``kind`` values, at least one."""
    def parse(text: str) -> list:
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, "
                                             f"got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        return values
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: kvplug models path)")
    p.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    p.add_argument("--policies", type=comma_separated(str), default=["full"],
                   help="comma-separated policies (see `kvplug policies`), each optionally "
                        "with parameters: name[key=value;key=value]")
    p.add_argument("--budgets", type=comma_separated(float), default=[0.25, 0.125, 0.0625],
                   help="budget_ratio values for policies that take a budget")
    p.add_argument("--lengths", type=comma_separated(int), default=[4096, 8192])
    p.add_argument("--num-samples", type=int, default=20, help="samples per task and length")
    p.add_argument("--samples-per-prefill", type=int, default=None,
                   help="vllm engine: samples per task prefilled once and decoded by every "
                        "kvplug config (default: all; the KV pool must hold tasks x this x "
                        "length tokens, or the prefix cache evicts and prefill repeats)")
    p.add_argument("--protocol", choices=tuple(GROUPS), default="query_aware")
    p.add_argument("--tasks", type=comma_separated(str), default=None,
                   help="lm-eval task names (default: the protocol's whole group)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip vLLM's default backend (vllm engine only)")
    p.add_argument("--kv-space-gb", type=positive_int, default=4,
                   help="VLLM_CPU_KVCACHE_SPACE (GiB, an integer as vLLM reads it)")
    p.add_argument("--out", default="evals/results/eval", help="output directory")


def matrix(policies: list[str], budgets: list[float], engine: str,
           baseline: bool) -> list[CellConfig]:
    """Every policy config of the run, validated before anything starts."""
    from kvplug.policies import POLICIES, build_policy

    configs = [CellConfig(BASELINE)] if engine == "vllm" and baseline else []
    for text in policies:
        name, params = parse_policy(text)
        if name not in POLICIES:
            raise ValueError(f"unknown kvplug policy {name!r}; valid policies: {sorted(POLICIES)}")
        if any(f.name == "budget_ratio" for f in POLICIES[name].parameters()):
            configs += [CellConfig(name, b, params) for b in budgets]
        else:
            configs.append(CellConfig(name, None, params))
    for config in configs:
        if config.policy != BASELINE:
            build_policy(config.policy, {k: v for k, v in config.kvplug_config().items()
                                         if k != "policy"})
    return configs


def _make_lm(configs: list[CellConfig], engine: str, model: str, max_len: int):
    """An lm-eval model for ``configs``: one config, or (vllm) kvplug configs that share
    an engine started on the first, with the others as its ``switch_to`` policies."""
    config = configs[0]
    if engine == "hf":
        from kvplug.integrations import transformers as kvhf
        from kvplug.lm_eval_hf import ContextFirstHFLM

        params = {k: v for k, v in config.kvplug_config().items() if k != "policy"}
        hf_model = kvhf.load_model(model, config.policy, params=params, dtype="float32")
        return ContextFirstHFLM(pretrained=hf_model, tokenizer=model, batch_size=1,
                                max_length=max_len)
    from lm_eval.models.vllm_causallms import VLLM

    kwargs = dict(pretrained=model, dtype="float32", max_model_len=max_len, enforce_eager=True,
                  enable_prefix_caching=False, batch_size="auto")
    if config.policy != BASELINE:
        kvplug = config.kvplug_config() | {
            "switch_to": [c.kvplug_config() for c in configs[1:]]}
        kwargs |= dict(attention_backend="kvplug", enable_prefix_caching=True,
                       additional_config={"kvplug": kvplug})
    return VLLM(**kwargs)


def _keeps_less(config: CellConfig) -> bool:
    from kvplug.policies import POLICIES

    return config.policy in POLICIES and "prefill_compress" in POLICIES[config.policy].stages


def _packs_pool(config: CellConfig) -> bool:
    from kvplug.policies import POLICIES

    return config.policy in POLICIES and POLICIES[config.policy].store == "quantized"


def _release(lm) -> None:
    engine = getattr(getattr(lm, "model", None), "llm_engine", None)
    if engine is not None:
        engine.engine_core.shutdown()


def run_cell(lm, tasks: list[str], model: str, length: int, num_samples: int,
             first_sample: int = 0) -> dict:
    """One lm-eval run at one length (samples ``first_sample`` on): per-task scores and
    per-sample depths."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from kvplug.evals.ruler import LM_EVAL_TASKS_DIR
    from kvplug.evals.ruler.scoring import scores_from_lm_eval

    metadata = {"tokenizer": model, "max_seq_lengths": [length], "num_samples": num_samples,
                "first_sample": first_sample}
    manager = TaskManager(include_path=str(LM_EVAL_TASKS_DIR), metadata=metadata)
    out = simple_evaluate(model=lm, tasks=tasks, apply_chat_template=True, log_samples=True,
                          task_manager=manager)
    scores = {task: per_len[length] for task, per_len in scores_from_lm_eval(out).items()}
    samples = [{"task": task, "index": s["doc"]["index"], "depths": s["doc"]["depths"],
                "score": s[str(length)]}
               for task, rows in out["samples"].items() for s in rows]
    return {"scores": scores, "samples": samples}


def merge_groups(groups: list[dict]) -> dict:
    """One cell from its sample groups: a task's score is the mean over all its samples."""
    samples = [s for g in groups for s in g["samples"]]
    by_task: dict[str, list[float]] = {}
    for s in samples:
        by_task.setdefault(s["task"], []).append(s["score"])
    return {"scores": {t: sum(v) / len(v) for t, v in by_task.items()}, "samples": samples,
            "seconds": round(sum(g.get("seconds", 0.0) for g in groups), 1)}


def summarize_cells(cells: dict[str, dict[int, dict]]) -> list[dict]:
    """One row per config: RULER per-length means, Avg and wAvg."""
    from kvplug.evals.ruler.scoring import summarize

    rows = []
    for label, per_length in cells.items():
        by_task: dict[str, dict[int, float]] = {}
        for length, cell in per_length.items():
            for task, score in cell["scores"].items():
                by_task.setdefault(task, {})[length] = score
        s = summarize(by_task)
        rows.append({"config": label, **{str(k): v for k, v in s.per_length.items()},
                     "avg": s.avg, "wavg_inc": s.wavg_inc, "wavg_dec": s.wavg_dec})
    return rows


def write_tables(rows: list[dict], out: Path, header: str) -> None:
    keys = list(rows[0])
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [header, "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(v if isinstance(v, str) else f"{v:.1f}"
                                       for v in row.values()) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], cells: dict[str, dict[int, dict]], configs: list[CellConfig],
         out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label = {r["config"]: r for r in rows}
    dense = next((by_label[c] for c in (BASELINE, "full") if c in by_label), None)
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in sorted({c.policy for c in configs if c.budget_ratio is not None}):
        pts = sorted((c.budget_ratio, by_label[c.label]["avg"]) for c in configs
                     if c.policy == policy and c.label in by_label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
    if dense is not None:
        ax.axhline(dense["avg"], color="k", linestyle="--", label=f"dense ({dense['config']})")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="budget (fraction of context)", ylabel="RULER Avg", ylim=(0, 100))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "score_vs_budget.png", dpi=120)
    plt.close(fig)

    labels = list(cells)
    lengths = sorted({length for per in cells.values() for length in per})
    bins = [0, 20, 40, 60, 80, 101]
    fig, axes = plt.subplots(1, len(labels), figsize=(3 * len(labels), 3), squeeze=False)
    for ax, label in zip(axes[0], labels):
        grid = [[float("nan")] * len(lengths) for _ in bins[:-1]]
        for j, length in enumerate(lengths):
            samples = cells[label].get(length, {}).get("samples", [])
            for i in range(len(bins) - 1):
                hits = [s["score"] for s in samples if len(s["depths"]) == 1
                        and bins[i] <= s["depths"][0] < bins[i + 1]]
                if hits:
                    grid[i][j] = sum(hits) / len(hits)
        ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set(title=label, xticks=range(len(lengths)), xticklabels=lengths,
               yticks=range(len(bins) - 1), yticklabels=[f"{b}%" for b in bins[:-1]],
               xlabel="context length", ylabel="needle depth")
    fig.tight_layout()
    fig.savefig(out / "depth_heatmap.png", dpi=120)
    plt.close(fig)


def max_model_len_for(model: str, longest: int) -> int:
    """Engine context: the longest suite length (prompt and answer fit in it, chat template
    included) plus slack, within the model's positions."""
    positions = json.loads((Path(model) / "config.json").read_text()).get(
        "max_position_embeddings")
    if positions is not None and longest > positions:
        raise ValueError(f"--lengths {longest} exceeds the model's {positions} positions")
    return longest + 256 if positions is None else min(longest + 256, positions)


def _timed_cell(lm, *args) -> dict:
    t0 = time.monotonic()
    cell = run_cell(lm, *args)
    cell["seconds"] = round(time.monotonic() - t0, 1)
    return cell


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvplug import models
    from kvplug.integrations.vllm import set_policy

    model = args.model or str(models.model_dir(None))
    if not Path(model).is_dir():
        raise FileNotFoundError(f"model directory {model!r} does not exist; run "
                                "`kvplug models fetch` or pass --model DIR")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    group = args.samples_per_prefill or args.num_samples
    if not 1 <= group <= args.num_samples:
        raise ValueError(f"--samples-per-prefill must be in [1, --num-samples="
                         f"{args.num_samples}], got {group}")
    configs = matrix(args.policies, args.budgets, args.engine, not args.no_baseline)
    compressing = [c.label for c in configs if _keeps_less(c)]
    if compressing and args.protocol == "query_agnostic" and args.engine == "vllm":
        raise ValueError(f"{compressing}: kvplug's vLLM engine compresses a prompt when its "
                         "prefill ends, not where its context ends, so the query_agnostic "
                         "protocol would report query-aware numbers; run it with --engine hf")
    tasks = args.tasks or [GROUPS[args.protocol]]
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_space_gb))
    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    max_len = max_model_len_for(model, max(args.lengths))

    def path(config: CellConfig, length: int, first: int | None = None) -> Path:
        part = "" if first is None else f".from{first}"
        return out / "cells" / f"{config.label}-{args.protocol}-{length}{part}.json"

    bar = tqdm(total=len(configs) * len(args.lengths), desc="kvplug eval", unit="cell")
    # on the vLLM engine every kvplug config shares one engine, those that keep every token
    # first: a compressing config then prefills only what its compaction keeps (its prefix
    # hits reach the blocks it frees); the baseline has its own engine, and so has a config
    # whose pool holds packed pages (its page size is fixed at engine start)
    shared = sorted((c for c in configs if c.policy != BASELINE and not _packs_pool(c)),
                    key=_keeps_less) if args.engine == "vllm" else []
    for config in [c for c in configs if c not in shared]:
        lm = None
        for length in args.lengths:
            if not path(config, length).exists():
                lm = lm or _make_lm([config], args.engine, model, max_len)
                cell = _timed_cell(lm, tasks, model, length, args.num_samples)
                path(config, length).write_text(json.dumps(cell))
            bar.update()
        if lm is not None:
            _release(lm)
    # the shared engine keeps summaries only for the configs that still have cells to run
    pending = [c for c in shared if any(not path(c, n).exists() for n in args.lengths)]
    lm = None
    for length in args.lengths:
        todo = [c for c in shared if not path(c, length).exists()]
        bar.update(len(shared) - len(todo))
        for first in range(0, args.num_samples, group):
            count = min(group, args.num_samples - first)
            for config in todo:
                part = path(config, length, first)
                if not part.exists():
                    lm = lm or _make_lm(pending, args.engine, model, max_len)
                    set_policy(lm.model, config.kvplug_config())
                    part.write_text(json.dumps(_timed_cell(lm, tasks, model, length, count,
                                                           first)))
        for config in todo:
            parts = [path(config, length, f) for f in range(0, args.num_samples, group)]
            cell = merge_groups([json.loads(p.read_text()) for p in parts])
            path(config, length).write_text(json.dumps(cell))
            for p in parts:
                p.unlink()
            bar.update()
    if lm is not None:
        _release(lm)
    bar.close()
    cells = {c.label: {n: json.loads(path(c, n).read_text()) for n in args.lengths}
             for c in configs}

    rows = summarize_cells(cells)
    command = "kvplug eval " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["eval"] else sys.argv[1:])
    header = (f"RULER-style suite ({args.protocol}), {args.num_samples} samples per task and "
              f"length, engine {args.engine}, model {Path(model).name}, float32.\n"
              f"Command: `{command}`")
    (out / "results.json").write_text(json.dumps({"command": command, "engine": args.engine,
                                                  "protocol": args.protocol, "tasks": tasks,
                                                  "num_samples": args.num_samples,
                                                  "rows": rows}, indent=1))
    write_tables(rows, out, header)
    plot(rows, cells, configs, out)
    print((out / "results.md").read_text())
    return 0
