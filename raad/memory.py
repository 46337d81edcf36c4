"""A nearest-neighbour memory of fine features, beside the student and the autoencoder.

The student regresses stride-8 features and reads the stride-4 stem, so it partly reproduces a
thin scratch or a faint stain (docs/history/raad.md). A memory of
what normal images look like at a finer scale does not: each cell of a test image is scored by
its distance to the nearest cell of the training images (as PatchCore), in three representations
that see different defects (``studies/raad_feature_probe.py``):

* ``fine``: EfficientNet-Lite0 block 1 (stride 4, 24 channels): scratches, edges, texture;
* ``colour``: the image's 4×4 mean colour, averaged over 3×3 cells: stains, soft blotches;
* ``lines``: thin lines at the pixel scale (:func:`line_cells`, 8 channels): the 1-2 px cracks
  and scratches that ImageNet features at 128 px blur into a grainy texture;
* ``region`` (runs from format 10): the mean colour and the luminance's standard deviation over a
  ``memory_region``-pixel window (20: 5×5 cells) around each cell (:func:`region_cells`, 4
  channels): a soft patch darker, tinted or with less texture than the surface (burns, stains),
  wider than the fine features and the colour cells see, where a grainy texture's own 12 px
  spots are as dark.

Each is whitened on the training cells (:meth:`FeatureMemory.build`), and its distance map is
quantile-normalised on held-out normal images like the detector's maps (0 at ``Q_LOW``, 0.1 at
``Q_HIGH``); the memory's map is the maximum of the three. The outermost ring of cells has its
own quantiles: zero padding makes its features noisier, and the image score is the map's
maximum.

Where the nearest cell is looked for (``mode``):

* ``global``: anywhere in any training image, among a greedy k-centre coreset of training
  cells (PatchCore's); for textures and for objects in any pose;
* ``local``: the same search over cells that also carry their place, so a match far from the
  query's own place costs distance; for products with a fixed layout, where a part that is
  normal elsewhere on the board is an anomaly here (a global memory cannot see a swapped part);
* ``auto`` (resolved when fitting): ``local`` when the held-out images find their colour cells
  about as close among the training cells within ``radius`` cells of their own place as among
  all (99th-percentile distance ratio below ``FIXED_LAYOUT_RATIO``), else ``global``.

The search itself is :mod:`raad_kernels.nearest` (a CPU kernel that never writes the
query × bank distance matrix). Under the quantized
plan the fine and line searches run at int8, with a small distance error that leaves
detection unchanged (figures: docs/history/raad.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raad_kernels import lines as L
from raad_kernels import nearest as NN

from .data import IMAGENET_STD

MODES = ("off", "global", "local", "auto")
FIXED_LAYOUT_RATIO = 2.0
COLOUR_CELL = 4   # pixels per colour cell (the fine features' stride)
COLOUR_POOL = 3   # colour cells averaged around each cell
LINE_SIGMA = 0.6  # px: the Hessian's scale for line cells (stone's cracks are 0.8-1.5 px wide)
LINE_ORIENTATIONS = 8
WHITEN_FLOOR = 1e-3   # covariance eigenvalues below this × the largest are raised to it (whitening)
# the least spread q_high − q_low of a representation's held-out distances, × √channels (whitened
# units): in few channels a dense bank leaves every normal cell almost on a bank cell, the spread
# collapses (colour on real photographs: 0.002) and a cell a fifth of a standard deviation outside
# the training range scored 100× a defect
SPREAD_FLOOR = 0.05


def colour_cells(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H/4, W/4): the image's 4×4 mean colour, averaged over 3×3 neighbouring cells."""
    c = F.avg_pool2d(image, COLOUR_CELL)
    return F.avg_pool2d(c, COLOUR_POOL, 1, COLOUR_POOL // 2, count_include_pad=False)


def _line_filters():
    """The Hessian's separable 1-D taps at ``LINE_SIGMA`` (along x: g'', g, g'; along y: g, g'',
    g', each (3, K)) and the (8, 3) matrix that steers (∂xx, ∂yy, ∂xy) to the second derivative
    across each of ``LINE_ORIENTATIONS`` directions (across θ: (−sin θ, cos θ)); float64."""
    r = math.ceil(3 * LINE_SIGMA)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g0 = torch.exp(-0.5 * (t / LINE_SIGMA) ** 2)
    g0 /= g0.sum()
    g1 = -t / LINE_SIGMA ** 2 * g0
    g2 = (t ** 2 / LINE_SIGMA ** 4 - 1 / LINE_SIGMA ** 2) * g0
    # sampled at 0.6 px the taps are not exact derivatives: make them so on polynomials (no
    # response to a constant; x → 1 and x² → 2), so the steered combinations are consistent
    g1 /= -(t * g1).sum()
    g2 -= g2.mean()
    g2 *= 2 / (t ** 2 * g2).sum()
    th = torch.arange(LINE_ORIENTATIONS, dtype=torch.float64) * math.pi / LINE_ORIENTATIONS
    c, s = torch.cos(th), torch.sin(th)
    return torch.stack([g2, g0, g1]), torch.stack([g0, g2, g1]), torch.stack([s * s, c * c, -2 * c * s], 1)


_LINE_FILTERS = {}   # (dtype, device) → the filters in it (made once)


def line_cells(image: torch.Tensor) -> torch.Tensor:
    """(B, LINE_ORIENTATIONS, H/4, W/4): thin lines at the pixel scale, per cell.

    The luminance's second derivative across each of 8 directions (a steered Hessian at
    ``LINE_SIGMA`` = 0.6 px), its magnitude (dark lines, cracks, are valleys; bright scratches
    ridges) averaged over the 4×4 cell and then over 3×3 cells, like the colour. The 8 responses
    are sorted, largest first: the profile over directions (one strong direction: a line; all
    alike: a speck) without the direction itself, so a texture seen at another angle (weave's
    threads) is no anomaly. ImageNet features at 128 px blur a 1-2 px crack into the grain
    around it; this sees them. :mod:`raad_kernels.lines` computes it (a CPU kernel; its torch specification)."""
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    grey = (image * std).mean(1)   # the luminance up to a constant, which no filter sees
    key = (image.dtype, image.device)
    if key not in _LINE_FILTERS:
        _LINE_FILTERS[key] = tuple(f.to(dtype=image.dtype, device=image.device) for f in _line_filters())
    return L.line_cells(grey, *_LINE_FILTERS[key], cell=COLOUR_CELL, pool=COLOUR_POOL)


def region_window_ok(window: int) -> bool:
    """Whether ``window`` (pixels) is an odd number of 4-pixel cells, centred on a cell."""
    return window >= COLOUR_CELL and window % (2 * COLOUR_CELL) == COLOUR_CELL


def region_cells(image: torch.Tensor, window: int) -> torch.Tensor:
    """(B, 4, H/4, W/4): per 4-pixel cell, the mean colour and the luminance's standard deviation
    over the ``window``×``window`` pixels centred on it (an odd number of cells: 20 px is 5×5
    cells), cut at the border; pooled from the cells' means, so it costs little more than them."""
    if not region_window_ok(window):
        raise ValueError(f"memory_region must be an odd number of {COLOUR_CELL}-pixel cells "
                         f"(4, 12, 20, ...), got {window}")
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    x = image * std                      # pixel units, so the channels' scales are comparable
    grey = x.mean(1, keepdim=True)
    k = window // COLOUR_CELL
    t = F.avg_pool2d(torch.cat([x, grey, grey * grey], 1), COLOUR_CELL)
    t = F.avg_pool2d(t, k, 1, k // 2, count_include_pad=False)
    return torch.cat([t[:, :3], (t[:, 4:5] - t[:, 3:4].pow(2)).clamp_min(0).sqrt()], 1)


def representations(fine: torch.Tensor, image: torch.Tensor, region: int = 0) -> dict:
    """What the memory reads: the teacher's block-1 output ``fine``, the image's colour cells and
    its line cells; with ``region`` (pixels) > 0 also its region cells."""
    out = {"fine": fine, "colour": colour_cells(image), "lines": line_cells(image)}
    if region:
        out["region"] = region_cells(image, region)
    return out


def _cells(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B·h·w, C)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def greedy_coreset(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` rows of ``x`` (N, C) chosen by greedy k-centre: each next row is the one
    farthest from those already chosen, so the rows kept cover every kind of cell, rare ones
    included (a random subsample would drop them and flag them as anomalies)."""
    if n >= len(x):
        return torch.arange(len(x))
    g = torch.Generator().manual_seed(seed)
    first = int(torch.randint(len(x), (1,), generator=g))
    idx = torch.empty(n, dtype=torch.long)
    idx[0] = first
    sq = x.pow(2).sum(1)
    nearest = (sq - 2 * x @ x[first] + sq[first]).clamp_min(0)
    for i in range(1, n):
        j = int(nearest.argmax())
        idx[i] = j
        nearest = torch.minimum(nearest, (sq - 2 * x @ x[j] + sq[j]).clamp_min(0))
    return idx


def local_sq_distance(query: torch.Tensor, bank: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, C, h, w) against bank maps (N, C, h, w): each query cell's squared distance to the
    nearest bank cell within ``radius`` cells of its own place, in any bank image; (B, h, w)."""
    h, w = query.shape[-2:]
    r = radius
    padded = F.pad(bank, (r, r, r, r), value=float("inf"))
    q_sq = query.pow(2).sum(1)                                    # (B, h, w)
    best = torch.full(q_sq.shape, float("inf"), dtype=query.dtype, device=query.device)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            shifted = padded[:, :, dy:dy + h, dx:dx + w]           # (N, C, h, w)
            b_sq = shifted.pow(2).sum(1)                          # (N, h, w); inf outside
            dot = torch.einsum("bchw,nchw->bnhw", query, torch.nan_to_num(shifted, posinf=0.0))
            d = q_sq[:, None] + b_sq[None] - 2 * dot              # (B, N, h, w)
            best = torch.minimum(best, d.min(1).values)
    return best.clamp_min(0)


class FeatureMemory(nn.Module):
    """The memory's state as buffers (saved with the detector): per representation its
    whitening, its bank of cells and its held-out quantiles. ``size``: the fine bank's cells (the
    colour bank keeps an eighth: 3 channels need fewer), fixed when fitting (it sizes the buffers
    to load). ``local``: each fine and colour cell carries its place (row, column, in cells,
    times ``place``), so a nearest cell elsewhere on the image costs ``place``² per cell of
    distance²: the same search as ``global``, and a part that belongs elsewhere is far. Line
    cells are searched anywhere in both modes: a crack or a scratch is one wherever it is, and a
    part in the wrong place shows in the other two (and without place channels, which would set
    its one int8 scale, the plan's line search can run at int8)."""

    REPS = ("fine", "colour", "lines", "region")   # those in ``channels`` are kept, in this order
    PLACED = ("fine", "colour", "region")   # the representations that carry their place in local mode

    def __init__(self, mode: str, size: int, channels: dict, place: float = 1.0):
        super().__init__()
        if mode not in ("global", "local"):
            raise ValueError(f"memory mode must be 'global' or 'local' once fitted, got {mode!r}")
        if size < 1:
            raise ValueError(f"memory size must be >= 1, got {size}")
        self.mode, self.place = mode, float(place)
        # the fine and line searches at int8 (the quantized plan sets it; raad_kernels.nearest)
        self.int8 = False
        self._prepared = {}   # (rep, int8) → (bank version, the kernel's layout of the bank)
        self.reps = tuple(r for r in self.REPS if r in channels)
        for rep in self.reps:
            c, extra = channels[rep], 2 if self._placed(rep) else 0
            self.register_buffer(f"{rep}_mean", torch.zeros(1, c, 1, 1))
            # (C, C): the whitening of the cells (build)
            self.register_buffer(f"{rep}_white", torch.eye(c))
            self.register_buffer(f"{rep}_bank", torch.zeros(bank_cells(rep, size), c + extra))
            # (q_low, q_high) of the interior cells, then of the outer ring
            self.register_buffer(f"{rep}_q", torch.tensor([[0.0, 1.0], [0.0, 1.0]]))

    def _placed(self, rep: str) -> bool:
        return self.mode == "local" and rep in self.PLACED

    def _cells(self, rep: str, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B·h·w, C[+2]): whitened, with the place where ``rep`` carries it."""
        z = _cells(x - getattr(self, f"{rep}_mean")) @ getattr(self, f"{rep}_white")
        if not self._placed(rep):
            return z
        b, _, h, w = x.shape
        rows, cols = torch.meshgrid(torch.arange(h, dtype=z.dtype), torch.arange(w, dtype=z.dtype),
                                    indexing="ij")
        place = torch.stack([rows, cols], -1).reshape(1, h * w, 2).expand(b, -1, -1).reshape(-1, 2)
        return torch.cat([z, self.place * place.to(z.device)], 1)

    @torch.no_grad()
    def build(self, feats: dict, seed: int = 0) -> None:
        """Fill the banks from the training images' representations ``{rep: (N, C, h, w)}``.

        Each representation is whitened (ZCA over its channels, eigenvalues floored at
        ``WHITEN_FLOOR`` of the largest), not only standardised per channel, so the distance is
        a Mahalanobis-like one (as PaDiM's): a texture's colour varies mostly along one axis
        (stone's mottling: light and dark), and a stain that changes the hue lies far off that
        axis but close in plain RGB distance; correlated channels of the block-1 and line
        features no longer count twice (figures: docs/history/raad.md)."""
        for rep in self.reps:
            x = feats[rep]
            getattr(self, f"{rep}_mean").copy_(x.mean((0, 2, 3), keepdim=True))
            getattr(self, f"{rep}_white").copy_(whitening(x))
            cells = self._cells(rep, x)
            bank = getattr(self, f"{rep}_bank")
            if len(bank) > len(cells):
                raise ValueError(f"memory of {len(bank)} {rep} cells from {len(cells)} cells: "
                                 f"the training images have too few")
            bank.copy_(cells[greedy_coreset(cells, len(bank), seed)])

    def _search(self, rep: str, cells: torch.Tensor) -> torch.Tensor:
        """Squared distances of ``cells`` to the nearest of the bank's; the bank's kernel layout
        made once per bank (rebuilt when the bank changes: building, loading)."""
        bank = getattr(self, f"{rep}_bank")
        # int8: the fine and line features (3 colour channels are cheap in float and coarse in int8)
        int8 = self.int8 and rep in ("fine", "lines")
        key = (bank.data_ptr(), bank._version, bank.device)
        cached = self._prepared.get((rep, int8))
        if cached is None or cached[0] != key:
            # the place channels centred (where there are any)
            shift = self._place_shift(bank) if int8 and self._placed(rep) else None
            shifted = bank if shift is None else bank - shift
            layout = NN.prepare_bank_int8(shifted) if int8 else NN.prepare_bank(bank)
            cached = (key, layout, shift)
            self._prepared[(rep, int8)] = cached
        if int8:
            shift = cached[2]
            return NN.nearest_sq_distance_int8(cells if shift is None else cells - shift, bank, cached[1])
        return NN.nearest_sq_distance(cells, bank, cached[1])

    def _place_shift(self, bank: torch.Tensor) -> torch.Tensor:
        """(C,): what the int8 search subtracts from bank and query cells alike (distances are
        unchanged): in ``local`` mode the middle of the place channels' range, so the places
        (0..31 cells at 128 px) reach ±15.5 instead of 31 and the one int8 scale the bank
        shares across channels stays near the whitened features' (absmax 13.6 on the
        demo's pcb); nothing in ``global`` mode."""
        shift = torch.zeros(bank.shape[1], dtype=bank.dtype, device=bank.device)
        if self.mode == "local":
            place = bank[:, -2:]
            shift[-2:] = 0.5 * (place.amax(0) + place.amin(0))
        return shift

    def distances(self, feats: dict) -> dict:
        """{rep: (B, h, w) distance to the nearest normal cell}, before the quantiles."""
        out = {}
        for rep in self.reps:
            x = feats[rep]
            d = self._search(rep, self._cells(rep, x))
            out[rep] = d.view(x.shape[0], *x.shape[-2:]).sqrt()
        return out

    @torch.no_grad()
    def calibrate(self, feats: dict, q_low: float, q_high: float) -> None:
        """The quantiles of each representation's distances on held-out normal images, their
        spread floored at ``SPREAD_FLOOR`` × √channels."""
        qs = torch.tensor([q_low, q_high])
        for rep, d in self.distances(feats).items():
            edge = _ring(d)
            q = torch.stack([torch.quantile(d[:, ~edge], qs), torch.quantile(d[:, edge], qs)])
            floor = SPREAD_FLOOR * feats[rep].shape[1] ** 0.5
            q[:, 1] = torch.maximum(q[:, 1], q[:, 0] + floor)
            getattr(self, f"{rep}_q").copy_(q)

    def maps(self, feats: dict) -> dict:
        """{rep: (B, h, w)} each representation's distance map, normalised (0 at the held-out
        ``q_low``, 0.1 at ``q_high``, as the detector's maps)."""
        out = {}
        for rep, d in self.distances(feats).items():
            q = getattr(self, f"{rep}_q")
            q = torch.where(_ring(d)[..., None], q[1], q[0])          # (h, w, 2)
            out[rep] = 0.1 * (d - q[..., 0]) / (q[..., 1] - q[..., 0]).clamp_min(1e-12)
        return out

    def forward(self, feats: dict) -> torch.Tensor:
        """The memory's map (B, h, w): the largest of the normalised maps (:meth:`maps`)."""
        return torch.stack(list(self.maps(feats).values())).amax(0)


def bank_cells(rep: str, size: int) -> int:
    """Cells kept for ``rep`` in a memory of ``size``: all of them for the fine features and
    the lines, an eighth (at least 1) for the 3-channel colour."""
    return max(1, int(size) // 8) if rep == "colour" else int(size)


def whitening(x: torch.Tensor) -> torch.Tensor:
    """(C, C) symmetric ZCA whitening of the channels of ``x`` (N, C, h, w): cells times it have
    unit covariance, up to the eigenvalue floor ``WHITEN_FLOOR`` × the largest (a direction that
    never varies in training, sensor noise aside, would otherwise be scaled without bound)."""
    z = _cells(x).double()
    e, v = torch.linalg.eigh(torch.cov(z.T).reshape(x.shape[1], x.shape[1]))
    e = e.clamp_min(WHITEN_FLOOR * float(e.max().clamp_min(1e-24)))
    return ((v * e.rsqrt()) @ v.T).to(x.dtype)


def _ring(d: torch.Tensor) -> torch.Tensor:
    """(h, w) bool: the outermost ring of cells of maps ``d`` (B, h, w)."""
    edge = torch.ones(d.shape[-2:], dtype=torch.bool, device=d.device)
    edge[1:-1, 1:-1] = False
    return edge


@torch.no_grad()
def layout_ratio(bank_feats: dict, held_feats: dict, radius: int) -> float:
    """How much farther the held-out images' colour cells are from the training cells at their
    own place than from any training cell (99th percentiles): near 1 for a fixed layout."""
    x, q = bank_feats["colour"], held_feats["colour"]
    mu, sd = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    x, q = (x - mu) / sd, (q - mu) / sd
    glob = NN.nearest_sq_distance(_cells(q), _cells(x)).sqrt()
    loc = local_sq_distance(q, x, radius).sqrt()
    return float(torch.quantile(loc.flatten(), 0.99) / torch.quantile(glob, 0.99).clamp_min(1e-12))
