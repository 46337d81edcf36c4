// See line_cells.h. Plain loops the compiler vectorises (along the image rows), built per ISA by
// RAAD_CLONES.
#include "cpu/line_cells.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>

#include "cpu/clones.h"

namespace raad::cpu {

namespace {

// torch's "reflect" padding: -1 → 1, n → n - 2 (the edge itself is not repeated)
inline int64_t reflect(int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i); }

// v sorted largest first. Eight values (raad.memory's line cells) through the optimal 19-comparator
// network, branch-free: std::sort's call and branches cost more than the rest of a cell's work.
inline void sort_descending(float* v, int64_t n) {
  if (n != 8) {
    std::sort(v, v + n, std::greater<float>());
    return;
  }
  static constexpr int kNet[19][2] = {{0, 1}, {2, 3}, {4, 5}, {6, 7}, {0, 2}, {1, 3}, {4, 6}, {5, 7}, {1, 2}, {5, 6},
                                      {0, 4}, {3, 7}, {1, 5}, {2, 6}, {1, 4}, {3, 6}, {2, 4}, {3, 5}, {3, 4}};
  for (const auto& c : kNet) {
    const float a = v[c[0]], b = v[c[1]];
    v[c[0]] = std::max(a, b);
    v[c[1]] = std::min(a, b);
  }
}

}  // namespace

RAAD_CLONES void line_cells_f32(const float* grey, int64_t batch, int64_t h, int64_t w, const float* taps_x,
                                const float* taps_y, int64_t k, const float* steer, int64_t o, int64_t cell,
                                int64_t pool, float* out, int threads) {
  if (batch <= 0 || h <= 0 || w <= 0 || k <= 0 || o <= 0 || cell <= 0 || pool <= 0) return;
  const int64_t r = k / 2, hp = h + 2 * r, ch = h / cell, cw = w / cell, half = pool / 2;
  // each thread's scratch: a padded row, the x-filtered rows, one row of filters, the steered
  // magnitudes summed over a cell's rows, the cell sums, their sums along x and one cell's profile
  const int64_t per = (w + 2 * r) + 3 * hp * w + 3 * w + o * w + 2 * o * ch * cw + o;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, batch)));
  // not zero-filled: every part is written before it is read
  const std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(per) * static_cast<size_t>(nt)]);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    const float* img = grey + b * h * w;
    float* const row = scratch.get() + per * omp_get_thread_num();
    float *const fx = row + w + 2 * r, *const f = fx + 3 * hp * w, *const v = f + 3 * w, *const sums = v + o * w,
                 *const across_x = sums + o * ch * cw, *const prof = across_x + o * ch * cw;
    // 1a. along x, every row of the image reflected in y
    for (int64_t py = 0; py < hp; ++py) {
      const float* src = img + reflect(py - r, h) * w;
      std::copy(src, src + w, row + r);
      for (int64_t x = 0; x < r; ++x) {   // the reflected edges only
        row[x] = src[reflect(x - r, w)];
        row[w + r + x] = src[reflect(w + x, w)];
      }
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
      // 2. steered magnitudes, summed over the cell's rows per column (vectorised), then over
      //    the cell's columns once its last row is in
      const float *f0 = f, *f1 = f0 + w, *f2 = f1 + w;
      const bool first = y % cell == 0, last = y % cell == cell - 1;
      for (int64_t q = 0; q < o; ++q) {
        const float a0 = steer[q * 3], a1 = steer[q * 3 + 1], a2 = steer[q * 3 + 2];
        float* acc = v + q * w;
        if (first) std::fill(acc, acc + w, 0.f);
#pragma omp simd
        for (int64_t x = 0; x < w; ++x) acc[x] += std::fabs(a0 * f0[x] + a1 * f1[x] + a2 * f2[x]);
        if (last) {
          float* cells = sums + (q * ch + y / cell) * cw;
          for (int64_t cx = 0; cx < cw; ++cx) {
            float s = 0.f;
            for (int64_t x = cx * cell; x < (cx + 1) * cell; ++x) s += acc[x];
            cells[cx] = s;
          }
        }
      }
    }
    // 3. cell means, pooled over the neighbouring cells inside the image (along x, then y),
    //    sorted per cell
    const float inv = 1.f / static_cast<float>(cell * cell);
    for (int64_t i = 0; i < o * ch; ++i)
      for (int64_t cx = 0; cx < cw; ++cx) {
        float s = 0.f;
        for (int64_t xx = std::max<int64_t>(0, cx - half); xx <= std::min(cw - 1, cx + half); ++xx)
          s += sums[i * cw + xx];
        across_x[i * cw + cx] = s;
      }
    for (int64_t cy = 0; cy < ch; ++cy) {
      const int64_t y0 = std::max<int64_t>(0, cy - half), y1 = std::min(ch - 1, cy + half);
      for (int64_t cx = 0; cx < cw; ++cx) {
        const int64_t nx = std::min(cw - 1, cx + half) - std::max<int64_t>(0, cx - half) + 1;
        const float scale = inv / static_cast<float>((y1 - y0 + 1) * nx);
        for (int64_t q = 0; q < o; ++q) {
          float s = 0.f;
          for (int64_t yy = y0; yy <= y1; ++yy) s += across_x[(q * ch + yy) * cw + cx];
          prof[q] = s * scale;
        }
        sort_descending(prof, o);
        for (int64_t q = 0; q < o; ++q) out[((b * o + q) * ch + cy) * cw + cx] = prof[q];
      }
    }
  }
}

}  // namespace raad::cpu
