// Portable kernels: plain C++ (no ISA flags), for CPUs without AVX2 and as the path the tests
// force with RAAD_CPU_ISA=portable (or isa="portable"). Same layouts, same arithmetic as the
// vector kernels, written as simple loops: integer Q·Kᵀ on codes unpacked one key block at a
// time, online softmax with exp2, P·V on integer codes (pv_bits = 8) or 16-bit-rounded floats.
#include "cpu/quantize.h"

namespace raad::cpu {
namespace {

void stats_portable(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, uint8_t* s) {
  stats_impl(a, p, w, bh, s);
}

void prep_portable(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, int64_t kb, uint8_t* s) {
  prep_impl(a, p, w, bh, kb, s);
}

void tile_portable(const AttentionArgs& a, const Plan& p, const Work& w, int64_t bh, int64_t qt,
                   int64_t slot, uint8_t* scr) {
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t i0 = qt * kQueryTile;
  const int nr = int(min64_(kQueryTile, p.Nq - i0));
  [[maybe_unused]] const auto [qc, qa, rs, qsum, row, S, P8, P, bias, outf, M, L, T, stamp, cache8, kun, tmp] =
      tile_scratch(p, scr);
  float* cache = reinterpret_cast<float*>(cache8);
  prepare_q_tile(a, p, b, h, i0, nr, nr, row, tmp, false, qc, nullptr, rs, qsum);
  start_rows(p, nr, M, L, T, outf);

  const uint8_t* kbh = w.kq + bh * p.kq_stride;
  const float* ks = w.ks + bh * p.nkp;
  const bool bf = a.q.dtype == DType::BF16;
  for (int64_t kb = 0; kb < p.nkb; ++kb) {
    const int64_t j0 = kb * kKeyBlock;
    const int nv = int(min64_(kKeyBlock, p.Nk - j0));
    for (int jj = 0; jj < nv; ++jj)
      for (int c = 0; c < p.dp; ++c) kun[int64_t(jj) * p.dpad + c] = int8_t(k_code(kbh, p, j0 + jj, c));
    for (int r = 0; r < nr; ++r) {
      const int8_t* q = qc + int64_t(r) * p.dpad;
      for (int jj = 0; jj < nv; ++jj) {
        const int8_t* k = kun + int64_t(jj) * p.dpad;
        int32_t acc = 0;
        for (int c = 0; c < p.dp; ++c) acc += int32_t(q[c]) * int32_t(k[c]);
        S[jj] = float(acc) * (rs[r] * ks[j0 + jj]);
      }
      if (a.mask.data) {
        load_bias_log2(a.mask, b, h, i0 + r, j0, nv, bias);
        for (int jj = 0; jj < nv; ++jj) S[jj] += bias[jj];
      }
      float bm = -inf_();
      for (int jj = 0; jj < nv; ++jj) bm = maxf_(bm, S[jj]);
      const float mnew = maxf_(M[r], bm);
      float* crow = cache + int64_t(r) * p.cache_row + j0;
      if (mnew == -inf_()) {  // every key so far masked: nothing to add
        if (p.want_cache) {
          stamp[int64_t(r) * p.nkb + kb] = -inf_();
          for (int jj = 0; jj < nv; ++jj) crow[jj] = 0.f;
        }
        continue;
      }
      const float alpha = __builtin_exp2f(M[r] - mnew);
      if (L[r] > 0.f) T[r] = alpha * (T[r] + L[r] * (M[r] - mnew));
      float lsum = 0.f, tsum = 0.f;
      for (int jj = 0; jj < nv; ++jj) {
        const float d = S[jj] - mnew;
        const float pj = d < -127.f ? 0.f : __builtin_exp2f(d);
        lsum += pj;
        if (pj > 0.f) tsum += pj * d;
        if (p.want_cache) crow[jj] = pj;
        P[jj] = p.pv_bits == 8 ? rne_(pj * 255.f) : round_half(pj, bf);
      }
      L[r] = L[r] * alpha + lsum;
      T[r] += tsum;
      M[r] = mnew;
      if (p.want_cache) stamp[int64_t(r) * p.nkb + kb] = mnew;
      float* o = outf + int64_t(r) * p.dvp;
      if (p.pv_bits == 8) {
        const int8_t* vq = w.vq + bh * p.v_stride;
        for (int64_t c = 0; c < p.Dv; ++c) {
          int32_t acc = 0;
          for (int jj = 0; jj < nv; ++jj) {
            const int64_t j = j0 + jj;
            acc += int32_t(P[jj]) * int32_t(vq[(j >> 2) * p.dvp * 4 + c * 4 + (j & 3)]);
          }
          o[c] = o[c] * alpha + float(acc);
        }
      } else {
        const float* vh = w.vh + bh * p.v_stride;
        for (int64_t c = 0; c < p.Dv; ++c) {
          float acc = 0.f;
          for (int jj = 0; jj < nv; ++jj) acc += P[jj] * vh[(j0 + jj) * p.dvp + c];
          o[c] = o[c] * alpha + acc;
        }
      }
    }
  }

  for (int r = 0; r < nr; ++r) {
    finish_row(a, p, w, bh, i0 + r, outf + int64_t(r) * p.dvp, L[r], row);
    if (p.want_ent) a.entropy[bh * p.Nq + i0 + r] = entropy_of(L[r], T[r]);
  }
  if (!p.want_cache) return;
  // Maps from the cached probabilities: p · 2^(stamp - m) / l is the normalised probability.
  float* rec = p.want_recv ? received_row(p, w, slot, bh) : nullptr;
  float* cls = (p.want_cls && qt == 0) ? a.cls + bh * p.Nk : nullptr;
  for (int64_t kb = 0; kb < p.nkb; ++kb) {
    const int64_t j0 = kb * kKeyBlock;
    const int nv = int(min64_(kKeyBlock, p.Nk - j0));
    for (int r = 0; r < nr; ++r) {
      const float st = stamp[int64_t(r) * p.nkb + kb];
      const float f = (L[r] > 0.f && st != -inf_()) ? __builtin_exp2f(st - M[r]) / L[r] : 0.f;
      const float* crow = cache + int64_t(r) * p.cache_row + j0;
      if (rec)
        for (int jj = 0; jj < nv; ++jj) rec[j0 + jj] += f * crow[jj];
      if (cls && r == 0)
        for (int jj = 0; jj < nv; ++jj) cls[j0 + jj] = f * crow[jj];
    }
  }
}

}  // namespace

const Kernels& kernels_portable() {
  static const Kernels k{"portable", 8, 16, 8, 4, false, stats_portable, prep_portable, tile_portable};
  return k;
}

}  // namespace raad::cpu
