"""HF transformers path of the ``quantized`` store (ZipCache,
:mod:`kvplug.integrations.hf_quantized`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from kvplug.integrations import transformers as kvhf
from kvplug.integrations.hf_quantized import QuantizedCache
from kvplug.policies import build_policy
from kvplug.policies.quantized_store import dequantized

ESSAYS = Path(__file__).resolve().parents[2] / "evals" / "ruler" / "data" / "essays.txt"


pytestmark = pytest.mark.usefixtures("clean_env")


def _essay(tok, start: int, length: int) -> torch.Tensor:
    ids = tok(ESSAYS.read_text(), return_tensors="pt").input_ids[:, start:start + length]
    assert ids.shape[1] == length
    return ids


def _greedy(model, input_ids, new_tokens):
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=2)
    return out[0, input_ids.shape[1]:]


def test_decode_reads_what_the_store_holds(bundled):
    """After a zipcache prefill, the next decode step's logits equal a dense model decoding
    over a DynamicCache holding every layer's dequantized segments, at the true position:
    the packed decode attends to exactly what the store keeps."""
    model, tok = bundled
    P = 300
    input_ids = _essay(tok, 0, P)
    with torch.no_grad(), kvhf.use_policy(model, "zipcache") as policy:
        cache = QuantizedCache(policy, model.config)
        next_id = model(input_ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        dense = DynamicCache()
        for idx, layer in enumerate(cache.layers):
            assert layer.quantized_len == P and layer.keys.shape[2] == 0
            assert [s.salient.num_tokens for s in layer.segments] == [P - int(0.4 * P)]
            k, v = dequantized(layer.segments, torch.float32)
            dense.update(k, v, idx)
        got = model(next_id, past_key_values=cache).logits
    with torch.no_grad(), kvhf.use_policy(model, "full"):
        want = model(next_id, past_key_values=dense, position_ids=torch.tensor([[P]])).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_generated_tokens_are_quantized_every_gap(bundled):
    """With streaming_gap=4, 9 decode forwards leave two streamed segments of 4 tokens (one
    of them at 2 bits per kv-head: floor(0.4·4)) and one exact token; positions count every
    token; the store holds the prompt in under a sixth of its float32 bytes."""
    model, tok = bundled
    P = 256
    input_ids = _essay(tok, 1000, P)
    with kvhf.use_policy(model, "zipcache", streaming_gap=4) as policy:
        cache = QuantizedCache(policy, model.config)
        with torch.no_grad():
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           past_key_values=cache, do_sample=False, max_new_tokens=10,
                           min_new_tokens=10, pad_token_id=2)
    layer = cache.layers[0]
    assert [s.length for s in layer.segments] == [P, 4, 4]
    assert [s.other.num_tokens for s in layer.segments] == [int(0.4 * P), 1, 1]
    assert layer.keys.shape[2] == 1 and cache.get_seq_length() == P + 9
    H, D = model.config.num_key_value_heads, model.config.head_dim
    dense_prompt = 2 * H * P * D * 4                                  # K and V, float32
    assert layer.segments[0].nbytes() * 6 < dense_prompt


def test_eight_bit_store_decodes_like_full(bundled):
    """At 8 bits for every token (salient and other) the quantization error (about 0.5% of
    the K/V norm) leaves 16 greedy tokens after a 512-token essay excerpt those of
    ``full``; the fused path, the saliency split and the streaming all run."""
    model, tok = bundled
    ids = _essay(tok, 0, 512)
    with kvhf.use_policy(model, "full"):
        want = _greedy(model, ids, 16)
    with kvhf.use_policy(model, "zipcache", bits_salient=8, bits_other=8, streaming_gap=8):
        got = _greedy(model, ids, 16)
    assert torch.equal(got, want), (got, want)


def test_prompt_in_two_forwards_is_refused(bundled):
    model, tok = bundled
    ids = _essay(tok, 0, 40)
    with torch.no_grad(), kvhf.use_policy(model, "zipcache") as policy:
        cache = QuantizedCache(policy, model.config)
        model(ids[:, :30], past_key_values=cache)
        with pytest.raises(ValueError, match="prompt must come in one forward"):
            model(ids[:, 30:], past_key_values=cache)


def test_dispatch_is_by_declared_store(bundled):
    """A policy declaring the quantized store gets kvplug's QuantizedCache from generate, and
    the quantized attention, whatever its name."""
    model, _ = bundled
    policy = build_policy("zipcache")
    assert kvhf._attention_for(policy) is kvhf._quantized_attention
    assert kvhf._store(policy) == "quantized"
