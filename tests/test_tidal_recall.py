"""``kvplug tidal-recall``: the recall matrix on a tiny random Llama, and pair ranking."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvplug.tidal_recall import layer_pairs, recall_matrix


def test_recall_matrix_on_a_tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    prompts = [torch.randint(0, 64, (1, 40)) for _ in range(2)]
    recall = recall_matrix(model, prompts, fraction=0.25)
    assert recall.shape == (4, 4)
    assert ((recall > 0) & (recall <= 1 + 1e-5)).all()
    # a layer's own top keys hold at least as much of its attention as any other layer's
    assert (recall.diagonal()[:, None] >= recall.T - 1e-5).all()
    assert torch.allclose(recall_matrix(model, prompts, fraction=1.0), torch.ones(4, 4))


def test_layer_pairs_score_the_reusing_layers():
    recall = torch.full((8, 8), 0.5)
    recall[3, 4:6] = 1.0        # layer 3 covers 4 and 5 perfectly
    recall[6, 7] = 1.0          # layer 6 covers 7
    best = layer_pairs(recall, [2, 3])[0]
    assert (best["first"], best["correction"], best["recall"]) == (3, 6, 1.0)
    assert {(p["first"], p["correction"]) for p in layer_pairs(recall, [2])} == {
        (2, 4), (2, 5), (2, 6)}
