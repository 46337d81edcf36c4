// Shared types of the CPU attention kernels (types and constants only: every function lives in an
// anonymous namespace of its ISA's translation unit, so no code compiled with one ISA's flags can
// be picked by the linker for another).
//
// Memory layouts (per (b, h)):
//  * K codes, "blocked": groups of `kgroup` keys (8 for AVX2/portable, 16 for AVX-512); inside a
//    group, for each step of 4 channels, `kgroup` × 4 bytes (key-major, then the 4 channels):
//    the layout `vpdpbusd` and `vpmaddubsw` consume, so one vector holds kgroup keys × 4 channels.
//      int8: one signed code per byte;
//      int4: two's-complement nibbles, two steps per byte: steps 2s (low nibble) and 2s+1 (high);
//      int2: (code + 3) / 2 in 2 bits, four steps per byte: step 4s+t at bits 2t.
//    int2 as bit planes (Plan::kplanes; the AVX2 kernel on CPUs with fast scalar popcnt): the
//    code is c = 2A + B with A, B in {-1, +1}, stored as the bits a = (A > 0) = (c+3)/2 >> 1 and
//    b = (B > 0) = (c+3)/2 & 1 of each channel; key-major (no groups), per key either
//      plane_words = 0 (dpad <= 32): one uint64, a bits in bits 0..31, b bits in 32..63, or
//      plane_words = n: n uint64 of a bits then n of b bits (channel c at word c/64, bit c%64).
//    Padding channels (dp..) have a = b = 0 in Q and K, so a ±1 dot product over the dp real
//    channels is dp − 2·popcount(x ⊕ y) and q·k = 9·dp − (8 p_aa + 4 (p_ab + p_ba) + 2 p_bb)
//    with p_xy = popcount(x_q ⊕ y_k): exactly the integer of the packed path. Q rows use the same
//    form in the tile buffer (plane_words = 0: the word, then the word with its halves swapped).
//    Same encodings as quant.pack (little-endian within the byte); the element order is blocked.
//    The head dim is padded with zero codes to `dpad` (a multiple of 4, 8, 16 at 8, 4, 2 bits);
//    keys are padded to `nkp` (scale 0, masked to -inf in the kernel).
//    The AMX kernels read a K group's 16 steps of 64 channels as one 16×64-byte tile (int4 and
//    int2 unpacked to signed bytes per block first), so they pad the head dim to 64.
//  * K scales: float per key.
//  * V (pv_bits = 8), integer P·V kernels (portable, AVX-512): int8 codes, quads of keys
//    interleaved per channel: [nkp/4][dvp][4], so a vector is (channels × 4 keys) as `vpdpbusd`
//    wants (unsigned P codes of 4 keys × signed V); padded with zeros. For AMX, 16 quads of a
//    16-channel slice are one tile (row stride dvp · 4 bytes).
//  * V (pv_bits = 8), fp32-FMA P·V kernel (AVX2, `v_float`): the same int8 codes stored as exact
//    floats [nkp][dvp]: with P an integer in 0..255, every product and every block sum
//    (≤ 64 · 255 · 127 < 2^24) is exact, so the result equals the integer one.
//  * V (pv_bits = 16): the values rounded to the 16-bit operand type, stored as float [nkp][dvp].
#pragma once
#include <cstddef>
#include <cstdint>

#include "cpu/attention.h"

namespace raad::cpu {

constexpr int kKeyBlock = 64;    // keys per online-softmax step (32 or 64: P·V masks are 64-bit)
constexpr int kQueryTile = 32;   // queries per parallel work item (a multiple of kRowGroup)
constexpr int kRowGroup = 4;     // query rows sharing each K vector in the Q·Kᵀ micro-kernel
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Plan {
  // problem
  int64_t B, H, BH, Nq, Nk, D, Dv;
  int bits, pv_bits;
  float scale;
  bool smooth, rotate;
  bool want_cls, want_recv, want_ent, want_cache;
  bool v_float;     // pv8 V codes stored as floats (see the layouts above)
  bool kplanes;     // int2 K (and Q) codes as bit planes (see the layouts above)
  // layout
  int dp;           // head dim after rotation padding (= D without rotation)
  int dpad;         // dp padded for the K layout
  int kgroup;       // keys per K group
  int kchunk;       // keys per Q·Kᵀ chunk; nkp is a multiple of it
  int dvp;          // Dv padded to the V vector width
  int qrow;         // bytes of Q codes per row in the tile buffer (dpad; bit planes: plane_bytes)
  int plane_words;  // kplanes: 64-bit words per plane (0: both planes in one word, dpad <= 32)
  int64_t nkp;      // keys padded
  int64_t nkb;      // key blocks of kKeyBlock
  int64_t ntiles;   // query tiles per (b, h)
  int64_t kq_stride;  // bytes of K codes per (b, h)
  int64_t v_stride;   // elements of V (bytes for int8 codes, floats for pv16) per (b, h)
  int64_t cache_row;  // elements per row of the probability cache (nkb * kKeyBlock)
  int64_t out_sb, out_sh, out_sn;  // element strides of the output's (b, h, n) dims
  // per-thread scratch (byte offsets, 64-aligned)
  size_t off_qc, off_qa, off_rs, off_qsum, off_row, off_S, off_P, off_bias, off_outf, off_m,
      off_l, off_t, off_stamp, off_cache, off_kun, scratch_bytes;
};

struct Work {
  uint8_t* kq;      // [BH][kq_stride]
  float* ks;        // [BH][nkp]   K scales
  float* kmean;     // [BH][D]     (smoothing)
  int8_t* vq;       // [BH][v_stride]  pv8
  float* vh;        // [BH][v_stride]  pv16
  float* vmean;     // [BH][Dv]
  float* vscale;    // [BH][Dv]
  // received: partial sums per "slot" (a static share of the query tiles) over the (b, h) range
  // that slot touches; slot s covers (b, h) in [recv_bh0[s], ...) from float offset recv_off[s].
  float* recv;
  const int64_t* recv_off;
  const int64_t* recv_bh0;
};

struct Kernels {
  const char* name;
  int kgroup, kchunk, dv_align;
  int cache_elem_bytes;  // probability cache element: 2 (fp16) or 4 (fp32)
  bool v_float;          // P·V at 8 bits on float-stored codes (fp32 FMA) instead of int8 quads
  // Phase A: statistics of (b, h). scratch: per-thread area.
  void (*stats)(const AttentionArgs&, const Plan&, const Work&, int64_t bh, uint8_t* scratch);
  // Phase B: quantize keys [kb·kKeyBlock, ...) of (b, h) (K and V).
  void (*prep)(const AttentionArgs&, const Plan&, const Work&, int64_t bh, int64_t kb,
               uint8_t* scratch);
  // Phase C: the fused kernel of query tile qt of (b, h); `slot` indexes the received partials.
  void (*tile)(const AttentionArgs&, const Plan&, const Work&, int64_t bh, int64_t qt,
               int64_t slot, uint8_t* scratch);
  bool int2_planes = false;  // can run int2 Q·Kᵀ on bit planes (Plan::kplanes)
  int dpad_align = 1;        // the head dim padded to a multiple of this too (AMX: 64-byte tile rows)
};

const Kernels& kernels_portable();
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
const Kernels& kernels_amx();

}  // namespace raad::cpu
