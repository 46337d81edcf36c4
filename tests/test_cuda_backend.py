"""The CUDA backend (csrc/cuda, extension raad_kernels._cuda) by docs/design.md's accuracy rule.

Three kinds of test:

* build level, run wherever the extension is built: it imports, exposes its functions, refuses
  CPU tensors with a clear error, and reports itself not runnable without a GPU;
* ``gpu``: the kernels on a real GPU against the ``torch`` emulation and float64 (skipped, with
  conftest's reason, on machines without one);
* emulator, with ``RAAD_CUDA_EMU=1``: the same kernel sources and binding compiled as C++ against
  a host emulator of mma.sync / ldmatrix / cp.async (csrc/cuda/emu), in both code paths (native
  int4 mma as on sm_80/86/89, and int4/int2 unpacked to int8 as on sm_90), on CPU tensors. It
  checks the kernels' index arithmetic and data layouts without a GPU (not speed, not races).
  Building each variant takes minutes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import raad_kernels as rk
from raad_kernels import dispatch, quant
from raad_kernels.reference import MAP_NAMES, attention_reference
from raad_kernels.testing import check_accuracy, check_maps, check_maps_agree, error, make_qkv, poison_

try:
    from raad_kernels import _cuda
    _IMPORT_ERROR = None
except ImportError as e:  # not built on this machine
    _cuda = None
    _IMPORT_ERROR = str(e)

needs_ext = pytest.mark.skipif(_cuda is None, reason=f"CUDA extension not built: {_IMPORT_ERROR}")
HAS_GPU = torch.cuda.is_available()
RUN_EMU = os.environ.get("RAAD_CUDA_EMU") == "1"
emu_only = pytest.mark.skipif(not RUN_EMU, reason="set RAAD_CUDA_EMU=1 to run the kernels in the host "
                                                  "emulator (builds for minutes)")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMBOS = [(qk, pv) for qk in (8, 4, 2) for pv in (8, 16)]


# --------------------------------------------------------------------------------------------
# A kernel runner shared by the GPU and the emulator tests
# --------------------------------------------------------------------------------------------
class Kern:
    """Calls the extension's ``attention`` binding (real or emulated) like the backend does."""

    def __init__(self, name, mod, device):
        self.name, self.mod, self.device = name, mod, torch.device(device)

    def attention(self, q, k, v, qk_bits, pv_bits, *, scale=None, attn_mask=None, smooth_k=True,
                  rotate=None, maps=(), out=None):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        rotate = quant.default_rotate(qk_bits) if rotate is None else rotate
        o, cls, rec, ent = self.mod.attention(q, k, v, qk_bits, pv_bits, scale, attn_mask, smooth_k,
                                              rotate, "cls" in maps, "received" in maps,
                                              "entropy" in maps, out)
        got = {"cls": cls, "received": rec, "entropy": ent}
        return o, {n: got[n] for n in maps}


# Agreement with the emulation of the same arithmetic (beyond the float64 rule): P is quantized
# against the running row maximum in a flash kernel, the emulation against the final one, so
# 8-bit P·V differs by its rounding; 16-bit P·V only by fp16/bf16 rounding of P.
EMU_TOL = {8: 2e-2, 16: 2e-3}
OUT_EPS = {torch.float32: 0.0, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def run_case(kern: Kern, q, k, v, qk_bits, pv_bits, *, floor=True, maps=MAP_NAMES, **kw):
    """Poisoned out= → kernel → checks against the torch emulation and float64. Returns errors."""
    dev = kern.device
    q, k, v = q.to(dev), k.to(dev), v.to(dev)
    if kw.get("attn_mask") is not None:
        kw["attn_mask"] = kw["attn_mask"].to(dev)
    out = poison_(torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=dev))
    o, got = kern.attention(q, k, v, qk_bits, pv_bits, maps=maps, out=out, **kw)
    assert o.data_ptr() == out.data_ptr(), "out= must be written in place"
    assert torch.isfinite(out).all(), f"{kern.name}: {torch.isnan(out).sum().item()} elements unwritten/NaN"
    emu, emaps = rk.quant_attention(q, k, v, qk_bits=qk_bits, pv_bits=pv_bits, backend="torch",
                                    return_maps=MAP_NAMES, scale=kw.get("scale"),
                                    attn_mask=kw.get("attn_mask"), smooth_k=kw.get("smooth_k", True),
                                    rotate=kw.get("rotate"))
    ref, rmaps = attention_reference(q, k, v, scale=kw.get("scale"), attn_mask=kw.get("attn_mask"),
                                     return_maps=MAP_NAMES)
    what = f"{kern.name} qk{qk_bits}/pv{pv_bits} {q.dtype}"
    e, er = check_accuracy(out, emu, ref, qk_bits, what=what, floor=floor)
    if floor:
        d = error(out, emu.double())
        assert d.rel_l2 <= EMU_TOL[pv_bits] + OUT_EPS[q.dtype], f"{what}: vs emulation {d}"
    if maps:
        assert set(got) == set(maps)
        for n in maps:  # on the output's device (cuda:0, not the index-less "cuda" asked for)
            assert got[n].device == out.device
        check_maps({n: got[n] for n in maps}, emaps, {n: rmaps[n] for n in maps}, qk_bits, what=what,
                   floor=floor)
        check_maps_agree({n: got[n] for n in maps}, emaps, what=what)
    return e, er


# --------------------------------------------------------------------------------------------
# Build level (no GPU needed)
# --------------------------------------------------------------------------------------------
@needs_ext
def test_extension_exposes_its_functions():
    for name in ("device_count", "kernel_binary_version", "quantize", "attention"):
        assert callable(getattr(_cuda, name)), name
    assert _cuda.emulated is False
    assert isinstance(_cuda.device_count(), int)
    if not HAS_GPU:
        assert _cuda.device_count() == 0


@needs_ext
def test_cpu_tensors_get_a_clear_error():
    q, k, v = make_qkv(1, 1, 8, 16)
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        _cuda.attention(q, k, v, 8, 16, 0.25)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        _cuda.quantize(q, 4, True, False)


@needs_ext
@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU status")
def test_status_without_gpu_and_explicit_backend_refused():
    from raad_kernels import cuda_backend
    st = cuda_backend.status()
    assert st.built and not st.runnable and "no CUDA GPU" in st.reason
    assert not cuda_backend.supports(torch.device("cpu"))
    q, k, v = make_qkv(1, 1, 8, 16)
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        rk.quant_attention(q, k, v, backend="cuda")


def test_auto_prefers_triton_until_cuda_is_verified_on_a_gpu():
    assert dispatch.CUDA_VERIFIED_ON_GPU is False
    assert dispatch._auto_order(torch.device("cuda"))[0] == "triton"


# --------------------------------------------------------------------------------------------
# On a GPU
# --------------------------------------------------------------------------------------------
def _gpu_kern():
    if _cuda is None:
        pytest.skip(f"CUDA extension not built: {_IMPORT_ERROR}")
    from raad_kernels import cuda_backend
    st = cuda_backend.status()
    if not st.runnable:
        pytest.fail(f"a GPU is visible but the cuda backend is not runnable: {st.reason}")
    return Kern("cuda", _cuda, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [16, 32, 40, 64, 80, 128, 256])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("qk_bits,pv_bits", COMBOS)
def test_gpu_realistic(qk_bits, pv_bits, dtype, d):
    q, k, v = make_qkv(2, 3, 197, d, dtype=DTYPES[dtype], seed=d * 7 + qk_bits)
    run_case(_gpu_kern(), q, k, v, qk_bits, pv_bits, maps=MAP_NAMES if d in (40, 64) else ())


@pytest.mark.gpu
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("qk_bits,pv_bits", COMBOS)
def test_gpu_adversarial(qk_bits, pv_bits, d):
    q, k, v = make_qkv(2, 2, 150, d, adversarial=True, seed=d + qk_bits)
    run_case(_gpu_kern(), q, k, v, qk_bits, pv_bits, floor=False)


@pytest.mark.gpu
@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 300), (300, 1), (63, 64), (64, 65), (65, 129), (37, 101),
                                   (129, 1000)])
@pytest.mark.parametrize("qk_bits,pv_bits", [(8, 8), (4, 16), (2, 8)])
def test_gpu_ragged_lengths(nq, nk, qk_bits, pv_bits):
    q, k, v = make_qkv(2, 2, nq, 64, nk=nk, dv=48, seed=nq + nk)
    run_case(_gpu_kern(), q, k, v, qk_bits, pv_bits, floor=nk > 1)


@pytest.mark.gpu
@pytest.mark.parametrize("d,dv", [(64, 32), (40, 80), (128, 256), (256, 16), (20, 20)])
def test_gpu_value_dim_differs(d, dv):
    q, k, v = make_qkv(1, 2, 90, d, dv=dv, seed=d + dv)
    for qk_bits, pv_bits in [(8, 16), (4, 8), (2, 16)]:
        run_case(_gpu_kern(), q, k, v, qk_bits, pv_bits)


@pytest.mark.gpu
@pytest.mark.parametrize("qk_bits,pv_bits", COMBOS)
@pytest.mark.parametrize("rotate,smooth_k", [(False, True), (True, False), (False, False)])
def test_gpu_rotation_and_smoothing_switches(qk_bits, pv_bits, rotate, smooth_k):
    q, k, v = make_qkv(1, 2, 100, 40, seed=5)
    run_case(_gpu_kern(), q, k, v, qk_bits, pv_bits, rotate=rotate, smooth_k=smooth_k, floor=False)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bool_full", "bool_keys", "bool_2d", "additive", "additive_half"])
@pytest.mark.parametrize("qk_bits,pv_bits", [(8, 8), (4, 16), (2, 8)])
def test_gpu_masks(kind, qk_bits, pv_bits):
    b, h, n = 2, 3, 77
    q, k, v = make_qkv(b, h, n, 64, seed=9)
    g = torch.Generator().manual_seed(1)
    if kind == "bool_full":
        mask = torch.rand(b, h, n, n, generator=g) > 0.3
        mask[..., 0] = True
        mask[0, 1, 5] = False  # one fully masked row: zeros, no NaN
    elif kind == "bool_keys":  # key padding (B, 1, 1, Nk)
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
        mask[..., 60:] = False
    elif kind == "bool_2d":
        mask = torch.ones(n, n, dtype=torch.bool).tril()
    elif kind == "additive":
        mask = torch.randn(1, h, n, n, generator=g)
    else:
        mask = torch.randn(n, n, generator=g).half()
    run_case(_gpu_kern(), q, k, v, qk_bits, pv_bits, attn_mask=mask)
    if kind == "bool_full":
        o, _ = _gpu_kern().attention(q.cuda(), k.cuda(), v.cuda(), qk_bits, pv_bits, attn_mask=mask.cuda())
        assert (o[0, 1, 5] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("names", [("cls",), ("received",), ("entropy",), ("cls", "entropy"), MAP_NAMES])
def test_gpu_map_subsets(names):
    q, k, v = make_qkv(2, 2, 150, 64, nk=170, seed=3)
    run_case(_gpu_kern(), q, k, v, 4, 8, maps=names)


@pytest.mark.gpu
def test_gpu_through_the_api_and_backend_module():
    from raad_kernels import cuda_backend
    assert cuda_backend.status().runnable and cuda_backend.supports(torch.device("cuda"))
    q, k, v = (t.cuda() for t in make_qkv(2, 3, 197, 64, dtype=torch.float16, seed=2))
    out, maps = rk.quant_attention(q, k, v, qk_bits=4, pv_bits=8, backend="cuda", return_maps=True)
    assert out.dtype == torch.float16 and out.is_cuda and set(maps) == set(MAP_NAMES)
    poisoned = poison_(torch.empty_like(out))
    o2, _ = cuda_backend.attention(q, k, v, qk_bits=4, pv_bits=8, scale=1 / 8, out=poisoned)
    assert o2 is poisoned and torch.isfinite(o2).all()
    # non-contiguous inputs (a transposed view) give the same result
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    o3 = rk.quant_attention(qt, k, v, qk_bits=4, pv_bits=8, backend="cuda")
    assert torch.equal(o3, out)
    with pytest.raises(ValueError, match="head dims up to 256"):
        cuda_backend.attention(*(torch.randn(1, 1, 4, 300, device="cuda") for _ in range(3)),
                               qk_bits=8, pv_bits=8, scale=0.1)


@pytest.mark.gpu
def test_gpu_deterministic_output():
    """The forward kernel has no atomics: the same call twice gives bit-identical output (a race
    shows up as run-to-run differences)."""
    kern = _gpu_kern()
    q, k, v = (t.cuda() for t in make_qkv(4, 6, 785, 64, seed=4))
    for qk_bits, pv_bits in COMBOS:
        a, _ = kern.attention(q, k, v, qk_bits, pv_bits)
        b, _ = kern.attention(q, k, v, qk_bits, pv_bits)
        assert torch.equal(a, b), (qk_bits, pv_bits)


@pytest.mark.gpu
@pytest.mark.parametrize("keep_maps", [False, True])
def test_gpu_cuda_graph_capture_replays_eager(keep_maps):
    """QuantAttention (nn.MultiheadAttention taken over, backend cuda) captured in a CUDA graph
    and replayed on new inputs gives the eager result: no host sync or foreign allocation on
    the path (a capture fails on either)."""
    _gpu_kern()
    from raad_kernels.testing import check_cuda_graph_replay
    check_cuda_graph_replay("cuda", keep_maps)


@pytest.mark.gpu
@pytest.mark.parametrize("n,d", [(4097, 64), (1025, 128)])
def test_gpu_long_sequences(n, d):
    q, k, v = make_qkv(1, 2, n, d, seed=n)
    for qk_bits, pv_bits in [(8, 8), (8, 16), (4, 8)]:
        run_case(_gpu_kern(), q, k, v, qk_bits, pv_bits, maps=MAP_NAMES)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("d", [16, 40, 64, 80, 128, 256])
@pytest.mark.parametrize("rotate,smooth", [(False, False), (True, True), (False, True)])
def test_gpu_quantize_matches_spec(bits, d, rotate, smooth):
    x = make_qkv(2, 2, 50, d, seed=d)[1].cuda()
    codes, scales = _gpu_kern().mod.quantize(x, bits, rotate, smooth)
    _check_quantize(codes, scales, x, bits, rotate, smooth)


def _check_quantize(codes, scales, x, bits, rotate, smooth):
    xs = quant.smooth_k(x.float()) if smooth else x.float()
    if rotate:
        xs = quant.rotate(xs)
    ref_codes, ref_scales = quant.quantize(xs, bits)
    packed = quant.pack(ref_codes, bits)
    packed = packed.view(torch.uint8) if bits == 8 else packed
    nbytes = packed.shape[-1]
    torch.testing.assert_close(scales, ref_scales, rtol=1e-5, atol=0)
    # identical up to rounding ties flipped by a different float summation order
    assert (codes[..., :nbytes] != packed).float().mean().item() <= 1e-3
    if bits != 2:
        assert (codes[..., nbytes:] == 0).all(), "padding beyond the quantized dim must be zero codes"


@pytest.mark.gpu
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), h=st.integers(1, 3), nq=st.integers(1, 300), nk=st.integers(2, 300),
       d=st.integers(16, 256), dv=st.integers(1, 256), bits=st.sampled_from(COMBOS),
       dtype=st.sampled_from(list(DTYPES)))
def test_gpu_hypothesis_shapes(b, h, nq, nk, d, dv, bits, dtype):
    q, k, v = make_qkv(b, h, nq, d, nk=nk, dv=dv, dtype=DTYPES[dtype], seed=nq * 1000 + nk)
    run_case(_gpu_kern(), q, k, v, *bits, floor=False, maps=("cls", "entropy"))


# --------------------------------------------------------------------------------------------
# In the host emulator (RAAD_CUDA_EMU=1)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["native_s4", "unpacked_s4"])
def emu(request):
    from emu_builders import load_builder
    mod = load_builder("cuda/emu/build_emu.py")
    return Kern(f"emu[{request.param}]", mod.build(no_s4=request.param == "unpacked_s4"), "cpu")


@pytest.mark.slow
@emu_only
@pytest.mark.parametrize("qk_bits,pv_bits", COMBOS)
@pytest.mark.parametrize("d", [16, 64, 80, 256])
def test_emu_accuracy(emu, qk_bits, pv_bits, d):
    q, k, v = make_qkv(1, 2, 37, d, nk=70, seed=d + qk_bits)
    run_case(emu, q, k, v, qk_bits, pv_bits, maps=MAP_NAMES if d == 64 else ())


@pytest.mark.slow
@emu_only
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_emu_half_inputs(emu, dtype):
    q, k, v = make_qkv(1, 2, 33, 64, nk=65, dtype=DTYPES[dtype], seed=1)
    for qk_bits, pv_bits in [(8, 16), (4, 8), (2, 16)]:
        run_case(emu, q, k, v, qk_bits, pv_bits, maps=())


@pytest.mark.slow
@emu_only
def test_emu_int2_without_rotation_masks_padding_columns(emu):
    q, k, v = make_qkv(1, 1, 20, 40, nk=67, seed=2)  # quantized dim 40 inside the 64 bucket
    run_case(emu, q, k, v, 2, 8, rotate=False, floor=False, maps=())
    run_case(emu, q, k, v, 4, 16, rotate=False, floor=False, maps=())


@pytest.mark.slow
@emu_only
def test_emu_masks_and_fully_masked_row(emu):
    q, k, v = make_qkv(1, 2, 40, 32, nk=90, seed=4)
    keep = torch.rand(1, 2, 40, 90, generator=torch.Generator().manual_seed(0)) > 0.3
    keep[..., 0] = True
    keep[0, 0, 5] = False
    run_case(emu, q, k, v, 8, 16, attn_mask=keep)
    o, _ = emu.attention(q, k, v, 8, 16, attn_mask=keep)
    assert (o[0, 0, 5] == 0).all()
    run_case(emu, q, k, v, 4, 8, attn_mask=torch.randn(40, 90), maps=("received",))


@pytest.mark.slow
@emu_only
def test_emu_edges(emu):
    q, k, v = make_qkv(1, 1, 1, 64, nk=1, seed=6)
    run_case(emu, q, k, v, 8, 8, floor=False)
    q, k, v = make_qkv(1, 2, 3, 64, nk=130, dv=24, seed=8)
    run_case(emu, q, k, v, 2, 16, maps=("cls", "received"))


@pytest.mark.slow
@emu_only
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_emu_quantize_matches_spec(emu, bits):
    for d in (16, 40, 64, 80, 128):
        for rotate, smooth in [(False, False), (True, True), (False, True)]:
            x = make_qkv(1, 2, 13, d, seed=d + bits)[1]
            codes, scales = emu.mod.quantize(x, bits, rotate, smooth)
            _check_quantize(codes, scales, x, bits, rotate, smooth)

