#include "cpu/cpu_features.h"

#include <cpuid.h>
#include <cstdlib>
#include <cstring>
#include <mutex>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace raad {
namespace {

unsigned long long xgetbv0() {
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned int a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  f.popcnt = c & (1u << 23);
  {
    unsigned int va = 0, vb = 0, vc = 0, vd = 0;
    __get_cpuid(0, &va, &vb, &vc, &vd);
    const bool amd = vb == 0x68747541u && vd == 0x69746e65u && vc == 0x444d4163u;  // "AuthenticAMD"
    const bool hygon = vb == 0x6f677948u && vd == 0x6e65476eu && vc == 0x656e6975u;  // "HygonGenuine"
    const unsigned family = ((a >> 8) & 0xf) + (((a >> 8) & 0xf) == 0xf ? ((a >> 20) & 0xff) : 0);
    f.fast_popcnt = f.popcnt && (amd || hygon) && family >= 0x17;
  }
  const bool avx = c & (1u << 28);
  if (osxsave && avx) {
    const auto xcr0 = xgetbv0();
    f.os_avx = (xcr0 & 0x6) == 0x6;                 // XMM and YMM state
    f.os_avx512 = f.os_avx && (xcr0 & 0xE0) == 0xE0;  // opmask, ZMM_Hi256, Hi16_ZMM
    f.os_amx = (xcr0 & (3ull << 17)) == (3ull << 17);  // XTILECFG, XTILEDATA
  }
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = f.os_avx && (b & (1u << 5));
  f.avx512f = f.os_avx512 && (b & (1u << 16));
  f.avx512dq = f.os_avx512 && (b & (1u << 17));
  f.avx512bw = f.os_avx512 && (b & (1u << 30));
  f.avx512vl = f.os_avx512 && (b & (1u << 31));
  f.avx512vnni = f.os_avx512 && (c & (1u << 11));
  f.amx_bf16 = f.os_amx && (d & (1u << 22));
  f.amx_tile = f.os_amx && (d & (1u << 24));
  f.amx_int8 = f.os_amx && (d & (1u << 25));
  __cpuid_count(7, 1, a, b, c, d);
  f.avx512bf16 = f.os_avx512 && (a & (1u << 5));
#ifdef RAAD_SIMDE_AVX512  // test build: the AVX-512 kernels run emulated (csrc/cpu/emu/)
  f.os_avx512 = f.avx512f = f.avx512dq = f.avx512bw = f.avx512vl = f.avx512vnni = true;
#endif
  return f;
}

CpuIsa best_isa(const CpuFeatures& f) {
  const bool avx512 = f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512vnni && f.fma && f.f16c;
  if (avx512 && f.amx_tile && f.amx_int8 && request_amx_permission()) return CpuIsa::Amx;
  if (avx512) return CpuIsa::Avx512Vnni;
  if (f.avx2 && f.fma && f.f16c) return CpuIsa::Avx2;
  return CpuIsa::Portable;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

bool request_amx_permission() {
#if defined(__linux__)
  static int granted = -1;
  static std::mutex m;
  std::lock_guard<std::mutex> lock(m);
  if (granted < 0) {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023;
    constexpr long XFEATURE_XTILEDATA = 18;
    granted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : 0;
  }
  return granted == 1;
#else
  return false;
#endif
}

CpuIsa best_isa() {
  static const CpuIsa best = best_isa(cpu_features());
  return best;
}

CpuIsa active_isa() {
  CpuIsa best = best_isa();
  const char* env = std::getenv("RAAD_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  CpuIsa want = best;
  if (!std::strcmp(env, "portable")) want = CpuIsa::Portable;
  else if (!std::strcmp(env, "avx2")) want = CpuIsa::Avx2;
  else if (!std::strcmp(env, "avx512")) want = CpuIsa::Avx512Vnni;
  else if (!std::strcmp(env, "amx")) want = CpuIsa::Amx;
  // Never above what the CPU has: forcing only ever selects a slower, supported path.
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Amx: return "amx";
    case CpuIsa::Avx512Vnni: return "avx512";
    case CpuIsa::Avx2: return "avx2";
    default: return "portable";
  }
}

}  // namespace raad
