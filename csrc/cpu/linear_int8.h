// W8A8 linear layers on the CPU: the two memory-bound passes around the integer GEMM
// (raad_kernels/linear.py specifies the arithmetic; the GEMM itself is torch's _int_mm, which
// runs oneDNN's VNNI kernels). No torch headers (raw pointers only).
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

}  // namespace raad::cpu
