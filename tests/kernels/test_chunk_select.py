"""Chunk scoring and top-k: Triton vs torch reference, and the reference vs
first principles (Quest bound >= every q.k of its chunk, per-row top-k)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from kvplug.kernels import (chunk_scores, chunk_scores_ref, chunk_summaries, chunk_topk,
                            chunk_topk_ref, select_topk)
from kvplug.kernels.chunk_select import side_by_side


@dataclass(frozen=True)
class Case:
    mode: str                   # "landmark" | "quest"
    pages: int                  # 0: dense [B, C, H, D]; P > 0: paged, P chunks per page
    seq_lens: tuple[int, ...]
    num_kv_heads: int
    group: int
    head_dim: int
    chunk_size: int
    dtype: torch.dtype = torch.float32
    side_by_side: bool = False  # quest: max and min as the two halves of one tensor

    @property
    def id(self) -> str:
        layout = "dense" if not self.pages else f"paged{self.pages}"
        layout += "-side_by_side" if self.side_by_side else ""
        dt = str(self.dtype).removeprefix("torch.").replace("float", "f")
        return (f"{self.mode}-{layout}-B{len(self.seq_lens)}-G{self.group}-Hkv{self.num_kv_heads}"
                f"-D{self.head_dim}-cs{self.chunk_size}-{dt}")


CASES = [
    Case("landmark", 0, (37, 100, 5), 2, 1, 64, 8),
    Case("landmark", 4, (130, 17, 64), 2, 4, 128, 8, torch.float16),
    Case("landmark", 1, (90, 0, 33), 1, 3, 128, 8, torch.bfloat16),          # an empty sequence
    Case("quest", 0, (200, 31), 2, 4, 128, 16),
    Case("quest", 1, (77, 160, 16), 2, 3, 64, 16, torch.bfloat16),           # Quest on vLLM blocks
    Case("quest", 4, (50, 129), 3, 1, 64, 16, torch.float16),
    Case("quest", 1, (77, 160, 16), 3, 3, 64, 32, side_by_side=True),    # as vLLM keeps them
    Case("quest", 0, (200, 31), 2, 4, 128, 16, side_by_side=True),
]


def _inputs(case: Case, device: str, seed: int = 0):
    """Queries, summaries of real keys (dense or scattered into permuted pages), num_chunks."""
    g = torch.Generator().manual_seed(seed)
    B, H, D, cs = len(case.seq_lens), case.num_kv_heads, case.head_dim, case.chunk_size
    S = max(max(case.seq_lens), 1)
    keys = torch.randn(B, S, H, D, generator=g).to(case.dtype)
    q = torch.randn(B, H * case.group, D, generator=g).to(case.dtype)
    mean, kmin, kmax = chunk_summaries(keys, cs, torch.tensor(case.seq_lens))
    num_chunks = torch.tensor([-(-L // cs) for L in case.seq_lens], dtype=torch.int32)
    summaries = (mean, None) if case.mode == "landmark" else (kmin, kmax)
    table = None
    if case.pages:
        P, C = case.pages, mean.shape[1]
        n_tab = -(-C // P)
        num_pages = B * n_tab + 2
        table = torch.randperm(num_pages, generator=g)[:B * n_tab].view(B, n_tab)
        paged = []
        for x in summaries:
            if x is None:
                paged.append(None)
                continue
            # unused page rows hold garbage that masking must hide
            pages = torch.randn(num_pages, P, H, D, generator=g).to(case.dtype) * 100
            padded = torch.cat([x, x.new_zeros(B, n_tab * P - C, H, D)], dim=1)
            pages[table] = padded.view(B, n_tab, P, H, D)
            paged.append(pages)
        summaries = tuple(paged)
        table = table.to(torch.int32).to(device)
    lo, hi = (None if x is None else x.to(device) for x in summaries)
    if case.side_by_side:
        hi, lo = torch.cat([hi, lo], dim=-1).split(D, dim=-1)
    kwargs = dict(summary_max=hi, summary_table=table)
    return (q.to(device), lo, num_chunks.to(device)), kwargs, keys


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_scores_kernel_matches_ref(case, device, assert_close):
    args, kw, _ = _inputs(case, device)
    got = chunk_scores(*args, **kw)
    exp = chunk_scores_ref(*args, **kw)
    assert got.dtype == torch.float32
    assert_close("scores", got, exp)


@pytest.mark.parametrize("reduce", ["max", "sum"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_topk_kernel_matches_ref(case, reduce, device):
    args, kw, _ = _inputs(case, device)
    k_per_seq = torch.tensor([3, 1, 5][:len(case.seq_lens)], device=device)
    for k, kps in [(4, None), (5, k_per_seq), (40, None)]:                # 40 > n_chunks
        got = chunk_topk(*args, k, k_per_seq=kps, reduce=reduce, **kw)
        exp = chunk_topk_ref(*args, k, k_per_seq=kps, reduce=reduce, **kw)
        assert got.dtype == torch.int32 and got.shape == (len(case.seq_lens),
                                                          case.num_kv_heads, k)
        assert torch.equal(got.cpu(), exp.cpu()), f"k={k}: {got} != {exp}"


@pytest.mark.parametrize("case", [c for c in CASES if c.pages], ids=lambda c: c.id)
def test_paged_summaries_equal_dense(case, device, assert_close):
    args, kw, _ = _inputs(case, device)
    dense_case = Case(case.mode, 0, case.seq_lens, case.num_kv_heads, case.group,
                      case.head_dim, case.chunk_size, case.dtype, case.side_by_side)
    dense_args, dense_kw, _ = _inputs(dense_case, device)
    paged = chunk_scores_ref(*args, **kw)
    dense = chunk_scores_ref(*dense_args, **dense_kw)
    C = dense.shape[2]
    assert_close("scores", paged[..., :C], dense)
    assert torch.isneginf(paged[..., C:]).all()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_scores_first_principles(case, device):
    """Quest: bound >= scale * q.k of every key of the chunk; landmark: q . mean(keys)."""
    args, kw, keys = _inputs(case, device)
    q = args[0].cpu().float()
    scores = chunk_scores_ref(*args, **kw).cpu()
    B, Hq, D = q.shape
    G, cs = case.group, case.chunk_size
    for b, L in enumerate(case.seq_lens):
        n = -(-L // cs)
        assert torch.isneginf(scores[b, :, n:]).all()
        for hq in range(Hq):
            kk = keys[b, :L, hq // G].float()                                # [L, D]
            per_token = kk @ q[b, hq] / math.sqrt(D)
            for c in range(n):
                chunk = per_token[c * cs:(c + 1) * cs]
                if case.mode == "quest":
                    assert scores[b, hq, c] >= chunk.max() - 1e-4 * (1 + chunk.abs().max())
                else:
                    mean = kk[c * cs:(c + 1) * cs].mean(0).to(case.dtype).float()
                    expected = mean @ q[b, hq] / math.sqrt(D)
                    assert torch.allclose(scores[b, hq, c], expected, atol=1e-4, rtol=1e-4)


def _topk_oracle(scores, num_kv_heads, num_chunks, k, k_per_seq, softmax, reduce):
    """Per (sequence, kv-head): reduce the group's rows over valid chunks, sort, take."""
    B, Hq, _ = scores.shape
    G = Hq // num_kv_heads
    out = torch.full((B, num_kv_heads, k), -1, dtype=torch.int32)
    for b in range(B):
        n = int(num_chunks[b])
        budget = min(k, n, k if k_per_seq is None else int(k_per_seq[b]))
        if budget == 0:
            continue
        for h in range(num_kv_heads):
            rows = scores[b, h * G:(h + 1) * G, :n]
            if softmax:
                rows = torch.softmax(rows, dim=-1)
            agg = rows.max(0).values if reduce == "max" else rows.sum(0)
            top = sorted(range(n), key=lambda c: -agg[c].item())[:budget]
            out[b, h, :budget] = torch.tensor(sorted(top), dtype=torch.int32)
    return out


@pytest.mark.parametrize("softmax,reduce", [(True, "max"), (True, "sum"), (False, "max")],
                         ids=["softmax-max", "softmax-sum", "raw-max"])
@pytest.mark.parametrize("k", [1, 3, 20], ids=lambda k: f"k{k}")
def test_select_topk_oracle(k, softmax, reduce):
    g = torch.Generator().manual_seed(3)
    B, H, G, C = 4, 2, 3, 12
    num_chunks = torch.tensor([12, 5, 0, 2])
    k_per_seq = torch.tensor([2, 4, 1, 3])
    scores = torch.randn(B, H * G, C, generator=g)
    scores[torch.arange(C)[None, None, :].expand(B, H * G, C) >= num_chunks[:, None, None]] = \
        float("-inf")
    for kps in (None, k_per_seq):
        got = select_topk(scores, H, num_chunks, k, k_per_seq=kps, softmax=softmax,
                          reduce=reduce)
        exp = _topk_oracle(scores, H, num_chunks, k, kps, softmax, reduce)
        assert torch.equal(got, exp), f"{got}\n!=\n{exp}"


def test_side_by_side_views_only_the_halves_of_one_tensor():
    bounds = torch.randn(5, 2, 3, 16)
    hi, lo = bounds.split(8, dim=-1)
    assert side_by_side(hi, lo).data_ptr() == bounds.data_ptr()
    assert torch.equal(side_by_side(hi, lo), bounds)
    assert side_by_side(lo, hi) is None                   # the halves in the other order
    assert side_by_side(hi.clone(), lo.clone()) is None   # two tensors


@pytest.mark.parametrize("case", [c for c in CASES if c.side_by_side], ids=lambda c: c.id)
def test_side_by_side_bounds_score_as_two_tensors(case, device, assert_close):
    args, kw, _ = _inputs(case, device)
    apart = dict(kw, summary_max=kw["summary_max"].clone())
    assert_close("scores", chunk_scores_ref(*args, **kw),
                 chunk_scores_ref(args[0], args[1].clone(), args[2], **apart))
