"""raad-kernels: mixed-precision (int8/int4/int2) attention with fused attention maps."""

from .api import quant_attention
from .dispatch import BackendStatus, backends
from .reference import attention_reference
from .linear import QuantLinear, quantize_linears
from .nn import QuantAttention, quantize_model
from .plan import load_plan, save_plan

__all__ = ["quant_attention", "backends", "BackendStatus", "attention_reference",
           "QuantAttention", "quantize_model", "QuantLinear", "quantize_linears", "load_plan", "save_plan"]
__version__ = "0.1.0"
