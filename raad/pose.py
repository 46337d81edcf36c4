"""Pose normalisation: an object that lies at any angle is turned to one canonical pose.

A detector trained on normal images learns what belongs where. When the object's angle and
place vary (a screw on a table), nothing is at a fixed place: the student's position embedding,
the autoencoder's global code and the memory's place channels learn nothing, and a change of
shape (a broken tip) looks like the same screw at another angle. Turning every image to one
pose before the detector, and its map back after, gives them a fixed layout.

The pose is read from the image moments of the foreground (the pixels that differ from the
background, whose colour is the median of the image border), as in classical shape analysis:
the centroid, the principal axis of the second moments, and the axis's direction from the sign
of the third moment along it (the heavy end of the object). The aligned image has its centroid
at the centre and its principal axis along +x; outside the original image it is filled by
the background colour.

``auto`` decides per product from its training images alone: align when there is an object
(part of the image stands out from the border's colour), it is clearly elongated (a principal
axis that is defined) and its angle varies; textures (nothing stands out from the border) and
fixed layouts (one angle) stay as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODES = ("off", "on", "auto")
#: auto: the training images' median elongation (ratio of the principal second moments) above
#: which an object's axis counts as defined, and the angular spread (circular standard deviation,
#: degrees) above which its pose counts as varying
MIN_ELONGATION = 2.0
MIN_SPREAD_DEG = 10.0
#: auto: the share of the image that must stand out from the background (median over the
#: training images) for there to be an object at all; a texture's border is like its interior,
#: so almost nothing does (synthetic weave 0, stone 0.0002; screw 0.05, pcb 0.31)
MIN_FOREGROUND = 0.005
#: the foreground starts at this multiple of the border's variation: at 1 the brighter patches
#: of a shaded table count and tilt the axis (synthetic screws: 5 degrees rms, 15 at worst);
#: at 2-3, 0.04 degrees rms; at 4 the dimmer metal drops out and the direction flips
NOISE_FACTOR = 2.5


@dataclass
class Pose:
    """Per image: centroid (``cx``, ``cy``, pixels) and axis angle ``theta`` (radians), plus the
    elongation (λ1/λ2 of the foreground's second moments) the angle was read with."""

    cx: torch.Tensor
    cy: torch.Tensor
    theta: torch.Tensor
    elongation: torch.Tensor


def _border(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, C, P): the pixels of the outer ``width`` rows and columns."""
    return torch.cat([x[..., :width, :].flatten(2), x[..., -width:, :].flatten(2),
                      x[..., width:-width, :width].flatten(2),
                      x[..., width:-width, -width:].flatten(2)], dim=2)


def _colour_distance(x: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """(B, ...): the Euclidean distance of each pixel of ``x`` (B, C, ...) from ``colour``
    (B, C), summed channel by channel (two orders of magnitude faster on a CPU than torch's
    ``norm(dim=1)`` over the channels)."""
    shape = (-1,) + (1,) * (x.dim() - 2)
    d2 = sum((x[:, c] - colour[:, c].view(shape)).square() for c in range(x.shape[1]))
    return d2.sqrt()


def _row_quantile(v: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(v, q, dim=1)`` (linear interpolation between the two order statistics
    around it), from two ``kthvalue`` selections, which is far cheaper than ``torch.quantile``'s
    sort."""
    pos = q * (v.shape[1] - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, v.shape[1] - 1)
    return torch.lerp(v.kthvalue(lo + 1, dim=1).values, v.kthvalue(hi + 1, dim=1).values, pos - lo)


def background(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the background colour (B, C), the median of the border, and its variation
    (B,), the border's 95th-percentile distance from that colour."""
    border = _border(x, max(1, min(x.shape[-2:]) // 32))
    bg = border.median(dim=2).values
    return bg, _row_quantile(_colour_distance(border, bg), 0.95)


def foreground(x: torch.Tensor, bg: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, H, W) weights: how far each pixel's colour is from the background's, above
    ``NOISE_FACTOR`` times the background's own variation (``bg``: :func:`background`'s
    result for ``x``, when the caller has it)."""
    colour, noise = background(x) if bg is None else bg
    return (_colour_distance(x, colour) - NOISE_FACTOR * noise[:, None, None]).clamp_min(0)


@torch.no_grad()
def estimate(x: torch.Tensor, bg: tuple[torch.Tensor, torch.Tensor] | None = None) -> Pose:
    """The pose of each image of ``x`` (B, C, H, W) (``bg``: as in :func:`foreground`)."""
    B, _, H, W = x.shape
    w = foreground(x.float(), bg)
    m0 = w.sum(dim=(1, 2)).clamp_min(1e-12)
    yy = torch.arange(H, dtype=w.dtype, device=w.device)[:, None]
    xx = torch.arange(W, dtype=w.dtype, device=w.device)[None, :]
    cx = (w * xx).sum(dim=(1, 2)) / m0
    cy = (w * yy).sum(dim=(1, 2)) / m0
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    mxx = (w * dx * dx).sum(dim=(1, 2)) / m0
    myy = (w * dy * dy).sum(dim=(1, 2)) / m0
    mxy = (w * dx * dy).sum(dim=(1, 2)) / m0
    theta = 0.5 * torch.atan2(2 * mxy, mxx - myy)
    a = dx * torch.cos(theta)[:, None, None] + dy * torch.sin(theta)[:, None, None]
    skew = (w * a ** 3).sum(dim=(1, 2))
    theta = torch.where(skew < 0, theta + math.pi, theta)   # the axis points to the light end
    root = torch.sqrt((mxx - myy) ** 2 + 4 * mxy ** 2)
    l1, l2 = 0.5 * (mxx + myy + root), 0.5 * (mxx + myy - root)
    return Pose(cx, cy, theta, l1 / l2.clamp_min(1e-12))


def _sample(x: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, padding: str) -> torch.Tensor:
    """``x`` read at pixel coordinates (sx, sy) (B, H, W each), bilinearly."""
    H, W = x.shape[-2:]
    grid = torch.stack([(2 * sx + 1) / W - 1, (2 * sy + 1) / H - 1], dim=-1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode=padding, align_corners=False)


def _frame(pose: Pose, H: int, W: int, device):
    yy = torch.arange(H, dtype=torch.float32, device=device)[None, :, None].expand(1, H, W)
    xx = torch.arange(W, dtype=torch.float32, device=device)[None, None, :].expand(1, H, W)
    c, s = torch.cos(pose.theta)[:, None, None], torch.sin(pose.theta)[:, None, None]
    return xx - (W - 1) / 2, yy - (H - 1) / 2, c, s


def align(x: torch.Tensor, pose: Pose, bg: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` turned to the canonical pose: centroid at the centre, axis along +x (``bg``: the
    background colour (B, C) of ``x``, :func:`background`'s first result, when the caller has
    it)."""
    H, W = x.shape[-2:]
    u, v, c, s = _frame(pose, H, W, x.device)
    sx = pose.cx[:, None, None] + c * u - s * v
    sy = pose.cy[:, None, None] + s * u + c * v
    # outside the original image: the background colour (reflection would mirror the object in
    # when it lies near the edge)
    bg = (background(x)[0] if bg is None else bg)[..., None, None]
    return _sample(x - bg, sx, sy, "zeros") + bg


def unalign(m: torch.Tensor, pose: Pose) -> torch.Tensor:
    """A map (B, C, H, W) in the canonical frame turned back to each image's own pose."""
    H, W = m.shape[-2:]
    yy = torch.arange(H, dtype=torch.float32, device=m.device)[None, :, None]
    xx = torch.arange(W, dtype=torch.float32, device=m.device)[None, None, :]
    c, s = torch.cos(pose.theta)[:, None, None], torch.sin(pose.theta)[:, None, None]
    dx, dy = xx - pose.cx[:, None, None], yy - pose.cy[:, None, None]
    sx = (W - 1) / 2 + c * dx + s * dy
    sy = (H - 1) / 2 - s * dx + c * dy
    return _sample(m, sx, sy, "border")


def spread_deg(theta: torch.Tensor) -> float:
    """Circular standard deviation of the angles, in degrees."""
    r = torch.stack([torch.cos(theta), torch.sin(theta)]).mean(dim=1).norm().clamp(1e-12, 1.0)
    return math.degrees(math.sqrt(-2 * math.log(float(r))))


def decide(images: torch.Tensor, batch: int = 32) -> dict:
    """``auto``: whether the training ``images`` call for alignment, whether they show an object
    at all (else a texture; raad.model's ``autoencoder`` "auto" reads it), and the figures read."""
    parts = images.split(batch)
    poses = [estimate(x) for x in parts]
    share = float(torch.cat([(foreground(x.float()) > 0).float().mean(dim=(1, 2)) for x in parts]).median())
    theta = torch.cat([p.theta for p in poses])
    elong = float(torch.cat([p.elongation for p in poses]).median())
    spread = spread_deg(theta)
    is_object = share >= MIN_FOREGROUND
    on = is_object and elong >= MIN_ELONGATION and spread >= MIN_SPREAD_DEG
    return {"align": "on" if on else "off", "object": is_object, "foreground": round(share, 4),
            "elongation": round(elong, 3), "spread_deg": round(spread, 1)}
