"""Quantization core (raad_kernels.quant): grids, scales, packing, smoothing, rotation."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from raad_kernels import quant
from raad_kernels.reference import attention_reference

BITS = (8, 4, 2)


def _rows(n=64, d=64, seed=0, heavy=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if heavy:  # heavy tails: a few outlier channels and a long-tailed row
        x[:, :3] *= 10
        x[0] = torch.distributions.StudentT(2.0).sample((d,))
    return x


def _half_step(bits):
    return 1.0 if bits == 2 else 0.5  # in units of the scale: int2 codes are odd, 2 apart


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_within_half_a_step(bits):
    x = _rows()
    codes, scale = quant.quantize(x, bits)
    assert codes.dtype == torch.int8 and scale.shape == x.shape[:-1]
    err = (quant.dequantize(codes, scale) - x).abs()
    # Inside the clipping range every element is within half a quantization step.
    top = quant.QMAX[bits] * scale[:, None]
    inside = x.abs() <= top + _half_step(bits) * scale[:, None]
    assert inside.any()
    assert (err[inside] <= _half_step(bits) * scale.expand_as(x.T).T[inside] * (1 + 1e-6)).all()
    # Clipped elements land on the top level.
    assert torch.allclose(err[~inside], (x.abs() - top.expand_as(x))[~inside], rtol=1e-5, atol=1e-6)
    if bits == 8:
        assert inside.all(), "int8 clips at the absmax: nothing is clipped"


@pytest.mark.parametrize("bits", BITS)
def test_codes_on_the_grid(bits):
    codes, _ = quant.quantize(_rows(seed=1), bits)
    allowed = {2: {-3, -1, 1, 3}, 4: set(range(-7, 8)), 8: set(range(-127, 128))}[bits]
    assert set(codes.unique().tolist()) <= allowed
    if bits == 2:
        assert set(codes.unique().tolist()) == allowed, "all four int2 levels are in use"


@pytest.mark.parametrize("bits", (4, 2))
def test_low_bit_scale_minimises_squared_error_over_the_grid(bits):
    x = _rows(seed=2)
    codes, scale = quant.quantize(x, bits)
    best = (quant.dequantize(codes, scale) - x).pow(2).sum(-1)
    absmax, rms = x.abs().amax(-1), x.pow(2).mean(-1).sqrt()
    candidates = [absmax / quant.QMAX[bits]] + [torch.minimum(a * rms, absmax) / quant.QMAX[bits]
                                                for a in quant.CLIP_GRID[bits]]
    for s in candidates:
        c, _ = quant.quantize(x, bits, scale=s)
        err = (quant.dequantize(c, s) - x).pow(2).sum(-1)
        assert (best <= err * (1 + 1e-5) + 1e-12).all()
    # and it beats clipping at the absmax on heavy-tailed rows, which is why it exists
    c, _ = quant.quantize(x, bits, scale=candidates[0])
    assert best.sum() < (quant.dequantize(c, candidates[0]) - x).pow(2).sum(-1).sum()


@pytest.mark.parametrize("bits", BITS)
def test_zero_rows_do_not_divide_by_zero(bits):
    x = torch.zeros(3, 16)
    codes, scale = quant.quantize(x, bits)
    assert (scale > 0).all()
    assert quant.dequantize(codes, scale).abs().max() < 1e-30


@pytest.mark.parametrize("bits", BITS)
@given(d=st.integers(1, 70), n=st.integers(1, 5), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_pack_unpack_round_trip(bits, d, n, seed):
    codes, _ = quant.quantize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), bits)
    packed = quant.pack(codes, bits)
    per = 8 // bits
    assert packed.shape == (n, math.ceil(d / per)) if bits < 8 else packed.shape == (n, d)
    assert packed.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert torch.equal(quant.unpack(packed, bits, d), codes)


def test_pack_layout_by_hand():
    # int4: element 0 in the low nibble, two's complement: [1, -2] -> 0xE1
    assert quant.pack(torch.tensor([[1, -2]], dtype=torch.int8), 4).tolist() == [[0xE1]]
    # int2: (code + 3) / 2 at bit 2*i: [-3, -1, 1, 3] -> 0b11_10_01_00
    assert quant.pack(torch.tensor([[-3, -1, 1, 3]], dtype=torch.int8), 2).tolist() == [[0xE4]]
    # padding to whole bytes is never read back
    assert quant.unpack(quant.pack(torch.tensor([[3, -3, 1]], dtype=torch.int8), 2), 2, 3).tolist() == [[3, -3, 1]]


@pytest.mark.parametrize("n", (1, 2, 16, 64, 256))
def test_hadamard_is_orthonormal_and_fwht_matches(n):
    h = quant.hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(quant.fwht(x), x @ h, atol=1e-12)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        quant.fwht(torch.randn(3, 12))


@pytest.mark.parametrize("d", (16, 40, 64, 80, 128))
def test_rotation_preserves_dot_products_and_spreads_outliers(d):
    q = torch.randn(7, d, dtype=torch.float64)
    k = torch.randn(9, d, dtype=torch.float64)
    k[:, 0] *= 50  # an outlier channel
    rq, rk_ = quant.rotate(q), quant.rotate(k)
    assert rq.shape[-1] == quant.padded_dim(d, True) and rq.shape[-1] & (rq.shape[-1] - 1) == 0
    assert torch.allclose(rq @ rk_.T, q @ k.T, atol=1e-9)
    peak = lambda t: (t.abs().amax(-1) / t.pow(2).mean(-1).sqrt()).mean()  # noqa: E731
    assert peak(rk_) < 0.5 * peak(k)


def test_k_smoothing_and_rotation_leave_attention_unchanged():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 33, 40, generator=g, dtype=torch.float64) for _ in range(3))
    k = k + 5 * torch.randn(1, 3, 1, 40, generator=g, dtype=torch.float64)
    base, _ = attention_reference(q, k, v)
    smoothed, _ = attention_reference(q, quant.smooth_k(k), v)
    rotated, _ = attention_reference(quant.rotate(q), quant.rotate(k), v, scale=1 / math.sqrt(40))
    assert torch.allclose(smoothed, base, atol=1e-12)
    assert torch.allclose(rotated, base, atol=1e-12)


@pytest.mark.parametrize("bits", BITS)
def test_quantized_path_is_invariant_to_a_k_channel_offset(bits):
    """With smoothing on, a per-channel offset of K changes nothing the quantizer sees."""
    import raad_kernels as rk
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 50, 64, generator=g) for _ in range(3))
    a = rk.quant_attention(q, k, v, qk_bits=bits, backend="torch")
    b = rk.quant_attention(q, k + 3.0 * torch.randn(1, 2, 1, 64, generator=g), v, qk_bits=bits, backend="torch")
    assert (a - b).abs().max() < 0.02 * a.abs().max()


def test_v_quantization_adds_the_mean_back():
    v = torch.randn(1, 1, 40, 8) + torch.arange(8.0) * 10
    vq = quant.prepare_v(v)
    back = vq.codes.float() * vq.scale[..., None, :] + vq.mean[..., None, :]
    assert ((back - v).abs() <= 0.5 * vq.scale[..., None, :] + 1e-5).all()
