// The fused tile kernel shared by the AVX2 and AVX-512 translation units (each compiles it with
// its own flags, in an anonymous namespace). The ISA supplies the two integer micro-kernels
// (Q·Kᵀ for a group of kRowGroup query rows, and 8-bit P·V for one row); the online softmax
// (fp32, base-2 polynomial exp), the P quantization, 16-bit P·V, the output and the maps are
// written here once with AVX2/FMA/F16C intrinsics.
//
// Per (b, h, query tile of 32 rows):
//   quantize the tile's Q rows (smoothing is K-only; rotation; per-token scale; codes);
//   for each key block of 128 keys:
//     for each group of 4 rows:  scores = codes_q · codes_kᵀ (int32) · s_q s_k · scale · log2 e
//       for each row: mask / padding → running max → α = 2^(m_old - m_new) → p = 2^(u - m)
//                     → l, entropy sum, P codes (round(255 p)) or 16-bit p → P·V into the
//                     fp32 row accumulator (rescaled by α) → probability cache (maps only);
//   finish: out = acc · (vscale/255) / l + mean (8-bit P·V) or acc / l, in the input dtype;
//           entropy = ln l − ln 2 · Σ p (u − m) / l; cls / received from the cache and the
//           saved per-block maxima (p · 2^(m_block − m) / l), never an N×N buffer.
#pragma once
#include <immintrin.h>

#include "cpu/quantize.h"

namespace raad::cpu {
namespace {


// the degree-5 polynomial's coefficients, highest first (one list for the 8- and 16-lane forms)
constexpr float kExp2Poly[6] = {0.0013216948f, 0.0096667539f, 0.0555083379f,
                                0.2402231842f, 0.6931469440f, 1.0f};

// 2^x for x <= 0 (x = -inf → 0; NaN propagates). Round-to-nearest split, degree-5 polynomial on
// [-1/2, 1/2] (relative error 2e-7); 2^n built in the exponent bits, which are 0 for n = -127.
// The split uses the 1.5·2^23 trick (adds, and n read from the low mantissa bits) rather than
// vroundps + vcvtps2dq, which share one pipe with the P rounding on Zen-class cores.
inline __m256 exp2_ps(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-127.f), x);
  const __m256 magic = _mm256_set1_ps(12582912.f);  // 1.5 · 2^23: x + magic has n in its low bits
  const __m256 t = _mm256_add_ps(x, magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 y = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The same operations on 16 lanes (the AVX-512 and AMX translation units): each lane's result is
// exp2_ps's bit for bit.
inline __m512 exp2_ps512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-127.f), x);
  const __m512 magic = _mm512_set1_ps(12582912.f);
  const __m512 t = _mm512_add_ps(x, magic);
  const __m512 n = _mm512_sub_ps(t, magic);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 y = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kExp2Poly[i]));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

inline __m256 fold512_ps(__m512 v) {  // the two 8-lane halves added: 16 partial sums → 8
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
#endif

// Round to the 16-bit P·V operand type and back (fp16 via F16C, bf16 by integer RNE; p >= 0).
template <int PV>
inline __m256 round16_ps(__m256 p) {
  if constexpr (PV == 1) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT));
  } else {
    __m256i u = _mm256_castps_si256(p);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(int(0xffff0000u))));
  }
}

// P modes: 0 = u8 codes round(255 p) (integer P·V kernels); 1 / 2 = p rounded to fp16 / bf16,
// and 3 = round(255 p) as a float, with a bit mask of the nonzero keys (the fp32-FMA P·V skips the
// keys whose quantized probability is exactly 0: exact, and on trained attention many are).
//
// One row of one key block (n32 <= 64 keys): S[0..n32) scores in log2 units (-inf for masked and
// padded keys), bm their max. Updates the running max m, sum l and entropy sum t; writes the P
// operand, the fp16 probability cache and the block's max stamp. Returns -1 (nothing to add)
// while every key of the row so far is masked, else 0.
template <bool ENT, bool CACHE, int PV>
inline int softmax_row(const float* S, int n32, float bm, float& m, float& l, float& t, uint8_t* P8, float* Pv,
                       uint64_t* nzmask, uint16_t* cache, float* stamp, float& alpha_out) {
  const float mnew = maxf_(m, bm);
  if (mnew == -inf_()) {
    if constexpr (CACHE) {
      *stamp = -inf_();
      for (int j = 0; j < n32; ++j) cache[j] = 0;
    }
    return -1;
  }
  // m − mnew ≤ 0 (−inf on the first block with a finite score: α = 0)
  const float alpha = _mm256_cvtss_f32(exp2_ps(_mm256_set1_ps(m - mnew)));
  if constexpr (ENT) {
    if (l > 0.f) t = alpha * (t + l * (m - mnew));
  }
  const __m256 vm = _mm256_set1_ps(mnew);
  const __m256 k255 = _mm256_set1_ps(255.f);
  const __m256 floor_d = _mm256_set1_ps(-150.f);
  __m256 lsum = _mm256_setzero_ps(), tsum = _mm256_setzero_ps();
  uint64_t nz = 0;
  if constexpr (PV != 0) {
    // one vector at a time: few live registers (the exp constants stay in registers)
    for (int j = 0; j < n32; j += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(S + j), vm);
      const __m256 p = exp2_ps(d);
      lsum = _mm256_add_ps(lsum, p);
      if constexpr (ENT) tsum = _mm256_fmadd_ps(p, _mm256_max_ps(d, floor_d), tsum);
      if constexpr (CACHE)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(cache + j), _mm256_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT));
      __m256 q;
      if constexpr (PV == 3)  // round(255 p), half to even (255 p < 2^22: the 1.5·2^23 trick is exact)
        q = _mm256_sub_ps(_mm256_fmadd_ps(p, k255, _mm256_set1_ps(12582912.f)), _mm256_set1_ps(12582912.f));
      else
        q = round16_ps<PV>(p);
      _mm256_storeu_ps(Pv + j, q);
      nz |= uint64_t(_mm256_movemask_ps(_mm256_cmp_ps(q, _mm256_setzero_ps(), _CMP_NEQ_OQ))) << j;
    }
  } else {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    // 16 lanes where the translation unit has AVX-512 (the AVX-512 and AMX kernels, which stay
    // bit-identical to each other): the exponentials are the same bits as the 8-lane code's,
    // the sums of l and t are added in another order (a rounding apart from AVX2's)
    const __m512 vm16 = _mm512_set1_ps(mnew), k255x = _mm512_set1_ps(255.f), floor16 = _mm512_set1_ps(-150.f);
    __m512 lsum16 = _mm512_setzero_ps(), tsum16 = _mm512_setzero_ps();
    for (int j = 0; j < n32; j += 16) {
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(S + j), vm16);
      const __m512 p = exp2_ps512(d);
      lsum16 = _mm512_add_ps(lsum16, p);
      if constexpr (ENT) tsum16 = _mm512_fmadd_ps(p, _mm512_max_ps(d, floor16), tsum16);
      if constexpr (CACHE)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(cache + j), _mm512_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT));
      // round half to even, then 0..255 to bytes (no saturation needed)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(P8 + j), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(p, k255x))));
    }
    lsum = fold512_ps(lsum16);
    if constexpr (ENT) tsum = fold512_ps(tsum16);
#else
    for (int j = 0; j < n32; j += 32) {
      __m256 p[4];
      for (int u = 0; u < 4; ++u) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(S + j + 8 * u), vm);
        p[u] = exp2_ps(d);
        lsum = _mm256_add_ps(lsum, p[u]);
        if constexpr (ENT) tsum = _mm256_fmadd_ps(p[u], _mm256_max_ps(d, floor_d), tsum);
        if constexpr (CACHE)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(cache + j + 8 * u),
                           _mm256_cvtps_ph(p[u], _MM_FROUND_TO_NEAREST_INT));
      }
      const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(p[0], k255));  // round half to even
      const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(p[1], k255));
      const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(p[2], k255));
      const __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(p[3], k255));
      const __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(P8 + j),
                          _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
#endif
  }
  l = l * alpha + hsum8_q(lsum);
  if constexpr (ENT) t += hsum8_q(tsum);
  m = mnew;
  if constexpr (CACHE) *stamp = mnew;
  alpha_out = alpha;
  *nzmask = nz;
  return 0;
}

using SoftmaxFn = int (*)(const float*, int, float, float&, float&, float&, uint8_t*, float*, uint64_t*, uint16_t*,
                          float*, float&);

template <bool ENT, bool CACHE>
SoftmaxFn softmax_for_pv(int pv) {
  switch (pv) {
    case 0: return softmax_row<ENT, CACHE, 0>;
    case 1: return softmax_row<ENT, CACHE, 1>;
    case 2: return softmax_row<ENT, CACHE, 2>;
    default: return softmax_row<ENT, CACHE, 3>;
  }
}

inline SoftmaxFn pick_softmax(bool ent, bool cache, int pv) {
  if (ent) return cache ? softmax_for_pv<true, true>(pv) : softmax_for_pv<true, false>(pv);
  return cache ? softmax_for_pv<false, true>(pv) : softmax_for_pv<false, false>(pv);
}

// fp32-FMA P·V over the nonzero keys of a block: o = α·o + Σ_{j in mask} P[j] · V[j, :], NV vectors
// of 8 channels. `v` is the key block's first row (floats, row stride `stride`).
template <int NV>
inline void pv_sparse_chunk(const float* P, uint64_t mask, const float* v, int64_t stride, float* o, float alpha) {
  __m256 acc[NV];
  for (int c = 0; c < NV; ++c) acc[c] = _mm256_setzero_ps();
  while (mask) {
    const int j = __builtin_ctzll(mask);
    mask &= mask - 1;
    const __m256 pb = _mm256_broadcast_ss(P + j);
    const float* vr = v + j * stride;
    for (int c = 0; c < NV; ++c) acc[c] = _mm256_fmadd_ps(pb, _mm256_loadu_ps(vr + 8 * c), acc[c]);
  }
  const __m256 al = _mm256_set1_ps(alpha);
  for (int c = 0; c < NV; ++c)
    _mm256_storeu_ps(o + 8 * c, _mm256_fmadd_ps(_mm256_loadu_ps(o + 8 * c), al, acc[c]));
}

inline void pv_sparse_row(const float* P, uint64_t mask, const float* v, int dvp, float* o, float alpha) {
  for (int c0 = 0; c0 < dvp; c0 += 64) {
    const int nv = (dvp - c0) / 8 < 8 ? (dvp - c0) / 8 : 8;
    switch (nv) {
      case 1: pv_sparse_chunk<1>(P, mask, v + c0, dvp, o + c0, alpha); break;
      case 2: pv_sparse_chunk<2>(P, mask, v + c0, dvp, o + c0, alpha); break;
      case 3: pv_sparse_chunk<3>(P, mask, v + c0, dvp, o + c0, alpha); break;
      case 4: pv_sparse_chunk<4>(P, mask, v + c0, dvp, o + c0, alpha); break;
      case 5: pv_sparse_chunk<5>(P, mask, v + c0, dvp, o + c0, alpha); break;
      case 6: pv_sparse_chunk<6>(P, mask, v + c0, dvp, o + c0, alpha); break;
      case 7: pv_sparse_chunk<7>(P, mask, v + c0, dvp, o + c0, alpha); break;
      default: pv_sparse_chunk<8>(P, mask, v + c0, dvp, o + c0, alpha); break;
    }
  }
}

// Score epilogue shared by the Q·Kᵀ micro-kernels: int32 → float · (s_k · rs); keys at or beyond
// `lim` (padding of the last block) get -inf; running max per row.
inline __m256 scores8(__m256i s, __m256 ks, __m256 rsv, int base, int lim, __m256& mx) {
  __m256 u = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s), ks), rsv);
  if (base + 8 > lim) {
    const __m256i lane = _mm256_add_epi32(_mm256_set1_epi32(base), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(lim), lane));
    u = _mm256_blendv_ps(_mm256_set1_ps(-inf_()), u, valid);
  }
  mx = _mm256_max_ps(mx, u);
  return u;
}

// The maps of one query tile from its fp16 probability cache (softmax_row wrote it): normalised
// p = cache · 2^(stamp − m) / l, summed into the tile's `received` partials, and the CLS row.
inline void tile_maps(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, int64_t qt, int64_t slot,
                      int nr, const float* M, const float* L, const float* stamp, const uint16_t* cache) {
  float* rec = p.want_recv ? received_row(p, w, slot, bh) : nullptr;
  float* cls = (p.want_cls && qt == 0) ? a.cls + bh * p.Nk : nullptr;
  float f[kQueryTile];
  for (int64_t kb = 0; kb < p.nkb; ++kb) {
    const int64_t j0 = kb * kKeyBlock;
    const int nv = int(min64_(kKeyBlock, p.Nk - j0));
    for (int r = 0; r < nr; ++r) {
      const float st = stamp[int64_t(r) * p.nkb + kb];
      f[r] = (L[r] > 0.f && st != -inf_()) ? _mm256_cvtss_f32(exp2_ps(_mm256_set1_ps(st - M[r]))) / L[r] : 0.f;
    }
    const uint16_t* c0 = cache + j0;
    if (rec) {
      float* dst = rec + j0;
      int jj = 0;
      for (; jj + 8 <= nv; jj += 8) {
        __m256 acc = _mm256_loadu_ps(dst + jj);
        for (int r = 0; r < nr; ++r) {
          const __m256 pv = _mm256_cvtph_ps(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(c0 + int64_t(r) * p.cache_row + jj)));
          acc = _mm256_fmadd_ps(_mm256_set1_ps(f[r]), pv, acc);
        }
        _mm256_storeu_ps(dst + jj, acc);
      }
      for (; jj < nv; ++jj) {
        float acc = dst[jj];
        for (int r = 0; r < nr; ++r) acc += f[r] * f16_to_f32(c0[int64_t(r) * p.cache_row + jj]);
        dst[jj] = acc;
      }
    }
    if (cls)
      for (int jj = 0; jj < nv; ++jj) cls[j0 + jj] = f[0] * f16_to_f32(c0[jj]);
  }
}

// The fused kernel of one (b, h, query tile). ISA provides:
//   kGroup, kChunk (keys per Q·Kᵀ chunk), kNeedAbs (wants |q| codes), kPvFloat (P·V at 8 bits on
//   float-stored codes with fp32 FMA, else the integer kernel pv8),
//   qk(plan, qg, qag, rs, qsum, kblock, nv, kscale, S, bmax): S[r·kKeyBlock + j] for the 4 rows of
//     a group, whose codes qg (and |codes| qag) are interleaved: step s of row r at 16 s + 4 r;
//     keys nv.. of the last chunk get -inf; bmax[r] = the row's max;
//   pv8(plan, P8, nquads, vblock, o, alpha): o = α·o + Σ P·V (integer, unsigned P codes).
template <class ISA>
void tile_avx(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, int64_t qt, int64_t slot,
              uint8_t* scr) {
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t i0 = qt * kQueryTile;
  const int nr = int(min64_(kQueryTile, p.Nq - i0));
  const int ng = (nr + kRowGroup - 1) / kRowGroup;
  [[maybe_unused]] const auto [qc, qa, rs, qsum, row, S, P8, Pv, bias, outf, M, L, T, stamp, cache8, kun, tmp] =
      tile_scratch(p, scr);
  uint16_t* cache = reinterpret_cast<uint16_t*>(cache8);
  prepare_q_tile(a, p, b, h, i0, nr, ng * kRowGroup, row, tmp, true, qc, ISA::kNeedAbs && p.bits == 8 ? qa : nullptr,
                 rs, qsum);
  start_rows(p, nr, M, L, T, outf);

  const bool int_pv = p.pv_bits == 8 && !ISA::kPvFloat;
  const int pvmode = p.pv_bits == 8 ? (int_pv ? 0 : 3) : (a.q.dtype == DType::BF16 ? 2 : 1);
  const SoftmaxFn softmax = pick_softmax(p.want_ent, p.want_cache, pvmode);
  const uint8_t* kbh = w.kq + bh * p.kq_stride;
  const float* ks = w.ks + bh * p.nkp;
  const int64_t gbytes = k_group_bytes(p);
  float bmax[kRowGroup];
  for (int64_t kb = 0; kb < p.nkb; ++kb) {
    const int64_t j0 = kb * kKeyBlock;
    const int nv = int(min64_(kKeyBlock, p.Nk - j0));
    const int nk = (nv + ISA::kChunk - 1) / ISA::kChunk * ISA::kChunk;  // scores written by qk
    const int n32 = (nk + 31) / 32 * 32;
    [[maybe_unused]] const int nquads = (nv + 3) / 4;
    const uint8_t* kblk = kbh + (j0 / ISA::kGroup) * gbytes;
    const float* vblk = int_pv ? nullptr : w.vh + bh * p.v_stride + j0 * p.dvp;  // float V rows
    for (int g = 0; g < ng; ++g) {
      const int r0 = g * kRowGroup;
      ISA::qk(p, qc + int64_t(r0) * p.qrow, qa + int64_t(r0) * p.dpad, rs + r0, qsum + r0, kblk, nv, ks + j0, S,
              bmax);
      for (int rr = 0; rr < kRowGroup && r0 + rr < nr; ++rr) {
        const int r = r0 + rr;
        float* Sr = S + rr * kKeyBlock;
        for (int jj = nk; jj < n32; ++jj) Sr[jj] = -inf_();
        float bm = bmax[rr];
        if (a.mask.data) bm = add_mask_row(a.mask, b, h, i0 + r, j0, nv, bias, Sr);
        float alpha;
        uint64_t nzmask = 0;
        if (softmax(Sr, n32, bm, M[r], L[r], T[r], P8, Pv, &nzmask, cache + int64_t(r) * p.cache_row + j0,
                    stamp + int64_t(r) * p.nkb + kb, alpha) < 0)
          continue;
        float* o = outf + int64_t(r) * p.dvp;
        if constexpr (!ISA::kPvFloat) {
          if (int_pv) {
            ISA::pv8(p, P8, nquads, w.vq + bh * p.v_stride + (j0 >> 2) * p.dvp * 4, o, alpha);
            continue;
          }
        }
        if (nv < 64) nzmask &= (uint64_t(1) << nv) - 1;  // padded keys (p = 0 unless inputs are NaN)
        pv_sparse_row(Pv, nzmask, vblk, p.dvp, o, alpha);
      }
    }
  }

  for (int r = 0; r < nr; ++r) {
    finish_row(a, p, w, bh, i0 + r, outf + int64_t(r) * p.dvp, L[r], row);
    if (p.want_ent) a.entropy[bh * p.Nq + i0 + r] = entropy_of(L[r], T[r]);
  }
  if (p.want_cache) tile_maps(a, p, w, bh, qt, slot, nr, M, L, stamp, cache);
}

}  // namespace
}  // namespace raad::cpu
