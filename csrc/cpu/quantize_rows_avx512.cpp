// quantize_rows for CPUs with AVX512 (this file gets that ISA's flags; see setup.py).
#include "cpu/quantize.h"
#include "cpu/quantize_rows.h"

#define QUANTIZE_ROWS_NAME quantize_rows_avx512
#include "cpu/quantize_rows_impl.h"
