// quantize_rows: the portable body and the dispatch (the vector bodies are in
// quantize_rows_avx2.cpp and quantize_rows_avx512.cpp, built with their ISA flags).
#include "cpu/attention.h"
#include "cpu/quantize.h"
#include "cpu/quantize_rows.h"

#define QUANTIZE_ROWS_NAME quantize_rows_portable
#include "cpu/quantize_rows_impl.h"

namespace raad::cpu {

void quantize_rows(const float* x, int64_t rows, int64_t n, int bits, int8_t* codes, float* scale, int threads,
                   CpuIsa isa) {
  // the attention kernels' choice (self-check fallbacks included); the AVX-512 pieces give the
  // AVX2 path's bits (test_vector_quantizers_give_the_same_bits), and AMX adds nothing to a row
  switch (kernel_isa(isa)) {
    case CpuIsa::Amx:
    case CpuIsa::Avx512Vnni: quantize_rows_avx512(x, rows, n, bits, codes, scale, threads); break;
    case CpuIsa::Avx2: quantize_rows_avx2(x, rows, n, bits, codes, scale, threads); break;
    default: quantize_rows_portable(x, rows, n, bits, codes, scale, threads);
  }
}

}  // namespace raad::cpu
