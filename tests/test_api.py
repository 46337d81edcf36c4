"""Public API: input errors name the argument and what is allowed; backend selection."""

import pytest
import torch

import raad_kernels as rk
from raad_kernels import dispatch


def qkv(b=1, h=2, n=8, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3))


def test_backends_report_built_and_runnable_with_reasons():
    st = rk.backends()
    assert set(st) == {"cuda", "triton", "cpu", "torch"}
    for name, s in st.items():
        assert isinstance(s, rk.BackendStatus) and isinstance(s.reason, str) and s.reason
        assert bool(s) == s.runnable
        assert not s.runnable or s.built
    assert st["torch"].runnable


def test_return_maps_forms():
    q, k, v = qkv()
    out = rk.quant_attention(q, k, v, backend="torch")
    assert isinstance(out, torch.Tensor)
    out2, maps = rk.quant_attention(q, k, v, backend="torch", return_maps=True)
    assert set(maps) == {"cls", "received", "entropy"} and torch.equal(out, out2)
    _, maps = rk.quant_attention(q, k, v, backend="torch", return_maps="entropy")
    assert set(maps) == {"entropy"}


def test_auto_on_cpu_tensors_picks_a_runnable_cpu_backend():
    mod = dispatch.select("auto", torch.device("cpu"))
    assert mod.status().runnable and mod.supports(torch.device("cpu"))


@pytest.mark.parametrize("name", ["cuda", "triton", "cpu"])
def test_requested_backend_that_cannot_run_says_why(name):
    st = rk.backends()[name]
    q, k, v = qkv()
    try:  # cuda/triton on a GPU machine are runnable, but not on these CPU tensors
        dispatch.select(name, torch.device("cpu"))
    except (RuntimeError, ValueError):
        pass
    else:
        pytest.skip(f"{name} runs CPU tensors here: {st.reason}")
    with pytest.raises((RuntimeError, ValueError), match=name):
        rk.quant_attention(q, k, v, backend=name)


# ---- one test per input error ------------------------------------------------------------------

def test_qk_bits_outside_allowed():
    with pytest.raises(ValueError, match=r"qk_bits must be one of \(2, 4, 8\), got 3"):
        rk.quant_attention(*qkv(), qk_bits=3)


def test_qk_bits_not_an_int():
    with pytest.raises(TypeError, match="qk_bits must be an int"):
        rk.quant_attention(*qkv(), qk_bits=8.0)
    with pytest.raises(TypeError, match="qk_bits must be an int"):
        rk.quant_attention(*qkv(), qk_bits=True)


def test_pv_bits_outside_allowed():
    with pytest.raises(ValueError, match=r"pv_bits must be one of \(8, 16\), got 4"):
        rk.quant_attention(*qkv(), pv_bits=4)


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k must be a torch.Tensor, got list"):
        rk.quant_attention(q, [1, 2], v)


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must be 4-D \(B, H, N, D\).*\(2, 8, 16\)"):
        rk.quant_attention(q[0], k, v)


def test_integer_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="v has dtype torch.int64; allowed: float32, float16, bfloat16"):
        rk.quant_attention(q, k, v.long())


def test_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="must share a dtype"):
        rk.quant_attention(q, k.half(), v)


def test_float64_is_refused():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q has dtype torch.float64"):
        rk.quant_attention(q.double(), k.double(), v.double())


def test_batch_or_heads_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"share batch and head dims \(B, H\)"):
        rk.quant_attention(q, k[:, :1], v[:, :1])


def test_head_dim_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q and k must share the head dim D, got 16 and 8"):
        rk.quant_attention(q, k[..., :8], v)


def test_key_value_length_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k and v must have the same number of tokens, got 8 and 5"):
        rk.quant_attention(q, k, v[:, :, :5])


def test_empty_sequence():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k needs at least one token \(N >= 1\), got N = 0"):
        rk.quant_attention(q, k[:, :, :0], v[:, :, :0])


def test_devices_differ():
    q, k, v = qkv()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="on one device"):
            rk.quant_attention(q, k.to("meta"), v)
    else:
        with pytest.raises(ValueError, match="on one device"):
            rk.quant_attention(q, k.cuda(), v)


def test_bad_scale():
    with pytest.raises(ValueError, match="scale must be a positive finite number, got -1.0"):
        rk.quant_attention(*qkv(), scale=-1.0)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        rk.quant_attention(*qkv(), scale=float("nan"))
    with pytest.raises(TypeError, match="scale must be a float or None, got str"):
        rk.quant_attention(*qkv(), scale="0.1")


def test_bad_mask_shape():
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 3\) does not broadcast to \(B, H, Nq, Nk\)"):
        rk.quant_attention(*qkv(), attn_mask=torch.ones(3, 3, dtype=torch.bool))


def test_bad_mask_dtype():
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        rk.quant_attention(*qkv(), attn_mask=torch.ones(8, 8, dtype=torch.int32))


def test_unknown_map():
    with pytest.raises(ValueError, match=r"return_maps: unknown map 'rollout'; allowed: \('cls', 'received', 'entropy'\)"):
        rk.quant_attention(*qkv(), return_maps=("cls", "rollout"))


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \('cuda', 'triton', 'cpu', 'torch'\), got 'tpu'"):
        rk.quant_attention(*qkv(), backend="tpu")


def test_bad_smooth_k_and_rotate():
    with pytest.raises(TypeError, match="smooth_k must be a bool"):
        rk.quant_attention(*qkv(), smooth_k="yes")
    with pytest.raises(TypeError, match="rotate must be a bool or None"):
        rk.quant_attention(*qkv(), rotate=1)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_out_is_written_in_place_with_the_same_values(backend):
    """``out=``: the result lands in the caller's tensor (here SDPA's (B, N, H, D) memory inside a
    NaN-poisoned buffer with padding channels), equal to the default output, nothing else
    written. The cpu and triton kernels write it directly (triton through the interpreter on the
    CPU here); the torch backend's result is copied in."""
    if not rk.backends()[backend].runnable:
        pytest.skip(rk.backends()[backend].reason)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 19, 24, generator=g) for _ in range(3))
    ref, ref_maps = rk.quant_attention(q, k, v, qk_bits=4, backend=backend, return_maps=True)
    buf = torch.full((2, 19, 3, 32), float("nan"))
    out = buf[..., :24].transpose(1, 2)
    got, maps = rk.quant_attention(q, k, v, qk_bits=4, backend=backend, return_maps=True, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, ref)
    assert torch.isnan(buf[..., 24:]).all()
    assert all(torch.equal(maps[n], ref_maps[n]) for n in maps)


def test_bad_out_is_refused():
    q, k, v = qkv()
    B, H, N, D = q.shape
    with pytest.raises(ValueError, match=r"out must have shape \(B, H, Nq, Dv\)"):
        rk.quant_attention(q, k, v, out=torch.empty(B, H, N, D + 1))
    with pytest.raises(TypeError, match="out must have q's dtype"):
        rk.quant_attention(q, k, v, out=torch.empty(B, H, N, D, dtype=torch.float16))
    with pytest.raises(ValueError, match="channels .* must be contiguous"):
        rk.quant_attention(q, k, v, out=torch.empty(B, H, D, N).transpose(2, 3))
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        rk.quant_attention(q, k, v, out=[1.0])
    with pytest.raises(ValueError, match="out= is for inference"):
        rk.quant_attention(q.requires_grad_(), k, v, out=torch.empty(B, H, N, D))


def test_the_op_returns_sdpa_layout_so_the_modules_reshape_is_a_view():
    """``raad::quant_attention`` hands back (B, H, Nq, Dv) in (B, Nq, H, Dv) memory, as SDPA does
    on the CPU, so ``o.transpose(1, 2).reshape(B, Nq, H·Dv)`` copies nothing."""
    q, k, v = qkv()
    o = torch.ops.raad.quant_attention(q, k, v, None, 4, 8, 0.125, True, None, "auto", False)[0]
    flat = o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
    assert flat.data_ptr() == o.data_ptr()
    assert torch.equal(o, rk.quant_attention(q, k, v, qk_bits=4, scale=0.125))


def test_out_reaches_a_backend_only_in_the_layout_it_takes(monkeypatch):
    """A backend that writes only into a contiguous ``out`` (the cuda one: OUT = "contiguous")
    gets a strided ``out`` (the op's SDPA layout) never: its result is copied in instead; a
    contiguous ``out`` it gets. The stand-in backend is the torch backend's arithmetic behind the
    cuda binding's check."""
    from raad_kernels import torch_backend

    class ContiguousOnly:
        OUT = "contiguous"
        seen = []

        @staticmethod
        def attention(q, k, v, out=None, **kw):
            ContiguousOnly.seen.append(out)
            if out is not None and not out.is_contiguous():
                raise ValueError("out must be contiguous")   # as csrc/bindings/cuda_bindings.cpp
            res, maps = torch_backend.attention(q, k, v, **kw)
            return (res if out is None else out.copy_(res)), maps

    q, k, v = qkv(b=2, h=3, n=11, d=8)
    ref = rk.quant_attention(q, k, v, qk_bits=4, backend="torch")
    monkeypatch.setattr(dispatch, "select", lambda backend, device: ContiguousOnly)
    strided = torch.full((2, 11, 3, 8), float("nan")).transpose(1, 2)
    assert torch.equal(rk.quant_attention(q, k, v, qk_bits=4, out=strided), ref)
    contiguous = torch.full((2, 3, 11, 8), float("nan"))
    assert torch.equal(rk.quant_attention(q, k, v, qk_bits=4, out=contiguous), ref)
    assert len(ContiguousOnly.seen) == 2 and ContiguousOnly.seen[0] is None
    assert ContiguousOnly.seen[1] is contiguous
