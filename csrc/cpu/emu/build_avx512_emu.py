"""Build the CPU extension with its AVX-512 VNNI kernels emulated by SIMDe (``raad_cpu_avx512_emu``),
for testing those kernels on a CPU without AVX-512 (this project's development and CI machines).

    python csrc/cpu/emu/build_avx512_emu.py      # prints the path of the built module

Needs the SIMDe headers (Debian/Ubuntu: ``apt-get install libsimde-dev``; or set SIMDE_INCLUDE to
a folder holding ``simde/``) and an AVX2 CPU. The module reports AVX-512 VNNI as present, so its
first-use self-check and every ``isa="avx512"`` call run the real kernel code on emulated
instructions. Correctness only: the emulation is many times slower than the hardware.
Built by the tests (tests/emu_builders.py) on an AVX2 CPU without AVX-512, and on any AVX2 CPU
with RAAD_CPU_AVX512_EMU=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent
# every CPU source, as setup.py builds them: a list kept by hand missed the files added later
# (the nearest-neighbour search), and the module then failed to load on an undefined symbol
SOURCES = sorted(str(p.relative_to(CSRC)) for p in (CSRC / "cpu").glob("*.cpp")) + ["bindings/cpu_bindings.cpp"]


def simde_include() -> str | None:
    for d in filter(None, [os.environ.get("SIMDE_INCLUDE"), "/usr/include", "/usr/local/include"]):
        if (Path(d) / "simde" / "x86" / "avx512.h").exists():
            return d
    return None


def build(verbose: bool = False):
    from torch.utils.cpp_extension import load

    inc = simde_include()
    if inc is None:
        raise RuntimeError("the SIMDe headers were not found (apt-get install libsimde-dev, or set "
                           "SIMDE_INCLUDE to the folder that holds simde/)")
    name = "raad_cpu_avx512_emu"
    build_dir = CSRC.parent / "build" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-O2", "-std=c++20", "-fopenmp", "-mavx2", "-mfma", "-mf16c", "-DRAAD_SIMDE_AVX512",
             "-Wno-psabi", "-Wno-unused-function"]
    return load(name=name, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=flags,
                extra_ldflags=["-fopenmp"], extra_include_paths=[str(CSRC), inc],
                build_directory=str(build_dir), verbose=verbose, with_cuda=False)


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv).__file__)
