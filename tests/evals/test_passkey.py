import pytest
from transformers import AutoTokenizer

from kvplug.evals.passkey import passkey_sample


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("target", [300, 1000, 4000])
def test_sized_within_one_percent_and_needle_once(tokenizer, target):
    sample = passkey_sample(tokenizer, target, depth=0.3, seed=5)
    assert target * 0.99 <= sample.num_tokens <= target
    assert sample.num_tokens == len(tokenizer(sample.prompt)["input_ids"])
    assert sample.prompt.count(sample.answer) == 2  # "The pass key is K. ... K is the pass key."


def test_deterministic_and_depth_places_the_needle(tokenizer):
    a = passkey_sample(tokenizer, 1000, depth=0.0, seed=1)
    assert a == passkey_sample(tokenizer, 1000, depth=0.0, seed=1)
    b = passkey_sample(tokenizer, 1000, depth=1.0, seed=1)
    assert a.answer == b.answer
    assert a.prompt.index(a.answer) < len(a.prompt) * 0.2 < len(b.prompt) * 0.8 < b.prompt.index(b.answer)


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="depth must be in"):
        passkey_sample(tokenizer, 1000, depth=1.5)
    with pytest.raises(ValueError, match="too small"):
        passkey_sample(tokenizer, 10)
