"""``kvplug lm-eval ARGS``: lm-eval's own CLI, ready for kvplug.

What it adds before handing ``ARGS`` to ``lm_eval``:

* ``--include_path`` of kvplug's RULER tasks, unless given;
* ``attn_implementation="kvplug"`` registered in transformers, so
  ``--model hf --model_args ...,attn_implementation=kvplug`` loads, and the
  ``kvplug-hf`` model (:mod:`kvplug.lm_eval_hf`): ``hf`` that runs the
  query-agnostic tasks by compressing each context before its question;
* a refusal of ``--model local-completions`` without ``max_length`` in
  ``--model_args``: lm-eval's default of 2048 tokens would left-truncate long
  prompts with only a log warning.
"""

from __future__ import annotations

import argparse
import sys

TRUNCATING_MODELS = ("local-completions", "local-chat-completions")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER,
                   help="arguments for lm_eval (see `lm_eval --help`)")


def _value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def prepare(args: list[str]) -> list[str]:
    """The lm_eval argv for ``args`` (validated)."""
    from kvplug.evals.ruler import LM_EVAL_TASKS_DIR

    if _value(args, "--model") in TRUNCATING_MODELS and \
            "max_length" not in (_value(args, "--model_args") or ""):
        raise ValueError("--model local-completions needs max_length=<the server's "
                         "--max-model-len> in --model_args; lm-eval's default (2048) would "
                         "silently left-truncate longer prompts")
    if _value(args, "--include_path") is None:
        args = [*args, "--include_path", str(LM_EVAL_TASKS_DIR)]
    return args


def run(ns: argparse.Namespace) -> int:
    from lm_eval.__main__ import cli_evaluate

    import kvplug.lm_eval_hf  # noqa: F401  (registers the kvplug-hf model)
    from kvplug.integrations import transformers as kvhf

    argv = prepare(list(ns.lm_eval_args))
    kvhf.register()
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0
