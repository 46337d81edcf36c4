// Flash-style quantized attention forward and the second pass of the attention maps.
//
// One CTA of 4 warps per (batch·head, tile of BM queries); each warp owns MT row tiles of 16
// queries for the whole key loop. Per block of BN keys:
//   Q·Kᵀ   integer tensor-core mma on packed codes, Q fragments held in registers for the whole
//          loop, K tiles double-buffered in shared memory by cp.async and read with ldmatrix:
//            int8  mma.m16n8k32.s8.s8
//            int4  mma.m16n8k64.s4.s4 (sm_80/86/89), else nibbles → int8 in registers + k32
//            int2  crumbs → int4 nibbles + k64 (sm_80/86/89), else crumbs → int8 + k32
//          The int32 accumulator fragment is scaled by s_q·s_k·scale·log2(e) (per-token scales),
//          masked (attn_mask, padding keys → -inf) and fed to an online softmax with exp2.
//   P·V    straight from the accumulator registers (the C layout of the Q·Kᵀ mma is the A
//          layout of the P·V mma):
//            pv 16  P as fp16 (bf16 for bf16 inputs), mma.m16n8k16 with fp32 accumulation;
//            pv 8   P = round(255·exp(s - m)) unsigned 8-bit, V int8 per channel,
//                   mma.m16n8k32.u8.s8 into int32 per block, then fp32.
//          V is stored transposed (channel-major) so both read as ldmatrix rows. For pv 8, keys
//          are permuted inside each group of 16 (quantize.cu vperm) to match the order in which
//          a thread holds P: thread t holds keys {2t, 2t+1, 8+2t, 9+2t} of each 16.
// Maps: entropy from the forward pass (Σ p·(s - m) carried with the online rescaling); cls and
// received from a second pass that recomputes the scores and normalises with the saved lse.
#pragma once

#include "common.cuh"
#include "raad_cuda.h"

namespace raad {
namespace cuda {

template <int QKB, int PVM, int HD>
struct Cfg {
  static constexpr int MT = 1;                       // 16-row tiles per warp (2 spills)
  static constexpr int NW = 4;                      // warps per CTA
  static constexpr int THREADS = NW * 32;
  static constexpr int BM = NW * 16 * MT;           // queries per CTA
  static constexpr int BN = HD == 256 ? 32 : 64;    // keys per block
  static constexpr int NT = BN / 8;                 // 8-key n-tiles of S
  static constexpr int RB = HD * QKB / 8;           // packed Q/K row bytes
  static constexpr int SB = QKB == 2 ? 16 : 32;     // packed bytes per k-step of Q·Kᵀ
  static constexpr int NS = RB / SB;                // k-steps
  // mma per k-step: 1 with native int4 mma or at int8, else 2 (unpacked to int8, k32).
  static constexpr int KSTR = ((RB / 16) % 2 == 0) ? RB + 16 : RB;  // odd multiple of 16 bytes
  static constexpr int VE = PVM == 0 ? 1 : 2;       // bytes per V element
  static constexpr int VROW = BN * VE;              // bytes of a V_T row per block
  static constexpr int VSTR = ((VROW / 16) % 2 == 0) ? VROW + 16 : VROW;
  static constexpr int NDV = HD / 8;                // 8-channel tiles of O
  static constexpr int KS_OFF = BN * KSTR;          // k scales after the K rows
  static constexpr int V_OFF = KS_OFF + BN * 4;
  static constexpr int STAGE = (V_OFF + HD * VSTR + 127) / 128 * 128;
  static constexpr int SMEM_FWD = 2 * STAGE;
  static constexpr int STAGE_K = (V_OFF + 127) / 128 * 128;
  static constexpr int RED_OFF = 2 * STAGE_K;
  static constexpr int SMEM_MAPS = RED_OFF + NW * BN * 4;
  static_assert(NT % 4 == 0, "n-tiles come in groups of 4 for ldmatrix.x4");
  static_assert(NDV % 2 == 0, "channel tiles come in pairs");
  static_assert(RB % SB == 0, "whole k-steps");
};

template <int QKB>
struct QkMma {
  static constexpr int PER_STEP = (QKB == 8 || RAAD_NATIVE_S4) ? 1 : 2;
};

RAAD_DEV uint32_t ld_u32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// ---------------------------------------------------------------------------------------------
// Q fragments (A operand of Q·Kᵀ) for the warp's rows, in the compute format of the arch.
// ---------------------------------------------------------------------------------------------
template <int QKB, int HD, int MT, int NMMA>
RAAD_DEV void load_q_frags(uint32_t (&qf)[MT][NMMA][4], const uint8_t* qbase, int row0, int nq,
                           int qdim, int g, int t) {
  using C = Cfg<QKB, 1, HD>;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int ra = row0 + mt * 16 + g, rb = ra + 8;
    const bool va = ra < nq, vb = rb < nq;
    const uint8_t* pa = qbase + static_cast<size_t>(va ? ra : 0) * C::RB;
    const uint8_t* pb = qbase + static_cast<size_t>(vb ? rb : 0) * C::RB;
#pragma unroll
    for (int s = 0; s < C::NS; ++s) {
      if constexpr (QKB != 2) {
        const int off = s * 32 + 4 * t;
        const uint32_t x0 = va ? ld_u32(pa + off) : 0u, x1 = vb ? ld_u32(pb + off) : 0u;
        const uint32_t x2 = va ? ld_u32(pa + off + 16) : 0u, x3 = vb ? ld_u32(pb + off + 16) : 0u;
        if constexpr (QkMma<QKB>::PER_STEP == 1) {
          qf[mt][s][0] = x0; qf[mt][s][1] = x1; qf[mt][s][2] = x2; qf[mt][s][3] = x3;
        } else {  // int4 → int8: low nibbles in the first mma, high nibbles in the second
          qf[mt][2 * s][0] = s4_lo_to_s8(x0); qf[mt][2 * s][1] = s4_lo_to_s8(x1);
          qf[mt][2 * s][2] = s4_lo_to_s8(x2); qf[mt][2 * s][3] = s4_lo_to_s8(x3);
          qf[mt][2 * s + 1][0] = s4_hi_to_s8(x0); qf[mt][2 * s + 1][1] = s4_hi_to_s8(x1);
          qf[mt][2 * s + 1][2] = s4_hi_to_s8(x2); qf[mt][2 * s + 1][3] = s4_hi_to_s8(x3);
        }
      } else {
        // int2: the grid has no zero, so columns at or beyond the quantized dim are masked here
        // (Q side only; K's padding crumbs then multiply zeros).
        const int off = s * 16 + 4 * t;
        const uint32_t x0 = va ? ld_u32(pa + off) : 0u, x1 = vb ? ld_u32(pb + off) : 0u;
        if constexpr (QkMma<QKB>::PER_STEP == 1) {
          uint32_t m0 = 0, m1 = 0;
#pragma unroll
          for (int b = 0; b < 4; ++b)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int e = 4 * (off + b) + 2 * h;
              if (e < qdim) m0 |= 0xFu << (8 * b + 4 * h);
              if (e + 1 < qdim) m1 |= 0xFu << (8 * b + 4 * h);
            }
          uint32_t a0, a2, a1, a3;
          s2_to_s4(x0, a0, a2);
          s2_to_s4(x1, a1, a3);
          qf[mt][s][0] = a0 & m0; qf[mt][s][1] = a1 & m0; qf[mt][s][2] = a2 & m1; qf[mt][s][3] = a3 & m1;
        } else {
          uint32_t m[4] = {0, 0, 0, 0};
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int b = 0; b < 4; ++b)
              if (4 * (off + b) + j < qdim) m[j] |= 0xFFu << (8 * b);
          uint32_t c0[4], c1[4];
          s2_to_s8(x0, c0);
          s2_to_s8(x1, c1);
          qf[mt][2 * s][0] = c0[0] & m[0]; qf[mt][2 * s][1] = c1[0] & m[0];
          qf[mt][2 * s][2] = c0[1] & m[1]; qf[mt][2 * s][3] = c1[1] & m[1];
          qf[mt][2 * s + 1][0] = c0[2] & m[2]; qf[mt][2 * s + 1][1] = c1[2] & m[2];
          qf[mt][2 * s + 1][2] = c0[3] & m[3]; qf[mt][2 * s + 1][3] = c1[3] & m[3];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tile loads (cp.async, 16 bytes per request)
// ---------------------------------------------------------------------------------------------
template <class C>
RAAD_DEV void load_k_tile(unsigned char* st, const uint8_t* kbase, const float* ksb, int kb, int tid) {
  constexpr int CPR = C::RB / 16;
  const uint8_t* src = kbase + static_cast<size_t>(kb) * C::BN * C::RB;
  for (int c = tid; c < C::BN * CPR; c += C::THREADS) {
    const int r = c / CPR, cc = c % CPR;
    cp_async16(st + r * C::KSTR + cc * 16, src + r * C::RB + cc * 16);
  }
  for (int c = tid; c < C::BN / 4; c += C::THREADS)
    cp_async16(st + C::KS_OFF + c * 16, ksb + static_cast<size_t>(kb) * C::BN + c * 4);
}

template <class C>
RAAD_DEV void load_v_tile(unsigned char* st, const uint8_t* vbase, int kb, int nkp, int tid) {
  constexpr int CPR = C::VROW / 16;
  const size_t gstride = static_cast<size_t>(nkp) * C::VE;
  const uint8_t* src = vbase + static_cast<size_t>(kb) * C::VROW;
  for (int c = tid; c < C::NDV * 8 * CPR; c += C::THREADS) {  // NDV·8 = HD rows
    const int r = c / CPR, cc = c % CPR;
    cp_async16(st + C::V_OFF + r * C::VSTR + cc * 16, src + r * gstride + cc * 16);
  }
}

// ---------------------------------------------------------------------------------------------
// S = Q·Kᵀ for one key block: int32 accumulators → log2-domain float scores, masked.
// ---------------------------------------------------------------------------------------------
template <int QKB, int HD, int MT, int NMMA, int NT>
RAAD_DEV void qk_block(float (&S)[MT][NT][4], const uint32_t (&qf)[MT][NMMA][4], const unsigned char* st,
                       const float (&qsc)[MT][2], const AttnParams& p, int64_t bh, int row0, int kb,
                       int lane) {
  using C = Cfg<QKB, 1, HD>;
  const int g = lane >> 2, t = lane & 3, mi = lane >> 3, r8 = lane & 7;
  int acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][j][i] = 0;

#pragma unroll
  for (int s = 0; s < C::NS; ++s) {
    if constexpr (C::SB == 32) {
#pragma unroll
      for (int jp = 0; jp < NT / 2; ++jp) {
        uint32_t r[4];
        ldsm_x4(r, st + (8 * (2 * jp + (mi >> 1)) + r8) * C::KSTR + s * 32 + 16 * (mi & 1));
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int j = 2 * jp + h;
          const uint32_t w0 = r[2 * h], w1 = r[2 * h + 1];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            if constexpr (QKB == 8) {
              mma_s8(acc[mt][j], qf[mt][s], w0, w1);
            } else if constexpr (QkMma<QKB>::PER_STEP == 1) {
              mma_s4(acc[mt][j], qf[mt][s], w0, w1);
            } else {
              mma_s8(acc[mt][j], qf[mt][2 * s], s4_lo_to_s8(w0), s4_lo_to_s8(w1));
              mma_s8(acc[mt][j], qf[mt][2 * s + 1], s4_hi_to_s8(w0), s4_hi_to_s8(w1));
            }
          }
        }
      }
    } else {  // int2: 16 packed bytes per k-step, one ldmatrix matrix per n-tile
#pragma unroll
      for (int jq = 0; jq < NT / 4; ++jq) {
        uint32_t r[4];
        ldsm_x4(r, st + (8 * (4 * jq + mi) + r8) * C::KSTR + s * 16);
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          const int j = 4 * jq + h;
          if constexpr (QkMma<QKB>::PER_STEP == 1) {
            uint32_t e0, e1;
            s2_to_s4(r[h], e0, e1);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) mma_s4(acc[mt][j], qf[mt][s], e0, e1);
          } else {
            uint32_t c[4];
            s2_to_s8(r[h], c);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              mma_s8(acc[mt][j], qf[mt][2 * s], c[0], c[1]);
              mma_s8(acc[mt][j], qf[mt][2 * s + 1], c[2], c[3]);
            }
          }
        }
      }
    }
  }

  // Scales, mask, padding keys.
  const float* ksm = reinterpret_cast<const float*>(st + C::KS_OFF);
  const int key0 = kb * C::BN;
  const bool tail = key0 + C::BN > p.nk;
  const float* bias = nullptr;
  if (p.bias) bias = p.bias + (bh / p.heads) * p.bias_sb + (bh % p.heads) * p.bias_sh;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const float k0 = ksm[8 * j + 2 * t], k1 = ksm[8 * j + 2 * t + 1];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        S[mt][j][i] = i2f_small(acc[mt][j][i]) * qsc[mt][i >> 1] * ((i & 1) ? k1 : k0);
  }
  if (bias) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int row = row0 + mt * 16 + g + 8 * rr;
        if (row < p.nq) {
          const float* brow = bias + row * p.bias_sq;
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int key = key0 + 8 * j + 2 * t + c;
              if (key < p.nk) S[mt][j][2 * rr + c] += brow[key * p.bias_sk] * kLog2e;
            }
        }
      }
  }
  if (tail) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c)
        if (key0 + 8 * j + 2 * t + c >= p.nk)
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            S[mt][j][c] = -kInf;
            S[mt][j][2 + c] = -kInf;
          }
  }
}

template <class C>
RAAD_DEV void store_out2(const AttnParams& p, size_t idx, float v0, float v1, bool pair, bool has1) {
  if (p.out_dtype == kF32) {
    float* o = static_cast<float*>(p.out) + idx;
    if (pair) {
      *reinterpret_cast<float2*>(o) = make_float2(v0, v1);
    } else {
      o[0] = v0;
      if (has1) o[1] = v1;
    }
  } else {
    uint16_t* o = static_cast<uint16_t*>(p.out) + idx;
    const bool bf = p.out_dtype == kBF16;
    if (pair) {
      *reinterpret_cast<uint32_t*>(o) = bf ? pack_bf16x2(v0, v1) : pack_f16x2(v0, v1);
    } else {
      o[0] = bf ? f32_to_bf16_bits(v0) : f32_to_f16_bits(v0);
      if (has1) o[1] = bf ? f32_to_bf16_bits(v1) : f32_to_f16_bits(v1);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward kernel
// ---------------------------------------------------------------------------------------------
template <int QKB, int PVM, int HD>
__global__ void __launch_bounds__(128) attn_fwd_kernel(const AttnParams p) {
  using C = Cfg<QKB, PVM, HD>;
  constexpr int MT = C::MT, NT = C::NT, NDV = C::NDV;
  constexpr int NMMA = C::NS * QkMma<QKB>::PER_STEP;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3, mi = lane >> 3, r8 = lane & 7;
  const int nqt = (p.nq + C::BM - 1) / C::BM;
  const int qt = static_cast<int>(blockIdx.x % nqt);
  const int64_t bh = blockIdx.x / nqt;
  const int row0 = qt * C::BM + warp * 16 * MT;

  unsigned char* smem = dyn_smem();
  const uint8_t* kbase = p.k + static_cast<size_t>(bh) * p.nkp * C::RB;
  const float* ksb = p.ks + static_cast<size_t>(bh) * p.nkp;
  const uint8_t* vbase = static_cast<const uint8_t*>(p.v) + static_cast<size_t>(bh) * HD * p.nkp * C::VE;
  const int nblk = (p.nk + C::BN - 1) / C::BN;

  load_k_tile<C>(smem, kbase, ksb, 0, tid);
  cp_async_commit();
  load_v_tile<C>(smem, vbase, 0, p.nkp, tid);
  cp_async_commit();

  uint32_t qf[MT][NMMA][4];
  load_q_frags<QKB, HD, MT, NMMA>(qf, p.q + static_cast<size_t>(bh) * p.nq * C::RB, row0, p.nq, p.qdim, g, t);
  float qsc[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int row = row0 + mt * 16 + g + 8 * rr;
      qsc[mt][rr] = row < p.nq ? p.qs[static_cast<size_t>(bh) * p.nq + row] * p.scale_log2 : 0.f;
    }

  float o[MT][NDV][4];
  float m[MT][2], l[MT][2], ent[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int n = 0; n < NDV; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) o[mt][n][i] = 0.f;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      m[mt][rr] = -kInf;
      l[mt][rr] = 0.f;
      ent[mt][rr] = 0.f;
    }
  }
  const bool want_ent = p.entropy != nullptr;

  for (int kb = 0; kb < nblk; ++kb) {
    unsigned char* st = smem + (kb & 1) * C::STAGE;
    if (kb + 1 < nblk) {
      unsigned char* nx = smem + ((kb + 1) & 1) * C::STAGE;
      load_k_tile<C>(nx, kbase, ksb, kb + 1, tid);
      cp_async_commit();
      load_v_tile<C>(nx, vbase, kb + 1, p.nkp, tid);
      cp_async_commit();
    } else {
      cp_async_commit();
      cp_async_commit();
    }
    cp_async_wait<3>();
    block_sync();

    float S[MT][NT][4];
    qk_block<QKB, HD, MT, NMMA, NT>(S, qf, st, qsc, p, bh, row0, kb, lane);

    // Online softmax (log2 domain). p = 2^(s - m) ∈ [0, 1]; m = -inf rows use 0 (no NaN).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        float mx = -kInf;
#pragma unroll
        for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(S[mt][j][2 * rr], S[mt][j][2 * rr + 1]));
        mx = fmaxf(mx, shfl_xor(mx, 1));
        mx = fmaxf(mx, shfl_xor(mx, 2));
        const float m_old = m[mt][rr];
        const float m_new = fmaxf(m_old, mx);
        const float m_use = m_new == -kInf ? 0.f : m_new;
        const float alpha = fast_exp2(m_old - m_use);
        if (want_ent)
          ent[mt][rr] = m_old == -kInf ? 0.f : alpha * (ent[mt][rr] + (m_old - m_use) * l[mt][rr]);
        float ls = 0.f, es = 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float sv = S[mt][j][2 * rr + c];
            const float pv = fast_exp2(sv - m_use);
            ls += pv;
            if (want_ent) es += pv > 0.f ? pv * (sv - m_use) : 0.f;
            S[mt][j][2 * rr + c] = pv;
          }
        l[mt][rr] = l[mt][rr] * alpha + ls;
        if (want_ent) ent[mt][rr] += es;
        m[mt][rr] = m_new;
#pragma unroll
        for (int n = 0; n < NDV; ++n) {
          o[mt][n][2 * rr] *= alpha;
          o[mt][n][2 * rr + 1] *= alpha;
        }
      }

    cp_async_wait<2>();
    block_sync();
    const unsigned char* vs = st + C::V_OFF;

    if constexpr (PVM != 0) {
      // P·V with 16-bit P and V, fp32 accumulators.
#pragma unroll
      for (int u = 0; u < C::BN / 16; ++u) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (PVM == 1) {
            a[mt][0] = pack_f16x2(S[mt][2 * u][0], S[mt][2 * u][1]);
            a[mt][1] = pack_f16x2(S[mt][2 * u][2], S[mt][2 * u][3]);
            a[mt][2] = pack_f16x2(S[mt][2 * u + 1][0], S[mt][2 * u + 1][1]);
            a[mt][3] = pack_f16x2(S[mt][2 * u + 1][2], S[mt][2 * u + 1][3]);
          } else {
            a[mt][0] = pack_bf16x2(S[mt][2 * u][0], S[mt][2 * u][1]);
            a[mt][1] = pack_bf16x2(S[mt][2 * u][2], S[mt][2 * u][3]);
            a[mt][2] = pack_bf16x2(S[mt][2 * u + 1][0], S[mt][2 * u + 1][1]);
            a[mt][3] = pack_bf16x2(S[mt][2 * u + 1][2], S[mt][2 * u + 1][3]);
          }
        }
#pragma unroll
        for (int np = 0; np < NDV / 2; ++np) {
          uint32_t r[4];
          ldsm_x4(r, vs + (8 * (2 * np + (mi >> 1)) + r8) * C::VSTR + u * 32 + 16 * (mi & 1));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            if constexpr (PVM == 1) {
              mma_f16(o[mt][2 * np], a[mt], r[0], r[1]);
              mma_f16(o[mt][2 * np + 1], a[mt], r[2], r[3]);
            } else {
              mma_bf16(o[mt][2 * np], a[mt], r[0], r[1]);
              mma_bf16(o[mt][2 * np + 1], a[mt], r[2], r[3]);
            }
          }
        }
      }
    } else {
      // P·V with unsigned 8-bit P (scale 1/255) and per-channel int8 V, int32 per block.
      constexpr int NU = C::BN / 32;
      uint32_t a[MT][NU][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int u = 0; u < NU; ++u)
#pragma unroll
          for (int h = 0; h < 4; ++h) {
            // h: 0 row g keys of n-tiles 4u, 4u+1; 1 row g+8; 2 row g n-tiles 4u+2, 4u+3; 3 row g+8
            const int j0 = 4 * u + 2 * (h >> 1), c0 = 2 * (h & 1);
            a[mt][u][h] = pack_u8x4_255(S[mt][j0][c0], S[mt][j0][c0 + 1], S[mt][j0 + 1][c0],
                                        S[mt][j0 + 1][c0 + 1]);
          }
#pragma unroll
      for (int np = 0; np < NDV / 2; ++np) {
        int acc[MT][2][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[mt][0][i] = acc[mt][1][i] = 0;
#pragma unroll
        for (int u = 0; u < NU; ++u) {
          uint32_t r[4];
          ldsm_x4(r, vs + (8 * (2 * np + (mi >> 1)) + r8) * C::VSTR + u * 32 + 16 * (mi & 1));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_u8s8(acc[mt][0], a[mt][u], r[0], r[1]);
            mma_u8s8(acc[mt][1], a[mt][u], r[2], r[3]);
          }
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            o[mt][2 * np][i] += i2f_small(acc[mt][0][i]);  // ≤ 255·127·BN < 2^22
            o[mt][2 * np + 1][i] += i2f_small(acc[mt][1][i]);
          }
      }
    }
    block_sync();  // this stage is refilled two blocks on
  }

  // Epilogue: normalise, dequantize (pv 8), write out, lse, entropy.
  const bool pair = (p.dv & 1) == 0;
  const float* vsc = p.vscale ? p.vscale + static_cast<size_t>(bh) * HD : nullptr;
  const float* vmn = p.vmean ? p.vmean + static_cast<size_t>(bh) * HD : nullptr;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float lt = l[mt][rr];
      lt += shfl_xor(lt, 1);
      lt += shfl_xor(lt, 2);
      float et = ent[mt][rr];
      if (want_ent) {
        et += shfl_xor(et, 1);
        et += shfl_xor(et, 2);
      }
      const int row = row0 + mt * 16 + g + 8 * rr;
      if (row >= p.nq) continue;
      const float inv = lt > 0.f ? 1.f / lt : 0.f;
      const size_t ridx = static_cast<size_t>(bh) * p.nq + row;
      if (t == 0) {
        const float m_use = m[mt][rr] == -kInf ? 0.f : m[mt][rr];
        if (p.lse) p.lse[ridx] = lt > 0.f ? m_use + fast_log2(lt) : kInf;
        if (want_ent) p.entropy[ridx] = lt > 0.f ? kLn2 * (fast_log2(lt) - et * inv) : 0.f;
      }
#pragma unroll
      for (int n = 0; n < NDV; ++n) {
        const int col = 8 * n + 2 * t;
        if (col >= p.dv) continue;
        float v0 = o[mt][n][2 * rr] * inv, v1 = o[mt][n][2 * rr + 1] * inv;
        if constexpr (PVM == 0) {
          const float k255 = 1.f / 255.f;
          v0 = v0 * (vsc[col] * k255) + (lt > 0.f ? vmn[col] : 0.f);
          v1 = v1 * (vsc[col + 1] * k255) + (lt > 0.f ? vmn[col + 1] : 0.f);
        }
        store_out2<C>(p, ridx * p.dv + col, v0, v1, pair, col + 1 < p.dv);
      }
    }
}

// ---------------------------------------------------------------------------------------------
// Maps pass: p = 2^(s - lse) exactly normalised; cls row and received column sums.
// ---------------------------------------------------------------------------------------------
template <int QKB, int HD>
__global__ void __launch_bounds__(128) attn_maps_kernel(const AttnParams p, int nqt_launch, int want_received) {
  using C = Cfg<QKB, 1, HD>;
  constexpr int MT = C::MT, NT = C::NT;
  constexpr int NMMA = C::NS * QkMma<QKB>::PER_STEP;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int qt = static_cast<int>(blockIdx.x % nqt_launch);
  const int64_t bh = blockIdx.x / nqt_launch;
  const int row0 = qt * C::BM + warp * 16 * MT;

  unsigned char* smem = dyn_smem();
  float* red = reinterpret_cast<float*>(smem + C::RED_OFF);
  const uint8_t* kbase = p.k + static_cast<size_t>(bh) * p.nkp * C::RB;
  const float* ksb = p.ks + static_cast<size_t>(bh) * p.nkp;
  const int nblk = (p.nk + C::BN - 1) / C::BN;

  load_k_tile<C>(smem, kbase, ksb, 0, tid);
  cp_async_commit();

  uint32_t qf[MT][NMMA][4];
  load_q_frags<QKB, HD, MT, NMMA>(qf, p.q + static_cast<size_t>(bh) * p.nq * C::RB, row0, p.nq, p.qdim, g, t);
  float qsc[MT][2], lse[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int row = row0 + mt * 16 + g + 8 * rr;
      const bool ok = row < p.nq;
      qsc[mt][rr] = ok ? p.qs[static_cast<size_t>(bh) * p.nq + row] * p.scale_log2 : 0.f;
      lse[mt][rr] = ok ? p.lse[static_cast<size_t>(bh) * p.nq + row] : kInf;
    }
  const bool cls_lanes = p.cls != nullptr && qt == 0 && warp == 0 && lane < 4;  // row 0
  const float inv_nq = 1.f / static_cast<float>(p.nq);

  for (int kb = 0; kb < nblk; ++kb) {
    unsigned char* st = smem + (kb & 1) * C::STAGE_K;
    if (kb + 1 < nblk) load_k_tile<C>(smem + ((kb + 1) & 1) * C::STAGE_K, kbase, ksb, kb + 1, tid);
    cp_async_commit();
    cp_async_wait<1>();
    block_sync();

    float S[MT][NT][4];
    qk_block<QKB, HD, MT, NMMA, NT>(S, qf, st, qsc, p, bh, row0, kb, lane);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) S[mt][j][i] = fast_exp2(S[mt][j][i] - lse[mt][i >> 1]);

    const int key0 = kb * C::BN;
    if (cls_lanes) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int key = key0 + 8 * j + 2 * t + c;
          if (key < p.nk) p.cls[static_cast<size_t>(bh) * p.nk + key] = S[0][j][c];
        }
    }
    if (want_received) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float v = 0.f;
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) v += S[mt][j][c] + S[mt][j][2 + c];
          v += shfl_xor(v, 4);
          v += shfl_xor(v, 8);
          v += shfl_xor(v, 16);
          if (lane < 4) red[warp * C::BN + 8 * j + 2 * t + c] = v;
        }
    }
    block_sync();
    if (want_received) {
      for (int c = tid; c < C::BN; c += C::THREADS) {
        const int key = key0 + c;
        if (key < p.nk) {
          float sum = 0.f;
#pragma unroll
          for (int w = 0; w < C::NW; ++w) sum += red[w * C::BN + c];
          atomic_add_f32(p.received + static_cast<size_t>(bh) * p.nk + key, sum * inv_nq);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host launchers
// ---------------------------------------------------------------------------------------------
template <int QKB, int PVM, int HD>
cudaError_t launch_fwd(const AttnParams& p, cudaStream_t stream) {
  using C = Cfg<QKB, PVM, HD>;
  auto kfn = attn_fwd_kernel<QKB, PVM, HD>;
  if (C::SMEM_FWD > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kfn, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM_FWD);
    if (e != cudaSuccess) return e;
  }
  const int64_t nqt = (p.nq + C::BM - 1) / C::BM;
  const int64_t blocks = nqt * p.bh;
  if (blocks <= 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  RAAD_LAUNCH(kfn, dim3(static_cast<unsigned>(blocks)), dim3(C::THREADS), C::SMEM_FWD, stream, p);
  return cudaGetLastError();
}

template <int QKB, int HD>
cudaError_t launch_maps(const AttnParams& p, bool want_received, cudaStream_t stream) {
  using C = Cfg<QKB, 1, HD>;
  auto kfn = attn_maps_kernel<QKB, HD>;
  if (C::SMEM_MAPS > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kfn, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM_MAPS);
    if (e != cudaSuccess) return e;
  }
  const int nqt = want_received ? static_cast<int>((p.nq + C::BM - 1) / C::BM) : 1;
  const int64_t blocks = static_cast<int64_t>(nqt) * p.bh;
  if (blocks <= 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  RAAD_LAUNCH(kfn, dim3(static_cast<unsigned>(blocks)), dim3(C::THREADS), C::SMEM_MAPS, stream, p, nqt,
              want_received ? 1 : 0);
  return cudaGetLastError();
}

template <int QKB>
cudaError_t forward_dispatch(const AttnParams& p, int pv_mode, int hd, cudaStream_t stream) {
#define RAAD_FWD_CASE(PVM, HD) \
  if (pv_mode == PVM && hd == HD) return launch_fwd<QKB, PVM, HD>(p, stream);
  RAAD_FWD_CASE(0, 64) RAAD_FWD_CASE(0, 128) RAAD_FWD_CASE(0, 256)
  RAAD_FWD_CASE(1, 64) RAAD_FWD_CASE(1, 128) RAAD_FWD_CASE(1, 256)
  RAAD_FWD_CASE(2, 64) RAAD_FWD_CASE(2, 128) RAAD_FWD_CASE(2, 256)
#undef RAAD_FWD_CASE
  return cudaErrorInvalidValue;
}

template <int QKB>
cudaError_t maps_dispatch(const AttnParams& p, int hd, bool want_received, cudaStream_t stream) {
  if (hd == 64) return launch_maps<QKB, 64>(p, want_received, stream);
  if (hd == 128) return launch_maps<QKB, 128>(p, want_received, stream);
  if (hd == 256) return launch_maps<QKB, 256>(p, want_received, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace raad
