"""The compressing policies every engine test runs: one entry per policy, at a budget
that keeps a few blocks of the tests' 200-token prompts (``budget``) and at one
that keeps everything (``lossless``).  A new policy of this kind adds its line here;
an engine that does not run it must refuse it at start."""

COMPRESSING = {
    "snapkv": {"policy": "snapkv", "budget": 96},
    "cake": {"policy": "cake", "budget": 48},
    "chelsea": {"policy": "chelsea", "budget": 96},
    "tova": {"policy": "tova", "budget": 96},
}
