// Device primitives shared by the CUDA kernels: tensor-core mma.sync, ldmatrix, cp.async, warp
// shuffles and 16-bit conversions. Plain CUDA (no torch headers).
//
// Built with RAAD_EMU defined, the same kernel sources compile as ordinary C++ against
// csrc/cuda/emu/emu.h, a host emulator that runs each thread block as std::threads and
// implements these primitives with the PTX fragment layouts. It exists to test the kernels'
// index arithmetic on machines without a GPU; it says nothing about speed or races.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef RAAD_EMU
#include "emu/emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "raad_cuda.h"

#define RAAD_DEV __device__ __forceinline__

// Kernel launch (the emulator defines its own). `kernel` must be one token: a function pointer
// variable, not a template-id with commas.
#ifndef RAAD_EMU
#define RAAD_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

// Native int4 tensor-core mma (m16n8k64 .s4): sm_80/sm_86/sm_89 have it in hardware. sm_90 and
// newer do not: ptxas emulates it there with two int8 IMMAs and ~180 bit operations, so on those
// archs the kernels unpack int4/int2 to int8 themselves and use m16n8k32 .s8.
#if defined(RAAD_EMU)
#ifdef RAAD_EMU_NO_S4
#define RAAD_NATIVE_S4 0
#else
#define RAAD_NATIVE_S4 1
#endif
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define RAAD_NATIVE_S4 0
#else
#define RAAD_NATIVE_S4 1
#endif

namespace raad {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();

}  // namespace cuda
}  // namespace raad

#ifdef RAAD_EMU
#include "emu/emu_prims.h"
#else
namespace raad {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Loads and conversions
// ---------------------------------------------------------------------------------------------
template <int DT>
RAAD_DEV float load_f(const void* p, size_t i) {
  if constexpr (DT == kF32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (DT == kF16) {
    return __half2float(static_cast<const __half*>(p)[i]);
  } else {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}

// Two floats → packed 16-bit pair (low half = first), round to nearest even.
RAAD_DEV uint32_t pack_f16x2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
RAAD_DEV uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
RAAD_DEV uint16_t f32_to_f16_bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
RAAD_DEV uint16_t f32_to_bf16_bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }

template <typename T>
RAAD_DEV T shfl_xor(T v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
template <typename T>
RAAD_DEV T shfl_down(T v, int m) { return __shfl_down_sync(0xffffffffu, v, m); }

RAAD_DEV void block_sync() { __syncthreads(); }

// IEEE operations (the build uses --use_fast_math; the quantizer must round like the spec).
RAAD_DEV float div_rn(float a, float b) { return __fdiv_rn(a, b); }
RAAD_DEV float sqrt_rn(float a) { return __fsqrt_rn(a); }
RAAD_DEV float fast_exp2(float x) { return exp2f(x); }  // ex2.approx under fast-math; 2^-inf = 0
RAAD_DEV float fast_log2(float x) { return __log2f(x); }
RAAD_DEV uint32_t f2u_rn(float x) { return __float2uint_rn(x); }

RAAD_DEV void atomic_add_f32(float* p, float v) { atomicAdd(p, v); }

// int32 → float, exact for |i| < 2^22 (the Q·Kᵀ sums: ≤ 127²·256 at int8), with one integer and
// one float add instead of the quarter-rate I2F: the bits of 1.5·2^23 + i, minus 1.5·2^23.
RAAD_DEV float i2f_small(int i) { return __int_as_float(i + 0x4B400000) - 12582912.0f; }

// Four probabilities in [0, 1] → round-half-even(255·p) as packed unsigned bytes (first = low
// byte), through the same magic-number rounding instead of F2I.
RAAD_DEV uint32_t pack_u8x4_255(float a, float b, float c, float d) {
  const uint32_t ia = __float_as_uint(fmaf(a, 255.f, 12582912.0f));
  const uint32_t ib = __float_as_uint(fmaf(b, 255.f, 12582912.0f));
  const uint32_t ic = __float_as_uint(fmaf(c, 255.f, 12582912.0f));
  const uint32_t id = __float_as_uint(fmaf(d, 255.f, 12582912.0f));
  const uint32_t lo = __byte_perm(ia, ib, 0x0040), hi = __byte_perm(ic, id, 0x0040);
  return __byte_perm(lo, hi, 0x5410);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core mma.sync (D += A·B), fragments as in the PTX ISA (row.col).
// ---------------------------------------------------------------------------------------------
RAAD_DEV void mma_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

RAAD_DEV void mma_u8s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

RAAD_DEV void mma_s4(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if RAAD_NATIVE_S4
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();  // never called on archs without native int4 mma (the kernels unpack instead)
#endif
}

RAAD_DEV void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

RAAD_DEV void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 b16 matrices (each 8 rows of 16 bytes) from shared memory: lanes 8i..8i+7 give the
// row addresses of matrix i; lane l receives, in r[i], the 4 bytes at (row l/4, byte 4*(l%4)).
RAAD_DEV void ldsm_x4(uint32_t (&r)[4], const void* smem_row) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// 16-byte asynchronous global → shared copy (L2 only), and its group bookkeeping.
RAAD_DEV void cp_async16(void* smem, const void* gmem) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
RAAD_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
RAAD_DEV void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Dynamic shared memory of the launch (16-byte aligned).
RAAD_DEV unsigned char* dyn_smem() {
  extern __shared__ __align__(16) unsigned char raad_smem_[];
  return raad_smem_;
}

}  // namespace cuda
}  // namespace raad
#endif  // !RAAD_EMU

namespace raad {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Register-level unpacking of packed low-bit codes (bit tricks, no lookups). Only the order of
// the k positions changes, and Q and K go through the same functions, so dot products are exact.
// ---------------------------------------------------------------------------------------------

// Four bytes of nibbles (int4 two's complement) → bytes of int8: the low nibbles (elements
// 0, 2, 4, 6 of the word) and the high nibbles (1, 3, 5, 7).
RAAD_DEV uint32_t s4_lo_to_s8(uint32_t w) {
  uint32_t x = w & 0x0F0F0F0Fu;
  return x | ((x & 0x08080808u) * 0x1Eu);  // sign bit 8 → 0xF0 per byte, no carries
}
RAAD_DEV uint32_t s4_hi_to_s8(uint32_t w) { return s4_lo_to_s8(w >> 4); }

// int2 crumb c ∈ {0..3} (value 2c-3), one per nibble in bits 0-1 → int4 nibble of 2c-3.
// Nibble bits of 2c-3: [~c1, ~c1, c0, 1].
RAAD_DEV uint32_t crumbs_to_s4(uint32_t c) {
  uint32_t b0 = c & 0x11111111u;
  uint32_t nb1 = ((c >> 1) & 0x11111111u) ^ 0x11111111u;
  return (b0 << 1) | 0x11111111u | (nb1 * 0xCu);
}
// Same, one crumb per byte → int8 byte of 2c-3: [~c1 x6, c0, 1].
RAAD_DEV uint32_t crumbs_to_s8(uint32_t c) {
  uint32_t b0 = c & 0x01010101u;
  uint32_t nb1 = ((c >> 1) & 0x01010101u) ^ 0x01010101u;
  return (b0 << 1) | 0x01010101u | (nb1 * 0xFCu);
}
// A 32-bit word of 16 int2 crumbs (4 per byte) → two int4 words. e0 holds crumbs 0 and 2 of each
// byte (low, high nibble), e1 crumbs 1 and 3.
RAAD_DEV void s2_to_s4(uint32_t w, uint32_t& e0, uint32_t& e1) {
  e0 = crumbs_to_s4(w & 0x33333333u);
  e1 = crumbs_to_s4((w >> 2) & 0x33333333u);
}
// → four int8 words: c[j] holds crumb j of each byte.
RAAD_DEV void s2_to_s8(uint32_t w, uint32_t (&c)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) c[j] = crumbs_to_s8((w >> (2 * j)) & 0x03030303u);
}

}  // namespace cuda
}  // namespace raad
