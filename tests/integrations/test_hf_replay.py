"""The ``replay`` stage on the HF path (:mod:`kvplug.integrations.hf_replay`): KVzip's
context reconstruction over kvplug's compressed cache."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from transformers import DynamicCache

from kvplug.integrations import transformers as kvhf
from kvplug.integrations.hf_replay import replay_context
from kvplug.integrations.replay import chat_turn
from kvplug.policies import KVzip

pytestmark = pytest.mark.usefixtures("clean_env")

CONTEXT = " ".join(f"Box {i} holds the number {i * 37 % 101}." for i in range(30))


@dataclass
class RecordingKVzip(KVzip):
    """KVzip that also records what each layer's replay scoring was handed.  Not registered."""

    name = "recording_kvzip"
    seen: list = field(default_factory=list)

    def replay_scores(self, layer_idx, queries, keys, chunk, scale):
        self.seen.append((layer_idx, chunk, keys.clone()))
        return super().replay_scores(layer_idx, queries, keys, chunk, scale)


def _chat_prompt(tok, question: str = "Which box holds 5?") -> tuple[torch.Tensor, int]:
    """A chat prompt and where its context (template preamble + CONTEXT) ends."""
    preamble, _ = chat_turn(tok)
    ids = tok.apply_chat_template([{"role": "user", "content": CONTEXT + "\n" + question}],
                                  add_generation_prompt=True, return_dict=True,
                                  return_tensors="pt")["input_ids"]
    context = len(preamble) + len(tok.encode(CONTEXT, add_special_tokens=False))
    assert ids[0, :len(preamble)].tolist() == preamble
    return ids, context


def test_the_replay_reads_the_dense_context_then_keeps_none_of_its_own_kv(bundled):
    """Chunks of 128 over a chat prompt's context: every layer's scoring gets the dense
    context's keys followed by the replay's, as a dense cache reading the replay after the
    context holds them (so positions and attention are the uncompressed sequence's); the
    template's preamble is not replayed; the cache then holds the context's kept pairs."""
    model, tok = bundled
    ids, C = _chat_prompt(tok)
    policy = RecordingKVzip(budget=64, chunk_size=128)
    preamble = len(chat_turn(tok)[0])
    with kvhf.use_policy(model, policy), torch.no_grad():
        cache = kvhf.compress_context(model, ids, C, tok)
    with torch.no_grad():                                       # the model runs `full` again
        dense = DynamicCache()
        model(ids[:, :C], past_key_values=dense)
        chunks = policy.replay_chunks(ids[:, :C], preamble,
                                      lambda t: tok.encode(t, add_special_tokens=False),
                                      chat_turn(tok)[1])
        assert [c.start for c in chunks] == list(range(preamble, C, 128)) and len(chunks) > 1
        for chunk in chunks:
            replayed = copy.deepcopy(dense)
            model(chunk.input_ids, past_key_values=replayed)
            seen = [keys for _, c, keys in policy.seen if c.start == chunk.start]
            assert len(seen) == 30
            for layer, keys in zip(replayed.layers, seen):
                torch.testing.assert_close(keys, layer.keys[0].transpose(0, 1),
                                           rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == C and not cache.awaits_replay
    kept = sum(int(layer.log_counts[0].isfinite().sum()) if layer.log_counts is not None
               else 3 * layer.keys.shape[2] for layer in cache.layers)
    assert kept == 64 * 30 * 3


def test_generate_replays_after_the_dense_prefill(bundled):
    """``generate`` with KVzip: the first token comes from the dense prompt (the same
    logits as ``full``), the replay then compresses the prompt to the budget and decoding
    reads the kept pairs at the true positions."""
    model, tok = bundled
    ids, _ = _chat_prompt(tok)
    with torch.no_grad():
        full = model.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
        with kvhf.use_policy(model, "kvzip", budget_ratio=0.25):
            out = model.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    torch.testing.assert_close(out.logits[0], full.logits[0])
    cache = out.past_key_values
    assert cache.get_seq_length() == ids.shape[1] + 3 and not cache.awaits_replay
    assert max(layer.keys.shape[2] for layer in cache.layers) < ids.shape[1]


def test_a_budget_over_the_prompt_needs_no_replay_and_equals_full(bundled):
    model, tok = bundled
    ids, C = _chat_prompt(tok)
    with torch.no_grad():
        full = model.generate(ids, max_new_tokens=6, do_sample=False)
        with kvhf.use_policy(model, "kvzip", budget=4096):
            cache = kvhf.compress_context(model, ids, C, tok)
            assert not cache.awaits_replay
            out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, full)


def test_reading_past_a_prompt_that_awaits_its_replay_is_refused(bundled):
    model, tok = bundled
    ids, C = _chat_prompt(tok)
    with kvhf.use_policy(model, "kvzip", budget=32) as policy, torch.no_grad():
        cache = kvhf.CompressedCache(policy, model.config)
        model(ids[:, :C], past_key_values=cache)
        assert cache.awaits_replay
        with pytest.raises(RuntimeError, match="after replaying it"):
            model(ids[:, C:], past_key_values=cache)
        with pytest.raises(ValueError, match=f"replay of a {C - 1}-token context over a cache "
                                             f"holding {C} tokens"):
            replay_context(model, cache, ids[:, :C - 1], tok)
