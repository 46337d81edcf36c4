// Host-emulator build (RAAD_EMU) of the bindings: same module code, CPU tensors.
namespace raad {
int cuda_device_count() { return 0; }
int cuda_kernel_binary_version() { return 0; }
}  // namespace raad
#include "../../bindings/cuda_bindings.cpp"
