// AVX2 kernels (compiled with -mavx2 -mfma -mf16c only; called when raad::active_isa() >= avx2).
//
// Q·Kᵀ, int8: AVX2 has no u8×s8→s32 instruction without saturation, so the sign trick:
//   vpmaddubsw(|q|, sign(k, q)) multiplies |q| (unsigned) by k with q's sign moved onto it; with
//   codes in [-127, 127] each pair sum is at most 2·127² = 32258, so the int16 never saturates;
//   vpmaddwd(·, 1) widens to int32 (4 products per lane). K vectors hold 8 keys × 4 channels and
//   are shared by 4 query rows (q broadcast 4 bytes at a time), 2 vectors (16 keys) per chunk.
// Q·Kᵀ, int4 / int2: the packed K byte is unpacked in registers to an unsigned operand:
//   int4: (nibble ^ 8) = k + 8 in [1, 15]; int2: u = (k + 3) / 2 in [0, 3]. vpmaddubsw(u, q) then
//   never saturates and its int16 sums can be accumulated for 64 (int4) / 256 (int2) steps before
//   widening; the offsets come back out with the row sums of q:
//   int4: q·k = Σ (k+8)·q − 8 Σq;  int2: q·k = 2 Σ u·q − 3 Σq.
// P·V, 8 bits: P is unsigned 0..255 and V signed, so a u8×s8 product pair can reach 2·255·127 and
//   saturate vpmaddubsw. The kernel multiplies P − 128 (a signed byte, |·| ≤ 128) with the sign
//   trick instead (pair sums ≤ 2·128·127 = 32512) and adds back 128 · Σ_j V[j] (precomputed per
//   key block). This runs 32 MACs per 4 instructions against 8 per FMA for fp32, and P never
//   leaves 8 bits. V vectors hold 8 channels × 4 keys.
#include <immintrin.h>

#include "cpu/avx_driver.h"

namespace raad::cpu {
namespace {

inline int32_t load32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Scale the int32 scores of one 16-key chunk and store them (log2 units) into S.
// s = MUL · acc − OFF · Σq, then s · (s_k · s_q · scale · log2 e).
template <int MUL, int OFF>
inline void qk_store(const __m256i acc[4][2], const int32_t* qsum, const float* rs, const float* ks, float* S) {
  const __m256 ks0 = _mm256_loadu_ps(ks), ks1 = _mm256_loadu_ps(ks + 8);
  for (int r = 0; r < 4; ++r) {
    const __m256 rsv = _mm256_set1_ps(rs[r]);
    for (int hh = 0; hh < 2; ++hh) {
      __m256i s = acc[r][hh];
      if constexpr (MUL == 2) s = _mm256_slli_epi32(s, 1);
      if constexpr (OFF != 0) s = _mm256_sub_epi32(s, _mm256_set1_epi32(OFF * qsum[r]));
      const __m256 u = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s), hh ? ks1 : ks0), rsv);
      _mm256_storeu_ps(S + r * kKeyBlock + 8 * hh, u);
    }
  }
}

void qk_i8(const Plan& p, const int8_t* qc, const int8_t* qa, const float* rs, const int32_t* qsum,
           const uint8_t* kblk, int nch, const float* ks, float* S) {
  const int steps = p.dpad / 4;
  const int64_t dp = p.dpad;
  const int64_t gb = int64_t(8) * p.dpad;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int ch = 0; ch < nch; ++ch) {
    const uint8_t* k0 = kblk + int64_t(2 * ch) * gb;
    const uint8_t* k1 = k0 + gb;
    __m256i acc[4][2];
    for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int s = 0; s < steps; ++s) {
      const __m256i kv0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(k0 + 32 * s));
      const __m256i kv1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(k1 + 32 * s));
      for (int r = 0; r < 4; ++r) {
        const __m256i qs = _mm256_set1_epi32(load32(qc + r * dp + 4 * s));
        const __m256i qabs = _mm256_set1_epi32(load32(qa + r * dp + 4 * s));
        acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(qabs, _mm256_sign_epi8(kv0, qs)), ones));
        acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(qabs, _mm256_sign_epi8(kv1, qs)), ones));
      }
    }
    qk_store<1, 0>(acc, qsum, rs, ks + 16 * ch, S + 16 * ch);
  }
}

void qk_i4(const Plan& p, const int8_t* qc, const int8_t*, const float* rs, const int32_t* qsum,
           const uint8_t* kblk, int nch, const float* ks, float* S) {
  const int pairs = p.dpad / 8;  // bytes of a key hold two 4-channel steps
  const int64_t dp = p.dpad;
  const int64_t gb = int64_t(8) * p.dpad / 2;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  const __m256i x88 = _mm256_set1_epi8(int8_t(0x88));
  for (int ch = 0; ch < nch; ++ch) {
    const uint8_t* k0 = kblk + int64_t(2 * ch) * gb;
    const uint8_t* k1 = k0 + gb;
    __m256i tot[4][2];
    for (int r = 0; r < 4; ++r) tot[r][0] = tot[r][1] = _mm256_setzero_si256();
    for (int sb = 0; sb < pairs; sb += 64) {  // int16 sums: ≤ 64 · 2 · 2·15·7 < 32768
      const int se = pairs < sb + 64 ? pairs : sb + 64;
      __m256i acc[4][2];
      for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
      for (int s = sb; s < se; ++s) {
        const __m256i raw0 = _mm256_xor_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(k0 + 32 * s)), x88);
        const __m256i raw1 = _mm256_xor_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(k1 + 32 * s)), x88);
        const __m256i lo0 = _mm256_and_si256(raw0, m0f), lo1 = _mm256_and_si256(raw1, m0f);
        for (int r = 0; r < 4; ++r) {
          const __m256i qb = _mm256_set1_epi32(load32(qc + r * dp + 8 * s));
          acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(lo0, qb));
          acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(lo1, qb));
        }
        const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(raw0, 4), m0f);
        const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(raw1, 4), m0f);
        for (int r = 0; r < 4; ++r) {
          const __m256i qb = _mm256_set1_epi32(load32(qc + r * dp + 8 * s + 4));
          acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(hi0, qb));
          acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(hi1, qb));
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int hh = 0; hh < 2; ++hh) tot[r][hh] = _mm256_add_epi32(tot[r][hh], _mm256_madd_epi16(acc[r][hh], ones));
    }
    qk_store<1, 8>(tot, qsum, rs, ks + 16 * ch, S + 16 * ch);
  }
}

void qk_i2(const Plan& p, const int8_t* qc, const int8_t*, const float* rs, const int32_t* qsum,
           const uint8_t* kblk, int nch, const float* ks, float* S) {
  const int quads = p.dpad / 16;  // bytes of a key hold four 4-channel steps
  const int64_t dp = p.dpad;
  const int64_t gb = int64_t(8) * p.dpad / 4;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i m3 = _mm256_set1_epi8(3);
  for (int ch = 0; ch < nch; ++ch) {
    const uint8_t* k0 = kblk + int64_t(2 * ch) * gb;
    const uint8_t* k1 = k0 + gb;
    __m256i tot[4][2];
    for (int r = 0; r < 4; ++r) tot[r][0] = tot[r][1] = _mm256_setzero_si256();
    for (int sb = 0; sb < quads; sb += 256) {  // int16 sums: ≤ 256 · 4 · 2·3·3 < 32768
      const int se = quads < sb + 256 ? quads : sb + 256;
      __m256i acc[4][2];
      for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
      for (int s = sb; s < se; ++s) {
        const __m256i raw0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(k0 + 32 * s));
        const __m256i raw1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(k1 + 32 * s));
        for (int t = 0; t < 4; ++t) {
          const __m256i u0 = _mm256_and_si256(_mm256_srli_epi16(raw0, 2 * t), m3);
          const __m256i u1 = _mm256_and_si256(_mm256_srli_epi16(raw1, 2 * t), m3);
          for (int r = 0; r < 4; ++r) {
            const __m256i qb = _mm256_set1_epi32(load32(qc + r * dp + 16 * s + 4 * t));
            acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(u0, qb));
            acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(u1, qb));
          }
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int hh = 0; hh < 2; ++hh) tot[r][hh] = _mm256_add_epi32(tot[r][hh], _mm256_madd_epi16(acc[r][hh], ones));
    }
    qk_store<2, 3>(tot, qsum, rs, ks + 16 * ch, S + 16 * ch);
  }
}

// o = α·o + Σ_j P[j]·V[j, :] over `nq` quads of keys, NV vectors of 8 channels, with P − 128.
template <int NV>
inline void pv8_chunk(const uint8_t* P, int nq, const int8_t* v, int64_t qstride, const int32_t* vcs, float* o,
                      float alpha) {
  __m256i acc[NV];
  for (int c = 0; c < NV; ++c) acc[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vcs + 8 * c));
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i x80 = _mm256_set1_epi8(int8_t(0x80));
  for (int q = 0; q < nq; ++q) {
    const __m256i ps = _mm256_xor_si256(_mm256_set1_epi32(load32(P + 4 * q)), x80);  // P − 128
    const __m256i pa = _mm256_abs_epi8(ps);
    const int8_t* vr = v + q * qstride;
    for (int c = 0; c < NV; ++c) {
      const __m256i vv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vr + 32 * c));
      acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(_mm256_maddubs_epi16(pa, _mm256_sign_epi8(vv, ps)), ones));
    }
  }
  const __m256 al = _mm256_set1_ps(alpha);
  for (int c = 0; c < NV; ++c)
    _mm256_storeu_ps(o + 8 * c, _mm256_fmadd_ps(_mm256_loadu_ps(o + 8 * c), al, _mm256_cvtepi32_ps(acc[c])));
}

struct Avx2 {
  static constexpr int kGroup = 8;
  static constexpr int kChunk = 16;
  static constexpr bool kNeedAbs = true;

  static void qk(const Plan& p, const int8_t* qc, const int8_t* qa, const float* rs, const int32_t* qsum,
                 const uint8_t* kblk, int nch, const float* ks, float* S) {
    if (p.bits == 8) qk_i8(p, qc, qa, rs, qsum, kblk, nch, ks, S);
    else if (p.bits == 4) qk_i4(p, qc, qa, rs, qsum, kblk, nch, ks, S);
    else qk_i2(p, qc, qa, rs, qsum, kblk, nch, ks, S);
  }

  static void pv8(const Plan& p, const uint8_t* P, int nq, const int8_t* v, const int32_t* vcs, float* o,
                  float alpha) {
    const int64_t qs = int64_t(p.dvp) * 4;
    for (int c0 = 0; c0 < p.dvp; c0 += 64) {
      const int nv = (p.dvp - c0) / 8 < 8 ? (p.dvp - c0) / 8 : 8;
      const int8_t* vc = v + c0 * 4;
      switch (nv) {
        case 1: pv8_chunk<1>(P, nq, vc, qs, vcs + c0, o + c0, alpha); break;
        case 2: pv8_chunk<2>(P, nq, vc, qs, vcs + c0, o + c0, alpha); break;
        case 3: pv8_chunk<3>(P, nq, vc, qs, vcs + c0, o + c0, alpha); break;
        case 4: pv8_chunk<4>(P, nq, vc, qs, vcs + c0, o + c0, alpha); break;
        case 5: pv8_chunk<5>(P, nq, vc, qs, vcs + c0, o + c0, alpha); break;
        case 6: pv8_chunk<6>(P, nq, vc, qs, vcs + c0, o + c0, alpha); break;
        case 7: pv8_chunk<7>(P, nq, vc, qs, vcs + c0, o + c0, alpha); break;
        default: pv8_chunk<8>(P, nq, vc, qs, vcs + c0, o + c0, alpha); break;
      }
    }
  }
};

void stats_avx2(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, uint8_t* s) {
  stats_impl(a, p, w, bh, s);
}

void prep_avx2(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, int64_t kb, uint8_t* s) {
  prep_impl(a, p, w, bh, kb, s);
}

void tile_avx2(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, int64_t qt, int64_t slot,
               uint8_t* s) {
  tile_avx<Avx2>(a, p, w, bh, qt, slot, s);
}

}  // namespace

const Kernels& kernels_avx2() {
  static const Kernels k{"avx2", Avx2::kGroup, Avx2::kChunk, 8, 2, stats_avx2, prep_avx2, tile_avx2};
  return k;
}

}  // namespace raad::cpu
