"""Decode speed of kvplug policies in the HF transformers path, on a random-init model.

One long prompt per policy: ``generate`` prefills it and decodes ``new_tokens``
greedy tokens; a streamer stamps every token as it reaches the host (so each
stamp follows a device sync).  Reported per policy: prefill seconds, decode
milliseconds per token (stamps after the first token), the KV the cache keeps
on the device and in host memory (ShadowKV: low-rank keys and exact window on
the device, the prompt's values pinned in host memory), and peak device memory.

Used by ``python -m kvplug.kernels.bench`` (``--hf-context``) for the GPU run of
a Llama-3.1-8B-shaped model; weights are random, so the tokens mean nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

# Llama-3.1-8B's shape (config.json of meta-llama/Llama-3.1-8B)
LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                   vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192},
                   rms_norm_eps=1e-5, tie_word_embeddings=False)
# a few-layer stand-in with the same structure, for a CPU check of the whole script
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=4096,
            rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


class TokenStamps:
    """A ``generate`` streamer that records when each ``put`` (prompt, then every new
    token) reaches it; ``generate`` moves tokens to the host first, a device sync."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def cache_bytes(cache) -> dict[str, int]:
    """KV bytes a ``generate`` cache keeps on the device and in host memory."""
    if hasattr(cache, "stored_bytes"):          # kvplug's ShadowKV cache
        return cache.stored_bytes()
    device = sum(t.numel() * t.element_size() for layer in cache.layers
                 for t in (layer.keys, layer.values) if t is not None)
    return {"device": device, "host": 0}


def random_model(shape: dict[str, Any], device: str, dtype: torch.dtype):
    """A Llama model of ``shape`` with random weights, running kvplug attention."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kvplug.integrations import transformers as kvhf

    kvhf.register()
    torch.manual_seed(0)
    config = LlamaConfig(**shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=kvhf.ATTN_IMPLEMENTATION)
    return model.eval()


def decode_rows(shape: dict[str, Any], context: int, policies: list[str], budget: int,
                new_tokens: int, device: str, dtype: torch.dtype) -> Iterator[dict[str, Any]]:
    """One row per policy as it finishes (``full`` reads everything; the others ``budget``
    tokens)."""
    from kvplug.integrations import transformers as kvhf

    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (decode time is measured after the first "
                         f"token), got {new_tokens}")
    model = random_model(shape, device, dtype)
    prompt = torch.randint(shape["vocab_size"], (1, context),
                           generator=torch.Generator().manual_seed(1)).to(device)
    for name in policies:
        policy = kvhf.attach_policy(model, name, **({} if name == "full" else
                                                    {"budget": budget}))
        stamps = TokenStamps()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, streamer=stamps, pad_token_id=0,
                                 return_dict_in_generate=True)
        kept = cache_bytes(out.past_key_values)
        prefill, decode = stamps.times[1] - stamps.times[0], stamps.times[-1] - stamps.times[1]
        row = {
            "policy": name, "params": policy.params(), "context": context,
            "new_tokens": new_tokens, "prefill_s": round(prefill, 4),
            "decode_ms_per_token": round(1e3 * decode / (new_tokens - 1), 3),
            "kv_device_bytes": kept["device"], "kv_host_bytes": kept["host"],
            "peak_device_bytes": (torch.cuda.max_memory_allocated() if device == "cuda"
                                  else None)}
        del out
        if device == "cuda":
            torch.cuda.empty_cache()
        yield row
