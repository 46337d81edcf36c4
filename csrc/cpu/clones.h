// RAAD_CLONES: build a function for AVX-512, AVX2 and baseline x86-64 and let the loader pick the
// clone the running CPU has (GCC/Clang target_clones), for plain loops the compiler vectorises;
// elsewhere (or with RAAD_NO_CLONES) one baseline build.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(RAAD_NO_CLONES)
#define RAAD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RAAD_CLONES
#endif
