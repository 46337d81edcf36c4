// Device queries of the extension's own runtime. No torch headers.
#include <cuda_runtime.h>

namespace raad {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

namespace {
__global__ void probe_kernel() {}
}  // namespace

// The architecture of the machine code this build would run on the current device (e.g. 86 for
// sm_86 code on an RTX 3090 or an L4's sm_89), or minus the CUDA error when there is none
// (no kernel image for this device, no device).
int cuda_kernel_binary_version() {
  cudaFuncAttributes a{};
  cudaError_t e = cudaFuncGetAttributes(&a, probe_kernel);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return -static_cast<int>(e);
  }
  return a.binaryVersion;
}

}  // namespace raad
