// Per-row quantization of float32 rows (the Q/K quantizer of the attention kernels, on its own):
// raad_kernels.quant.token_scales + quantize for every row, in parallel. Used by the training
// path's fake quantization (raad_kernels/fake_quant.py), whose scale search in torch is many
// passes over the tensor per candidate. No torch headers.
#pragma once
#include <cstdint>

#include "cpu/cpu_features.h"

namespace raad::cpu {

// codes[r, :] and scale[r] of row r of x (rows × n, contiguous) at `bits` (8, 4 or 2), on the
// vector path the attention kernels use for `isa` (kernel_isa; `isa` within this CPU's).
void quantize_rows(const float* x, int64_t rows, int64_t n, int bits, int8_t* codes, float* scale, int threads,
                   CpuIsa isa);

// One body per ISA (quantize_rows_impl.h compiled with that ISA's flags).
void quantize_rows_portable(const float* x, int64_t rows, int64_t n, int bits, int8_t* codes, float* scale,
                            int threads);
void quantize_rows_avx2(const float* x, int64_t rows, int64_t n, int bits, int8_t* codes, float* scale, int threads);
void quantize_rows_avx512(const float* x, int64_t rows, int64_t n, int bits, int8_t* codes, float* scale,
                          int threads);

}  // namespace raad::cpu
