// quantize_rows: the portable body and the dispatch (the vector bodies are in
// quantize_rows_avx2.cpp and quantize_rows_avx512.cpp, built with their ISA flags).
#include "cpu/quantize.h"
#include "cpu/quantize_rows.h"

#define QUANTIZE_ROWS_NAME quantize_rows_portable
#include "cpu/quantize_rows_impl.h"

namespace raad::cpu {

void quantize_rows(const float* x, int64_t rows, int64_t n, int bits, int8_t* codes, float* scale, int threads,
                   CpuIsa isa) {
  // the AVX-512 pieces give the AVX2 path's bits (test_vector_quantizers_give_the_same_bits); AMX
  // adds nothing to a row quantizer
  const int want = std::min(static_cast<int>(isa), static_cast<int>(best_isa()));
  if (want >= static_cast<int>(CpuIsa::Avx512Vnni))
    quantize_rows_avx512(x, rows, n, bits, codes, scale, threads);
  else if (want >= static_cast<int>(CpuIsa::Avx2))
    quantize_rows_avx2(x, rows, n, bits, codes, scale, threads);
  else
    quantize_rows_portable(x, rows, n, bits, codes, scale, threads);
}

}  // namespace raad::cpu
