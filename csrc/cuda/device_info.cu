// Minimal CUDA translation unit: reports the compiled architectures. No torch headers.
#include <cuda_runtime.h>

namespace raad {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

}  // namespace raad
