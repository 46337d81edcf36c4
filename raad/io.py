"""Atomic file writes: write to a temporary file in the target's folder, then ``os.replace``.

A reader (or a crash) never sees a half-written file: the target either keeps its old content or
has the new one. The temporary file lives in the same folder so the final rename never crosses
file systems. Parent folders are created as needed.
"""

from __future__ import annotations

import contextlib
import io as _io
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_save_npz",
    "atomic_save_image",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit it replaces ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched. The temporary
    name starts with ``.`` and ends with ``.tmp`` so folder scans that skip hidden files ignore it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if fsync:
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8",
                      fsync: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 by default, ``\\n`` line ends kept as is)."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def atomic_save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray] | None = None, *,
                    compressed: bool = True, fsync: bool = False, **kwargs: np.ndarray) -> Path:
    """``np.savez[_compressed]`` to ``path`` atomically.

    Arrays come from the ``arrays`` mapping (keys may contain ``/``, e.g. ``scratch/000.png``)
    and/or keyword arguments. The file name is used exactly as given (no ``.npz`` is appended).
    """
    data = dict(arrays or {})
    clash = set(data) & set(kwargs)
    if clash:
        raise ValueError(f"atomic_save_npz: key(s) given twice: {sorted(clash)}")
    data.update(kwargs)
    buf = _io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **data)
    return atomic_write_bytes(path, buf.getvalue(), fsync=fsync)


def atomic_save_image(path: str | os.PathLike, image, *, format: str | None = None,
                      fsync: bool = False, **save_kwargs) -> Path:
    """Save a PIL image (or a uint8 ``HxW``/``HxWx3``/``HxWx4`` array) atomically.

    The format follows the suffix of ``path`` unless ``format`` is given. PNGs are written with a
    fixed compression level and no metadata, so equal pixels give byte-identical files.
    """
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"atomic_save_image: array must be uint8, got {image.dtype}")
        image = Image.fromarray(image)
    path = Path(path)
    fmt = format or Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"atomic_save_image: cannot tell the image format of {path}")
    if fmt == "PNG":
        save_kwargs.setdefault("compress_level", 6)
    buf = _io.BytesIO()
    image.save(buf, format=fmt, **save_kwargs)
    return atomic_write_bytes(path, buf.getvalue(), fsync=fsync)
