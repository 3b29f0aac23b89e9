import pytest
import torch

from kvplug.kernels import selected_positions
from kvplug.policies import build_policy


@pytest.mark.parametrize("name", ["streamingllm", "quest"])
def test_exactly_one_budget_form(name):
    with pytest.raises(ValueError, match="set exactly one of budget"):
        build_policy(name)
    with pytest.raises(ValueError, match="set exactly one of budget"):
        build_policy(name, {"budget": 64, "budget_ratio": 0.5})
    assert build_policy(name, {"budget_ratio": 0.125}).token_budget(4000) == 500
    assert build_policy(name, {"budget": 64}).kv_tokens_read(40) == 40


def test_streamingllm_reads_exactly_sink_and_recent():
    policy = build_policy("streamingllm", {"budget": 20, "n_sink": 4})
    assert policy.select(0, torch.zeros(1, 3, 8), None, context_len=20) is None  # fits: dense
    sel = policy.select(5, torch.zeros(2, 3, 8), None, context_len=100)
    pos, valid = selected_positions(torch.tensor([100, 100]), sel.chunk_ids, sel.chunk_size,
                                    sel.n_sink, sel.n_recent, num_kv_heads=3, max_len=100)
    for row in range(2):
        for head in range(3):
            read = set(pos[row, head][valid[row, head]].tolist())
            assert read == set(range(4)) | set(range(84, 100))


def test_quest_reads_the_page_whose_bound_is_highest():
    torch.manual_seed(0)
    L, H_kv, G, D, page = 96, 2, 2, 8, 16
    keys = torch.randn(1, L, H_kv, D) * 0.1
    q = torch.randn(1, H_kv * G, D)
    keys[0, 37, 1] = q[0, 2] * 5            # one key of page 2 aligned with kv-head 1's query
    policy = build_policy("quest", {"budget": 2 * page, "page_size": page, "dense_layers": 1})
    assert policy.summarize(0, keys) is None and policy.select(0, q, None, L) is None
    sel = policy.select(3, q, policy.summarize(3, keys), L)
    assert sel.chunk_size == page and sel.n_recent == page       # the last page, always
    assert 2 in sel.chunk_ids[0, 1].tolist()
    assert sel.chunk_ids.shape[-1] == 1                          # (32 - 16) // 16 pages
