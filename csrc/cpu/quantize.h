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

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
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

// quant.token_scales for one row.
template <int BITS>
inline float token_scale(const float* x, int n) {
  const float amax = row_absmax(x, n);
  float scale;
  if constexpr (BITS == 8) {
    scale = amax / 127.f;
  } else {
    constexpr float grid4[8] = {2.0f, 2.25f, 2.5f, 2.75f, 3.0f, 3.5f, 4.0f, 5.0f};
    constexpr float grid2[8] = {1.0f, 1.25f, 1.5f, 1.75f, 2.0f, 2.25f, 2.5f, 3.0f};
    const float* grid = BITS == 4 ? grid4 : grid2;
    const float rms = __builtin_sqrtf(row_sumsq(x, n) / float(n));
    float best_err = 0.f;
    scale = 0.f;
    for (int g = 0; g < 8; ++g) {
      const float s = minf_(grid[g] * rms, amax) / qmax_<BITS>();
      const float err = grid_error<BITS>(x, n, s > 0.f ? s : 1.f);
      if (g == 0 || err < best_err) {  // strict: ties keep the smaller multiple
        best_err = err;
        scale = s;
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

inline float quantize_row(const float* x, int n, int bits, int8_t* codes) {
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
  load_row(t, b, h, n, p.D, row);
  if (mean)
    for (int64_t c = 0; c < p.D; ++c) row[c] -= mean[c];
  for (int c = int(p.D); c < p.dp; ++c) row[c] = 0.f;
  if (p.rotate) fwht(row, p.dp);
  const float s = quantize_row(row, p.dp, p.bits, codes);
  for (int c = p.dp; c < p.dpad; ++c) codes[c] = 0;
  return s;
}

// --------------------------------------------------------------------------------------------
// Blocked layouts
// --------------------------------------------------------------------------------------------

inline int64_t k_group_bytes(const Plan& p) { return int64_t(p.kgroup) * p.dpad * p.bits / 8; }

// Store the codes of key j into the blocked K layout of one (b, h).
inline void store_k_codes(uint8_t* kbh, const Plan& p, int64_t j, const int8_t* codes) {
  const int G = p.kgroup;
  uint8_t* grp = kbh + (j / G) * k_group_bytes(p);
  const int kk = int(j % G);
  if (p.bits == 8) {
    for (int s = 0; s < p.dpad / 4; ++s)
      for (int c = 0; c < 4; ++c) grp[(s * G + kk) * 4 + c] = uint8_t(codes[4 * s + c]);
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
// Phase A: statistics of one (b, h)
// --------------------------------------------------------------------------------------------

inline void stats_impl(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, uint8_t* scratch) {
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t dmax = p.D > p.Dv ? p.D : p.Dv;
  double* acc = reinterpret_cast<double*>(scratch);
  float* row = reinterpret_cast<float*>(acc + dmax);
  if (p.smooth) {
    for (int64_t c = 0; c < p.D; ++c) acc[c] = 0.0;
    for (int64_t j = 0; j < p.Nk; ++j) {
      load_row(a.k, b, h, j, p.D, row);
      for (int64_t c = 0; c < p.D; ++c) acc[c] += double(row[c]);
    }
    float* km = w.kmean + bh * p.D;
    for (int64_t c = 0; c < p.D; ++c) km[c] = float(acc[c] / double(p.Nk));
  }
  if (p.pv_bits == 8) {
    for (int64_t c = 0; c < p.Dv; ++c) acc[c] = 0.0;
    for (int64_t j = 0; j < p.Nk; ++j) {
      load_row(a.v, b, h, j, p.Dv, row);
      for (int64_t c = 0; c < p.Dv; ++c) acc[c] += double(row[c]);
    }
    float* vm = w.vmean + bh * p.Dv;
    float* vs = w.vscale + bh * p.Dv;
    for (int64_t c = 0; c < p.Dv; ++c) {
      vm[c] = float(acc[c] / double(p.Nk));
      vs[c] = 0.f;
    }
    for (int64_t j = 0; j < p.Nk; ++j) {
      load_row(a.v, b, h, j, p.Dv, row);
      for (int64_t c = 0; c < p.Dv; ++c) vs[c] = maxf_(vs[c], absf_(row[c] - vm[c]));
    }
    for (int64_t c = 0; c < p.Dv; ++c) vs[c] = vs[c] > 0.f ? vs[c] / 127.f : 1.f;
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
  if (p.pv_bits == 8) {
    int8_t* vbh = w.vq + bh * p.v_stride;
    int32_t* cs = w.vcs + (bh * p.nkb + kb) * p.dvp;
    const float* vm = w.vmean + bh * p.Dv;
    const float* vs = w.vscale + bh * p.Dv;
    for (int c = 0; c < p.dvp; ++c) cs[c] = 0;
    for (int64_t j = j0; j < j1; ++j) {
      int8_t* dst = vbh + (j >> 2) * p.dvp * 4 + (j & 3);
      if (j < p.Nk) {
        load_row(a.v, b, h, j, p.Dv, row);
        for (int64_t c = 0; c < p.Dv; ++c) {
          const int8_t code = int8_t(rne_(clampf_((row[c] - vm[c]) / vs[c], -127.f, 127.f)));
          dst[c * 4] = code;
          cs[c] += 128 * code;
        }
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
        load_row(a.v, b, h, j, p.Dv, row);
        for (int64_t c = 0; c < p.Dv; ++c) dst[c] = round_half(row[c], bf);
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

// Quantize the query rows of a tile: codes [kQueryTile][dpad] (rows ≥ nr are zero), log2-domain
// row scales rs = s_q · scale · log2(e), and code sums (for the offset corrections).
inline void prepare_q_tile(const AttentionArgs& a, const Plan& p, int64_t b, int64_t h, int64_t i0, int nr,
                           int nrows_padded, float* row, int8_t* qc, int8_t* qa, float* rs, int32_t* qsum) {
  for (int r = 0; r < nrows_padded; ++r) {
    int8_t* c = qc + int64_t(r) * p.dpad;
    if (r < nr) {
      rs[r] = prepare_qk_row(a.q, p, b, h, i0 + r, nullptr, row, c) * p.scale * kLog2e;
    } else {
      rs[r] = 0.f;
      for (int k = 0; k < p.dpad; ++k) c[k] = 0;
    }
    int32_t sum = 0;
    for (int k = 0; k < p.dpad; ++k) sum += c[k];
    qsum[r] = sum;
    if (qa) {
      int8_t* d = qa + int64_t(r) * p.dpad;
      for (int k = 0; k < p.dpad; ++k) d[k] = int8_t(c[k] < 0 ? -c[k] : c[k]);
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
  store_row(a.out, a.q.dtype, (bh * p.Nq + i) * p.Dv, tmp, p.Dv);
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
