// Host emulator of the CUDA execution model used by raad-kernels' kernels (RAAD_EMU builds).
//
// Every thread block runs as blockDim std::threads sharing one dynamic shared-memory buffer;
// __syncthreads is a std::barrier over the block, warp collectives (shuffles, mma.sync,
// ldmatrix) exchange values through a per-warp buffer between two warp barriers. The
// primitives in emu_prims.h implement the PTX fragment layouts of mma.sync / ldmatrix, so the
// kernels' index arithmetic and data layouts are checked against a plain reference on a CPU.
// What it cannot check: speed, memory-model races, and the hardware's own reading of the PTX.
#pragma once

#include <atomic>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct raad_emu_uint3 {
  unsigned x, y, z;
};

inline thread_local raad_emu_uint3 threadIdx;
inline thread_local raad_emu_uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// Minimal runtime API surface used by the launchers and the binding.
typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorLaunchFailure = 719;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace raad_emu {

struct Warp {
  std::barrier<> bar{32};
  alignas(16) uint64_t slot[32][8];
  const unsigned char* ptr[32];
};

struct Block {
  explicit Block(int nthreads, size_t smem_bytes) : bar(nthreads), smem_size(smem_bytes) {
    size_t n = (smem_bytes + 127) / 128 * 128;
    smem = static_cast<unsigned char*>(std::aligned_alloc(128, n ? n : 128));
    // Fill with a pattern so reads of never-written shared memory give garbage, not zeros.
    std::memset(smem, 0xA5, n ? n : 128);
    for (int w = 0; w < (nthreads + 31) / 32; ++w) warps.emplace_back(new Warp());
  }
  ~Block() { std::free(smem); }
  std::barrier<> bar;
  unsigned char* smem;
  size_t smem_size;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block* tl_block = nullptr;
inline thread_local int tl_lane = 0;
inline thread_local int tl_warp = 0;
inline std::atomic<int> g_error{0};
inline std::mutex g_err_mutex;
inline std::string g_err_msg;

inline void fail(const char* what) {
  std::lock_guard<std::mutex> lk(g_err_mutex);
  if (!g_error.exchange(1)) g_err_msg = what;
  std::fprintf(stderr, "raad emu error: %s\n", what);
  std::abort();  // a kernel bug: stop here rather than deadlock on a barrier
}

inline Warp& warp() { return *tl_block->warps[tl_warp]; }
inline void warp_sync() { warp().bar.arrive_and_wait(); }
inline void block_sync() { tl_block->bar.arrive_and_wait(); }

inline void check_smem(const void* p, size_t bytes, const char* what) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < tl_block->smem || c + bytes > tl_block->smem + tl_block->smem_size) fail(what);
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args... args) {
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (nthreads % 32 != 0) fail("block size must be a multiple of 32 in the emulator");
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(nthreads, smem);
        std::vector<std::thread> ts;
        ts.reserve(nthreads);
        for (int tid = 0; tid < nthreads; ++tid) {
          ts.emplace_back([&, tid]() {
            tl_block = &blk;
            tl_lane = tid % 32;
            tl_warp = tid / 32;
            threadIdx = {static_cast<unsigned>(tid % block.x),
                         static_cast<unsigned>((tid / block.x) % block.y),
                         static_cast<unsigned>(tid / (block.x * block.y))};
            blockIdx = {bx, by, bz};
            blockDim = block;
            gridDim = grid;
            kernel(args...);
            // An exited thread no longer takes part in barriers (as on the GPU).
            warp().bar.arrive_and_drop();
            blk.bar.arrive_and_drop();
          });
        }
        for (auto& t : ts) t.join();
      }
}

}  // namespace raad_emu

#define RAAD_LAUNCH(kernel, grid, block, smem, stream, ...) \
  raad_emu::launch(kernel, grid, block, smem, __VA_ARGS__)

inline cudaError_t cudaGetLastError() { return raad_emu::g_error.load() ? cudaErrorLaunchFailure : cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulator error"; }
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
