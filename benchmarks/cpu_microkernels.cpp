// The AVX2 micro-kernels of the CPU backend alone, on L1-resident data (one thread), to compare
// with the ceilings of cpu_peak.cpp (benchmarks/CPU_NOTES.md). Includes the kernel source itself:
//   g++ -O3 -std=c++20 -mavx2 -mfma -mf16c -Icsrc benchmarks/cpu_microkernels.cpp -o /tmp/cpu_uk && /tmp/cpu_uk
#include <cstdio>
#include <cstdlib>
#include <ctime>

#include "../csrc/cpu/attention_avx2.cpp"

using namespace raad::cpu;

static double cpu_now() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

int main() {
  // Q·Kᵀ: 4 query rows × one 64-key block × 64 channels, the layouts of attention_internal.h
  // (random bytes: the speed does not depend on the values).
  Plan p{};
  p.dpad = 64;
  p.kgroup = 8;
  alignas(64) static uint8_t K[64 * 64];
  alignas(64) static int8_t q[32 * 64], qa[32 * 64];
  static float ks[64], S[4 * kKeyBlock], rs[32], bmax[4];
  static int32_t qsum[32];
  for (auto& x : K) x = uint8_t(std::rand() % 255);
  for (int i = 0; i < 32 * 64; ++i) {
    q[i] = int8_t(std::rand() % 15 - 7);
    qa[i] = int8_t(q[i] < 0 ? -q[i] : q[i]);
  }
  for (auto& x : ks) x = 1e-3f;
  for (auto& x : rs) x = 1.f;
  p.dp = 64;
  p.qrow = 64;
  for (int bits : {8, 4, 2, -2}) {  // -2: int2 on bit planes (popcnt)
    p.bits = bits < 0 ? 2 : bits;
    p.kplanes = bits < 0;
    p.plane_words = 1;
    p.qrow = bits < 0 ? 16 : 64;
    const long reps = 400000;
    const double t0 = cpu_now();
    for (long r = 0; r < reps; ++r)
      Avx2::qk(p, q + (r & 7) * 4 * p.qrow, qa + (r & 7) * 4 * 64, rs, qsum, K, 64, ks, S, bmax);
    const double dt = cpu_now() - t0;
    std::printf("| Q·Kᵀ int%d%s micro-kernel (4 rows × 64 keys × 64 channels) | %.1f GMAC/s, %.2f ns per pair |\n",
                p.bits, bits < 0 ? " bit-plane" : "", double(reps) * 4 * 64 * 64 / dt / 1e9,
                dt / (double(reps) * 4 * 64) * 1e9);
  }
  p.kplanes = false;
  // P·V over the nonzero keys of a 64-key block, 64 channels (fp32 FMA)
  alignas(64) static float V[64 * 64], o[64], P[64];
  for (int i = 0; i < 64 * 64; ++i) V[i] = float(i % 37 - 18);
  for (int i = 0; i < 64; ++i) P[i] = float(i % 5 + 1);
  for (uint64_t mask : {~0ull, 0x5555555555555555ull, 0x1111111111111111ull}) {
    const long reps = 2000000;
    const double t0 = cpu_now();
    for (long r = 0; r < reps; ++r) pv_sparse_row(P, mask, V, 64, o, 0.999f);
    const double dt = cpu_now() - t0;
    const int n = __builtin_popcountll(mask);
    std::printf("| P·V fp32 over %2d of 64 keys × 64 channels | %.1f GMAC/s |\n", n, double(reps) * n * 64 / dt / 1e9);
  }
  // online softmax of one row of a block (64 keys, 8-bit P mode, no maps)
  {
    alignas(64) static float Sx[16][64], Pv[64];
    alignas(64) static uint8_t P8[64];
    for (int r = 0; r < 16; ++r)
      for (int j = 0; j < 64; ++j) Sx[r][j] = -float((r * 64 + j) * 7919 % 1000) / 80.f;
    float m, l, t = 0, al;
    uint64_t nz = 0, acc = 0;
    const long reps = 2000000;
    const double t0 = cpu_now();
    for (long r = 0; r < reps; ++r) {
      m = -1e30f;
      l = 0;
      softmax_row<false, false, 3>(Sx[r & 15], 64, 0.f, m, l, t, P8, Pv, &nz, nullptr, nullptr, al);
      acc += nz & 1;
      __asm__ volatile("" ::"r"(nz), "x"(l) : "memory");
    }
    const double dt = cpu_now() - t0;
    std::printf("| online softmax + 8-bit P + nonzero mask | %.2f ns per query-key pair |\n",
                dt / (double(reps) * 64) * 1e9);
    if (acc == 12345 && l == 1.f) std::printf("%f\n", o[0]);  // keep the results alive
  }
  // per-row quantization (rotation + scale search + codes) of a 64-channel row, as prep and the
  // Q tiles do it: ns per row (the kernel's per-row overhead, significant at N = 257)
  {
    alignas(64) static float X[64 * 64], row[128];
    alignas(64) static int8_t codes[256];
    for (int i = 0; i < 64 * 64; ++i) X[i] = float((i * 7919) % 2000 - 1000) / 300.f;
    View4 t;
    t.data = X;
    t.dtype = DType::F32;
    t.stride[2] = 64;
    t.stride[3] = 1;
    for (int bits : {8, 4, 2}) {
      Plan pq{};
      pq.D = pq.Dv = 64;
      pq.dp = pq.dpad = 64;
      pq.bits = bits;
      pq.rotate = bits < 8;
      const long reps = 400000;
      float acc = 0;
      const double t0 = cpu_now();
      for (long r = 0; r < reps; ++r) acc += prepare_qk_row(t, pq, 0, 0, r & 63, nullptr, row, codes);
      const double dt = cpu_now() - t0;
      std::printf("| quantize one 64-channel row at %d bits (%s) | %.0f ns per row |%s\n", bits,
                  bits < 8 ? "Hadamard, 9-candidate clipping search" : "absmax", dt / double(reps) * 1e9,
                  acc == 1.f ? " " : "");
    }
  }
  return 0;
}
