"""The build scripts of the host-emulated extensions (csrc/cuda/emu, csrc/cpu/emu), loaded by
path: they live beside the C++ sources, not in the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def load_builder(relpath: str):
    """The module at ``csrc/<relpath>`` (e.g. "cpu/emu/build_avx512_emu.py")."""
    path = CSRC / relpath
    spec = importlib.util.spec_from_file_location(f"raad_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
