"""RULER's scoring: string matching per sample, means per task and length, averages over lengths.

As NVIDIA/RULER's ``scripts/eval``: a prediction is stripped of control
characters, a task's score at a length is ``string_match_all`` x 100 (the
share of references found in the prediction, case-insensitive, averaged over
samples), a length's score is the unweighted mean over tasks, and the summary
gives Avg over lengths plus wAvg(inc) / wAvg(dec), weighted 1..n by increasing
or decreasing length.  Scores are not rounded (RULER rounds task scores to 2 decimals).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: control characters become newlines, ends stripped."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Share of references found in each prediction, averaged, x 100; niah, vt, cwe, fwe."""
    return 100 * sum(sum(r.lower() in p.lower() for r in refs) / len(refs)
                     for p, refs in zip(predictions, references, strict=True)) / len(predictions)


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Share of samples whose prediction contains any of its references, x 100 (RULER's qa)."""
    return 100 * sum(any(r.lower() in p.lower() for r in refs)
                     for p, refs in zip(predictions, references, strict=True)) / len(predictions)


@dataclass(frozen=True)
class Summary:
    """A RULER results row: mean over tasks per length, then averages over lengths."""

    per_length: dict[int, float]
    avg: float
    wavg_inc: float  # weights 1..n from shortest to longest length
    wavg_dec: float  # weights n..1


def summarize(scores: Mapping[str, Mapping[int, float]]) -> Summary:
    """Summarize ``{task: {length: score}}``; every task must have every length.

    A length scored on fewer tasks would not be comparable to the others, so a
    missing score is an error rather than a smaller mean.
    """
    lengths = sorted({length for per_task in scores.values() for length in per_task})
    missing = [(task, length) for task, per_task in scores.items() for length in lengths
               if length not in per_task]
    if not lengths or missing:
        raise ValueError(f"need a score for every task at every length; missing {missing}")
    per_length = {length: sum(s[length] for s in scores.values()) / len(scores)
                  for length in lengths}
    values = [per_length[length] for length in lengths]
    inc = range(1, len(values) + 1)

    def weighted(weights) -> float:
        return sum(w * v for w, v in zip(weights, values)) / sum(weights)

    return Summary(per_length, sum(values) / len(values), weighted(inc), weighted(inc[::-1]))


def scores_from_lm_eval(results: Mapping) -> dict[str, dict[int, float]]:
    """``{task: {length: score}}`` from an lm-eval results JSON (its per-length metrics).

    Groups are left out: their per-length means are what ``summarize`` recomputes.
    """
    groups = results.get("groups", {})
    scores: dict[str, dict[int, float]] = {}
    for task, metrics in results["results"].items():
        if task in groups:
            continue
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if metric.isdigit():
                scores.setdefault(task, {})[int(metric)] = value
    return scores
