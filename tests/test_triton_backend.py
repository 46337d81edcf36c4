"""The Triton backend against the torch emulation and the float64 reference (docs/design.md rule).

Without a GPU these run under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before the kernels are imported), so shapes stay small. On a GPU machine the
same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch

import raad_kernels as rk
from raad_kernels import quant
from raad_kernels.reference import MAP_NAMES, attention_reference
from raad_kernels.testing import (MAP_COS_FLOOR, check_accuracy, check_maps, check_maps_agree, error, make_qkv,
                                  poison_)

tb = pytest.importorskip("raad_kernels.triton")
if not tb.status().runnable:
    pytest.skip(f"triton backend not runnable here: {tb.status().reason}", allow_module_level=True)

from raad_kernels.triton import flash, quantize  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _maps_ok(maps, emaps, rmaps, qk_bits, names=MAP_NAMES, floor=True):
    """The docs/design.md rule for each map (testing.check_maps) and, since the kernel computes the
    same quantized scores as the emulation, agreement with the emulation's maps to fp32 rounding
    (testing.check_maps_agree: but for rare codes flipped at a rounding tie).

    The cosine floor of a map applies where the torch emulation itself meets it: at int2 the
    single-row ``cls`` map of the emulation drops below MAP_COS_FLOOR[2] on some realistic
    inputs (e.g. cos 0.80 at D=32, N=37), which is the scheme's accuracy, not the kernel's."""
    for n in names:
        emu_ok = error(emaps[n], rmaps[n]).cos >= MAP_COS_FLOOR[qk_bits]
        check_maps({n: maps[n]}, emaps, {n: rmaps[n]}, qk_bits, what="triton",
                   floor=floor and emu_ok)
    check_maps_agree({n: maps[n] for n in names}, emaps, what="triton")


def run_case(q, k, v, qk_bits, pv_bits, *, floor=True, maps=MAP_NAMES, **kw):
    res = rk.quant_attention(q, k, v, qk_bits=qk_bits, pv_bits=pv_bits, backend="triton",
                             return_maps=maps or None, **kw)
    out, got = res if maps else (res, {})
    emu, emaps = rk.quant_attention(q, k, v, qk_bits=qk_bits, pv_bits=pv_bits, backend="torch",
                                    return_maps=MAP_NAMES, **kw)
    ref, rmaps = attention_reference(q, k, v, scale=kw.get("scale"), attn_mask=kw.get("attn_mask"),
                                     return_maps=MAP_NAMES)
    assert out.dtype == q.dtype and out.shape == emu.shape and out.device == q.device
    e, er = check_accuracy(out, emu, ref, qk_bits, what=f"triton qk{qk_bits}/pv{pv_bits}", floor=floor)
    if maps:
        assert set(got) == set(maps)
        _maps_ok(got, emaps, rmaps, qk_bits, maps, floor=floor)
    return e, er


# --------------------------------------------------------------------------------------------
# Backend protocol
# --------------------------------------------------------------------------------------------

def test_status_and_supports():
    st = tb.status()
    assert st.built and st.runnable and st.reason
    assert rk.backends()["triton"].runnable
    assert tb.supports(torch.device(DEV))


# --------------------------------------------------------------------------------------------
# Fused quantization kernels vs quant.py
# --------------------------------------------------------------------------------------------

def _compare_codes(codes_packed, scale, ref_codes, ref_scale, bits, d_eff):
    per = 8 // bits
    nb = -(-d_eff // per)
    ref_codes, ref_scale = ref_codes.to(codes_packed.device), ref_scale.to(codes_packed.device)
    mine = quant.unpack(codes_packed[..., :nb], bits, d_eff)
    same = (mine == ref_codes).float().mean().item()
    assert same >= 0.999, f"only {same:.5f} of the codes match quant.quantize"
    torch.testing.assert_close(scale, ref_scale, rtol=1e-5, atol=0)
    if same == 1.0:  # then the bytes are quant.pack's, byte for byte
        assert torch.equal(codes_packed[..., :nb], quant.pack(ref_codes, bits).to(codes_packed.dtype))
    # Bytes past the quantized dim hold all-zero bits (code 0 at int8/int4, -3 at int2).
    assert (codes_packed[..., nb:] == 0).all()


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("d,dtype,smooth,rotate", [
    (16, "fp32", True, None), (40, "fp16", True, None), (64, "bf16", True, None),
    (80, "fp32", False, None), (128, "fp16", True, None), (40, "fp32", True, False),
    (64, "fp32", True, True),
])
def test_quantize_qk_matches_quant(bits, d, dtype, smooth, rotate):
    q, k, _ = make_qkv(2, 2, 37, d, nk=45, dtype=DTYPES[dtype], device=DEV, seed=d + bits)
    qc, qs, kc, ks, d_eff, dpt = quantize.quantize_qk(q, k, bits, smooth=smooth, rotate=rotate)
    ref = quant.prepare_qk(q.cpu(), k.cpu(), bits, smooth=smooth, rotate_qk=rotate)
    assert d_eff == ref.dim and dpt >= max(32, d_eff) and dpt & (dpt - 1) == 0
    assert qc.shape == (2, 2, 37, dpt * bits // 8) and qs.shape == (2, 2, 37)
    assert qc.dtype == (torch.int8 if bits == 8 else torch.uint8)
    _compare_codes(qc, qs, ref.q_codes, ref.q_scale, bits, d_eff)
    _compare_codes(kc, ks, ref.k_codes, ref.k_scale, bits, d_eff)


def test_quantize_qk_d256_and_edge_rows():
    # D = 256 (largest supported), one row all zeros (scale fallback), one with a huge outlier.
    q, k, _ = make_qkv(1, 2, 9, 256, dtype=torch.float32, device=DEV, seed=3)
    q[0, 0, 3] = 0.0
    k[0, 1, 5, 7] = 1e4
    for bits in (8, 4, 2):
        qc, qs, kc, ks, d_eff, _ = quantize.quantize_qk(q, k, bits)
        ref = quant.prepare_qk(q.cpu(), k.cpu(), bits)
        _compare_codes(qc, qs, ref.q_codes, ref.q_scale, bits, d_eff)
        _compare_codes(kc, ks, ref.k_codes, ref.k_scale, bits, d_eff)


@pytest.mark.parametrize("dv,dtype", [(16, "fp32"), (40, "bf16"), (64, "fp16"), (256, "fp32")])
def test_quantize_v_matches_quant(dv, dtype):
    _, _, v = make_qkv(2, 1, 3, 16, nk=70, dv=dv, dtype=DTYPES[dtype], device=DEV, seed=dv)
    km, (vc, vs, vm, vsum) = quantize.column_stats(None, v, block_n=32)
    assert km is None
    sums = torch.nn.functional.pad(vc.int(), (0, 0, 0, (-70) % 32)).view(2, 1, 3, 32, -1).sum(-2)
    assert torch.equal(vsum, sums)
    ref = quant.prepare_v(v.cpu())
    same = (vc[..., :dv].cpu() == ref.codes).float().mean().item()
    assert same >= 0.999, same
    assert (vc[..., dv:] == 0).all()
    torch.testing.assert_close(vs[..., :dv].cpu(), ref.scale, rtol=1e-5, atol=0)
    torch.testing.assert_close(vm[..., :dv].cpu(), ref.mean, rtol=1e-5, atol=1e-6)
    km, _ = quantize.column_stats(v, None)
    torch.testing.assert_close(km.cpu(), v.float().mean(-2).cpu(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Attention: the accuracy rule
# --------------------------------------------------------------------------------------------

# (qk_bits, pv_bits, dtype, D, Nq, Nk): every bit pair, every dtype, the docs/design.md head dims.
CASES = [
    (8, 16, "fp16", 64, 37, 37),
    (8, 8, "fp32", 80, 70, 70),
    (8, 8, "bf16", 32, 130, 130),
    (8, 16, "bf16", 128, 37, 45),
    (4, 8, "fp16", 64, 70, 70),
    (4, 16, "fp32", 40, 37, 37),
    (4, 8, "bf16", 128, 45, 37),
    (4, 16, "bf16", 80, 130, 17),
    (2, 8, "fp32", 64, 70, 70),
    (2, 16, "fp16", 32, 37, 37),
    (2, 8, "bf16", 16, 130, 130),
    (2, 16, "fp32", 80, 45, 70),
]


@pytest.mark.parametrize("qk_bits,pv_bits,dtype,d,nq,nk", CASES)
def test_accuracy_realistic(qk_bits, pv_bits, dtype, d, nq, nk):
    q, k, v = make_qkv(1, 2, nq, d, nk=nk, dtype=DTYPES[dtype], device=DEV, seed=d + nq + qk_bits)
    run_case(q, k, v, qk_bits, pv_bits)


@pytest.mark.parametrize("qk_bits,pv_bits,dtype", [(8, 8, "bf16"), (4, 16, "fp16"), (2, 8, "fp32")])
def test_accuracy_head_dim_256(qk_bits, pv_bits, dtype):
    q, k, v = make_qkv(1, 1, 33, 256, dtype=DTYPES[dtype], device=DEV, seed=256 + qk_bits)
    run_case(q, k, v, qk_bits, pv_bits)


@pytest.mark.parametrize("qk_bits,pv_bits", [(8, 8), (4, 16), (2, 8), (2, 16)])
def test_accuracy_adversarial(qk_bits, pv_bits):
    q, k, v = make_qkv(2, 1, 50, 64, dtype=torch.float16, device=DEV, seed=7, adversarial=True)
    run_case(q, k, v, qk_bits, pv_bits, floor=False)


@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 130), (130, 1)])
@pytest.mark.parametrize("qk_bits", [8, 2])
def test_single_token(nq, nk, qk_bits):
    q, k, v = make_qkv(2, 1, nq, 40, nk=nk, dtype=torch.float32, device=DEV, seed=nq + nk)
    run_case(q, k, v, qk_bits, 8, floor=nq * nk > 1)
    run_case(q, k, v, qk_bits, 16, floor=nq * nk > 1, maps=("entropy",))


@pytest.mark.parametrize("qk_bits,pv_bits", [(8, 8), (4, 8), (2, 16)])
def test_small_blocks_many_tiles(qk_bits, pv_bits):
    """16×32 tiles: many key blocks per row, so the running max moves and the int8 P of early
    blocks is rescaled; ragged tails on both axes."""
    q, k, v = make_qkv(1, 2, 67, 64, nk=101, dtype=torch.float16, device=DEV, seed=11)
    out, maps = flash.forward(q, k, v, qk_bits=qk_bits, pv_bits=pv_bits, scale=1 / 8,
                              return_maps=MAP_NAMES, block_m=16, block_n=32)
    emu, emaps = rk.quant_attention(q, k, v, qk_bits=qk_bits, pv_bits=pv_bits, backend="torch",
                                    return_maps=MAP_NAMES)
    ref, rmaps = attention_reference(q, k, v, return_maps=MAP_NAMES)
    check_accuracy(out, emu, ref, qk_bits)
    _maps_ok(maps, emaps, rmaps, qk_bits)


@pytest.mark.parametrize("qk_bits,rotate,smooth", [(8, True, True), (4, False, True), (2, False, True),
                                                   (8, False, False), (2, True, False)])
def test_rotate_and_smooth_options(qk_bits, rotate, smooth):
    # D = 40 without rotation keeps d_eff = 40 < the 64-wide tile: at int2 the padded channels
    # (code -3) must be masked out of Q.
    q, k, v = make_qkv(1, 2, 45, 40, dtype=torch.float32, device=DEV, seed=qk_bits)
    run_case(q, k, v, qk_bits, 8, rotate=rotate, smooth_k=smooth, floor=False)


def test_scale_argument_and_noncontiguous_inputs():
    q, k, v = make_qkv(2, 3, 37, 64, dtype=torch.float16, device=DEV, seed=5)
    # (B, N, H, D) storage seen as (B, H, N, D), as a ViT's qkv split produces.
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    run_case(q, k, v, 4, 16, scale=0.07)
    run_case(q, k, v, 8, 8, scale=0.2, maps=("cls",))


# --------------------------------------------------------------------------------------------
# Masks, NaN guards, poisoned outputs
# --------------------------------------------------------------------------------------------

def _masks(b, h, nq, nk):
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(b, 1, nq, nk, generator=g) > 0.3
    keep[..., 0] = True
    bias = torch.randn(nq, nk, generator=g) * 2
    bias[:, 5] = -math.inf
    return keep.to(DEV), bias.to(DEV)


@pytest.mark.parametrize("qk_bits,pv_bits,kind", [(8, 8, "bool"), (4, 16, "float"), (2, 8, "float"),
                                                  (4, 8, "bool"), (8, 16, "keys"), (2, 8, "keys_float")])
def test_masks_broadcast(qk_bits, pv_bits, kind):
    """General (Nq, Nk) masks (a tile per block) and key-padding masks, the same for every
    query (a vector per key block), bool or additive, broadcast through 0 strides."""
    q, k, v = make_qkv(2, 2, 37, 64, nk=70, dtype=torch.float32, device=DEV, seed=1)
    keep, bias = _masks(2, 2, 37, 70)
    if kind == "bool":
        mask = keep                                   # (B, 1, Nq, Nk)
    elif kind == "float":
        mask = bias.to(torch.float16)                 # (Nq, Nk)
    elif kind == "keys":
        mask = keep[:, :, :1].clone()                 # (B, 1, 1, Nk)
        mask[1, 0, 0, 50:] = False
    else:
        mask = bias[0].clone()                        # (Nk,)
        mask[60:] = -math.inf
    run_case(q, k, v, qk_bits, pv_bits, attn_mask=mask)


@pytest.mark.parametrize("pv_bits", [8, 16])
def test_fully_masked_rows_are_zero_never_nan(pv_bits):
    q, k, v = make_qkv(1, 2, 40, 32, nk=50, dtype=torch.bfloat16, device=DEV, seed=2)
    keep = torch.ones(1, 2, 40, 50, dtype=torch.bool, device=DEV)
    keep[:, :, 0] = False       # query 0 (the cls row) sees nothing
    keep[:, 1, 17] = False      # another fully masked row
    keep[:, :, :, 45:] = False  # keys nobody sees
    out, maps = rk.quant_attention(q, k, v, qk_bits=4, pv_bits=pv_bits, attn_mask=keep,
                                   backend="triton", return_maps=True)
    assert torch.isfinite(out).all()
    assert (out[:, :, 0] == 0).all() and (out[:, 1, 17] == 0).all()
    assert (maps["cls"] == 0).all()
    assert (maps["entropy"][:, :, 0] == 0).all() and (maps["entropy"][:, 1, 17] == 0).all()
    assert (maps["received"][..., 45:] == 0).all()
    for m in maps.values():
        assert torch.isfinite(m).all()
    emu, emaps = rk.quant_attention(q, k, v, qk_bits=4, pv_bits=pv_bits, attn_mask=keep,
                                    backend="torch", return_maps=True)
    ref, rmaps = attention_reference(q, k, v, attn_mask=keep, return_maps=MAP_NAMES)
    check_accuracy(out, emu, ref, 4)
    _maps_ok(maps, emaps, rmaps, 4)


@pytest.mark.parametrize("qk_bits,pv_bits,dtype", [(8, 8, "fp16"), (2, 16, "bf16"), (4, 8, "fp32")])
def test_poisoned_outputs_fully_written(qk_bits, pv_bits, dtype):
    q, k, v = make_qkv(2, 2, 45, 80, nk=37, dv=48, dtype=DTYPES[dtype], device=DEV, seed=9)
    out = poison_(torch.empty(2, 2, 45, 48, dtype=q.dtype, device=DEV))
    maps_out = {"cls": poison_(torch.empty(2, 2, 37, device=DEV)),
                "received": poison_(torch.empty(2, 2, 37, device=DEV)),
                "entropy": poison_(torch.empty(2, 2, 45, device=DEV))}
    o, maps = flash.forward(q, k, v, qk_bits=qk_bits, pv_bits=pv_bits, scale=80 ** -0.5,
                            return_maps=MAP_NAMES, out=out, maps_out=maps_out)
    assert o is out and all(maps[n] is maps_out[n] for n in MAP_NAMES)
    assert torch.isfinite(out).all()
    for n in MAP_NAMES:
        assert torch.isfinite(maps[n]).all(), n
    emu, emaps = rk.quant_attention(q, k, v, qk_bits=qk_bits, pv_bits=pv_bits, backend="torch",
                                    return_maps=True)
    ref, rmaps = attention_reference(q, k, v, return_maps=MAP_NAMES)
    check_accuracy(out, emu, ref, qk_bits)
    _maps_ok(maps, emaps, rmaps, qk_bits)
    # The backend entry point writes into a given out, too.
    out2 = poison_(torch.empty_like(out))
    o2, _ = tb.attention(q, k, v, qk_bits=qk_bits, pv_bits=pv_bits, scale=80 ** -0.5, out=out2)
    assert o2 is out2 and torch.isfinite(out2).all()


# --------------------------------------------------------------------------------------------
# The fused path: K/V preparation in one launch, Q quantized inside the attention kernel
# --------------------------------------------------------------------------------------------

@pytest.fixture
def kv_chunks(monkeypatch):
    """Set how many programs per (batch, head) prepare K and V (by default one, but for long
    sequences on a GPU); a fresh plan cache so the setting takes effect."""
    def set_chunks(n):
        monkeypatch.setattr(flash, "FORCE_CHUNKS", n)
        monkeypatch.setattr(flash, "_PLANS", {})
    return set_chunks


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("d,dtype,smooth,rotate", [
    (32, "fp16", True, None), (64, "bf16", True, None), (128, "fp32", True, None),
    (40, "fp32", True, False), (38, "fp16", False, False), (16, "fp32", True, None),
])
def test_fused_workspace_matches_row_kernels(bits, d, dtype, smooth, rotate, chunks, kv_chunks):
    """What the fused kernels leave in the workspace: Q's codes (written by the attention
    kernel) are the row kernel's (quantize_qk) bit for bit, K's and V's pass quant.py's rule,
    and the V column sums are exact."""
    kv_chunks(chunks)
    nk = 150
    q, k, v = make_qkv(1, 2, 37, d, nk=nk, dv=d + 3, dtype=DTYPES[dtype], device=DEV, seed=d + bits)
    dbg = {}
    flash.forward(q, k, v, qk_bits=bits, pv_bits=8, scale=d ** -0.5, smooth_k=smooth, rotate=rotate,
                  debug=dbg, block_n=32)
    qc, qs, _, _, d_eff, _ = quantize.quantize_qk(q, k, bits, smooth=smooth, rotate=rotate)
    if bits == 8 or INTERPRETED:  # absmax scales do not depend on reduction order; rms sums do
        assert torch.equal(dbg["q_codes"], qc) and torch.equal(dbg["q_scale"], qs)
    ref = quant.prepare_qk(q.cpu(), k.cpu(), bits, smooth=smooth, rotate_qk=rotate)
    _compare_codes(dbg["q_codes"], dbg["q_scale"], ref.q_codes, ref.q_scale, bits, d_eff)
    _compare_codes(dbg["k_codes"], dbg["k_scale"], ref.k_codes, ref.k_scale, bits, d_eff)
    rv = quant.prepare_v(v.cpu())
    vc = dbg["v_codes"]
    same = (vc[..., :d + 3].cpu() == rv.codes).float().mean().item()
    assert same >= 0.999, same
    assert (vc[..., d + 3:] == 0).all()
    torch.testing.assert_close(dbg["v_scale"][..., :d + 3].cpu(), rv.scale, rtol=1e-5, atol=0)
    torch.testing.assert_close(dbg["v_mean"][..., :d + 3].cpu(), rv.mean, rtol=1e-5, atol=1e-6)
    sums = torch.nn.functional.pad(vc.int(), (0, 0, 0, (-nk) % 32)).view(1, 2, -1, 32, vc.shape[-1]).sum(-2)
    assert torch.equal(dbg["v_sums"], sums)


@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("qk_bits,pv_bits", [(8, 8), (8, 16), (4, 8), (4, 16), (2, 8), (2, 16)])
def test_fused_accuracy_head_dims(qk_bits, pv_bits, d, kv_chunks):
    """The accuracy rule at the common head dims, odd lengths, several K/V chunks and key blocks
    per head, with the entropy map (computed in the same pass) and a key-padding mask."""
    kv_chunks(2)
    q, k, v = make_qkv(1, 2, 67, d, nk=131, dtype=torch.float16, device=DEV, seed=d + qk_bits)
    run_case(q, k, v, qk_bits, pv_bits, maps=("entropy",))
    keep = torch.ones(1, 1, 1, 131, dtype=torch.bool, device=DEV)
    keep[..., 100:] = False
    run_case(q, k, v, qk_bits, pv_bits, maps=("entropy",), attn_mask=keep)


# --------------------------------------------------------------------------------------------
# Launches and host synchronisation of one call
# --------------------------------------------------------------------------------------------

class _LaunchCounter:
    """Counts kernel launches: every launch goes through ``run`` of the kernels' class (the JIT
    function on a GPU, InterpretedFunction under the interpreter; the autotuner ends there too)."""

    def __init__(self, monkeypatch):
        self.names = []
        cls = type(flash._attn_fwd_kernel)
        orig = cls.run
        counter = self

        def run(self_, *args, **kwargs):
            counter.names.append(self_.__name__ if hasattr(self_, "__name__") else str(self_))
            return orig(self_, *args, **kwargs)
        monkeypatch.setattr(cls, "run", run)


@pytest.mark.parametrize("maps,mask,limit", [
    ((), None, 2), (("entropy",), None, 2), (("entropy",), "keys", 2), ((), "general", 2),
    (MAP_NAMES, None, 3), (("received",), "keys", 3),
])
@pytest.mark.parametrize("pv_bits", [8, 16])
def test_launches_per_call(maps, mask, limit, pv_bits, monkeypatch):
    q, k, v = make_qkv(2, 2, 37, 64, nk=45, dtype=torch.float16, device=DEV, seed=4)
    attn_mask = None
    if mask == "keys":
        attn_mask = torch.ones(2, 1, 1, 45, dtype=torch.bool, device=DEV)
        attn_mask[1, ..., 30:] = False
    elif mask == "general":
        attn_mask = _masks(2, 2, 37, 45)[0]
    rk.quant_attention(q, k, v, pv_bits=pv_bits, backend="triton", return_maps=maps or None,
                       attn_mask=attn_mask)  # warm: compiles, plans
    count = _LaunchCounter(monkeypatch)
    rk.quant_attention(q, k, v, pv_bits=pv_bits, backend="triton", return_maps=maps or None,
                       attn_mask=attn_mask)
    assert len(count.names) <= limit, count.names
    assert count.names[:2] == ["_prep_kv_kernel", "_attn_fwd_kernel"], count.names


class SyncOnCallPath(RuntimeError):
    pass


@pytest.fixture
def no_host_sync(monkeypatch):
    """Makes every tensor → host read raise while the backend's Python code runs (not inside the
    interpreter's kernel execution, which reads host memory by design): ``.item()``,
    ``.tolist()``, ``bool()``/``int()``/``float()`` of a tensor (Python branching on values),
    ``.cpu()``, ``.numpy()``, ``nonzero``, ``torch.cuda.synchronize``. A CUDA graph capture
    fails on any of these; this proves their absence without a GPU."""
    inside, armed = [0], [False]

    def guard(name, orig):
        def f(*a, **kw):
            if armed[0] and not inside[0]:
                raise SyncOnCallPath(f"{name} on the call path")
            return orig(*a, **kw)
        return f
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, guard(f"Tensor.{name}", getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "nonzero", guard("torch.nonzero", torch.nonzero))
    monkeypatch.setattr(torch.cuda, "synchronize", guard("torch.cuda.synchronize", torch.cuda.synchronize))
    cls = type(flash._attn_fwd_kernel)
    orig_run = cls.run

    def run(self_, *args, **kwargs):
        inside[0] += 1
        try:
            return orig_run(self_, *args, **kwargs)
        finally:
            inside[0] -= 1
    monkeypatch.setattr(cls, "run", run)

    @contextlib.contextmanager
    def armed_():
        armed[0] = True
        try:
            yield
        finally:
            armed[0] = False
    return armed_


@pytest.mark.parametrize("maps,mask", [((), None), (MAP_NAMES, "keys"), (("entropy",), "general")])
def test_no_host_sync_on_the_call_path(maps, mask, no_host_sync):
    q, k, v = make_qkv(1, 2, 37, 64, nk=45, dtype=torch.float16, device=DEV, seed=6)
    attn_mask = None
    if mask == "keys":
        attn_mask = torch.ones(1, 1, 1, 45, dtype=torch.bool, device=DEV)
    elif mask == "general":
        attn_mask = torch.zeros(37, 45, device=DEV)
    for backend in ("triton", "auto") if DEV == "cuda" else ("triton",):
        rk.quant_attention(q, k, v, backend=backend, return_maps=maps or None, attn_mask=attn_mask)
        with no_host_sync():  # the second call: the first one compiles and plans
            out = rk.quant_attention(q, k, v, backend=backend, return_maps=maps or None,
                                     attn_mask=attn_mask)
    with no_host_sync(), pytest.raises(SyncOnCallPath):  # the guard itself works
        bool(q.sum() > 0)
    assert torch.isfinite(out[0] if maps else out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend,keep_maps", [("triton", False), ("triton", True), ("auto", False)])
def test_cuda_graph_capture_replays_eager(backend, keep_maps):
    """QuantAttention's forward (nn.MultiheadAttention taken over) captured in a CUDA graph and
    replayed on new inputs gives the eager result (``auto``: whatever the speed table picks)."""
    from raad_kernels.testing import check_cuda_graph_replay
    check_cuda_graph_replay(backend, keep_maps)


# --------------------------------------------------------------------------------------------
# Random small shapes
# --------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=6, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), h=st.integers(1, 2), nq=st.integers(1, 70), nk=st.integers(1, 70),
       d=st.integers(16, 96), dv=st.integers(1, 70), qk_bits=st.sampled_from([8, 4, 2]),
       pv_bits=st.sampled_from([8, 16]), dtype=st.sampled_from(list(DTYPES)),
       seed=st.integers(0, 1000))
def test_random_shapes(b, h, nq, nk, d, dv, qk_bits, pv_bits, dtype, seed):
    q, k, v = make_qkv(b, h, nq, d, nk=nk, dv=dv, dtype=DTYPES[dtype], device=DEV, seed=seed)
    # Tiny problems (a handful of keys/queries) are below any cosine floor's statistics.
    run_case(q, k, v, qk_bits, pv_bits, floor=nq * nk >= 64 and nq >= 4)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

def test_errors():
    q, k, v = make_qkv(1, 1, 4, 16, device=DEV)
    big = torch.randn(1, 1, 4, 300, device=DEV)
    with pytest.raises(ValueError, match="head dims up to 256"):
        rk.quant_attention(big, big, v, backend="triton")
    with pytest.raises(ValueError, match="head dims up to 256"):
        rk.quant_attention(q, k, torch.randn(1, 1, 4, 257, device=DEV), backend="triton")
    with pytest.raises(ValueError, match="qk_bits"):
        rk.quant_attention(q, k, v, qk_bits=3, backend="triton")
    with pytest.raises(ValueError, match="pv_bits"):
        rk.quant_attention(q, k, v, pv_bits=4, backend="triton")
    with pytest.raises(ValueError, match="bits"):
        quantize.quantize_qk(q, k, 3)
    with pytest.raises(ValueError, match="out must be"):
        tb.attention(q, k, v, qk_bits=8, pv_bits=8, scale=0.25, out=torch.empty(1, 1, 4, 8, device=DEV))
    if DEV == "cpu" and not tb.supports(torch.device("meta")):
        with pytest.raises(ValueError, match="device"):
            tb.attention(q.to("meta"), k.to("meta"), v.to("meta"), qk_bits=8, pv_bits=8, scale=0.25)


# --------------------------------------------------------------------------------------------
# GPU compilability (no GPU needed): opt-in, slow on a busy CPU
# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.environ.get("RAAD_TRITON_AOT") != "1",
                    reason="set RAAD_TRITON_AOT=1 to compile the kernels for sm_86/sm_90 (minutes)")
def test_kernels_compile_for_gpu_targets():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "raad_kernels.triton._aot", "--quick"], env=env,
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
