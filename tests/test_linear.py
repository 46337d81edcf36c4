"""W8A8 linears (raad_kernels.linear): the fast path against the float64 specification, the
module's mirroring and training path, model swapping and the plan's ``linears`` section."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import raad_kernels as rk
from raad_kernels.linear import (QuantLinear, int8_linear, int8_linear_reference, quantize_linears,
                                 quantize_rows_int8)
from raad_kernels.plan import PlanError


def activations(m, k, *, seed=0, outliers=2, gain=20.0, dtype=torch.float32):
    """Transformer-like activations: Gaussian tokens with a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if outliers and k > outliers:
        idx = torch.randperm(k, generator=g)[:outliers]
        x[:, idx] *= gain
    return x.to(dtype)


def linear(k, n, *, seed=1, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


def errors(y, ref):
    y, ref = y.double().flatten(), ref.double().flatten()
    return F.cosine_similarity(y, ref, dim=0).item(), ((y - ref).norm() / ref.norm()).item()


# --------------------------------------------------------------------------------------------
# The quantizer
# --------------------------------------------------------------------------------------------

def test_row_quantizer_codes_scales_and_zero_rows():
    x = activations(33, 40)
    x[5] = 0.0
    codes, scale = quantize_rows_int8(x)
    assert codes.dtype == torch.int8 and scale.shape == (33, 1)
    assert codes.abs().max() == 127                          # each nonzero row reaches the top code
    assert (codes.abs().amax(dim=1)[torch.arange(33) != 5] == 127).all()
    assert scale[5].item() == 1.0 and (codes[5] == 0).all()
    err = (codes.float() * scale - x).abs()
    assert (err <= scale / 2 + 1e-6).all()                   # round to nearest


# --------------------------------------------------------------------------------------------
# The fast path equals the specification; the specification is close to float64
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["fused", "torch"])
@pytest.mark.parametrize("m, k, n", [(1, 3, 5), (2056, 128, 384), (257, 256, 128), (17, 80, 40), (5, 1, 7)])
def test_int8_linear_equals_the_specification(monkeypatch, path, m, k, n):
    """Both CPU paths: the extension's fused quantize / _int_mm / epilogue, and plain torch ops."""
    monkeypatch.setenv("RAAD_LINEAR_FUSED", "1" if path == "fused" else "0")
    x = activations(m, k, outliers=min(2, k - 1))
    lin = linear(k, n)
    codes, scale = quantize_rows_int8(lin.weight.detach())
    y = int8_linear(x, codes.t(), scale.reshape(-1), lin.bias.detach())
    spec = int8_linear_reference(x, lin.weight.detach(), lin.bias.detach())
    assert y.dtype == torch.float32 and y.shape == (m, n) and torch.isfinite(y).all()
    # integer sums are exact on both sides: only the float32 scaling differs
    torch.testing.assert_close(y.double(), spec, rtol=2e-6, atol=2e-6 * spec.abs().max().item())


@pytest.mark.parametrize("path", ["fused", "torch"])
@pytest.mark.parametrize("k", [1040, 1041, 20000])
def test_int8_linear_sums_stay_exact_where_partial_sums_pass_2_to_the_24(monkeypatch, path, k):
    """Without VNNI the fused kernel multiplies the codes as an fp32 GEMM, exact only while
    127² K < 2^24 (K <= 1040); longer rows must take the integer GEMM. Codes ±127 whose partial
    sums reach 127² K / 2 but cancel to 2·127² or 3·127² would show any rounding as a wrong result
    (an fp32 GEMM of them is 4 off at K = 20000). Both CPU paths take the same route."""
    monkeypatch.setenv("RAAD_LINEAR_FUSED", "1" if path == "fused" else "0")
    x = torch.ones(3, k)
    w = torch.ones(5, k)
    w[:, (k + 1) // 2:] = -1.0
    w[:, -1] = 1.0                                  # the sums: 127² (2 + K mod 2)
    codes, scale = quantize_rows_int8(w)
    y = int8_linear(x, codes.t(), scale.reshape(-1))
    spec = int8_linear_reference(x, w)
    assert spec.abs().min() > 0
    torch.testing.assert_close(y.double(), spec, rtol=1e-6, atol=0)


def _cpu_ext():
    try:
        from raad_kernels import _cpu
    except ImportError:
        return None
    return _cpu


_CPU = _cpu_ext()
_HAS_AMX_GEMM = _CPU is not None and _CPU.capabilities()["linear_gemm"] == "amx"


@pytest.mark.skipif(not _HAS_AMX_GEMM, reason="the AMX tile GEMM runs only where the CPU has AMX-INT8 "
                    "and it is the active ISA (RAAD_CPU_ISA unset or 'amx')")
@pytest.mark.parametrize("m, k, n", [(1, 2, 3), (1, 100, 50), (31, 64, 32), (33, 65, 17), (37, 130, 385),
                                     (257, 128, 384), (2056, 384, 128), (7, 1100, 9), (64, 3000, 64)])
def test_amx_gemm_equals_int_mm_bit_for_bit(m, k, n):
    """The AMX tile kernel against oneDNN's _int_mm on ragged shapes (row tails, K not a
    multiple of 64, N not a multiple of 32, a non-contiguous weight view): the integer sums are
    exact on both sides and the scaling is the same float32 operations, so the outputs must be
    equal bit for bit; and both are close to the float64 specification."""
    x = activations(m, k, outliers=min(2, k - 1), gain=40.0)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(k))
    codes, scale = quantize_rows_int8(w)
    codes_t = codes.t()                       # a view: strides (1, k)
    bias = torch.randn(n)
    for b in (bias, None):
        amx = _CPU.linear_int8(x, codes_t, scale.reshape(-1), b, gemm="amx")
        ref = _CPU.linear_int8(x, codes_t.contiguous(), scale.reshape(-1), b, gemm="int_mm")
        assert torch.isfinite(amx).all()
        assert torch.equal(amx, ref), (amx - ref).abs().max()
        spec = int8_linear_reference(x, w, b)
        torch.testing.assert_close(amx.double(), spec, rtol=2e-6, atol=2e-6 * spec.abs().max().item())


@pytest.mark.skipif(not _HAS_AMX_GEMM, reason="the AMX tile GEMM runs only where the CPU has AMX-INT8")
def test_amx_gemm_extreme_codes_exact():
    """Codes at +-127 in every position, K long: partial sums far beyond 2^24 that cancel; any
    wrong lane, step or padding in the tile layout shows as a wrong integer."""
    k = 20000
    x = torch.ones(35, k)
    x[1::2] = -1.0
    w = torch.ones(40, k)
    w[:, (k + 1) // 2:] = -1.0
    w[::3, -7:] = 1.0
    codes, scale = quantize_rows_int8(w)
    amx = _CPU.linear_int8(x, codes.t(), scale.reshape(-1), gemm="amx")
    exact = x.double() @ codes.double().t()   # x codes are +-127: x = 127 * (1/127) exactly scaled
    y_int = (amx.double() / scale.reshape(-1).double()).round()
    assert torch.equal(y_int, exact * 1.0), (y_int - exact).abs().max()


def test_fused_kernel_gemm_choice_is_checked():
    if _CPU is None:
        pytest.skip("the CPU extension is not built")
    x, (codes, scale) = torch.randn(4, 8), quantize_rows_int8(torch.randn(6, 8))
    with pytest.raises(ValueError, match="gemm must be None, 'amx', 'int_mm' or 'fp32'"):
        _CPU.linear_int8(x, codes.t(), scale.reshape(-1), gemm="mkl")
    with pytest.raises(ValueError, match="gemm='fp32' is exact only for in_features <= 1040"):
        _CPU.linear_int8(torch.randn(4, 1100), torch.zeros(1100, 6, dtype=torch.int8), scale.reshape(-1),
                         gemm="fp32")
    if not _HAS_AMX_GEMM:
        with pytest.raises(ValueError, match="gemm='amx' needs AMX-INT8"):
            _CPU.linear_int8(x, codes.t(), scale.reshape(-1), gemm="amx")
    # the paths this CPU has all agree (fp32 on codes is exact for K <= 1040)
    outs = [_CPU.linear_int8(x, codes.t(), scale.reshape(-1), gemm=g)
            for g in (["amx"] if _HAS_AMX_GEMM else []) + ["int_mm", "fp32"]]
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_int8_linear_accuracy_against_float64_with_outlier_channels():
    x = activations(512, 128, outliers=3, gain=30.0)
    lin = linear(128, 256)
    exact = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    cos, rel = errors(QuantLinear(lin)(x), exact)
    assert cos >= 0.999 and rel <= 0.03, (cos, rel)
    # and it is a quantization: not the float result itself
    assert rel > 1e-4


def test_int8_linear_poisoned_output_not_reused():
    # the output is a fresh tensor: NaNs in a previous result cannot leak into the next one
    lin = linear(64, 32)
    q = QuantLinear(lin)
    x = activations(20, 64)
    y1 = q(x)
    y1.fill_(float("nan"))
    y2 = q(x)
    assert torch.isfinite(y2).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 70), k=st.integers(1, 130), n=st.integers(1, 90), lead=st.sampled_from([(), (2,), (2, 3)]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_shapes_and_dtypes_hypothesis(m, k, n, lead, dtype, bias, seed):
    x = activations(m * (1 if not lead else int(torch.tensor(lead).prod())), k, seed=seed,
                    outliers=min(2, k - 1)).reshape(*lead, m, k).to(dtype)
    lin = linear(k, n, seed=seed, bias=bias)
    y = QuantLinear(lin)(x)
    assert y.shape == (*lead, m, n) and y.dtype == dtype and torch.isfinite(y).all()
    spec = int8_linear_reference(x.reshape(-1, k), lin.weight.detach(),
                                 None if lin.bias is None else lin.bias.detach()).reshape(*lead, m, n)
    tol = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(y.double(), spec, rtol=tol, atol=tol * max(spec.abs().max().item(), 1e-6))


# --------------------------------------------------------------------------------------------
# The module: mirroring, weight cache, training path, errors
# --------------------------------------------------------------------------------------------

def test_module_mirrors_the_float_linear_and_state_dicts_load_both_ways():
    lin = linear(24, 16)
    q = QuantLinear(lin)
    assert q.weight is lin.weight and q.bias is lin.bias
    assert set(q.state_dict()) == set(lin.state_dict()) == {"weight", "bias"}
    other = linear(24, 16, seed=9)
    q.load_state_dict(other.state_dict())
    assert torch.equal(lin.weight, other.weight)             # loading one loads the other
    assert q.to_float() is lin


def test_weight_cache_follows_in_place_updates():
    lin = linear(32, 8)
    q = QuantLinear(lin).eval()
    x = activations(10, 32)
    with torch.no_grad():
        y0 = q(x)
        lin.weight.mul_(-2.0)                                 # an optimizer step does this in place
        y1 = q(x)
    ref1 = int8_linear_reference(x, lin.weight.detach(), lin.bias.detach())
    torch.testing.assert_close(y1.double(), ref1, rtol=2e-6, atol=1e-5)
    assert not torch.allclose(y0, y1)


def test_training_path_is_the_same_arithmetic_with_straight_through_gradients():
    lin = linear(48, 20)
    q = QuantLinear(lin)
    x = activations(30, 48).requires_grad_(True)
    y_train = q(x)
    with torch.no_grad():
        y_inf = q(x)
    torch.testing.assert_close(y_train, y_inf, rtol=1e-5, atol=1e-5)
    y_train.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    # straight-through: the gradient is the float layer's gradient at the quantized values
    xq = (quantize_rows_int8(x.detach())[0].float() * quantize_rows_int8(x.detach())[1])
    wq = quantize_rows_int8(lin.weight.detach())
    wq = wq[0].float() * wq[1]
    g = 2 * y_inf
    torch.testing.assert_close(x.grad, g @ wq, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lin.weight.grad, g.t() @ xq, rtol=1e-4, atol=1e-3)


def test_fused_kernel_refuses_bad_arguments():
    from raad_kernels import _cpu
    x = torch.randn(4, 8)
    codes, scale = quantize_rows_int8(torch.randn(6, 8))
    ok = (x, codes.t(), scale.reshape(-1))
    assert _cpu.linear_int8(*ok).shape == (4, 6)
    with pytest.raises(TypeError, match="x must be float32"):
        _cpu.linear_int8(x.double(), *ok[1:])
    with pytest.raises(ValueError, match="w_codes_t must be \\(8, out_features\\)"):
        _cpu.linear_int8(x, codes, scale.reshape(-1))
    with pytest.raises(ValueError, match="bias must be a contiguous float32 \\(6,\\)"):
        _cpu.linear_int8(*ok, torch.zeros(5))
    with pytest.raises(ValueError, match="K = 1"):
        _cpu.linear_int8(torch.randn(4, 1), torch.zeros(1, 6, dtype=torch.int8), scale.reshape(-1))


def test_bad_inputs_name_the_problem():
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear(nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="linear bits must be one of"):
        QuantLinear(linear(4, 4), bits=4)
    with pytest.raises(ValueError, match="last dim is 5, the layer takes 4"):
        QuantLinear(linear(4, 4))(torch.randn(3, 5))
    with pytest.raises(TypeError, match="QuantLinear\\(linear\\)"):
        quantize_linears(linear(4, 4))


# --------------------------------------------------------------------------------------------
# Swapping a model; plans
# --------------------------------------------------------------------------------------------

timm = pytest.importorskip("timm")


def tiny_vit(depth=2):
    torch.manual_seed(0)
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=depth, num_heads=2, num_classes=10).eval()


def test_quantize_linears_under_prefixes_and_filter():
    m = tiny_vit()
    names = quantize_linears(m, 8, under=["blocks.1"], filter_fn=lambda n, mod: "mlp" in n)
    assert names == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert isinstance(m.blocks[1].mlp.fc1, QuantLinear) and type(m.blocks[0].mlp.fc1) is nn.Linear
    assert type(m.head) is nn.Linear
    with pytest.raises(PlanError, match="'blok.1'.*nearest names: blocks"):
        quantize_linears(m, 8, under=["blok.1"])


def test_plan_linears_section_end_to_end(tmp_path):
    m = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
    plan = {"version": 1, "layers": {"blocks.0.attn": {"qk_bits": 8, "pv_bits": 8},
                                     "blocks.1.attn": {"qk_bits": 4, "pv_bits": 8}},
            "linears": {"bits": 8, "under": ["blocks"]}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    keys = set(m.state_dict())
    m = rk.quantize_model(m, str(path))
    assert m.raad_report.linears == [f"blocks.{i}.{p}" for i in range(2)
                                     for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert set(m.state_dict()) == keys
    with torch.no_grad():
        y = m(x)
    cos, _ = errors(y, ref)
    assert 0.99 <= cos < 1.0
    # the report writes the section back
    saved = rk.load_plan(rk.save_plan(m, tmp_path / "again.json"))
    assert saved["linears"] == {"bits": 8, "under": m.raad_report.linears}


def test_quantize_model_linear_bits_keyword():
    m = rk.quantize_model(tiny_vit(), 8, linear_bits=8)
    assert len(m.raad_report.linears) == 9            # 4 per block and the head
    with pytest.raises(ValueError, match="linear bits must be one of"):
        rk.quantize_model(tiny_vit(), 8, linear_bits=4)


@pytest.mark.parametrize("linears, match", [
    ({"bits": 4}, "bits must be one of"),
    ({"bits": 8, "under": "blocks"}, "under must be a list"),
    ({"bits": 8, "scope": ["blocks"]}, "unknown key"),
    ([8], "must be an object"),
])
def test_plan_linears_section_errors(linears, match):
    with pytest.raises(PlanError, match=match):
        rk.load_plan({"version": 1, "layers": {}, "linears": linears})


def test_plan_with_a_wrong_prefix_changes_nothing():
    m = tiny_vit()
    before = copy.deepcopy(m)
    plan = {"version": 1, "layers": {"blocks.0.attn": {"qk_bits": 8, "pv_bits": 8}},
            "linears": {"bits": 8, "under": ["student.blocks"]}}
    with pytest.raises(PlanError, match="linears.under names module 'student.blocks'"):
        rk.quantize_model(m, plan)
    assert [type(a) for a in m.modules()] == [type(a) for a in before.modules()]


@pytest.mark.gpu
@pytest.mark.parametrize("m, k, n", [(2056, 128, 384), (8, 64, 40), (33, 3, 5)])
def test_int8_linear_on_cuda_equals_the_specification(m, k, n):
    """On a GPU: cuBLASLt's _int_mm where its shapes allow, the float64 fallback elsewhere."""
    x = activations(m, k, outliers=min(2, k - 1)).cuda()
    lin = linear(k, n).cuda()
    y = QuantLinear(lin)(x)
    spec = int8_linear_reference(x.cpu(), lin.weight.detach().cpu(), lin.bias.detach().cpu())
    assert y.is_cuda and torch.isfinite(y).all()
    torch.testing.assert_close(y.double().cpu(), spec, rtol=2e-6, atol=2e-6 * spec.abs().max().item())


def test_compile_fullgraph_and_export_run_the_same_arithmetic():
    """The fused CPU kernel is a custom op (opaque to the compiler), the weight quantized in the
    graph: torch.compile(fullgraph=True) and torch.export give the eager result."""
    lin = linear(64, 48)
    q = QuantLinear(lin).eval()
    x = activations(300, 64)
    with torch.no_grad():
        ref = q(x)
        y = torch.compile(q, fullgraph=True)(x)
        e = torch.export.export(q, (x,)).module()(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(e, ref, rtol=0, atol=0)
