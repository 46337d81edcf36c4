// See linear_int8.h. Plain loops the compiler vectorises; on x86 with GCC/Clang each function is
// built for AVX-512, AVX2 and baseline x86-64 and the loader picks the clone the running CPU has
// (target_clones), so this file needs no ISA flags of its own.
#include "cpu/linear_int8.h"

// No fused multiply-add: GCC contracts a * b + c by default, and did so in dequantize_i32's
// 16-wide loop but not in its 8-wide tail, so two GEMM paths (AMX tiles, _int_mm) with the same
// integer sums gave outputs a rounding apart. Plain mul-then-add everywhere makes them bitwise equal.
#pragma GCC optimize("fp-contract=off")

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "cpu/clones.h"

namespace raad::cpu {

RAAD_CLONES void quantize_rows_i8(const float* x, int64_t rows, int64_t cols, int64_t ld, int8_t* codes,
                                  float* scale, int threads) {
#pragma omp parallel for num_threads(std::max(1, threads)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ld;
    float amax = 0.f;
#pragma omp simd reduction(max : amax)
    for (int64_t i = 0; i < cols; ++i) amax = std::max(amax, std::fabs(xr[i]));
    // the same float32 operations as the torch specification: scale = amax / 127, code = x / scale
    const float s = amax > 0.f ? amax / 127.f : 1.f;
    scale[r] = s;
    int8_t* cr = codes + r * cols;
    // |x| <= amax, so |x / s| <= 127 up to two roundings and rounds to at most 127: no clamp.
    // Adding and removing 1.5 * 2^23 rounds to the nearest integer, ties to even (the default
    // rounding mode, as torch.round), and vectorises, which nearbyint does not.
    constexpr float kRound = 12582912.f;
#pragma omp simd
    for (int64_t i = 0; i < cols; ++i) {
      const float c = (xr[i] / s + kRound) - kRound;
      cr[i] = static_cast<int8_t>(static_cast<int32_t>(c));
    }
  }
}

RAAD_CLONES void dequantize_i32(const int32_t* acc, int64_t rows, int64_t cols, const float* sx, const float* sw,
                                const float* bias, float* y, int threads) {
#pragma omp parallel for num_threads(std::max(1, threads)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* ar = acc + r * cols;
    float* yr = y + r * cols;
    const float s = sx[r];
    if (bias) {
#pragma omp simd
      for (int64_t o = 0; o < cols; ++o) yr[o] = static_cast<float>(ar[o]) * (s * sw[o]) + bias[o];
    } else {
#pragma omp simd
      for (int64_t o = 0; o < cols; ++o) yr[o] = static_cast<float>(ar[o]) * (s * sw[o]);
    }
  }
}

}  // namespace raad::cpu
