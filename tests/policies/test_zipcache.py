"""ZipCache: parameters, probe queries, normalized saliency, the 4/2-bit assignment, and the
engine-free quantized store (segments and their decode)."""

from __future__ import annotations

import pytest
import torch

from kvplug.integrations.capabilities import HF, VLLM_CPU, VLLM_CUDA, check_engine
from kvplug.policies import build_policy
from kvplug.policies.quantized_store import decode, dequantized, quantize_segment


@pytest.mark.parametrize("params,match", [
    ({"bits_salient": 3}, r"bits_salient'=3"),
    ({"bits_other": 1}, r"bits_other'=1"),
    ({"k_unimportant_ratio": 1.5}, r"k_unimportant_ratio'=1.5"),
    ({"streaming_gap": 0}, r"streaming_gap'=0"),
    ({"probe_ratio": 0.0}, "probe_ratio=0.0"),
    ({"probe_ratio": 2.0}, r"probe_ratio'=2.0"),
    ({"bits_salient": 2, "bits_other": 4}, "bits_salient=2"),
])
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        build_policy("zipcache", params)


def test_defaults_are_the_official_ones():
    p = build_policy("zipcache")
    assert (p.bits_salient, p.bits_other, p.k_unimportant_ratio, p.streaming_gap,
            p.probe_ratio) == (4, 2, 0.4, 100, 0.05)
    assert p.store == "quantized" and p.fallback_store is None


def test_engines():
    """HF and vLLM-cpu keep the quantized store; vLLM on CUDA refuses it, saying what."""
    policy = build_policy("zipcache")
    check_engine(policy, HF)
    check_engine(policy, VLLM_CPU)
    with pytest.raises(ValueError, match=r"'zipcache' needs store 'quantized', which vLLM on CUDA"):
        check_engine(policy, VLLM_CUDA)


def test_probe_positions():
    p = build_policy("zipcache")
    pos = p.probe_positions(1000, layer_idx=3)
    assert pos.tolist()[-50:] == list(range(950, 1000))
    earlier = pos[:-50]
    assert len(earlier) == 50 and len(set(earlier.tolist())) == 50 and earlier.max() < 950
    assert torch.equal(pos, p.probe_positions(1000, 3))               # seeded
    assert not torch.equal(pos, p.probe_positions(1000, 4))           # a draw per layer
    assert p.probe_positions(10, 0).tolist() == [9]                   # int(0.5) random: none


def _brute_saliency(queries, keys, positions, scale):
    """The paper's normalized score: causal softmax rows of the probes, summed over the
    probes and the GQA group, divided by how many probes see each token."""
    N, H_kv, D = keys.shape
    group = queries.shape[1] // H_kv
    out = torch.zeros(H_kv, N)
    for h in range(queries.shape[1]):
        for i, p in enumerate(positions.tolist()):
            logits = keys[:p + 1, h // group] @ queries[i, h] * scale
            out[h // group, :p + 1] += logits.softmax(0)
    seen = torch.tensor([(positions >= j).sum().item() for j in range(N)])
    return out / seen


def test_saliency_is_the_normalized_probe_attention():
    g = torch.Generator().manual_seed(0)
    N, D = 120, 16
    keys = torch.randn(N, 2, D, generator=g)
    p = build_policy("zipcache", {"probe_ratio": 0.1})
    positions = p.probe_positions(N, 0)
    queries = torch.randn(len(positions), 4, D, generator=g)
    got = p.prefill_saliency(queries, positions, keys, 0.25)
    torch.testing.assert_close(got, _brute_saliency(queries, keys, positions, 0.25))


def test_planted_salient_tokens_get_the_high_bits():
    """Late tokens the probes attend to most are salient after normalization, though the raw
    sum ranks an early token every probe sees (and attends to less) above them; 2 bits go
    to the lowest ``floor(0.4 n)`` per kv-head."""
    N, D = 400, 16
    g = torch.Generator().manual_seed(1)
    q_dir = torch.zeros(D)
    q_dir[0] = 1.0
    keys = 0.1 * torch.randn(N, 1, D, generator=g)
    planted = [300, 301, 320, 333]
    keys[planted, 0, 0] = 1.1
    keys[5, 0, 0] = 0.8
    p = build_policy("zipcache", {"k_unimportant_ratio": 0.99, "probe_ratio": 0.05})
    positions = p.probe_positions(N, 0)
    queries = q_dir.expand(len(positions), 2, D) * 4.0
    saliency = p.prefill_saliency(queries, positions, keys, 1.0)
    mask = p.salient_mask(saliency)
    assert mask.sum().item() == N - int(0.99 * N) == 4
    assert mask[0].nonzero().flatten().tolist() == planted
    raw = saliency * torch.tensor([(positions >= j).sum().item() for j in range(N)])
    assert raw[0].argmax().item() == 5                                 # normalization matters
    default = build_policy("zipcache").salient_mask(saliency)
    assert (~default).sum().item() == int(0.4 * N)


def test_stream_saliency_is_the_query_softmax_over_the_context():
    g = torch.Generator().manual_seed(2)
    B, H_kv, G, D, ctx, gap = 2, 3, 3, 8, 30, 5
    query = torch.randn(B, H_kv * G, D, generator=g)
    context = torch.randn(B, H_kv, ctx, D, generator=g)
    logits = torch.einsum("bhd,bhnd->bhn", query, context.repeat_interleave(G, 1)) * 0.5
    lse = logits.logsumexp(-1)
    got = build_policy("zipcache").stream_saliency(query, context[:, :, -gap:], lse, 0.5)
    want = logits.softmax(-1)[..., -gap:].view(B, H_kv, G, gap).sum(2)
    torch.testing.assert_close(got, want)


def test_segment_puts_the_salient_tokens_in_the_high_bit_part():
    g = torch.Generator().manual_seed(3)
    B, H, n, D = 1, 2, 20, 16
    keys = torch.randn(B, H, n, D, generator=g)
    values = torch.randn(B, H, n, D, generator=g)
    saliency = torch.rand(B, H, n, generator=g)
    p = build_policy("zipcache", {"bits_salient": 8, "bits_other": 8})
    segment = quantize_segment(p, keys, values, saliency)
    assert segment.salient.num_tokens == 12 and segment.other.num_tokens == 8
    k, _ = dequantized([segment], torch.float32)
    mask = p.salient_mask(saliency)
    for h in range(H):
        nearest = torch.cdist(k[0, h], keys[0, h]).argmin(dim=1)        # 8 bits: unambiguous
        assert sorted(nearest[:12].tolist()) == mask[0, h].nonzero().flatten().tolist()
        assert sorted(nearest[12:].tolist()) == (~mask[0, h]).nonzero().flatten().tolist()


def test_decode_over_segments_and_exact_tokens():
    """Packed parts read by the fused path plus exact tokens equal dense attention over the
    dequantized segments and the exact tokens."""
    g = torch.Generator().manual_seed(4)
    B, H, G, D = 2, 3, 3, 64
    p = build_policy("zipcache")
    segments = []
    for n in (50, 7):
        keys, values = torch.randn(2, B, H, n, D, generator=g)
        segments.append(quantize_segment(p, keys, values, torch.rand(B, H, n, generator=g)))
    exact_k, exact_v = torch.randn(2, B, H, 4, D, generator=g)
    query = torch.randn(B, H * G, D, generator=g)
    out, lse = decode(segments, query, exact_k, exact_v, 0.125)
    k, v = dequantized(segments, torch.float32)
    k = torch.cat([k, exact_k], 2).repeat_interleave(G, 1)
    v = torch.cat([v, exact_v], 2).repeat_interleave(G, 1)
    s = torch.einsum("bhd,bhnd->bhn", query, k) * 0.125
    torch.testing.assert_close(out, torch.einsum("bhn,bhnd->bhd", s.softmax(-1), v))
    torch.testing.assert_close(lse, s.logsumexp(-1))
