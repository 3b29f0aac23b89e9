"""HF transformers path of the policies that keep fewer KV tokens after prefill
(:mod:`kvplug.integrations.hf_compression`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvplug.integrations import transformers as kvhf
from kvplug.integrations.capabilities import ENGINES, HF
from kvplug.policies import CAKE, POLICIES, CompressionPolicy, KeepPlan, LayerScores, Policy
from policy_matrix import COMPRESSING

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
        "changed how knowledge spread across Europe. Workshops multiplied, books became cheaper, "
        "and literacy slowly rose in cities and monasteries alike. ") * 20


pytestmark = pytest.mark.usefixtures("clean_env")


def _prompt(tok, length: int) -> torch.Tensor:
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :length]
    assert ids.shape[1] == length
    return ids


def _greedy(model, input_ids, new_tokens):
    with torch.no_grad():
        return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                              do_sample=False, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=2,
                              return_dict_in_generate=True, output_logits=True)


@dataclass
class Planted(CompressionPolicy):
    """Keeps the prompt positions ``planted`` names per kv-head, and the last token (its
    window): scores the test controls.  Not registered."""

    name = "planted"
    planted: tuple = ()

    @property
    def observation_window(self) -> int:
        return 1

    def prefill_scores(self, layer_idx, queries, keys, scale):
        token = torch.zeros(keys.shape[1], keys.shape[0])
        for head, positions in enumerate(self.planted):
            token[head, list(positions)] = 1.0
        token[:, -1] = float("inf")
        return LayerScores(token)


@dataclass
class MergeIdentical(CompressionPolicy):
    """Merges the prompt tokens of a kv-head whose key and value are identical into one
    slot, the first of them, weighed by how many it stands for.  Not registered."""

    name = "merge_identical"

    @property
    def observation_window(self) -> int:
        return 1

    def prefill_scores(self, layer_idx, queries, keys, scale):
        return LayerScores(torch.zeros(keys.shape[1], keys.shape[0]))

    def keep_plan(self, scores, budget, span, keys, values, cell=None):
        firsts, counts = [], []
        for head in range(keys.shape[1]):
            kv = torch.cat([keys[:span, head], values[:span, head]], dim=-1)
            _, inverse, count = torch.unique(kv, dim=0, return_inverse=True, return_counts=True)
            first = torch.full((len(count),), span).scatter_reduce(0, inverse, torch.arange(span),
                                                                   "amin")
            order = first.argsort()
            firsts.append(first[order])
            counts.append(count[order])
        return KeepPlan(torch.stack(firsts), torch.stack(counts))


def _attention_module(num_kv_heads=2, group=2, head_dim=16):
    """What the HF attention interface reads of a Llama attention layer (one layer)."""
    config = LlamaConfig(hidden_size=num_kv_heads * group * head_dim,
                         num_attention_heads=num_kv_heads * group,
                         num_key_value_heads=num_kv_heads, head_dim=head_dim, num_hidden_layers=1)
    module = torch.nn.Module()
    module.config, module.layer_idx = config, 0
    module.num_key_value_groups, module.is_causal = group, True
    return module


def test_snapkv_with_budget_over_context_equals_full_and_sdpa(bundled, model_dir):
    """A budget covering prompt and generated tokens keeps every token: greedy output and
    logits are those of ``full`` and of transformers' SDPA, bit for bit."""
    model, tok = bundled
    input_ids, new_tokens = _prompt(tok, 300), 8
    sdpa = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa",
                                                dtype=torch.float32).eval()
    ref = _greedy(sdpa, input_ids, new_tokens)
    full = _greedy(model, input_ids, new_tokens)
    with kvhf.use_policy(model, "snapkv", budget=300 + new_tokens):
        out = _greedy(model, input_ids, new_tokens)
    assert isinstance(out.past_key_values, kvhf.CompressedCache)
    assert len(set(ref.sequences[0, 300:].tolist())) > 2          # not a degenerate run
    assert torch.equal(out.sequences, full.sequences) and torch.equal(out.sequences, ref.sequences)
    assert torch.equal(torch.stack(out.logits), torch.stack(full.logits))


def _position_ids_seen(module: torch.nn.Module, calls: list) -> torch.utils.hooks.RemovableHandle:
    """Record the ``position_ids`` keyword of every call of ``module``."""
    return module.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(kwargs["position_ids"].tolist()), with_kwargs=True)


@pytest.mark.parametrize("name", sorted(COMPRESSING))
def test_small_budget_keeps_budget_tokens_at_logical_positions(bundled, name):
    """Budget 96 of a 400-token prompt: the layers keep 96 slots of the prompt (on average
    for CAKE and KVzip, which budget each layer, KVzip each kv-head too; Chelsea's slots
    stand for every prompt token) and
    one more per generated token (CAKE, which also evicts at decode: none more), while
    positions (and ``get_seq_length``) stay those of the uncompressed sequence, in
    ``generate`` and in a forward given none."""
    model, tok = bundled
    P, budget, new_tokens = 400, 96, 6
    input_ids = _prompt(tok, P)
    generate_positions, rope_positions = [], []
    with kvhf.use_policy(model, name, budget=budget), torch.no_grad():
        hook = _position_ids_seen(model.model, generate_positions)
        try:
            out = _greedy(model, input_ids, new_tokens)
        finally:
            hook.remove()
        cache = out.past_key_values
        assert isinstance(cache, kvhf.CompressedCache)
        assert cache.get_seq_length() == P + new_tokens - 1     # the last token is never cached
        hook = _position_ids_seen(model.model.rotary_emb, rope_positions)
        try:
            model(out.sequences[:, -1:], past_key_values=cache)
        finally:
            hook.remove()
    assert out.sequences.shape == (1, P + new_tokens)
    replays = int("replay" in POLICIES[name].stages)    # one replay chunk after the prompt
    assert generate_positions[0] == [list(range(P))]
    assert all(call[0][0] == P for call in generate_positions[1:1 + replays])
    assert generate_positions[1 + replays:] == [[[P + t]] for t in range(new_tokens - 1)]
    assert rope_positions == [[[P + new_tokens - 1]]]
    assert cache.get_seq_length() == P + new_tokens
    stages = POLICIES[name].stages
    generated = 0 if "decode_compress" in stages else new_tokens
    slots = [layer.keys.shape[2] - generated for layer in cache.layers]       # of the prompt
    assert all(layer.values.shape == (1, 3, n + generated, 64)
               for layer, n in zip(cache.layers, slots))
    kept = [3 * n if layer.log_counts is None else int(layer.log_counts[0].isfinite().sum())
            for layer, n in zip(cache.layers, slots)]                # kept (kv-head, slot) pairs
    assert sum(kept) == budget * len(slots) * 3
    assert (len(set(kept)) > 1) == ("layer_budgets" in stages)
    for layer in cache.layers:
        if name == "chelsea":
            torch.testing.assert_close(layer.log_counts.exp().sum(-1), torch.full((1, 3), P * 1.0))
        elif name == "kvzip":      # its kv-heads keep their own numbers: padded with count 0
            assert layer.log_counts is None or set(layer.log_counts.unique().tolist()) <= {
                0.0, float("-inf")}
        else:
            assert layer.log_counts is None
    if name == "kvzip":
        assert any(layer.log_counts is not None for layer in cache.layers)
        assert max(kept) <= 2 * budget * 3           # no layer past its cap


def test_kept_slots_are_the_planned_tokens_and_decoding_reads_those(bundled):
    """A policy whose scores the test plants (other positions per kv-head): every layer keeps
    exactly the planted tokens' K/V of a dense prefill, and the next decode step equals a
    dense cache cut down to those tokens, decoded at the true position."""
    model, tok = bundled
    P = 200
    planted = ((0, 5, 17, 100), (3, 4, 50, 150), (1, 2, 180, 198))
    kept = torch.tensor([sorted(p) + [P - 1] for p in planted])                # [H_kv, 5]
    input_ids = _prompt(tok, P)
    with torch.no_grad():
        dense = DynamicCache()
        next_id = model(input_ids, past_key_values=dense).logits[:, -1:].argmax(-1)
        _cut_to(dense, kept)
        want = model(next_id, past_key_values=dense, position_ids=torch.tensor([[P]])).logits

        with kvhf.use_policy(model, Planted(budget=5, planted=planted)) as policy:
            cache = kvhf.CompressedCache(policy, model.config)
            model(input_ids, past_key_values=cache)
            for ours, cut in zip(cache.layers, dense.layers):
                assert ours.log_counts is None
                assert torch.equal(ours.keys, cut.keys[:, :, :5])
                assert torch.equal(ours.values, cut.values[:, :, :5])
            got = model(next_id, past_key_values=cache).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _cut_to(cache: DynamicCache, kept: torch.Tensor) -> None:
    """Keep only the ``kept`` ``[H_kv, n]`` positions of every layer of a dense cache."""
    for layer in cache.layers:
        index = kept[None, :, :, None].expand(1, -1, -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)


def test_a_context_compressed_before_its_question_is_read_by_the_question(bundled):
    """Query-agnostic: the context (200 tokens) is compressed before the question (20
    tokens) is seen; the question's forward attends to the kept slots and causally to
    itself at its true positions, as a dense cache cut down to the kept tokens does."""
    model, tok = bundled
    C, Q = 200, 20
    planted = ((0, 5, 17, 100), (3, 4, 50, 150), (1, 2, 180, 198))
    kept = torch.tensor([sorted(p) + [C - 1] for p in planted])
    input_ids = _prompt(tok, C + Q)
    with torch.no_grad():
        dense = DynamicCache()
        model(input_ids[:, :C], past_key_values=dense)
        _cut_to(dense, kept)
        want = model(input_ids[:, C:], past_key_values=dense,
                     position_ids=torch.arange(C, C + Q)[None]).logits
        with kvhf.use_policy(model, Planted(budget=5, planted=planted)):
            cache = kvhf.compress_context(model, input_ids, C)
            assert cache.get_seq_length() == C
            assert all(layer.keys.shape[2] == 5 for layer in cache.layers)
            got = model(input_ids[:, C:], past_key_values=cache).logits
    assert cache.get_seq_length() == C + Q
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_query_agnostic_generation_with_budget_over_the_context_reads_as_one_forward(bundled):
    """Keeping every context token, compressing the context first and then reading the
    question gives the tokens of reading the whole prompt at once (logits to float
    rounding: the prefill's matmuls split differently); a policy that keeps every token
    needs no context step at all."""
    model, tok = bundled
    input_ids, new_tokens = _prompt(tok, 260), 8
    full = _greedy(model, input_ids, new_tokens)
    assert kvhf.compress_context(model, input_ids, 200) is None
    with kvhf.use_policy(model, "snapkv", budget=4096), torch.no_grad():
        cache = kvhf.compress_context(model, input_ids, 200)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             do_sample=False, max_new_tokens=new_tokens, pad_token_id=2,
                             past_key_values=cache, return_dict_in_generate=True,
                             output_logits=True)
        with pytest.raises(ValueError, match=r"context_tokens must be in \[1, 259\]"):
            kvhf.compress_context(model, input_ids, 260)
    assert torch.equal(out.sequences, full.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(full.logits), rtol=0,
                               atol=1e-4)


def test_merged_slots_weighed_by_counts_equal_the_uncompressed_cache():
    """Tokens with identical K/V merged into one slot of count c: a decode step over the
    merged cache (a log c bias per slot) equals attention over every token.  The two rows
    merge different numbers of tokens, so the shorter row is padded with count-0 slots."""
    g = torch.Generator().manual_seed(0)
    B, H, G, D, N = 2, 2, 2, 16, 24
    module = _attention_module(H, G, D)
    keys, values = (torch.randn(B, H, N + 1, D, generator=g) for _ in range(2))
    for row, copies in ((0, {2: [3, 7, 8], 10: [20]}), (1, {0: [1, 2, 3, 4, 5]})):
        for source, targets in copies.items():
            for kv in (keys, values):
                kv[row, :, targets] = kv[row, :, [source]]
    prompt_q, q = torch.randn(B, H * G, N, D, generator=g), torch.randn(B, H * G, 1, D, generator=g)
    policy = MergeIdentical(budget=1)
    cache = kvhf.CompressedCache(policy, module.config)
    k, v = cache.update(keys[:, :, :N], values[:, :, :N], 0)
    kvhf._compression_attention(module, prompt_q, k, v, None, policy=policy, scaling=0.25)
    layer = cache.layers[0]
    assert layer.keys.shape == (B, H, N - 4, D)
    assert torch.equal(layer.log_counts[1, :, -1], torch.full((H,), float("-inf")))  # padding
    assert torch.allclose(layer.log_counts[0, :, 2].exp(), torch.tensor(4.0))

    k, v = cache.update(keys[:, :, N:], values[:, :, N:], 0)
    got, _ = kvhf._compression_attention(module, q, k, v, None, policy=policy, scaling=0.25)
    want, _ = sdpa_attention_forward(module, q, keys, values, None, scaling=0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unweighed, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)
    assert not torch.allclose(unweighed, want, atol=1e-3)


def _decode_one_layer(policy, prompt, steps, batch=1, salient=(), seed=0):
    """One attention layer (2 kv-heads of 2 queries, D 16) with ``policy``'s cache: a
    ``prompt``-token prefill, then ``steps`` decode steps.  Keys are small and random except
    the ``salient`` positions, whose keys lie along the direction every query points to.
    Returns per step the slots the attention read, the slots held after it, the positions
    kept (``[B, H_kv, n]``, found by key), and the cache."""
    g = torch.Generator().manual_seed(seed)
    H, G, D, N = 2, 2, 16, prompt + steps
    module = _attention_module(H, G, D)
    keys, values = torch.randn(batch, H, N, D, generator=g) * 0.3, torch.randn(batch, H, N, D,
                                                                                 generator=g)
    direction = torch.randn(D, generator=g)
    keys[:, :, list(salient)] = direction + 0.1 * torch.randn(len(salient), D, generator=g)
    queries = direction + 0.3 * torch.randn(batch, H * G, N, D, generator=g)
    cache = kvhf.CompressedCache(policy, module.config)
    k, v = cache.update(keys[:, :, :prompt], values[:, :, :prompt], 0)
    kvhf._compression_attention(module, queries[:, :, :prompt], k, v, None, policy=policy)
    read, held, kept = [], [], []
    for t in range(prompt, N):
        k, v = cache.update(keys[:, :, t:t + 1], values[:, :, t:t + 1], 0)
        q = queries[:, :, t:t + 1]
        got, _ = kvhf._compression_attention(module, q, k, v, None, policy=policy)
        want, _ = sdpa_attention_forward(module, q, k, v, None)     # every slot, pre-eviction
        torch.testing.assert_close(got, want)
        layer = cache.layers[0]
        read.append(k.shape[2])
        held.append(layer.keys.shape[2])
        match = (layer.keys[:, :, :, None] == keys[:, :, None, :t + 1]).all(-1)   # [B, H, n, t+1]
        assert bool((match.sum(-1) == 1).all())
        kept.append(match.float().argmax(-1))
    assert cache.get_seq_length() == N
    return read, held, kept, cache


def test_decode_eviction_cuts_a_layer_back_to_its_budget_after_each_step():
    """CAKE's decode-time eviction (official ``CakeDecodingKVCache_LayerWise``): a layer
    whose prompt fitted its budget (24, window 4) grows one slot a step until it holds the
    budget; from then on each step's attention reads budget + 1 slots and leaves budget,
    the last 4 positions always among them.  A prompt compressed to the budget at prefill
    is held there from the first step."""
    policy = CAKE(budget=24, window_size=4)
    read, held, kept, _ = _decode_one_layer(policy, prompt=20, steps=10, batch=2)
    assert read == [21, 22, 23, 24, 25, 25, 25, 25, 25, 25]
    assert held == [21, 22, 23, 24, 24, 24, 24, 24, 24, 24]
    for step, positions in enumerate(kept):
        newest = 20 + step
        assert all(set(range(newest - 3, newest + 1)) <= set(row) for row in
                   positions.flatten(0, 1).tolist())
    read, held, _, cache = _decode_one_layer(policy, prompt=40, steps=6)
    assert read == [25] * 6 and held == [24] * 6 and cache.layers[0].budgets == [24]


def test_planted_salient_tokens_survive_decode_eviction():
    """Tokens every query attends to (keys along the queries' direction) stay through 40
    decode steps that each evict one slot, in every kv-head; the budget holds.  (The
    budget leaves room for each one's pooling neighbourhood: pooled scores rank a
    salient token's neighbours about as high as the token itself.)"""
    salient = (3, 17, 29)
    _, held, kept, _ = _decode_one_layer(CAKE(budget=24, window_size=4), prompt=36, steps=40,
                                         salient=salient, seed=3)
    assert held == [24] * 40
    for positions in kept:
        assert all(set(salient) <= set(row) for row in positions[0].tolist())


def test_cake_with_budget_over_context_and_generated_equals_full(bundled):
    """A budget covering prompt and generated tokens never evicts: CAKE's tokens and logits
    are ``full``'s; two tokens less evicts once, after the last forward's attention read
    every slot, so the output is still ``full``'s and every layer then holds the budget."""
    model, tok = bundled
    P, new_tokens = 200, 8
    input_ids = _prompt(tok, P)
    full = _greedy(model, input_ids, new_tokens)
    for budget, held in ((P + new_tokens, P + new_tokens - 1), (P + new_tokens - 2, None)):
        with kvhf.use_policy(model, "cake", budget=budget):
            out = _greedy(model, input_ids, new_tokens)
        assert torch.equal(out.sequences, full.sequences)
        assert torch.equal(torch.stack(out.logits), torch.stack(full.logits))
        cache = out.past_key_values
        assert cache.get_seq_length() == P + new_tokens - 1
        assert {layer.keys.shape[2] for layer in cache.layers} == {held or budget}


def test_decode_eviction_in_a_batch_follows_each_row_alone(bundled):
    """Two prompts in one batch: CAKE budgets their layers differently (rows padded with
    count-0 slots) and evicts each row to its own budget at every decode step; each row
    decodes the tokens it decodes alone."""
    model, tok = bundled
    P, new_tokens = 200, 6
    ids = tok(TEXT, return_tensors="pt").input_ids
    batch = torch.cat([ids[:, :P], ids[:, 37:37 + P]])
    with kvhf.use_policy(model, "cake", budget=48):
        together = _greedy(model, batch, new_tokens)
        alone = [_greedy(model, batch[row:row + 1], new_tokens) for row in range(2)]
    cache = together.past_key_values
    assert any(len(set(layer.budgets)) > 1 for layer in cache.layers)
    for layer, *rows in zip(cache.layers, *(a.past_key_values.layers for a in alone)):
        for row, single in enumerate(rows):
            assert single.keys.shape[2] == layer.budgets[row] == single.budgets[0]
            real = layer.keys.shape[2] if layer.log_counts is None else \
                int((layer.log_counts[row, 0] > float("-inf")).sum())
            assert real == layer.budgets[row]
    for row in range(2):
        assert torch.equal(together.sequences[row], alone[row].sequences[0])


def test_cache_reset_takes_a_new_prompt():
    module = _attention_module()
    policy = Planted(budget=2, planted=((0,), (1,)))
    cache = kvhf.CompressedCache(policy, module.config)
    kv = torch.randn(1, 2, 10, 16)
    for length in (10, 6):
        k, v = cache.update(kv[:, :, :length], kv[:, :, :length], 0)
        kvhf._compression_attention(module, torch.randn(1, 4, length, 16), k, v, None,
                                    policy=policy)
        assert cache.layers[0].keys.shape[2] == 2 and cache.get_seq_length() == length
        cache.reset()
        assert cache.get_seq_length() == 0 and not cache.layers[0].compressed


def test_padded_batch_is_refused(bundled):
    model, _ = bundled
    input_ids = torch.tensor([[2, 2, 2, 504, 3303, 314, 260], [1, 504, 3303, 314, 260, 3151, 30]])
    attention_mask = (input_ids != 2).long()
    with kvhf.use_policy(model, "snapkv", budget=4), torch.no_grad():
        with pytest.raises(ValueError, match="'snapkv' in the HF path needs unpadded batches"):
            model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=2,
                           do_sample=False, pad_token_id=2)


def test_edits_and_foreign_caches_are_refused(bundled):
    model, tok = bundled
    input_ids = _prompt(tok, 20)
    params = {"budget": 8, "window_size": 4}
    with kvhf.use_policy(model, "snapkv", **params) as policy, torch.no_grad():
        with pytest.raises(NotImplementedError, match="cannot reorder, crop or repeat"):
            model.generate(input_ids=input_ids, max_new_tokens=3, do_sample=False,
                           pad_token_id=2, num_beams=2)
        with pytest.raises(ValueError, match="reads a cache kvplug did not build"):
            model.generate(input_ids=input_ids, max_new_tokens=2, do_sample=False,
                           pad_token_id=2, past_key_values=DynamicCache())
        cache = kvhf.CompressedCache(policy, model.config)
        model(input_ids, past_key_values=cache)
        assert cache.layers[0].keys.shape[2] == 8
        with pytest.raises(ValueError, match="the cache was built for"):
            with kvhf.use_policy(model, "snapkv", **params):
                model(input_ids[:, :1], past_key_values=cache)
        with pytest.raises(NotImplementedError, match="cannot reorder, crop or repeat"):
            cache.crop(-1)


def test_policy_needing_what_hf_lacks_is_refused_when_attached(model_dir):
    @dataclass
    class Offloading(Policy):  # deliberately not registered
        name = "offloading"
        stages = frozenset({"prefill_compress", "offload"})
        store = "paged_host"

    supported = re.escape(str(sorted(ENGINES[HF][0])))
    with pytest.raises(ValueError, match=r"kvplug policy 'offloading' needs offload, store "
                                         r"'paged_host', which HF transformers does not support "
                                         r"\(it supports stages " + supported):
        kvhf.load_model(model_dir, Offloading())


def test_dispatch_follows_declared_stages():
    assert kvhf._attention_for(kvhf.build_policy("snapkv", {"budget": 8})) \
        is kvhf._compression_attention
    assert kvhf._attention_for(Planted(budget=2)) is kvhf._compression_attention
    assert kvhf._attention_for(kvhf.build_policy("quest", {"budget": 8})) \
        is kvhf._selection_attention
