"""Drop-in modules: swap the attention of a ViT you already have for quantized attention.

::

    import raad_kernels as rk
    model = timm.create_model("vit_small_patch16_224", pretrained=True)
    model = rk.quantize_model(model, 4)          # or a plan: dict, JSON path, callable

:class:`QuantAttention` takes over one float attention module. It *mirrors* the float module:
the same Parameter objects, buffers and child modules under the same names (shared, never
copied), so the two state_dicts are interchangeable and training one trains the other. Each
supported architecture is a small subclass whose ``forward`` keeps the float module's signature
and return type and replaces only the attention product by :func:`raad_kernels.ops.attention`:

=====================  ====================================================================
subclass               float modules (exact classes)
=====================  ====================================================================
TimmAttention          ``timm.layers.attention.Attention`` (ViT, DeiT, DINO, DINOv2, with
                       registers, qk-norm, fused qkv)
TimmRopeAttention      ``timm.layers.attention.AttentionRope``, ``timm.models.eva.EvaAttention``
                       (fused or separate q/k/v, RoPE, grouped K/V heads)
MultiheadAttention     ``torch.nn.MultiheadAttention`` (torchvision ``VisionTransformer``
                       encoder blocks, ``nn.TransformerEncoderLayer``)
HFViTAttention         transformers ``ViTAttention``, ``DeiTAttention``, ``Dinov2Attention``,
                       ``Dinov2WithRegistersAttention`` (the whole attention: self-attention
                       and output projection)
=====================  ====================================================================

Bits: ``qk_bits`` 2, 4, 8 (or 16 = float), ``pv_bits`` 8 or 16; 16/16 runs the float module's
arithmetic through SDPA. Inference calls the ``raad::quant_attention`` custom op (one opaque node
under ``torch.compile``); with gradients it runs the differentiable fake quantization (STE).
"""

from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from . import plan as plan_mod
from .dispatch import BACKENDS

__all__ = ["QuantAttention", "TimmAttention", "TimmRopeAttention", "MultiheadAttention",
           "HFViTAttention", "QuantReport", "quantize_model", "supported_classes"]

#: Attributes of QuantAttention itself; never copied from the float module.
_OWN_ATTRS = ("qk_bits", "pv_bits", "backend", "smooth_k", "rotate", "keep_maps", "maps")


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_module_bits(qk_bits, pv_bits):
    try:
        return plan_mod.check_bits(qk_bits, pv_bits)
    except plan_mod.PlanError as e:
        raise ValueError(str(e)) from None


class QuantAttention(nn.Module):
    """Quantized drop-in for a float attention module; build it with :meth:`from_module`.

    Attributes: ``qk_bits``, ``pv_bits``, ``backend``, ``smooth_k``, ``rotate`` (see
    :func:`raad_kernels.quant_attention`); ``keep_maps`` (default False): when True each forward
    stores the maps of its attention in ``maps`` = ``{"cls", "received", "entropy"}`` (float32,
    detached; shapes (B, H, Nk), (B, H, Nk), (B, H, Nq)). Off, nothing is computed or kept.
    Attention dropout is applied at 16/16 only (float path).
    """

    #: Qualified names of the float classes a subclass takes over (exact class, or a subclass
    #: that does not override ``forward``).
    float_classes: tuple[str, ...] = ()
    #: Private attributes of the float module the subclass needs (public ones are all copied).
    private_attrs: tuple[str, ...] = ()

    def __init__(self, float_module: nn.Module, qk_bits: int = 8, pv_bits: int = 8, *,
                 backend: str = "auto", smooth_k: bool = True, rotate: Optional[bool] = None):
        if type(self) is QuantAttention:
            raise TypeError("build a QuantAttention with QuantAttention.from_module(module, qk_bits, pv_bits)")
        super().__init__()
        object.__setattr__(self, "_float_module", float_module)   # not a submodule: no double state
        fm = float_module
        for name, p in fm._parameters.items():
            self.register_parameter(name, p)                      # the same Parameter objects
        for name, b in fm._buffers.items():
            self.register_buffer(name, b, persistent=name not in fm._non_persistent_buffers_set)
        for name, child in fm._modules.items():
            self.add_module(name, child)
        for name, value in vars(fm).items():
            private = name.startswith("_") and name not in self.private_attrs
            if private or name == "training" or name in _OWN_ATTRS or callable(value):
                continue
            if name not in self._parameters and name not in self._buffers and name not in self._modules:
                object.__setattr__(self, name, value)
        self.training = fm.training
        self.qk_bits, self.pv_bits = _check_module_bits(qk_bits, pv_bits)
        if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        if not isinstance(smooth_k, bool):
            raise TypeError(f"smooth_k must be a bool, got {type(smooth_k).__name__}")
        if rotate is not None and not isinstance(rotate, bool):
            raise TypeError(f"rotate must be a bool or None, got {type(rotate).__name__}")
        self.backend = backend
        self.smooth_k = smooth_k
        self.rotate = rotate
        self.keep_maps = False
        self.maps = None

    # ---------------------------------------------------------------------------------------
    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> Optional[str]:
        """Why this subclass cannot take over ``module`` (a configuration it does not handle)."""
        return None

    @staticmethod
    def from_module(module: nn.Module, qk_bits: int = 8, pv_bits: int = 8, *, backend: str = "auto",
                    smooth_k: bool = True, rotate: Optional[bool] = None) -> "QuantAttention":
        """Take over ``module`` (see :func:`supported_classes`); parameters are shared."""
        if isinstance(module, QuantAttention):
            raise TypeError("module is already a QuantAttention; use .set_bits(qk_bits, pv_bits)")
        sub, reason = _adapter_for(module)
        if reason is not None:
            raise ValueError(f"cannot take over {_qualname(type(module))}: {reason}")
        if sub is None:
            raise TypeError(f"{_qualname(type(module))} is not a supported attention module; "
                            f"supported: {', '.join(supported_classes())}")
        return sub(module, qk_bits, pv_bits, backend=backend, smooth_k=smooth_k, rotate=rotate)

    def set_bits(self, qk_bits: int, pv_bits: Optional[int] = None) -> "QuantAttention":
        if pv_bits is None:
            pv_bits = plan_mod.default_pv_bits(qk_bits)
        self.qk_bits, self.pv_bits = _check_module_bits(qk_bits, pv_bits)
        return self

    @property
    def float_class(self) -> str:
        return _qualname(type(self._float_module))

    def to_float(self) -> nn.Module:
        """The float module, holding this module's current parameters, buffers and children."""
        fm = self._float_module
        fm._parameters.update(self._parameters)
        fm._buffers.update(self._buffers)
        fm._modules.update(self._modules)
        fm.train(self.training)
        return fm

    def extra_repr(self) -> str:
        return (f"float={type(self._float_module).__name__}, qk_bits={self.qk_bits}, pv_bits={self.pv_bits}, "
                f"backend={self.backend!r}")

    # ---------------------------------------------------------------------------------------
    def attend(self, q, k, v, *, attn_mask=None, scale=None, dropout_p: float = 0.0):
        """The attention product of the float module, (B, H, N, D) → (B, H, Nq, Dv)."""
        keep = self.keep_maps
        if keep and torch.jit.is_tracing():
            raise RuntimeError("keep_maps=True stores Python state that torch.jit.trace cannot record; "
                               "set keep_maps=False to trace, or use torch.compile / torch.export")
        out, maps = ops.attention(q, k, v, qk_bits=self.qk_bits, pv_bits=self.pv_bits, scale=scale,
                                  attn_mask=attn_mask, smooth_k=self.smooth_k, rotate=self.rotate,
                                  backend=self.backend, return_maps=keep, dropout_p=dropout_p)
        if keep:
            self.maps = maps
        return out


# ===========================================================================================
# timm
# ===========================================================================================

class _TimmBase(QuantAttention):
    _optional = ("qkv", "q_proj", "k_proj", "v_proj", "gate", "q_bias", "k_bias", "v_bias")
    _required = ("num_heads", "head_dim", "scale", "q_norm", "k_norm", "proj", "attn_drop", "proj_drop")

    @classmethod
    def unsupported_reason(cls, m):
        missing = [a for a in cls._required if not hasattr(m, a)]
        if getattr(m, "qkv", None) is None and getattr(m, "q_proj", None) is None:
            missing.append("qkv or q_proj/k_proj/v_proj")
        if missing:
            return (f"{_qualname(type(m))} lacks {missing}: this timm version's attention differs from "
                    "the one supported")
        return None

    def __init__(self, float_module, *args, **kwargs):
        super().__init__(float_module, *args, **kwargs)
        for a in self._optional:   # timm keeps unused projections as plain None attributes
            if not hasattr(self, a):
                object.__setattr__(self, a, getattr(float_module, a, None))

    def _timm_forward(self, x, rope, attn_mask, is_causal):
        B, N, _ = x.shape
        H = self.num_heads
        Hkv = getattr(self, "num_kv_heads", None) or H
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            if self.q_bias is None:
                qkv = self.qkv(x)
            else:
                bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                if getattr(self, "qkv_bias_separate", False):
                    qkv = self.qkv(x) + bias
                else:
                    qkv = F.linear(x, weight=self.qkv.weight, bias=bias)
            q, k, v = qkv.reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(x).reshape(B, N, H, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, Hkv, -1).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, Hkv, -1).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            from timm.layers.pos_embed_sincos import apply_rot_embed_cat
            npt = self.num_prefix_tokens
            half = getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        if Hkv != H:
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        if is_causal:   # timm: is_causal takes precedence over attn_mask
            attn_mask = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
        o = self.attend(q, k, v, attn_mask=attn_mask, scale=self.scale,
                        dropout_p=self.attn_drop.p if self.training else 0.0)
        x = o.transpose(1, 2).reshape(B, N, -1)
        x = self.norm(x) if hasattr(self, "norm") else x
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class TimmAttention(_TimmBase):
    """timm ``Attention`` (``timm.layers.Attention``): every ViT/DeiT/DINO/DINOv2 block."""

    float_classes = ("timm.layers.attention.Attention",)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        return self._timm_forward(x, None, attn_mask, is_causal)


class TimmRopeAttention(_TimmBase):
    """timm ``AttentionRope`` and EVA's ``EvaAttention``: fused or separate q/k/v, RoPE."""

    float_classes = ("timm.layers.attention.AttentionRope", "timm.models.eva.EvaAttention")

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        return self._timm_forward(x, rope, attn_mask, is_causal)


# ===========================================================================================
# torch.nn.MultiheadAttention (torchvision VisionTransformer encoder blocks)
# ===========================================================================================

_warned_need_weights = False


def _mha_mask(attn_mask, key_padding_mask, b, h, l, s, dtype):
    """nn.MultiheadAttention masks (bool True = *masked out*, or additive float; attn_mask (L, S)
    or (B·H, L, S), key_padding_mask (B, S)) → one SDPA-style mask (bool True = attend, or
    additive float) broadcastable to (B, H, L, S)."""
    parts = []
    if attn_mask is not None:
        parts.append(attn_mask.reshape(b, h, l, s) if attn_mask.dim() == 3 else attn_mask)
    if key_padding_mask is not None:
        parts.append(key_padding_mask.reshape(b, 1, 1, s))
    if not parts:
        return None
    if all(p.dtype == torch.bool for p in parts):
        masked = parts[0] if len(parts) == 1 else parts[0] | parts[1]
        return ~masked
    bias = None
    for p in parts:
        if p.dtype == torch.bool:
            p = torch.zeros(p.shape, dtype=dtype, device=p.device).masked_fill(p, float("-inf"))
        else:
            p = p.to(dtype)
        bias = p if bias is None else bias + p
    return bias


class MultiheadAttention(QuantAttention):
    """``torch.nn.MultiheadAttention``: batch_first or not, batched or not, self- or cross-
    attention, separate q/k/v projection weights (kdim/vdim), attn_mask / key_padding_mask.

    ``need_weights=True`` (the PyTorch default) returns ``(out, None)`` at quantized bits (the
    N×N weights never exist; a warning says so once; use ``keep_maps``). At 16/16 bits with
    ``need_weights=True`` the float module's code runs, weights included.
    """

    float_classes = ("torch.nn.modules.activation.MultiheadAttention",)
    private_attrs = ("_qkv_same_embed_dim",)

    @classmethod
    def unsupported_reason(cls, m):
        if m.bias_k is not None or m.bias_v is not None:
            return "nn.MultiheadAttention(add_bias_kv=True) is not supported"
        if m.add_zero_attn:
            return "nn.MultiheadAttention(add_zero_attn=True) is not supported"
        return None

    def __init__(self, float_module, *args, **kwargs):
        super().__init__(float_module, *args, **kwargs)
        self._same_embed = float_module._qkv_same_embed_dim
        # nn.TransformerEncoderLayer's inference fast path reads self_attn.in_proj_weight and runs
        # a fused float kernel, bypassing this module; it is taken only when this flag is True.
        self._qkv_same_embed_dim = False

    def _float_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                       average_attn_weights, is_causal):
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        sep = not self._same_embed
        out, w = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight,
            self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask, use_separate_proj_weight=sep,
            q_proj_weight=self.q_proj_weight if sep else None, k_proj_weight=self.k_proj_weight if sep else None,
            v_proj_weight=self.v_proj_weight if sep else None, average_attn_weights=average_attn_weights,
            is_causal=is_causal)
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, w

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("QuantAttention does not take nested tensors; build nn.TransformerEncoder "
                             "with enable_nested_tensor=False")
        if self.qk_bits == ops.FLOAT_BITS and need_weights and not self.keep_maps:
            return self._float_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, E = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim
        if self._same_embed:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, w_q, b_q).view(B, L, H, D).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(B, S, H, D).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(B, S, H, D).transpose(1, 2)
        mask = _mha_mask(attn_mask, key_padding_mask, B, H, L, S, q.dtype)
        o = self.attend(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        o = self.out_proj(o.transpose(1, 2).reshape(B, L, H * D))
        if not batched:
            o = o.squeeze(0)
        elif not self.batch_first:
            o = o.transpose(0, 1)
        if need_weights:
            global _warned_need_weights
            if not _warned_need_weights:
                _warned_need_weights = True
                warnings.warn("QuantAttention(nn.MultiheadAttention) returns None for the attention weights "
                              "(need_weights=True): quantized attention never forms the N×N matrix; use "
                              "module.keep_maps = True for the cls/received/entropy maps", stacklevel=2)
        return o, None


# ===========================================================================================
# Hugging Face transformers: ViT, DeiT, DINOv2 (with registers)
# ===========================================================================================

class HFViTAttention(QuantAttention):
    """transformers ``ViTAttention`` and its copies (``DeiTAttention``, ``Dinov2Attention``,
    ``Dinov2WithRegistersAttention``): takes over the whole attention (the inner
    ``*SelfAttention``'s query/key/value and the ``*SelfOutput`` projection), keeping the
    children ``attention`` and ``output`` so state_dict keys do not change. ``head_mask`` (one
    factor per head) scales each head's output, as the eager path does to its probabilities.
    ``output_attentions`` yields nothing for swapped layers (no N×N matrix; use ``keep_maps``).
    """

    float_classes = tuple(f"transformers.models.{m}.modeling_{m}.{c}" for m, c in (
        ("vit", "ViTAttention"), ("deit", "DeiTAttention"), ("dinov2", "Dinov2Attention"),
        ("dinov2_with_registers", "Dinov2WithRegistersAttention")))

    @classmethod
    def unsupported_reason(cls, m):
        params = tuple(inspect.signature(type(m).forward).parameters)
        if params != ("self", "hidden_states", "head_mask"):
            return (f"{_qualname(type(m))}.forward{params[1:]} differs from the supported signature "
                    "(hidden_states, head_mask) of transformers 4.5x")
        sa = getattr(m, "attention", None)
        need = ("query", "key", "value", "num_attention_heads", "attention_head_size", "all_head_size", "scaling")
        if sa is None or not all(hasattr(sa, a) for a in need) or not hasattr(getattr(m, "output", None), "dense"):
            return f"{_qualname(type(m))} does not have the layout attention.{{query,key,value}} + output.dense"
        return None

    def forward(self, hidden_states: torch.Tensor, head_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        sa = self.attention
        B = hidden_states.shape[0]
        shape = (B, -1, sa.num_attention_heads, sa.attention_head_size)
        k = sa.key(hidden_states).view(*shape).transpose(1, 2)
        v = sa.value(hidden_states).view(*shape).transpose(1, 2)
        q = sa.query(hidden_states).view(*shape).transpose(1, 2)
        o = self.attend(q, k, v, scale=sa.scaling, dropout_p=sa.dropout_prob if self.training else 0.0)
        if head_mask is not None:
            if head_mask.dim() > 2 and any(n != 1 for n in head_mask.shape[-2:]):
                raise ValueError(f"head_mask of shape {tuple(head_mask.shape)}: only one factor per head "
                                 "(trailing dims 1) is supported by QuantAttention")
            o = o * head_mask
        ctx = o.transpose(1, 2).reshape(B, -1, sa.all_head_size)
        return self.output(ctx, hidden_states)


# ===========================================================================================
# Registry
# ===========================================================================================

ADAPTERS: list[type[QuantAttention]] = [TimmAttention, TimmRopeAttention, MultiheadAttention, HFViTAttention]


def supported_classes() -> list[str]:
    return [c for a in ADAPTERS for c in a.float_classes]


def _adapter_for(module: nn.Module):
    """(subclass, None) if ``module`` can be taken over, else (None, reason or None)."""
    t = type(module)
    for klass in t.__mro__:
        qn = _qualname(klass)
        for sub in ADAPTERS:
            if qn in sub.float_classes:
                if klass is not t and t.forward is not klass.forward:
                    return None, f"{_qualname(t)} subclasses {qn} with its own forward"
                reason = sub.unsupported_reason(module)
                return (None, reason) if reason else (sub, None)
    return None, None


_ATTN_CLASS = re.compile(r"attention|attn", re.IGNORECASE)
_ATTN_NAMES = ("attn", "attention", "self_attn", "self_attention")


def _looks_like_attention(name: str, module: nn.Module) -> bool:
    if _ATTN_CLASS.search(type(module).__name__):
        return True
    has_state = next(iter(module.parameters()), None) is not None
    return has_state and name.rsplit(".", 1)[-1] in _ATTN_NAMES


# ===========================================================================================
# quantize_model
# ===========================================================================================

@dataclass
class SwapEntry:
    name: str
    float_class: str
    qk_bits: int
    pv_bits: int
    backend: str
    score: Optional[float] = None


@dataclass
class QuantReport:
    """What :func:`quantize_model` did; kept on the model as ``model.raad_report``."""

    swapped: list[SwapEntry] = field(default_factory=list)
    #: Supported attention modules the plan left in float: (name, class, why).
    kept_float: list[tuple[str, str, str]] = field(default_factory=list)
    #: Attention modules that cannot be swapped: (name, class, reason).
    unswappable: list[tuple[str, str, str]] = field(default_factory=list)
    #: ``nn.Linear`` modules now running as W8A8 :class:`~raad_kernels.linear.QuantLinear`.
    linears: list[str] = field(default_factory=list)
    #: The plan's ``autocast`` section as applied ({"dtype", "modules"}), or None.
    autocast: Optional[dict] = None
    #: The modules whose forward runs compiled (the plan's ``compile`` section).
    compiled: list[str] = field(default_factory=list)

    def plan(self, avg_bits: Optional[float] = None) -> dict:
        """The swapped modules as a plan in the file format (for :func:`save_plan`)."""
        layers = {}
        for e in self.swapped:
            layers[e.name] = {"qk_bits": e.qk_bits, "pv_bits": e.pv_bits}
            if e.score is not None:
                layers[e.name]["score"] = e.score
        out = {"version": plan_mod.PLAN_VERSION}
        if avg_bits is not None:
            out["avg_bits"] = float(avg_bits)
        out["layers"] = layers
        if self.linears:
            out["linears"] = {"bits": 8, "under": list(self.linears)}
        if self.autocast:
            out["autocast"] = dict(self.autocast)
        if self.compiled:
            out["compile"] = {"modules": list(self.compiled)}
        return out

    def __str__(self) -> str:
        lines = [f"raad-kernels: {len(self.swapped)} attention module(s) quantized, "
                 f"{len(self.kept_float)} left float, {len(self.unswappable)} unswappable"]
        for e in self.swapped:
            lines.append(f"  swapped     {e.name or '<root>'}  ({e.float_class.rsplit('.', 1)[-1]})  "
                         f"qk_bits={e.qk_bits} pv_bits={e.pv_bits} backend={e.backend}")
        for n, c, why in self.kept_float:
            lines.append(f"  float       {n or '<root>'}  ({c.rsplit('.', 1)[-1]})  {why}")
        for n, c, why in self.unswappable:
            lines.append(f"  UNSWAPPABLE {n or '<root>'}  ({c.rsplit('.', 1)[-1]})  {why}")
        if self.linears:
            lines.append(f"  {len(self.linears)} linear layer(s) at int8 (W8A8): {', '.join(self.linears)}")
        if self.autocast:
            lines.append(f"  under {self.autocast['dtype']} autocast: {', '.join(self.autocast['modules'])}")
        if self.compiled:
            lines.append(f"  compiled: {', '.join(self.compiled)}")
        return "\n".join(lines)


def _classify(model: nn.Module):
    """Walk ``model`` → (candidates {name: module}, unswappable [(name, class, reason)],
    covered {name of a module inside a candidate: candidate name})."""
    candidates, unswappable, covered = {}, [], {}
    owners: list[str] = []   # names whose descendants are not looked at
    for name, m in model.named_modules():
        owner = next((o for o in owners if o == "" or name.startswith(o + ".")), None)
        if owner is not None:
            covered[name] = owner
            continue
        if isinstance(m, QuantAttention):
            candidates[name] = m
            owners.append(name)
            continue
        sub, reason = _adapter_for(m)
        if sub is not None:
            candidates[name] = m
            owners.append(name)
        elif reason is not None:
            unswappable.append((name, _qualname(type(m)), reason))
            owners.append(name)
        elif _looks_like_attention(name, m):
            unswappable.append((name, _qualname(type(m)),
                                "not a supported attention class (see raad_kernels.nn.supported_classes())"))
            owners.append(name)
    return candidates, unswappable, covered


def _resolve(plan):
    """plan → ("uniform", bits) | ("layers", {name: (bits, score)}, source) | ("fn", callable)."""
    if isinstance(plan, bool):
        raise TypeError("plan must be an int, a dict, a path to a JSON plan or a callable; got a bool")
    if isinstance(plan, int):
        return ("uniform", plan_mod.parse_bits(plan, "plan"))
    if isinstance(plan, (str, bytes)) or hasattr(plan, "__fspath__") or isinstance(plan, dict):
        source = plan if not isinstance(plan, dict) else None
        data = plan_mod.load_plan(plan)
        layers = {n: ((e["qk_bits"], e["pv_bits"]), e.get("score")) for n, e in data["layers"].items()}
        return ("layers", layers, source, data.get("linears"), data.get("autocast"), data.get("compile"))
    if callable(plan):
        return ("fn", plan)
    raise TypeError(f"plan must be an int, a dict, a path to a JSON plan or a callable (name, module) -> "
                    f"bits | None; got {type(plan).__name__}")


def quantize_model(model: nn.Module, plan, *, backend: str = "auto", verbose: bool = False,
                   filter_fn: Optional[Callable[[str, nn.Module], bool]] = None, smooth_k: bool = True,
                   rotate: Optional[bool] = None, linear_bits: Optional[int] = None) -> nn.Module:
    """Swap the model's attention modules for :class:`QuantAttention`, in place; returns the model.

    ``plan``: an int (uniform ``qk_bits``; P·V at 8 bits, or 16 with 16), a dict (the plan file
    format, or ``{module name: bits}``), a path to a JSON plan, or a callable
    ``(name, module) -> bits | None`` (None leaves the module float). ``bits`` is an int, a
    ``(qk_bits, pv_bits)`` pair or a ``{"qk_bits", "pv_bits"}`` dict. ``filter_fn(name, module)``
    further limits which modules are swapped. ``linear_bits=8`` also runs every ``nn.Linear`` of
    the model as W8A8 (:mod:`raad_kernels.linear`); a plan file's ``linears`` section does the
    same for the module-name prefixes it lists, and its ``autocast`` section runs the modules it
    names under ``torch.autocast`` (:mod:`raad_kernels.autocast`), its ``compile`` section compiles the
    modules it names (:mod:`raad_kernels.compiled`). Modules that are already ``QuantAttention`` get the
    plan's bits. A plan naming a module the model does not have (or one that cannot be swapped)
    is refused with the nearest names. The report (swapped, left float, unswappable) is kept as
    ``model.raad_report`` and printed with ``verbose=True``. If ``model`` is itself an attention
    module, the returned object is its replacement.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    resolved = _resolve(plan)
    from .linear import QuantLinear, check_linear_bits, check_under, quantize_linears
    linears = dict(resolved[3] or {}) if resolved[0] == "layers" else {}
    if linear_bits is not None:
        linears["bits"] = check_linear_bits(linear_bits)
    autocast = resolved[4] if resolved[0] == "layers" else None
    compiled = resolved[5] if resolved[0] == "layers" else None
    for section, spec in (("autocast", autocast), ("compile", compiled)):
        if not spec:   # checked before anything is swapped: a bad plan changes nothing
            continue
        all_mods = dict(model.named_modules())
        bad = [n for n in spec["modules"] if n not in all_mods]
        if bad:
            raise plan_mod.PlanError(f"{plan_mod._where(resolved[2])}: {section} names module(s) {bad} that "
                                     f"the model does not have; nearest: "
                                     f"{', '.join(plan_mod.nearest_names(bad[0], all_mods)) or '(none)'}")
    if linears.get("under"):   # checked before anything is swapped: a bad plan changes nothing
        source = resolved[2] if resolved[0] == "layers" else None
        check_under(model, linears["under"], f"{plan_mod._where(source)}: linears.under")
    candidates, unswappable, covered = _classify(model)

    if resolved[0] == "layers":
        layers, source = resolved[1], resolved[2]
        all_names = [n for n, _ in model.named_modules() if n]
        unusable = {n: r for n, _, r in unswappable}
        errors = []
        for name in layers:
            if name in candidates:
                continue
            if name in unusable:
                errors.append(f"{plan_mod._where(source)}: module {name!r} cannot be swapped: {unusable[name]}")
            elif name in covered:
                errors.append(f"{plan_mod._where(source)}: module {name!r} is part of the attention module "
                              f"{covered[name]!r}; name that one instead")
            elif name in all_names:
                near = plan_mod.nearest_names(name, candidates)
                errors.append(f"{plan_mod._where(source)}: module {name!r} is a "
                              f"{type(model.get_submodule(name)).__name__}, not an attention module; "
                              f"nearest attention modules: {', '.join(near) or '(none)'}")
            else:
                errors.append(str(plan_mod.unknown_name_error(name, candidates, all_names, source)))
        if errors:
            raise plan_mod.PlanError("\n".join(errors))

    report = QuantReport(unswappable=list(unswappable))
    # every (parent, attribute) that refers to each module, so shared modules are swapped everywhere
    refs: dict[int, list[tuple[nn.Module, str]]] = {}
    for pname, parent in model.named_modules(remove_duplicate=False):
        for cname, child in parent._modules.items():
            if child is not None:
                refs.setdefault(id(child), []).append((parent, cname))
    # decide every module first, so a plan that fails part-way changes nothing
    decisions = []
    for name, m in candidates.items():
        score = None
        if filter_fn is not None and not filter_fn(name, m):
            bits, why = None, "excluded by filter_fn"
        elif resolved[0] == "uniform":
            bits, why = resolved[1], ""
        elif resolved[0] == "layers":
            bits, score = resolved[1].get(name, (None, None))
            why = "not named in the plan"
        else:
            r = resolved[1](name, m)
            bits = None if r is None else plan_mod.parse_bits(r, f"plan({name!r})")
            why = "plan returned None"
        decisions.append((name, m, bits, score, why))

    new_root = model
    for name, m, bits, score, why in decisions:
        if bits is None:
            if isinstance(m, QuantAttention):
                report.swapped.append(SwapEntry(name, m.float_class, m.qk_bits, m.pv_bits, m.backend))
            else:
                report.kept_float.append((name, _qualname(type(m)), why))
            continue
        qk, pv = bits
        if isinstance(m, QuantAttention):
            m.set_bits(qk, pv)
            m.backend = backend
            qa = m
        else:
            qa = QuantAttention.from_module(m, qk, pv, backend=backend, smooth_k=smooth_k, rotate=rotate)
            if name == "":
                new_root = qa
            for parent, attr in refs.get(id(m), []):
                setattr(parent, attr, qa)
        report.swapped.append(SwapEntry(name, qa.float_class, qk, pv, backend, score))

    if linears:
        quantize_linears(new_root, linears["bits"], under=linears.get("under"))
    report.linears = [n for n, m in new_root.named_modules() if isinstance(m, QuantLinear)]
    from .compiled import compile_modules, is_compiled, remove_compiled
    for m in new_root.modules():   # a plan applied again: compiled last, around the autocast
        if is_compiled(m):
            remove_compiled(m)
    if autocast:
        from .autocast import autocast_modules
        report.autocast = {"dtype": autocast["dtype"],
                           "modules": autocast_modules(new_root, autocast["dtype"], autocast["modules"])}
    if compiled:
        report.compiled = compile_modules(new_root, compiled["modules"])
    object.__setattr__(new_root, "raad_report", report)
    if verbose:
        print(report)
    if report.unswappable:
        names = ", ".join(n or "<root>" for n, _, _ in report.unswappable)
        warnings.warn(f"raad-kernels: {len(report.unswappable)} attention module(s) could not be swapped "
                      f"and stay float: {names} (see model.raad_report)", stacklevel=2)
    return new_root
