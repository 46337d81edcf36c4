"""W8A8 linear layers: the dense half of a quantized ViT block (QKV, output projection, MLP).

Scheme (the ``torch`` arithmetic below is the specification; :func:`int8_linear` follows it):

* weights: int8 codes in [-127, 127], one float32 scale per output channel (row absmax / 127),
  quantized once and cached until the weight changes;
* activations: int8 codes in [-127, 127], one float32 scale per token (row absmax / 127),
  computed on the fly (dynamic: no calibration data); an all-zero row gets scale 1;
* ``y[t, o] = s_x[t] * s_w[o] * sum_i x_code[t, i] * w_code[o, i] + bias[o]``, the sum exact in
  int32 (``torch._int_mm``: oneDNN's VNNI kernels on x86 CPUs, cuBLASLt IMMA on GPUs), the
  scaling in float32.

Like :class:`~raad_kernels.QuantAttention`, :class:`QuantLinear` mirrors the float module (the same
``weight`` and ``bias`` Parameter objects), so state_dicts load both ways and training one trains
the other. With gradients required it runs a differentiable fake quantization of the same
arithmetic (straight-through estimator), so fine-tuning sees what inference computes.

:func:`quantize_linears` swaps every ``nn.Linear`` of a model (or of the parts a ``filter_fn``
or a list of module-name prefixes selects), in the manner of torchao's ``quantize_``.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import quant
from .fake_quant import fake_quantize_rows

LINEAR_BITS = (8,)

__all__ = ["QuantLinear", "quantize_linears", "quantize_rows_int8", "int8_linear", "int8_linear_reference"]


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 (the attention's int8 row quantizer, :func:`quant.quantize`):
    ``x ≈ scale * code`` → (codes int8, scales float32 of shape ``x.shape[:-1] + (1,)``).
    All-zero rows get scale 1 (their codes are 0)."""
    codes, scale = quant.quantize(x, 8)
    return codes, scale[..., None]


def _int_mm_ok(device: torch.device) -> bool:
    return hasattr(torch, "_int_mm") and device.type in ("cpu", "cuda")


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 → (M, N) int32, exact. cuBLASLt needs M > 16 and K, N
    multiples of 8; torch 2.14's CPU ``_int_mm`` returns wrong sums for K = 1 (found by
    tests/test_linear.py; K = 2..300 checked exact on 3000 random shapes). Other shapes (and
    devices without ``_int_mm``) take a float64 matmul of the codes, exact while |sum| < 2**53
    (any K below 5·10**11), which every device has (CUDA has no int64 matmul). A CPU without
    VNNI or AMX takes an fp32 matmul of the codes where that is exact (K <= 1040)."""
    m, k = a.shape
    n = b.shape[1]
    if a.device.type == "cpu" and not _cpu_int_gemm_pays() and k <= _EXACT_FLOAT_K:
        # as the fused kernel: without VNNI, _int_mm falls back to a path far slower than an
        # fp32 GEMM; this is exact
        return (a.to(torch.float32) @ b.to(torch.float32)).to(torch.int32)
    if _int_mm_ok(a.device) and k > 1 and (a.device.type == "cpu" or (m > 16 and k % 8 == 0 and n % 8 == 0)):
        return torch._int_mm(a, b)
    return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)


#: the longest rows for which an fp32 GEMM of codes in [-127, 127] is exact (127² K < 2^24)
_EXACT_FLOAT_K = (1 << 24) // (127 * 127)


@functools.lru_cache(maxsize=1)
def cpu_int8_dot() -> bool | None:
    """Whether this CPU has an int8 dot-product instruction (AVX-512 VNNI or AMX), as the CPU
    extension detects it; None where the extension is not built."""
    try:
        from ._cpu import capabilities
    except ImportError:
        return None
    caps = capabilities()
    return bool(caps["avx512vnni"] or caps["amx_int8"])


@functools.lru_cache(maxsize=1)
def _cpu_int_gemm_pays() -> bool:
    """Whether this CPU's int8 GEMM (oneDNN) has VNNI or AMX under it (without the extension,
    torch's detection: an AVX-512 CPU is taken to have it)."""
    has = cpu_int8_dot()
    return has if has is not None else torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "NO AVX")


def int8_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """The specification, in float64: quantize both operands, exact integer dot products,
    scale, add the bias. Returns float64."""
    xq, sx = quantize_rows_int8(x)
    wq, sw = quantize_rows_int8(weight)
    acc = xq.double() @ wq.double().transpose(0, 1)   # |sum| < 2**53: exact
    y = acc * sx.double() * sw.double().reshape(-1)
    return y if bias is None else y + bias.double()


def int8_linear(x: torch.Tensor, w_codes_t: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inference W8A8 linear. ``w_codes_t``: (in, out) int8 (the transposed weight codes),
    ``w_scale``: (out,) float32. ``x``: (..., in) float; returns (..., out) in ``x.dtype``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if _cpu_fused() is not None and x2.device.type == "cpu" and x2.shape[-1] > 1 and x2.shape[0] > 0:
        # one C++ call (a custom op, opaque to torch.compile / export): quantize in one pass,
        # integer GEMM, scales and bias in one pass
        y = torch.ops.raad.linear_int8(x2.float().contiguous(), w_codes_t, w_scale.float().contiguous(),
                                       None if bias is None else bias.detach().float().contiguous())
        return y.to(x.dtype).reshape(*lead, w_codes_t.shape[1])
    xq, sx = quantize_rows_int8(x2)
    acc = _int_mm(xq, w_codes_t)
    scale = sx * w_scale                      # (M, 1) * (out,) → (M, out): the outer product
    y = acc.to(torch.float32).mul_(scale) if bias is None else torch.addcmul(bias.float(), acc.to(torch.float32), scale)
    return y.to(x.dtype).reshape(*lead, w_codes_t.shape[1])


try:  # the CPU extension's fused kernel, looked up once (None where it is not built)
    from ._cpu import linear_int8 as _FUSED_KERNEL
except ImportError:
    _FUSED_KERNEL = None


def _cpu_fused():
    """The CPU extension's fused W8A8 linear, or None where it is not built (``RAAD_LINEAR_FUSED=0``
    forces the torch path, for comparisons)."""
    if os.environ.get("RAAD_LINEAR_FUSED", "1") == "0":
        return None
    return _FUSED_KERNEL


@torch.library.custom_op("raad::linear_int8", mutates_args=())
def _linear_int8_op(x: torch.Tensor, w_codes_t: torch.Tensor, w_scale: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _FUSED_KERNEL(x, w_codes_t, w_scale, bias)


@_linear_int8_op.register_fake
def _(x, w_codes_t, w_scale, bias):
    return x.new_empty((x.shape[0], w_codes_t.shape[1]))


class QuantLinear(nn.Module):
    """An ``nn.Linear`` whose product runs at int8 × int8 → int32 (see the module notes)."""

    def __init__(self, float_module: nn.Linear, bits: int = 8):
        super().__init__()
        if not isinstance(float_module, nn.Linear):
            raise TypeError(f"QuantLinear takes an nn.Linear, got {type(float_module).__name__}")
        check_linear_bits(bits)
        self.in_features = float_module.in_features
        self.out_features = float_module.out_features
        self.bits = int(bits)
        self.weight = float_module.weight            # the same Parameter objects (mirrored)
        self.bias = float_module.bias
        object.__setattr__(self, "_float_module", float_module)
        self._cache = None                           # (key, codes_t, scale): not in state_dict

    def _weight_codes(self):
        w = self.weight
        if torch.compiler.is_compiling():
            # traced graphs quantize the weight in the graph (the cache is Python state)
            codes, scale = quantize_rows_int8(w.detach())
            return codes.t(), scale.reshape(-1)
        key = (w._version, w.data_ptr(), w.device, w.dtype)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                codes, scale = quantize_rows_int8(w.detach())
            self._cache = (key, codes.t(), scale.reshape(-1))   # (in, out) view: _int_mm takes it as is
        return self._cache[1], self._cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: input's last dim is {x.shape[-1]}, the layer takes "
                             f"{self.in_features} features")
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            y = F.linear(fake_quantize_rows(x.float(), 8), fake_quantize_rows(self.weight.float(), 8),
                         None if self.bias is None else self.bias.float())
            return y.to(x.dtype)
        codes_t, scale = self._weight_codes()
        return int8_linear(x, codes_t, scale, self.bias)

    def to_float(self) -> nn.Linear:
        return self._float_module

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def check_linear_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in LINEAR_BITS:
        raise ValueError(f"linear bits must be one of {LINEAR_BITS}, got {bits!r}")
    return bits


def check_under(model: nn.Module, under: Iterable[str], label: str) -> None:
    """Every prefix in ``under`` names a module of ``model``, else a PlanError naming each one
    that does not, with the nearest names (``label`` says where the prefixes came from)."""
    from .plan import PlanError, nearest_names
    names = [n for n, _ in model.named_modules() if n]
    bad = [p for p in under if p not in names and p != ""]
    if bad:
        raise PlanError("\n".join(f"{label} names module {p!r}, which the model does not have; nearest "
                                   f"names: {', '.join(nearest_names(p, names)) or '(none)'}" for p in bad))


def quantize_linears(model: nn.Module, bits: int = 8, *, under: Optional[Iterable[str]] = None,
                     filter_fn: Optional[Callable[[str, nn.Module], bool]] = None) -> list[str]:
    """Swap ``nn.Linear`` modules of ``model`` for :class:`QuantLinear`, in place; returns the
    names swapped. ``under``: module-name prefixes (``"student.blocks"``) that limit the swap to
    those sub-trees; each must name a module of ``model``. ``filter_fn(name, module)`` limits it
    further. Already-quantized linears are left as they are."""
    check_linear_bits(bits)
    if isinstance(model, nn.Linear):
        raise TypeError("quantize_linears swaps the linears inside a model; for a single layer use "
                        "QuantLinear(linear)")
    prefixes = None if under is None else [str(p) for p in under]
    check_under(model, prefixes or (), "linears: 'under'")
    swapped = []
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear:
            continue
        if prefixes is not None and not any(p == "" or name == p or name.startswith(p + ".") for p in prefixes):
            continue
        if filter_fn is not None and not filter_fn(name, m):
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, QuantLinear(m, bits))
        swapped.append(name)
    return swapped
