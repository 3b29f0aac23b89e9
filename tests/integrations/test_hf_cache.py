"""``kvplug.integrations.hf_cache``: the layers kvplug's HF caches accept and the edits they
refuse."""

import pytest
from transformers import LlamaConfig, MistralConfig

from kvplug.integrations.hf_cache import FixedPastLayer, full_attention_layers
from kvplug.integrations.hf_compression import CompressedLayer
from kvplug.integrations.hf_quantized import QuantizedLayer
from kvplug.policies import build_policy


def test_only_full_attention_models_of_a_shape_the_policy_takes():
    policy = build_policy("snapkv", {"budget_ratio": 0.5})
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    _, layer_types = full_attention_layers(policy, config, "compresses")
    assert layer_types == ["full_attention"] * 2
    windowed = MistralConfig(num_hidden_layers=2, sliding_window=16,
                             layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ValueError, match=r"'snapkv' in the HF path compresses full-attention "
                                         r"layers only; this model also has \['sliding_attention'\]"):
        full_attention_layers(policy, windowed, "compresses")


@pytest.mark.parametrize("layer,name", [(CompressedLayer, "compressed cache"),
                                        (QuantizedLayer, "quantized store")])
@pytest.mark.parametrize("edit", ["crop", "reorder_cache", "batch_repeat_interleave",
                                  "batch_select_indices"])
def test_every_past_edit_is_refused_naming_the_store(layer, name, edit):
    assert issubclass(layer, FixedPastLayer)
    with pytest.raises(NotImplementedError, match=f"kvplug's {name} .* cannot reorder, crop"):
        getattr(layer(), edit)(0)
