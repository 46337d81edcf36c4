"""Heatmap overlays and a small report grid.

:func:`overlay` blends a colour-mapped anomaly map over its image and draws the ground-truth
mask's contour; :func:`save_overlay` writes it as PNG; :func:`calibrated_overlay` colours a map
on a run's calibrated scale (its decision threshold at the colour map's middle) and
:func:`prediction_panel` puts it beside the image, with a title and the colour bar;
:func:`write_report` writes an HTML page and a Markdown file that show overlays in a grid. Colour
maps come from matplotlib when it is installed (any of its names), otherwise from built-in
``turbo`` (polynomial approximation) and ``jet`` formulas; everything else is Pillow + numpy.
All files are written atomically.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from .io import atomic_save_image, atomic_write_text

__all__ = ["colormap_lut", "colorize", "overlay", "save_overlay", "ReportEntry", "write_report",
           "calibrated_levels", "calibrated_overlay", "prediction_panel", "save_prediction_panel"]


def _turbo(x: np.ndarray) -> np.ndarray:
    # polynomial fit of Google's turbo colour map (Anton Mikhailov, 2019; fit by Ruofei Du)
    r = 0.13572138 + x * (4.61539260 + x * (-42.66032258 + x * (132.13108234
                                                               + x * (-152.94239396 + x * 59.28637943))))
    g = 0.09140261 + x * (2.19418839 + x * (4.84296658 + x * (-14.18503333
                                                             + x * (4.27729857 + x * 2.82956604))))
    b = 0.10667330 + x * (12.64194608 + x * (-60.58204836 + x * (110.36276771
                                                                + x * (-89.90310912 + x * 27.34824973))))
    return np.stack([r, g, b], -1)


def _jet(x: np.ndarray) -> np.ndarray:
    return np.stack([1.5 - np.abs(4 * x - 3), 1.5 - np.abs(4 * x - 2), 1.5 - np.abs(4 * x - 1)], -1)


_BUILTIN = {"turbo": _turbo, "jet": _jet}


@lru_cache(maxsize=16)
def _lut(name: str, use_matplotlib: bool) -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    if use_matplotlib:
        try:
            import matplotlib

            cmap = matplotlib.colormaps[name]
            return np.clip(np.rint(cmap(x)[:, :3] * 255), 0, 255).astype(np.uint8)
        except ImportError:
            pass
        except KeyError:
            raise ValueError(f"unknown colour map {name!r}") from None
    if name not in _BUILTIN:
        raise ValueError(f"unknown colour map {name!r} (without matplotlib only "
                         f"{sorted(_BUILTIN)} are available)")
    return np.clip(np.rint(_BUILTIN[name](x) * 255), 0, 255).astype(np.uint8)


def colormap_lut(name: str = "turbo", *, use_matplotlib: bool = True) -> np.ndarray:
    """A (256, 3) uint8 lookup table for colour map ``name``."""
    return _lut(name, use_matplotlib).copy()


def colorize(amap, vmin: float | None = None, vmax: float | None = None, cmap: str = "turbo",
             *, use_matplotlib: bool = True) -> np.ndarray:
    """Anomaly map (H, W) -> RGB uint8 (H, W, 3); values are clipped to [vmin, vmax] (default:
    the map's own range; a constant map gives the colour map's lowest colour)."""
    a = np.asarray(amap, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"amap: expected a 2-D map, got shape {a.shape}")
    finite = a[np.isfinite(a)]
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    t = np.zeros_like(a) if hi <= lo else (np.nan_to_num(a, nan=lo) - lo) / (hi - lo)
    idx = np.clip(np.rint(t * 255), 0, 255).astype(np.intp)
    return _lut(cmap, use_matplotlib)[idx]


def _as_rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise TypeError(f"image array must be uint8 (H, W) or (H, W, 3), got {a.dtype}")
    return Image.fromarray(a).convert("RGB")


def _resize_float(a: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if a.shape == hw:
        return a
    return np.asarray(Image.fromarray(a.astype(np.float32), mode="F")
                      .resize((hw[1], hw[0]), Image.Resampling.BILINEAR), dtype=np.float64)


def _mask_at(mask, hw) -> np.ndarray:
    """A 2-D mask as bool at ``hw`` (height, width), resized by nearest neighbour."""
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"mask: expected a 2-D mask, got shape {m.shape}")
    if m.shape != hw:
        m = np.asarray(Image.fromarray(m).resize((hw[1], hw[0]), Image.Resampling.NEAREST))
    return m


def overlay(image, amap, mask=None, *, vmin: float | None = None, vmax: float | None = None,
            alpha: float = 0.5, cmap: str = "turbo",
            contour_color: tuple[int, int, int] = (255, 255, 255), contour_width: int = 1,
            use_matplotlib: bool = True) -> Image.Image:
    """The image with the colour-mapped anomaly map blended over it (``alpha`` = heatmap weight)
    and the mask's outline drawn in ``contour_color``.

    ``image``: path, PIL image or uint8 array; the result has its resolution (the map is resized
    bilinearly, the mask by nearest neighbour, when their sizes differ). Use one ``vmin``/``vmax``
    for all images of a category so that colours compare across images.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _as_rgb(image)
    hw = (img.height, img.width)
    heat = colorize(_resize_float(np.asarray(amap, dtype=np.float64), hw), vmin, vmax, cmap,
                    use_matplotlib=use_matplotlib)
    base = np.asarray(img, dtype=np.float64)
    out = (1 - alpha) * base + alpha * heat
    if mask is not None:
        m = _mask_at(mask, hw)
        edge = m & ~ndimage.binary_erosion(m, structure=np.ones((3, 3), bool), border_value=0)
        if contour_width > 1:
            edge = ndimage.binary_dilation(edge, iterations=contour_width - 1)
        out[edge] = contour_color
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def save_overlay(path: str | os.PathLike, image, amap, mask=None, **kwargs) -> Path:
    """:func:`overlay` written to ``path`` (PNG) atomically; returns the path."""
    return atomic_save_image(path, overlay(image, amap, mask, **kwargs))


@dataclass
class ReportEntry:
    """One cell of the report: an image file (path) and its caption lines."""

    image: str | os.PathLike
    caption: str = ""
    score: float | None = None
    label: str | None = None   # e.g. the defect type


def _entries(entries) -> list[ReportEntry]:
    out = []
    for e in entries:
        if isinstance(e, ReportEntry):
            out.append(e)
        elif isinstance(e, dict):
            out.append(ReportEntry(**e))
        else:
            out.append(ReportEntry(image=e))
    return out


def _rel(p: str | os.PathLike, base: Path) -> str:
    p = Path(p)
    try:
        return Path(os.path.relpath(p.resolve(), base.resolve())).as_posix()
    except ValueError:   # another drive
        return p.resolve().as_uri()


def write_report(out_dir: str | os.PathLike, entries: Sequence, *, title: str = "RAAD report",
                 columns: int = 4, summary: dict | None = None, name: str = "report",
                 image_width: int = 200) -> tuple[Path, Path]:
    """Write ``<name>.html`` and ``<name>.md`` in ``out_dir`` showing ``entries`` in a grid.

    ``entries``: :class:`ReportEntry` objects, dicts with its fields, or image paths; image links
    are relative to ``out_dir``. ``summary`` (e.g. the metrics dict's top-level numbers) is shown
    as a table above the grid. Returns (html path, markdown path).
    """
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    out_dir = Path(out_dir)
    items = _entries(entries)

    def caption(e: ReportEntry) -> list[str]:
        lines = [e.label] if e.label else []
        if e.score is not None:
            lines.append(f"score {e.score:.4g}")
        if e.caption:
            lines.append(e.caption)
        return lines

    def fmt(v) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.4f}"
        return "n/a" if v is None else str(v)

    scalars = {k: v for k, v in (summary or {}).items() if not isinstance(v, (dict, list))}
    h = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
         f"<title>{html.escape(title)}</title>",
         "<style>body{font-family:sans-serif} table.grid td{vertical-align:top;padding:4px;"
         "font-size:12px;text-align:center} table.sum td{padding:2px 8px}</style>",
         "</head><body>", f"<h1>{html.escape(title)}</h1>"]
    md = [f"# {title}", ""]
    if scalars:
        h.append("<table class='sum'>")
        h += [f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(fmt(v))}</td></tr>"
              for k, v in scalars.items()]
        h.append("</table>")
        md += ["| metric | value |", "|---|---|"]
        md += [f"| {k} | {fmt(v)} |" for k, v in scalars.items()]
        md.append("")
    h.append("<table class='grid'>")
    ncol = min(columns, max(1, len(items)))
    if items:
        md += ["| " + " | ".join([""] * ncol) + " |", "|" + "---|" * ncol]
    for r in range(0, len(items), ncol):
        row = items[r:r + ncol]
        h.append("<tr>")
        cells = []
        for e in row:
            src = _rel(e.image, out_dir)
            cap = caption(e)
            h.append(f"<td><img src='{html.escape(src, quote=True)}' width='{image_width}'><br>"
                     + "<br>".join(html.escape(c) for c in cap) + "</td>")
            alt = (cap[0] if cap else Path(src).name).replace("|", "/").replace("]", ")")
            cells.append(f"![{alt}]({src.replace(' ', '%20')})<br>"
                         + "<br>".join(c.replace("|", "/") for c in cap))
        h.append("</tr>")
        md.append("| " + " | ".join(cells + [""] * (ncol - len(cells))) + " |")
    h += ["</table>", "</body></html>", ""]
    md.append("")
    html_path = atomic_write_text(out_dir / f"{name}.html", "\n".join(h))
    md_path = atomic_write_text(out_dir / f"{name}.md", "\n".join(md))
    return html_path, md_path


# ------------------------------------------------------------------------------------------------
# Calibrated overlays (raad predict, raad score with a stored threshold)
# ------------------------------------------------------------------------------------------------

#: where the decision threshold sits on the colour map (its middle: normal below, anomalous above)
THRESHOLD_LEVEL = 0.5


def calibrated_levels(amap, threshold: float, vmin: float, vmax: float) -> np.ndarray:
    """Anomaly map values -> colour-map positions in [0, 1]: ``vmin`` -> 0, ``threshold`` ->
    :data:`THRESHOLD_LEVEL`, ``vmax`` -> 1, linear in between (each side on its own), clipped.
    With ``vmax - threshold == threshold - vmin`` (as :func:`raad.threshold.calibrate` stores
    them) this is the image scores' normalisation applied to every pixel."""
    if not vmin < threshold < vmax:
        raise ValueError(f"calibrated colours need vmin < threshold < vmax, got {vmin}, {threshold}, {vmax}")
    a = np.asarray(amap, dtype=np.float64)
    below = THRESHOLD_LEVEL * (a - vmin) / (threshold - vmin)
    above = THRESHOLD_LEVEL + (1 - THRESHOLD_LEVEL) * (a - threshold) / (vmax - threshold)
    return np.clip(np.where(a < threshold, below, above), 0.0, 1.0)


def _outline(m: np.ndarray, width: int) -> np.ndarray:
    edge = m & ~ndimage.binary_erosion(m, structure=np.ones((3, 3), bool), border_value=0)
    return ndimage.binary_dilation(edge, iterations=width - 1) if width > 1 else edge


def calibrated_overlay(image, amap, threshold: float, vmin: float, vmax: float, mask=None, *,
                       min_side: int = 256, alpha: float = 0.6, fade: float = 0.25,
                       cmap: str = "turbo", outline: tuple[int, int, int] | None = (255, 255, 255),
                       mask_color: tuple[int, int, int] = (255, 0, 255),
                       use_matplotlib: bool = True) -> Image.Image:
    """The image with its anomaly map coloured on the calibrated scale (see
    :func:`calibrated_levels`: the threshold at the colour map's middle), at the image's own
    resolution, scaled up so its shorter side is at least ``min_side`` pixels.

    Where the map is at or above the threshold the colour is blended at ``alpha``; below, its
    weight fades linearly to nothing at level ``fade`` (a normal image shows itself, with at most
    a faint tint where it comes closest to the threshold). ``outline``: the colour of the
    outline of the region at or above the threshold (None: none). ``mask``: a ground-truth mask
    (any resolution), outlined in ``mask_color``.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0 <= fade < THRESHOLD_LEVEL:
        raise ValueError(f"fade must be in [0, {THRESHOLD_LEVEL}), got {fade}")
    img = _as_rgb(image)
    scale = max(1.0, min_side / max(1, min(img.width, img.height)))
    if scale > 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    hw = (img.height, img.width)
    a = _resize_float(np.asarray(amap, dtype=np.float64), hw)
    level = calibrated_levels(a, threshold, vmin, vmax)
    heat = _lut(cmap, use_matplotlib)[np.clip(np.rint(level * 255), 0, 255).astype(np.intp)]
    w = alpha * np.clip((level - fade) / (THRESHOLD_LEVEL - fade), 0.0, 1.0)[..., None]
    out = (1 - w) * np.asarray(img, dtype=np.float64) + w * heat
    width = max(1, round(min(hw) / 256))
    if outline is not None:
        out[_outline(a >= threshold, width)] = outline
    if mask is not None:
        m = _mask_at(mask, hw)
        out[_outline(m, width)] = mask_color
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):   # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def prediction_panel(image, amap, threshold: float, vmin: float, vmax: float, mask=None, *,
                     title: str = "", min_side: int = 256, cmap: str = "turbo",
                     use_matplotlib: bool = True, **kwargs) -> Image.Image:
    """The image and its :func:`calibrated_overlay` side by side (both at the overlay's
    resolution), ``title`` above them and the colour bar below, its threshold marked."""
    from PIL import ImageDraw
    src = _as_rgb(image)
    over = calibrated_overlay(src, amap, threshold, vmin, vmax, mask, min_side=min_side, cmap=cmap,
                              use_matplotlib=use_matplotlib, **kwargs)
    W, H = over.size
    img = src if src.size == (W, H) else src.resize((W, H), Image.Resampling.BICUBIC)
    gap = max(4, W // 64)
    fs = max(11, min(W, H) // 18)
    head = fs + 2 * gap if title else 0
    bar_h = max(6, H // 32)
    foot = bar_h + fs + 3 * gap
    panel = Image.new("RGB", (2 * W + gap, head + H + foot), (255, 255, 255))
    panel.paste(img, (0, head))
    panel.paste(over, (W + gap, head))
    draw = ImageDraw.Draw(panel)
    font = _font(fs)
    if title:
        draw.text((gap, gap), title, fill=(0, 0, 0), font=font)
    y0 = head + H + gap
    x0 = W + gap
    ramp = _lut(cmap, use_matplotlib)[np.clip(np.rint(np.linspace(0, 255, W)), 0, 255).astype(np.intp)]
    panel.paste(Image.fromarray(np.repeat(ramp[None], bar_h, axis=0)), (x0, y0))
    xt = x0 + round(THRESHOLD_LEVEL * (W - 1))
    draw.line([(xt, y0 - gap // 2), (xt, y0 + bar_h + gap // 2)], fill=(0, 0, 0), width=max(1, W // 256))
    ty = y0 + bar_h + gap
    draw.text((x0, ty), f"{vmin:.3g}", fill=(0, 0, 0), font=font)
    label = f"threshold {threshold:.4g}"
    tw = draw.textlength(label, font=font)
    draw.text((max(x0, xt - tw / 2), ty), label, fill=(0, 0, 0), font=font)
    right = f"{vmax:.3g}"
    draw.text((x0 + W - draw.textlength(right, font=font), ty), right, fill=(0, 0, 0), font=font)
    return panel


def save_prediction_panel(path: str | os.PathLike, image, amap, threshold: float, vmin: float,
                          vmax: float, mask=None, **kwargs) -> Path:
    """:func:`prediction_panel` written to ``path`` (PNG) atomically; returns the path."""
    return atomic_save_image(path, prediction_panel(image, amap, threshold, vmin, vmax, mask, **kwargs))
