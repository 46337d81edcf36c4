// AVX-512 VNNI kernels (compiled with the AVX-512 F/BW/VL/DQ/VNNI flags only; the dispatcher
// calls them only when raad::active_isa() reports AVX-512 VNNI (or AMX) and, once per process,
// after a self-check against the portable kernels passed — see raad::cpu::kernel_isa).
//
// vpdpbusd multiplies unsigned bytes by signed bytes, 4 products into each int32 lane, without
// intermediate saturation:
//   Q·Kᵀ int8: the K operand is made unsigned by the +128 offset (k ^ 0x80 = k + 128) and the
//     correction uses the row sums of q: q·k = Σ (k+128)·q − 128 Σq.
//   int4 / int2: unpacked in registers to k + 8 / (k + 3)/2, corrected as in the AVX2 kernels.
//   P·V: P is already unsigned (0..255) and V signed: no offset at all.
// K vectors hold 16 keys × 4 channels; 2 per chunk (32 keys), shared by 4 query rows.
// The softmax, P quantization and maps are the AVX2 code of avx_driver.h.
#include <immintrin.h>
#ifdef RAAD_SIMDE_AVX512  // test build on a CPU without AVX-512 (csrc/cpu/emu/build_avx512_emu.py)
#include "cpu/emu/simde_avx512.h"
#endif

#include "cpu/avx_driver.h"

// GCC 12 warns about the deliberately undefined upper lanes inside _mm512_reduce_max_ps.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace raad::cpu {
namespace {

inline int32_t load32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Scale the int32 scores of one 32-key chunk of 4 rows and store them (log2 units) into S:
// s = MUL · acc − OFF · Σq, then s · (s_k · s_q · scale · log2 e); keys ≥ lim get -inf.
template <int MUL, int OFF>
inline void qk_store512(const __m512i (&acc)[4][2], const int32_t* qsum, const float* rs, const float* ks, float* S,
                        int base, int lim, __m512 (&mx)[4]) {
  const __m512 ks0 = _mm512_loadu_ps(ks), ks1 = _mm512_loadu_ps(ks + 16);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int r = 0; r < 4; ++r) {
    const __m512 rsv = _mm512_set1_ps(rs[r]);
    for (int hh = 0; hh < 2; ++hh) {
      __m512i s = acc[r][hh];
      if constexpr (MUL == 2) s = _mm512_slli_epi32(s, 1);
      s = _mm512_sub_epi32(s, _mm512_set1_epi32(OFF * qsum[r]));
      __m512 u = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), hh ? ks1 : ks0), rsv);
      const __mmask16 valid =
          _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(lim), _mm512_add_epi32(_mm512_set1_epi32(base + 16 * hh), lane));
      u = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-inf_()), u);
      mx[r] = _mm512_max_ps(mx[r], u);
      _mm512_storeu_ps(S + r * kKeyBlock + 16 * hh, u);
    }
  }
}

// BITS = 8: one step (4 channels) per 64-byte vector; 4: two steps (nibbles); 2: four steps.
template <int BITS>
__attribute__((noinline)) void qk_vnni(const Plan& p, const int8_t* qc, const float* rs, const int32_t* qsum,
                                       const uint8_t* kblk, int nv, const float* ks, float* S, float* bmax) {
  constexpr int per = 8 / BITS;  // steps per byte
  const int nvec = p.dpad / (4 * per);
  const int64_t gb = int64_t(16) * p.dpad * BITS / 8;
  const __m512i x80 = _mm512_set1_epi8(int8_t(0x80));
  const __m512i x88 = _mm512_set1_epi8(int8_t(0x88));
  const __m512i m0f = _mm512_set1_epi8(0x0F);
  const __m512i m3 = _mm512_set1_epi8(3);
  __m512 mx[4];
  for (int r = 0; r < 4; ++r) mx[r] = _mm512_set1_ps(-inf_());
  for (int c0 = 0; c0 < nv; c0 += 32) {
    const uint8_t* k0 = kblk + int64_t(c0 / 16) * gb;
    const uint8_t* k1 = k0 + gb;
    __m512i acc[4][2];
    for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    for (int s = 0; s < nvec; ++s) {
      const __m512i raw0 = _mm512_load_si512(reinterpret_cast<const void*>(k0 + 64 * s));
      const __m512i raw1 = _mm512_load_si512(reinterpret_cast<const void*>(k1 + 64 * s));
      for (int t = 0; t < per; ++t) {
        __m512i u0, u1;
        if constexpr (BITS == 8) {
          u0 = _mm512_xor_si512(raw0, x80);
          u1 = _mm512_xor_si512(raw1, x80);
        } else if constexpr (BITS == 4) {
          const __m512i a0 = _mm512_xor_si512(raw0, x88), a1 = _mm512_xor_si512(raw1, x88);
          u0 = _mm512_and_si512(t ? _mm512_srli_epi16(a0, 4) : a0, m0f);
          u1 = _mm512_and_si512(t ? _mm512_srli_epi16(a1, 4) : a1, m0f);
        } else {
          u0 = _mm512_and_si512(_mm512_srli_epi16(raw0, 2 * t), m3);
          u1 = _mm512_and_si512(_mm512_srli_epi16(raw1, 2 * t), m3);
        }
        for (int r = 0; r < 4; ++r) {
          const __m512i qb = _mm512_set1_epi32(load32(qc + (s * per + t) * 16 + 4 * r));
          acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], u0, qb);
          acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], u1, qb);
        }
      }
    }
    if constexpr (BITS == 8) qk_store512<1, 128>(acc, qsum, rs, ks + c0, S + c0, c0, nv, mx);
    else if constexpr (BITS == 4) qk_store512<1, 8>(acc, qsum, rs, ks + c0, S + c0, c0, nv, mx);
    else qk_store512<2, 3>(acc, qsum, rs, ks + c0, S + c0, c0, nv, mx);
  }
  for (int r = 0; r < 4; ++r) bmax[r] = _mm512_reduce_max_ps(mx[r]);
}

template <int NV>
inline void pv8_chunk512(const uint8_t* P, int nq, const int8_t* v, int64_t qstride, float* o, float alpha) {
  __m512i acc[NV];
  for (int c = 0; c < NV; ++c) acc[c] = _mm512_setzero_si512();
  for (int q = 0; q < nq; ++q) {
    const __m512i pb = _mm512_set1_epi32(load32(P + 4 * q));  // unsigned P of 4 keys
    const int8_t* vr = v + q * qstride;
    for (int c = 0; c < NV; ++c) acc[c] = _mm512_dpbusd_epi32(acc[c], pb, _mm512_loadu_si512(vr + 64 * c));
  }
  const __m512 al = _mm512_set1_ps(alpha);
  for (int c = 0; c < NV; ++c)
    _mm512_storeu_ps(o + 16 * c, _mm512_fmadd_ps(_mm512_loadu_ps(o + 16 * c), al, _mm512_cvtepi32_ps(acc[c])));
}

struct Avx512 {
  static constexpr int kGroup = 16;
  static constexpr int kChunk = 32;
  static constexpr bool kNeedAbs = false;
  static constexpr bool kPvFloat = false;

  static void qk(const Plan& p, const int8_t* qc, const int8_t*, const float* rs, const int32_t* qsum,
                 const uint8_t* kblk, int nv, const float* ks, float* S, float* bmax) {
    if (p.bits == 8) qk_vnni<8>(p, qc, rs, qsum, kblk, nv, ks, S, bmax);
    else if (p.bits == 4) qk_vnni<4>(p, qc, rs, qsum, kblk, nv, ks, S, bmax);
    else qk_vnni<2>(p, qc, rs, qsum, kblk, nv, ks, S, bmax);
  }

  static void pv8(const Plan& p, const uint8_t* P, int nq, const int8_t* v, float* o, float alpha) {
    const int64_t qs = int64_t(p.dvp) * 4;
    for (int c0 = 0; c0 < p.dvp; c0 += 128) {
      const int nv = (p.dvp - c0) / 16 < 8 ? (p.dvp - c0) / 16 : 8;
      const int8_t* vc = v + c0 * 4;
      switch (nv) {
        case 1: pv8_chunk512<1>(P, nq, vc, qs, o + c0, alpha); break;
        case 2: pv8_chunk512<2>(P, nq, vc, qs, o + c0, alpha); break;
        case 3: pv8_chunk512<3>(P, nq, vc, qs, o + c0, alpha); break;
        case 4: pv8_chunk512<4>(P, nq, vc, qs, o + c0, alpha); break;
        case 5: pv8_chunk512<5>(P, nq, vc, qs, o + c0, alpha); break;
        case 6: pv8_chunk512<6>(P, nq, vc, qs, o + c0, alpha); break;
        case 7: pv8_chunk512<7>(P, nq, vc, qs, o + c0, alpha); break;
        default: pv8_chunk512<8>(P, nq, vc, qs, o + c0, alpha); break;
      }
    }
  }
};

void stats_avx512(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, uint8_t* s) {
  stats_impl(a, p, w, bh, s);
}

void prep_avx512(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, int64_t kb, uint8_t* s) {
  prep_impl(a, p, w, bh, kb, s);
}

void tile_avx512(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, int64_t qt, int64_t slot,
                 uint8_t* s) {
  tile_avx<Avx512>(a, p, w, bh, qt, slot, s);
}

}  // namespace

const Kernels& kernels_avx512() {
  static const Kernels k{"avx512", Avx512::kGroup, Avx512::kChunk, 16, 2, false, stats_avx512, prep_avx512, tile_avx512};
  return k;
}

}  // namespace raad::cpu
