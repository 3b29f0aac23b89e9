"""Sparse paged decode attention: Triton kernel vs torch reference, reference
vs a per-sequence first-principles oracle, and the dense case vs SDPA."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from kvplug.kernels import (merge_attention_states, plan_sparse_decode, selected_positions,
                            sparse_paged_decode, sparse_paged_decode_ref)


@dataclass(frozen=True)
class Case:
    seq_lens: tuple[int, ...]
    num_kv_heads: int
    group: int
    head_dim: int
    block_size: int
    chunk_size: int
    k: int | None          # chunk ids per (seq, kv-head); None = no selection
    n_sink: int
    n_recent: int
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.").replace("float", "f")
        sel = "noids" if self.k is None else f"cs{self.chunk_size}-k{self.k}"
        return (f"B{len(self.seq_lens)}-G{self.group}-Hkv{self.num_kv_heads}-D{self.head_dim}"
                f"-bs{self.block_size}-{sel}-sink{self.n_sink}-rec{self.n_recent}-{dt}")


CASES = [
    Case((37, 100, 5), 2, 1, 64, 16, 8, 4, 4, 8),                           # MHA, varlen
    Case((130, 17), 2, 3, 128, 16, 16, 3, 2, 16, torch.float16),             # GQA 3
    Case((64, 33, 95), 2, 4, 64, 32, 1, 20, 1, 3, torch.bfloat16),           # token ids
    Case((20, 9), 1, 4, 128, 16, 4, 2, 8, 16),                               # sink+recent >= L
    Case((70, 41), 2, 3, 64, 16, 8, 3, 0, 0, torch.float16),                 # no sink, no window
    Case((90, 12, 50), 2, 4, 64, 16, 1, None, 4, 16, torch.bfloat16),       # StreamingLLM only
    Case((40, 23), 1, 3, 64, 16, 16, 10, 0, 5),                              # k > n_chunks
    Case((300,), 1, 4, 128, 128, 8, 6, 4, 32),                               # vLLM-CPU block size
    Case((45, 77), 2, 2, 96, 16, 8, 3, 2, 4),                                # odd head_dim
]


def _chunk_ids(case: Case, seed: int = 1) -> torch.Tensor | None:
    """Distinct ids per row, some past the sequence end, some slots unused (-1)."""
    if case.k is None:
        return None
    g = torch.Generator().manual_seed(seed)
    B, H = len(case.seq_lens), case.num_kv_heads
    ids = torch.full((B, H, case.k), -1, dtype=torch.int32)
    for b, L in enumerate(case.seq_lens):
        n_chunks = -(-L // case.chunk_size) + 1                  # one chunk past the end
        for h in range(H):
            n = min(case.k, n_chunks)
            n -= int(torch.randint(0, 2, (1,), generator=g)) if n > 1 else 0
            ids[b, h, :n] = torch.randperm(n_chunks, generator=g)[:n].to(torch.int32)
    return ids


def _inputs(case: Case, paged_kv, device):
    k_cache, v_cache, table, seq_lens, k, v = paged_kv(list(case.seq_lens), case.num_kv_heads,
                                                      case.head_dim, case.block_size,
                                                      case.dtype, device)
    B, Hq = len(case.seq_lens), case.num_kv_heads * case.group
    q = torch.randn(B, Hq, case.head_dim, generator=torch.Generator().manual_seed(2))
    ids = _chunk_ids(case)
    return (q.to(case.dtype).to(device), k_cache, v_cache, table, seq_lens,
            None if ids is None else ids.to(device)), (k, v)


def _attended(L, ids_row, chunk_size, n_sink, n_recent) -> set[int]:
    keep = set(range(min(n_sink, L))) | set(range(max(L - n_recent, 0), L))
    for c in [] if ids_row is None else ids_row.tolist():
        if c >= 0:
            keep |= {t for t in range(c * chunk_size, (c + 1) * chunk_size) if t < L}
    return keep


def _oracle(q, k, v, seq_lens, chunk_ids, chunk_size, n_sink, n_recent):
    """Per (sequence, kv-head) python sets of attended tokens + softmax over them."""
    B, Hq, D = q.shape
    H = k.shape[2]
    G = Hq // H
    out = torch.zeros(B, Hq, D)
    lse = torch.full((B, Hq), float("-inf"))
    for b, L in enumerate(seq_lens.tolist()):
        for h in range(H):
            keep = _attended(L, None if chunk_ids is None else chunk_ids[b, h], chunk_size,
                             n_sink, n_recent)
            idx = torch.tensor(sorted(keep), dtype=torch.long)
            if not len(idx):
                continue
            kk, vv = k[b, idx, h].float(), v[b, idx, h].float()
            for hq in range(h * G, (h + 1) * G):
                s = kk @ q[b, hq].float() / math.sqrt(D)
                out[b, hq] = torch.softmax(s, 0) @ vv
                lse[b, hq] = torch.logsumexp(s, 0)
    return out, lse


@pytest.mark.parametrize("splits", [1, 3], ids=["split1", "split3"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_ref(case, splits, paged_kv, device, assert_close):
    args, _ = _inputs(case, paged_kv, device)
    kw = dict(chunk_size=case.chunk_size, n_sink=case.n_sink, n_recent=case.n_recent,
              return_lse=True)
    out, lse = sparse_paged_decode(*args, num_splits=splits, **kw)
    ref_out, ref_lse = sparse_paged_decode_ref(*args, **kw)
    assert out.dtype == case.dtype and out.shape == args[0].shape
    assert_close("out", out, ref_out, case.dtype)
    assert_close("lse", lse, ref_lse, torch.float32, scale=10)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ref_matches_oracle(case, paged_kv, device, assert_close):
    args, (k, v) = _inputs(case, paged_kv, device)
    q, _, _, _, seq_lens, ids = args
    out, lse = sparse_paged_decode_ref(*args, chunk_size=case.chunk_size, n_sink=case.n_sink,
                                       n_recent=case.n_recent, return_lse=True)
    exp_out, exp_lse = _oracle(q.cpu(), k, v, seq_lens.cpu(), None if ids is None else ids.cpu(),
                               case.chunk_size, case.n_sink, case.n_recent)
    assert_close("out", out, exp_out.to(case.dtype), case.dtype)
    assert_close("lse", lse, exp_lse, torch.float32, scale=10)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_selected_positions_lists_each_attended_token_once(case):
    ids = _chunk_ids(case)
    seq_lens = torch.tensor(case.seq_lens)
    max_len = (max(case.seq_lens) // case.block_size + 2) * case.block_size
    pos, valid = selected_positions(seq_lens, ids, case.chunk_size, case.n_sink, case.n_recent,
                                    case.num_kv_heads, max_len)
    for b, L in enumerate(case.seq_lens):
        for h in range(case.num_kv_heads):
            listed = pos[b, h][valid[b, h]].tolist()
            assert len(listed) == len(set(listed))
            assert set(listed) == _attended(L, None if ids is None else ids[b, h],
                                            case.chunk_size, case.n_sink, case.n_recent)


def _oracle_windows(q, k, v, seq_lens, chunk_ids, chunk_size, n_sink, windows):
    """The oracle with a window per (sequence, kv-head): ``windows`` ``[B, H_kv]``."""
    B, Hq, D = q.shape
    H = k.shape[2]
    out = torch.zeros(B, Hq, D)
    for h in range(H):
        heads = slice(h * (Hq // H), (h + 1) * (Hq // H))
        for b in range(B):
            one = _oracle(q[b:b + 1, heads], k[b:b + 1, :, h:h + 1], v[b:b + 1, :, h:h + 1],
                          seq_lens[b:b + 1], None if chunk_ids is None
                          else chunk_ids[b:b + 1, h:h + 1], chunk_size, n_sink,
                          int(windows[b, h]))[0]
            out[b, heads] = one[0]
    return out


@pytest.mark.parametrize("per", ["row", "kv-head"])
@pytest.mark.parametrize("impl", [sparse_paged_decode, sparse_paged_decode_ref],
                         ids=["triton", "ref"])
def test_window_per_row_or_kv_head(impl, per, paged_kv, device, assert_close):
    """``n_recent`` as a tensor: a window per sequence ([B], Quest's current page, whole rows
    that fit) or per kv-head ([B, H_kv]: a window of L reads that head densely)."""
    case = Case((70, 41, 100), 2, 3, 64, 16, 8, 3, 4, 0)
    args, (k, v) = _inputs(case, paged_kv, device)
    q, k_cache, v_cache, table, seq_lens, ids = args
    if per == "row":
        window = torch.tensor([6, 41, 16])                       # row 1 reads all of itself
        windows = window[:, None].expand(-1, case.num_kv_heads)
    else:
        windows = torch.tensor([[6, 70], [41, 3], [100, 16]])   # dense heads where = L
        window = windows
    out = impl(q, k_cache, v_cache, table, seq_lens, ids, case.chunk_size, case.n_sink,
               window.to(device))
    expected = _oracle_windows(q.cpu(), k, v, seq_lens.cpu(), ids.cpu(), case.chunk_size,
                               case.n_sink, windows)
    assert_close("out", out, expected, case.dtype)
    with pytest.raises(ValueError, match=r"n_recent must be an int, \[B\]=3"):
        sparse_paged_decode(q, k_cache, v_cache, table, seq_lens, ids, case.chunk_size,
                            case.n_sink, torch.ones(3, 5, dtype=torch.int32, device=device))


DENSE = [Case((33, 128, 7), 2, 1, 64, 16, 16, 9, 0, 0),
         Case((50, 97), 2, 3, 128, 16, 16, 7, 0, 0, torch.float16),
         Case((129, 64), 2, 4, 64, 32, 16, 9, 0, 0, torch.bfloat16)]


@pytest.mark.parametrize("how", ["all-chunks", "window-covers"])
@pytest.mark.parametrize("impl", [sparse_paged_decode, sparse_paged_decode_ref],
                         ids=["triton", "ref"])
@pytest.mark.parametrize("case", DENSE, ids=lambda c: c.id)
def test_dense_equals_sdpa(case, impl, how, paged_kv, device, assert_close):
    """Selecting every token == SDPA over the gathered, unpaged KV."""
    args, (k, v) = _inputs(case, paged_kv, device)
    q, k_cache, v_cache, table, seq_lens, _ = args
    B, H = len(case.seq_lens), case.num_kv_heads
    if how == "all-chunks":
        ids = torch.arange(case.k, dtype=torch.int32, device=device).expand(B, H, -1).contiguous()
        out = impl(q, k_cache, v_cache, table, seq_lens, ids, case.chunk_size)
    else:
        out = impl(q, k_cache, v_cache, table, seq_lens, None, n_recent=max(case.seq_lens))
    for b, L in enumerate(case.seq_lens):
        kb = k[b, :L].transpose(0, 1)[None].float()                          # [1, H, L, D]
        vb = v[b, :L].transpose(0, 1)[None].float()
        exp = F.scaled_dot_product_attention(q[b, :, None].cpu()[None].float(), kb, vb,
                                             enable_gqa=True)[0, :, 0]
        assert_close(f"seq{b}", out[b], exp.to(case.dtype), case.dtype)


@pytest.mark.parametrize("impl", [sparse_paged_decode, sparse_paged_decode_ref],
                         ids=["triton", "ref"])
def test_empty_key_set(impl, paged_kv, device):
    """No sink, no window, no valid ids: zeros and LSE -inf, not nan."""
    k_cache, v_cache, table, seq_lens, _, _ = paged_kv([10, 20], 1, 64, 16, torch.float32, device)
    q = torch.randn(2, 2, 64, device=device)
    ids = torch.tensor([[[-1, -1]], [[5, -1]]], dtype=torch.int32, device=device)  # chunk 5 > L
    out, lse = impl(q, k_cache, v_cache, table, seq_lens, ids, 8, return_lse=True)
    assert torch.equal(out.cpu(), torch.zeros(2, 2, 64))
    assert torch.isneginf(lse).all()


@pytest.mark.parametrize("impl", [sparse_paged_decode, sparse_paged_decode_ref],
                         ids=["triton", "ref"])
def test_hnd_cache_view_and_out_buffer(impl, paged_kv, device, assert_close):
    """A [blocks, H_kv, block_size, D] cache passed as a transposed view; ``out=`` is filled."""
    case = CASES[1]
    args, _ = _inputs(case, paged_kv, device)
    q, k_cache, v_cache, table, seq_lens, ids = args
    kw = dict(chunk_size=case.chunk_size, n_sink=case.n_sink, n_recent=case.n_recent)
    expected = sparse_paged_decode_ref(*args, **kw)
    k_hnd = k_cache.transpose(1, 2).contiguous().transpose(1, 2)
    v_hnd = v_cache.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.empty_like(q)
    got = impl(q, k_hnd, v_hnd, table, seq_lens, ids, out=out, **kw)
    assert got is out
    assert_close("out", out, expected, case.dtype)


@pytest.mark.parametrize("splits", [1, 2], ids=["split1", "split2"])
def test_one_plan_serves_every_layer(splits, paged_kv, device, assert_close):
    """plan once per step, run per layer (different K/V and selections, same shapes)."""
    case = CASES[0]
    (q, k_cache, v_cache, table, seq_lens, ids), _ = _inputs(case, paged_kv, device)
    kw = dict(chunk_size=case.chunk_size, n_sink=case.n_sink, n_recent=case.n_recent)
    plan = plan_sparse_decode(q, k_cache, table, ids, num_splits=splits, **kw)
    for layer in range(2):
        k_l, v_l = k_cache * (1 + layer), v_cache.flip(0) if layer else v_cache
        ids_l = ids.flip(-1) if layer else ids          # another selection, same shape
        out, lse = sparse_paged_decode(q, k_l, v_l, table, seq_lens, ids_l, plan=plan,
                                       return_lse=True, **kw)
        ref_out, ref_lse = sparse_paged_decode_ref(q, k_l, v_l, table, seq_lens, ids_l,
                                                   return_lse=True, **kw)
        assert_close(f"layer{layer} out", out, ref_out, case.dtype)
        assert_close(f"layer{layer} lse", lse, ref_lse, torch.float32, scale=10)


def test_merge_attention_states_equals_joint_softmax(assert_close):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 8, generator=g) for n in (3, 20, 20))
    s = q @ k.T
    parts = [slice(0, 7), slice(7, 20), slice(20, 20)]                     # the last is empty
    outs = torch.stack([torch.softmax(s[:, p], -1) @ v[p] if p.stop > p.start
                        else torch.zeros(3, 8) for p in parts], dim=1)     # [3, S, 8]
    lses = torch.stack([torch.logsumexp(s[:, p], -1) for p in parts], dim=1)
    out, lse = merge_attention_states(outs, lses, dim=1)
    assert_close("out", out, torch.softmax(s, -1) @ v)
    assert_close("lse", lse, torch.logsumexp(s, -1))
