// Ceilings of this CPU for benchmarks/CPU_NOTES.md: the int8 dot-product peak of the AVX2
// instruction sequences the CPU backend uses, the fp32 FMA peak, and the memory bandwidth
// (STREAM-like copy and triad); on CPUs with AVX-512 VNNI also the vpdpbusd and 512-bit FMA
// peaks. Stand-alone (no torch):
//   g++ -O3 -mavx2 -mfma -mf16c -fopenmp benchmarks/cpu_peak.cpp -o /tmp/cpu_peak && /tmp/cpu_peak
// Prints per-core and all-core numbers (OMP_NUM_THREADS sets "all").
#include <immintrin.h>
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <ctime>
// Wall clock by default; RAAD_PEAK_CPU_TIME=1 counts process CPU time instead (on a loaded, shared
// machine this excludes the time the threads were descheduled, as a profiler would).
static bool g_cpu_time = false;
static double now() {
  if (g_cpu_time) {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Each kernel runs `iters` steps of independent accumulator chains (enough to hide latency)
// and returns the multiply-accumulates it did.

// Independent chains in named registers (arrays of vectors end up in memory); every
// chain has its own operand, and an empty asm statement makes the operands opaque each step, so
// the compiler can neither hoist nor share the multiplies between chains.
#define OPAQUE(x) __asm__ volatile("" : "+x"(x))
// Integer kernels: 6 chains with their own operand each (6 + 6 + 3 registers of 16); the FMA
// kernel: 12 chains on shared operands (a fused multiply-add cannot be shared), enough to cover
// the FMA latency on two pipes.
#define SIX(M) M(0) M(1) M(2) M(3) M(4) M(5)
#define TWELVE(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)

// int8 x int8 as the Q.K kernel does it: sign trick + vpmaddubsw + vpmaddwd(ones) + vpaddd
// (|q| is precomputed, as in the kernel: 4 instructions per 32 MACs).
__attribute__((noinline)) double k_i8_maddubs(long iters, int* sink) {
#define DECL(c) __m256i acc##c = _mm256_setzero_si256(), k##c = _mm256_set1_epi8(char(c - 5));
  SIX(DECL)
#undef DECL
  __m256i q = _mm256_set1_epi8(-3), qa = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  for (long i = 0; i < iters; ++i) {
    OPAQUE(q);
    OPAQUE(qa);
#define STEP(c) \
  OPAQUE(k##c); \
  acc##c = _mm256_add_epi32(acc##c, _mm256_madd_epi16(_mm256_maddubs_epi16(qa, _mm256_sign_epi8(k##c, q)), ones));
    SIX(STEP)
#undef STEP
  }
  __m256i t = acc0;
#define SUM(c) t = _mm256_add_epi32(t, acc##c);
  SIX(SUM)
#undef SUM
  *sink += _mm256_extract_epi32(t, 0);
  return double(iters) * 6 * 32;
}

// int16 x int16 pairs: vpmaddwd + vpaddd (int8 codes widened to 16 bits).
__attribute__((noinline)) double k_i16_madd(long iters, int* sink) {
#define DECL(c) __m256i acc##c = _mm256_setzero_si256(), k##c = _mm256_set1_epi16(short(c - 5));
  SIX(DECL)
#undef DECL
  __m256i q = _mm256_set1_epi16(3);
  for (long i = 0; i < iters; ++i) {
    OPAQUE(q);
#define STEP(c) \
  OPAQUE(k##c); \
  acc##c = _mm256_add_epi32(acc##c, _mm256_madd_epi16(q, k##c));
    SIX(STEP)
#undef STEP
  }
  __m256i t = acc0;
#define SUM(c) t = _mm256_add_epi32(t, acc##c);
  SIX(SUM)
#undef SUM
  *sink += _mm256_extract_epi32(t, 0);
  return double(iters) * 6 * 16;
}

// Low-bit (int4/int2) form: vpmaddubsw accumulated in int16 (no widening per step).
__attribute__((noinline)) double k_i8_maddubs_acc16(long iters, int* sink) {
#define DECL(c) __m256i acc##c = _mm256_setzero_si256(), k##c = _mm256_set1_epi8(char(c + 1));
  SIX(DECL)
#undef DECL
  __m256i q = _mm256_set1_epi8(-5);
  for (long i = 0; i < iters; ++i) {
    OPAQUE(q);
#define STEP(c) \
  OPAQUE(k##c); \
  acc##c = _mm256_add_epi16(acc##c, _mm256_maddubs_epi16(k##c, q));
    SIX(STEP)
#undef STEP
  }
  __m256i t = acc0;
#define SUM(c) t = _mm256_add_epi16(t, acc##c);
  SIX(SUM)
#undef SUM
  *sink += _mm256_extract_epi16(t, 0);
  return double(iters) * 6 * 32;
}

__attribute__((noinline)) double k_f32_fma(long iters, float* sink) {
#define DECL(c) __m256 acc##c = _mm256_set1_ps(0.001f * c);
  TWELVE(DECL)
#undef DECL
  __m256 q = _mm256_set1_ps(1.0001f), k = _mm256_set1_ps(0.9999f);
  for (long i = 0; i < iters; ++i) {
    OPAQUE(q);
    OPAQUE(k);
#define STEP(c) acc##c = _mm256_fmadd_ps(q, k, acc##c);
    TWELVE(STEP)
#undef STEP
  }
  __m256 t = acc0;
#define SUM(c) t = _mm256_add_ps(t, acc##c);
  TWELVE(SUM)
#undef SUM
  *sink += _mm256_cvtss_f32(t);
  return double(iters) * 12 * 8;
}

// AVX-512 forms, compiled for their own target and run only where the CPU reports them (main):
// vpdpbusd (unsigned x signed bytes, 4 products into each int32 lane: the avx512 Q.K kernel)
// and the 512-bit fp32 FMA that SDPA's fp32 path can use.
#define AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
AVX512_VNNI __attribute__((noinline)) double k_i8_vnni(long iters, int* sink) {
#define DECL(c) __m512i acc##c = _mm512_setzero_si512(), k##c = _mm512_set1_epi8(char(c - 5));
  SIX(DECL)
#undef DECL
  __m512i qa = _mm512_set1_epi8(3);
  for (long i = 0; i < iters; ++i) {
    OPAQUE(qa);
#define STEP(c) \
  __asm__ volatile("" : "+v"(k##c)); \
  acc##c = _mm512_dpbusd_epi32(acc##c, qa, k##c);
    SIX(STEP)
#undef STEP
  }
  __m512i t = acc0;
#define SUM(c) t = _mm512_add_epi32(t, acc##c);
  SIX(SUM)
#undef SUM
  *sink += _mm512_reduce_add_epi32(t);
  return double(iters) * 6 * 64;
}

__attribute__((target("avx512f"))) __attribute__((noinline)) double k_f32_fma512(long iters, float* sink) {
#define DECL(c) __m512 acc##c = _mm512_set1_ps(0.001f * c);
  TWELVE(DECL)
#undef DECL
  __m512 q = _mm512_set1_ps(1.0001f), k = _mm512_set1_ps(0.9999f);
  for (long i = 0; i < iters; ++i) {
    __asm__ volatile("" : "+v"(q));
    __asm__ volatile("" : "+v"(k));
#define STEP(c) acc##c = _mm512_fmadd_ps(q, k, acc##c);
    TWELVE(STEP)
#undef STEP
  }
  __m512 t = acc0;
#define SUM(c) t = _mm512_add_ps(t, acc##c);
  TWELVE(SUM)
#undef SUM
  *sink += _mm512_reduce_add_ps(t);
  return double(iters) * 12 * 16;
}

// Best of 5 runs of kernel ``f`` on ``threads`` threads, in MACs per second. The sink (int for
// the integer kernels, float for the FMA ones) keeps the compiler from dropping the work.
template <class Sink>
static double rate(double (*f)(long, Sink*), int threads) {
  const long iters = 20'000'000;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    double macs = 0;
    double t0 = now();
#pragma omp parallel num_threads(threads) reduction(+ : macs)
    {
      Sink s = 0;
      macs += f(iters, &s);
      if (s == Sink(12345)) std::printf(" ");
    }
    double dt = now() - t0;
    if (g_cpu_time) dt /= threads;  // CPU seconds of all threads -> seconds of one
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
  g_cpu_time = std::getenv("RAAD_PEAK_CPU_TIME") != nullptr;
  const int all = omp_get_max_threads();
  std::printf("| ceiling | threads | value |\n|---|---|---|\n");
  for (int t : {1, all}) {
    std::printf("| int8 MAC, sign+vpmaddubsw+vpmaddwd (int8 Q.K)   | %3d | %8.1f GMAC/s |\n", t, rate(k_i8_maddubs, t) / 1e9);
    std::printf("| int16 MAC, vpmaddwd+vpaddd                       | %3d | %8.1f GMAC/s |\n", t, rate(k_i16_madd, t) / 1e9);
    std::printf("| int8 MAC, vpmaddubsw+vpaddw (int4/int2 Q.K)      | %3d | %8.1f GMAC/s |\n", t, rate(k_i8_maddubs_acc16, t) / 1e9);
    std::printf("| fp32 FMA MAC, vfmadd231ps                        | %3d | %8.1f GMAC/s |\n", t, rate(k_f32_fma, t) / 1e9);
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) {
      std::printf("| int8 MAC, vpdpbusd zmm (avx512 int8 Q.K)         | %3d | %8.1f GMAC/s |\n", t, rate(k_i8_vnni, t) / 1e9);
      std::printf("| fp32 FMA MAC, vfmadd231ps zmm                    | %3d | %8.1f GMAC/s |\n", t, rate(k_f32_fma512, t) / 1e9);
    }
    if (t == all) bandwidth(t);
    if (all == 1) break;
  }
  return 0;
}
