import pytest
import torch

from kvplug.policies import build_policy


def _reference_scores(queries, keys, scale):
    """TOVA as kvpress's TOVAPress computes it, written out: softmax of the last query
    over every key, the earlier keys' weights averaged over all query heads."""
    H_q, H_kv = queries.shape[1], keys.shape[1]
    k = keys.repeat_interleave(H_q // H_kv, dim=1)
    logits = torch.einsum("hd,nhd->hn", queries[-1], k) * scale
    return logits.softmax(-1)[:, :-1].mean(0)


def test_scores_are_the_last_querys_head_mean_and_the_last_token_is_kept():
    torch.manual_seed(0)
    q, k = torch.randn(3, 6, 16), torch.randn(40, 2, 16)
    policy = build_policy("tova", {"budget": 10})
    scores = policy.prefill_scores(0, q, k, 0.25).token
    assert scores.shape == (2, 40)
    for head in range(2):
        torch.testing.assert_close(scores[head, :39], _reference_scores(q, k, 0.25))
    assert torch.isinf(scores[:, 39]).all()


def test_every_kv_head_keeps_the_same_tokens():
    torch.manual_seed(1)
    q, k = torch.randn(1, 9, 8), torch.randn(60, 3, 8)
    policy = build_policy("tova", {"budget_ratio": 0.25})
    budget = policy.token_budget(60)
    kept = policy.keep_plan(policy.prefill_scores(0, q, k, 0.3), budget, 60, k, k).indices
    assert kept.shape == (3, 15) and (kept == kept[0]).all() and kept[0, -1] == 59
    decode = policy.decode_keep(0, q, k, 20, 0.3)
    assert decode.shape == (3, 20) and (decode == decode[0]).all() and decode[0, -1] == 59
    reference = _reference_scores(q, k, 0.3).topk(19).indices.sort().values
    assert decode[0, :-1].tolist() == reference.tolist()


def test_budget_at_least_the_context_keeps_everything():
    torch.manual_seed(2)
    q, k = torch.randn(1, 6, 8), torch.randn(30, 2, 8)
    policy = build_policy("tova", {"budget": 64})
    assert policy.token_budget(30) == 30
    kept = policy.keep_plan(policy.prefill_scores(0, q, k, 0.3), 30, 30, k, k).indices
    assert (kept == torch.arange(30)).all()
    assert policy.decode_keep(0, q, k, 30, 0.3) is None


@pytest.mark.parametrize("params, name", [({"budget": -1}, "budget"),
                                          ({"budget_ratio": 1.5}, "budget_ratio"),
                                          ({"budget": 8, "budget_ratio": 0.5}, "budget"),
                                          ({}, "budget"),
                                          ({"budget": 8, "window_size": 4}, "window_size")])
def test_bad_params_are_refused_by_name(params, name):
    with pytest.raises(ValueError, match=name):
        build_policy("tova", params)
