// AMX kernels (compiled with the AMX-INT8 and AVX-512 flags only; the dispatcher calls them only
// when raad::active_isa() reports AMX (the CPU has it and the OS granted the tile state) and,
// once per process, after a self-check against the portable kernels passed — see
// raad::cpu::kernel_isa).
//
// Where the AVX-512 kernel takes 4 query rows at a time through vpdpbusd, this one runs a whole
// 32-row query tile through the tile unit per key block of 64 keys:
//   S (32 × 64, int32) = Q codes (32 × dpad, row-major) · K codes: tdpbssd, signed × signed, so
//     int8 needs no +128 offset; int4 / int2 K are unpacked to signed bytes (k, 2u − 3) into L1
//     first. The integers equal the AVX-512 kernel's corrected sums, and the float epilogue is
//     the same operations, so the scores are the same bits.
//   softmax per row (the shared AVX2 code), P codes for all 32 rows (2 KiB);
//   O (32 × Dv) += P (u8) · V (s8): tdpbusd on the [nkp/4][dvp][4] V layout, one 16-channel
//     slice per tile; o = α·o + acc per row, as the AVX-512 kernel does it.
// 16-bit P·V stays on the AVX path per row (this CPU has AMX-BF16 but no AMX-FP16, and the fp16
// probabilities would need a second rounding).
//
// Tiles: all 8 are 16 rows × 64 bytes; 4 accumulators (2 row tiles × 2 key or channel tiles),
// 2 A tiles, 2 B tiles.
#include <immintrin.h>

#include "cpu/amx_tiles.h"
#include "cpu/avx_driver.h"

// GCC 12 warns about the deliberately undefined upper lanes inside _mm512_reduce_max_ps.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace raad::cpu {
namespace {

constexpr int kTileRows = 16;

// K codes of one key block (4 groups of 16 keys) as signed bytes in the int8 group layout.
// int8 is read in place; int4 / int2 are unpacked into `kun` (64 × dpad bytes).
const int8_t* k_operand(const Plan& p, const uint8_t* kblk, int ngroups, int8_t* kun) {
  if (p.bits == 8) return reinterpret_cast<const int8_t*>(kblk);
  const int64_t gb = k_group_bytes(p), ub = int64_t(16) * p.dpad;
  const __m512i m0f = _mm512_set1_epi8(0x0F), x08 = _mm512_set1_epi8(0x08), m3 = _mm512_set1_epi8(3);
  for (int g = 0; g < ngroups; ++g) {
    const uint8_t* src = kblk + g * gb;
    int8_t* dst = kun + g * ub;
    if (p.bits == 4) {  // two's-complement nibbles: steps 2s (low) and 2s + 1 (high)
      for (int s = 0; s < p.dpad / 8; ++s) {
        const __m512i raw = _mm512_load_si512(src + 64 * s);
        const __m512i lo = _mm512_and_si512(raw, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m0f);
        _mm512_store_si512(dst + 64 * (2 * s), _mm512_sub_epi8(_mm512_xor_si512(lo, x08), x08));
        _mm512_store_si512(dst + 64 * (2 * s + 1), _mm512_sub_epi8(_mm512_xor_si512(hi, x08), x08));
      }
    } else {  // (c + 3) / 2 in 2 bits: step 4s + t at bits 2t; c = 2u − 3
      for (int s = 0; s < p.dpad / 16; ++s) {
        const __m512i raw = _mm512_load_si512(src + 64 * s);
        for (int t = 0; t < 4; ++t) {
          const __m512i u = _mm512_and_si512(_mm512_srli_epi16(raw, 2 * t), m3);
          _mm512_store_si512(dst + 64 * (4 * s + t), _mm512_sub_epi8(_mm512_add_epi8(u, u), m3));
        }
      }
    }
  }
  return kun;
}

// Scores of the 32 rows × nk keys of a block: int32 tiles (acc[4·half + 2·rt + ct]: rows
// 16 rt.., keys 32 half + 16 ct..) → s · s_k · rs in log2 units, keys ≥ lim → -inf, into S (row
// stride kKeyBlock); each row's max with one horizontal reduction per row.
inline void scores_epilogue(const int32_t (*acc)[256], const float* rs, const float* ks, float* S, int nk, int lim,
                            float* bmax) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int nvec = nk / 16;
  __m512 ksv[4];
  __mmask16 valid[4];
  for (int c = 0; c < nvec; ++c) {
    ksv[c] = _mm512_loadu_ps(ks + 16 * c);
    valid[c] = _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(lim), _mm512_add_epi32(_mm512_set1_epi32(16 * c), lane));
  }
  for (int row = 0; row < kQueryTile; ++row) {
    const int rt = row >> 4, r = row & 15;
    const __m512 rsv = _mm512_set1_ps(rs[row]);
    __m512 mx = _mm512_set1_ps(-inf_());
    for (int c = 0; c < nvec; ++c) {
      const int32_t* a = acc[4 * (c >> 1) + 2 * rt + (c & 1)] + 16 * r;
      __m512 u = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(a)), ksv[c]), rsv);
      u = _mm512_mask_blend_ps(valid[c], _mm512_set1_ps(-inf_()), u);
      mx = _mm512_max_ps(mx, u);
      _mm512_storeu_ps(S + row * kKeyBlock + 16 * c, u);
    }
    bmax[row] = _mm512_reduce_max_ps(mx);
  }
}

// S = Q · Kᵀ for the 32 rows of the tile and the nk (32 or 64) keys of one block.
void qk_tile(const Plan& p, const int8_t* qc, const int8_t* kop, const float* rs, const float* ks, int nv, int nk,
             float* S, float* bmax, int32_t (*cbuf)[256]) {
  const int64_t ub = int64_t(16) * p.dpad;  // bytes per group of 16 keys
  const int nchunks = p.dpad / 64;
  for (int half = 0; half * 32 < nk; ++half) {
    const int8_t* b0 = kop + (2 * half) * ub;
    const int8_t* b1 = b0 + ub;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int kc = 0; kc < nchunks; ++kc) {
      _tile_loadd(4, qc + kc * 64, p.dpad);
      _tile_loadd(5, qc + 16 * p.dpad + kc * 64, p.dpad);
      _tile_loadd(6, b0 + kc * 1024, 64);  // 16 steps of 4 channels × 16 keys
      _tile_loadd(7, b1 + kc * 1024, 64);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
    int32_t (*c)[256] = cbuf + 4 * half;
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
  }
  scores_epilogue(cbuf, rs, ks, S, nk, nv, bmax);
}

// O[r] = α[r] · O[r] + Σ_keys P[r, key] · V[key, :] for the 32 rows; P rows of 64 u8 codes, V the
// block's [16 quads][dvp][4] codes.
void pv_tile(const Plan& p, const uint8_t* P8, const int8_t* vblk, const float* alpha, int nr, float* outf,
             int32_t (*cbuf)[256]) {
  const int nslices = p.dvp / 16;
  const int64_t vstride = int64_t(p.dvp) * 4;
  _tile_loadd(4, P8, kKeyBlock);
  _tile_loadd(5, P8 + 16 * kKeyBlock, kKeyBlock);
  for (int c0 = 0; c0 < nslices; c0 += 2) {
    const bool two = c0 + 1 < nslices;
    _tile_zero(0);
    _tile_zero(2);
    _tile_loadd(6, vblk + c0 * 64, vstride);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(2, 5, 6);
    _tile_stored(0, cbuf[0], 64);
    _tile_stored(2, cbuf[2], 64);
    if (two) {
      _tile_zero(1);
      _tile_zero(3);
      _tile_loadd(7, vblk + (c0 + 1) * 64, vstride);
      _tile_dpbusd(1, 4, 7);
      _tile_dpbusd(3, 5, 7);
      _tile_stored(1, cbuf[1], 64);
      _tile_stored(3, cbuf[3], 64);
    }
    for (int r = 0; r < nr; ++r) {
      const int rt = r >> 4, rr = r & 15;
      const __m512 al = _mm512_set1_ps(alpha[r]);
      float* o = outf + int64_t(r) * p.dvp + 16 * c0;
      for (int ct = 0; ct < (two ? 2 : 1); ++ct) {
        const __m512 acc = _mm512_cvtepi32_ps(_mm512_load_si512(cbuf[2 * rt + ct] + 16 * rr));
        _mm512_storeu_ps(o + 16 * ct, _mm512_fmadd_ps(_mm512_loadu_ps(o + 16 * ct), al, acc));
      }
    }
  }
}

void tile_amx(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, int64_t qt, int64_t slot,
              uint8_t* scr) {
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t i0 = qt * kQueryTile;
  const int nr = int(min64_(kQueryTile, p.Nq - i0));
  [[maybe_unused]] const auto [qc, qa, rs, qsum, row, S, P8, Pv, bias, outf, M, L, T, stamp, cache8, kun, tmp] =
      tile_scratch(p, scr);
  uint16_t* cache = reinterpret_cast<uint16_t*>(cache8);
  // Q codes row-major, all 32 rows (rows ≥ nr zero: their scores are computed and ignored)
  prepare_q_tile(a, p, b, h, i0, nr, kQueryTile, row, tmp, false, qc, nullptr, rs, qsum);
  start_rows(p, nr, M, L, T, outf);
  const bool int_pv = p.pv_bits == 8;
  if (int_pv) std::memset(P8, 0, size_t(kQueryTile) * kKeyBlock);  // rows ≥ nr stay zero
  const int pvmode = int_pv ? 0 : (a.q.dtype == DType::BF16 ? 2 : 1);
  const SoftmaxFn softmax = pick_softmax(p.want_ent, p.want_cache, pvmode);
  const uint8_t* kbh = w.kq + bh * p.kq_stride;
  const float* ks = w.ks + bh * p.nkp;
  const int64_t gbytes = k_group_bytes(p);
  alignas(64) int32_t cbuf[8][256];
  float bmax[kQueryTile], alpha[kQueryTile];

  configure_tiles();
  for (int64_t kb = 0; kb < p.nkb; ++kb) {
    const int64_t j0 = kb * kKeyBlock;
    const int nv = int(min64_(kKeyBlock, p.Nk - j0));
    const int nk = nv <= 32 ? 32 : 64;  // keys scored (padding gets -inf)
    const uint8_t* kblk = kbh + (j0 / 16) * gbytes;
    const int8_t* kop = k_operand(p, kblk, nk / 16, kun);
    qk_tile(p, qc, kop, rs, ks + j0, nv, nk, S, bmax, cbuf);
    const float* vblk = int_pv ? nullptr : w.vh + bh * p.v_stride + j0 * p.dvp;
    for (int r = 0; r < nr; ++r) {
      float* Sr = S + r * kKeyBlock;
      float bm = bmax[r];
      if (a.mask.data) bm = add_mask_row(a.mask, b, h, i0 + r, j0, nv, bias, Sr);
      uint64_t nzmask = 0;
      uint8_t* prow = P8 + r * kKeyBlock;
      if (softmax(Sr, nk, bm, M[r], L[r], T[r], int_pv ? prow : P8, Pv, &nzmask,
                  cache + int64_t(r) * p.cache_row + j0, stamp + int64_t(r) * p.nkb + kb, alpha[r]) < 0) {
        // every key so far masked: this block adds nothing
        alpha[r] = 1.f;
        if (int_pv) std::memset(prow, 0, kKeyBlock);
        continue;
      }
      if (int_pv) {
        if (nk < kKeyBlock) std::memset(prow + nk, 0, size_t(kKeyBlock - nk));
        continue;
      }
      if (nv < 64) nzmask &= (uint64_t(1) << nv) - 1;  // padded keys (p = 0 unless inputs are NaN)
      pv_sparse_row(Pv, nzmask, vblk, p.dvp, outf + int64_t(r) * p.dvp, alpha[r]);
    }
    if (int_pv) pv_tile(p, P8, w.vq + bh * p.v_stride + (j0 >> 2) * p.dvp * 4, alpha, nr, outf, cbuf);
  }
  _tile_release();

  for (int r = 0; r < nr; ++r) {
    finish_row(a, p, w, bh, i0 + r, outf + int64_t(r) * p.dvp, L[r], row);
    if (p.want_ent) a.entropy[bh * p.Nq + i0 + r] = entropy_of(L[r], T[r]);
  }
  if (p.want_cache) tile_maps(a, p, w, bh, qt, slot, nr, M, L, stamp, cache);
}

void stats_amx(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, uint8_t* s) {
  stats_impl(a, p, w, bh, s);
}

void prep_amx(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, int64_t kb, uint8_t* s) {
  prep_impl(a, p, w, bh, kb, s);
}

}  // namespace

const Kernels& kernels_amx() {
  // 16-key groups, 64-key chunks (whole blocks for the P·V tile), V padded to 16 channels
  static const Kernels k{"amx", 16, 64, 16, 2, false, stats_amx, prep_amx, tile_amx, false, 64};
  return k;
}

}  // namespace raad::cpu
