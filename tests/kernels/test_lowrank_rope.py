"""ShadowKV low-rank key reconstruction + RoPE: Triton vs torch reference, and
full-rank reconstruction vs exact keys rotated by HF transformers' Llama RoPE."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kvplug.kernels import lowrank_rope_keys, lowrank_rope_keys_ref, rope_inv_freq


@dataclass(frozen=True)
class Case:
    per_head_u: bool        # U [B, H, S, r] instead of ShadowKV's shared [B, S, r]
    flat_sv: bool           # SV [B, r, H*D] (ShadowKV) instead of [B, H, r, D]
    per_head_pos: bool      # positions [B, H, N] instead of [B, N]
    B: int
    H: int
    D: int
    rank: int
    S: int
    N: int
    dtype: torch.dtype = torch.float32
    rope_theta: float = 10000.0

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.").replace("float", "f")
        return (f"U{'head' if self.per_head_u else 'shared'}-SV{'flat' if self.flat_sv else '4d'}"
                f"-pos{'3d' if self.per_head_pos else '2d'}-B{self.B}-Hkv{self.H}-D{self.D}"
                f"-r{self.rank}-S{self.S}-N{self.N}-{dt}")


CASES = [
    Case(False, True, True, 2, 2, 128, 160, 300, 37, torch.bfloat16, 500000.0),  # ShadowKV shapes
    Case(False, True, False, 1, 3, 64, 40, 90, 20),
    Case(True, False, True, 2, 2, 64, 24, 64, 33, torch.float16),
    Case(True, False, False, 1, 2, 128, 48, 50, 17),
    Case(False, False, True, 1, 1, 128, 16, 140_000, 19, torch.float32, 500000.0),  # far positions
]


def _inputs(case: Case, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u_shape = (case.B, case.H, case.S, case.rank) if case.per_head_u else (case.B, case.S,
                                                                          case.rank)
    u = torch.randn(u_shape, generator=g) / case.rank ** 0.5
    sv = torch.randn(case.B, case.H, case.rank, case.D, generator=g)
    if case.flat_sv:
        sv = sv.permute(0, 2, 1, 3).reshape(case.B, case.rank, case.H * case.D)
    pos_shape = (case.B, case.H, case.N) if case.per_head_pos else (case.B, case.N)
    pos = torch.randint(0, case.S, pos_shape, generator=g)
    pos.view(-1)[::7] = -1                                                # unused slots
    inv_freq = rope_inv_freq(case.D, case.rope_theta)
    return (u.to(case.dtype).to(device), sv.to(case.dtype).to(device), pos.to(device),
            inv_freq.to(device))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_ref(case, device, assert_close):
    args = _inputs(case, device)
    got = lowrank_rope_keys(*args)
    exp = lowrank_rope_keys_ref(*args)
    assert got.shape == (case.B, case.H, case.N, case.D) and got.dtype == case.dtype
    assert_close("keys", got, exp, case.dtype, scale=2)
    unused = args[2] < 0
    if unused.dim() == 2:
        unused = unused[:, None].expand(-1, case.H, -1)
    assert (got[unused] == 0).all()


def test_out_buffer_and_out_dtype(device, assert_close):
    args = _inputs(CASES[2], device)
    exp = lowrank_rope_keys_ref(*args, out_dtype=torch.float32)
    out = torch.empty_like(exp)
    assert lowrank_rope_keys(*args, out=out) is out
    assert_close("keys", out, exp, torch.float16)


@pytest.mark.parametrize("per_head", [False, True], ids=["layer-svd", "head-svd"])
@pytest.mark.parametrize("impl", [lowrank_rope_keys, lowrank_rope_keys_ref], ids=["triton", "ref"])
@pytest.mark.parametrize("D,theta", [(64, 10000.0), (128, 500000.0)], ids=["D64", "D128"])
def test_full_rank_equals_hf_rope_of_exact_keys(D, theta, impl, per_head, device, assert_close):
    """Full-rank factors reproduce K_pre; RoPE agrees with transformers' Llama."""
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    B, H, S = 2, 2, 48
    g = torch.Generator().manual_seed(4)
    k_pre = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    if per_head:                                         # Loki-style: one SVD per kv-head
        U, s, Vh = torch.linalg.svd(k_pre.transpose(1, 2), full_matrices=False)
        u, sv = U, s[..., None] * Vh                     # [B, H, S, r], [B, H, r, D]
    else:                                                # ShadowKV: one SVD over all heads
        U, s, Vh = torch.linalg.svd(k_pre.reshape(B, S, H * D), full_matrices=False)
        u, sv = U, s[..., None] * Vh                     # [B, S, r], [B, r, H*D]
    positions = torch.stack([torch.randperm(S, generator=g)[:20] for _ in range(B * H)])
    positions = positions.view(B, H, 20)

    config = LlamaConfig(hidden_size=H * D * 2, num_attention_heads=2 * H,
                         num_key_value_heads=H, head_dim=D, rope_theta=theta,
                         max_position_embeddings=4096)
    rotary = modeling_llama.LlamaRotaryEmbedding(config)
    assert torch.allclose(rotary.inv_freq, rope_inv_freq(D, theta))
    expected = torch.empty(B, H, 20, D)
    for b in range(B):
        for h in range(H):
            p = positions[b, h]
            x = k_pre[b, p, h].float()[None, None]                       # [1, 1, N, D]
            cos, sin = rotary(x, p[None])
            _, k_rot = modeling_llama.apply_rotary_pos_emb(x, x, cos, sin)
            expected[b, h] = k_rot[0, 0]

    got = impl(u.float().to(device), sv.float().to(device), positions.to(device),
               rope_inv_freq(D, theta, device=device))
    assert_close("keys", got, expected, torch.float32, scale=5)
