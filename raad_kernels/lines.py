"""Line cells for a memory of normal features (raad.memory): how strongly thin lines run
through each cell of an image, in any direction, as a profile over directions.

The arithmetic, as :func:`line_cells_reference` specifies it in torch, for a grey image (B, H, W):

1. three separable filters over the image reflected at its border (torch's "reflect" padding),
   ``f_c = taps_y[c]`` along y of ``taps_x[c]`` along x (for raad.memory: the Hessian's
   ``∂xx, ∂yy, ∂xy`` at the pixel scale);
2. per pixel and output channel ``o``, ``|Σ_c steer[o, c] f_c|`` (the second derivative across
   each of O directions);
3. its mean over each ``cell``×``cell`` block, then over the ``pool``×``pool`` blocks around it
   that lie inside the image; the O values of each block sorted, largest first.

Through torch that is five passes over full-resolution maps; the CPU extension's kernel makes
one pass per image and keeps only the rows it needs (``RAAD_LINES_FUSED=0`` forces the torch
path, for comparisons).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # the CPU extension's kernel (None where it is not built)
    from ._cpu import line_cells as _FUSED_KERNEL
except ImportError:
    _FUSED_KERNEL = None


def _check(grey, taps_x, taps_y, steer, cell, pool):
    if grey.dim() != 3:
        raise ValueError(f"grey must be (B, H, W), got {tuple(grey.shape)}")
    if taps_x.dim() != 2 or taps_x.shape[0] != 3 or taps_x.shape != taps_y.shape or taps_x.shape[1] % 2 != 1:
        raise ValueError(f"taps_x and taps_y must be (3, K) with K odd, got {tuple(taps_x.shape)} and "
                         f"{tuple(taps_y.shape)}")
    if steer.dim() != 2 or steer.shape[1] != 3:
        raise ValueError(f"steer must be (O, 3), got {tuple(steer.shape)}")
    if cell < 1 or pool < 1 or pool % 2 != 1:
        raise ValueError(f"cell must be >= 1 and pool odd, got cell={cell}, pool={pool}")
    h, w = grey.shape[-2:]
    if h % cell or w % cell:
        raise ValueError(f"grey's H and W must be multiples of cell={cell}, got {h} x {w}")


def line_cells_reference(grey: torch.Tensor, taps_x: torch.Tensor, taps_y: torch.Tensor,
                         steer: torch.Tensor, cell: int = 4, pool: int = 3) -> torch.Tensor:
    """The torch specification: (B, O, H/cell, W/cell), in ``grey``'s dtype."""
    _check(grey, taps_x, taps_y, steer, cell, pool)
    r = taps_x.shape[1] // 2
    dt = grey.dtype
    g = grey[:, None]
    g = F.pad(g, (r, r, r, r), mode="reflect" if min(g.shape[-2:]) > r else "replicate")
    f = F.conv2d(F.conv2d(g, taps_x.to(dt)[:, None, None, :]), taps_y.to(dt)[:, None, :, None], groups=3)
    across = F.conv2d(f, steer.to(dt)[:, :, None, None]).abs()
    c = F.avg_pool2d(across, cell)
    c = F.avg_pool2d(c, pool, 1, pool // 2, count_include_pad=False)
    return c.sort(1, descending=True).values


def _kernel_applies(grey: torch.Tensor, k: int) -> bool:
    return (_FUSED_KERNEL is not None and os.environ.get("RAAD_LINES_FUSED", "1") != "0"
            and grey.device.type == "cpu" and grey.dtype == torch.float32 and grey.shape[0] > 0
            and min(grey.shape[-2:]) > k // 2)


def line_cells(grey: torch.Tensor, taps_x: torch.Tensor, taps_y: torch.Tensor, steer: torch.Tensor,
               cell: int = 4, pool: int = 3, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`line_cells_reference`, through the CPU extension's kernel where it applies (float32
    on the CPU); ``out`` (B, O, H/cell, W/cell), if given, receives the result (tests poison it)."""
    _check(grey, taps_x, taps_y, steer, cell, pool)
    b, h, w = grey.shape
    shape = (b, steer.shape[0], h // cell, w // cell)
    if out is not None and (tuple(out.shape) != shape or out.dtype != grey.dtype):
        raise ValueError(f"out must be {shape} {grey.dtype}, got {tuple(out.shape)} {out.dtype}")
    if not _kernel_applies(grey, taps_x.shape[1]):
        res = line_cells_reference(grey, taps_x, taps_y, steer, cell, pool)
        return res if out is None else out.copy_(res)
    target = out if out is not None and out.is_contiguous() else torch.empty(shape, dtype=grey.dtype)
    f32 = dict(dtype=torch.float32, device="cpu")
    _FUSED_KERNEL(grey.contiguous(), taps_x.to(**f32).contiguous(), taps_y.to(**f32).contiguous(),
                  steer.to(**f32).contiguous(), int(cell), int(pool), target)
    return target if out is None or target is out else out.copy_(target)
