// Emulated device primitives (RAAD_EMU): the same names and contracts as the inline-PTX ones in
// common.cuh, with the register fragment layouts of the PTX ISA (mma.sync m16n8k32 .s8/.u8,
// m16n8k64 .s4, m16n8k16 .f16/.bf16 with .row.col, ldmatrix .m8n8.x4.b16).
#pragma once

#include <atomic>
#include <cmath>
#include <cstring>

namespace raad {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------
inline float f16_bits_to_f32(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}
inline float bf16_bits_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_f16_bits(float x) {
  _Float16 v = static_cast<_Float16>(x);  // round to nearest even
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}
inline uint16_t f32_to_bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <int DT>
inline float load_f(const void* p, size_t i) {
  if constexpr (DT == kF32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (DT == kF16) {
    return f16_bits_to_f32(static_cast<const uint16_t*>(p)[i]);
  } else {
    return bf16_bits_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}
inline uint32_t pack_f16x2(float lo, float hi) {
  return static_cast<uint32_t>(f32_to_f16_bits(lo)) | (static_cast<uint32_t>(f32_to_f16_bits(hi)) << 16);
}
inline uint32_t pack_bf16x2(float lo, float hi) {
  return static_cast<uint32_t>(f32_to_bf16_bits(lo)) | (static_cast<uint32_t>(f32_to_bf16_bits(hi)) << 16);
}

// ---------------------------------------------------------------------------------------------
// Warp exchange
// ---------------------------------------------------------------------------------------------
template <typename T>
inline T shfl_xor(T v, int m) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  auto& w = raad_emu::warp();
  std::memcpy(w.slot[raad_emu::tl_lane], &v, sizeof(T));
  raad_emu::warp_sync();
  T r;
  std::memcpy(&r, w.slot[raad_emu::tl_lane ^ m], sizeof(T));
  raad_emu::warp_sync();
  return r;
}
template <typename T>
inline T shfl_down(T v, int m) {
  auto& w = raad_emu::warp();
  std::memcpy(w.slot[raad_emu::tl_lane], &v, sizeof(T));
  raad_emu::warp_sync();
  int src = raad_emu::tl_lane + m;
  T r = v;
  if (src < 32) std::memcpy(&r, w.slot[src], sizeof(T));
  raad_emu::warp_sync();
  return r;
}
inline void block_sync() { raad_emu::block_sync(); }

inline float div_rn(float a, float b) { return a / b; }
inline float sqrt_rn(float a) { return std::sqrt(a); }
inline float fast_exp2(float x) { return std::exp2(x); }
inline float fast_log2(float x) { return std::log2(x); }
inline uint32_t f2u_rn(float x) { return x <= 0.f ? 0u : static_cast<uint32_t>(std::nearbyint(x)); }
inline void atomic_add_f32(float* p, float v) { std::atomic_ref<float>(*p).fetch_add(v); }
inline float i2f_small(int i) {
  if (i >= (1 << 22) || i < -(1 << 22)) raad_emu::fail("i2f_small argument out of range");
  return static_cast<float>(i);
}
inline uint32_t pack_u8x4_255(float a, float b, float c, float d) {
  auto q = [](float p) {
    if (!(p >= 0.f && p <= 1.f)) raad_emu::fail("probability outside [0, 1]");
    return static_cast<uint32_t>(std::nearbyint(p * 255.f));
  };
  return q(a) | (q(b) << 8) | (q(c) << 16) | (q(d) << 24);
}

// ---------------------------------------------------------------------------------------------
// mma.sync: each lane deposits its fragments; each lane computes its own D elements.
// ---------------------------------------------------------------------------------------------
namespace emu_detail {

struct Frag {
  uint32_t a[4];
  uint32_t b[2];
  uint32_t c[4];
};

inline int sbyte(uint32_t w, int i) { return static_cast<int8_t>((w >> (8 * i)) & 0xff); }
inline int ubyte(uint32_t w, int i) { return static_cast<int>((w >> (8 * i)) & 0xff); }
inline int snib(uint32_t w, int i) {
  int v = static_cast<int>((w >> (4 * i)) & 0xf);
  return v >= 8 ? v - 16 : v;
}

// kind: 0 = s8·s8 (k32), 1 = u8·s8 (k32), 2 = s4·s4 (k64), 3 = f16 (k16), 4 = bf16 (k16)
template <int KIND>
inline void mma(uint32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const uint32_t (&c)[4]) {
  auto& w = raad_emu::warp();
  const int lane = raad_emu::tl_lane;
  Frag f;
  std::memcpy(f.a, a, 16);
  f.b[0] = b0;
  f.b[1] = b1;
  std::memcpy(f.c, c, 16);
  static_assert(sizeof(Frag) <= sizeof(w.slot[0]), "fragment fits the slot");
  std::memcpy(w.slot[lane], &f, sizeof(Frag));
  raad_emu::warp_sync();
  const Frag* all = reinterpret_cast<const Frag*>(&w.slot[0][0]);
  auto F = [&](int l) -> const Frag& {
    return *reinterpret_cast<const Frag*>(reinterpret_cast<const unsigned char*>(all) + l * sizeof(w.slot[0]));
  };
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1);
    const int col = 2 * t + (i & 1);
    if constexpr (KIND <= 2) {
      const int K = KIND == 2 ? 64 : 32;
      int64_t acc = static_cast<int32_t>(c[i]);
      for (int k = 0; k < K; ++k) {
        int av, bv;
        if constexpr (KIND == 2) {
          const Frag& fa = F((row % 8) * 4 + (k % 32) / 8);
          av = snib(fa.a[(row / 8) + 2 * (k / 32)], k % 8);
          const Frag& fb = F(col * 4 + (k % 32) / 8);
          bv = snib(fb.b[k / 32], k % 8);
        } else {
          const Frag& fa = F((row % 8) * 4 + (k % 16) / 4);
          uint32_t aw = fa.a[(row / 8) + 2 * (k / 16)];
          av = KIND == 1 ? ubyte(aw, k % 4) : sbyte(aw, k % 4);
          const Frag& fb = F(col * 4 + (k % 16) / 4);
          bv = sbyte(fb.b[k / 16], k % 4);
        }
        acc += static_cast<int64_t>(av) * bv;
      }
      d[i] = static_cast<uint32_t>(static_cast<int32_t>(acc));
    } else {
      float cf;
      std::memcpy(&cf, &c[i], 4);
      double acc = cf;
      for (int k = 0; k < 16; ++k) {
        const Frag& fa = F((row % 8) * 4 + (k % 8) / 2);
        uint32_t aw = fa.a[(row / 8) + 2 * (k / 8)];
        const Frag& fb = F(col * 4 + (k % 8) / 2);
        uint32_t bw = fb.b[k / 8];
        uint16_t ah = static_cast<uint16_t>(aw >> (16 * (k % 2)));
        uint16_t bh = static_cast<uint16_t>(bw >> (16 * (k % 2)));
        float av = KIND == 3 ? f16_bits_to_f32(ah) : bf16_bits_to_f32(ah);
        float bv = KIND == 3 ? f16_bits_to_f32(bh) : bf16_bits_to_f32(bh);
        acc += static_cast<double>(av) * bv;
      }
      float r = static_cast<float>(acc);
      std::memcpy(&d[i], &r, 4);
    }
  }
  raad_emu::warp_sync();
}

}  // namespace emu_detail

inline void mma_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint32_t c[4], o[4];
  std::memcpy(c, d, 16);
  emu_detail::mma<0>(o, a, b0, b1, c);
  std::memcpy(d, o, 16);
}
inline void mma_u8s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint32_t c[4], o[4];
  std::memcpy(c, d, 16);
  emu_detail::mma<1>(o, a, b0, b1, c);
  std::memcpy(d, o, 16);
}
inline void mma_s4(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if !RAAD_NATIVE_S4
  raad_emu::fail("mma_s4 called in a build without native int4 mma");
#endif
  uint32_t c[4], o[4];
  std::memcpy(c, d, 16);
  emu_detail::mma<2>(o, a, b0, b1, c);
  std::memcpy(d, o, 16);
}
inline void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint32_t c[4], o[4];
  std::memcpy(c, d, 16);
  emu_detail::mma<3>(o, a, b0, b1, c);
  std::memcpy(d, o, 16);
}
inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint32_t c[4], o[4];
  std::memcpy(c, d, 16);
  emu_detail::mma<4>(o, a, b0, b1, c);
  std::memcpy(d, o, 16);
}

inline void ldsm_x4(uint32_t (&r)[4], const void* smem_row) {
  auto& w = raad_emu::warp();
  const int lane = raad_emu::tl_lane;
  if (reinterpret_cast<uintptr_t>(smem_row) % 16) raad_emu::fail("ldmatrix row address not 16-byte aligned");
  raad_emu::check_smem(smem_row, 16, "ldmatrix row outside shared memory");
  w.ptr[lane] = static_cast<const unsigned char*>(smem_row);
  raad_emu::warp_sync();
  for (int i = 0; i < 4; ++i) std::memcpy(&r[i], w.ptr[8 * i + lane / 4] + 4 * (lane % 4), 4);
  raad_emu::warp_sync();
}

inline void cp_async16(void* smem, const void* gmem) {
  if (reinterpret_cast<uintptr_t>(smem) % 16 || reinterpret_cast<uintptr_t>(gmem) % 16)
    raad_emu::fail("cp.async addresses not 16-byte aligned");
  raad_emu::check_smem(smem, 16, "cp.async destination outside shared memory");
  std::memcpy(smem, gmem, 16);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

inline unsigned char* dyn_smem() { return raad_emu::tl_block->smem; }

}  // namespace cuda
}  // namespace raad
