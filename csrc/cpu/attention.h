// Fused quantized attention on the CPU: entry point. No torch headers (raw pointers only).
//
// One call runs three OpenMP phases over the (batch, head) pairs of the problem:
//   A. statistics per (b, h): K channel means (smoothing), V channel means and absmax;
//   B. K and V quantized once per (b, h), block by block of keys: smoothing, Hadamard rotation,
//      per-token scales (clipping searched at 4/2 bits), codes packed in a blocked layout;
//   C. one fused kernel per (b, h, query tile): Q quantized, integer Q·Kᵀ, online softmax in fp32,
//      P·V at 8 bits (unsigned P, scale 1/255) or 16 bits, output in the input dtype, and the
//      attention maps (cls, received, entropy) from the same pass.
// The arithmetic is the one `raad_kernels/quant.py` specifies; see attention_internal.h.
#pragma once
#include <cstdint>
#include <string>

#include "cpu/cpu_features.h"

namespace raad::cpu {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, Bool = 3 };

// A strided 4-D view (B, H, N, D); strides in elements, any of them may be 0 (broadcast).
struct View4 {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t stride[4] = {0, 0, 0, 0};
};

struct AttentionArgs {
  View4 q, k, v;
  View4 mask;              // data == nullptr: no mask; else (B, H, Nq, Nk) view, bool (true =
                           // attend) or float additive
  void* out = nullptr;     // (B, H, Nq, Dv), dtype of q, channels contiguous
  int64_t out_stride[3] = {0, 0, 0};  // its (b, h, n) element strides; all 0: contiguous
  int64_t B = 0, H = 0, Nq = 0, Nk = 0, D = 0, Dv = 0;
  int qk_bits = 8, pv_bits = 8;
  float scale = 1.f;
  bool smooth_k = true, rotate = false;
  float* cls = nullptr;       // (B, H, Nk) contiguous, or nullptr when not requested
  float* received = nullptr;  // (B, H, Nk)
  float* entropy = nullptr;   // (B, H, Nq)
  int num_threads = 1;
};

// Runs the whole call on the kernels of `isa` (the caller checks the CPU supports it).
void attention(const AttentionArgs& args, CpuIsa isa);

// The ISA whose kernels `isa` runs: Amx runs the AVX-512 VNNI kernels (no AMX tile kernel yet),
// and AVX-512 falls back to AVX2 if its start-up self-check against the portable path failed.
CpuIsa kernel_isa(CpuIsa isa);

// Runs small problems through `isa`'s kernels and the portable ones and compares the outputs
// (all bit-widths, both P·V modes, all maps). Returns an empty string when they agree, else a
// description of the mismatch. Run once before the AVX-512 kernels are first trusted.
std::string self_check(CpuIsa isa);

// Test hook: run phases A and B of `isa`'s kernels (statistics, K quantized into its blocked,
// packed layout) and decode the layout back to plain codes; Q rows go through the same row
// quantizer (its portable copy). Outputs:
// q_codes (B, H, Nq, dp), q_scale (B, H, Nq), k_codes (B, H, Nk, dp), k_scale (B, H, Nk), where dp
// is the head dim after rotation padding. Compared with raad_kernels.quant.prepare_qk in tests.
int64_t padded_head_dim(int64_t D, bool rotate);
void quantize_qk_debug(const AttentionArgs& args, CpuIsa isa, int8_t* q_codes, float* q_scale, int8_t* k_codes,
                       float* k_scale);

}  // namespace raad::cpu
