"""The greedy-generation engine runs the vLLM integration tests compare: passkey prompts
and ``tests/integrations/vllm/greedy_generate.py`` in a process (group) of its own."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from engine_process import run_engine_script

SCRIPT = Path(__file__).parent / "integrations" / "vllm" / "greedy_generate.py"


def passkey_prompts(model_dir, lengths: list[int], depths: list[float]) -> list[list[int]]:
    """Token ids of passkey prompts, prompt ``i`` cut to ``lengths[i]`` tokens with its
    needle at ``depths[i]`` (seeded by ``i``)."""
    from transformers import AutoTokenizer

    from kvplug.evals.passkey import passkey_sample

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(passkey_sample(tok, max(n, 256), depth=depth, seed=i).prompt,
                add_special_tokens=False)["input_ids"][:n]
            for i, (n, depth) in enumerate(zip(lengths, depths))]


def run(model_dir, backend: str, prompts_file: Path, out: Path, env: dict | None = None,
        switch: list | None = None, timeout: int = 900) -> dict:
    """``greedy_generate.py`` in its own process (killed with its children after ``timeout``
    seconds); its result."""
    args = [sys.executable, str(SCRIPT), str(model_dir), backend, str(prompts_file), str(out)]
    if switch is not None:
        switch_file = out.with_suffix(".switch.json")
        switch_file.write_text(json.dumps(switch))
        args.append(str(switch_file))
    run_engine_script(args, timeout=timeout, env={**os.environ, **(env or {})})
    return json.loads(out.read_text())
