// Dispatcher of the CPU attention: plans the layouts, allocates the work buffers (all O(B·H·N),
// never N×N), runs the three OpenMP phases on the kernels of the chosen ISA, reduces the
// `received` partials. Compiled without ISA flags; it only calls ISA code through the kernel
// tables, and only for an ISA the caller checked against raad::active_isa().
#include "cpu/attention.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "cpu/attention_internal.h"
#include "cpu/quantize.h"  // portable copies of the layout decoders (test hook only)

namespace raad::cpu {
namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }
int next_pow2(int64_t d) {
  int p = 1;
  while (p < d) p <<= 1;
  return p;
}

const Kernels& kernels_for(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Amx: return kernels_amx();
    case CpuIsa::Avx512Vnni: return kernels_avx512();
    case CpuIsa::Avx2: return kernels_avx2();
    default: return kernels_portable();
  }
}

// int2 Q·Kᵀ on bit planes where the kernels can, scalar popcnt is fast (AMD Zen) and the head
// dim is at least 64 (at dpad <= 32 the packed vpmaddubsw form measured faster here), unless
// RAAD_CPU_INT2=packed; RAAD_CPU_INT2=planes forces them at any head dim on any CPU with popcnt
// whose kernels have them (tests). Read per call.
bool want_int2_planes(const Kernels& K, int dpad) {
  if (!K.int2_planes || dpad > 2048 || !raad::cpu_features().popcnt) return false;
  const char* env = std::getenv("RAAD_CPU_INT2");
  if (env && std::strcmp(env, "packed") == 0) return false;
  if (env && std::strcmp(env, "planes") == 0) return true;
  return raad::cpu_features().fast_popcnt && dpad >= 64;
}

Plan make_plan(const AttentionArgs& a, const Kernels& K) {
  Plan p{};
  p.B = a.B; p.H = a.H; p.BH = a.B * a.H; p.Nq = a.Nq; p.Nk = a.Nk; p.D = a.D; p.Dv = a.Dv;
  p.bits = a.qk_bits; p.pv_bits = a.pv_bits; p.scale = a.scale;
  p.smooth = a.smooth_k; p.rotate = a.rotate;
  p.want_cls = a.cls != nullptr;
  p.want_recv = a.received != nullptr;
  p.want_ent = a.entropy != nullptr;
  p.want_cache = p.want_cls || p.want_recv;
  p.v_float = K.v_float && a.pv_bits == 8;
  p.dp = a.rotate ? next_pow2(a.D) : int(a.D);
  p.dpad = int(round_up(round_up(p.dp, p.bits == 8 ? 4 : (p.bits == 4 ? 8 : 16)), K.dpad_align));
  p.kgroup = K.kgroup;
  p.kchunk = K.kchunk;
  p.dvp = int(round_up(a.Dv, K.dv_align));
  p.nkp = round_up(a.Nk, K.kchunk);
  p.nkb = ceil_div(a.Nk, kKeyBlock);
  p.ntiles = ceil_div(a.Nq, kQueryTile);
  p.kplanes = p.bits == 2 && want_int2_planes(K, p.dpad);
  p.plane_words = p.dpad <= 32 ? 0 : int(ceil_div(p.dpad, 64));
  p.qrow = p.kplanes ? 16 * std::max(1, p.plane_words) : p.dpad;
  p.kq_stride = round_up(p.kplanes ? p.nkp * plane_bytes(p) : p.nkp * p.dpad * p.bits / 8, 64);
  p.v_stride = round_up(p.nkp * p.dvp, 64);
  p.cache_row = p.nkb * kKeyBlock;
  const bool out_strided = a.out_stride[0] != 0 || a.out_stride[1] != 0 || a.out_stride[2] != 0;
  p.out_sb = out_strided ? a.out_stride[0] : a.H * a.Nq * a.Dv;
  p.out_sh = out_strided ? a.out_stride[1] : a.Nq * a.Dv;
  p.out_sn = out_strided ? a.out_stride[2] : a.Dv;

  size_t off = 0;
  auto take = [&off](size_t bytes) {
    const size_t o = off;
    off += (bytes + 63) / 64 * 64;
    return o;
  };
  const size_t QT = kQueryTile;
  const int64_t dmax = std::max<int64_t>({int64_t(p.dp), a.D, a.Dv});
  p.off_qc = take(QT * std::max(p.dpad, p.qrow));
  p.off_qa = take(QT * p.dpad);
  p.off_rs = take(QT * 4);
  p.off_qsum = take(QT * 4);
  p.off_row = take(size_t(dmax + 16) * 4 + 2 * size_t(p.dpad) + 64);  // a row, then 2 × dpad code bytes
  // scores of a row group (AMX: of the whole tile), and the P operand of a row (AMX: of the tile)
  p.off_S = take(QT * kKeyBlock * 4 + 256);
  p.off_P = take(std::max(size_t(kKeyBlock) * 12 + 512, QT * kKeyBlock));  // u8 codes, or floats + indices
  p.off_bias = take(size_t(kKeyBlock) * 4);
  p.off_outf = take(QT * p.dvp * 4);
  p.off_m = take(QT * 4);
  p.off_l = take(QT * 4);
  p.off_t = take(QT * 4);
  p.off_stamp = take(p.want_cache ? QT * p.nkb * 4 : 0);
  p.off_cache = take(p.want_cache ? QT * p.cache_row * K.cache_elem_bytes : 0);
  p.off_kun = take(size_t(kKeyBlock) * p.dpad);
  // Phases A and B use the start of the same area (doubles + a row; a row + its codes).
  const size_t stats_bytes = size_t(dmax) * 8 + 3 * size_t(dmax) * 4 + 64;
  const size_t prep_bytes = size_t(dmax + 16) * 4 + size_t(std::max<int64_t>(p.dpad, dmax)) + 64;
  p.scratch_bytes = std::max({off, stats_bytes, prep_bytes});
  return p;
}

struct AlignedFree {
  void operator()(void* ptr) const { std::free(ptr); }
};
using Buffer = std::unique_ptr<uint8_t, AlignedFree>;

Buffer alloc(size_t bytes) {
  bytes = (bytes + 63) / 64 * 64;
  void* ptr = std::aligned_alloc(64, bytes ? bytes : 64);
  if (!ptr) throw std::bad_alloc();
  return Buffer(static_cast<uint8_t*>(ptr));
}

// The work buffers of a call live in one workspace per calling thread, kept between calls: a
// fresh allocation of this size would be mapped anew each call (a page fault and a zeroing per
// 4 KiB page, measurable at ViT sizes). Workspaces over 256 MiB are released after the call.
struct Workspace {
  uint8_t* ptr = nullptr;
  size_t cap = 0;
  ~Workspace() { std::free(ptr); }
  uint8_t* get(size_t bytes) {
    if (bytes > cap) {
      std::free(ptr);
      ptr = nullptr;
      cap = 0;
      void* q = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
      if (!q) throw std::bad_alloc();
      ptr = static_cast<uint8_t*>(q);
      cap = bytes;
    }
    return ptr;
  }
  void trim() {
    if (cap > (size_t(256) << 20)) {
      std::free(ptr);
      ptr = nullptr;
      cap = 0;
    }
  }
};

struct Carver {
  size_t off = 0;
  size_t take(size_t bytes) {
    const size_t o = off;
    off += (bytes + 63) / 64 * 64;
    return o;
  }
};

void run(const AttentionArgs& a, const Kernels& K) {
  const Plan p = make_plan(a, K);
  const int T = std::max(1, a.num_threads);

  // The query tiles are cut into S slots of consecutive tiles; threads take slots dynamically
  // (load balance, also on a shared machine), and each slot runs its tiles in order into its own
  // `received` partials, summed in slot order at the end: the result does not depend on which
  // thread ran what, nor on the thread count as long as S does not (S = 64 up to 16 threads).
  const int64_t items = p.BH * p.ntiles;
  const int64_t S = std::min<int64_t>(items, std::max<int64_t>(64, 4 * int64_t(T)));
  std::vector<int64_t> lo(S), hi(S), bh0(S), roff(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) {
    lo[s] = items * s / S;
    hi[s] = items * (s + 1) / S;
    bh0[s] = lo[s] / p.ntiles;
    const int64_t nbh = hi[s] > lo[s] ? (hi[s] - 1) / p.ntiles - bh0[s] + 1 : 0;
    roff[s + 1] = roff[s] + nbh * p.Nk;
  }

  // Work buffers (all O(B·H·N)): quantized K and V of every (b, h), built once and shared by all
  // query tiles; the received partials; one scratch area per thread.
  const bool int_v = p.pv_bits == 8 && !p.v_float;
  Carver c;
  const size_t o_kq = c.take(size_t(p.BH) * p.kq_stride);
  const size_t o_ks = c.take(size_t(p.BH) * p.nkp * 4);
  const size_t o_kmean = c.take(p.smooth ? size_t(p.BH) * p.D * 4 : 0);
  const size_t o_vmean = c.take(p.pv_bits == 8 ? size_t(p.BH) * p.Dv * 4 : 0);
  const size_t o_vscale = c.take(p.pv_bits == 8 ? size_t(p.BH) * p.Dv * 4 : 0);
  const size_t o_vq = c.take(int_v ? size_t(p.BH) * p.v_stride : 0);
  const size_t o_vh = c.take(int_v ? 0 : size_t(p.BH) * p.v_stride * 4);
  const size_t o_recv = c.take(p.want_recv ? size_t(roff[S]) * 4 : 0);
  const size_t o_scr = c.take(size_t(T) * p.scratch_bytes);
  thread_local Workspace ws;
  uint8_t* base = ws.get(c.off);
  if (p.want_recv) std::memset(base + o_recv, 0, size_t(roff[S]) * 4);
  uint8_t* scratch = base + o_scr;

  Work w{};
  w.kq = base + o_kq;
  w.ks = reinterpret_cast<float*>(base + o_ks);
  w.kmean = reinterpret_cast<float*>(base + o_kmean);
  w.vq = reinterpret_cast<int8_t*>(base + o_vq);
  w.vh = reinterpret_cast<float*>(base + o_vh);
  w.vmean = reinterpret_cast<float*>(base + o_vmean);
  w.vscale = reinterpret_cast<float*>(base + o_vscale);
  w.recv = reinterpret_cast<float*>(base + o_recv);
  w.recv_off = roff.data();
  w.recv_bh0 = bh0.data();

  const int64_t nprep = p.BH * p.nkb;
  // One work list, handed out in order (an atomic counter): the statistics of every (b, h), then the
  // K/V quantization of every key block, then the query-tile slots. An item waits only for items
  // handed out before it (its (b, h)'s statistics, resp. all of its key blocks), which threads
  // are already running, so it cannot deadlock; and there is no barrier between the phases: on
  // a shared machine a barrier costs a whole scheduler time slice whenever one thread is
  // descheduled (measured: 4-8 ms per phase with 2 threads on a loaded 2-vCPU machine).
  std::unique_ptr<std::atomic<int>[]> stats_done(new std::atomic<int>[size_t(p.BH)]);
  std::unique_ptr<std::atomic<int>[]> prep_done(new std::atomic<int>[size_t(p.BH)]);
  for (int64_t bh = 0; bh < p.BH; ++bh) {
    stats_done[bh].store(0, std::memory_order_relaxed);
    prep_done[bh].store(0, std::memory_order_relaxed);
  }
  auto wait_for = [](const std::atomic<int>& flag, int value) {
    while (flag.load(std::memory_order_acquire) < value) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
  };
  const int64_t nitems = p.BH + nprep + S;
  // RAAD_CPU_PROFILE=1 prints the wall time of the call to stderr (a development aid).
  static const bool prof = std::getenv("RAAD_CPU_PROFILE") != nullptr;
  const double t0 = omp_get_wtime();
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(T)
  {
    const int tid = omp_get_thread_num();
    uint8_t* scr = scratch + size_t(tid) * p.scratch_bytes;
    for (int64_t item; (item = next.fetch_add(1, std::memory_order_relaxed)) < nitems;) {
      if (item < p.BH) {
        K.stats(a, p, w, item, scr);
        stats_done[item].store(1, std::memory_order_release);
      } else if (item < p.BH + nprep) {
        const int64_t it = item - p.BH, bh = it / p.nkb;
        wait_for(stats_done[bh], 1);
        K.prep(a, p, w, bh, it % p.nkb, scr);
        prep_done[bh].fetch_add(1, std::memory_order_acq_rel);
      } else {
        const int64_t s = item - p.BH - nprep;
        for (int64_t it = lo[s]; it < hi[s]; ++it) {
          const int64_t bh = it / p.ntiles;
          wait_for(prep_done[bh], int(p.nkb));
          K.tile(a, p, w, bh, it % p.ntiles, s, scr);
        }
      }
    }
  }
  if (prof) std::fprintf(stderr, "raad cpu [%s]: %.3f ms\n", K.name, (omp_get_wtime() - t0) * 1e3);

  if (p.want_recv) {
    const double inv = 1.0 / double(p.Nq);
#pragma omp parallel for num_threads(T) schedule(static)
    for (int64_t bh = 0; bh < p.BH; ++bh) {
      float* dst = a.received + bh * p.Nk;
      std::vector<const float*> parts;
      for (int64_t s = 0; s < S; ++s) {
        if (hi[s] <= lo[s]) continue;
        const int64_t last = (hi[s] - 1) / p.ntiles;
        if (bh >= bh0[s] && bh <= last) parts.push_back(w.recv + roff[s] + (bh - bh0[s]) * p.Nk);
      }
      for (int64_t j = 0; j < p.Nk; ++j) {
        double acc = 0.0;
        for (const float* part : parts) acc += double(part[j]);
        dst[j] = float(acc * inv);
      }
    }
  }
  ws.trim();
}

// ---------------------------------------------------------------------------------------------
// Self-check of a vector path against the portable one (run before AVX-512 is first trusted).
// ---------------------------------------------------------------------------------------------

double rel_diff(const std::vector<float>& x, const std::vector<float>& y) {
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double d = double(x[i]) - double(y[i]);
    num += d * d;
    den += double(y[i]) * double(y[i]);
    if (!std::isfinite(x[i])) return 1e30;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

std::string check_case(CpuIsa isa, int bits, int pvb, int64_t D, int64_t Nq, int64_t Nk, bool masked) {
  const int64_t B = 1, H = 2, Dv = D;
  std::mt19937 rng(1234 + bits * 7 + pvb + int(D));
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> q(B * H * Nq * D), k(B * H * Nk * D), v(B * H * Nk * Dv);
  for (auto& x : q) x = nd(rng) * 0.4f;
  for (size_t i = 0; i < k.size(); ++i) k[i] = nd(rng) + 3.f * float((i % D) % 5 == 0);  // offset channels
  for (auto& x : v) x = nd(rng);
  std::vector<uint8_t> mask(Nq * Nk);
  for (int64_t i = 0; i < Nq; ++i)
    for (int64_t j = 0; j < Nk; ++j) mask[i * Nk + j] = uint8_t(i == 3 ? 0 : ((i + j) % 7 != 0));
  auto view = [](const float* d, int64_t h, int64_t n, int64_t dim) {
    View4 t;
    t.data = d;
    t.dtype = DType::F32;
    t.stride[0] = h * n * dim; t.stride[1] = n * dim; t.stride[2] = dim; t.stride[3] = 1;
    return t;
  };
  std::vector<float> out[2], cls[2], rec[2], ent[2];
  for (int which = 0; which < 2; ++which) {
    out[which].assign(B * H * Nq * Dv, NAN);
    cls[which].assign(B * H * Nk, NAN);
    rec[which].assign(B * H * Nk, NAN);
    ent[which].assign(B * H * Nq, NAN);
    AttentionArgs a;
    a.q = view(q.data(), H, Nq, D);
    a.k = view(k.data(), H, Nk, D);
    a.v = view(v.data(), H, Nk, Dv);
    if (masked) {
      a.mask.data = mask.data();
      a.mask.dtype = DType::Bool;
      a.mask.stride[2] = Nk;
      a.mask.stride[3] = 1;
    }
    a.out = out[which].data();
    a.B = B; a.H = H; a.Nq = Nq; a.Nk = Nk; a.D = D; a.Dv = Dv;
    a.qk_bits = bits; a.pv_bits = pvb;
    a.scale = float(1.0 / std::sqrt(double(D)));
    a.smooth_k = true;
    a.rotate = bits < 8;
    a.cls = cls[which].data();
    a.received = rec[which].data();
    a.entropy = ent[which].data();
    a.num_threads = 1;
    run(a, kernels_for(which == 0 ? CpuIsa::Portable : isa));
  }
  const double tol = 2e-3;
  const double e[4] = {rel_diff(out[1], out[0]), rel_diff(cls[1], cls[0]), rel_diff(rec[1], rec[0]),
                       rel_diff(ent[1], ent[0])};
  const char* names[4] = {"out", "cls", "received", "entropy"};
  for (int i = 0; i < 4; ++i)
    if (!(e[i] <= tol))
      return std::string(isa_name(isa)) + " kernels disagree with the portable ones (qk_bits=" +
             std::to_string(bits) + ", pv_bits=" + std::to_string(pvb) + ", D=" + std::to_string(D) +
             (masked ? ", masked" : "") + "): " + names[i] + " relative difference " + std::to_string(e[i]);
  return "";
}

}  // namespace

std::string self_check(CpuIsa isa) {
  for (int bits : {8, 4, 2})
    for (int pvb : {8, 16})
      for (int64_t D : {int64_t(64), int64_t(40)}) {
        std::string err = check_case(isa, bits, pvb, D, 37, 150, D == 40);
        if (!err.empty()) return err;
      }
  return "";
}

// Whether `isa`'s kernels passed the self-check (run once per process and ISA).
bool passes_self_check(CpuIsa isa) {
  static std::once_flag once[2];
  static bool ok[2] = {true, true};
  const int i = isa == CpuIsa::Amx ? 1 : 0;
  std::call_once(once[i], [isa, i] { ok[i] = self_check(isa).empty(); });
  return ok[i];
}

CpuIsa kernel_isa(CpuIsa isa) {
  // a vector path that disagrees with the portable kernels falls back one step: AMX to AVX-512
  // VNNI, AVX-512 VNNI to AVX2
  if (isa == CpuIsa::Amx && !passes_self_check(isa)) isa = CpuIsa::Avx512Vnni;
  if (isa == CpuIsa::Avx512Vnni && !passes_self_check(isa)) return CpuIsa::Avx2;
  return isa;
}

void attention(const AttentionArgs& args, CpuIsa isa) { run(args, kernels_for(kernel_isa(isa))); }

int64_t padded_head_dim(int64_t D, bool rotate) { return rotate ? next_pow2(D) : D; }

void quantize_qk_debug(const AttentionArgs& a, CpuIsa isa, int8_t* q_codes, float* q_scale, int8_t* k_codes,
                       float* k_scale) {
  const Kernels& K = kernels_for(kernel_isa(isa));
  AttentionArgs args = a;
  args.pv_bits = 16;  // V is not needed: the cheap path
  const Plan p = make_plan(args, K);
  Buffer kq = alloc(size_t(p.BH) * p.kq_stride);
  Buffer ks = alloc(size_t(p.BH) * p.nkp * 4);
  Buffer kmean = alloc(p.smooth ? size_t(p.BH) * p.D * 4 : 0);
  Buffer vh = alloc(size_t(p.BH) * p.v_stride * 4);
  Buffer scratch = alloc(p.scratch_bytes);
  Work w{};
  w.kq = kq.get();
  w.ks = reinterpret_cast<float*>(ks.get());
  w.kmean = reinterpret_cast<float*>(kmean.get());
  w.vh = reinterpret_cast<float*>(vh.get());
  for (int64_t bh = 0; bh < p.BH; ++bh) {
    K.stats(args, p, w, bh, scratch.get());
    for (int64_t kb = 0; kb < p.nkb; ++kb) K.prep(args, p, w, bh, kb, scratch.get());
    for (int64_t j = 0; j < p.Nk; ++j) {
      k_scale[bh * p.Nk + j] = w.ks[bh * p.nkp + j];
      for (int c = 0; c < p.dp; ++c) k_codes[(bh * p.Nk + j) * p.dp + c] = int8_t(k_code(w.kq + bh * p.kq_stride, p, j, c));
    }
    float* row = reinterpret_cast<float*>(scratch.get());
    std::vector<int8_t> codes(p.dpad);
    for (int64_t i = 0; i < p.Nq; ++i) {
      q_scale[bh * p.Nq + i] = prepare_qk_row(args.q, p, bh / p.H, bh % p.H, i, nullptr, row, codes.data());
      std::memcpy(q_codes + (bh * p.Nq + i) * p.dp, codes.data(), p.dp);
    }
  }
}

}  // namespace raad::cpu
