"""Build the host-emulated CUDA extension (``raad_cuda_emu``): the kernels of csrc/cuda compiled as
C++ with RAAD_EMU against emu.h, bound to CPU tensors by the same binding code as the real one.

    python csrc/cuda/emu/build_emu.py [--no-s4]     # prints the path of the built module

``--no-s4`` builds the sm_90 code path (int4/int2 unpacked to int8 before the mma).
Used by tests/test_cuda_backend.py when RAAD_CUDA_EMU=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent
SOURCES = ["emu_quantize.cpp", "emu_attention.cpp", "emu_attention_int8.cpp", "emu_attention_int4.cpp",
           "emu_attention_int2.cpp", "emu_bindings.cpp"]


def build(no_s4: bool = False, verbose: bool = False):
    from torch.utils.cpp_extension import load

    name = "raad_cuda_emu_nos4" if no_s4 else "raad_cuda_emu"
    build_dir = CSRC.parent / "build" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-O1", "-std=c++20", "-DRAAD_EMU", "-Wno-unused-function"]
    if no_s4:
        flags.append("-DRAAD_EMU_NO_S4")
    return load(name=name, sources=[str(HERE / s) for s in SOURCES], extra_cflags=flags,
                extra_include_paths=[str(CSRC)], build_directory=str(build_dir), verbose=verbose,
                with_cuda=False)


if __name__ == "__main__":
    mod = build(no_s4="--no-s4" in sys.argv, verbose=True)
    print(mod.__file__)
