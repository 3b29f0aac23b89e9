"""``kvplug.quality_profile``: its masked dense cache decodes as the compressed cache does."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoTokenizer

from kvplug import quality_profile as qp
from kvplug.integrations import transformers as kvhf

TEXT = ("The lighthouse keeper wrote the tide tables by hand every evening, and the number he "
        "guarded was 4182. Ships passed, gulls argued, and the lamp turned all night. ") * 12


@pytest.fixture(scope="module")
def model_and_ids(model_dir):
    model = kvhf.load_model(model_dir, "full", dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT, return_tensors="pt").input_ids[:, :256]
    assert ids.shape[1] == 256
    return model, ids


@pytest.mark.parametrize("variant,ratio", [("snapkv", 0.3), ("cake", 0.3), ("snapkv", 0.99),
                                           ("kvzip", 0.3), ("kvzip[chunk_size=100]", 0.3)])
def test_masked_decode_equals_compressed_cache(model_and_ids, model_dir, variant, ratio):
    """The same prompt through kvplug's CompressedCache (generate; KVzip replays the prompt
    after its prefill, in one chunk or three) and through the profile's masks over a dense
    cache (KVzip's replay over it): the same logits at every decode step."""
    model, ids = model_and_ids
    name, _, params = variant.partition("[")
    params = dict(p.split("=") for p in params.rstrip("]").split(",") if p)
    new = 4
    with kvhf.use_policy(model, name, budget_ratio=ratio,
                         **{k: int(v) for k, v in params.items()}), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new, min_new_tokens=new, pad_token_id=2,
                             return_dict_in_generate=True, output_logits=True)
    attention = qp.MaskedAttention(window=64)
    AttentionInterface.register(qp._IMPL, attention)
    model.set_attn_implementation(qp._IMPL)
    try:
        cache, logits, records = qp.prefill(model, attention, ids)
        parsed = qp.parse_variant(variant, 30)
        replayed = None
        if name == "kvzip":
            replayed = qp.replay_scores(model, attention, cache, ids, qp._policy(parsed, ratio),
                                        AutoTokenizer.from_pretrained(model_dir))
            assert cache.get_seq_length() == ids.shape[1]       # the replay's KV is cut
        masks, budgets, _ = qp.keep_masks(parsed, ratio, records, replayed)
        assert sum(int(m.sum()) for m in masks) == sum(budgets) * 3   # 3 kv-heads
        torch.testing.assert_close(logits, out.logits[0][0], atol=1e-4, rtol=1e-4)
        attention.masks = list(masks)
        attention.eviction = qp.decode_eviction(parsed, ratio, budgets, ids.shape[1])
        assert (attention.eviction is not None) == (variant == "cake")
        generated = out.sequences[0, ids.shape[1]:]
        with torch.no_grad():
            for step in range(1, new):
                logits = model(generated[step - 1].view(1, 1), past_key_values=cache,
                               use_cache=True).logits[0, -1]
                torch.testing.assert_close(logits, out.logits[step][0], atol=1e-4, rtol=1e-4)
        if attention.eviction is not None:        # decoding evicted: every layer at its budget
            assert [int(m.sum()) for m in attention.masks] == [b * 3 for b in budgets]
    finally:
        attention.masks, attention.eviction = None, None
        model.set_attn_implementation(kvhf.ATTN_IMPLEMENTATION)


def test_query_agnostic_masked_equals_compress_context(model_and_ids):
    """The question read over a context compressed before it: the same next-token logits."""
    model, ids = model_and_ids
    context = 200
    with kvhf.use_policy(model, "snapkv", budget_ratio=0.4), torch.no_grad():
        cache = kvhf.compress_context(model, ids, context)
        expected = model(ids[:, context:], past_key_values=cache).logits[0, -1]
    attention = qp.MaskedAttention(window=64)
    AttentionInterface.register(qp._IMPL, attention)
    model.set_attn_implementation(qp._IMPL)
    try:
        cache, _, records = qp.prefill(model, attention, ids[:, :context])
        masks, _, _ = qp.keep_masks(qp.parse_variant("snapkv", 30), 0.4, records)
        attention.masks = masks
        with torch.no_grad():
            got = model(ids[:, context:], past_key_values=cache).logits[0, -1]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    finally:
        attention.masks = None
        model.set_attn_implementation(kvhf.ATTN_IMPLEMENTATION)


def test_variants_keep_sinks_share_and_skip_layers():
    """+sinkK keeps the first K tokens everywhere at the same budget, +shared keeps one set
    per layer, @dense/@only leave the other layers whole."""
    torch.manual_seed(0)
    span, heads = 300, 3
    records = qp.Records([torch.randn(64, 9, 64) for _ in range(4)],
                         [torch.randn(span, heads, 64) for _ in range(4)],
                         [torch.randn(span, heads, 64) for _ in range(4)], 0.125)
    plain, budgets, _ = qp.keep_masks(qp.parse_variant("snapkv", 4), 0.25, records)
    sinks, sink_budgets, _ = qp.keep_masks(qp.parse_variant("snapkv+sink4", 4), 0.25, records)
    assert budgets == sink_budgets == [75] * 4
    assert all(m[:, :4].all() and int(m.sum()) == 75 * heads for m in sinks)
    shared, _, _ = qp.keep_masks(qp.parse_variant("snapkv+shared", 4), 0.25, records)
    assert all((m == m[:1]).all() for m in shared)
    assert not all((m == m[:1]).all() for m in plain)
    only, _, _ = qp.keep_masks(qp.parse_variant("snapkv@only=2", 4), 0.25, records)
    assert [bool(m.all()) for m in only] == [True, True, False, True]
    assert torch.equal(only[2], plain[2])
    dense, _, _ = qp.keep_masks(qp.parse_variant("snapkv@dense=0-1", 4), 0.25, records)
    assert [bool(m.all()) for m in dense] == [True, True, False, False]
    tova, _, _ = qp.keep_masks(qp.parse_variant("tova", 4), 0.25, records)
    assert all(m[:, -1].all() and (m == m[:1]).all() for m in tova)


@pytest.mark.parametrize("text", ["chelsea", "quest", "snapkv+sinks", "snapkv@first=1",
                                  "tova[window_size=3]", "cake[gamma=-1]",
                                  "snapkv@only=x"])
def test_bad_variants_are_refused(text):
    with pytest.raises(ValueError, match="variant|gamma"):
        qp.parse_variant(text, 30)


def test_greedy_with_a_guess_decodes_as_without(model_and_ids):
    """Checking the dense answer in one forward gives greedy decoding's tokens, whether the
    guess is right, wrong from its second token, or longer than what is decoded."""
    model, ids = model_and_ids
    attention = qp.MaskedAttention(window=64)
    AttentionInterface.register(qp._IMPL, attention)
    model.set_attn_implementation(qp._IMPL)
    try:
        cache, logits, records = qp.prefill(model, attention, ids)
        masks, _, _ = qp.keep_masks(qp.parse_variant("snapkv", 30), 0.3, records)
        never = lambda tokens: False
        plain = qp.greedy(model, attention, cache, logits, masks, None, 12, set(), never)
        assert cache.get_seq_length() == ids.shape[1]
        wrong = plain[:1] + [(plain[1] + 1) % 1000] + plain[2:]
        for guess in (plain, wrong, plain + plain, plain[:5]):
            assert qp.greedy(model, attention, cache, logits, masks, None, 12, set(), never,
                             guess) == plain
            assert cache.get_seq_length() == ids.shape[1]
        stop = lambda tokens: len(tokens) >= 7
        assert qp.greedy(model, attention, cache, logits, masks, None, 12, set(), stop,
                         plain) == plain[:7]
    finally:
        model.set_attn_implementation(kvhf.ATTN_IMPLEMENTATION)
