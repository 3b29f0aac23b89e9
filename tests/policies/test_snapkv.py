import pytest
import torch
import torch.nn.functional as F

from kvplug.policies import build_policy
from kvplug.policies.compression import top_tokens, window_attention


def _reference_scores(queries, keys, window, kernel, scale):
    """SnapKV as kvpress computes it, written out: softmax of the window's queries over
    every key (causal inside the window), mean over the window, avg-pool, GQA mean."""
    W, H_q, D = queries.shape
    N, H_kv, _ = keys.shape
    k = keys.repeat_interleave(H_q // H_kv, dim=1)
    logits = torch.einsum("whd,nhd->hwn", queries, k) * scale
    mask = torch.ones(W, N, dtype=torch.bool).tril(N - W)
    probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)[..., :N - W].mean(1)
    pooled = F.avg_pool1d(probs[:, None], kernel, padding=kernel // 2, stride=1)[:, 0]
    return pooled.view(H_kv, -1, N - W).mean(1)


def test_scores_are_kvpress_snapkv_and_the_window_is_kept():
    torch.manual_seed(0)
    q, k = torch.randn(8, 6, 16), torch.randn(50, 2, 16)
    policy = build_policy("snapkv", {"budget": 20, "window_size": 8})
    scores = policy.prefill_scores(0, q, k, 0.25).token
    torch.testing.assert_close(scores[:, :42], _reference_scores(q, k, 8, 5, 0.25))
    assert torch.isinf(scores[:, 42:]).all()
    kept = policy.keep_plan(policy.prefill_scores(0, q, k, 0.25), 20, 50, k, k).indices
    assert kept.shape == (2, 20) and (kept[:, -8:] == torch.arange(42, 50)).all()
    assert (kept.diff(dim=-1) > 0).all()


def test_window_attention_is_causal_inside_the_window():
    probs = window_attention(torch.randn(4, 2, 8), torch.randn(10, 1, 8), 1.0)
    assert probs.shape == (2, 4, 10)
    assert (probs[:, 0, 7:] == 0).all() and (probs[:, 3] > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4))


def test_a_budget_over_the_span_keeps_everything():
    assert top_tokens(torch.randn(3, 40), 64, 40).tolist() == [list(range(40))] * 3


def test_budget_covers_the_window_at_least():
    policy = build_policy("snapkv", {"budget_ratio": 0.01})
    assert policy.token_budget(1000) == 64 and policy.token_budget(30) == 30


@pytest.mark.parametrize("params,match", [
    ({"budget": 10, "kernel_size": 4}, "kernel_size=4 must be odd"),
    ({"budget": 10, "budget_ratio": 0.5}, "set exactly one of budget"),
    ({"budget": 10, "window_size": 0}, r"'window_size'=0 is out of range"),
])
def test_bad_parameters_are_refused_by_name(params, match):
    with pytest.raises(ValueError, match=match):
        build_policy("snapkv", params)


def test_a_prompt_no_longer_than_the_window_scores_only_the_window():
    policy = build_policy("snapkv", {"budget": 8})
    scores = policy.prefill_scores(0, torch.randn(10, 6, 16), torch.randn(10, 2, 16), 0.25)
    assert scores.token.shape == (2, 10) and torch.isinf(scores.token).all()


def test_stats_count_what_stays_stored_after_compression():
    from kvplug.policies import RequestState, RequestStats

    policy = build_policy("snapkv", {"budget": 100})
    state = RequestState(RequestStats(prompt_tokens=1000))
    policy.account_step(state, 0, 1000, True)
    assert state.stats.kv_tokens_stored == 100     # compressed at the end of this step
    for computed in range(1000, 1010):
        policy.account_step(state, computed, 1, False)
    assert state.stats.kv_tokens_read == sum(100 + i for i in range(1, 11))
    assert state.stats.kv_tokens_stored == 110
