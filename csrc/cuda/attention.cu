// Entry points of the attention kernels: dispatch on the Q·Kᵀ bit-width (the instantiations live
// in attention_int{8,4,2}.cu so they compile in parallel).
#include "raad_cuda.h"

namespace raad {
namespace cuda {

cudaError_t attention_forward(const AttnParams& p, int qk_bits, int pv_mode, int hd, cudaStream_t stream) {
  switch (qk_bits) {
    case 8: return attention_forward_b8(p, pv_mode, hd, stream);
    case 4: return attention_forward_b4(p, pv_mode, hd, stream);
    case 2: return attention_forward_b2(p, pv_mode, hd, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t attention_maps(const AttnParams& p, int qk_bits, int hd, bool want_received, cudaStream_t stream) {
  switch (qk_bits) {
    case 8: return attention_maps_b8(p, hd, want_received, stream);
    case 4: return attention_maps_b4(p, hd, want_received, stream);
    case 2: return attention_maps_b2(p, hd, want_received, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace raad
