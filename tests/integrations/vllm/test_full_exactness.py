"""``full`` inside vLLM is token-identical to vLLM's default CPU backend.

8 prompts of 64 to 3k tokens, two sharing a long prefix; chunked prefill
(1024-token chunks), prefix caching and continuous batching on.  Each engine
runs in its own process (greedy_generate.py).
"""

import json

import pytest

from greedy_runs import passkey_prompts, run

pytestmark = pytest.mark.engine
LENGTHS = [64, 200, 512, 900, 1500, 2000, 2600, 3072]


def _prompts(model_dir) -> list[list[int]]:
    prompts = passkey_prompts(model_dir, LENGTHS,
                              [i / (len(LENGTHS) - 1) for i in range(len(LENGTHS))])
    prompts[6] = prompts[7][:2400] + prompts[1][:200]  # shares 2400 tokens with prompt 7
    return prompts


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exactness")
    prompts_file = tmp / "prompts.json"
    prompts_file.write_text(json.dumps(_prompts(model_dir)))
    return (run(model_dir, "kvplug", prompts_file, tmp / "kvplug.json"),
            run(model_dir, "default", prompts_file, tmp / "default.json"))


def test_engines_ran_the_backends_asked_for(runs):
    kvplug_run, default_run = runs
    assert kvplug_run["backends"] == {"KVPLUG": 30}
    assert default_run["backends"] == {"CPU_ATTN": 30}


def test_full_is_token_identical_to_cpu_attn(runs):
    kvplug_run, default_run = runs
    reference = default_run["passes"][0]
    assert all(len(ids) == 32 for ids in reference)
    for kv_pass in kvplug_run["passes"]:      # cold, then from the prefix cache
        for i, (got, want) in enumerate(zip(kv_pass, reference)):
            assert got == want, f"prompt {i} ({LENGTHS[i]} tokens) differs"


def test_states_freed_after_drain(runs):
    kvplug_run, _ = runs
    states = kvplug_run["states"]
    assert states["live"] == 0 and states["created"] == 16 and states["finished"] == 16
