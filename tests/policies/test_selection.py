import pytest
import torch

from kvplug.kernels import chunk_summaries, selected_positions
from kvplug.policies import KeySummary, build_policy


def lens(*values):
    return torch.tensor(values)


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
    assert policy.select(0, torch.zeros(1, 3, 8), None, lens(20), policy.step_context(lens(20), 1, 30)) is None  # fits
    sel = policy.select(5, torch.zeros(2, 3, 8), None, lens(100, 100), policy.step_context(lens(100, 100), 1, 30))
    assert sel.n_recent.tolist() == [16, 16]
    pos, valid = selected_positions(lens(100, 100), sel.chunk_ids, sel.chunk_size,
                                    sel.n_sink, 16, num_kv_heads=3, max_len=100)
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
    assert policy.summary_spec(0, 1) is None
    assert policy.select(0, q, None, lens(L), policy.step_context(lens(L), 1, 30)) is None
    assert policy.summary_spec(3, 1).kind == "minmax"
    _, kmin, kmax = chunk_summaries(keys, page)
    sel = policy.select(3, q, KeySummary(kmin, kmax, None, page), lens(L), policy.step_context(lens(L), 1, 30))
    assert sel.chunk_size == page and sel.n_recent.tolist() == [page]  # the last page, always
    assert policy.read_chunk(0, 1) is None and policy.read_chunk(3, 1) == page
    assert 2 in sel.chunk_ids[0, 1].tolist()
    assert sel.chunk_ids.shape[-1] == 1                          # (32 - 16) // 16 pages
