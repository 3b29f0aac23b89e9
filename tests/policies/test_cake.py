import math

import pytest
import torch

from kvplug.policies import CAKE, LayerScores, build_policy
from kvplug.policies.cake import share
from kvplug.policies.compression import pool_scores, top_tokens

LN2 = math.log(2.0)


def cake(**params):
    return build_policy("cake", {"budget": 24, **params})


def layer_scores(preferences, context):
    return [LayerScores(torch.zeros(1, context), p) for p in preferences]


def toy_inputs():
    """N=4 keys (D=1) ``[ln 2, 0, 0, 0]``, W=2 queries, 2 query heads on 1 kv-head: head 0
    (q=1) attends 2:1:1 then 2:1:1:1, head 1 (q=0) uniformly over what it can see."""
    keys = torch.tensor([LN2, 0.0, 0.0, 0.0]).reshape(4, 1, 1)
    queries = torch.tensor([1.0, 0.0]).reshape(1, 2, 1).expand(2, 2, 1)
    return queries, keys


def test_registered_with_official_defaults():
    policy = build_policy("cake", {"budget_ratio": 0.1})
    assert isinstance(policy, CAKE) and policy.observation_window == 32
    assert (policy.gamma, policy.tau1, policy.tau2, policy.kernel_size) == (200.0, 1.0, 1.0, 5)


def test_preference_is_dispersion_and_shift():
    # non-window attention (keys 0, 1) per head and window query:
    head0 = [[1 / 2, 1 / 4], [2 / 5, 1 / 5]]
    head1 = [[1 / 3, 1 / 3], [1 / 4, 1 / 4]]
    H = -sum(a * math.log(a) for rows in (head0, head1) for row in rows for a in row)
    V = sum((a - b) ** 2 / 2 for first, second in (head0, head1) for a, b in zip(first, second))
    assert V == pytest.approx(0.005 + 0.00125 + 2 / 288)
    queries, keys = toy_inputs()
    got = cake(window_size=2, tau1=2.0, tau2=0.5).prefill_scores(0, queries, keys, 1.0)
    assert got.preference == pytest.approx(H ** 0.5 * V ** 2, rel=1e-5)


def test_indicator_is_mean_plus_gamma_var_group_mean_then_window():
    # head 0: mean (0.45, 0.225), unbiased var (0.005, 0.00125); head 1: 7/24 and 1/288
    head0 = torch.tensor([0.45 + 200 * 0.005, 0.225 + 200 * 0.00125])
    head1 = torch.full((2,), 7 / 24 + 200 / 288)
    expected = (head0 + head1) / 2
    queries, keys = toy_inputs()
    token = cake(window_size=2, kernel_size=1).prefill_scores(0, queries, keys, 1.0).token
    assert token.shape == (1, 4) and torch.isinf(token[0, 2:]).all()
    torch.testing.assert_close(token[0, :2], expected)
    pooled = cake(window_size=2, kernel_size=3).prefill_scores(0, queries, keys, 1.0).token
    torch.testing.assert_close(pooled[:, :2], pool_scores(expected[None], 3))


def test_budgets_follow_preference_and_redistribute_the_cap():
    # W=4 inside the span, 20 other tokens a layer on average, cap 2 * 24 - 4 = 44
    assert cake(window_size=4).layer_budgets(layer_scores([1, 3], 100), 24, 100) == [14, 34]
    assert cake(window_size=4).layer_budgets(layer_scores([1, 1, 8], 100), 24, 100) == [12, 12, 48]
    assert cake(window_size=4, max_layer_ratio=4.0).layer_budgets(
        layer_scores([1, 1, 8], 100), 24, 100) == [10, 10, 52]


@pytest.mark.parametrize("span,context", [(96, 100), (64, 100), (100, 100)])
def test_budgets_sum_to_total_within_window_span_and_cap(span, context):
    torch.manual_seed(span)
    policy = cake(window_size=8)
    in_span = min(max(span - (context - 8), 0), 8)
    for _ in range(20):
        prefs = (torch.rand(7, dtype=torch.float64) ** 6).tolist()
        budgets = policy.layer_budgets(layer_scores(prefs, context), 24, span)
        assert sum(budgets) == 7 * 24
        assert all(in_span <= b <= policy.largest_layer_budget(24, span) <= span for b in budgets)
        for i in range(7):
            for j in range(7):
                if prefs[i] > prefs[j]:
                    assert budgets[i] >= budgets[j]


def test_budget_at_least_span_keeps_everything():
    policy = cake(window_size=4)
    assert policy.layer_budgets(layer_scores([1, 9], 30), 24, 20) == [20, 20]
    assert policy.largest_layer_budget(24, 20) == 20
    plan = policy.keep_plan(LayerScores(torch.rand(2, 30)), 20, 20, None, None)
    assert plan.indices.tolist() == [list(range(20))] * 2


def test_window_is_always_kept():
    torch.manual_seed(0)
    policy = cake(window_size=4, kernel_size=1)
    scores = policy.prefill_scores(0, torch.randn(4, 4, 8), torch.randn(16, 2, 8), 8 ** -0.5)
    kept = policy.keep_plan(scores, 6, 16, None, None).indices
    assert kept.shape == (2, 6) and all(set(range(12, 16)) <= set(row) for row in kept.tolist())


def test_cascade_keeps_the_same_tokens_as_one_allocation():
    """Re-allocating the same total as layers arrive (a dominant layer last, the case where
    an even split of the excess would grow earlier budgets) only shrinks budgets."""
    torch.manual_seed(0)
    prefs, total, cap = [1.0, 1.0, 0.05, 50.0], 64, 36
    scores = [torch.rand(1, 60) for _ in prefs]
    kept = [None] * len(prefs)
    for m in range(1, len(prefs) + 1):
        for l, budget in enumerate(share(prefs[:m], total, cap)):
            pool = torch.arange(60)[None] if kept[l] is None else kept[l]
            assert kept[l] is None or budget <= pool.shape[-1]
            kept[l] = pool.gather(1, top_tokens(scores[l].gather(1, pool), budget, pool.shape[-1]))
    final = share(prefs, total, cap)
    assert final == [14, 13, 1, 36]
    for l, budget in enumerate(final):
        assert kept[l].tolist() == top_tokens(scores[l], budget, 60).tolist()


def test_decode_keep_holds_the_budget_window_and_most_attended_slots():
    """Over budget, a layer keeps its last ``window_size`` slots and the others the current
    query attends to most (softmax over every slot, averaged over the GQA group; no
    pooling here); at or under budget nothing is evicted."""
    torch.manual_seed(1)
    policy = cake(window_size=4, kernel_size=1)
    keys, query = torch.randn(13, 2, 8), torch.randn(1, 4, 8)
    assert policy.decode_keep(0, query, keys[:12], 12, 0.3) is None
    kept = policy.decode_keep(0, query, keys, 12, 0.3)
    logits = torch.einsum("hd,nhd->hn", query[0], keys.repeat_interleave(2, dim=1)) * 0.3
    attended = logits.softmax(-1).view(2, 2, 13).mean(1)[:, :9]             # [H_kv, 9]
    assert kept.tolist() == [sorted(attended[h].topk(8).indices.tolist()) + [9, 10, 11, 12]
                             for h in range(2)]
    pooled = cake(window_size=4).decode_keep(0, query, keys, 12, 0.3)
    assert pooled.shape == (2, 12) and (pooled[:, -4:] == torch.arange(9, 13)).all()


def test_decode_keeps_what_it_holds_to_the_budget():
    policy = cake(budget=40)
    assert policy.kept_budget(20) == 40 and policy.token_budget(20) == 20
    assert [policy.kv_tokens_kept(c, 100) for c in (30, 100, 130)] == [30, 40, 40]
    assert cake(budget=0, budget_ratio=0.25).kept_budget(400) == 100


@pytest.mark.parametrize("params,match", [
    ({"window_size": 1}, r"'window_size'=1 is out of range \[2, inf\]"),
    ({"gamma": -1.0}, r"'gamma'=-1.0 is out of range \[0.0, inf\]"),
    ({"tau1": 0.0}, r"tau1=0.0 is out of range \(0, inf\)"),
    ({"tau2": -0.5}, r"tau2=-0.5 is out of range \(0, inf\)"),
    ({"tau1": "1"}, r"'tau1' must be float, got '1'"),
    ({"kernel_size": 4}, r"kernel_size=4 must be odd"),
    ({"max_layer_ratio": 0.5}, r"'max_layer_ratio'=0.5 is out of range \[1.0, inf\]"),
])
def test_invalid_parameters_name_the_value(params, match):
    with pytest.raises(ValueError, match=match):
        cake(**params)
