// See nearest.h: the int8 nearest-neighbour search on AVX-512 VNNI (built with this file's ISA
// flags; called only where the running CPU has VNNI).
#include <immintrin.h>
#ifdef RAAD_SIMDE_AVX512  // test build on a CPU without AVX-512 (csrc/cpu/emu/build_avx512_emu.py)
#include "cpu/emu/simde_avx512.h"
#endif
#include <omp.h>

#include <algorithm>
#include <limits>

#include "cpu/nearest.h"

namespace raad::cpu {

void nearest_sq_i8_avx512vnni(const uint8_t* q_u8, const float* s_q, const float* q_sq, int64_t m, int64_t k,
                              const int8_t* bank_packed, const int32_t* col128, const float* b_sq, float s_b,
                              int64_t n, float* out, int threads) {
  // kRows queries × 4 registers of 16 bank entries: 16 int32 accumulators; each 64-byte bank
  // load (16 entries × 4 channels) feeds kRows vpdpbusd
  constexpr int64_t kRows = 4, kRegs = kNearestCols / 16;
  const int64_t k4 = k / 4, blocks = (m + kRows - 1) / kRows;
#pragma omp parallel for num_threads(std::max(1, threads)) schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t r0 = blk * kRows, rows = std::min(kRows, m - r0);
    const uint8_t* qr[kRows];
    __m512 coef[kRows], best[kRows];
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t row = r0 + std::min(r, rows - 1);  // past m: repeat the last row, not stored
      qr[r] = q_u8 + row * k;
      coef[r] = _mm512_set1_ps(-2.f * s_q[row] * s_b);
      best[r] = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    }
    for (int64_t j0 = 0; j0 < n; j0 += kNearestCols) {
      __m512i acc[kRows][kRegs];
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t g = 0; g < kRegs; ++g) acc[r][g] = _mm512_setzero_si512();
      for (int64_t c = 0; c < k4; ++c) {
        __m512i b[kRegs];
        for (int64_t g = 0; g < kRegs; ++g)
          b[g] = _mm512_loadu_si512(bank_packed + (((j0 / 16 + g) * k4 + c) * 64));
        for (int64_t r = 0; r < kRows; ++r) {
          int32_t four;
          __builtin_memcpy(&four, qr[r] + 4 * c, 4);
          const __m512i qv = _mm512_set1_epi32(four);
          for (int64_t g = 0; g < kRegs; ++g) acc[r][g] = _mm512_dpbusd_epi32(acc[r][g], qv, b[g]);
        }
      }
      for (int64_t g = 0; g < kRegs; ++g) {
        const __m512i off = _mm512_loadu_si512(col128 + j0 + 16 * g);
        const __m512 bsq = _mm512_loadu_ps(b_sq + j0 + 16 * g);
        for (int64_t r = 0; r < kRows; ++r) {
          const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][g], off));
          best[r] = _mm512_min_ps(best[r], _mm512_fmadd_ps(dot, coef[r], bsq));
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) out[r0 + r] = std::max(0.f, q_sq[r0 + r] + _mm512_reduce_min_ps(best[r]));
  }
}

}  // namespace raad::cpu
