"""The engine runs the vLLM integration tests compare: passkey prompts,
``tests/integrations/vllm/greedy_generate.py`` (whole batches) and
``compaction_run.py`` (step by step, with aborts and preemptions), each in a process
(group) of its own."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from engine_process import run_engine_script

SCRIPT = Path(__file__).parent / "integrations" / "vllm" / "greedy_generate.py"
STEPPED_SCRIPT = SCRIPT.with_name("compaction_run.py")


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


def stepped_run(model_dir, prompts_file: Path, name: str, **config) -> dict:
    """``compaction_run.py`` with ``config`` (see its docstring) on ``prompts_file``; its
    result, written beside the prompts as ``name.json``."""
    config_file = prompts_file.with_name(f"{name}.config.json")
    config_file.write_text(json.dumps(config))
    out = prompts_file.with_name(f"{name}.json")
    run_engine_script([sys.executable, str(STEPPED_SCRIPT), str(model_dir), str(config_file),
                       str(prompts_file), str(out)], timeout=900)
    return json.loads(out.read_text())
