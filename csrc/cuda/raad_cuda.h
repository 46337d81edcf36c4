// Host-side interface of raad-kernels' CUDA kernels (csrc/cuda/*.cu), used by
// csrc/bindings/cuda_bindings.cpp. Raw pointers only: no torch types cross this boundary.
//
// Data layouts (BH = batch·heads, rows contiguous):
//   Q/K codes  uint8 [BH, Npad, row_bytes(bits, HD)]  packed as quant.py (int8 codes, int4
//              two's-complement nibbles, int2 (code+3)/2 crumbs; element i at bit bits*(i%per)),
//              zero beyond the quantized dim (int2: crumb 0), zero rows beyond N.
//   Q/K scales float [BH, Npad]                       0 for padding rows.
//   V (pv 8)   int8  [BH, HD, Nkp]  per-channel codes of v - mean, transposed (channel-major),
//              keys permuted inside each group of 16 (see attention.cuh), zero padding;
//              vscale/vmean float [BH, HD].
//   V (pv 16)  fp16/bf16 [BH, HD, Nkp] transposed, zero padding.
// HD is the padded head-dim bucket (64, 128 or 256) of max(quantized QK dim, Dv); Nkp is Nk
// rounded up to a multiple of kKeyPad.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef RAAD_EMU
#include "emu/emu.h"
#else
#include <cuda_runtime.h>
#endif

namespace raad {
namespace cuda {

constexpr int kKeyPad = 64;

// Element types of the float tensors crossing the binding.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline int head_bucket(int d) { return d <= 64 ? 64 : (d <= 128 ? 128 : 256); }
inline int row_bytes(int bits, int hd) { return hd * bits / 8; }

// Per-(bh, channel) mean over N tokens of x [BH, N, D] (dtype 0 f32, 1 f16, 2 bf16) → mean[BH, D];
// when absmax_c is non-null also max |x - mean| over tokens → absmax_c[BH, D].
cudaError_t channel_stats(const void* x, int dtype, int64_t bh, int n, int d, float* mean,
                          float* absmax_c, cudaStream_t stream);

// Both statistics in one launch (x0 or x1 may be null to skip it); same dtype.
cudaError_t channel_stats2(int dtype, int64_t bh, const void* x0, int n0, int d0, float* mean0,
                           float* absmax0, const void* x1, int n1, int d1, float* mean1, float* absmax1,
                           cudaStream_t stream);

// Smoothing (x - mean[bh, :] when mean is non-null) → rotation (Hadamard over the next power of
// two of d, when rotate) → per-row quantization at bits with the quant.py rules → packed codes.
// x [BH, N, D]; codes [BH, Npad, row_bytes(bits, hd)]; scales [BH, Npad]. hd ≥ quantized dim.
cudaError_t quantize_rows(const void* x, int dtype, const float* mean, int64_t bh, int n, int npad,
                          int d, bool rotate, float rot_scale, int bits, int hd, uint8_t* codes,
                          float* scales, cudaStream_t stream);

// Q (no smoothing, no padding rows) and K (optional mean, nkpad rows) in one launch.
cudaError_t quantize_qk(int dtype, int64_t bh, int d, bool rotate, float rot_scale, int bits, int hd,
                        const void* q, int nq, uint8_t* qcodes, float* qscales, const void* k,
                        const float* kmean, int nk, int nkpad, uint8_t* kcodes, float* kscales,
                        cudaStream_t stream);

// V → int8 per channel (pv_bits 8): uses mean/absmax_c from channel_stats.
cudaError_t prepare_v_int8(const void* v, int dtype, const float* mean, const float* absmax_c,
                           int64_t bh, int nk, int nkp, int dv, int hd, int8_t* vt, float* vscale,
                           float* vmean, cudaStream_t stream);

// V → fp16 (or bf16 when bf16_out) transposed (pv_bits 16).
cudaError_t prepare_v_half(const void* v, int dtype, int64_t bh, int nk, int nkp, int dv, int hd,
                           bool bf16_out, uint16_t* vt, cudaStream_t stream);

struct AttnParams {
  const uint8_t* q;       // [BH, Nq, RB]
  const float* qs;        // [BH, Nq]
  const uint8_t* k;       // [BH, Nkp, RB]
  const float* ks;        // [BH, Nkp]
  const void* v;          // [BH, HD, Nkp] int8 or 16-bit
  const float* vscale;    // [BH, HD] (pv 8)
  const float* vmean;     // [BH, HD] (pv 8)
  const float* bias;      // additive float mask (natural-log units) or null
  int64_t bias_sb, bias_sh, bias_sq, bias_sk;  // element strides of the broadcast mask
  void* out;              // [BH, Nq, Dv] contiguous, dtype out_dtype
  int out_dtype;
  float* lse;             // [BH, Nq] log2-domain log-sum-exp (null: not needed)
  float* entropy;         // [BH, Nq] nats (null: not requested)
  float* cls;             // [BH, Nk] (maps pass)
  float* received;        // [BH, Nk] zero-initialised (maps pass)
  int64_t bh;
  int heads, nq, nk, nkp, dv;
  int qdim;               // quantized Q/K dim (int2: Q columns ≥ qdim are masked to zero)
  float scale_log2;       // softmax scale · log2(e)
};

// pv_mode: 0 = int8 P·V, 1 = fp16 P·V, 2 = bf16 P·V.
cudaError_t attention_forward(const AttnParams& p, int qk_bits, int pv_mode, int hd,
                              cudaStream_t stream);
// Second pass for the cls / received maps from the saved lse (cls only: the first query tile).
cudaError_t attention_maps(const AttnParams& p, int qk_bits, int hd, bool want_received,
                           cudaStream_t stream);

// Host-side template dispatchers, one per QK bit-width (attention_int{8,4,2}.cu).
cudaError_t attention_forward_b8(const AttnParams& p, int pv_mode, int hd, cudaStream_t stream);
cudaError_t attention_forward_b4(const AttnParams& p, int pv_mode, int hd, cudaStream_t stream);
cudaError_t attention_forward_b2(const AttnParams& p, int pv_mode, int hd, cudaStream_t stream);
cudaError_t attention_maps_b8(const AttnParams& p, int hd, bool want_received, cudaStream_t stream);
cudaError_t attention_maps_b4(const AttnParams& p, int hd, bool want_received, cudaStream_t stream);
cudaError_t attention_maps_b2(const AttnParams& p, int hd, bool want_received, cudaStream_t stream);

int device_count();

}  // namespace cuda
}  // namespace raad
