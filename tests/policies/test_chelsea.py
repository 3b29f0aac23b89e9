"""Chelsea: chunked soft matching merges what is alike, keeps sink and window exact,
and gives exactly the budget; attention over its centroids (with counts) is exact
when the merged tokens are identical."""

import math

import pytest
import torch

from kvplug.kernels import count_weighted_decode_ref
from kvplug.policies import build_policy

H_KV, D = 2, 32


def _policy(**params):
    params = {"budget": 1, "chunk_size": 8, "sink_size": 2, "window_size": 8, **params}
    return build_policy("chelsea", params)


def _plan(policy, keys, values, budget, span):
    return policy.keep_plan(policy.prefill_scores(0, None, keys, 1.0), budget, span, keys,
                            values)


def _exact_positions(policy, context, span):
    window_start = context - policy.window_size
    return [t for t in range(span) if t < policy.sink_size or t >= window_start]


def _grouped(context, group, seed=0):
    """Keys and values of ``context`` tokens, the ones between a 2-token sink and an
    8-token window in runs of ``group`` identical tokens (per kv-head)."""
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(2, context, H_KV, D, generator=g)
    middle = torch.arange(2, context - 8)
    first = 2 + (middle - 2) // group * group                 # each run's first token
    keys[middle], values[middle] = keys[first], values[first]
    return keys, values


@pytest.mark.parametrize("similarity", ["cosine", "l2"])
def test_planted_pairs_merge_into_one_slot_with_their_exact_key(similarity):
    """One chunk per kv-head holds pairs (A, B) of identical tokens: with room for as many
    merges as pairs, each pair becomes one slot of count 2 with that very key and value."""
    policy = _policy(similarity=similarity)
    context, span = 80, 76
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, context, H_KV, D, generator=g)
    planted = {0: 2 + 8 * 1, 1: 2 + 8 * 4}          # kv-head -> first token of its chunk
    for h, start in planted.items():
        for a in range(start, start + 8, 2):
            keys[a + 1, h], values[a + 1, h] = keys[a, h], values[a, h]
    plan = _plan(policy, keys, values, span - 4, span)
    for h, start in planted.items():
        idx, counts = plan.indices[h].tolist(), plan.counts[h].tolist()
        for a in range(start, start + 8, 2):
            assert a not in idx                      # A merged into its twin B
            slot = idx.index(a + 1)
            assert counts[slot] == 2
            assert torch.equal(plan.keys[h, slot], keys[a + 1, h])
            assert torch.equal(plan.values[h, slot], values[a + 1, h])
        assert sum(c == 2 for c in counts) == 4 and sum(counts) == span


def test_runs_of_four_merge_over_two_rounds():
    """A round merges at most half the tokens; a second round on the survivors joins each
    run of four identical tokens into one slot of count 4."""
    policy = _policy()
    context = span = 2 + 64 + 8
    keys, values = _grouped(context, 4)
    plan = _plan(policy, keys, values, 2 + 16 + 8, span)
    merged = (plan.indices >= 2) & (plan.indices < span - 8)
    assert (plan.counts[merged] == 4).all()
    runs = (plan.indices[merged] - 2) // 4                  # the run each slot stands for
    assert torch.equal(runs.view(H_KV, 16), torch.arange(16).expand(H_KV, 16))
    heads = torch.arange(H_KV)[:, None].expand_as(plan.indices)[merged]
    torch.testing.assert_close(plan.keys[merged], keys[plan.indices[merged], heads])
    torch.testing.assert_close(plan.values[merged], values[plan.indices[merged], heads])


def test_attention_over_merged_identical_tokens_is_exact():
    """Weighing each centroid as ``count`` copies (the ``log c`` bias) gives the attention
    of the original tokens when the merged tokens are identical (GQA group of 3)."""
    policy = _policy()
    context = span = 2 + 64 + 8
    keys, values = _grouped(context, 4, seed=2)
    plan = _plan(policy, keys, values, 2 + 16 + 8, span)
    q = torch.randn(1, 3 * H_KV, D, generator=torch.Generator().manual_seed(3))
    got = count_weighted_decode_ref(q, plan.keys[None], plan.values[None], plan.counts[None],
                              torch.tensor([plan.size]))
    k = keys.transpose(0, 1).repeat_interleave(3, dim=0)          # [H_q, span, D]
    v = values.transpose(0, 1).repeat_interleave(3, dim=0)
    probs = torch.softmax(torch.einsum("hd,hnd->hn", q[0], k) / math.sqrt(D), dim=-1)
    torch.testing.assert_close(got[0], torch.einsum("hn,hnd->hd", probs, v))


def test_budget_at_least_span_is_lossless():
    policy = _policy()
    keys, values = torch.randn(2, 50, H_KV, D)
    for budget in (40, 41):
        plan = _plan(policy, keys, values, budget, 40)
        assert torch.equal(plan.indices, torch.arange(40).expand(H_KV, 40))
        assert torch.equal(plan.counts, torch.ones(H_KV, 40, dtype=torch.long))
        assert plan.keys is None and plan.values is None       # the tokens' own K/V


@pytest.mark.parametrize("chunk_size", [2, 7, 8, 512])
@pytest.mark.parametrize("budget", [11, 12, 30, 90])
def test_plan_has_budget_slots_exact_sink_and_window_and_conserves_tokens(budget,
                                                                          chunk_size):
    """Any budget from the exact tokens + 1 up: that many ascending slots, the sink and the
    window's part of the span kept exact with count 1, counts summing to the span, and
    count-weighted means that keep the span's sums of keys and of values."""
    policy = _policy(chunk_size=chunk_size)
    context, span = 101, 96                        # window [93, 101): 3 tokens in the span
    keys, values = torch.randn(2, context, H_KV, D, generator=torch.Generator().manual_seed(4))
    plan = _plan(policy, keys, values, budget, span)
    assert plan.indices.shape == plan.counts.shape == (H_KV, budget)
    assert plan.keys.shape == plan.values.shape == (H_KV, budget, D)
    assert (plan.indices.diff(dim=1) > 0).all() and (plan.indices < span).all()
    assert torch.equal(plan.counts.sum(dim=1), torch.full((H_KV,), span))
    exact = _exact_positions(policy, context, span)
    assert exact == [0, 1, 93, 94, 95]
    for h in range(H_KV):
        idx = plan.indices[h].tolist()
        slots = [idx.index(t) for t in exact]
        assert (plan.counts[h, slots] == 1).all()
        assert torch.equal(plan.keys[h, slots], keys[exact, h])
        assert torch.equal(plan.values[h, slots], values[exact, h])
    for stored, own in ((plan.keys, keys), (plan.values, values)):
        total = (plan.counts[..., None] * stored).sum(dim=1)
        torch.testing.assert_close(total, own[:span].sum(dim=0), atol=1e-4, rtol=1e-5)


def test_half_precision_kv_stays_in_its_dtype():
    policy = _policy()
    keys, values = torch.randn(2, 60, H_KV, D).to(torch.bfloat16)
    plan = _plan(policy, keys, values, 30, 60)
    assert plan.keys.dtype == plan.values.dtype == torch.bfloat16
    assert plan.size == 30 and (plan.counts.sum(dim=1) == 60).all()


def test_scores_mark_sink_and_window_and_budget_holds_them():
    policy = _policy(sink_size=3, window_size=5)
    scores = policy.prefill_scores(0, torch.randn(5, 4, D), torch.randn(20, H_KV, D), 1.0)
    inf = torch.isinf(scores.token)
    assert scores.token.shape == (H_KV, 20)
    assert inf[:, :3].all() and inf[:, -5:].all() and not inf[:, 3:-5].any()
    assert policy.observation_window == 5
    assert policy.token_budget(1000) == 3 + 5 + 1            # the exact tokens + 1 slot
    assert policy.token_budget(6) == 6
    assert _policy(budget=0, budget_ratio=0.5).token_budget(1000) == 500


def test_parameters_are_validated():
    with pytest.raises(ValueError, match=r"'chunk_size'=1 is out of range \[2, inf\]"):
        _policy(chunk_size=1)
    with pytest.raises(ValueError, match=r"'similarity'='dot' is not one of \['cosine', 'l2'\]"):
        _policy(similarity="dot")
    with pytest.raises(ValueError, match=r"'sink_size'=-1 is out of range"):
        _policy(sink_size=-1)
    with pytest.raises(ValueError, match=r"'window_size'=0 is out of range"):
        _policy(window_size=0)
    with pytest.raises(ValueError, match="set exactly one of budget"):
        _policy(budget_ratio=0.2)
    policy = _policy()
    keys = torch.randn(50, H_KV, D)
    with pytest.raises(ValueError, match=r"budget=10 cannot hold a span of 50 tokens: 10 "
                                         r"are kept exact .* budget must be >= 11"):
        _plan(policy, keys, keys, 10, 50)
