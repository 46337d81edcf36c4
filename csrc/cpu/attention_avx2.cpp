// AVX2 kernels (compiled with -mavx2 -mfma -mf16c only; called when raad::active_isa() >= avx2).
//
// Q·Kᵀ, int8: AVX2 has no u8×s8→s32 instruction without saturation, so the sign trick:
//   vpmaddubsw(|q|, sign(k, q)) multiplies |q| (unsigned) by k with q's sign moved onto it; with
//   codes in [-127, 127] each pair sum is at most 2·127² = 32258, so the int16 never saturates;
//   vpmaddwd(·, 1) widens to int32 (4 products per lane). K vectors hold 8 keys × 4 channels and
//   are shared by the query rows (q broadcast 4 bytes at a time), 2 vectors (16 keys) per chunk.
// Q·Kᵀ, int4 / int2: the packed K byte is unpacked in registers to an unsigned operand:
//   int4: (nibble ^ 8) = k + 8 in [1, 15]; int2: u = (k + 3) / 2 in [0, 3]. vpmaddubsw(u, q) then
//   never saturates and its int16 sums can be accumulated for 64 (int4) / 256 (int2) steps before
//   widening (no vpmaddwd per step: these run at twice the int8 rate); the offsets come back out
//   with the row sums of q:  int4: q·k = Σ (k+8)·q − 8 Σq;  int2: q·k = 2 Σ u·q − 3 Σq.
// P·V, 8 bits: fp32 FMA on exact values (avx_driver.h): P = round(255 p) and the V codes are
//   small integers, so every product and every per-block sum is exact in fp32 and the result is
//   bit for bit the integer one. Chosen over the integer form (P − 128 as a signed byte with the
//   sign trick, plus 128 Σ V added back) because (1) on this class of CPU (Zen: one vector integer
//   multiply pipe) vpmaddubsw + vpmaddwd give 17 GMAC/s per core against 19.6 for vfmadd231ps
//   (benchmarks/CPU_NOTES.md), and (2) in fp32 a key with P = 0 contributes exactly nothing, so
//   the kernel skips those keys (a 64-bit mask per row and key block): on trained-ViT-like
//   attention 55-75 % of the 8-bit probabilities are 0. The integer P·V with vpdpbusd is the
//   AVX-512 path's.
#include <immintrin.h>

#include "cpu/avx_driver.h"

namespace raad::cpu {
namespace {

inline int32_t load32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Scale the int32 scores of one 16-key chunk of 4 rows and store them (log2 units) into S:
// s = MUL · acc − OFF · Σq, then s · (s_k · s_q · scale · log2 e); keys ≥ lim get -inf.
// One row of a 16-key chunk: the accumulators come by value (an array of them passed by reference
// made GCC keep the accumulators in their stack slots inside the hot loop); the running row max
// lives in memory (mx: 8 floats per row).
template <int MUL, int OFF>
inline void qk_store_row(__m256i a0, __m256i a1, int32_t qsum, float rs, const float* ks, float* S, int base,
                         int lim, float* mx) {
  const __m256 rsv = _mm256_set1_ps(rs);
  __m256 m = _mm256_load_ps(mx);
  if constexpr (MUL == 2) {
    a0 = _mm256_slli_epi32(a0, 1);
    a1 = _mm256_slli_epi32(a1, 1);
  }
  if constexpr (OFF != 0) {
    a0 = _mm256_sub_epi32(a0, _mm256_set1_epi32(OFF * qsum));
    a1 = _mm256_sub_epi32(a1, _mm256_set1_epi32(OFF * qsum));
  }
  _mm256_storeu_ps(S, scores8(a0, _mm256_loadu_ps(ks), rsv, base, lim, m));
  _mm256_storeu_ps(S + 8, scores8(a1, _mm256_loadu_ps(ks + 8), rsv, base + 8, lim, m));
  _mm256_store_ps(mx, m);
}

template <int MUL, int OFF>
inline void qk_store(const __m256i (&acc)[4][2], const int32_t* qsum, const float* rs, const float* ks, float* S,
                     int base, int lim, float* mx) {
  for (int r = 0; r < 4; ++r)
    qk_store_row<MUL, OFF>(acc[r][0], acc[r][1], qsum[r], rs[r], ks, S + r * kKeyBlock, base, lim, mx + 8 * r);
}

inline void qk_start(float* mx) {
  for (int i = 0; i < 32; ++i) mx[i] = -inf_();
}

inline void qk_finish(const float* mx, float* bmax) {
  for (int r = 0; r < 4; ++r) bmax[r] = hmax8_q(_mm256_load_ps(mx + 8 * r));
}

// The micro-kernels are kept out of line so the register allocator sees them alone, and their
// accumulators are named variables (an array of vectors tends to be kept in memory).
// Two rows × 16 keys of int8 Q·Kᵀ: 4 accumulators + 2 K vectors + 2 broadcasts stay in registers
// (4 rows at once, GCC spilled accumulators to the stack on every step). Out of line so that the
// compiler does not fuse the two calls of a chunk back into one loop.
__attribute__((noinline)) void qk_i8_rows2(const uint8_t* k0, const uint8_t* k1, const int8_t* q, const int8_t* qa,
                                           int steps, const int32_t* qsum, const float* rs, const float* ks,
                                           float* S0, float* S1, int base, int lim, float* mx) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00;
  for (int s = 0; s < steps; ++s, k0 += 32, k1 += 32, q += 16, qa += 16) {
    const __m256i kv0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(k0));
    const __m256i kv1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(k1));
    const __m256i qs0 = _mm256_set1_epi32(load32(q));
    const __m256i qb0 = _mm256_set1_epi32(load32(qa));
    a00 = _mm256_add_epi32(a00, _mm256_madd_epi16(_mm256_maddubs_epi16(qb0, _mm256_sign_epi8(kv0, qs0)), ones));
    a01 = _mm256_add_epi32(a01, _mm256_madd_epi16(_mm256_maddubs_epi16(qb0, _mm256_sign_epi8(kv1, qs0)), ones));
    const __m256i qs1 = _mm256_set1_epi32(load32(q + 4));
    const __m256i qb1 = _mm256_set1_epi32(load32(qa + 4));
    a10 = _mm256_add_epi32(a10, _mm256_madd_epi16(_mm256_maddubs_epi16(qb1, _mm256_sign_epi8(kv0, qs1)), ones));
    a11 = _mm256_add_epi32(a11, _mm256_madd_epi16(_mm256_maddubs_epi16(qb1, _mm256_sign_epi8(kv1, qs1)), ones));
  }
  qk_store_row<1, 0>(a00, a01, qsum[0], rs[0], ks, S0, base, lim, mx);
  qk_store_row<1, 0>(a10, a11, qsum[1], rs[1], ks, S1, base, lim, mx + 8);
}

__attribute__((noinline)) void qk_i8(const Plan& p, const int8_t* qg, const int8_t* qag, const float* rs,
                                     const int32_t* qsum, const uint8_t* kblk, int nv, const float* ks, float* S,
                                     float* bmax) {
  const int steps = p.dpad / 4;
  const int64_t gb = int64_t(8) * p.dpad;
  alignas(32) float mx[32];
  qk_start(mx);
  for (int c0 = 0; c0 < nv; c0 += 16) {
    const uint8_t* k0 = kblk + int64_t(c0 / 8) * gb;
    for (int r = 0; r < 4; r += 2)
      qk_i8_rows2(k0, k0 + gb, qg + 4 * r, qag + 4 * r, steps, qsum + r, rs + r, ks + c0, S + r * kKeyBlock + c0,
                  S + (r + 1) * kKeyBlock + c0, c0, nv, mx + 8 * r);
  }
  qk_finish(mx, bmax);
}

// Shared by the low-bit kernels (qk_i4, qk_i2): one query row r's step, its 4 int8 codes at
// q + off broadcast against the unsigned key operands u0, u1 (two 8-key halves), int16 sums.
#define RAAD_ROW(r, x0, x1, off)                                          \
  {                                                                       \
    const __m256i qb = _mm256_set1_epi32(load32(q + (off) + 4 * r));      \
    x0 = _mm256_add_epi16(x0, _mm256_maddubs_epi16(u0, qb));              \
    x1 = _mm256_add_epi16(x1, _mm256_maddubs_epi16(u1, qb));              \
  }

// The low-bit kernels' int16 block sums, widened to int32 and added to the tile's totals.
inline void widen_add(__m256i (&tot)[4][2], const __m256i (&acc)[4][2], __m256i ones) {
  for (int r = 0; r < 4; ++r)
    for (int hh = 0; hh < 2; ++hh) tot[r][hh] = _mm256_add_epi32(tot[r][hh], _mm256_madd_epi16(acc[r][hh], ones));
}

// int4: bytes hold steps 2s (low nibble) and 2s+1 (high); (nibble ^ 8) = k + 8 is the unsigned
// operand; int16 sums stay below 2^15 for 64 step pairs (64 · 2 · 2·15·7), then widen.
__attribute__((noinline)) void qk_i4(const Plan& p, const int8_t* qg, const int8_t*, const float* rs,
                                     const int32_t* qsum, const uint8_t* kblk, int nv, const float* ks, float* S,
                                     float* bmax) {
  const int pairs = p.dpad / 8;
  const int64_t gb = int64_t(8) * p.dpad / 2;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  const __m256i x88 = _mm256_set1_epi8(int8_t(0x88));
  alignas(32) float mx[32];
  qk_start(mx);
  for (int c0 = 0; c0 < nv; c0 += 16) {
    const uint8_t* kc0 = kblk + int64_t(c0 / 8) * gb;
    const uint8_t* kc1 = kc0 + gb;
    __m256i tot[4][2];
    for (int r = 0; r < 4; ++r) tot[r][0] = tot[r][1] = _mm256_setzero_si256();
    for (int sb = 0; sb < pairs; sb += 64) {
      const int se = pairs < sb + 64 ? pairs : sb + 64;
      __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
              a31 = a00;
      const uint8_t* k0 = kc0 + 32 * sb;
      const uint8_t* k1 = kc1 + 32 * sb;
      const int8_t* q = qg + 32 * sb;
      for (int s = sb; s < se; ++s, k0 += 32, k1 += 32, q += 32) {
        const __m256i raw0 = _mm256_xor_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(k0)), x88);
        const __m256i raw1 = _mm256_xor_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(k1)), x88);
        __m256i u0 = _mm256_and_si256(raw0, m0f), u1 = _mm256_and_si256(raw1, m0f);
        RAAD_ROW(0, a00, a01, 0)
        RAAD_ROW(1, a10, a11, 0)
        RAAD_ROW(2, a20, a21, 0)
        RAAD_ROW(3, a30, a31, 0)
        u0 = _mm256_and_si256(_mm256_srli_epi16(raw0, 4), m0f);
        u1 = _mm256_and_si256(_mm256_srli_epi16(raw1, 4), m0f);
        RAAD_ROW(0, a00, a01, 16)
        RAAD_ROW(1, a10, a11, 16)
        RAAD_ROW(2, a20, a21, 16)
        RAAD_ROW(3, a30, a31, 16)
      }
      const __m256i acc[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
      widen_add(tot, acc, ones);
    }
    qk_store<1, 8>(tot, qsum, rs, ks + c0, S + c0, c0, nv, mx);
  }
  qk_finish(mx, bmax);
}

// int2: bytes hold steps 4s+t at bits 2t; u = (k + 3)/2 in 0..3 is the unsigned operand,
// q·k = 2 Σ u·q − 3 Σq; int16 sums stay below 2^15 for 256 step quads (256 · 4 · 2·3·3).
__attribute__((noinline)) void qk_i2(const Plan& p, const int8_t* qg, const int8_t*, const float* rs,
                                     const int32_t* qsum, const uint8_t* kblk, int nv, const float* ks, float* S,
                                     float* bmax) {
  const int quads = p.dpad / 16;
  const int64_t gb = int64_t(8) * p.dpad / 4;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i m3 = _mm256_set1_epi8(3);
  alignas(32) float mx[32];
  qk_start(mx);
  for (int c0 = 0; c0 < nv; c0 += 16) {
    const uint8_t* kc0 = kblk + int64_t(c0 / 8) * gb;
    const uint8_t* kc1 = kc0 + gb;
    __m256i tot[4][2];
    for (int r = 0; r < 4; ++r) tot[r][0] = tot[r][1] = _mm256_setzero_si256();
    for (int sb = 0; sb < quads; sb += 256) {
      const int se = quads < sb + 256 ? quads : sb + 256;
      __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
              a31 = a00;
      const uint8_t* k0 = kc0 + 32 * sb;
      const uint8_t* k1 = kc1 + 32 * sb;
      const int8_t* q = qg + 64 * sb;
      for (int s = sb; s < se; ++s, k0 += 32, k1 += 32, q += 64) {
        const __m256i raw0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(k0));
        const __m256i raw1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(k1));
#define RAAD_STEP(t)                                                                  \
  {                                                                                   \
    const __m256i u0 = _mm256_and_si256(_mm256_srli_epi16(raw0, 2 * t), m3);          \
    const __m256i u1 = _mm256_and_si256(_mm256_srli_epi16(raw1, 2 * t), m3);          \
    RAAD_ROW(0, a00, a01, 16 * t)                                                     \
    RAAD_ROW(1, a10, a11, 16 * t)                                                     \
    RAAD_ROW(2, a20, a21, 16 * t)                                                     \
    RAAD_ROW(3, a30, a31, 16 * t)                                                     \
  }
        RAAD_STEP(0)
        RAAD_STEP(1)
        RAAD_STEP(2)
        RAAD_STEP(3)
#undef RAAD_STEP
      }
      const __m256i acc[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
      widen_add(tot, acc, ones);
    }
    qk_store<2, 3>(tot, qsum, rs, ks + c0, S + c0, c0, nv, mx);
  }
  qk_finish(mx, bmax);
}

#undef RAAD_ROW

// int2 on bit planes (attention_internal.h, Plan::kplanes): per query-key pair and 64 channels,
// 4 XOR + 4 scalar popcnt (one word holding both planes when dpad <= 32: 2 XOR + 3 popcnt),
// z = 4 p_aa + 2 (p_ab + p_ba) + p_bb and q·k = 9·dp − 2z, the same int32 as qk_i2. On AMD Zen
// popcnt issues on all 4 integer ALUs, so this runs on the scalar pipes at about twice the rate
// of the vpmaddubsw form (whose 256-bit multiplies take one vector pipe there, 2 cycles each).
template <int NW>  // 64-bit words per plane; 0: both planes in one word; -1: p.plane_words
__attribute__((target("popcnt"))) inline void qk_i2p_row(const uint64_t* q, const uint64_t* k, int nk, int nw,
                                                         int32_t* Z) {
  if constexpr (NW == 0) {
    const uint64_t w = q[0], ws = q[1];  // (a | b), (b | a)
    for (int j = 0; j < nk; ++j) {
      const uint64_t x = w ^ k[j], y = ws ^ k[j];
      const int pc = int(_mm_popcnt_u64(x)), plo = int(_mm_popcnt_u32(uint32_t(x))), py = int(_mm_popcnt_u64(y));
      Z[j] = pc + 3 * plo + 2 * py;
    }
  } else if constexpr (NW == 1) {
    const uint64_t a = q[0], b = q[1];
    for (int j = 0; j < nk; j += 2, k += 4) {  // nk is even
      const uint64_t ka = k[0], kb = k[1], kc = k[2], kd = k[3];
      const int p1 = int(_mm_popcnt_u64(a ^ ka)), p2 = int(_mm_popcnt_u64(a ^ kb));
      const int p3 = int(_mm_popcnt_u64(b ^ ka)), p4 = int(_mm_popcnt_u64(b ^ kb));
      const int r1 = int(_mm_popcnt_u64(a ^ kc)), r2 = int(_mm_popcnt_u64(a ^ kd));
      const int r3 = int(_mm_popcnt_u64(b ^ kc)), r4 = int(_mm_popcnt_u64(b ^ kd));
      Z[j] = 4 * p1 + 2 * (p2 + p3) + p4;
      Z[j + 1] = 4 * r1 + 2 * (r2 + r3) + r4;
    }
  } else {
    const int n = NW > 0 ? NW : nw;
    for (int j = 0; j < nk; ++j, k += 2 * n) {
      int z = 0;
      for (int i = 0; i < n; ++i) {
        const uint64_t a = q[i], b = q[n + i], ka = k[i], kb = k[n + i];
        const int p1 = int(_mm_popcnt_u64(a ^ ka)), p2 = int(_mm_popcnt_u64(a ^ kb));
        const int p3 = int(_mm_popcnt_u64(b ^ ka)), p4 = int(_mm_popcnt_u64(b ^ kb));
        z += 4 * p1 + 2 * (p2 + p3) + p4;
      }
      Z[j] = z;
    }
  }
}

template <int NW>
__attribute__((noinline)) void qk_i2p(const Plan& p, const int8_t* qg, const float* rs, const uint8_t* kblk, int nv,
                                      const float* ks, float* S, float* bmax) {
  alignas(32) int32_t Z[kRowGroup][kKeyBlock];
  const int nk = (nv + 15) / 16 * 16;
  const int qw = p.qrow / 8;  // words per Q row
  const uint64_t* k = reinterpret_cast<const uint64_t*>(kblk);
  for (int r = 0; r < kRowGroup; ++r)
    qk_i2p_row<NW>(reinterpret_cast<const uint64_t*>(qg) + r * qw, k, nk, p.plane_words, Z[r]);
  const __m256i nine = _mm256_set1_epi32(9 * p.dp);
  alignas(32) float mx[32];
  qk_start(mx);
  for (int c0 = 0; c0 < nv; c0 += 16)
    for (int r = 0; r < kRowGroup; ++r)
      qk_store_row<1, 0>(
          _mm256_sub_epi32(nine, _mm256_slli_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(Z[r] + c0)), 1)),
          _mm256_sub_epi32(nine,
                           _mm256_slli_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(Z[r] + c0 + 8)), 1)),
                         0, rs[r], ks + c0, S + r * kKeyBlock + c0, c0, nv, mx + 8 * r);
  qk_finish(mx, bmax);
}

struct Avx2 {
  static constexpr int kGroup = 8;
  static constexpr int kChunk = 16;
  static constexpr bool kNeedAbs = true;
  static constexpr bool kPvFloat = true;

  static void qk(const Plan& p, const int8_t* qc, const int8_t* qa, const float* rs, const int32_t* qsum,
                 const uint8_t* kblk, int nv, const float* ks, float* S, float* bmax) {
    if (p.bits == 8) qk_i8(p, qc, qa, rs, qsum, kblk, nv, ks, S, bmax);
    else if (p.bits == 4) qk_i4(p, qc, qa, rs, qsum, kblk, nv, ks, S, bmax);
    else if (!p.kplanes) qk_i2(p, qc, qa, rs, qsum, kblk, nv, ks, S, bmax);
    else if (p.plane_words == 0) qk_i2p<0>(p, qc, rs, kblk, nv, ks, S, bmax);
    else if (p.plane_words == 1) qk_i2p<1>(p, qc, rs, kblk, nv, ks, S, bmax);
    else if (p.plane_words == 2) qk_i2p<2>(p, qc, rs, kblk, nv, ks, S, bmax);
    else qk_i2p<-1>(p, qc, rs, kblk, nv, ks, S, bmax);
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
  static const Kernels k{"avx2", Avx2::kGroup, Avx2::kChunk, 8, 2, true, stats_avx2, prep_avx2, tile_avx2, true};
  return k;
}

}  // namespace raad::cpu
