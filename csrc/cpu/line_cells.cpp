// See line_cells.h. Plain loops the compiler vectorises (along the image rows), built per ISA by
// RAAD_CLONES.
#include "cpu/line_cells.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "cpu/clones.h"

namespace raad::cpu {

namespace {

// torch's "reflect" padding: -1 → 1, n → n - 2 (the edge itself is not repeated)
inline int64_t reflect(int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i); }

}  // namespace

RAAD_CLONES void line_cells_f32(const float* grey, int64_t batch, int64_t h, int64_t w, const float* taps_x,
                                const float* taps_y, int64_t k, const float* steer, int64_t o, int64_t cell,
                                int64_t pool, float* out, int threads) {
  if (batch <= 0 || h <= 0 || w <= 0 || k <= 0 || o <= 0 || cell <= 0 || pool <= 0) return;
  const int64_t r = k / 2, hp = h + 2 * r, ch = h / cell, cw = w / cell, half = pool / 2;
  // each thread's scratch: a padded row, the x-filtered rows, one row of filters, the steered
  // row, the cell sums and one cell's profile
  const int64_t per = (w + 2 * r) + 3 * hp * w + 3 * w + w + o * ch * cw + o;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, batch)));
  std::vector<float> scratch(static_cast<size_t>(per) * static_cast<size_t>(nt));
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    const float* img = grey + b * h * w;
    float* const row = scratch.data() + per * omp_get_thread_num();
    float *const fx = row + w + 2 * r, *const f = fx + 3 * hp * w, *const v = f + 3 * w, *const sums = v + w,
                 *const prof = sums + o * ch * cw;
    std::fill(sums, sums + o * ch * cw, 0.f);
    // 1a. along x, every row of the image reflected in y
    for (int64_t py = 0; py < hp; ++py) {
      const float* src = img + reflect(py - r, h) * w;
      for (int64_t x = 0; x < w + 2 * r; ++x) row[x] = src[reflect(x - r, w)];
      for (int64_t c = 0; c < 3; ++c) {
        float* dst = fx + (c * hp + py) * w;
        std::fill(dst, dst + w, 0.f);
        for (int64_t t = 0; t < k; ++t) {
          const float tap = taps_x[c * k + t];
          const float* s = row + t;
#pragma omp simd
          for (int64_t x = 0; x < w; ++x) dst[x] += tap * s[x];
        }
      }
    }
    for (int64_t y = 0; y < h; ++y) {
      // 1b. along y
      for (int64_t c = 0; c < 3; ++c) {
        float* dst = f + c * w;
        std::fill(dst, dst + w, 0.f);
        for (int64_t t = 0; t < k; ++t) {
          const float tap = taps_y[c * k + t];
          const float* s = fx + (c * hp + y + t) * w;
#pragma omp simd
          for (int64_t x = 0; x < w; ++x) dst[x] += tap * s[x];
        }
      }
      // 2. steered magnitudes, summed into the row's cells
      const float *f0 = f, *f1 = f0 + w, *f2 = f1 + w;
      for (int64_t q = 0; q < o; ++q) {
        const float a0 = steer[q * 3], a1 = steer[q * 3 + 1], a2 = steer[q * 3 + 2];
#pragma omp simd
        for (int64_t x = 0; x < w; ++x) v[x] = std::fabs(a0 * f0[x] + a1 * f1[x] + a2 * f2[x]);
        float* cells = sums + (q * ch + y / cell) * cw;
        for (int64_t cx = 0; cx < cw; ++cx) {
          float s = 0.f;
          for (int64_t x = cx * cell; x < (cx + 1) * cell; ++x) s += v[x];
          cells[cx] += s;
        }
      }
    }
    // 3. cell means, pooled over the neighbouring cells inside the image, sorted per cell
    const float inv = 1.f / static_cast<float>(cell * cell);
    for (int64_t cy = 0; cy < ch; ++cy) {
      const int64_t y0 = std::max<int64_t>(0, cy - half), y1 = std::min(ch - 1, cy + half);
      for (int64_t cx = 0; cx < cw; ++cx) {
        const int64_t x0 = std::max<int64_t>(0, cx - half), x1 = std::min(cw - 1, cx + half);
        const float count = static_cast<float>((y1 - y0 + 1) * (x1 - x0 + 1));
        for (int64_t q = 0; q < o; ++q) {
          float s = 0.f;
          for (int64_t yy = y0; yy <= y1; ++yy)
            for (int64_t xx = x0; xx <= x1; ++xx) s += sums[(q * ch + yy) * cw + xx];
          prof[q] = s * inv / count;
        }
        std::sort(prof, prof + o, std::greater<float>());
        for (int64_t q = 0; q < o; ++q) out[((b * o + q) * ch + cy) * cw + cx] = prof[q];
      }
    }
  }
}

}  // namespace raad::cpu
