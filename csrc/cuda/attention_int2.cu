// Q·Kᵀ at int2: instantiations of the attention kernels (attention.cuh) for every P·V mode
// (int8, fp16, bf16) and head-dim bucket (64, 128, 256).
#include "attention.cuh"

namespace raad {
namespace cuda {

cudaError_t attention_forward_b2(const AttnParams& p, int pv_mode, int hd, cudaStream_t stream) {
  return forward_dispatch<2>(p, pv_mode, hd, stream);
}

cudaError_t attention_maps_b2(const AttnParams& p, int hd, bool want_received, cudaStream_t stream) {
  return maps_dispatch<2>(p, hd, want_received, stream);
}

}  // namespace cuda
}  // namespace raad
