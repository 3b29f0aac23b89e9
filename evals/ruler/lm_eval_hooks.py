"""The functions the task YAMLs in ``LM_EVAL_TASKS_DIR`` name with ``!function``.

lm-eval calls ``load_docs`` with ``--model_args``, ``--metadata`` and the
task's ``dataset_kwargs`` merged: the tokenizer comes from ``tokenizer``,
``pretrained`` or ``model`` (a local directory works offline), lengths from
``max_seq_lengths`` (default ``[4096]``), and ``num_samples`` (default 500, as
RULER), ``seed`` (default 42) and ``first_sample`` (default 0; a later range of
the same samples) from the metadata.  Each document is a
``synth.Sample`` plus ``protocol`` and ``gen_prefix`` (the answer prefix
lm-eval appends after a space, or as the started assistant turn).
"""

from __future__ import annotations

from dataclasses import asdict
from functools import cache

from kvplug.evals.ruler import synth
from kvplug.evals.ruler.scoring import postprocess, string_match_all

PROTOCOLS = ("query_aware", "query_agnostic")


@cache
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def load_docs(ruler_task: str, protocol: str, max_seq_lengths=(4096,), num_samples: int = 500,
              seed: int = 42, first_sample: int = 0, **model_args):
    """lm-eval's ``custom_dataset``: the task's samples as a ``test`` split."""
    import datasets

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    name = next((model_args[k] for k in ("tokenizer", "pretrained", "model")
                 if isinstance(model_args.get(k), str) and model_args[k]), None)
    if name is None:
        raise ValueError("kvplug_ruler sizes prompts with the model's tokenizer: pass "
                         "tokenizer=<dir> in --model_args or --metadata")
    lengths = [max_seq_lengths] if isinstance(max_seq_lengths, int) else list(max_seq_lengths)
    samples = synth.generate(ruler_task, _tokenizer(name), lengths, int(num_samples), int(seed),
                             first_sample=int(first_sample))
    rows = [asdict(s) | {"protocol": protocol, "gen_prefix": s.answer_prefix.lstrip()}
            for s in samples]
    return {"test": datasets.Dataset.from_list(rows)}


def doc_to_text(doc: dict) -> str:
    """The user's text: context then question (kept apart in the document)."""
    return doc["context"] + doc["question"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """string_match_all x 100, reported under the document's length ("4096", ...)."""
    return {str(doc["max_length"]): string_match_all([postprocess(results[0])], [doc["outputs"]])}
