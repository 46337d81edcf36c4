// Run-time CPU feature detection for the CPU backend's dispatch. No torch headers.
#pragma once
#include <string>

namespace raad {

enum class CpuIsa : int { Portable = 0, Avx2 = 1, Avx512Vnni = 2, Amx = 3 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512vnni = false;
  bool avx512bf16 = false, amx_tile = false, amx_int8 = false, amx_bf16 = false;
  bool os_avx = false, os_avx512 = false, os_amx = false;  // OS saves the register state
  bool popcnt = false;
  // Scalar popcnt with several execution ports (AMD Zen, family 0x17 and later: 4 per cycle;
  // Intel cores issue one per cycle): the AVX2 int2 Q·Kᵀ uses bit planes and popcnt there.
  bool fast_popcnt = false;
};

// What the running CPU (and OS) support, detected once.
const CpuFeatures& cpu_features();
// Best ISA the CPU supports, capped by the environment variable RAAD_CPU_ISA
// ("portable", "avx2", "avx512", "amx") when set; used to force and test the slower paths.
CpuIsa active_isa();
// Best ISA the CPU (and OS) support, ignoring RAAD_CPU_ISA.
CpuIsa best_isa();
const char* isa_name(CpuIsa isa);
// Linux needs AMX tile data permission requested per process (arch_prctl); true when granted.
bool request_amx_permission();

}  // namespace raad
