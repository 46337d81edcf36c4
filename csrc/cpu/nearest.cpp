// See nearest.h. Plain loops the compiler vectorises, built per ISA by RAAD_CLONES.
#include "cpu/nearest.h"

#include <omp.h>

#include <algorithm>
#include <limits>

#include "cpu/clones.h"

namespace raad::cpu {

RAAD_CLONES void nearest_sq_f32(const float* q, int64_t m, int64_t k, const float* bank_t, const float* b_sq,
                                int64_t n, float* out, int threads) {
  // kRows query rows share every bank load; kRows × kNearestCols accumulators (16 AVX-512
  // registers) stay in registers over the k loop
  constexpr int64_t kRows = 8, J = 32;
  static_assert(kNearestCols % J == 0, "bank blocks");
  const int64_t blocks = (m + kRows - 1) / kRows;
#pragma omp parallel for num_threads(std::max(1, threads)) schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t r0 = blk * kRows, rows = std::min(kRows, m - r0);
    // the block's queries transposed (k × kRows, zero rows past m): no branch in the hot loop
    float qt[512 * kRows];
    const int64_t kk = std::min<int64_t>(k, 512);
    for (int64_t c = 0; c < kk; ++c)
      for (int64_t r = 0; r < kRows; ++r) qt[c * kRows + r] = r < rows ? q[(r0 + r) * k + c] : 0.f;
    float best[kRows];
    for (int64_t r = 0; r < kRows; ++r) best[r] = std::numeric_limits<float>::infinity();
    for (int64_t j0 = 0; j0 < n; j0 += J) {
      float acc[kRows][J] = {};
      for (int64_t c = 0; c < kk; ++c) {
        const float* b = bank_t + c * n + j0;
        const float* qc = qt + c * kRows;
        for (int64_t r = 0; r < kRows; ++r) {
#pragma omp simd
          for (int64_t j = 0; j < J; ++j) acc[r][j] += qc[r] * b[j];
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float mn = best[r];
#pragma omp simd reduction(min : mn)
        for (int64_t j = 0; j < J; ++j) mn = std::min(mn, b_sq[j0 + j] - 2.f * acc[r][j]);
        best[r] = mn;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q + (r0 + r) * k;
      float sq = 0.f;
      for (int64_t c = 0; c < k; ++c) sq += qr[c] * qr[c];
      out[r0 + r] = std::max(0.f, best[r] + sq);
    }
  }
}

}  // namespace raad::cpu
