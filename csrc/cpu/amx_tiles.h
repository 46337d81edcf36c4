// AMX tile configuration shared by the AMX translation units (include only from files compiled
// with the AMX flags: *_amx.cpp). Every tile used here is 16 rows × 64 bytes: int8 operands of
// 64 codes per row, or 16 int32 accumulators per row.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace raad::cpu {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// All 8 tiles 16 × 64 bytes. The configuration is per thread: call it in each thread that runs
// tile instructions, and _tile_release() when done.
inline void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

}  // namespace
}  // namespace raad::cpu
