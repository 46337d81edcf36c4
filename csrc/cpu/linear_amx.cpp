// W8A8 linear on AMX tiles (compiled with the AMX-INT8 flags only; linear_int8 in
// cpu_bindings.cpp calls it only where raad::active_isa() reports AMX, the OS granted tile data,
// and a once-per-process self-check against exact integer sums passed).
//
// tdpbssd multiplies a 16×64 int8 tile (16 rows of 64 codes) by a 16×64 "VNNI" tile (16 steps
// of 4 inputs, each step 16 outputs × 4 bytes) into a 16×16 int32 tile: 16K exact products per
// instruction, signed × signed, so neither operand needs an offset or a correction.
//
// Blocking: 32 rows × 32 outputs per step (4 accumulator tiles, 2 row tiles, 2 weight tiles:
// all 8 tile registers); the int32 results go through a 4 KiB buffer in L1 to the float32
// output with the scales and bias applied, so the (M, N) int32 matrix never exists.
// mul then add, never fused: the same float32 rounding as dequantize_i32 (linear_int8.cpp)
#pragma GCC optimize("fp-contract=off")

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "cpu/amx_tiles.h"
#include "cpu/linear_int8.h"

namespace raad::cpu {
namespace {

constexpr int kRows = 32;   // rows of x per work item (2 row tiles)
constexpr int kCols = 32;   // outputs per inner step (2 weight tiles)

// y[r, o] for the rows r0..r0+nr and outputs o0..o0+no of one 16×16 tile buffer.
inline void dequant_tile(const int32_t* c, int nr, int no, const float* sx, const float* sw, const float* bias,
                         float* y, int64_t ldy) {
  const __mmask16 m = no >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << no) - 1);
  const __m512 w = _mm512_maskz_loadu_ps(m, sw);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias) : _mm512_setzero_ps();
  for (int r = 0; r < nr; ++r) {
    // the same float32 operations as dequantize_i32 (no contraction): acc * (s_x * s_w) + bias
    const __m512 s = _mm512_mul_ps(_mm512_set1_ps(sx[r]), w);
    const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + 16 * r)), s);
    const __m512 v = bias ? _mm512_add_ps(a, b) : a;
    _mm512_mask_storeu_ps(y + r * ldy, m, v);
  }
}

}  // namespace

int64_t amx_packed_weight_bytes(int64_t K, int64_t N) {
  const int64_t kp = (K + 63) / 64 * 64, np = (N + kCols - 1) / kCols * kCols;
  return kp * np;
}

void amx_pack_weight(const int8_t* w_t, int64_t K, int64_t N, int64_t sk, int64_t sn, int8_t* packed) {
  const int64_t kp = (K + 63) / 64 * 64, np = (N + kCols - 1) / kCols * kCols;
  // [N/16 column blocks][K/4 steps][16 outputs][4 inputs], zero where K or N is padding
  for (int64_t nb = 0; nb < np / 16; ++nb)
    for (int64_t s = 0; s < kp / 4; ++s) {
      int8_t* dst = packed + (nb * (kp / 4) + s) * 64;
      for (int n = 0; n < 16; ++n)
        for (int i = 0; i < 4; ++i) {
          const int64_t k = 4 * s + i, o = 16 * nb + n;
          dst[4 * n + i] = (k < K && o < N) ? w_t[k * sk + o * sn] : int8_t(0);
        }
    }
}

void amx_linear_i8(const int8_t* codes, int64_t M, int64_t K, const int8_t* packed, int64_t N, const float* sx,
                   const float* sw, const float* bias, float* y, int threads) {
  const int64_t kp = (K + 63) / 64 * 64, np = (N + kCols - 1) / kCols * kCols;
  const int64_t steps = kp / 4, nchunks = kp / 64;
  const int64_t blocks = (M + kRows - 1) / kRows;
  // rows can be read in place when every row tile is whole and K needs no padding
  const bool direct_k = K == kp;
#pragma omp parallel num_threads(std::max(1, threads))
  {
    configure_tiles();  // tile configuration is per thread
    int8_t* abuf = static_cast<int8_t*>(std::aligned_alloc(64, kRows * kp));
    alignas(64) int32_t cbuf[4][256];
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t r0 = blk * kRows;
      const int nr = int(std::min<int64_t>(kRows, M - r0));
      const int8_t* a = codes + r0 * K;
      int64_t lda = K;
      if (!direct_k || nr < kRows) {  // copy into the zero-padded block
        std::memset(abuf, 0, size_t(kRows) * kp);
        for (int r = 0; r < nr; ++r) std::memcpy(abuf + r * kp, codes + (r0 + r) * K, size_t(K));
        a = abuf;
        lda = kp;
      }
      for (int64_t o0 = 0; o0 < np; o0 += kCols) {
        const int8_t* b0 = packed + (o0 / 16) * steps * 64;
        const int8_t* b1 = b0 + steps * 64;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kc = 0; kc < nchunks; ++kc) {
          _tile_loadd(4, a + kc * 64, lda);
          _tile_loadd(5, a + 16 * lda + kc * 64, lda);
          _tile_loadd(6, b0 + kc * 16 * 64, 64);
          _tile_loadd(7, b1 + kc * 16 * 64, 64);
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 4, 7);
          _tile_dpbssd(2, 5, 6);
          _tile_dpbssd(3, 5, 7);
        }
        _tile_stored(0, cbuf[0], 64);
        _tile_stored(1, cbuf[1], 64);
        _tile_stored(2, cbuf[2], 64);
        _tile_stored(3, cbuf[3], 64);
        for (int t = 0; t < 4; ++t) {
          const int rt = t >> 1, ct = t & 1;
          const int rows = std::min(16, nr - 16 * rt);
          const int64_t o = o0 + 16 * ct;
          if (rows <= 0 || o >= N) continue;
          dequant_tile(cbuf[t], rows, int(std::min<int64_t>(16, N - o)), sx + r0 + 16 * rt, sw + o,
                       bias ? bias + o : nullptr, y + (r0 + 16 * rt) * N + o, N);
        }
      }
    }
    std::free(abuf);
    _tile_release();
  }
}

}  // namespace raad::cpu
