"""raad_kernels.nearest: the CPU kernel and the torch specification against float64 brute force."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raad_kernels import nearest as N

KERNEL = pytest.mark.skipif(N._FUSED_KERNEL is None, reason="the CPU extension is not built")


def _brute(q, b):
    return torch.cdist(q.double(), b.double()).min(1).values.pow(2)


def _case(m, n, c, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(m, c, generator=g) * 2 + offset
    b = torch.randn(n, c, generator=g) * 2
    return q, b


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 70), n=st.integers(1, 200), c=st.integers(1, 40), seed=st.integers(0, 10**6))
def test_reference_matches_brute_force(m, n, c, seed):
    q, b = _case(m, n, c, seed)
    ref = _brute(q, b)
    out = N.nearest_sq_distance_reference(q, b, chunk=16)
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-3 * c)


@KERNEL
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 70), n=st.integers(1, 200), c=st.integers(1, 40), seed=st.integers(0, 10**6))
def test_kernel_matches_brute_force_on_ragged_shapes(m, n, c, seed):
    """M not a multiple of the kernel's 8 rows, N not a multiple of its 64 columns (padded),
    odd channel counts, N = 1 and M = 1."""
    q, b = _case(m, n, c, seed)
    out = N.nearest_sq_distance(q, b)
    assert out.shape == (m,) and torch.isfinite(out).all()
    assert torch.allclose(out.double(), _brute(q, b), rtol=1e-4, atol=1e-3 * c)


@KERNEL
def test_kernel_on_a_memory_sized_problem_with_outlier_channels_and_exact_hits():
    q, b = _case(3000, 2048, 24, 1)
    q[:, 3] *= 30.0   # an outlier channel, as in trained features
    b[:, 3] *= 30.0
    q[::7] = b[torch.arange(0, 3000, 7) % 2048]   # every 7th query is a bank row: distance 0
    out = N.nearest_sq_distance(q, b, N.prepare_bank(b))
    ref = _brute(q, b)
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=0.05)
    assert (out[::7] <= 0.05).all() and (out >= 0).all()
    # the same as the torch specification, float32 both
    assert torch.allclose(out, N.nearest_sq_distance_reference(q, b), rtol=1e-4, atol=0.05)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="query must be"):
        N.nearest_sq_distance(torch.randn(4, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match="N >= 1"):
        N.nearest_sq_distance(torch.randn(4, 3), torch.randn(0, 3))


@KERNEL
def test_the_kernel_checks_its_inputs():
    bank_t, b_sq = N.prepare_bank(torch.randn(10, 3))
    with pytest.raises(ValueError, match="multiple of 64"):
        N._FUSED_KERNEL(torch.randn(4, 3), bank_t[:, :10].contiguous(), b_sq[:10].contiguous())
    with pytest.raises(ValueError, match="at most 512"):
        big_t, big_sq = N.prepare_bank(torch.randn(10, 600))
        N._FUSED_KERNEL(torch.randn(4, 600), big_t, big_sq)
    with pytest.raises(TypeError, match="float32"):
        N._FUSED_KERNEL(torch.randn(4, 3).double(), bank_t, b_sq)


def _int8_kernel():
    """(kernel, why): the extension's VNNI search natively; on a CPU without AVX-512 VNNI the same
    C++ code from the SIMDe-emulated build (tests/emu_builders.py), as the attention tests do."""
    try:
        from raad_kernels._cpu import capabilities
    except ImportError:
        return None, "the CPU extension is not built"
    from emu_builders import avx512_emulated
    caps = capabilities()
    emu, why = avx512_emulated(caps["best_isa"] in ("avx512", "amx"), bool(caps["avx2"]))
    if emu is not None:   # where the CPU lacks VNNI, or with RAAD_CPU_AVX512_EMU=1
        return emu.nearest_sq_distance_i8, ""
    return (N._INT8_KERNEL, "") if N._INT8_KERNEL is not None else (None, why)


INT8, INT8_WHY = _int8_kernel()
INT8_KERNEL = pytest.mark.skipif(INT8 is None, reason=f"no AVX-512 VNNI kernel, native or emulated: {INT8_WHY}")


@pytest.fixture
def int8_kernel(monkeypatch):
    """nearest_sq_distance_int8 calling the kernel of _int8_kernel (the native one unchanged)."""
    monkeypatch.setattr(N, "_INT8_KERNEL", INT8)


def test_the_int8_kernel_is_tested_here():
    """The emulated build must load where it is built (an undefined symbol once went unseen)."""
    assert not INT8_WHY.startswith("BUILD FAILED"), INT8_WHY


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 60), n=st.integers(1, 150), c=st.integers(1, 30), seed=st.integers(0, 10**6))
def test_int8_specification_is_close_to_the_exact_search(m, n, c, seed):
    """Against float64 brute force: the int8 codes move each dot product by at most
    c · (|q|max |b|max / 127) roughly; the distances follow (bounded by that, relative)."""
    q, b = _case(m, n, c, seed)
    prep = N.prepare_bank_int8(b)
    out = N.nearest_sq_distance_int8_reference(q, prep).double()
    exact = _brute(q, b)
    bound = 2 * c * (q.abs().amax(1).double() * float(b.abs().max())) / 127 + 1e-4
    assert (out >= 0).all() and ((out - exact).abs() <= bound).all()


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 1200), n=st.integers(1, 150), c=st.integers(1, 30), seed=st.integers(0, 10**6))
def test_int8_float32_path_is_its_specification(m, n, c, seed):
    """What CPUs without the VNNI kernel run: the float64 specification's result up to float32
    rounding, over row chunks (M past the 512-row chunk, ragged)."""
    q, b = _case(m, n, c, seed)
    prep = N.prepare_bank_int8(b)
    out = N._int8_search_float32(q, prep)
    ref = N.nearest_sq_distance_int8_reference(q, prep)
    assert out.shape == (m,) and (out >= 0).all()
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-4 * (1 + ref.abs().max()))


@INT8_KERNEL
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 70), n=st.integers(1, 200), c=st.integers(1, 40), seed=st.integers(0, 10**6))
def test_int8_kernel_is_its_specification_on_ragged_shapes(int8_kernel, m, n, c, seed):
    """Integer dot products are exact, so the kernel equals the specification up to float32
    rounding of the epilogue; channels not a multiple of 4, rows not of 4, bank not of 64."""
    q, b = _case(m, n, c, seed)
    prep = N.prepare_bank_int8(b)
    out = N.nearest_sq_distance_int8(q, b, prep)
    ref = N.nearest_sq_distance_int8_reference(q, prep)
    assert out.shape == (m,) and torch.isfinite(out).all()
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-4 * (1 + ref.abs().max()))


@INT8_KERNEL
def test_int8_kernel_on_a_memory_sized_problem(int8_kernel):
    """Standardised features (what the memory searches): within 1 % of the exact distances
    (median), and the kernel is its specification; one channel 20x the others coarsens every
    other channel's codes (the documented limit of shared scales)."""
    q, b = _case(2999, 2048, 24, 2)
    prep = N.prepare_bank_int8(b)
    out = N.nearest_sq_distance_int8(q, b, prep)
    assert torch.allclose(out, N.nearest_sq_distance_int8_reference(q, prep), rtol=1e-5, atol=1e-2)
    exact = _brute(q, b)
    assert float(((out.double() - exact).abs() / exact).median()) < 0.01
    q[:, 5] *= 20.0
    b[:, 5] *= 20.0
    coarse = N.nearest_sq_distance_int8(q, b)
    assert float(((coarse.double() - _brute(q, b)).abs() / _brute(q, b)).median()) > 0.05
