// W8A8 linear layers on the CPU: the two memory-bound passes around the integer GEMM
// (raad_kernels/linear.py specifies the arithmetic; the GEMM is torch's _int_mm (oneDNN's VNNI
// kernels) or, on CPUs with AMX, the tile kernel of linear_amx.cpp). No torch headers (raw pointers only).
#pragma once
#include <cstdint>

namespace raad::cpu {

// codes[r, :] = round_half_even(x[r, :] / scale[r]) with scale[r] = absmax(x[r, :]) / 127
// (1 for an all-zero row). x: rows × cols float32, row stride ld; codes: rows × cols contiguous.
void quantize_rows_i8(const float* x, int64_t rows, int64_t cols, int64_t ld, int8_t* codes, float* scale,
                      int threads);

// y[r, o] = acc[r, o] * (sx[r] * sw[o]) + bias[o] (bias may be null). acc, y: rows × cols contiguous.
void dequantize_i32(const int32_t* acc, int64_t rows, int64_t cols, const float* sx, const float* sw,
                    const float* bias, float* y, int threads);

// AMX tiles (linear_amx.cpp; call only where raad::active_isa() is CpuIsa::Amx):
// the weight codes w_t (K × N, element (k, o) at k·sk + o·sn) in the tile layout, zero-padded to whole tiles ...
int64_t amx_packed_weight_bytes(int64_t K, int64_t N);
void amx_pack_weight(const int8_t* w_t, int64_t K, int64_t N, int64_t sk, int64_t sn, int8_t* packed);
// ... and y (M × N float32) = dequantize(codes (M × K, contiguous) · packed): the integer sums on
// tiles, then y[r, o] = acc * (sx[r] * sw[o]) + bias[o] in float32, as dequantize_i32.
void amx_linear_i8(const int8_t* codes, int64_t M, int64_t K, const int8_t* packed, int64_t N, const float* sx,
                   const float* sw, const float* bias, float* y, int threads);

}  // namespace raad::cpu
