"""Inputs and the accuracy rule shared by every backend's tests and benchmarks (docs/design.md).

``make_qkv`` draws realistic attention inputs: K with a large per-channel offset, a few outlier
channels in Q and K, logits scaled to a typical ViT temperature; ``adversarial=True`` makes the
outliers and the offset much stronger. ``check_accuracy`` applies the rule: a backend's error
against float64 is at most 1.25× the ``torch`` emulation's error (+1e-4) and above the floors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .reference import attention_reference

#: Minimum cosine similarity against float64, per Q·Kᵀ bit-width.
COS_FLOOR = {8: 0.999, 4: 0.98, 2: 0.90}
#: Minimum cosine similarity of each attention map against float64 (realistic inputs).
MAP_COS_FLOOR = {8: 0.999, 4: 0.99, 2: 0.90}
#: A backend may be this much worse than the torch emulation (plus ABS_SLACK).
REL_SLACK = 1.25
ABS_SLACK = 1e-4
#: The rule compares two error statistics over the output's elements. Below this many elements
#: they are a few draws of the rounding: a flash kernel rounds 8-bit P against the running row
#: maximum, the emulation against the final one, so either can land closer to float64 by luck
#: (found on a GPU with one query and one value column). Such outputs are held to the emulation
#: itself instead, within TINY_EMU_TOL (above the largest difference measured on such outputs;
#: the figures are in docs/history/kernels.md).
RULE_MIN_ELEMENTS = 64
TINY_EMU_TOL = 0.05


def make_qkv(b, h, nq, d, nk=None, dv=None, *, dtype=torch.float32, device="cpu", seed=0,
             logit_std=3.0, n_outliers=3, outlier_gain=8.0, k_offset=4.0, adversarial=False):
    """Realistic (or, with ``adversarial``, hostile) q, k, v of shape (B, H, N, D)."""
    nk = nq if nk is None else nk
    dv = d if dv is None else dv
    if adversarial:
        outlier_gain, k_offset, logit_std = 30.0, 20.0, 6.0
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, nk, dv, generator=g, dtype=torch.float64)
    idx = torch.randperm(d, generator=g)[: min(n_outliers, d)]
    q[..., idx] *= outlier_gain
    k[..., idx] *= outlier_gain
    # Scale Q so the (offset-free) logits have the requested spread: the softmax temperature of
    # a trained ViT, not a random one.
    s = (q @ (k - k.mean(-2, keepdim=True)).transpose(-1, -2)) / math.sqrt(d)
    std = s.std().item() if s.numel() > 1 else 1.0
    q = q * (logit_std / std if std > 0 else 1.0)
    k = k + k_offset * k.std() * torch.randn(1, h, 1, d, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype=dtype, device=device) for t in (q, k, v))


@dataclass
class Error:
    cos: float
    rel_l2: float

    def __str__(self):
        return f"cos={self.cos:.6f} rel_l2={self.rel_l2:.6f}"


def error(out: torch.Tensor, ref: torch.Tensor) -> Error:
    o = out.detach().double().flatten().cpu()
    r = ref.detach().double().flatten().cpu()
    rn = r.norm().item()
    rel = (o - r).norm().item() / rn if rn > 0 else (o - r).norm().item()
    on = o.norm().item()
    cos = (o @ r).item() / (on * rn) if on > 0 and rn > 0 else float(on == rn)
    return Error(cos, rel)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so an element a kernel forgot to write shows up."""
    return t.fill_(float("nan"))


def check_accuracy(out, emulated, ref, qk_bits: int, what: str = "backend", floor: bool = True):
    """Assert the accuracy rule for ``out`` given the torch emulation ``emulated`` and the
    float64 reference ``ref``. Returns (backend error, emulation error).

    The cosine floors hold on realistic inputs; on adversarial ones (``floor=False``) only the
    relative rule applies (the emulation itself may sit below the int2 floor there)."""
    assert torch.isfinite(out).all(), f"{what}: output has NaN/inf (unwritten or overflowed elements)"
    e, e_ref = error(out, ref), error(emulated, ref)
    if out.numel() < RULE_MIN_ELEMENTS:
        d = error(out, emulated)
        assert d.rel_l2 <= TINY_EMU_TOL, \
            f"{what}: {out.numel()} output elements, rel_l2 {d.rel_l2:.6f} from the emulation > {TINY_EMU_TOL}"
    else:
        assert e.rel_l2 <= REL_SLACK * e_ref.rel_l2 + ABS_SLACK, \
            f"{what}: rel_l2 {e.rel_l2:.6f} > {REL_SLACK}× emulation {e_ref.rel_l2:.6f} + {ABS_SLACK}"
    assert not floor or e.cos >= COS_FLOOR[qk_bits], f"{what}: cos {e.cos:.6f} below the int{qk_bits} floor {COS_FLOOR[qk_bits]}"
    return e, e_ref


def check_maps_agree(maps, emulated_maps, what: str = "backend", atol=2e-4, rtol=2e-3,
                     max_off=0.01):
    """A kernel computes the emulation's quantized scores, so its maps agree with the
    emulation's to float rounding, except where a code flipped at a rounding tie: a GPU quantizer
    divides with other rounding than torch. So at most ``max_off`` of each map's values (and at
    least one) may differ by more."""
    for n, m in maps.items():
        e = emulated_maps[n].to(m.device)
        off = ~torch.isclose(m, e, atol=atol, rtol=rtol)
        allowed = max(1, int(max_off * m.numel()))
        assert int(off.sum()) <= allowed, (
            f"{what} map {n!r}: {int(off.sum())} of {m.numel()} values differ from the emulation by more "
            f"than atol={atol}, rtol={rtol} (allowed {allowed}); largest difference "
            f"{(m - e).abs().max().item():.3g}")


def check_maps(maps, emulated_maps, ref_maps, qk_bits: int, what: str = "backend", floor: bool = True):
    """The same rule for each attention map: finite, float32, shaped like the reference, within
    1.25× the emulation's error (+1e-4) and, on realistic inputs, above MAP_COS_FLOOR."""
    assert set(maps) == set(ref_maps), f"{what}: maps {sorted(maps)} != requested {sorted(ref_maps)}"
    for name, m in maps.items():
        label = f"{what} map {name!r}"
        assert m.dtype == torch.float32, f"{label}: dtype {m.dtype}, want float32"
        assert m.shape == ref_maps[name].shape, f"{label}: shape {tuple(m.shape)} != {tuple(ref_maps[name].shape)}"
        assert torch.isfinite(m).all(), f"{label}: NaN/inf"
        e, e_ref = error(m, ref_maps[name]), error(emulated_maps[name], ref_maps[name])
        assert e.rel_l2 <= REL_SLACK * e_ref.rel_l2 + ABS_SLACK, \
            f"{label}: rel_l2 {e.rel_l2:.6f} > {REL_SLACK}× emulation {e_ref.rel_l2:.6f} + {ABS_SLACK}"
        # A single row (cls at int2, small D) can miss the floor in the scheme itself; the floor
        # then says nothing about the backend, and the relative rule above carries the check.
        emu_meets = e_ref.cos >= MAP_COS_FLOOR[qk_bits]
        assert not floor or not emu_meets or e.cos >= MAP_COS_FLOOR[qk_bits], \
            f"{label}: cos {e.cos:.6f} below {MAP_COS_FLOOR[qk_bits]}"


def reference(q, k, v, **kw):
    """Float64 output only (see :func:`raad_kernels.reference.attention_reference`)."""
    return attention_reference(q, k, v, **kw)[0]


def check_cuda_graph_replay(backend: str, keep_maps: bool = False) -> None:
    """QuantAttention (an ``nn.MultiheadAttention`` taken over, int8/int8 on ``backend``)
    captured in a CUDA graph and replayed on new inputs gives the eager result, and each replay
    recomputes: no host sync or foreign allocation on the path (a capture fails on either).
    Needs a CUDA GPU."""
    from .nn import QuantAttention
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(128, 2, batch_first=True).cuda().half().eval()
    qa = QuantAttention.from_module(mha, 8, 8, backend=backend)
    qa.keep_maps = keep_maps
    static_x = torch.randn(4, 197, 128, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(s):
        for _ in range(3):  # compile and plan outside the capture
            qa(static_x, static_x, static_x, need_weights=False)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        static_out, _ = qa(static_x, static_x, static_x, need_weights=False)
    previous = static_out.clone()
    for seed in (1, 2):
        new = torch.randn(4, 197, 128, device="cuda", dtype=torch.float16,
                          generator=torch.Generator("cuda").manual_seed(seed))
        static_x.copy_(new)
        g.replay()
        with torch.no_grad():
            eager, _ = qa(new, new, new, need_weights=False)
        torch.cuda.synchronize()
        # the same kernels on the same inputs (the projections' GEMMs may pick another cuBLAS
        # algorithm under capture, hence a tolerance); and the replay did recompute
        torch.testing.assert_close(static_out, eager, rtol=1e-2, atol=1e-2)
        assert not torch.equal(static_out, previous)
        previous = static_out.clone()
