import pytest
import torch

from kvplug.policies import LayerScores, ReplayChunk, build_policy
from kvplug.policies.kvzip import FIRST_CHUNK_PROMPT, NEXT_CHUNK_PROMPT


def _encode(text):
    """A stand-in tokenizer: one id per character, above the test's context ids."""
    return [1000 + ord(c) for c in text]


def _reference_scores(queries, keys, chunk, n_sink, scale):
    """KVzip's score as kvpress's KVzipPress computes it, written out per replay query:
    softmax over the sinks, the chunk's keys and the replay up to the query itself; each
    chunk key's largest weight over the replay queries of its GQA group."""
    L, H_q, _ = queries.shape
    H_kv = keys.shape[1]
    group, context = H_q // H_kv, keys.shape[0] - L
    sink = min(n_sink, chunk.start)
    width = chunk.end - chunk.start
    best = torch.zeros(H_kv, width)
    for h in range(H_q):
        kv = h // group
        for i in range(L):
            read = torch.cat([keys[:sink, kv], keys[chunk.start:chunk.end, kv],
                              keys[context:context + i + 1, kv]])
            probs = (read @ queries[i, h] * scale).softmax(-1)[sink:sink + width]
            best[kv] = torch.maximum(best[kv], probs)
    return best


def test_replay_chunks_repeat_each_chunk_after_kvzips_prompts():
    policy = build_policy("kvzip", {"budget": 8, "chunk_size": 5, "prev_postfix": 2})
    context = torch.arange(100, 113)[None].expand(2, -1)            # 13 tokens, 2 rows
    chunks = policy.replay_chunks(context, 2, _encode, [7, 8])
    assert [(c.start, c.end) for c in chunks] == [(2, 7), (7, 12), (12, 13)]
    assert chunks[0].input_ids[1].tolist() == _encode(FIRST_CHUNK_PROMPT) + [7, 8] + list(range(102, 107))
    assert chunks[1].input_ids[0].tolist() == (_encode(NEXT_CHUNK_PROMPT) + [105, 106, 7, 8]
                                               + list(range(107, 112)))
    assert chunks[2].input_ids[0, -1].item() == 112 and chunks[2].input_ids.shape[0] == 2


@pytest.mark.parametrize("replayed", [6, 300])       # one block of replay queries, and two
def test_replay_scores_are_the_max_attention_of_the_replay_over_each_chunk_token(replayed):
    torch.manual_seed(0)
    policy = build_policy("kvzip", {"budget": 8, "n_sink": 3})
    queries, keys = torch.randn(replayed, 4, 8), torch.randn(20 + replayed, 2, 8)
    for chunk in (ReplayChunk(0, 12, None), ReplayChunk(12, 20, None)):   # sinks 0, then 3
        got = policy.replay_scores(0, queries, keys, chunk, 0.4)
        torch.testing.assert_close(got, _reference_scores(queries, keys, chunk, 3, 0.4))


def test_unscored_keeps_the_sinks_and_nothing_else():
    scores = build_policy("kvzip", {"budget": 8, "n_sink": 4}).unscored(3, 10)
    assert torch.isinf(scores[:, :4]).all() and (scores[:, 4:] == 0).all()


def test_layer_budgets_share_the_best_pairs_across_layers_unless_layerwise():
    torch.manual_seed(1)
    scores = [LayerScores(torch.rand(2, 50) * scale) for scale in (1.0, 1.4, 0.7)]
    policy = build_policy("kvzip", {"budget": 10, "max_layer_ratio": 5})     # uncapped
    budgets = policy.layer_budgets(scores, 10, 50)
    assert sum(budgets) == 30 and budgets[1] > budgets[0] > budgets[2]
    best = torch.stack([s.token for s in scores]).flatten().topk(60).indices
    per_layer = torch.bincount(best // 100, minlength=3).tolist()
    assert all(abs(2 * b - n) <= 1 for b, n in zip(budgets, per_layer))   # pairs / kv-heads
    assert build_policy("kvzip", {"budget": 10, "layerwise": True}).layer_budgets(
        scores, 10, 50) == [10, 10, 10]
    assert policy.layer_budgets(scores, 80, 50) == [50, 50, 50]


def test_keep_plan_keeps_the_layers_best_pairs_padding_heads_that_keep_fewer():
    token = torch.tensor([[9.0, 8.0, 7.0, 6.0, 0.0, 0.0],
                          [0.0, 0.0, 5.0, 0.0, 0.0, 4.0]])
    policy = build_policy("kvzip", {"budget": 3})
    plan = policy.keep_plan(LayerScores(token), 3, 6, None, None)
    assert plan.indices.tolist() == [[0, 1, 2, 3], [2, 5, 5, 5]]
    assert plan.counts.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    even = policy.keep_plan(LayerScores(torch.arange(6.0).expand(2, -1)), 2, 6, None, None)
    assert even.indices.tolist() == [[4, 5], [4, 5]] and even.counts is None


def test_no_layer_keeps_more_than_its_cap_and_the_rest_goes_to_the_other_layers():
    """One layer scores above the others: uncapped it would take 40 pairs of one head;
    capped at 2 x budget = 20 pairs per kv-head, its budget stops there and the other
    layers get the rest; inside the layer its heads are not capped (the hot head keeps
    more than 20)."""
    torch.manual_seed(2)
    hot = torch.rand(2, 50)
    hot[0, :40] += 10
    scores = [LayerScores(hot), LayerScores(torch.rand(2, 50)), LayerScores(torch.rand(2, 50))]
    policy = build_policy("kvzip", {"budget": 10})
    assert policy.largest_layer_budget(10, 50) == 20
    budgets = policy.layer_budgets(scores, 10, 50)
    assert sum(budgets) == 30 and budgets[0] == 20
    plan = policy.keep_plan(scores[0], budgets[0], 50, None, None)
    kept = plan.counts.sum(dim=1)
    assert kept.tolist() == [40, 0]                 # the hot head's 40 best, past 20
    assert plan.indices[0].tolist() == list(range(40))
    uncapped = build_policy("kvzip", {"budget": 10, "max_layer_ratio": 5})
    assert uncapped.layer_budgets(scores, 10, 50)[0] > 20


def test_with_cells_each_head_keeps_its_pairs_rounded_up_to_whole_cells():
    """A layer keeping 3 x 10 pairs, cells of 8: each head keeps the pairs it keeps without
    cells and its next best up to whole cells; a head keeping none keeps no cell."""
    torch.manual_seed(3)
    token = torch.rand(3, 64)
    token[0] += 1.0                                  # head 0 holds most of the best pairs
    token[2] -= 2.0                                  # head 2 none
    policy = build_policy("kvzip", {"budget": 10})
    loose = policy.keep_plan(LayerScores(token), 10, 64, None, None)
    whole = policy.keep_plan(LayerScores(token), 10, 64, None, None, cell=8)
    loose_kept, kept = loose.counts.sum(dim=1), whole.counts.sum(dim=1)
    assert loose_kept[2] == 0 and loose_kept.sum() == 30
    assert kept.tolist() == (-(-loose_kept // 8) * 8).tolist()
    for head in range(2):
        mine = whole.indices[head][:int(kept[head])].tolist()
        assert set(mine) == set(token[head].topk(int(kept[head])).indices.tolist())
        assert set(loose.indices[head][:int(loose_kept[head])].tolist()) <= set(mine)
    assert bool((whole.indices < 64).all()) and bool((loose.indices < 64).all())


@pytest.mark.parametrize("params, bad", [({"n_sink": -1}, "n_sink"),
                                         ({"chunk_size": 0}, "chunk_size"),
                                         ({"layerwise": "yes"}, "layerwise"),
                                         ({"max_layer_ratio": 0.5}, "max_layer_ratio")])
def test_bad_parameters_are_refused_by_name(params, bad):
    with pytest.raises(ValueError, match=bad):
        build_policy("kvzip", {"budget": 8, **params})


def test_kvzip_does_not_score_by_the_prefill():
    with pytest.raises(TypeError, match="replay"):
        build_policy("kvzip", {"budget": 8}).prefill_scores(0, None, None, 1.0)
