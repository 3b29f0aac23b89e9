"""ShadowKV landmarks (chunk mean) and outlier scores (least key-to-mean cosine)
against a per-chunk loop."""

from __future__ import annotations

import pytest
import torch

from kvplug.kernels import chunk_summaries, landmarks


def _loop(keys: torch.Tensor, chunk_size: int, seq_lens: list[int]):
    B, S, H, D = keys.shape
    C = -(-S // chunk_size)
    mean = torch.full((B, C, H, D), float("nan"))
    min_cos = torch.full((B, C, H), float("inf"))
    for b in range(B):
        for c in range(C):
            rows = keys[b, c * chunk_size:min((c + 1) * chunk_size, seq_lens[b])].double()
            if len(rows) == 0:
                continue
            for h in range(H):
                m = rows[:, h].mean(dim=0)
                mean[b, c, h] = m.float()
                min_cos[b, c, h] = min(float(k @ m) / (k.norm().item() * m.norm().item())
                                       for k in rows[:, h])
    return mean, min_cos


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size,seq_lens", [(8, (37, 40)), (4, (13, 0)), (1, (5, 3))],
                         ids=["partial-last", "empty-row", "per-token"])
def test_landmarks_match_loop(chunk_size, seq_lens, dtype, device):
    g = torch.Generator().manual_seed(0)
    S, H, D = max(seq_lens), 2, 16
    keys = (torch.randn(len(seq_lens), S, H, D, generator=g) * 0.3 + 1).to(dtype)
    keys[0, 3, 1] = -keys[0, 3, 1]                      # a key pointing away from its chunk
    mean, min_cos = landmarks(keys.to(device), chunk_size, torch.tensor(seq_lens).to(device))
    exp_mean, exp_cos = _loop(keys.float(), chunk_size, list(seq_lens))
    C = -(-S // chunk_size)
    assert mean.shape == (len(seq_lens), C, H, D) and mean.dtype == dtype
    assert min_cos.shape == (len(seq_lens), C, H) and min_cos.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2        # the bf16 mean is rounded once
    torch.testing.assert_close(mean.float().cpu(), exp_mean, atol=tol, rtol=tol, equal_nan=True)
    torch.testing.assert_close(min_cos.cpu(), exp_cos, atol=1e-5, rtol=1e-5)
    if chunk_size > 1:                                  # the planted chunk is the outlier
        assert int(min_cos[0, :, 1].argmin()) == 3 // chunk_size
        assert min_cos[0, 3 // chunk_size, 1] < 0 < min_cos[0, :, 0].min()


def test_without_seq_lens_every_key_counts_and_mean_is_chunk_summaries_mean(device):
    keys = torch.randn(2, 21, 3, 8, generator=torch.Generator().manual_seed(1)).to(device)
    mean, min_cos = landmarks(keys, 8)
    assert torch.isfinite(min_cos).all() and (min_cos <= 1 + 1e-6).all()
    torch.testing.assert_close(mean, chunk_summaries(keys, 8)[0])
    single = landmarks(keys[:, :1], 8)[1]                # one key is its own mean
    torch.testing.assert_close(single, torch.ones_like(single))


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        landmarks(torch.zeros(1, 4, 1, 2), 0)
