"""The MVTec AD folder layout: discovery, validation, image and mask loading, datasets.

Layout (one category)::

    CATEGORY/train/good/*.png                       normal training images
    CATEGORY/test/good/*.png                        normal test images
    CATEGORY/test/<defect>/*.png                    anomalous test images, one folder per type
    CATEGORY/ground_truth/<defect>/<stem>_mask.png  their masks (``<stem>.png`` also accepted)

A data folder is either one category or a folder of categories. Test images are keyed by their
path relative to ``CATEGORY/test`` with ``/`` separators, e.g. ``scratch/000.png``.

Masks: a pixel is defective when its 8-bit grey value is **> 127** (``MASK_THRESHOLD``); masks
in other modes are converted to 8-bit grey first (mode ``1`` masks are used as they are). Masks
written by this package are 0/255. A defect image whose mask has no pixel above the threshold is
a validation error (the message gives the mask's largest value, so a 0/1 mask is easy to spot).

Validation (:func:`validate`) decodes every image and mask completely (``Image.open`` then
``load``; truncated files fail), checks every rule, and raises one :class:`DataError` listing all
problems it found, each naming the file. Nothing in this module's loading path writes anything.
The writers of category folders (:mod:`raad.synthetic`, :mod:`raad.visa`) share the helpers at
the end of this module, which build each folder in a hidden temporary folder and rename it into
place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from .io import atomic_save_image

__all__ = [
    "DataError", "TestItem", "Category", "IMAGE_EXTS", "MASK_THRESHOLD", "GOOD",
    "IMAGENET_MEAN", "IMAGENET_STD",
    "is_category_dir", "category_dirs", "list_categories", "load_category", "load_data_dir",
    "validate", "validate_data_dir",
    "open_rgb", "to_tensor", "load_image", "load_mask", "load_test_mask", "image_size",
    "ImageDataset", "TestDataset", "color_jitter",
]

GOOD = "good"
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
#: an 8-bit mask value strictly above this is a defect pixel
MASK_THRESHOLD = 127
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: problems listed in a DataError's message (all of them are in ``DataError.problems``)
MAX_LISTED = 20


# ------------------------------------------------------------------------------------------------
# Errors and descriptions
# ------------------------------------------------------------------------------------------------

class DataError(ValueError):
    """A data folder is missing or invalid.

    ``problems`` holds every problem found as ``(path, what is wrong)``; the message lists the
    first :data:`MAX_LISTED` with paths relative to ``root``.
    """

    def __init__(self, problems: Sequence[tuple[Path | str, str]] | str,
                 root: Path | str | None = None, max_listed: int = MAX_LISTED):
        if isinstance(problems, str):
            problems = [("", problems)]
        self.problems = [(Path(p) if p != "" else None, msg) for p, msg in problems]
        self.root = Path(root) if root is not None else None
        super().__init__(self._format(max_listed))

    def _rel(self, p: Path | None) -> str:
        if p is None:
            return ""
        if self.root is not None:
            try:
                return p.relative_to(self.root).as_posix()
            except ValueError:
                pass
        return str(p)

    def _format(self, max_listed: int) -> str:
        n = len(self.problems)
        if n == 1 and self.problems[0][0] is None:
            return self.problems[0][1]
        where = f" in {self.root}" if self.root is not None else ""
        lines = [f"{n} problem{'s' if n != 1 else ''}{where}:"]
        for p, msg in self.problems[:max_listed]:
            rel = self._rel(p)
            lines.append(f"  - {rel}: {msg}" if rel else f"  - {msg}")
        if n > max_listed:
            lines.append(f"  ... and {n - max_listed} more (all are in DataError.problems)")
        return "\n".join(lines)


@dataclass(frozen=True)
class TestItem:
    """One test image. ``label`` is 0 for ``good`` and 1 for every defect type."""

    path: Path
    key: str                 # path relative to CATEGORY/test, '/'-separated: "scratch/000.png"
    defect: str              # "good" or the defect folder name
    label: int
    mask_path: Path | None   # None for good images

    __test__ = False  # not a pytest test class


@dataclass
class Category:
    """One category in the MVTec layout (from :func:`load_category` or :func:`validate`)."""

    name: str
    root: Path
    train: list[Path]
    test: list[TestItem] = field(default_factory=list)

    @property
    def defect_types(self) -> list[str]:
        """Defect folder names present in the test set, sorted, without ``good``."""
        return sorted({t.defect for t in self.test if t.defect != GOOD})

    @property
    def labels(self) -> np.ndarray:
        return np.array([t.label for t in self.test], dtype=np.int64)

    @property
    def keys(self) -> list[str]:
        return [t.key for t in self.test]

    def items(self, defect: str | None = None) -> list[TestItem]:
        return [t for t in self.test if defect is None or t.defect == defect]


# ------------------------------------------------------------------------------------------------
# Discovery
# ------------------------------------------------------------------------------------------------

def _natural_key(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir()
             if _visible(p) and p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    return sorted(files, key=lambda p: _natural_key(p.name))


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _visible(p) and p.is_dir()),
                  key=lambda p: _natural_key(p.name))


def is_category_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` looks like one category (it has ``train/`` or ``test/``)."""
    p = Path(path)
    return (p / "train").is_dir() or (p / "test").is_dir()


def _check_exists(data_dir: Path) -> None:
    if not data_dir.exists():
        raise DataError(f"data folder does not exist: {data_dir}")
    if not data_dir.is_dir():
        raise DataError(f"data folder is not a folder: {data_dir}")


def category_dirs(data_dir: str | os.PathLike) -> list[Path]:
    """The category folders of ``data_dir``: itself when it is one category, otherwise its
    (non-hidden) sub-folders that are categories, sorted by name."""
    data_dir = Path(data_dir)
    _check_exists(data_dir)
    if is_category_dir(data_dir):
        return [data_dir]
    cats = [p for p in _subdirs(data_dir) if is_category_dir(p)]
    if not cats:
        seen = ", ".join(p.name for p in _subdirs(data_dir)[:10]) or "no sub-folders"
        raise DataError(
            f"no category found in {data_dir}: expected CATEGORY/train/good/*.png and "
            f"CATEGORY/test/<defect>/*.png (MVTec AD layout), either in this folder or in its "
            f"sub-folders (found: {seen})")
    return cats


def list_categories(data_dir: str | os.PathLike) -> list[str]:
    """Names of the categories in ``data_dir`` (see :func:`category_dirs`)."""
    return [p.name for p in category_dirs(data_dir)]


def _mask_index(folder: Path) -> dict[str, Path]:
    """stem (without a trailing ``_mask``) -> mask path; ``<stem>_mask.*`` wins over ``<stem>.*``."""
    index: dict[str, Path] = {}
    for p in _image_files(folder):
        stem = p.stem
        if stem.endswith("_mask"):
            index[stem[:-5]] = p
        else:
            index.setdefault(stem, p)
    return index


def _scan(category_dir: Path, need_test: bool) -> tuple[Category, list[tuple[Path, str]]]:
    """Walk one category folder (no decoding). Returns the description and structural problems."""
    problems: list[tuple[Path, str]] = []
    train_dir = category_dir / "train"
    good_dir = train_dir / GOOD
    if not good_dir.is_dir():
        problems.append((good_dir, "missing folder (normal training images go in train/good/)"))
        train: list[Path] = []
    else:
        train = _image_files(good_dir)
        if not train:
            problems.append((good_dir, f"no training images (looked for {sorted(IMAGE_EXTS)})"))
    for d in _subdirs(train_dir):
        if d.name != GOOD:
            problems.append((d, "unexpected folder: train/ may hold only good/ (training uses "
                                "normal images only)"))

    test_dir = category_dir / "test"
    gt_dir = category_dir / "ground_truth"
    items: list[TestItem] = []
    for p in _image_files(test_dir):
        problems.append((p, "test image outside a defect folder (use test/good/ or "
                            "test/<defect>/)"))
    defect_dirs = _subdirs(test_dir)
    for d in defect_dirs:
        defect = d.name
        images = _image_files(d)
        masks = _mask_index(gt_dir / defect) if defect != GOOD else {}
        stems = set()
        for p in images:
            stems.add(p.stem)
            mask = masks.get(p.stem)
            if defect != GOOD and mask is None:
                problems.append((p, f"defect image without a mask (expected "
                                    f"ground_truth/{defect}/{p.stem}_mask.png)"))
            items.append(TestItem(path=p, key=f"{defect}/{p.name}", defect=defect,
                                  label=0 if defect == GOOD else 1, mask_path=mask))
        for stem, m in sorted(masks.items()):
            if stem not in stems:
                problems.append((m, f"mask without a test image (expected test/{defect}/"
                                    f"{stem}.png or another image extension)"))
    test_names = {d.name for d in defect_dirs}
    for g in _subdirs(gt_dir):
        if g.name != GOOD and g.name not in test_names and _image_files(g):
            problems.append((g, f"masks for a defect type with no test/{g.name}/ folder"))
    if need_test and not items:
        problems.append((test_dir, "no test images (expected test/good/*.png and "
                                   "test/<defect>/*.png)"))
    cat = Category(name=category_dir.resolve().name, root=category_dir, train=train, test=items)
    return cat, problems


def load_category(category_dir: str | os.PathLike, *, check: bool = True,
                  need_test: bool = True) -> Category:
    """Describe one category. With ``check`` (default) it is fully validated first
    (:func:`validate`); without, only the folder structure is read (nothing is decoded)."""
    category_dir = Path(category_dir)
    if check:
        return validate(category_dir, need_test=need_test)
    _check_exists(category_dir)
    return _scan(category_dir, need_test)[0]


def load_data_dir(data_dir: str | os.PathLike, *, check: bool = True,
                  need_test: bool = True) -> list[Category]:
    """Every category of ``data_dir`` (itself one category, or a folder of them)."""
    if check:
        return validate_data_dir(data_dir, need_test=need_test)
    return [load_category(p, check=False, need_test=need_test) for p in category_dirs(data_dir)]


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

def _decode(path: Path) -> tuple[Image.Image | None, str | None]:
    try:
        im = Image.open(path)
        im.load()
        return im, None
    except Exception as e:  # noqa: BLE001 - every decoder failure is a data problem
        return None, f"cannot decode image ({type(e).__name__}: {e})"


def _mask_array(im: Image.Image) -> np.ndarray:
    if im.mode == "1":
        return np.array(im, dtype=bool)
    if im.mode != "L":
        im = im.convert("L")
    return np.asarray(im) > MASK_THRESHOLD


def _check_train(path: Path) -> list[tuple[Path, str]]:
    im, err = _decode(path)
    if im is not None:
        im.close()
    return [(path, err)] if err else []


def _check_test(item: TestItem) -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    im, err = _decode(item.path)
    if err:
        out.append((item.path, err))
    size = im.size if im is not None else None
    if im is not None:
        im.close()
    if item.mask_path is None:
        return out
    m, err = _decode(item.mask_path)
    if err:
        out.append((item.mask_path, err))
        return out
    if size is not None and m.size != size:
        out.append((item.mask_path, f"mask is {m.size[0]}x{m.size[1]} but its image "
                                    f"test/{item.key} is {size[0]}x{size[1]} (width x height)"))
    arr = _mask_array(m)
    if not arr.any():
        hi = int(np.asarray(m.convert("L")).max())
        hint = " (a 0/1 mask? masks must be 0/255)" if 0 < hi <= MASK_THRESHOLD else ""
        out.append((item.mask_path, f"mask has no defect pixel (no value > {MASK_THRESHOLD}; "
                                    f"largest value {hi}){hint}"))
    m.close()
    return out


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _validate_one(category_dir: Path, need_test: bool) -> tuple[Category, list]:
    cat, problems = _scan(category_dir, need_test)
    with ThreadPoolExecutor(_workers()) as ex:
        for res in ex.map(_check_train, cat.train):
            problems.extend(res)
        for res in ex.map(_check_test, cat.test):
            problems.extend(res)
    return cat, problems


def validate(category_dir: str | os.PathLike, *, need_test: bool = True,
             max_listed: int = MAX_LISTED) -> Category:
    """Check one category completely and return its description.

    Decodes every training image, test image and mask; checks that ``train/good`` has images,
    that every defect image has a mask of its own size with at least one defect pixel, that every
    mask belongs to a test image, and that the layout is the MVTec one. All problems found are
    raised together as one :class:`DataError`. Reads only; writes nothing.
    """
    category_dir = Path(category_dir)
    _check_exists(category_dir)
    cat, problems = _validate_one(category_dir, need_test)
    if problems:
        raise DataError(problems, root=category_dir, max_listed=max_listed)
    return cat


def validate_data_dir(data_dir: str | os.PathLike, *, need_test: bool = True,
                      max_listed: int = MAX_LISTED) -> list[Category]:
    """:func:`validate` every category of ``data_dir``; problems of all categories are raised
    together (paths relative to ``data_dir``)."""
    data_dir = Path(data_dir)
    dirs = category_dirs(data_dir)
    cats, problems = [], []
    for d in dirs:
        c, p = _validate_one(d, need_test)
        cats.append(c)
        problems.extend(p)
    if problems:
        root = data_dir if len(dirs) > 1 or dirs[0] != data_dir else dirs[0]
        raise DataError(problems, root=root, max_listed=max_listed)
    return cats


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

def _size_hw(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def open_rgb(path: str | os.PathLike, size: int | Sequence[int] | None = None) -> Image.Image:
    """Decode an image as RGB, resized (bilinear, antialiased) to ``size`` = int or (h, w)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    hw = _size_hw(size)
    if hw is not None and (im.height, im.width) != hw:
        im = im.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
    return im


def to_tensor(img: Image.Image, normalize: bool = True) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [0, 1], ImageNet-normalised if asked."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    if normalize:
        a = (a - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def load_image(path: str | os.PathLike, size: int | Sequence[int] | None = None,
               normalize: bool = True) -> torch.Tensor:
    """An image file as a float32 tensor (3, H, W); see :func:`open_rgb`, :func:`to_tensor`."""
    return to_tensor(open_rgb(path, size), normalize)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file, read from its header."""
    with Image.open(path) as im:
        return im.height, im.width


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file as a bool array (H, W) at its own resolution (value > MASK_THRESHOLD)."""
    with Image.open(path) as im:
        im.load()
        return _mask_array(im)


def load_test_mask(item: TestItem) -> np.ndarray:
    """The mask of a test item at the image's resolution; all False for good images."""
    if item.mask_path is None:
        return np.zeros(image_size(item.path), dtype=bool)
    return load_mask(item.mask_path)


class ImageDataset(torch.utils.data.Dataset):
    """Images as float32 tensors (3, H, W), e.g. ``Category.train``.

    ``augment`` (optional) maps the resized RGB PIL image to another PIL image before it becomes
    a tensor (see :func:`color_jitter`). ``cache`` keeps the decoded, resized images in memory.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], size: int | Sequence[int],
                 normalize: bool = True, augment: Callable[[Image.Image], Image.Image] | None = None,
                 cache: bool = False):
        self.paths = [Path(p) for p in paths]
        self.size = _size_hw(size)
        self.normalize = normalize
        self.augment = augment
        self._cache: dict[int, Image.Image] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> Image.Image:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        im = open_rgb(self.paths[i], self.size)
        if self._cache is not None:
            self._cache[i] = im
        return im

    def __getitem__(self, i: int) -> torch.Tensor:
        im = self.image(i)
        if self.augment is not None:
            im = self.augment(im)
        return to_tensor(im, self.normalize)


class TestDataset(torch.utils.data.Dataset):
    """Test items as dicts ``{"image": (3,H,W) tensor, "label": int, "key": str, "index": int}``
    (the default collate batches them). Masks stay out: use :func:`load_test_mask`."""

    __test__ = False

    def __init__(self, items: Sequence[TestItem], size: int | Sequence[int],
                 normalize: bool = True):
        self.items = list(items)
        self.size = _size_hw(size)
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        t = self.items[i]
        return {"image": load_image(t.path, self.size, self.normalize), "label": t.label,
                "key": t.key, "index": i}


def color_jitter(brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
                 seed: int | None = None) -> Callable[[Image.Image], Image.Image]:
    """An ``augment`` hook: random brightness/contrast/saturation factors in ``1 ± x``.

    It draws from its own generator (``seed``); DataLoader workers each get a copy of it, so use
    ``num_workers=0`` or reseed per worker when the exact sequence matters.
    """
    from PIL import ImageEnhance

    rng = np.random.default_rng(seed)

    def apply(im: Image.Image) -> Image.Image:
        for enh, x in ((ImageEnhance.Brightness, brightness), (ImageEnhance.Contrast, contrast),
                       (ImageEnhance.Color, saturation)):
            if x > 0:
                im = enh(im).enhance(float(rng.uniform(1 - x, 1 + x)))
        return im

    return apply


# ------------------------------------------------------------------------------------------------
# Category folders written atomically (shared by raad.synthetic and raad.visa)
# ------------------------------------------------------------------------------------------------

def _check_targets(out_root: Path, names: Iterable[str], overwrite: bool) -> None:
    if out_root.exists() and not out_root.is_dir():
        raise DataError(f"output folder is a file: {out_root}")
    existing = [n for n in names if (out_root / n).exists()]
    if existing and not overwrite:
        raise DataError([(out_root / n, "already exists (replace it with --overwrite, or "
                                        "overwrite=True from Python)") for n in existing], root=out_root)


def _install(tmp: Path, final: Path) -> None:
    """Move a finished temporary category folder into place (replacing an old one)."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rmdir(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def check_generator_args(kind: str, known, cats, n_train: int, n_test_good: int, n_test_defect: int,
                         size: int, min_size: int, seed: int) -> None:
    """The checks every category generator makes of its arguments (``kind`` names it)."""
    unknown = [c for c in cats if c not in known]
    if unknown:
        raise DataError(f"unknown {kind} categor{'y' if len(unknown) == 1 else 'ies'} "
                        f"{unknown}; known: {list(known)}")
    if len(set(cats)) != len(cats):
        raise DataError(f"categories listed twice: {cats}")
    if n_train < 1 or min(n_test_good, n_test_defect) < 0:
        raise DataError(f"need n_train >= 1 and non-negative test counts, got n_train={n_train} "
                        f"n_test_good={n_test_good} n_test_defect={n_test_defect}")
    if int(size) < min_size:
        raise DataError(f"size must be at least {min_size} pixels, got {size}")
    if int(seed) < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}")


def write_categories(out_root: Path, names: Sequence[str], overwrite: bool,
                     fill: Callable[[str, Path], None],
                     before_install: Callable[[], None] | None = None) -> list[Path]:
    """Each category built by ``fill(name, folder)`` in a hidden temporary folder inside
    ``out_root``, then all renamed into place (an existing one replaced only with
    ``overwrite``); a failure, in ``fill`` or in ``before_install`` (called once all are
    built), leaves the existing folders as they were."""
    _check_targets(out_root, names, overwrite)
    out_root.mkdir(parents=True, exist_ok=True)
    temps: dict[str, Path] = {}
    try:
        for name in names:
            temps[name] = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_root))
            fill(name, temps[name])
        if before_install is not None:
            before_install()
        for name in names:
            _install(temps.pop(name), out_root / name)
    finally:
        for tmp in temps.values():
            shutil.rmtree(tmp, ignore_errors=True)
    return [out_root / n for n in names]


def write_samples(folder: Path, defects: Sequence[str], counts: tuple[int, int, int],
                  sample: Callable[[str, str, int], tuple[np.ndarray, np.ndarray]],
                  progress=None) -> dict[str, int]:
    """A generated category's images and masks in the MVTec layout: ``counts`` = (training
    images, good test images, test images per defect type), each ``sample(split, defect,
    index)`` -> (uint8 image, bool mask); returns the image count per folder."""
    n_train, n_good, n_defect = counts
    jobs = [("train", GOOD, "train/good", n_train), ("test", GOOD, "test/good", n_good)]
    jobs += [("test", d, f"test/{d}", n_defect) for d in defects]
    for split, defect, sub, n in jobs:
        for i in range(n):
            img, mask = sample(split, defect, i)
            atomic_save_image(folder / sub / f"{i:03d}.png", img)
            if defect != GOOD:
                atomic_save_image(folder / "ground_truth" / defect / f"{i:03d}_mask.png",
                                  (mask * np.uint8(255)).astype(np.uint8))
            if progress is not None:
                progress()
    return {sub: n for _, _, sub, n in jobs}
