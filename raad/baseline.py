"""A nearest-neighbour baseline (PatchCore-style) on the detector's own backbone.

Mid-level features of the frozen EfficientNet-Lite0 teacher at the same resolution as the
detector: block 4 (stride 8, 40 channels) and block 10 (stride 16, 112 channels, resized to
stride 8), each averaged over 3×3 neighbouring cells (PatchCore's local pooling), concatenated.
The memory is a greedy k-centre coreset of the training cells (chosen in a random projection to
``PROJECTION`` dimensions, as PatchCore does); a test cell's score is its distance to the
nearest kept cell; the map is upsampled to the image and Gaussian-smoothed (σ = 4 px); the image
score is the map's maximum. No training and no calibration: it is the yardstick the detector
must beat (``raad ablate`` row ``patchcore``).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from raad_kernels import nearest as NN

from .memory import greedy_coreset
from .model import EffNetTeacher, gaussian_blur

BLOCKS = (4, 10)      # stride 8 and stride 16: PatchCore's "layer 2 and layer 3"
CORESET = 0.1         # share of training cells kept
MAX_BANK = 16384      # at most this many cells (the search's cost grows with it)
PROJECTION = 64       # dimensions of the random projection the coreset is chosen in
SIGMA = 4.0


class PatchCore(nn.Module):
    def __init__(self, image_size: int = 256, coreset: float = CORESET, seed: int = 0):
        super().__init__()
        self.cfg = SimpleNamespace(image_size=int(image_size))  # what raad.score.evaluate reads
        self.teacher = EffNetTeacher(target_blocks=BLOCKS)
        self.coreset, self.seed = float(coreset), int(seed)
        self.register_buffer("bank", torch.zeros(0, self.teacher.target_channels))
        self._prepared = None

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        grid = (x.shape[-2] // 8, x.shape[-1] // 8)
        f = self.teacher.targets(self.teacher.stem(x), grid)
        return F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False).contiguous()

    @torch.no_grad()
    def fit(self, images: torch.Tensor, batch: int = 8) -> "PatchCore":
        cells = torch.cat([self.features(b).permute(0, 2, 3, 1).reshape(-1, self.bank.shape[1])
                           for b in images.split(batch)])
        n = min(len(cells), MAX_BANK, max(1, int(round(self.coreset * len(cells)))))
        g = torch.Generator().manual_seed(self.seed)
        proj = torch.randn(cells.shape[1], PROJECTION, generator=g) / PROJECTION ** 0.5
        keep = greedy_coreset(cells @ proj, n, seed=self.seed)
        self.bank = cells[keep].contiguous()
        self._prepared = None
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.bank) == 0:
            raise RuntimeError("PatchCore: fit() it on training images before scoring")
        if self._prepared is None:
            self._prepared = NN.prepare_bank(self.bank)
        f = self.features(x)
        B, C, h, w = f.shape
        q = f.permute(0, 2, 3, 1).reshape(-1, C).contiguous()
        d = NN.nearest_sq_distance(q, self.bank, self._prepared).clamp_min(0).sqrt()
        m = F.interpolate(d.reshape(B, 1, h, w), size=x.shape[-2:], mode="bilinear",
                          align_corners=False)
        return gaussian_blur(m, SIGMA)[:, 0]
