"""The policies of each storing kind every engine test runs: one entry per policy.
Compressing ones at a budget that keeps a few blocks of the tests' 200-token prompts
(``budget``) and at one that keeps everything (``lossless``); quantizing ones as the
store of the pool (``tests/integrations/vllm/test_quantized_pool.py``).  A new policy of
these kinds adds its line here; an engine that does not run it must refuse it at start."""

COMPRESSING = {
    "snapkv": {"policy": "snapkv", "budget": 96},
    "cake": {"policy": "cake", "budget": 48},
    "chelsea": {"policy": "chelsea", "budget": 96},
    "tova": {"policy": "tova", "budget": 96},
    "kvzip": {"policy": "kvzip", "budget": 48},
}

QUANTIZING = {
    "zipcache": {"policy": "zipcache"},
}
