import pytest
import torch


@pytest.fixture
def clean_env(monkeypatch):
    """No ``KVPLUG_POLICY`` / ``KVPLUG_CONFIG`` from the caller's shell: each test names its
    policy."""
    monkeypatch.delenv("KVPLUG_POLICY", raising=False)
    monkeypatch.delenv("KVPLUG_CONFIG", raising=False)


@pytest.fixture(scope="module")
def bundled(model_dir):
    """SmolLM2-135M with kvplug attention (30 layers, 9 query and 3 kv heads of 64) and its
    tokenizer, once per module."""
    from transformers import AutoTokenizer

    from kvplug.integrations import transformers as kvhf

    return (kvhf.load_model(model_dir, "full", dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(model_dir))
