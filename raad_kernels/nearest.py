"""Nearest-neighbour search for a memory of normal features (raad.memory): each query row's
squared L2 distance to its nearest bank row.

The arithmetic, as :func:`nearest_sq_distance_reference` specifies it in torch:
min_j |q − b_j|² = |q|² + min_j (|b_j|² − 2 q·b_j), clamped at 0 (float32 rounding can take a
query that is in the bank slightly below it). Through torch that is a GEMM whose (queries ×
bank) output is written and read back for the min; the CPU extension's kernel keeps each block
of it in registers instead (``RAAD_NEAREST_FUSED=0`` forces the torch path, for comparisons).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .linear import quantize_rows_int8

try:  # the CPU extension's kernel (None where it is not built)
    from ._cpu import nearest_sq_distance as _FUSED_KERNEL
except ImportError:
    _FUSED_KERNEL = None

_COLS = 64  # the kernel takes the bank in blocks of 64 rows (csrc/cpu/nearest.h)


def nearest_sq_distance_reference(query: torch.Tensor, bank: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The torch specification, in chunks of ``chunk`` query rows, so the (chunk, N) block of
    distances stays in cache."""
    b_sq = bank.pow(2).sum(1)
    bank_t = bank.T.contiguous()
    out = torch.empty(len(query), dtype=query.dtype, device=query.device)
    for i in range(0, len(query), chunk):
        q = query[i:i + chunk]
        out[i:i + chunk] = torch.addmm(b_sq, q, bank_t, alpha=-2.0).amin(1) + q.pow(2).sum(1)
    return out.clamp_min(0)


def prepare_bank(bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bank transposed and padded to a multiple of 64 rows, the rows' squared norms with +inf
    for the padding): what the kernel reads; made once per bank."""
    n = len(bank)
    pad = (-n) % _COLS
    bank_t = F.pad(bank.T.float(), (0, pad)).contiguous()
    b_sq = F.pad(bank.float().pow(2).sum(1), (0, pad), value=float("inf")).contiguous()
    return bank_t, b_sq


def _check(query: torch.Tensor, bank: torch.Tensor) -> None:
    if query.shape[-1] != bank.shape[-1] or query.dim() != 2 or bank.dim() != 2 or len(bank) == 0:
        raise ValueError(f"query must be (M, C) and bank (N >= 1, C); got {tuple(query.shape)} and "
                         f"{tuple(bank.shape)}")


def _kernel_applies(kernel, query: torch.Tensor) -> bool:
    """Whether ``kernel`` (None where not built) takes this query: CPU, non-empty, and not
    switched off by ``RAAD_NEAREST_FUSED=0``."""
    return (kernel is not None and os.environ.get("RAAD_NEAREST_FUSED", "1") != "0"
            and query.device.type == "cpu" and len(query) > 0)


def nearest_sq_distance(query: torch.Tensor, bank: torch.Tensor, prepared=None) -> torch.Tensor:
    """(M,) squared distances of ``query`` (M, C) rows to their nearest ``bank`` (N, C) row.
    ``prepared``: :func:`prepare_bank` of ``bank``, when the caller keeps it."""
    _check(query, bank)
    if _kernel_applies(_FUSED_KERNEL, query) and query.dtype == torch.float32:
        bank_t, b_sq = prepared if prepared is not None else prepare_bank(bank)
        return _FUSED_KERNEL(query.contiguous(), bank_t, b_sq)
    return nearest_sq_distance_reference(query, bank)


# -- int8 ------------------------------------------------------------------------------------
# The same search with int8 dot products, for the quantized plan: the bank is quantized once per
# tensor (symmetric, s_b = max|b| / 127), each query per row (s_q = max|q| / 127), rounding half
# to even; the squared norms stay float: min_j (|b_j|² − 2 s_q s_b · q8·b8_j) + |q|², at 0 or
# above. Both scales are shared across channels, so the channels must have comparable ranges
# (raad's memory whitens them first; one channel far wider than the others costs the rest their
# resolution).
# The quantizer is the W8A8 linears' (raad_kernels.linear.quantize_rows_int8). On AVX-512 VNNI
# the CPU kernel runs it (vpdpbusd: the query shifted by +128 to unsigned, the shift's share
# 128·Σ_c b8_jc taken back); elsewhere the specification in float32 (_int8_search_float32).

try:
    from ._cpu import capabilities as _capabilities
    from ._cpu import nearest_sq_distance_i8 as _INT8_KERNEL
    if not _capabilities()["avx512vnni"]:
        _INT8_KERNEL = None
except ImportError:
    _INT8_KERNEL = None


def prepare_bank_int8(bank: torch.Tensor) -> dict:
    """The bank's int8 codes (padded to a multiple of 4 channels and 64 rows), its scale, its
    float squared norms (+inf for the padding) and, for the kernel, the packed codes."""
    n, c = bank.shape
    bank = bank.float()
    codes, s_b = quantize_rows_int8(bank.reshape(1, -1))                        # one scale for all
    s_b = float(s_b)
    pad_c, pad_n = (-c) % 4, (-n) % _COLS
    codes = F.pad(codes.view(n, c), (0, pad_c, 0, pad_n))                      # (N', K')
    b_sq = F.pad(bank.pow(2).sum(1), (0, pad_n), value=float("inf")).contiguous()
    n2, k2 = codes.shape
    packed = codes.view(n2 // 16, 16, k2 // 4, 4).permute(0, 2, 1, 3).contiguous()
    col128 = (128 * codes.to(torch.int32).sum(1)).to(torch.int32).contiguous()
    return {"codes": codes, "s_b": s_b, "b_sq": b_sq, "packed": packed, "col128": col128}


def _query_codes(query: torch.Tensor, prepared: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the query's int8 codes, padded to the bank's channels; their row scales)."""
    return quantize_rows_int8(F.pad(query.float(), (0, prepared["codes"].shape[1] - query.shape[1])))


def nearest_sq_distance_int8_reference(query: torch.Tensor, prepared: dict) -> torch.Tensor:
    """The torch specification of the int8 search (exact integer dot products, in float64)."""
    codes, s_q = _query_codes(query, prepared)
    dots = codes.double() @ prepared["codes"].double().T                          # exact: |sum| < 2**53
    d = prepared["b_sq"].double() - 2.0 * s_q.double() * prepared["s_b"] * dots
    return (d.amin(1) + query.double().pow(2).sum(1)).clamp_min(0).float()


def _int8_search_float32(query: torch.Tensor, prepared: dict, chunk: int = 512) -> torch.Tensor:
    """The int8 search without the VNNI kernel: the specification in float32, in row chunks that
    stay in cache (the float64 specification is an order of magnitude slower; this runs at the
    fp32 kernel's speed).
    Each query row's codes are scaled by its -2 s_q s_b before one float32 GEMM that also adds the
    bank's norms: the products round once more than the kernel's exact integer sums (relative
    2^-24 each), far below the int8 codes' own error."""
    codes, s_q = _query_codes(query, prepared)
    bank = prepared["codes"].float().T.contiguous()
    # each query row's codes times its -2 s_q s_b: one GEMM adds the norms, one pass takes the min
    q_scaled = codes.float() * ((-2.0 * prepared["s_b"]) * s_q.reshape(-1, 1))
    out = torch.empty(len(query))
    for i in range(0, len(query), chunk):
        out[i:i + chunk] = torch.addmm(prepared["b_sq"], q_scaled[i:i + chunk], bank).amin(1)
    return (out + query.float().pow(2).sum(1)).clamp_min_(0)


def nearest_sq_distance_int8(query: torch.Tensor, bank: torch.Tensor, prepared: dict | None = None) -> torch.Tensor:
    """:func:`nearest_sq_distance` with int8 dot products (see the section notes); ``prepared``:
    :func:`prepare_bank_int8` of ``bank``, when the caller keeps it."""
    _check(query, bank)
    prepared = prepared if prepared is not None else prepare_bank_int8(bank)
    if _kernel_applies(_INT8_KERNEL, query):
        codes, s_q = _query_codes(query, prepared)
        q_u8 = (codes.to(torch.int16) + 128).to(torch.uint8).contiguous()
        return _INT8_KERNEL(q_u8, s_q.reshape(-1).contiguous(), query.float().pow(2).sum(1).contiguous(),
                            prepared["packed"], prepared["col128"], prepared["b_sq"], prepared["s_b"])
    return _int8_search_float32(query, prepared)
