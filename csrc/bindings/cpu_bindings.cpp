// Python bindings of the CPU extension. Kernels live in csrc/cpu and take raw pointers.
#include <torch/extension.h>

#include "cpu/cpu_features.h"

namespace {

py::dict capabilities() {
  const auto& f = raad::cpu_features();
  py::dict d;
  d["avx2"] = f.avx2 && f.fma && f.f16c;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512vnni"] = f.avx512vnni;
  d["avx512bf16"] = f.avx512bf16;
  d["amx_int8"] = f.amx_int8;
  d["amx_bf16"] = f.amx_bf16;
  d["active_isa"] = raad::isa_name(raad::active_isa());
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "raad-kernels CPU extension";
  m.def("capabilities", &capabilities, "CPU features seen at run time and the ISA path in use");
}
