// The body of quantize_rows_<isa> (quantize_rows.h): included once per ISA translation unit,
// after quantize.h, with QUANTIZE_ROWS_NAME set to the function to define.
#include <omp.h>

#include <algorithm>

namespace raad::cpu {

void QUANTIZE_ROWS_NAME(const float* x, int64_t rows, int64_t n, int bits, int8_t* codes, float* scale,
                        int threads) {
#pragma omp parallel for num_threads(std::max(1, threads)) schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    scale[r] = quantize_row(x + r * n, int(n), bits, codes + r * n);
}

}  // namespace raad::cpu
