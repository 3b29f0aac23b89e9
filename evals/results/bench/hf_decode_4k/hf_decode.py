"""Decode time per token in the HF transformers path, each policy against `full` in one run.

    python evals/results/bench/hf_decode_4k/hf_decode.py --context 4096 --new-tokens 16

The bundled SmolLM2-135M in float32, one random prompt, greedy ``generate``; a
logits processor stamps each step, and the median step after the first is reported
(the prefill is left out).  Budget 1/8 for every selection policy.
"""

import argparse
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from kvplug.integrations.transformers import load_model, use_policy
from kvplug.models import model_dir

CONFIGS = [("full", {}), ("streamingllm", {}), ("quest", {}), ("quest", {"page_size": 32}),
           ("tidaldecode", {}), ("shadowkv", {}), ("duoattention", {})]


class StepClock(LogitsProcessor):
    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    torch.manual_seed(0)
    model = load_model(model_dir(), "full", dtype=torch.float32).eval()
    prompt = torch.randint(100, 20000, (1, args.context))
    print(f"| policy | decode ms/token (median of {args.new_tokens} steps) |\n|---|---:|")
    for name, params in CONFIGS:
        if name != "full":
            params = {"budget_ratio": 0.125, **params}
        clock = StepClock()
        with use_policy(model, name, **params), torch.no_grad():
            model.generate(prompt, do_sample=False, max_new_tokens=args.new_tokens + 1,
                           min_new_tokens=args.new_tokens + 1,
                           logits_processor=LogitsProcessorList([clock]))
        steps = sorted(b - a for a, b in zip(clock.stamps, clock.stamps[1:]))
        print(f"| `{name}` {params or ''} | {steps[len(steps) // 2] * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
