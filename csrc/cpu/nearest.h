// Nearest-neighbour search for raad's feature memory (raad/memory.py): each query row's squared
// L2 distance to its nearest bank row, without the (queries × bank) distance matrix that a GEMM
// followed by a min would write and read back (that matrix, not the arithmetic, is what a
// 2048-row bank costs through torch). raad_kernels/nearest.py specifies the arithmetic.
// No torch headers (raw pointers only).
#pragma once
#include <cstdint>

namespace raad::cpu {

// Block sizes of the kernel: bank columns are processed kNearestCols at a time, so bank_t's row
// length n must be a multiple of it (pad with columns whose b_sq is +inf).
constexpr int64_t kNearestCols = 64;

// out[r] = max(0, |q_r|² + min_j (b_sq[j] − 2 q_r · b_j)), q: m × k row-major, bank_t: k × n
// row-major (the bank transposed), b_sq: n.
void nearest_sq_f32(const float* q, int64_t m, int64_t k, const float* bank_t, const float* b_sq, int64_t n,
                    float* out, int threads);

}  // namespace raad::cpu

namespace raad::cpu {

// The int8 search (AVX-512 VNNI; raad_kernels/nearest.py specifies it): queries quantized per row
// (q_u8 = code + 128, s_q), the bank once per tensor (s_b) and packed for vpdpbusd as
// [n/16][k/4][16][4] int8 (k a multiple of 4, n of kNearestCols), col128[j] = 128 · Σ_c code[j, c]
// (the +128 offset's share). out[r] = max(0, q_sq[r] + min_j (b_sq[j] − 2 s_q[r] s_b · dot_j)).
void nearest_sq_i8_avx512vnni(const uint8_t* q_u8, const float* s_q, const float* q_sq, int64_t m, int64_t k,
                              const int8_t* bank_packed, const int32_t* col128, const float* b_sq, float s_b,
                              int64_t n, float* out, int threads);

}  // namespace raad::cpu
