// Python bindings of the CUDA extension. Kernels live in csrc/cuda (no torch headers there).
#include <torch/extension.h>

namespace raad {
int cuda_device_count();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "raad-kernels CUDA extension";
  m.def("device_count", &raad::cuda_device_count, "CUDA devices visible to the extension's runtime");
}
