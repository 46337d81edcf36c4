"""VisA converted to the MVTec AD layout (:func:`convert_visa`), so ``raad fit`` and ``raad
score`` read it like any other data folder."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .dataset import DataError, _decode, _json, validate, write_categories
from .io import atomic_save_image, atomic_write_text

__all__ = ["convert_visa", "VISA_CSV"]

VISA_CSV = Path("split_csv") / "1cls.csv"
_VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def convert_visa(visa_root: str | os.PathLike, out_root: str | os.PathLike,
                 categories: Sequence[str] | None = None, *, overwrite: bool = False,
                 check: bool = True) -> list[Path]:
    """Convert VisA (``split_csv/1cls.csv``) to the MVTec layout under ``out_root``.

    For each object: ``train/good`` (train, normal), ``test/good`` (test, normal), ``test/bad``
    (test, anomaly) and ``ground_truth/bad/<stem>_mask.png`` (VisA mask, nonzero -> 255, else 0).
    Images are copied byte for byte (VisA ships JPG; the loader takes any image extension).

    The whole CSV is checked first (columns, split and label values, that every listed file
    exists, name clashes); all problems are raised together, each naming its CSV line. Each
    category is then built in a hidden temporary folder inside ``out_root``, validated with
    :func:`validate` when ``check``, and renamed into place only once every category succeeded;
    on any failure nothing is left behind. Existing category folders are an error unless
    ``overwrite``. Returns the category folders written.
    """
    visa_root, out_root = Path(visa_root), Path(out_root)
    if not visa_root.is_dir():
        raise DataError(f"VisA folder does not exist: {visa_root}")
    csv_path = visa_root / VISA_CSV
    if not csv_path.is_file():
        raise DataError(f"VisA split file not found: {csv_path} (expected the VisA release's "
                        f"split_csv/1cls.csv with columns {','.join(_VISA_COLUMNS)})")

    problems: list[tuple[Path, str]] = []
    plans: dict[str, list[tuple[int, Path, str, Path | None]]] = {}  # cat -> (line, src, dst, mask)
    where = VISA_CSV.as_posix()
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {missing}; found "
                            f"{reader.fieldnames} (expected {','.join(_VISA_COLUMNS)})")
        rows = [(reader.line_num, row) for row in reader]
    available = sorted({(r["object"] or "").strip() for _, r in rows} - {""})
    if categories is not None:
        unknown = sorted(set(categories) - set(available))
        if unknown:
            raise DataError(f"{csv_path}: unknown VisA object(s) {unknown}; the CSV lists "
                            f"{available}")
    wanted = set(categories) if categories is not None else set(available)
    taken: dict[tuple[str, str], int] = {}
    for line, row in rows:
        obj = (row["object"] or "").strip()
        split = (row["split"] or "").strip().lower()
        label = (row["label"] or "").strip().lower()
        image = (row["image"] or "").strip()
        mask = (row["mask"] or "").strip()
        def bad(msg: str, line=line) -> None:
            problems.append((csv_path, f"line {line}: {msg}"))

        if not obj:
            bad("empty object")
            continue
        if obj not in wanted:
            continue
        if split not in ("train", "test"):
            bad(f"split must be train or test, got {row['split']!r}")
            continue
        if label not in ("normal", "anomaly"):
            bad(f"label must be normal or anomaly, got {row['label']!r}")
            continue
        if split == "train" and label == "anomaly":
            bad("anomaly image in the train split (training uses normal images only)")
            continue
        src = visa_root / image
        if not image or not src.is_file():
            bad(f"image not found: {src}")
            continue
        mask_src = None
        if label == "anomaly":
            if not mask:
                bad("anomaly image without a mask")
                continue
            mask_src = visa_root / mask
            if not mask_src.is_file():
                bad(f"mask not found: {mask_src}")
                continue
        sub = "train/good" if split == "train" else ("test/good" if label == "normal"
                                                      else "test/bad")
        dst = f"{sub}/{src.name}"
        clash_key = (obj, f"{sub}/{src.stem}")
        if clash_key in taken:
            bad(f"{obj}/{dst} would also be written by line {taken[clash_key]} (same file name)")
            continue
        taken[clash_key] = line
        plans.setdefault(obj, []).append((line, src, dst, mask_src))
    for obj in sorted(wanted):
        if not any(d.startswith("train/good/") for _, _, d, _ in plans.get(obj, [])):
            problems.append((csv_path, f"object {obj}: no train/normal rows"))
    if problems:
        raise DataError(problems, root=visa_root)

    names = sorted(plans)

    def fill(obj: str, tmp: Path) -> None:
        n = {"train/good": 0, "test/good": 0, "test/bad": 0}
        origin: dict[str, tuple[int, Path]] = {}   # converted file -> (CSV line, source)
        for line, src, dst, mask_src in plans[obj]:
            target = tmp / dst
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            n[dst.rsplit("/", 1)[0]] += 1
            origin[dst] = (line, src)
            if mask_src is not None:
                origin[f"ground_truth/bad/{src.stem}_mask.png"] = (line, mask_src)
            if mask_src is None:
                continue
            mim, err = _decode(mask_src)
            if err:
                problems.append((csv_path, f"line {line}: mask {mask_src}: {err}"))
                continue
            arr = np.asarray(mim)
            if arr.ndim == 3:
                arr = arr.any(axis=-1) if arr.shape[-1] < 4 else arr[..., :3].any(axis=-1)
            m = np.where(arr != 0, 255, 0).astype(np.uint8)
            atomic_save_image(tmp / "ground_truth" / "bad" / f"{src.stem}_mask.png",
                              Image.fromarray(m, mode="L"))
        atomic_write_text(tmp / "meta.json", _json({
            "category": obj, "source": "VisA", "split_file": VISA_CSV.as_posix(),
            "counts": n, "defects": {"bad": "VisA anomaly (all types together)"},
            "mask_rule": "VisA mask nonzero -> 255"}))
        if check and not problems:
            try:
                validate(tmp)
            except DataError as e:
                for p, msg in e.problems:
                    rel = (p.relative_to(tmp) if p is not None else Path()).as_posix()
                    if rel in origin:
                        line, src = origin[rel]
                        problems.append((src, f"{where} line {line}: {msg} (converted to "
                                              f"{obj}/{rel})"))
                    else:
                        problems.append((out_root / obj / rel, f"{msg} (after conversion)"))

    def refuse_on_problems() -> None:
        if problems:
            raise DataError(problems, root=visa_root)

    return write_categories(out_root, names, overwrite, fill, before_install=refuse_on_problems)
