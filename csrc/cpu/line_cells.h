// Line cells for raad's feature memory (raad/memory.py): thin lines at the pixel scale, per 4×4
// cell of an image, in one pass over the pixels. raad_kernels/lines.py specifies the arithmetic
// (line_cells_reference): through torch it is five convolution, pooling and sort passes over
// full-resolution maps (about 4.5 ms for 8 images of 128×128 on 2 Zen 4 cores).
// No torch headers (raw pointers only).
#pragma once
#include <cstdint>

namespace raad::cpu {

// grey: B × H × W row-major (H, W multiples of cell and larger than K / 2).
// 1. Three separable filters over the image reflected at its border (torch's "reflect" padding):
//    f_c = taps_y[c] along y of taps_x[c] along x, c = 0..2 (K taps each, centred).
// 2. Per pixel and output channel o: |steer[o][0] f_0 + steer[o][1] f_1 + steer[o][2] f_2|.
// 3. Their mean over each cell × cell block, then over the pool × pool blocks around it that lie
//    inside the image; the O values of each block sorted, largest first.
// out: B × O × (H / cell) × (W / cell). Images are shared among `threads` threads.
void line_cells_f32(const float* grey, int64_t batch, int64_t h, int64_t w, const float* taps_x, const float* taps_y,
                    int64_t k, const float* steer, int64_t o, int64_t cell, int64_t pool, float* out, int threads);

}  // namespace raad::cpu
