// Test build only (csrc/cpu/emu/build_avx512_emu.py): the AVX-512 intrinsics of
// attention_avx512.cpp and nearest_avx512.cpp emulated by SIMDe (libsimde-dev) on a CPU without AVX-512, so the kernels'
// arithmetic can be tested where they cannot run natively. Included after <immintrin.h>; SIMDe's
// native aliases map the _mm512_* names and types onto its portable implementations (the AVX2
// ones stay native). Never part of the real extension.
#pragma once
#include <immintrin.h>

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

// Missing from SIMDe 0.7 (Debian's libsimde-dev): defined here from simpler operations.
#ifndef _mm512_cvtepi32_ps
inline simde__m512 raad_emu_cvtepi32_ps(simde__m512i a) {
  alignas(64) int32_t i[16];
  alignas(64) float f[16];
  simde_mm512_store_si512(i, a);
  for (int l = 0; l < 16; ++l) f[l] = static_cast<float>(i[l]);
  return simde_mm512_load_ps(f);
}
#define _mm512_cvtepi32_ps(a) raad_emu_cvtepi32_ps(a)
#endif
#ifndef _mm512_reduce_max_ps
inline float raad_emu_reduce_max_ps(simde__m512 a) {
  alignas(64) float f[16];
  simde_mm512_store_ps(f, a);
  float m = f[0];
  for (int l = 1; l < 16; ++l) m = f[l] > m ? f[l] : m;
  return m;
}
#define _mm512_reduce_max_ps(a) raad_emu_reduce_max_ps(a)
#endif
#ifndef _mm512_reduce_min_ps
inline float raad_emu_reduce_min_ps(simde__m512 a) {  // nearest_avx512.cpp's row minimum
  alignas(64) float f[16];
  simde_mm512_store_ps(f, a);
  float m = f[0];
  for (int l = 1; l < 16; ++l) m = f[l] < m ? f[l] : m;
  return m;
}
#define _mm512_reduce_min_ps(a) raad_emu_reduce_min_ps(a)
#endif
