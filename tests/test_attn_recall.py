"""``kvplug attn-recall``: a policy's reads against full attention, on a tiny random Llama."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvplug.attn_recall import (attention_recall, attention_scores, decode_step_records,
                                needle_recall, read_mask, read_masks)
from kvplug.policies import Selection, build_policy


def _tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def _bound(name, **params):
    policy = build_policy(name, params)
    policy.check_model(4, 2, 1)
    return policy


def test_read_mask_marks_sink_window_chunks_and_dense_heads():
    chunks = torch.tensor([[[1, -1], [0, 3]]])             # [1, H_kv=2, K=2], chunks of 4
    mask = read_mask(Selection(chunks, 4, 2, 3), 20, 2)
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 4, 5, 6, 7, 17, 18, 19]
    assert mask[1].nonzero().flatten().tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 17, 18, 19]
    dense = read_mask(Selection(None, 1, 2, 3, torch.tensor([False, True])), 20, 2)
    assert dense[0].sum() == 5 and bool(dense[1].all())
    assert bool(read_mask(None, 20, 2).all())


def test_recall_is_the_attention_mass_on_what_the_policy_reads():
    model = _tiny_llama()
    records = decode_step_records(model, [torch.randint(0, 64, (1, 40)) for _ in range(2)])
    assert len(records) == 2 and len(records[0]) == 4

    def recall(policy):
        return attention_recall(records, read_masks(policy, records))

    with pytest.raises(ValueError, match="policy 'full' does not select"):
        read_masks(_bound("full"), records)
    assert torch.allclose(recall(_bound("streamingllm", budget=64)), torch.ones(4))
    window = recall(_bound("streamingllm", budget=8, n_sink=4))
    want = torch.stack([torch.stack([
        torch.softmax(attention_scores(q, k), -1)[..., [0, 1, 2, 3, 36, 37, 38, 39]].sum(-1).mean()
        for q, k in layers]) for layers in records]).mean(0)
    assert torch.allclose(window, want)
    assert bool((window < 1).all())
    quest = recall(_bound("quest", budget=8, page_size=4))
    assert torch.allclose(quest[:2], torch.ones(2)) and bool((quest[2:] < 1).all())


def test_needle_recall_counts_the_needle_tokens_read():
    masks = [[torch.tensor([[True, True, False, False], [True, False, False, True]])] * 3,
             [torch.ones(2, 4, dtype=torch.bool)] * 3]
    # prompt 0's needle is tokens 1 and 3: head 0 reads 1, head 1 reads 3 -> 2 of 4
    got = needle_recall(masks, [torch.tensor([1, 3]), torch.tensor([], dtype=torch.long)])
    assert torch.allclose(got, torch.full((3,), 0.5))
    assert needle_recall(masks, [torch.tensor([], dtype=torch.long)] * 2) is None
