"""Low-bit KV (ZipCache's schemes): packing round trip, quantization error bounds per bit
width, the Triton quantize-and-pack vs its reference, and the fused decode over packed
codes vs attention over the dequantized part."""

from __future__ import annotations

import pytest
import torch

from kvplug.kernels import (dequantize_kv, pack_codes, quant_pack, quantize_kv, quantize_pack,
                            quantize_pack_ref, quantized_decode, quantized_decode_ref,
                            unpack_codes)
from kvplug.kernels.quant_pack import key_params, value_params, value_scale


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5, 64), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_pack_layout_is_planes():
    """Byte i holds codes i, i + D/4, i + D/2, i + 3D/4 at shifts 0, 2, 4, 6 (the official
    packer's layout, which the decode kernel reads)."""
    codes = torch.tensor([1, 2, 3, 0, 2, 1, 0, 3], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [1 | 3 << 2 | 2 << 4 | 0 << 6,
                                             2 | 0 << 2 | 1 << 4 | 3 << 6]


def test_bad_bits_and_head_dim():
    with pytest.raises(ValueError, match="bits=3"):
        pack_codes(torch.zeros(8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="head_dim=6"):
        pack_codes(torch.zeros(6, dtype=torch.uint8), 2)


def _kv(B=2, H=3, n=40, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, n, D, generator=g)
    keys[..., 5] *= 8 + 4          # an outlier channel, as keys have
    values = torch.randn(B, H, n, D, generator=g)
    return keys, values


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_within_half_a_step(bits):
    """Every dequantized element is within half a step of the original (the step its
    channel (keys) or token (values) was given), so the error bound halves per added bit
    over the same range."""
    keys, values = _kv()
    part = quantize_kv(keys, values, bits)
    k, v = dequantize_kv(part)
    k_step = part.k_step.float()
    v_step = part.v_step.float() * part.v_scale.float()
    # float16 parameters round the zero point: allow a little over half a step
    assert ((k - keys).abs() <= 0.5 * k_step + 2e-3 * keys.abs().amax()).all()
    assert ((v - values).abs() <= 0.5 * v_step + 2e-3 * values.abs().amax()).all()
    k_rel = ((k - keys).norm() / keys.norm()).item()
    v_rel = ((v - values).norm() / values.norm()).item()
    bound = {2: 0.5, 4: 0.1, 8: 0.007}[bits]  # measured: 0.42, 0.083, 0.005
    assert k_rel < bound and v_rel < bound, (k_rel, v_rel)


def test_error_shrinks_with_bits():
    keys, values = _kv(seed=1)
    errs = []
    for bits in (2, 4, 8):
        k, v = dequantize_kv(quantize_kv(keys, values, bits))
        errs.append(((k - keys).norm() + (v - values).norm()).item())
    assert errs[0] > 3 * errs[1] > 9 * errs[2]


def test_parameters_follow_the_schemes():
    """Keys: one range per channel (over tokens); values: sqrt(max|v|) per channel, then one
    range per token."""
    keys, values = _kv(n=10)
    zero, step = key_params(keys, 4)
    assert zero.shape == (2, 3, 1, 64)
    assert torch.allclose(zero.float(), keys.amin(dim=2, keepdim=True), atol=1e-2)
    assert torch.allclose(step.float() * 15, (keys.amax(2, True) - keys.amin(2, True)),
                          rtol=1e-3, atol=1e-3)
    scale = value_scale(values)
    assert torch.allclose(scale.float(), values.abs().amax(2, True).sqrt(), rtol=1e-3)
    v_zero, v_step = value_params(values, scale, 2)
    assert v_zero.shape == (2, 3, 10, 1)
    scaled = values / scale.float()
    assert torch.allclose(v_step.float() * 3, scaled.amax(3, True) - scaled.amin(3, True),
                          rtol=1e-3, atol=1e-3)


def test_constant_channel_and_empty_part():
    """A constant channel (step 0) dequantizes exactly; a part of no token is valid."""
    keys, values = _kv(n=6)
    keys[..., 3] = 2.5
    k, _ = dequantize_kv(quantize_kv(keys, values, 2))
    assert torch.equal(k[..., 3], keys[..., 3])
    empty = quantize_kv(keys[:, :, :0], values[:, :, :0], 4)
    out, lse = quantized_decode_ref(torch.randn(2, 6, 64), empty)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_pack_triton_matches_reference(bits):
    keys, values = _kv(n=37, D=48 if bits != 8 else 40, seed=bits)
    zero, step = key_params(keys, bits)
    triton_packed = quantize_pack(keys, zero, step, bits)
    assert torch.equal(triton_packed, quantize_pack_ref(keys, zero, step, bits))
    v_zero, v_step = value_params(values, value_scale(values), bits)
    scaled = values / value_scale(values).float()
    assert torch.equal(quantize_pack(scaled, v_zero, v_step, bits),
                       quantize_pack_ref(scaled, v_zero, v_step, bits))


def test_launchers_run_triton():
    """The tests above compare the interpreted kernels, not the reference with itself."""
    from kvplug.kernels.common import kernel_is_interpreted
    assert kernel_is_interpreted(quant_pack._quantize_pack_kernel)
    assert kernel_is_interpreted(quant_pack._quantized_decode_kernel)


@pytest.mark.parametrize("bits,H,group,n,D", [(4, 3, 3, 45, 64), (2, 2, 1, 17, 32),
                                              (8, 1, 4, 70, 48), (2, 3, 3, 0, 64)])
def test_fused_decode_matches_reference(bits, H, group, n, D, assert_close):
    keys, values = _kv(B=2, H=H, n=n, D=D, seed=n)
    part = quantize_kv(keys, values, bits)
    q = torch.randn(2, H * group, D, generator=torch.Generator().manual_seed(7))
    out, lse = quantized_decode(q, part)
    ref_out, ref_lse = quantized_decode_ref(q, part)
    assert_close("out", out, ref_out)
    assert_close("lse", lse, ref_lse)
    tiled_out, tiled_lse = quantized_decode_ref(q, part, tile=16)      # the CPU path's tiles
    assert_close("tiled out", tiled_out, ref_out)
    assert_close("tiled lse", tiled_lse, ref_lse)
    if n:  # the reference is attention over the dequantized keys and values
        k, v = dequantize_kv(part)
        kk, vv = (t.repeat_interleave(group, dim=1) for t in (k, v))
        s = torch.einsum("bhd,bhnd->bhn", q, kk) / D ** 0.5
        assert_close("out vs dequantized sdpa", out,
                     torch.einsum("bhn,bhnd->bhd", s.softmax(-1), vv))
        assert_close("lse vs dequantized", lse, s.logsumexp(-1))
