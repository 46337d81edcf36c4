// Quantization of Q, K and V for the CPU kernels: the arithmetic of raad_kernels/quant.py
// (smoothing, Hadamard rotation zero-padded to a power of two, per-token scales with the clipping
// multiple searched over CLIP_GRID at 4/2 bits, the int2 odd grid, per-channel V) plus the input
// loaders and the packed/blocked layouts of attention_internal.h.
//
// Included by each kernel translation unit (portable, AVX2, AVX-512), which compiles it with its
// own ISA flags so the plain loops below auto-vectorise for that ISA. Everything is in an
// anonymous namespace: each TU gets its own copy, and the linker can never hand the portable path
// a function compiled for AVX-512. No std templates with external linkage are used here.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__F16C__) && defined(__AVX__)
#define RAAD_HAVE_F16C 1
#endif

#include "cpu/attention_internal.h"

namespace raad::cpu {
namespace {

constexpr int kLanes = 8;  // partial sums per reduction (auto-vectorised)

inline float minf_(float a, float b) { return a < b ? a : b; }
inline float maxf_(float a, float b) { return a > b ? a : b; }
inline int64_t min64_(int64_t a, int64_t b) { return a < b ? a : b; }
inline float absf_(float a) { return __builtin_fabsf(a); }
inline float clampf_(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }
inline float inf_() { return __builtin_inff(); }

// Round half to even for |y| < 2^22 (the callers clamp first); vectorises without SSE4.1.
inline float rne_(float y) {
  const float magic = 12582912.f;  // 1.5 · 2^23 (needs no -ffast-math: it is not used)
  return (y + magic) - magic;
}

// --------------------------------------------------------------------------------------------
// 16-bit float conversions (round half to even)
// --------------------------------------------------------------------------------------------

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(nan ? ((u >> 16) | 0x40u) : (r >> 16));
}

inline float f16_to_f32_sw(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float f = float(m) * 5.9604644775390625e-8f;  // m · 2^-24
    return sign ? -f : f;
  }
  const uint32_t u = e == 31 ? (sign | 0x7f800000u | (m << 13)) : (sign | ((e + 112u) << 23) | (m << 13));
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16_sw(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to 65536 or more: inf
  if (ax < 0x38800000u) {                                  // |f| < 2^-14: half subnormal or 0
    float af;
    std::memcpy(&af, &ax, 4);
    return uint16_t(sign | uint32_t(rne_(af * 16777216.f)));  // units of 2^-24
  }
  const uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u) - 0x38000000u;
  return uint16_t(sign | (r >> 13));
}

inline float f16_to_f32(uint16_t h) {
#ifdef RAAD_HAVE_F16C
  return _cvtsh_ss(h);
#else
  return f16_to_f32_sw(h);
#endif
}

inline uint16_t f32_to_f16(float f) {
#ifdef RAAD_HAVE_F16C
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  return f32_to_f16_sw(f);
#endif
}

// Value rounded to the 16-bit P·V operand type (quant.pv_half_dtype): bf16 for bf16 inputs, else fp16.
inline float round_half(float x, bool bf16) {
  return bf16 ? bf16_to_f32(f32_to_bf16(x)) : f16_to_f32(f32_to_f16(x));
}

// --------------------------------------------------------------------------------------------
// Strided loads and stores
// --------------------------------------------------------------------------------------------

// dst[0..len) = t[b, h, n, 0..len) as float.
inline void load_row(const View4& t, int64_t b, int64_t h, int64_t n, int64_t len, float* dst) {
  const int64_t base = b * t.stride[0] + h * t.stride[1] + n * t.stride[2];
  const int64_t sd = t.stride[3];
  switch (t.dtype) {
    case DType::F32: {
      const float* p = static_cast<const float*>(t.data) + base;
      if (sd == 1) {
        std::memcpy(dst, p, size_t(len) * 4);
      } else {
        for (int64_t i = 0; i < len; ++i) dst[i] = p[i * sd];
      }
      break;
    }
    case DType::BF16: {
      const uint16_t* p = static_cast<const uint16_t*>(t.data) + base;
      if (sd == 1) {
        for (int64_t i = 0; i < len; ++i) dst[i] = bf16_to_f32(p[i]);
      } else {
        for (int64_t i = 0; i < len; ++i) dst[i] = bf16_to_f32(p[i * sd]);
      }
      break;
    }
    case DType::F16: {
      const uint16_t* p = static_cast<const uint16_t*>(t.data) + base;
      int64_t i = 0;
#ifdef RAAD_HAVE_F16C
      if (sd == 1) {
        for (; i + 8 <= len; i += 8)
          _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
      }
#endif
      for (; i < len; ++i) dst[i] = f16_to_f32(p[i * sd]);
      break;
    }
    default:
      break;
  }
}

// Row (b, h, n) as floats: a pointer into the input itself when it is a contiguous float32 row
// (no copy), else loaded into `buf`.
inline const float* get_row(const View4& t, int64_t b, int64_t h, int64_t n, int64_t len, float* buf) {
  if (t.dtype == DType::F32 && (t.stride[3] == 1 || len == 1))
    return static_cast<const float*>(t.data) + b * t.stride[0] + h * t.stride[1] + n * t.stride[2];
  load_row(t, b, h, n, len, buf);
  return buf;
}

// out[off .. off+len) = src as `dt` (round half to even).
inline void store_row(void* out, DType dt, int64_t off, const float* src, int64_t len) {
  switch (dt) {
    case DType::F32:
      std::memcpy(static_cast<float*>(out) + off, src, size_t(len) * 4);
      break;
    case DType::BF16: {
      uint16_t* p = static_cast<uint16_t*>(out) + off;
      for (int64_t i = 0; i < len; ++i) p[i] = f32_to_bf16(src[i]);
      break;
    }
    case DType::F16: {
      uint16_t* p = static_cast<uint16_t*>(out) + off;
      int64_t i = 0;
#ifdef RAAD_HAVE_F16C
      for (; i + 8 <= len; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
      for (; i < len; ++i) p[i] = f32_to_f16(src[i]);
      break;
    }
    default:
      break;
  }
}

// dst[jj] = log2(e) · mask[b, h, i, j0 + jj] for jj < n (bool: 0 where true, -inf where false).
inline void load_bias_log2(const View4& m, int64_t b, int64_t h, int64_t i, int64_t j0, int n, float* dst) {
  const int64_t base = b * m.stride[0] + h * m.stride[1] + i * m.stride[2] + j0 * m.stride[3];
  const int64_t sj = m.stride[3];
  switch (m.dtype) {
    case DType::Bool: {
      const uint8_t* p = static_cast<const uint8_t*>(m.data) + base;
      for (int jj = 0; jj < n; ++jj) dst[jj] = p[jj * sj] ? 0.f : -inf_();
      break;
    }
    case DType::F32: {
      const float* p = static_cast<const float*>(m.data) + base;
      for (int jj = 0; jj < n; ++jj) dst[jj] = p[jj * sj] * kLog2e;
      break;
    }
    case DType::BF16: {
      const uint16_t* p = static_cast<const uint16_t*>(m.data) + base;
      for (int jj = 0; jj < n; ++jj) dst[jj] = bf16_to_f32(p[jj * sj]) * kLog2e;
      break;
    }
    case DType::F16: {
      const uint16_t* p = static_cast<const uint16_t*>(m.data) + base;
      for (int jj = 0; jj < n; ++jj) dst[jj] = f16_to_f32(p[jj * sj]) * kLog2e;
      break;
    }
  }
}

// Scores S[0..n) of query row i plus its mask row (log2 units, through `bias`); returns their max.
inline float add_mask_row(const View4& m, int64_t b, int64_t h, int64_t i, int64_t j0, int n, float* bias, float* S) {
  load_bias_log2(m, b, h, i, j0, n, bias);
  float bm = -inf_();
  for (int jj = 0; jj < n; ++jj) {
    S[jj] += bias[jj];
    bm = maxf_(bm, S[jj]);
  }
  return bm;
}

// --------------------------------------------------------------------------------------------
// Rotation and per-token quantization
// --------------------------------------------------------------------------------------------

// Orthonormal fast Walsh–Hadamard transform in place (n a power of two), as quant.fwht.
inline void fwht(float* x, int n) {
  for (int len = 1; len < n; len <<= 1) {
    for (int i = 0; i < n; i += 2 * len) {
      float* a = x + i;
      float* b = x + i + len;
      for (int j = 0; j < len; ++j) {
        const float u = a[j], v = b[j];
        a[j] = u + v;
        b[j] = u - v;
      }
    }
  }
  const float s = float(1.0 / __builtin_sqrt(double(n)));
  for (int i = 0; i < n; ++i) x[i] *= s;
}

template <int BITS>
constexpr float qmax_() {
  return BITS == 8 ? 127.f : (BITS == 4 ? 7.f : 3.f);
}

// Nearest code (as float) for y = x / scale (quant._round_to_grid).
template <int BITS>
inline float to_grid(float y) {
  if constexpr (BITS == 2) {  // nearest odd integer in {-3, -1, 1, 3}
    const float z = clampf_(y, -4.f, 4.f) * 0.5f;
    const float r = rne_(z);
    const float f = r > z ? r - 1.f : r;  // floor
    return clampf_(2.f * f + 1.f, -3.f, 3.f);
  } else {
    return rne_(clampf_(y, -qmax_<BITS>(), qmax_<BITS>()));
  }
}

inline float row_absmax(const float* x, int n) {
  float m[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) m[l] = maxf_(m[l], absf_(x[i + l]));
  float r = 0.f;
  for (int l = 0; l < kLanes; ++l) r = maxf_(r, m[l]);
  for (; i < n; ++i) r = maxf_(r, absf_(x[i]));
  return r;
}

inline float row_sumsq(const float* x, int n) {
  float m[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) m[l] += x[i + l] * x[i + l];
  float r = 0.f;
  for (int l = 0; l < kLanes; ++l) r += m[l];
  for (; i < n; ++i) r += x[i] * x[i];
  return r;
}

// Squared error of quantizing x at scale s (search only: multiplies by 1/s; the codes divide).
template <int BITS>
inline float grid_error(const float* x, int n, float s) {
  const float inv = 1.f / s;
  float e[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float d = to_grid<BITS>(x[i + l] * inv) * s - x[i + l];
      e[l] += d * d;
    }
  float r = 0.f;
  for (int l = 0; l < kLanes; ++l) r += e[l];
  for (; i < n; ++i) {
    const float d = to_grid<BITS>(x[i] * inv) * s - x[i];
    r += d * d;
  }
  return r;
}

// quant.token_scales for one row. At 4 and 2 bits the candidates are the absmax, then
// min(a·rms, absmax) for a in CLIP_GRID; the least squared error wins, ties keep the earlier.
constexpr float kClipGrid4[8] = {2.0f, 2.25f, 2.5f, 2.75f, 3.0f, 3.5f, 4.0f, 5.0f};
constexpr float kClipGrid2[8] = {1.0f, 1.25f, 1.5f, 1.75f, 2.0f, 2.25f, 2.5f, 3.0f};
constexpr int kClipCandidates = 9;

template <int BITS>
inline void clip_candidates(float amax, float rms, float* cand) {
  const float* grid = BITS == 4 ? kClipGrid4 : kClipGrid2;
  cand[0] = amax / qmax_<BITS>();
  for (int g = 0; g < 8; ++g) cand[g + 1] = minf_(grid[g] * rms, amax) / qmax_<BITS>();
}

template <int BITS>
inline float token_scale(const float* x, int n) {
  const float amax = row_absmax(x, n);
  float scale;
  if constexpr (BITS == 8) {
    scale = amax / 127.f;
  } else {
    float cand[kClipCandidates];
    clip_candidates<BITS>(amax, __builtin_sqrtf(row_sumsq(x, n) / float(n)), cand);
    float best_err = 0.f;
    scale = 0.f;
    for (int g = 0; g < kClipCandidates; ++g) {
      const float err = grid_error<BITS>(x, n, cand[g] > 0.f ? cand[g] : 1.f);
      if (g == 0 || err < best_err) {  // strict: ties keep the earlier candidate
        best_err = err;
        scale = cand[g];
      }
    }
  }
  if (!(scale > 0.f)) scale = BITS == 2 ? 1.17549435e-38f : 1.f;
  return scale;
}

// Codes of x at scale s into codes[0..n) (x / s, as quant.quantize).
template <int BITS>
inline void quantize_codes(const float* x, int n, float s, int8_t* codes) {
  for (int i = 0; i < n; ++i) codes[i] = int8_t(to_grid<BITS>(x[i] / s));
}

#if defined(__AVX2__) && defined(__FMA__)
// AVX2 versions of the row quantizer and the Hadamard transform (AVX2 and AVX-512 TUs): the same
// operations as the scalar code above, 8 lanes at a time (the FWHT is bit-identical).
#define RAAD_HAVE_AVX2_QUANT 1

inline float hsum8_q(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline float hmax8_q(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

template <int BITS>
inline __m256 to_grid_ps(__m256 y) {
  if constexpr (BITS == 2) {  // 2·floor(y/2) + 1 clamped to [-3, 3]
    const __m256 g = _mm256_fmadd_ps(_mm256_floor_ps(_mm256_mul_ps(y, _mm256_set1_ps(0.5f))), _mm256_set1_ps(2.f),
                                     _mm256_set1_ps(1.f));
    return _mm256_min_ps(_mm256_max_ps(g, _mm256_set1_ps(-3.f)), _mm256_set1_ps(3.f));
  } else {
    const __m256 q = _mm256_set1_ps(qmax_<BITS>());
    const __m256 c = _mm256_min_ps(_mm256_max_ps(y, _mm256_sub_ps(_mm256_setzero_ps(), q)), q);
    return _mm256_round_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}

#if defined(__AVX512F__) && defined(__AVX512DQ__) && !defined(RAAD_SIMDE_AVX512)
// AVX-512 pieces of the row quantizer (AVX-512 and AMX TUs): the same operations lane for lane,
// so the codes and scales are the AVX2 path's bits (the Hadamard transform's butterflies too).
#define RAAD_HAVE_AVX512_QUANT 1

template <int BITS>
inline __m512 to_grid_ps512(__m512 y) {
  static_assert(BITS != 2, "int2 uses the closed-form search");
  const __m512 q = _mm512_set1_ps(qmax_<BITS>());
  const __m512 c = _mm512_min_ps(_mm512_max_ps(y, _mm512_sub_ps(_mm512_setzero_ps(), q)), q);
  return _mm512_roundscale_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// Orthonormal FWHT for n >= 16 (power of two): stages 1, 2, 4, 8 inside each vector, then vector
// butterflies; each output is the same sums and differences as fwht_avx2's, in the same order.
inline void fwht_avx512(float* x, int n) {
  for (int i = 0; i < n; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    __m512 sw = _mm512_permute_ps(v, 0xB1);  // swap neighbours
    v = _mm512_mask_sub_ps(_mm512_add_ps(v, sw), 0xAAAA, sw, v);
    sw = _mm512_permute_ps(v, 0x4E);  // swap pairs
    v = _mm512_mask_sub_ps(_mm512_add_ps(v, sw), 0xCCCC, sw, v);
    sw = _mm512_shuffle_f32x4(v, v, 0xB1);  // swap 4-groups
    v = _mm512_mask_sub_ps(_mm512_add_ps(v, sw), 0xF0F0, sw, v);
    sw = _mm512_shuffle_f32x4(v, v, 0x4E);  // swap 8-groups
    v = _mm512_mask_sub_ps(_mm512_add_ps(v, sw), 0xFF00, sw, v);
    _mm512_storeu_ps(x + i, v);
  }
  for (int len = 16; len < n; len <<= 1)
    for (int i = 0; i < n; i += 2 * len)
      for (int j = i; j < i + len; j += 16) {
        const __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + len);
        _mm512_storeu_ps(x + j, _mm512_add_ps(a, b));
        _mm512_storeu_ps(x + j + len, _mm512_sub_ps(a, b));
      }
  const __m512 s = _mm512_set1_ps(float(1.0 / __builtin_sqrt(double(n))));
  for (int i = 0; i < n; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), s));
}
#endif

// Squared errors of 3 candidate scales at once (independent accumulators: the search is bound by
// the FMA latency otherwise). n a multiple of 8.
template <int BITS>
inline void grid_errors3(const float* x, int n, const float* s, float* err) {
  __m256 e0 = _mm256_setzero_ps(), e1 = e0, e2 = e0;
  const __m256 s0 = _mm256_set1_ps(s[0]), s1 = _mm256_set1_ps(s[1]), s2 = _mm256_set1_ps(s[2]);
  const __m256 i0 = _mm256_set1_ps(1.f / s[0]), i1 = _mm256_set1_ps(1.f / s[1]), i2 = _mm256_set1_ps(1.f / s[2]);
  int i = 0;
#ifdef RAAD_HAVE_AVX512_QUANT
  // 16 channels per step for the grid rounding; the squares are still accumulated 8 lanes at a
  // time in the same order (low half, then high half), so the errors are the AVX2 loop's bits.
  {
    const __m512 z0 = _mm512_set1_ps(s[0]), z1 = _mm512_set1_ps(s[1]), z2 = _mm512_set1_ps(s[2]);
    const __m512 j0 = _mm512_set1_ps(1.f / s[0]), j1 = _mm512_set1_ps(1.f / s[1]), j2 = _mm512_set1_ps(1.f / s[2]);
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      const __m512 d0 = _mm512_fmsub_ps(to_grid_ps512<BITS>(_mm512_mul_ps(v, j0)), z0, v);
      const __m512 d1 = _mm512_fmsub_ps(to_grid_ps512<BITS>(_mm512_mul_ps(v, j1)), z1, v);
      const __m512 d2 = _mm512_fmsub_ps(to_grid_ps512<BITS>(_mm512_mul_ps(v, j2)), z2, v);
      const __m256 a0 = _mm512_castps512_ps256(d0), a1 = _mm512_castps512_ps256(d1), a2 = _mm512_castps512_ps256(d2);
      e0 = _mm256_fmadd_ps(a0, a0, e0);
      e1 = _mm256_fmadd_ps(a1, a1, e1);
      e2 = _mm256_fmadd_ps(a2, a2, e2);
      const __m256 b0 = _mm512_extractf32x8_ps(d0, 1), b1 = _mm512_extractf32x8_ps(d1, 1),
                   b2 = _mm512_extractf32x8_ps(d2, 1);
      e0 = _mm256_fmadd_ps(b0, b0, e0);
      e1 = _mm256_fmadd_ps(b1, b1, e1);
      e2 = _mm256_fmadd_ps(b2, b2, e2);
    }
  }
#endif
  for (; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 d0 = _mm256_fmsub_ps(to_grid_ps<BITS>(_mm256_mul_ps(v, i0)), s0, v);
    const __m256 d1 = _mm256_fmsub_ps(to_grid_ps<BITS>(_mm256_mul_ps(v, i1)), s1, v);
    const __m256 d2 = _mm256_fmsub_ps(to_grid_ps<BITS>(_mm256_mul_ps(v, i2)), s2, v);
    e0 = _mm256_fmadd_ps(d0, d0, e0);
    e1 = _mm256_fmadd_ps(d1, d1, e1);
    e2 = _mm256_fmadd_ps(d2, d2, e2);
  }
  err[0] = hsum8_q(e0);
  err[1] = hsum8_q(e1);
  err[2] = hsum8_q(e2);
}

// n a multiple of 8.
template <int BITS>
inline float quantize_row_avx2(const float* x, int n, int8_t* codes) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 am = _mm256_setzero_ps(), sq = _mm256_setzero_ps(), sa = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    am = _mm256_max_ps(am, _mm256_andnot_ps(sign, v));
    if constexpr (BITS == 2) sa = _mm256_add_ps(sa, _mm256_andnot_ps(sign, v));
    sq = _mm256_fmadd_ps(v, v, sq);
  }
  const float amax = hmax8_q(am);
  float scale;
  if constexpr (BITS == 8) {
    scale = amax / 127.f;
  } else {
    float cand[kClipCandidates], safe[kClipCandidates], err[kClipCandidates];
    clip_candidates<BITS>(amax, __builtin_sqrtf(hsum8_q(sq) / float(n)), cand);
    // Candidates clipped at the absmax repeat cand[0] (at 4 bits, on rotated rows, most of them
    // do): a repeat has the same error, so under the strict rule below it never wins; only the
    // others are evaluated (3 at a time; each error is computed the same way in any slot). The
    // grid is ascending, so the unclipped ones are a prefix: cand[1..nu), no pairwise search.
    int uniq[kClipCandidates], nu = 1;
    uniq[0] = 0;
    while (nu < kClipCandidates && cand[nu] != cand[0]) {
      uniq[nu] = nu;
      ++nu;
    }
    for (int u = 0; u < kClipCandidates; ++u) safe[u] = u < nu ? cand[uniq[u]] : cand[0];
    for (int u = 0; u < kClipCandidates; ++u) safe[u] = safe[u] > 0.f ? safe[u] : 1.f;
    if constexpr (BITS == 2) {
      // int2 in closed form: with a = |x|, the code magnitude is 1 below a = 2s and 3 from there
      // (the grid's boundaries: at a = 2s both sides give the same error s²), so
      //   err(s) = Σ (a − s)² + Σ_{a ≥ 2s} [(a − 3s)² − (a − s)²] = S2 − 2 s A + n s² − 4 s Σ max(a − 2s, 0)
      // with S2 = Σ a², A = Σ a: 3 vector operations per candidate and 8 channels instead of 8.
      // The same errors up to float rounding (the test of the codes allows picks that tie to it).
      const float S2 = hsum8_q(sq), A = hsum8_q(sa);
      for (int u = 0; u < nu; u += 3) {
        const __m256 t0 = _mm256_set1_ps(2.f * safe[u]), t1 = _mm256_set1_ps(2.f * safe[u + 1 < nu ? u + 1 : u]),
                     t2 = _mm256_set1_ps(2.f * safe[u + 2 < nu ? u + 2 : u]);
        __m256 r0 = _mm256_setzero_ps(), r1 = r0, r2 = r0;
        for (int i = 0; i < n; i += 8) {
          const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i));
          r0 = _mm256_add_ps(r0, _mm256_max_ps(_mm256_sub_ps(a, t0), _mm256_setzero_ps()));
          r1 = _mm256_add_ps(r1, _mm256_max_ps(_mm256_sub_ps(a, t1), _mm256_setzero_ps()));
          r2 = _mm256_add_ps(r2, _mm256_max_ps(_mm256_sub_ps(a, t2), _mm256_setzero_ps()));
        }
        const float R[3] = {hsum8_q(r0), hsum8_q(r1), hsum8_q(r2)};
        for (int k = 0; k < 3 && u + k < nu; ++k) {
          const float s = safe[u + k];
          err[u + k] = S2 - 2.f * s * A + float(n) * s * s - 4.f * s * R[k];
        }
      }
    } else {
      for (int u = 0; u < nu; u += 3) grid_errors3<BITS>(x, n, safe + u, err + u);
    }
    scale = cand[0];
    float best_err = err[0];
    for (int u = 1; u < nu; ++u)
      if (err[u] < best_err) {  // strict: ties keep the earlier candidate
        best_err = err[u];
        scale = cand[uniq[u]];
      }
  }
  if (!(scale > 0.f)) scale = BITS == 2 ? 1.17549435e-38f : 1.f;
  const __m256 sv = _mm256_set1_ps(scale);
  int i0 = 0;
#ifdef RAAD_HAVE_AVX512_QUANT
  if constexpr (BITS != 2) {  // the same division and rounding, 16 lanes at a time
    const __m512 zv = _mm512_set1_ps(scale);
    for (; i0 + 16 <= n; i0 += 16) {
      const __m512i c = _mm512_cvtps_epi32(to_grid_ps512<BITS>(_mm512_div_ps(_mm512_loadu_ps(x + i0), zv)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i0), _mm512_cvtsepi32_epi8(c));
    }
  }
#endif
  for (int i = i0; i < n; i += 8) {
    const __m256i c = _mm256_cvtps_epi32(to_grid_ps<BITS>(_mm256_div_ps(_mm256_loadu_ps(x + i), sv)));
    const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(c, c), _mm256_setzero_si256());
    const __m128i b = _mm_unpacklo_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), b);
  }
  return scale;
}

// Orthonormal FWHT for n >= 8 (power of two): in-register stages 1, 2, 4, then vector butterflies.
inline void fwht_avx2(float* x, int n) {
  const __m256 odd1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1));
  const __m256 odd2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, -1, -1, 0, 0, -1, -1));
  for (int i = 0; i < n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    __m256 sw = _mm256_permute_ps(v, 0xB1);  // swap neighbours
    v = _mm256_blendv_ps(_mm256_add_ps(v, sw), _mm256_sub_ps(sw, v), odd1);
    sw = _mm256_permute_ps(v, 0x4E);  // swap pairs
    v = _mm256_blendv_ps(_mm256_add_ps(v, sw), _mm256_sub_ps(sw, v), odd2);
    sw = _mm256_permute2f128_ps(v, v, 1);  // swap halves
    v = _mm256_blend_ps(_mm256_add_ps(v, sw), _mm256_sub_ps(sw, v), 0xF0);
    _mm256_storeu_ps(x + i, v);
  }
  for (int len = 8; len < n; len <<= 1)
    for (int i = 0; i < n; i += 2 * len)
      for (int j = i; j < i + len; j += 8) {
        const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + len);
        _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
        _mm256_storeu_ps(x + j + len, _mm256_sub_ps(a, b));
      }
  const __m256 s = _mm256_set1_ps(float(1.0 / __builtin_sqrt(double(n))));
  for (int i = 0; i < n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), s));
}
#endif

inline float quantize_row(const float* x, int n, int bits, int8_t* codes) {
#ifdef RAAD_HAVE_AVX2_QUANT
  if ((n & 7) == 0) {
    if (bits == 8) return quantize_row_avx2<8>(x, n, codes);
    if (bits == 4) return quantize_row_avx2<4>(x, n, codes);
    return quantize_row_avx2<2>(x, n, codes);
  }
#endif
  float s;
  switch (bits) {
    case 8: s = token_scale<8>(x, n); quantize_codes<8>(x, n, s, codes); break;
    case 4: s = token_scale<4>(x, n); quantize_codes<4>(x, n, s, codes); break;
    default: s = token_scale<2>(x, n); quantize_codes<2>(x, n, s, codes); break;
  }
  return s;
}

// A row of Q or K → codes[0..dpad) (zero beyond dp) and its scale: load, subtract `mean` (K
// smoothing; may be null), zero-pad to dp, rotate, quantize. `row` holds dp floats.
inline float prepare_qk_row(const View4& t, const Plan& p, int64_t b, int64_t h, int64_t n,
                            const float* mean, float* row, int8_t* codes) {
  const float* src = get_row(t, b, h, n, p.D, row);
  if (!mean && !p.rotate) {  // quantized as it is (dp = D): straight from the input when possible
    const float s = quantize_row(src, p.dp, p.bits, codes);
    for (int c = p.dp; c < p.dpad; ++c) codes[c] = 0;
    return s;
  }
  if (mean) {
    for (int64_t c = 0; c < p.D; ++c) row[c] = src[c] - mean[c];
  } else if (src != row) {
    std::memcpy(row, src, size_t(p.D) * 4);
  }
  for (int c = int(p.D); c < p.dp; ++c) row[c] = 0.f;
  if (p.rotate) {
#ifdef RAAD_HAVE_AVX512_QUANT
    if (p.dp >= 16) fwht_avx512(row, p.dp);
    else
#endif
#ifdef RAAD_HAVE_AVX2_QUANT
    if (p.dp >= 8) fwht_avx2(row, p.dp);
    else
#endif
      fwht(row, p.dp);
  }
  const float s = quantize_row(row, p.dp, p.bits, codes);
  for (int c = p.dp; c < p.dpad; ++c) codes[c] = 0;
  return s;
}

// --------------------------------------------------------------------------------------------
// Blocked layouts
// --------------------------------------------------------------------------------------------

// Bytes of one key (or Q row) in the int2 bit-plane layout.
inline int plane_bytes(const Plan& p) { return p.plane_words == 0 ? 8 : 16 * p.plane_words; }

inline int64_t k_group_bytes(const Plan& p) {
  return p.kplanes ? int64_t(p.kgroup) * plane_bytes(p) : int64_t(p.kgroup) * p.dpad * p.bits / 8;
}

// int2 codes[0..dp) → bit planes (attention_internal.h); w gets 1 or 2·plane_words words.
// `codes` holds dpad bytes (zeros from dp on).
inline void int2_planes(const Plan& p, const int8_t* codes, uint64_t* w) {
#ifdef RAAD_HAVE_AVX2_QUANT
  // 32 channels at a time: a = (c > 0); b = bit 1 of c + 3 (c + 3 in {0, 2, 4, 6}), moved to the
  // byte's sign bit by a 16-bit shift by 6 (the low byte's bits 0..2 stay inside it).
  const int n = p.plane_words;
  if (n > 0)
    for (int i = 0; i < 2 * n; ++i) w[i] = 0;
  for (int c0 = 0; c0 < p.dpad; c0 += 32) {
    const __m256i v = c0 + 32 <= p.dpad
                          ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c0))
                          : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + c0)));
    const int valid = p.dp - c0;
    const uint32_t keep = valid >= 32 ? 0xffffffffu : (valid <= 0 ? 0u : (1u << valid) - 1u);
    const uint32_t a = uint32_t(_mm256_movemask_epi8(_mm256_cmpgt_epi8(v, _mm256_setzero_si256()))) & keep;
    const uint32_t b =
        uint32_t(_mm256_movemask_epi8(_mm256_slli_epi16(_mm256_add_epi8(v, _mm256_set1_epi8(3)), 6))) & keep;
    if (n == 0) {
      w[0] = uint64_t(a) | uint64_t(b) << 32;
    } else {
      const int sh = c0 & 63;
      w[c0 >> 6] |= uint64_t(a) << sh;
      w[n + (c0 >> 6)] |= uint64_t(b) << sh;
    }
  }
#else
  if (p.plane_words == 0) {
    uint64_t x = 0;
    for (int c = 0; c < p.dp; ++c) {
      const unsigned u = unsigned(codes[c] + 3) >> 1;
      x |= uint64_t(u >> 1) << c | uint64_t(u & 1) << (32 + c);
    }
    w[0] = x;
    return;
  }
  const int n = p.plane_words;
  for (int i = 0; i < 2 * n; ++i) w[i] = 0;
  for (int c = 0; c < p.dp; ++c) {
    const unsigned u = unsigned(codes[c] + 3) >> 1;
    w[c >> 6] |= uint64_t(u >> 1) << (c & 63);
    w[n + (c >> 6)] |= uint64_t(u & 1) << (c & 63);
  }
#endif
}

// Store the codes of key j into the blocked K layout of one (b, h).
inline void store_k_codes(uint8_t* kbh, const Plan& p, int64_t j, const int8_t* codes) {
  if (p.kplanes) {
    uint64_t w[64];
    int2_planes(p, codes, w);
    std::memcpy(kbh + j * plane_bytes(p), w, size_t(plane_bytes(p)));
    return;
  }
  const int G = p.kgroup;
  uint8_t* grp = kbh + (j / G) * k_group_bytes(p);
  const int kk = int(j % G);
  if (p.bits == 8) {
    for (int s = 0; s < p.dpad / 4; ++s) std::memcpy(grp + (s * G + kk) * 4, codes + 4 * s, 4);
  } else if (p.bits == 4) {
    for (int s = 0; s < p.dpad / 8; ++s)
      for (int c = 0; c < 4; ++c)
        grp[(s * G + kk) * 4 + c] = uint8_t((codes[8 * s + c] & 0xF) | ((codes[8 * s + 4 + c] & 0xF) << 4));
  } else {
    for (int s = 0; s < p.dpad / 16; ++s)
      for (int c = 0; c < 4; ++c) {
        unsigned byte = 0;
        for (int t = 0; t < 4; ++t) byte |= unsigned((codes[16 * s + 4 * t + c] + 3) >> 1) << (2 * t);
        grp[(s * G + kk) * 4 + c] = uint8_t(byte);
      }
  }
}

// Code of key j, channel c from the blocked layout (portable kernel and tests of the layout).
inline int k_code(const uint8_t* kbh, const Plan& p, int64_t j, int c) {
  if (p.kplanes) {
    if (c >= p.dp) return 0;
    uint64_t w[64];
    std::memcpy(w, kbh + j * plane_bytes(p), size_t(plane_bytes(p)));
    unsigned a, b;
    if (p.plane_words == 0) {
      a = unsigned(w[0] >> c) & 1;
      b = unsigned(w[0] >> (32 + c)) & 1;
    } else {
      a = unsigned(w[c >> 6] >> (c & 63)) & 1;
      b = unsigned(w[p.plane_words + (c >> 6)] >> (c & 63)) & 1;
    }
    return 2 * (2 * int(a) - 1) + (2 * int(b) - 1);
  }
  const int G = p.kgroup;
  const uint8_t* grp = kbh + (j / G) * k_group_bytes(p);
  const int kk = int(j % G);
  if (p.bits == 8) return int8_t(grp[((c >> 2) * G + kk) * 4 + (c & 3)]);
  if (p.bits == 4) {
    const int byte = grp[((c >> 3) * G + kk) * 4 + (c & 3)];
    const int nib = (c & 4) ? (byte >> 4) : (byte & 0xF);
    return nib >= 8 ? nib - 16 : nib;
  }
  const int byte = grp[((c >> 4) * G + kk) * 4 + (c & 3)];
  return 2 * ((byte >> (2 * ((c >> 2) & 3))) & 3) - 3;
}

// --------------------------------------------------------------------------------------------
// Per-channel V helpers (float min/max written with intrinsics where available: the compiler
// does not vectorise `a > b ? a : b` on floats without -ffinite-math-only)
// --------------------------------------------------------------------------------------------

// lo[c] = min(lo[c], row[c]), hi[c] = max(hi[c], row[c])
inline void minmax_update(const float* row, int64_t n, float* lo, float* hi) {
  int64_t c = 0;
#ifdef RAAD_HAVE_AVX2_QUANT
  for (; c + 8 <= n; c += 8) {
    const __m256 v = _mm256_loadu_ps(row + c);
    _mm256_storeu_ps(lo + c, _mm256_min_ps(_mm256_loadu_ps(lo + c), v));
    _mm256_storeu_ps(hi + c, _mm256_max_ps(_mm256_loadu_ps(hi + c), v));
  }
#endif
  for (; c < n; ++c) {
    lo[c] = minf_(lo[c], row[c]);
    hi[c] = maxf_(hi[c], row[c]);
  }
}

// dst[c] = round(clamp((row[c] − vm[c]) / vs[c], ±127)) (quant.prepare_v), as float or int8.
template <class T>
inline void v_codes(const float* row, const float* vm, const float* vs, int64_t n, T* dst) {
  int64_t c = 0;
#ifdef RAAD_HAVE_AVX2_QUANT
  if constexpr (sizeof(T) == 4) {
    const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
    for (; c + 8 <= n; c += 8) {
      const __m256 y = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(row + c), _mm256_loadu_ps(vm + c)),
                                     _mm256_loadu_ps(vs + c));
      _mm256_storeu_ps(dst + c, _mm256_round_ps(_mm256_min_ps(_mm256_max_ps(y, lo), hi),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
#endif
  for (; c < n; ++c) dst[c] = T(rne_(clampf_((row[c] - vm[c]) / vs[c], -127.f, 127.f)));
}

// --------------------------------------------------------------------------------------------
// Phase A: statistics of one (b, h)
// --------------------------------------------------------------------------------------------

inline void stats_impl(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, uint8_t* scratch) {
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t dmax = p.D > p.Dv ? p.D : p.Dv;
  double* acc = reinterpret_cast<double*>(scratch);
  float* row = reinterpret_cast<float*>(acc + dmax);
  float* lo = row + dmax;
  float* hi = lo + dmax;
  if (p.smooth) {  // K mean over tokens, per channel
    for (int64_t c = 0; c < p.D; ++c) acc[c] = 0.0;
    for (int64_t j = 0; j < p.Nk; ++j) {
      const float* r = get_row(a.k, b, h, j, p.D, row);
      for (int64_t c = 0; c < p.D; ++c) acc[c] += double(r[c]);
    }
    float* km = w.kmean + bh * p.D;
    for (int64_t c = 0; c < p.D; ++c) km[c] = float(acc[c] / double(p.Nk));
  }
  if (p.pv_bits == 8) {  // V mean and absmax of (V − mean) per channel, in one pass:
    // max_j |v_j − m| = max(max_j v_j − m, m − min_j v_j) (float subtraction is monotonic)
    for (int64_t c = 0; c < p.Dv; ++c) {
      acc[c] = 0.0;
      lo[c] = inf_();
      hi[c] = -inf_();
    }
    for (int64_t j = 0; j < p.Nk; ++j) {
      const float* r = get_row(a.v, b, h, j, p.Dv, row);
      for (int64_t c = 0; c < p.Dv; ++c) acc[c] += double(r[c]);
      minmax_update(r, p.Dv, lo, hi);
    }
    float* vm = w.vmean + bh * p.Dv;
    float* vs = w.vscale + bh * p.Dv;
    for (int64_t c = 0; c < p.Dv; ++c) {
      vm[c] = float(acc[c] / double(p.Nk));
      const float dev = maxf_(hi[c] - vm[c], vm[c] - lo[c]);
      vs[c] = dev > 0.f ? dev / 127.f : 1.f;
    }
  }
}

// --------------------------------------------------------------------------------------------
// Phase B: K and V of key block kb of one (b, h), quantized once
// --------------------------------------------------------------------------------------------

inline void prep_impl(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, int64_t kb, uint8_t* scratch) {
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t j0 = kb * kKeyBlock;
  const int64_t j1 = min64_(j0 + kKeyBlock, p.nkp);
  float* row = reinterpret_cast<float*>(scratch);
  const int64_t rowlen = (p.dp > p.Dv ? p.dp : p.Dv) + 16;
  int8_t* codes = reinterpret_cast<int8_t*>(row + rowlen);
  uint8_t* kbh = w.kq + bh * p.kq_stride;
  float* ks = w.ks + bh * p.nkp;
  const float* mean = p.smooth ? w.kmean + bh * p.D : nullptr;
  for (int64_t j = j0; j < j1; ++j) {
    if (j < p.Nk) {
      ks[j] = prepare_qk_row(a.k, p, b, h, j, mean, row, codes);
    } else {
      ks[j] = 0.f;
      for (int c = 0; c < p.dpad; ++c) codes[c] = 0;
    }
    store_k_codes(kbh, p, j, codes);
  }
  if (p.pv_bits == 8 && p.v_float) {
    const float* vm = w.vmean + bh * p.Dv;
    const float* vs = w.vscale + bh * p.Dv;
    float* vh = w.vh + bh * p.v_stride;
    for (int64_t j = j0; j < j1; ++j) {
      float* dst = vh + j * p.dvp;
      if (j < p.Nk) {
        v_codes(get_row(a.v, b, h, j, p.Dv, row), vm, vs, p.Dv, dst);
        for (int c = int(p.Dv); c < p.dvp; ++c) dst[c] = 0.f;
      } else {
        for (int c = 0; c < p.dvp; ++c) dst[c] = 0.f;
      }
    }
  } else if (p.pv_bits == 8) {
    int8_t* vbh = w.vq + bh * p.v_stride;
    const float* vm = w.vmean + bh * p.Dv;
    const float* vs = w.vscale + bh * p.Dv;
    int8_t* codes8 = reinterpret_cast<int8_t*>(codes);
    for (int64_t j = j0; j < j1; ++j) {
      int8_t* dst = vbh + (j >> 2) * p.dvp * 4 + (j & 3);
      if (j < p.Nk) {
        v_codes(get_row(a.v, b, h, j, p.Dv, row), vm, vs, p.Dv, codes8);
        for (int64_t c = 0; c < p.Dv; ++c) dst[c * 4] = codes8[c];
        for (int c = int(p.Dv); c < p.dvp; ++c) dst[c * 4] = 0;
      } else {
        for (int c = 0; c < p.dvp; ++c) dst[c * 4] = 0;
      }
    }
  } else {
    const bool bf = a.q.dtype == DType::BF16;
    float* vh = w.vh + bh * p.v_stride;
    for (int64_t j = j0; j < j1; ++j) {
      float* dst = vh + j * p.dvp;
      if (j < p.Nk) {
        const float* r = get_row(a.v, b, h, j, p.Dv, row);
        for (int64_t c = 0; c < p.Dv; ++c) dst[c] = round_half(r[c], bf);
        for (int c = int(p.Dv); c < p.dvp; ++c) dst[c] = 0.f;
      } else {
        for (int c = 0; c < p.dvp; ++c) dst[c] = 0.f;
      }
    }
  }
}

// --------------------------------------------------------------------------------------------
// Phase C helpers shared by every kernel
// --------------------------------------------------------------------------------------------

// The per-thread scratch of one query tile, typed (offsets from make_plan). `cache` is the
// probability cache's bytes (fp16 in the vector kernels, fp32 in the portable one); `tmp` the
// code bytes after the row buffer.
struct TileScratch {
  int8_t *qc, *qa;
  float* rs;
  int32_t* qsum;
  float *row, *S;
  uint8_t* P8;
  float *Pv, *bias, *outf, *M, *L, *T, *stamp;
  uint8_t* cache;
  int8_t *kun, *tmp;
};

inline TileScratch tile_scratch(const Plan& p, uint8_t* scr) {
  TileScratch t;
  t.qc = reinterpret_cast<int8_t*>(scr + p.off_qc);
  t.qa = reinterpret_cast<int8_t*>(scr + p.off_qa);
  t.rs = reinterpret_cast<float*>(scr + p.off_rs);
  t.qsum = reinterpret_cast<int32_t*>(scr + p.off_qsum);
  t.row = reinterpret_cast<float*>(scr + p.off_row);
  t.S = reinterpret_cast<float*>(scr + p.off_S);
  t.P8 = scr + p.off_P;
  t.Pv = reinterpret_cast<float*>(scr + p.off_P);
  t.bias = reinterpret_cast<float*>(scr + p.off_bias);
  t.outf = reinterpret_cast<float*>(scr + p.off_outf);
  t.M = reinterpret_cast<float*>(scr + p.off_m);
  t.L = reinterpret_cast<float*>(scr + p.off_l);
  t.T = reinterpret_cast<float*>(scr + p.off_t);
  t.stamp = reinterpret_cast<float*>(scr + p.off_stamp);
  t.cache = scr + p.off_cache;
  t.kun = reinterpret_cast<int8_t*>(scr + p.off_kun);
  t.tmp = reinterpret_cast<int8_t*>(t.row + (p.dp > p.Dv ? p.dp : p.Dv) + 16);
  return t;
}

// The online-softmax state of the tile's rows before the first key block: m = -inf, l = t = 0, o = 0.
inline void start_rows(const Plan& p, int nr, float* M, float* L, float* T, float* outf) {
  for (int r = 0; r < nr; ++r) {
    M[r] = -inf_();
    L[r] = 0.f;
    T[r] = 0.f;
    for (int c = 0; c < p.dvp; ++c) outf[int64_t(r) * p.dvp + c] = 0.f;
  }
}

// Quantize the query rows of a tile: codes (rows >= nr are zero), log2-domain row scales
// rs = s_q · scale · log2(e), and code sums (for the offset corrections). `qa` (may be null) gets
// the absolute codes. Layout: row-major [row][dpad], or with `interleave` grouped by kRowGroup
// rows: [row / 4][dpad / 4][row % 4][4], so the 4 rows' bytes of one 4-channel step are adjacent.
inline void prepare_q_tile(const AttentionArgs& a, const Plan& p, int64_t b, int64_t h, int64_t i0, int nr,
                           int nrows_padded, float* row, int8_t* tmp, bool interleave, int8_t* qc, int8_t* qa,
                           float* rs, int32_t* qsum) {
  for (int r = 0; r < nrows_padded; ++r) {
    if (r < nr) {
      rs[r] = prepare_qk_row(a.q, p, b, h, i0 + r, nullptr, row, tmp) * p.scale * kLog2e;
    } else {
      rs[r] = 0.f;
      for (int k = 0; k < p.dpad; ++k) tmp[k] = 0;
    }
    if (p.kplanes) {  // bit planes (rows >= nr: all-zero planes, their scores are not used)
      uint64_t* w = reinterpret_cast<uint64_t*>(qc + int64_t(r) * p.qrow);
      if (r < nr) {
        int2_planes(p, tmp, w);
        if (p.plane_words == 0) w[1] = (w[0] >> 32) | (w[0] << 32);
      } else {
        std::memset(w, 0, size_t(p.qrow));
      }
      qsum[r] = 0;
      continue;
    }
    int32_t sum = 0;
    for (int k = 0; k < p.dpad; ++k) sum += tmp[k];
    qsum[r] = sum;
    int8_t* abs_codes = tmp + p.dpad;  // the caller's tmp holds 2 × dpad bytes
    if (qa)
      for (int k = 0; k < p.dpad; ++k) abs_codes[k] = int8_t(tmp[k] < 0 ? -tmp[k] : tmp[k]);
    if (interleave) {
      const int64_t base = int64_t(r / kRowGroup) * kRowGroup * p.dpad + (r % kRowGroup) * 4;
      for (int k = 0; k < p.dpad; k += 4) {
        std::memcpy(qc + base + k * kRowGroup, tmp + k, 4);
        if (qa) std::memcpy(qa + base + k * kRowGroup, abs_codes + k, 4);
      }
    } else {
      std::memcpy(qc + int64_t(r) * p.dpad, tmp, size_t(p.dpad));
      if (qa) std::memcpy(qa + int64_t(r) * p.dpad, abs_codes, size_t(p.dpad));
    }
  }
}

// Final output row: pv8: acc · vscale/255 / l + mean (when l > 0); pv16: acc / l. Fully masked
// rows (l = 0) come out as zeros.
inline void finish_row(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, int64_t i,
                       const float* acc, float l, float* tmp) {
  const float inv = l > 0.f ? 1.f / l : 1.f;
  if (p.pv_bits == 8) {
    const float* vm = w.vmean + bh * p.Dv;
    const float* vs = w.vscale + bh * p.Dv;
    const float has = l > 0.f ? 1.f : 0.f;
    for (int64_t c = 0; c < p.Dv; ++c) tmp[c] = acc[c] * (vs[c] * (1.f / 255.f)) * inv + has * vm[c];
  } else {
    for (int64_t c = 0; c < p.Dv; ++c) tmp[c] = acc[c] * inv;
  }
  store_row(a.out, a.q.dtype, (bh / p.H) * p.out_sb + (bh % p.H) * p.out_sh + i * p.out_sn, tmp, p.Dv);
}

// Entropy (nats) from the online sums: l = Σ p, t = Σ p · (u - m) with u in log2 units.
inline float entropy_of(float l, float t) {
  return l > 0.f ? __builtin_logf(l) - kLn2 * t / l : 0.f;
}

// Slot-local received partials of (b, h).
inline float* received_row(const Plan& p, const Work& w, int64_t slot, int64_t bh) {
  return w.recv + w.recv_off[slot] + (bh - w.recv_bh0[slot]) * p.Nk;
}

}  // namespace
}  // namespace raad::cpu
