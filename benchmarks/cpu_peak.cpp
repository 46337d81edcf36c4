// Ceilings of this CPU for benchmarks/CPU_NOTES.md: the int8 dot-product peak of the AVX2
// instruction sequences the CPU backend uses, the fp32 FMA peak, and the memory bandwidth
// (STREAM-like copy and triad). Stand-alone (no torch):
//   g++ -O3 -mavx2 -mfma -mf16c -fopenmp benchmarks/cpu_peak.cpp -o /tmp/cpu_peak && /tmp/cpu_peak
// Prints per-core and all-core numbers (OMP_NUM_THREADS sets "all").
#include <immintrin.h>
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Each kernel runs `iters` steps of 8 independent accumulator chains (enough to hide latency)
// and returns the multiply-accumulates it did.
#define CHAINS 8

// int8 x int8 as the kernel does it: sign trick + vpmaddubsw + vpmaddwd(ones) + vpaddd.
__attribute__((noinline)) double k_i8_maddubs(long iters, int* sink) {
  __m256i acc[CHAINS];
  for (int c = 0; c < CHAINS; ++c) acc[c] = _mm256_setzero_si256();
  __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-5), ones = _mm256_set1_epi16(1);
  for (long i = 0; i < iters; ++i) {
    __asm__ volatile("" : "+x"(a), "+x"(b));
    for (int c = 0; c < CHAINS; ++c) {
      __m256i s = _mm256_sign_epi8(b, a);
      __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(a), s);
      acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(p, ones));
    }
  }
  __m256i t = acc[0];
  for (int c = 1; c < CHAINS; ++c) t = _mm256_add_epi32(t, acc[c]);
  *sink += _mm256_extract_epi32(t, 0);
  return double(iters) * CHAINS * 32;
}

// int16 x int16 pairs: vpmaddwd + vpaddd (int8 codes widened to 16 bits).
__attribute__((noinline)) double k_i16_madd(long iters, int* sink) {
  __m256i acc[CHAINS];
  for (int c = 0; c < CHAINS; ++c) acc[c] = _mm256_setzero_si256();
  __m256i a = _mm256_set1_epi16(3), b = _mm256_set1_epi16(-5);
  for (long i = 0; i < iters; ++i) {
    __asm__ volatile("" : "+x"(a), "+x"(b));
    for (int c = 0; c < CHAINS; ++c) acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(a, b));
  }
  __m256i t = acc[0];
  for (int c = 1; c < CHAINS; ++c) t = _mm256_add_epi32(t, acc[c]);
  *sink += _mm256_extract_epi32(t, 0);
  return double(iters) * CHAINS * 16;
}

// Low-bit (int4/int2) form: vpmaddubsw accumulated in int16 (no widening per step).
__attribute__((noinline)) double k_i8_maddubs_acc16(long iters, int* sink) {
  __m256i acc[CHAINS];
  for (int c = 0; c < CHAINS; ++c) acc[c] = _mm256_setzero_si256();
  __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-5);
  for (long i = 0; i < iters; ++i) {
    __asm__ volatile("" : "+x"(a), "+x"(b));
    for (int c = 0; c < CHAINS; ++c) acc[c] = _mm256_add_epi16(acc[c], _mm256_maddubs_epi16(a, b));
  }
  __m256i t = acc[0];
  for (int c = 1; c < CHAINS; ++c) t = _mm256_add_epi16(t, acc[c]);
  *sink += _mm256_extract_epi16(t, 0);
  return double(iters) * CHAINS * 32;
}

__attribute__((noinline)) double k_f32_fma(long iters, float* sink) {
  __m256 acc[CHAINS];
  for (int c = 0; c < CHAINS; ++c) acc[c] = _mm256_setzero_ps();
  __m256 a = _mm256_set1_ps(1.0001f), b = _mm256_set1_ps(0.9999f);
  for (long i = 0; i < iters; ++i) {
    __asm__ volatile("" : "+x"(a), "+x"(b));
    for (int c = 0; c < CHAINS; ++c) acc[c] = _mm256_fmadd_ps(a, b, acc[c]);
  }
  __m256 t = acc[0];
  for (int c = 1; c < CHAINS; ++c) t = _mm256_add_ps(t, acc[c]);
  *sink += _mm256_cvtss_f32(t);
  return double(iters) * CHAINS * 8;
}

template <class F>
static double rate(F f, int threads) {
  const long iters = 20'000'000;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    double macs = 0;
    double t0 = now();
#pragma omp parallel num_threads(threads) reduction(+ : macs)
    {
      int s = 0;
      macs += f(iters, &s);
      if (s == 12345) std::printf(" ");
    }
    double dt = now() - t0;
    if (macs / dt > best) best = macs / dt;
  }
  return best;
}

static double fma_rate(int threads) {
  const long iters = 20'000'000;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    double macs = 0;
    double t0 = now();
#pragma omp parallel num_threads(threads) reduction(+ : macs)
    {
      float s = 0;
      macs += k_f32_fma(iters, &s);
      if (s == 12345.f) std::printf(" ");
    }
    double dt = now() - t0;
    if (macs / dt > best) best = macs / dt;
  }
  return best;
}

static void bandwidth(int threads) {
  const size_t n = size_t(1) << 26;  // 64 Mi floats = 256 MiB per array (far beyond the caches)
  float* a = static_cast<float*>(std::aligned_alloc(64, n * 4));
  float* b = static_cast<float*>(std::aligned_alloc(64, n * 4));
  float* c = static_cast<float*>(std::aligned_alloc(64, n * 4));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (size_t i = 0; i < n; ++i) { a[i] = 1.f; b[i] = 2.f; c[i] = 0.f; }
  double best_copy = 0, best_triad = 0;
  for (int rep = 0; rep < 5; ++rep) {
    double t0 = now();
#pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t i = 0; i < n; ++i) c[i] = a[i];
    double t1 = now();
#pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t i = 0; i < n; ++i) a[i] = b[i] + 3.f * c[i];
    double t2 = now();
    best_copy = std::max(best_copy, 2.0 * n * 4 / (t1 - t0));
    best_triad = std::max(best_triad, 3.0 * n * 4 / (t2 - t1));
  }
  std::printf("| memory bandwidth, copy (2 x 256 MiB streams)     | %3d | %8.1f GB/s |\n", threads, best_copy / 1e9);
  std::printf("| memory bandwidth, triad (3 x 256 MiB streams)    | %3d | %8.1f GB/s |\n", threads, best_triad / 1e9);
  std::free(a); std::free(b); std::free(c);
}

int main() {
  const int all = omp_get_max_threads();
  std::printf("| ceiling | threads | value |\n|---|---|---|\n");
  for (int t : {1, all}) {
    std::printf("| int8 MAC, sign+vpmaddubsw+vpmaddwd (int8 Q.K)   | %3d | %8.1f GMAC/s |\n", t, rate(k_i8_maddubs, t) / 1e9);
    std::printf("| int16 MAC, vpmaddwd+vpaddd                       | %3d | %8.1f GMAC/s |\n", t, rate(k_i16_madd, t) / 1e9);
    std::printf("| int8 MAC, vpmaddubsw+vpaddw (int4/int2 Q.K)      | %3d | %8.1f GMAC/s |\n", t, rate(k_i8_maddubs_acc16, t) / 1e9);
    std::printf("| fp32 FMA MAC, vfmadd231ps                        | %3d | %8.1f GMAC/s |\n", t, fma_rate(t) / 1e9);
    if (t == all) bandwidth(t);
    if (all == 1) break;
  }
  return 0;
}
