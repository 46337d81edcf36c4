"""The build scripts of the host-emulated extensions (csrc/cuda/emu, csrc/cpu/emu), loaded by
path: they live beside the C++ sources, not in the package."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def load_builder(relpath: str):
    """The module at ``csrc/<relpath>`` (e.g. "cpu/emu/build_avx512_emu.py")."""
    path = CSRC / relpath
    spec = importlib.util.spec_from_file_location(f"raad_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.lru_cache(maxsize=None)
def avx512_emulated(native_avx512: bool, avx2: bool):
    """(module, why): the CPU extension rebuilt with its AVX-512 kernels emulated by SIMDe
    (csrc/cpu/emu/build_avx512_emu.py) on a CPU without AVX-512, so that code is tested there
    too; module None (with the reason) where it is not needed or cannot be built. Built once per
    test process and shared by the attention and nearest-neighbour tests. ``RAAD_CPU_AVX512_EMU``:
    0 never builds it, 1 builds it on an AVX-512 CPU too (to check the emulated build there:
    a source missing from it once went unseen on the AVX-512 development machine)."""
    env = os.environ.get("RAAD_CPU_AVX512_EMU")
    if env == "0":
        return None, "RAAD_CPU_AVX512_EMU=0"
    if native_avx512 and env != "1":
        return None, "this CPU runs the AVX-512 kernels natively"
    if not avx2:
        return None, "the emulated build needs an AVX2 CPU"
    mod = load_builder("cpu/emu/build_avx512_emu.py")
    if mod.simde_include() is None:
        return None, "SIMDe headers not found (apt-get install libsimde-dev)"
    try:
        return mod.build(), ""
    except Exception as e:  # noqa: BLE001 - reported as a failure by test_avx512_kernels_are_tested_here
        return None, f"BUILD FAILED: {type(e).__name__}: {str(e)[-2000:]}"
