"""ShadowKV: the low-rank key store (inverse RoPE, SVD, reconstruction error)
and the selection (window, outliers, top chunks by landmark, budget)."""

import pytest
import torch

from kvplug.kernels import (apply_rope, landmarks, lowrank_rope_keys, rope_inv_freq,
                            selected_positions)
from kvplug.policies import KeySummary, build_policy
from kvplug.policies.shadowkv import lowrank_keys, undo_rope


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _rebuild(post_rope: torch.Tensor, rank: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Post-RoPE keys ``[B, L, H, D]`` through the store and back, as ``[B, H, L, D]``."""
    B, L, H, _ = post_rope.shape
    positions = torch.arange(L)
    u, sv = lowrank_keys(undo_rope(post_rope, positions[:, None], inv_freq), rank)
    return lowrank_rope_keys(u, sv, positions.expand(B, H, L), inv_freq, out_dtype=torch.float32)


# -- the low-rank store --------------------------------------------------------------------
def test_undo_rope_inverts_rope_and_hf_rope():
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama

    B, L, H, D, theta = 2, 70, 3, 64, 100000.0
    x = torch.randn(B, L, H, D, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(L)[:, None]
    inv_freq = rope_inv_freq(D, theta)
    torch.testing.assert_close(undo_rope(apply_rope(x, pos, inv_freq), pos, inv_freq), x,
                               atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rope(undo_rope(x, pos, inv_freq), pos, inv_freq), x,
                               atol=2e-5, rtol=1e-5)
    # undoing transformers' own RoPE (as the HF path does) gives the pre-RoPE keys back
    rotary = modeling_llama.LlamaRotaryEmbedding(LlamaConfig(
        hidden_size=H * D * 2, num_attention_heads=2 * H, num_key_value_heads=H, head_dim=D,
        rope_theta=theta))
    hf_x = x.transpose(1, 2)                                              # [B, H, L, D]
    cos, sin = rotary(hf_x, torch.arange(L)[None].expand(B, L))
    _, k_rot = modeling_llama.apply_rotary_pos_emb(hf_x, hf_x, cos, sin)
    torch.testing.assert_close(undo_rope(k_rot.transpose(1, 2), pos, inv_freq), x,
                               atol=2e-5, rtol=1e-5)


def _low_rank_keys(true_rank: int, noise: float, B=2, L=160, H=2, D=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    signal = (torch.randn(B, L, true_rank, generator=g) @ torch.randn(B, true_rank, H * D,
                                                                        generator=g))
    return signal.view(B, L, H, D), noise * torch.randn(B, L, H, D, generator=g)


@pytest.mark.parametrize("rank", [16, 24])
def test_reconstruction_is_exact_at_or_above_the_true_rank(rank):
    signal, _ = _low_rank_keys(16, 0.0)
    inv_freq = rope_inv_freq(32, 10000.0)
    post = apply_rope(signal, torch.arange(signal.shape[1])[:, None], inv_freq)
    assert _rel_err(_rebuild(post, rank, inv_freq), post.transpose(1, 2)) <= 1e-4


def test_reconstruction_error_is_the_discarded_singular_values():
    """RoPE is a rotation per (token, head), so it preserves the Frobenius norm: the
    relative error of the rebuilt post-RoPE keys is that of the rank-r SVD of the
    pre-RoPE keys, sqrt(sum_{i>r} s_i^2 / sum_i s_i^2) (Eckart-Young), and it is at
    most ||noise|| / ||keys||, since the rank-16 signal is a rank-24 candidate."""
    signal, noise = _low_rank_keys(16, 1e-3)
    pre = signal + noise
    B, L, H, D = pre.shape
    inv_freq = rope_inv_freq(D, 10000.0)
    post = apply_rope(pre, torch.arange(L)[:, None], inv_freq)
    rebuilt = _rebuild(post, 24, inv_freq)
    for b in range(B):
        s = torch.linalg.svdvals(pre[b].double().reshape(L, H * D))
        bound = (s[24:].square().sum() / s.square().sum()).sqrt().item()
        err = _rel_err(rebuilt[b], post[b].transpose(0, 1))
        assert 0 < bound < 1e-3
        assert err == pytest.approx(bound, rel=0.02)
        assert err <= (noise[b].norm() / pre[b].norm()).item()
    assert _rel_err(_rebuild(post, 8, inv_freq), post.transpose(1, 2)) > 0.1  # below the rank


def test_reconstruction_error_falls_with_rank_on_real_keys(model_dir):
    """SmolLM2-135M's keys (3 kv-heads x 64 = 192 wide) over 200 tokens of prose.

    The prose must not repeat: layer 0's pre-RoPE keys depend on the token only,
    so a repeated text would give them the rank of its vocabulary.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvplug.evals.ruler.synth import ESSAYS

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa",
                                                 dtype=torch.float32).eval()
    input_ids = tok(ESSAYS.read_text(), return_tensors="pt").input_ids[:, :200]
    assert input_ids.shape[1] == 200                 # >= 192: rank 192 is the full SVD
    with torch.no_grad():
        cache = model(input_ids=input_ids, use_cache=True).past_key_values
    inv_freq = model.model.rotary_emb.inv_freq
    torch.testing.assert_close(inv_freq,
                               rope_inv_freq(64, model.config.rope_parameters["rope_theta"]))
    for layer in (0, 15, 29):
        keys = cache.layers[layer].keys                                    # [1, 3, 200, 64]
        errs = [_rel_err(_rebuild(keys.transpose(1, 2), r, inv_freq), keys)
                for r in (1, 8, 30, 96, 192)]
        assert all(a > b for a, b in zip(errs, errs[1:])), (layer, errs)
        assert errs[-1] <= 1e-4, (layer, errs)


# -- selection -----------------------------------------------------------------------------
def _summary(keys: torch.Tensor, chunk: int) -> KeySummary:
    mean, min_cos = landmarks(keys, chunk)
    return KeySummary(mean, None, None, chunk, min_cos)


def _keys(B=2, L=200, H=2, D=16, seed=0):
    """Keys close to one direction, so every chunk's keys agree with its landmark."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(D, generator=g)
    return base + 0.2 * torch.randn(B, L, H, D, generator=g), base


def _read(sel, seq_lens, num_kv_heads):
    """Positions each (row, kv-head) reads, as sets."""
    out = []
    for b, L in enumerate(seq_lens.tolist()):
        n_recent = int(torch.as_tensor(sel.n_recent).expand(len(seq_lens))[b])
        ids = None if sel.chunk_ids is None else sel.chunk_ids[b:b + 1]
        pos, valid = selected_positions(seq_lens[b:b + 1], ids, sel.chunk_size, sel.n_sink,
                                        n_recent, num_kv_heads, max_len=L)
        out.append([set(pos[0, h][valid[0, h]].tolist()) for h in range(num_kv_heads)])
    return out


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="set exactly one of budget"):
        build_policy("shadowkv")
    with pytest.raises(ValueError, match="'local_chunks'=-1 is out of range"):
        build_policy("shadowkv", {"budget": 64, "local_chunks": -1})
    policy = build_policy("shadowkv", {"budget": 64, "rank": 500})
    with pytest.raises(ValueError, match="rank=500 exceeds H_kv·head_dim=192"):
        policy.key_rank(3, 64)
    with pytest.raises(ValueError, match="chunk_size=48 must be a multiple or a divisor .* 32"):
        build_policy("shadowkv", {"budget": 64, "chunk_size": 48}).summary_spec(0, 32)
    with pytest.raises(ValueError, match="chunk_size=12 must be a multiple or a divisor .* 32"):
        build_policy("shadowkv", {"budget": 64, "chunk_size": 12}).summary_spec(0, 32)
    assert build_policy("shadowkv", {"budget": 64}).summary_spec(0, 32).chunk_size == 8
    keys, _ = _keys()
    with pytest.raises(ValueError, match="needs landmarks with min_cos over 8-token chunks"):
        policy.select(0, torch.zeros(2, 4, 16), _summary(keys, 16), torch.tensor([200, 200]),
                      policy.step_context(torch.tensor([200, 200]), 1, 30))


def test_default_rank_and_outliers_scale_like_the_paper():
    policy = build_policy("shadowkv", {"budget": 2048})
    assert policy.key_rank(8, 128) == 160 and policy.key_rank(3, 64) == 30
    assert build_policy("shadowkv", {"budget": 64, "rank": 12}).key_rank(3, 64) == 12
    budgets = torch.tensor([1024, 2048, 4096])
    assert policy.outlier_budget(budgets, 8).tolist() == [24, 48, 96]      # (budget // 1024) * 24
    budgets = torch.arange(1, 5000)
    for chunk in (8, 16, 32):
        assert (policy.outlier_budget(budgets, chunk) * chunk * 4 <= budgets).all()
    assert build_policy("shadowkv", {"budget": 64, "outlier_chunks": 3}).outlier_budget(
        torch.tensor([64]), 8).tolist() == [3]


def test_budget_over_context_is_dense():
    keys, _ = _keys()
    policy = build_policy("shadowkv", {"budget": 200})
    q = torch.randn(2, 4, 16)
    assert policy.select(0, q, _summary(keys, 8), torch.tensor([200, 200]),
                         policy.step_context(torch.tensor([200, 200]), 1, 30)) is None
    short = build_policy("shadowkv", {"budget": 4})                      # prompt within one chunk
    assert short.select(0, q, _summary(keys[:, :6], 8), torch.tensor([6, 6]),
                        short.step_context(torch.tensor([6, 6]), 1, 30)) is None


def test_window_outliers_and_top_chunks_within_budget():
    keys, base = _keys()
    B, L, H, D = keys.shape
    q = torch.randn(B, 2 * H, D, generator=torch.Generator().manual_seed(5))
    keys[:, 43, 1] = -base * 3                    # chunk 5 of kv-head 1 holds an outlier key
    keys[0, 88:96, 0] = q[0, 0] * 4               # chunk 11 matches row 0's first query head
    summary = _summary(keys, 8)
    seq_lens = torch.tensor([L, L - 13])
    policy = build_policy("shadowkv", {"budget": 80})
    sel = policy.select(3, q, summary, seq_lens, policy.step_context(seq_lens, 1, 30))
    assert sel.chunk_size == 8 and sel.n_sink == 0
    ids = sel.chunk_ids
    for b in range(B):
        for h in range(H):
            used = ids[b, h][ids[b, h] >= 0].tolist()
            assert used == sorted(set(used))                   # distinct, ascending
            assert (ids[b, h][len(used):] == -1).all()         # -1 padded at the end
    assert (ids[:, 1] == 5).any(dim=-1).all()                  # the outlier, in both rows
    assert (ids[0, 0] == 11).any()                             # the planted top chunk
    # window: 4 chunks + the partial current one, from each row's end
    assert torch.as_tensor(sel.n_recent).tolist() == [4 * 8 + 8, 4 * 8 + (L - 13) % 8]
    read = _read(sel, seq_lens, H)
    for b, L_b in enumerate(seq_lens.tolist()):
        for h in range(H):
            assert len(read[b][h]) <= 80
            assert set(range(L_b - int(sel.n_recent[b]), L_b)) <= read[b][h]
    # the outlier is chosen by min_cos alone, whatever the query
    for seed in range(5):
        q = torch.randn(B, 2 * H, D, generator=torch.Generator().manual_seed(seed))
        assert (policy.select(3, q, summary, seq_lens, policy.step_context(seq_lens, 1, 30)).chunk_ids[:, 1] == 5
                ).any(dim=-1).all()


def test_no_outliers_spends_the_budget_on_top_chunks():
    keys, base = _keys()
    keys[:, 43, 1] = -base * 3
    v = torch.randn(16, generator=torch.Generator().manual_seed(7))
    keys[:, 96:104, 0] = v                                      # chunk 12 of kv-head 0
    q = torch.zeros(2, 4, 16)
    q[:, 0] = v
    policy = build_policy("shadowkv", {"budget": 80, "outlier_chunks": 0})
    sel = policy.select(0, q, _summary(keys, 8), torch.tensor([200, 200]),
                         policy.step_context(torch.tensor([200, 200]), 1, 30))
    assert (sel.chunk_ids[:, 0] == 12).any(dim=-1).all()
    assert ((sel.chunk_ids >= 0).sum(-1) == (80 - 40) // 8).all()


def test_unit_32_and_paged_summaries():
    keys, base = _keys(L=300)
    keys[:, 70, 0] = -base * 3                                  # block 2 of kv-head 0
    q = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(2))
    policy = build_policy("shadowkv", {"budget": 256, "chunk_size": 32})
    spec = policy.summary_spec(0, 32)
    assert spec.kind == "landmarks" and spec.chunk_size == 32
    dense = _summary(keys, 32)
    seq_lens = torch.tensor([300, 300])
    sel = policy.select(0, q, dense, seq_lens, policy.step_context(seq_lens, 32, 30))
    assert sel.chunk_size == 32 == policy.read_chunk(0, 32)
    assert (sel.chunk_ids[:, 0] == 2).any(dim=-1).all()
    for per_row in _read(sel, seq_lens, 2):
        assert all(len(s) <= 256 for s in per_row)
    # the same summaries paged one block per page, pages shuffled (vLLM's layout)
    C = dense.lo.shape[1]
    pages = 2 * C + 3                                           # 3 unused pages of garbage
    table = torch.randperm(pages, generator=torch.Generator().manual_seed(0))[:2 * C].view(2, C)
    lo = torch.full((pages, 1, 2, 16), 100.0)
    min_cos = torch.full((pages, 1, 2), -1.0)
    lo[table.flatten(), 0] = dense.lo.flatten(0, 1)
    min_cos[table.flatten(), 0] = dense.min_cos.flatten(0, 1)
    paged = KeySummary(lo, None, table, 32, min_cos)
    assert torch.equal(policy.select(0, q, paged, seq_lens, policy.step_context(seq_lens, 32, 30)).chunk_ids,
                       sel.chunk_ids)
