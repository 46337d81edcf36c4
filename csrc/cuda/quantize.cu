// Fused quantization kernels (raad_kernels/quant.py is the specification):
//   channel_stats  per-(bh, channel) token mean (K smoothing, V centring) and max |x - mean|;
//   quantize_rows  smoothing → Hadamard rotation (FWHT across a warp's registers and lanes) →
//                  per-token scale (int8: absmax; int4/int2: least squared error among the
//                  absmax and min(a·rms, absmax), a in CLIP_GRID) →
//                  round-half-even codes → packed bytes;
//   prepare_v_*    V per-channel int8 (or fp16/bf16) transposed to the layout P·V reads.
// Division and square roots are IEEE (__fdiv_rn, __fsqrt_rn) although the build uses fast math,
// so codes match quant.py up to the order of float sums.
#include "common.cuh"
#include "raad_cuda.h"

namespace raad {
namespace cuda {

namespace {

constexpr float kFltMin = 1.17549435e-38f;

// ---------------------------------------------------------------------------------------------
// Channel statistics over tokens
// ---------------------------------------------------------------------------------------------
// Two independent jobs per launch (K's mean and V's statistics share one launch).
struct StatsJob {
  const void* x;
  int n, d, dblocks;
  float* mean;
  float* absmax_c;
};

template <int DT>
__global__ void __launch_bounds__(256) channel_stats_kernel(const StatsJob j0, const StatsJob j1,
                                                            int64_t blocks0) {
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const bool first = blockIdx.x < blocks0;
  const int64_t blk = first ? blockIdx.x : blockIdx.x - blocks0;
  const void* x = first ? j0.x : j1.x;
  const int n = first ? j0.n : j1.n, d = first ? j0.d : j1.d, dblocks = first ? j0.dblocks : j1.dblocks;
  float* mean = first ? j0.mean : j1.mean;
  float* absmax_c = first ? j0.absmax_c : j1.absmax_c;
  const int64_t bh = blk / dblocks;
  const int c = static_cast<int>(blk % dblocks) * 32 + tx;
  float s = 0.f, mn = kInf, mx = -kInf;
  if (c < d) {
    const size_t base = static_cast<size_t>(bh) * n * d + c;
    for (int i = ty; i < n; i += 8) {
      const float v = load_f<DT>(x, base + static_cast<size_t>(i) * d);
      s += v;
      mn = fminf(mn, v);
      mx = fmaxf(mx, v);
    }
  }
  float* red = reinterpret_cast<float*>(dyn_smem());
  red[threadIdx.x] = s;
  red[256 + threadIdx.x] = mn;
  red[512 + threadIdx.x] = mx;
  block_sync();
  if (ty == 0 && c < d) {
    for (int j = 1; j < 8; ++j) {
      s += red[j * 32 + tx];
      mn = fminf(mn, red[256 + j * 32 + tx]);
      mx = fmaxf(mx, red[512 + j * 32 + tx]);
    }
    const float m = div_rn(s, static_cast<float>(n));
    mean[bh * d + c] = m;
    if (absmax_c) absmax_c[bh * d + c] = fmaxf(mx - m, m - mn);
  }
}

// ---------------------------------------------------------------------------------------------
// Per-row quantization: one warp per row, E = HD/32 consecutive elements per lane.
// ---------------------------------------------------------------------------------------------
template <int BITS>
RAAD_DEV float round_grid(float y) {
  if constexpr (BITS == 2) {
    return fminf(fmaxf(2.f * floorf(y * 0.5f) + 1.f, -3.f), 3.f);
  } else {
    constexpr float q = BITS == 8 ? 127.f : 7.f;
    return fminf(fmaxf(rintf(y), -q), q);
  }
}

template <typename T>
RAAD_DEV T warp_sum(T v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += shfl_xor(v, m);
  return v;
}
RAAD_DEV float warp_max(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, shfl_xor(v, m));
  return v;
}

template <int BITS>
struct ClipGrid;
template <>
struct ClipGrid<4> {
  static constexpr int n = 8;
  static RAAD_DEV float at(int i) {
    constexpr float g[8] = {2.0f, 2.25f, 2.5f, 2.75f, 3.0f, 3.5f, 4.0f, 5.0f};
    return g[i];
  }
};
template <>
struct ClipGrid<2> {
  static constexpr int n = 8;
  static RAAD_DEV float at(int i) {
    constexpr float g[8] = {1.0f, 1.25f, 1.5f, 1.75f, 2.0f, 2.25f, 2.5f, 3.0f};
    return g[i];
  }
};

// Q and K are quantized by one launch: rows [0, j0.rows) are job 0, the rest job 1.
struct RowJob {
  const void* x;
  const float* mean;  // per-(bh, channel) smoothing mean, or null
  int n, npad;
  int64_t rows;       // bh · npad
  uint8_t* codes;
  float* scales;
};

template <int DT, int BITS, int E>
__global__ void __launch_bounds__(256) quantize_rows_kernel(const RowJob j0, const RowJob j1, int d,
                                                            int dr, float rot_scale, int qdim, int rb) {
  const int lane = threadIdx.x & 31;
  int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const bool first = row < j0.rows;
  if (!first) row -= j0.rows;
  if (row >= (first ? j0.rows : j1.rows)) return;  // whole warp
  const void* __restrict__ x = first ? j0.x : j1.x;
  const float* __restrict__ mean = first ? j0.mean : j1.mean;
  const int n = first ? j0.n : j1.n, npad = first ? j0.npad : j1.npad;
  uint8_t* __restrict__ codes = first ? j0.codes : j1.codes;
  float* __restrict__ scales = first ? j0.scales : j1.scales;
  const int64_t bh = row / npad;
  const int tok = static_cast<int>(row % npad);
  uint8_t* dst = codes + row * rb;
  if (tok >= n) {  // padding row: zero codes and scale
    for (int i = lane; i < rb; i += 32) dst[i] = 0;
    if (lane == 0) scales[row] = 0.f;
    return;
  }

  float xv[E];
  const size_t src = (static_cast<size_t>(bh) * n + tok) * d;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int i = lane * E + e;
    float v = 0.f;
    if (i < d) {
      v = load_f<DT>(x, src + i);
      if (mean) v -= mean[bh * d + i];
    }
    xv[e] = v;
  }

  // Orthonormal Walsh–Hadamard over the first dr elements (stages h = 1, 2, 4, ... as quant.fwht).
  if (dr > 0) {
#pragma unroll
    for (int h = 1; h < E; h <<= 1) {
      if (h < dr) {
        float y[E];
#pragma unroll
        for (int e = 0; e < E; ++e) y[e] = (e & h) ? xv[e ^ h] - xv[e] : xv[e] + xv[e ^ h];
#pragma unroll
        for (int e = 0; e < E; ++e) xv[e] = y[e];
      }
    }
    for (int h = E; h < dr; h <<= 1) {
      const int m = h / E;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float o = shfl_xor(xv[e], m);
        xv[e] = (lane & m) ? o - xv[e] : xv[e] + o;
      }
    }
#pragma unroll
    for (int e = 0; e < E; ++e) xv[e] *= rot_scale;
  }

  float amax = 0.f, ss = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    amax = fmaxf(amax, fabsf(xv[e]));
    ss += xv[e] * xv[e];
  }
  amax = warp_max(amax);

  float scale;
  if constexpr (BITS == 8) {
    scale = div_rn(amax, 127.f);
  } else {
    constexpr float qmax = BITS == 4 ? 7.f : 3.f;
    ss = warp_sum(ss);
    const float rms = sqrt_rn(div_rn(ss, static_cast<float>(qdim)));
    float best_err = 0.f;
    scale = 0.f;
    // Candidates: the absmax first, then min(a·rms, absmax) for a in CLIP_GRID.
#pragma unroll
    for (int ci = 0; ci <= ClipGrid<BITS>::n; ++ci) {
      const float clip = ci == 0 ? amax : fminf(ClipGrid<BITS>::at(ci - 1) * rms, amax);
      const float s = div_rn(clip, qmax);
      const float s_safe = s > 0.f ? s : 1.f;
      float err = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        if (lane * E + e < qdim) {
          const float r = round_grid<BITS>(div_rn(xv[e], s_safe)) * s_safe - xv[e];
          err += r * r;
        }
      }
      err = warp_sum(err);
      if (ci == 0 || err < best_err) {  // strict: ties keep the earlier candidate
        best_err = err;
        scale = s;
      }
    }
  }
  if (!(scale > 0.f)) scale = BITS == 2 ? kFltMin : 1.f;

  // Codes and packing: element i at bit BITS*(i % per_byte), little-endian bytes.
  uint64_t packed = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int i = lane * E + e;
    int c = BITS == 2 ? -3 : 0;  // padding beyond the quantized dim (int2: crumb 0)
    if (i < qdim) c = static_cast<int>(round_grid<BITS>(div_rn(xv[e], scale)));
    uint64_t field;
    if constexpr (BITS == 8) {
      field = static_cast<uint8_t>(static_cast<int8_t>(c));
    } else if constexpr (BITS == 4) {
      field = static_cast<uint64_t>(c & 0xF);
    } else {
      field = static_cast<uint64_t>((c + 3) >> 1);
    }
    packed |= field << (BITS * e);
  }
  constexpr int nbits = E * BITS;
  if constexpr (nbits == 4) {  // int2 with 2 elements per lane: pairs of lanes make a byte
    const uint32_t hi = shfl_down(static_cast<uint32_t>(packed), 1);
    if ((lane & 1) == 0) dst[lane >> 1] = static_cast<uint8_t>(packed | (hi << 4));
  } else if constexpr (nbits == 8) {
    dst[lane] = static_cast<uint8_t>(packed);
  } else if constexpr (nbits == 16) {
    reinterpret_cast<uint16_t*>(dst)[lane] = static_cast<uint16_t>(packed);
  } else if constexpr (nbits == 32) {
    reinterpret_cast<uint32_t*>(dst)[lane] = static_cast<uint32_t>(packed);
  } else {
    reinterpret_cast<uint64_t*>(dst)[lane] = packed;
  }
  if (lane == 0) scales[row] = scale;
}

// ---------------------------------------------------------------------------------------------
// V preparation: a 64-key × 32-channel tile per block through shared memory (transpose).
// ---------------------------------------------------------------------------------------------
// Position p of a 16-key group of the int8 V layout holds key vperm(p): the order in which the
// Q·Kᵀ accumulator fragments hand P to the u8·s8 mma (see attention.cuh).
RAAD_DEV int vperm(int p) {
  const int t = p >> 2, i = p & 3;
  return (i & 2) * 4 + 2 * t + (i & 1);
}

template <int DT>
RAAD_DEV void load_v_tile(float* tile, const void* v, int64_t bh, int nk, int dv, int kb, int db) {
  for (int idx = threadIdx.x; idx < 64 * 32; idx += 256) {
    const int kl = idx >> 5, dl = idx & 31;
    const int key = kb * 64 + kl, dd = db * 32 + dl;
    tile[kl * 33 + dl] = (key < nk && dd < dv)
                             ? load_f<DT>(v, (static_cast<size_t>(bh) * nk + key) * dv + dd)
                             : 0.f;
  }
}

template <int DT>
__global__ void __launch_bounds__(256) prep_v_int8_kernel(
    const void* __restrict__ v, const float* __restrict__ mean, const float* __restrict__ absmax_c,
    int nk, int nkp, int dv, int hd, int8_t* __restrict__ vt, float* __restrict__ vscale,
    float* __restrict__ vmean) {
  const int nkb = nkp / 64, ndb = hd / 32;
  const int kb = static_cast<int>(blockIdx.x % nkb);
  const int db = static_cast<int>((blockIdx.x / nkb) % ndb);
  const int64_t bh = blockIdx.x / (static_cast<int64_t>(nkb) * ndb);
  float* tile = reinterpret_cast<float*>(dyn_smem());
  load_v_tile<DT>(tile, v, bh, nk, dv, kb, db);
  block_sync();
  for (int w = threadIdx.x; w < 32 * 16; w += 256) {
    const int dl = w >> 4, wi = w & 15, dd = db * 32 + dl;
    float m = 0.f, sc = 1.f;
    if (dd < dv) {
      m = mean[bh * dv + dd];
      sc = div_rn(absmax_c[bh * dv + dd], 127.f);
      if (!(sc > 0.f)) sc = 1.f;
    }
    uint32_t word = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int p = wi * 4 + i;
      const int kl = (p & ~15) + vperm(p & 15);
      const int key = kb * 64 + kl;
      int c = 0;
      if (key < nk && dd < dv)
        c = static_cast<int>(fminf(fmaxf(rintf(div_rn(tile[kl * 33 + dl] - m, sc)), -127.f), 127.f));
      word |= static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(c))) << (8 * i);
    }
    *reinterpret_cast<uint32_t*>(vt + (static_cast<size_t>(bh) * hd + dd) * nkp + kb * 64 + wi * 4) = word;
    if (kb == 0 && wi == 0) {
      vscale[bh * hd + dd] = sc;
      vmean[bh * hd + dd] = m;
    }
  }
}

template <int DT, bool BF16OUT>
__global__ void __launch_bounds__(256) prep_v_half_kernel(const void* __restrict__ v, int nk, int nkp,
                                                          int dv, int hd, uint16_t* __restrict__ vt) {
  const int nkb = nkp / 64, ndb = hd / 32;
  const int kb = static_cast<int>(blockIdx.x % nkb);
  const int db = static_cast<int>((blockIdx.x / nkb) % ndb);
  const int64_t bh = blockIdx.x / (static_cast<int64_t>(nkb) * ndb);
  float* tile = reinterpret_cast<float*>(dyn_smem());
  load_v_tile<DT>(tile, v, bh, nk, dv, kb, db);
  block_sync();
  for (int w = threadIdx.x; w < 32 * 32; w += 256) {
    const int dl = w >> 5, wi = w & 31, dd = db * 32 + dl;
    const float a = tile[(2 * wi) * 33 + dl], b = tile[(2 * wi + 1) * 33 + dl];
    const uint32_t word = BF16OUT ? pack_bf16x2(a, b) : pack_f16x2(a, b);
    *reinterpret_cast<uint32_t*>(vt + (static_cast<size_t>(bh) * hd + dd) * nkp + kb * 64 + 2 * wi) = word;
  }
}

template <int BITS, int E>
cudaError_t launch_quantize(const RowJob& j0, const RowJob& j1, int dtype, int d, int dr, float rot_scale,
                            int qdim, int rb, cudaStream_t stream) {
  const int64_t rows = j0.rows + j1.rows;
  const dim3 grid(static_cast<unsigned>((rows + 7) / 8)), block(256);
  if (dtype == kF32) {
    auto kfn = quantize_rows_kernel<kF32, BITS, E>;
    RAAD_LAUNCH(kfn, grid, block, 0, stream, j0, j1, d, dr, rot_scale, qdim, rb);
  } else if (dtype == kF16) {
    auto kfn = quantize_rows_kernel<kF16, BITS, E>;
    RAAD_LAUNCH(kfn, grid, block, 0, stream, j0, j1, d, dr, rot_scale, qdim, rb);
  } else {
    auto kfn = quantize_rows_kernel<kBF16, BITS, E>;
    RAAD_LAUNCH(kfn, grid, block, 0, stream, j0, j1, d, dr, rot_scale, qdim, rb);
  }
  return cudaGetLastError();
}

template <int BITS>
cudaError_t quantize_bits(const RowJob& j0, const RowJob& j1, int dtype, int d, int dr, float rot_scale,
                          int qdim, int hd, cudaStream_t stream) {
  const int rb = row_bytes(BITS, hd);
  switch (hd) {
    case 64: return launch_quantize<BITS, 2>(j0, j1, dtype, d, dr, rot_scale, qdim, rb, stream);
    case 128: return launch_quantize<BITS, 4>(j0, j1, dtype, d, dr, rot_scale, qdim, rb, stream);
    case 256: return launch_quantize<BITS, 8>(j0, j1, dtype, d, dr, rot_scale, qdim, rb, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t channel_stats2(int dtype, int64_t bh, const void* x0, int n0, int d0, float* mean0,
                           float* absmax0, const void* x1, int n1, int d1, float* mean1, float* absmax1,
                           cudaStream_t stream) {
  if (bh <= 0) return cudaSuccess;
  StatsJob j0{x0, n0, d0, (d0 + 31) / 32, mean0, absmax0};
  StatsJob j1{x1, n1, d1, (d1 + 31) / 32, mean1, absmax1};
  const int64_t b0 = x0 ? bh * j0.dblocks : 0, b1 = x1 ? bh * j1.dblocks : 0;
  if (b0 + b1 == 0) return cudaSuccess;
  if ((x0 && (n0 <= 0 || d0 <= 0)) || (x1 && (n1 <= 0 || d1 <= 0))) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(b0 + b1)), block(256);
  const size_t smem = 3 * 256 * sizeof(float);
  if (dtype == kF32) {
    auto kfn = channel_stats_kernel<kF32>;
    RAAD_LAUNCH(kfn, grid, block, smem, stream, j0, j1, b0);
  } else if (dtype == kF16) {
    auto kfn = channel_stats_kernel<kF16>;
    RAAD_LAUNCH(kfn, grid, block, smem, stream, j0, j1, b0);
  } else {
    auto kfn = channel_stats_kernel<kBF16>;
    RAAD_LAUNCH(kfn, grid, block, smem, stream, j0, j1, b0);
  }
  return cudaGetLastError();
}

cudaError_t channel_stats(const void* x, int dtype, int64_t bh, int n, int d, float* mean,
                          float* absmax_c, cudaStream_t stream) {
  return channel_stats2(dtype, bh, x, n, d, mean, absmax_c, nullptr, 0, 0, nullptr, nullptr, stream);
}

cudaError_t quantize_qk(int dtype, int64_t bh, int d, bool rotate, float rot_scale, int bits, int hd,
                        const void* q, int nq, uint8_t* qcodes, float* qscales, const void* k,
                        const float* kmean, int nk, int nkpad, uint8_t* kcodes, float* kscales,
                        cudaStream_t stream) {
  if (bh <= 0) return cudaSuccess;
  int dr = 0;
  int qdim = d;
  if (rotate) {
    dr = 1;
    while (dr < d) dr <<= 1;
    qdim = dr;
  }
  if (qdim > hd || d > hd) return cudaErrorInvalidValue;
  RowJob j0{q, nullptr, nq, nq, q ? bh * nq : 0, qcodes, qscales};
  RowJob j1{k, kmean, nk, nkpad, k ? bh * nkpad : 0, kcodes, kscales};
  if (j0.rows + j1.rows == 0) return cudaSuccess;
  switch (bits) {
    case 8: return quantize_bits<8>(j0, j1, dtype, d, dr, rot_scale, qdim, hd, stream);
    case 4: return quantize_bits<4>(j0, j1, dtype, d, dr, rot_scale, qdim, hd, stream);
    case 2: return quantize_bits<2>(j0, j1, dtype, d, dr, rot_scale, qdim, hd, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t quantize_rows(const void* x, int dtype, const float* mean, int64_t bh, int n, int npad,
                          int d, bool rotate, float rot_scale, int bits, int hd, uint8_t* codes,
                          float* scales, cudaStream_t stream) {
  return quantize_qk(dtype, bh, d, rotate, rot_scale, bits, hd, nullptr, 0, nullptr, nullptr, x, mean, n,
                     npad, codes, scales, stream);
}

cudaError_t prepare_v_int8(const void* v, int dtype, const float* mean, const float* absmax_c,
                           int64_t bh, int nk, int nkp, int dv, int hd, int8_t* vt, float* vscale,
                           float* vmean, cudaStream_t stream) {
  if (bh <= 0) return cudaSuccess;
  if (nkp % 64 || hd % 32 || dv > hd) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(bh * (nkp / 64) * (hd / 32))), block(256);
  const size_t smem = 64 * 33 * sizeof(float);
  if (dtype == kF32) {
    auto kfn = prep_v_int8_kernel<kF32>;
    RAAD_LAUNCH(kfn, grid, block, smem, stream, v, mean, absmax_c, nk, nkp, dv, hd, vt, vscale, vmean);
  } else if (dtype == kF16) {
    auto kfn = prep_v_int8_kernel<kF16>;
    RAAD_LAUNCH(kfn, grid, block, smem, stream, v, mean, absmax_c, nk, nkp, dv, hd, vt, vscale, vmean);
  } else {
    auto kfn = prep_v_int8_kernel<kBF16>;
    RAAD_LAUNCH(kfn, grid, block, smem, stream, v, mean, absmax_c, nk, nkp, dv, hd, vt, vscale, vmean);
  }
  return cudaGetLastError();
}

cudaError_t prepare_v_half(const void* v, int dtype, int64_t bh, int nk, int nkp, int dv, int hd,
                           bool bf16_out, uint16_t* vt, cudaStream_t stream) {
  if (bh <= 0) return cudaSuccess;
  if (nkp % 64 || hd % 32 || dv > hd) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(bh * (nkp / 64) * (hd / 32))), block(256);
  const size_t smem = 64 * 33 * sizeof(float);
  if (bf16_out) {  // bf16 operands only for bf16 inputs (quant.pv_half_dtype)
    auto kfn = prep_v_half_kernel<kBF16, true>;
    RAAD_LAUNCH(kfn, grid, block, smem, stream, v, nk, nkp, dv, hd, vt);
  } else if (dtype == kF32) {
    auto kfn = prep_v_half_kernel<kF32, false>;
    RAAD_LAUNCH(kfn, grid, block, smem, stream, v, nk, nkp, dv, hd, vt);
  } else {
    auto kfn = prep_v_half_kernel<kF16, false>;
    RAAD_LAUNCH(kfn, grid, block, smem, stream, v, nk, nkp, dv, hd, vt);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace raad
