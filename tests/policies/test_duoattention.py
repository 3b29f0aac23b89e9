import json
import pickle

import numpy as np
import pytest
import torch

from kvplug.kernels import chunk_summaries, selected_positions
from kvplug.policies import KeySummary, build_policy
from kvplug.policies.duoattention import (read_pattern, sparsity_heads, threshold_heads,
                                          write_pattern)

# 2 layers x 3 kv-heads
ALPHA = torch.tensor([[0.9, 0.2, 0.5],
                      [0.49, 1.0, 0.0]], dtype=torch.float64)


@pytest.fixture
def pattern(tmp_path):
    return str(write_pattern(tmp_path / "pattern", ALPHA, {"sink_size": 64}))


def _policy(pattern, **params):
    policy = build_policy("duoattention", {"pattern": pattern, **params})
    policy.check_model(2, 3, 1)
    return policy


def test_pattern_round_trip_in_the_papers_format(tmp_path):
    alpha = torch.rand(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = write_pattern(tmp_path / "p", alpha, {"lr": 0.02, "sink_size": 64})
    assert torch.equal(read_pattern(out), alpha)
    assert torch.equal(read_pattern(out / "full_attention_heads.tsv"), alpha)
    np.testing.assert_array_equal(np.loadtxt(out / "full_attention_heads.tsv", delimiter="\t"),
                                  alpha.numpy())  # how the paper's code reads it
    assert json.loads((out / "config.json").read_text()) == {"lr": 0.02, "sink_size": 64}


def test_bad_pattern_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_pattern(tmp_path / "nope")
    (tmp_path / "ragged.tsv").write_text("1\t0\n1\n")
    with pytest.raises(ValueError, match=r"row lengths \[2, 1\]"):
        read_pattern(tmp_path / "ragged.tsv")
    (tmp_path / "text.tsv").write_text("1\tx\n")
    with pytest.raises(ValueError, match="not a tab-separated matrix"):
        read_pattern(tmp_path / "text.tsv")


def test_threshold_binarization():
    assert threshold_heads(ALPHA, 0.5).tolist() == [[True, False, True], [False, True, False]]
    assert threshold_heads(ALPHA, 0.95).tolist() == [[False, False, False], [False, True, False]]


def test_sparsity_binarization():
    # N = 6: ceil(s * 5) lowest heads stream (np.quantile's cut)
    assert sparsity_heads(ALPHA, 0.25).tolist() == [[True, False, True], [True, True, False]]
    assert sparsity_heads(ALPHA, 0.5).tolist() == [[True, False, True], [False, True, False]]
    assert sparsity_heads(ALPHA, 0.0).all() and not sparsity_heads(ALPHA, 1.0).any()
    ties = torch.full((2, 2), 0.5, dtype=torch.float64)
    assert sparsity_heads(ties, 0.5).tolist() == [[True, True], [False, False]]  # earlier wins


@pytest.mark.parametrize("s", [0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 0.9])
def test_sparsity_matches_the_papers_quantile(s):
    alpha = np.random.default_rng(1).random((5, 4))
    official = alpha >= np.quantile(alpha, s)  # sparsify_attention_heads, distinct values
    assert sparsity_heads(torch.from_numpy(alpha), s).numpy().tolist() == official.tolist()


def test_default_threshold_is_the_papers(pattern):
    policy = _policy(pattern)
    assert policy.retrieval.tolist() == [[True, False, True], [False, True, False]]
    assert policy.kv_tokens_read(1000) == (3 * 1000 + 3 * 320) / 6


def test_budget_sets_the_number_of_retrieval_heads(pattern):
    # L = 1000, window 64 + 256 = 320: n·1000 + (6-n)·320 <= 6·budget
    policy = _policy(pattern, budget=500)               # n <= 6·180/680 = 1.6
    assert policy.retrieval_count(1000, 320) == 1
    assert policy.kv_tokens_read(1000) == pytest.approx((1000 + 5 * 320) / 6)
    assert policy.kv_tokens_read(1000) <= 500
    assert policy.kv_tokens_read(300) == 300            # context within the window: dense
    policy = _policy(pattern, budget=700)               # n <= 6·380/680 = 3.4
    assert policy.retrieval_count(1000, 320) == 3
    assert policy.retrieval_count(2000, 320) == 1       # 6·380/1680 = 1.4
    assert _policy(pattern, budget_ratio=0.5).retrieval_count(1000, 320) == 1


def test_budget_picks_the_top_alpha_heads(pattern):
    policy = _policy(pattern, budget=700)
    q = torch.zeros(1, 6, 8)
    ctx = policy.step_context(torch.tensor([1000]), 1, 2)
    sel = [policy.select(layer, q, None, torch.tensor([1000]), ctx) for layer in range(2)]
    assert sel[0].dense_kv_heads.tolist() == [True, False, True]   # α 0.9 and 0.5
    assert sel[1].dense_kv_heads.tolist() == [False, True, False]  # α 1.0
    # a longer row in the batch: the split of the tightest row (n = 1)
    ctx = policy.step_context(torch.tensor([1000, 2000]), 1, 2)
    sel = policy.select(0, torch.zeros(2, 6, 8), None, torch.tensor([1000, 2000]), ctx)
    assert sel.dense_kv_heads.tolist() == [False, False, False]
    assert policy.select(1, q, None, torch.tensor([1000, 2000]), ctx).dense_kv_heads.tolist() \
        == [False, True, False]


def test_shape_mismatch_is_refused(pattern):
    policy = build_policy("duoattention", {"pattern": pattern})
    with pytest.raises(ValueError, match=r"has 2 layers x 3 kv-heads, the model 30 x 3"):
        policy.check_model(30, 3, 1)
    with pytest.raises(ValueError, match=r"the model 2 x 1; calibrate one"):
        policy.check_model(2, 1, 1)


@pytest.mark.parametrize("params, match", [
    ({"threshold": 1.5}, r"'threshold'=1.5 is out of range \[-1.0, 1.0\]"),
    ({"threshold": -0.5}, r"threshold=-0.5 must be in \[0, 1\], or -1"),
    ({"sparsity": -0.2}, r"sparsity=-0.2 must be in \[0, 1\], or -1"),
    ({"threshold": 0.3, "sparsity": 0.5}, "at most one of .* got threshold=0.3, sparsity=0.5"),
    ({"sparsity": 0.5, "budget": 1000}, "at most one of .* got sparsity=0.5, budget=1000"),
    ({"budget": 1000, "budget_ratio": 0.5}, "got budget=1000, budget_ratio=0.5"),
    ({"budget": 100}, r"budget=100 is less than .* sink_size \+ recent_size = 320"),
    ({"recent_size": 0}, r"'recent_size'=0 is out of range"),
    ({"sink": 4}, r"no parameter 'sink'; valid parameters: .*'sink_size'"),
    ({"retrieval_read": "quest"}, r"retrieval_read='quest' needs exactly one of budget .* none"),
    ({"retrieval_read": "quest", "budget": 500, "threshold": 0.3, "sparsity": 0.5},
     "at most one of threshold and sparsity .* got budget=500, threshold=0.3, sparsity=0.5"),
    ({"page_size": 32}, r"page_size=32 is read only with retrieval_read='quest'"),
    ({"retrieval_read": "pages"}, r"'retrieval_read'='pages' is not one of \['all', 'quest'\]"),
])
def test_bad_parameters(pattern, params, match):
    with pytest.raises(ValueError, match=match):
        build_policy("duoattention", {"pattern": pattern, **params})


def test_missing_pattern_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="parameter .pattern.=.*does-not-exist"):
        build_policy("duoattention", {"pattern": str(tmp_path / "does-not-exist")})


def test_quest_on_retrieval_heads_reads_their_top_pages_within_the_budget(pattern):
    """Composed with Quest: all heads read sink + recent, the retrieval heads (α >= 0.5)
    also the pages with the highest q·k bound, as many as the budget leaves."""
    torch.manual_seed(0)
    L, D, page = 200, 8, 8
    policy = _policy(pattern, retrieval_read="quest", budget=60, page_size=page, sink_size=4,
                     recent_size=16)
    assert [policy.summary_spec(layer, 1) for layer in range(2)] == [
        policy.summary_spec(0, 1)] * 2 and policy.summary_spec(0, 1).kind == "minmax"
    assert policy.read_chunk(1, 1) == page
    keys = torch.randn(1, L, 3, D) * 0.1
    q = torch.randn(1, 6, D)
    keys[0, 43, 0] = q[0, 0] * 5        # page 5: kv-head 0 (retrieval) aligned with its query
    keys[0, 91, 1] = q[0, 2] * 5        # page 11: kv-head 1 (streaming at layer 0)
    _, kmin, kmax = chunk_summaries(keys, page)
    ctx = policy.step_context(torch.tensor([L]), 1, 2)
    sel = policy.select(0, q, KeySummary(kmin, kmax, None, page), torch.tensor([L]), ctx)
    assert sel.dense_kv_heads is None and sel.chunk_size == page
    pos, valid = selected_positions(torch.tensor([L]), sel.chunk_ids, page, sel.n_sink,
                                    int(sel.n_recent[0]), num_kv_heads=3, max_len=L)
    reads = [set(pos[0, h][valid[0, h]].tolist()) for h in range(3)]
    window = set(range(4)) | set(range(L - 16, L))
    # 3 retrieval heads of 6 share (60 - 20) * 6 tokens: 10 pages each
    assert sel.chunk_ids[0, 0].ne(-1).sum() == 10 == sel.chunk_ids[0, 2].ne(-1).sum()
    assert reads[1] == window                                    # streaming: sink + recent only
    assert set(range(40, 48)) <= reads[0] and len(reads[0]) == 20 + 80
    picked = sel.chunk_ids[0, 0][sel.chunk_ids[0, 0] >= 0]
    assert picked.min() >= 1 and picked.max() < (L - 16) // page  # outside sink and window
    assert policy.kv_tokens_read(L) == pytest.approx(20 + 3 * 80 / 6) and \
        policy.kv_tokens_read(L) <= 60
    # a row within the budget reads everything
    ctx = policy.step_context(torch.tensor([50]), 1, 2)
    assert policy.select(0, q, KeySummary(kmin, kmax, None, page), torch.tensor([50]), ctx) \
        is None


def _reads(sel, seq_lens, heads):
    """Positions each (row, kv-head) reads: sink + recent, or all where dense."""
    out = []
    for b, L in enumerate(seq_lens.tolist()):
        n_recent = int(torch.as_tensor(sel.n_recent).expand(len(seq_lens))[b])
        pos, valid = selected_positions(torch.tensor([L]), sel.chunk_ids, sel.chunk_size,
                                        sel.n_sink, n_recent, num_kv_heads=heads, max_len=L)
        out.append([set(range(L)) if sel.dense_kv_heads[h] else
                    set(pos[0, h][valid[0, h]].tolist()) for h in range(heads)])
    return out


def test_streaming_heads_read_only_sink_and_recent(pattern):
    policy = _policy(pattern, sink_size=4, recent_size=16)
    q = torch.zeros(3, 6, 8)
    seq_lens = torch.tensor([100, 20, 57])
    ctx = policy.step_context(seq_lens, 1, 2)
    for layer, retrieval in ((0, [True, False, True]), (1, [False, True, False])):
        sel = policy.select(layer, q, None, seq_lens, ctx)
        assert sel.dense_kv_heads.tolist() == retrieval
        reads = _reads(sel, seq_lens, 3)
        for b, L in enumerate(seq_lens.tolist()):
            streaming = set(range(4)) | set(range(L - 16, L)) if L > 20 else set(range(L))
            for h in range(3):
                assert reads[b][h] == (set(range(L)) if retrieval[h] else streaming)
    short = torch.tensor([20, 10, 5])
    assert policy.select(0, q, None, short, policy.step_context(short, 1, 2)) is None


def test_all_retrieval_layer_is_dense(tmp_path):
    pattern = write_pattern(tmp_path / "p", torch.tensor([[1.0, 1.0], [0.0, 1.0]]), {})
    policy = build_policy("duoattention", {"pattern": str(pattern)})
    policy.check_model(2, 2, 1)
    ctx = policy.step_context(torch.tensor([500]), 1, 2)
    assert policy.select(0, torch.zeros(1, 4, 8), None, torch.tensor([500]), ctx) is None
    assert policy.select(1, torch.zeros(1, 4, 8), None, torch.tensor([500]), ctx) is not None


def test_streaming_reads_whole_units(pattern):
    policy = build_policy("duoattention", {"pattern": pattern, "sink_size": 40,
                                           "recent_size": 64})
    policy.check_model(2, 3, 32)
    seq_lens = torch.tensor([1000, 1024, 97])
    sel = policy.select(0, torch.zeros(3, 6, 8), None, seq_lens,
                        policy.step_context(seq_lens, 32, 2))
    assert sel.n_sink == 64                                      # 40 rounded up to 2 units
    for b, L in enumerate(seq_lens.tolist()):
        read = _reads(sel, seq_lens, 3)[b][1]                    # kv-head 1 streams
        units = {p // 32 for p in read}
        assert read == {p for u in units for p in range(32 * u, min(32 * u + 32, L))}
        last = (L - 1) // 32
        assert units == {0, 1, last - 1, last}                   # 2 sink + 2 recent units
    assert policy.kv_tokens_read(1000) == pytest.approx((3 * 1000 + 3 * (64 + 32 + 8)) / 6)


# -- HF transformers end to end -------------------------------------------------------------

REF_ATTENTION = "duoattention_test_reference"
SINK, RECENT = 4, 8


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A seeded random-init 2-layer GQA Llama (4 query heads, 2 kv heads), saved once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _reference_attention(retrieval):
    """SDPA in which, at decode, kv-heads not in ``retrieval`` see only sink + recent keys."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def forward(module, query, key, value, attention_mask, **kwargs):
        full, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        L = key.shape[2]
        if query.shape[2] != 1 or L <= SINK + RECENT:
            return full, None
        keep = list(range(SINK)) + list(range(L - RECENT, L))
        window, _ = sdpa_attention_forward(module, query, key[:, :, keep], value[:, :, keep],
                                           None, **kwargs)
        dense = retrieval[module.layer_idx].repeat_interleave(query.shape[1] // key.shape[1])
        return torch.where(dense[None, None, :, None], full, window), None
    return forward


def _greedy(model, input_ids, new_tokens=8):
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("alpha", [[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]],
                                   [[0.9, 0.1], [0.2, 0.6]]])
def test_hf_decode_reads_sink_and_recent_on_streaming_heads_only(tiny_llama_dir, tmp_path, alpha):
    from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM
    from transformers.masking_utils import sdpa_mask

    from kvplug.integrations import transformers as kvhf

    alpha = torch.tensor(alpha)
    pattern = write_pattern(tmp_path / "p", alpha, {})
    AttentionInterface.register(REF_ATTENTION, _reference_attention(alpha >= 0.5))
    AttentionMaskInterface.register(REF_ATTENTION, sdpa_mask)
    input_ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    load = lambda impl: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        tiny_llama_dir, attn_implementation=impl, dtype=torch.float32).eval()
    ref_tokens, ref_logits = _greedy(load(REF_ATTENTION), input_ids)
    kvhf.register()
    model = load("kvplug")
    kvhf.attach_policy(model, "duoattention", pattern=str(pattern), sink_size=SINK,
                       recent_size=RECENT)
    tokens, logits = _greedy(model, input_ids)
    assert len(set(ref_tokens[0, 40:].tolist())) > 2  # not a degenerate run
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    if bool(alpha.ge(0.5).all()):  # all retrieval: exactly the dense model
        kvhf.attach_policy(model, "full")
        assert torch.equal(_greedy(model, input_ids)[1], logits)


def test_hf_decode_with_quest_pages_on_retrieval_heads(tiny_llama_dir, tmp_path):
    """The composed mode runs in the HF path and reads less than dense there."""
    from transformers import AutoModelForCausalLM

    from kvplug.integrations import transformers as kvhf

    pattern = write_pattern(tmp_path / "p", torch.tensor([[0.9, 0.1], [0.2, 0.6]]), {})
    input_ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(3))
    kvhf.register()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="kvplug",
                                                 dtype=torch.float32).eval()
    dense_tokens, dense_logits = _greedy(model, input_ids)
    kvhf.attach_policy(model, "duoattention", pattern=str(pattern), sink_size=SINK,
                       recent_size=RECENT, retrieval_read="quest", page_size=4, budget=24)
    tokens, logits = _greedy(model, input_ids)
    assert tokens.shape == dense_tokens.shape
    assert not torch.equal(logits, dense_logits)            # it read a subset


@pytest.mark.parametrize("body, match", [
    (b"1\tnan\n0\t1\n", r"non-finite gate\(s\), the first at layer 0, kv-head 1: nan"),
    (b"1\t0\n0\tinf\n", r"non-finite gate\(s\), the first at layer 1, kv-head 1: inf"),
    (b"1\t0\n0\t1e999\n", "non-finite"),
    (b"", r"row lengths \[\]"),
    (b"\n \n", r"row lengths \[\]"),
    (b"1\t0\n__import__('os').system('false')\n", "not a tab-separated matrix of numbers"),
    (pickle.dumps(ALPHA.tolist()), "not a tab-separated matrix of numbers"),  # never unpickled
    (b"\xff\xfe\x00\x01", "not a tab-separated matrix of numbers"),
])
def test_malformed_pattern_files_are_value_errors_naming_the_parameter(tmp_path, body, match):
    path = tmp_path / "full_attention_heads.tsv"
    path.write_bytes(body)
    with pytest.raises(ValueError, match=match):
        read_pattern(path)
    with pytest.raises(ValueError, match=rf"parameter 'pattern'={str(tmp_path)!r}: .*{match}"):
        build_policy("duoattention", {"pattern": str(tmp_path)})


def test_pattern_directory_without_the_tsv_or_of_another_shape(tmp_path):
    with pytest.raises(ValueError, match=r"parameter 'pattern'.*neither a full_attention_heads"):
        build_policy("duoattention", {"pattern": str(tmp_path)})
    pattern = write_pattern(tmp_path / "p", ALPHA, {})                 # 2 layers x 3 kv-heads
    policy = build_policy("duoattention", {"pattern": str(pattern)})
    with pytest.raises(ValueError, match="has 2 layers x 3 kv-heads, the model 30 x 3"):
        policy.check_model(30, 3, 32)
