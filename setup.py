"""Build raad-kernels' C++ (always) and CUDA (when possible) extensions.

Environment:
  RAAD_SKIP_CUDA=1         skip the CUDA extension
  RAAD_SKIP_CPU=1          skip the C++ CPU extension (for quick CUDA-only rebuilds while developing)
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;8.6;9.0")
  CUDA_HOME                the CUDA root; found from nvcc on the PATH when unset
  MAX_JOBS                 parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _is_cuda_root(p: Path) -> bool:
    return (p / "bin" / "nvcc").is_file() and (p / "include" / "cuda_runtime.h").is_file()


def find_cuda_root() -> Path | None:
    """CUDA_HOME/CUDA_PATH, then nvcc on the PATH (following links and wrapper scripts that
    exec the real nvcc), then the usual install folders."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and _is_cuda_root(Path(os.environ[var])):
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        if _is_cuda_root(real.parent.parent):
            return real.parent.parent
        try:  # a small wrapper script: look for the absolute path of the nvcc it runs
            text = real.read_text(errors="ignore")[:4096]
        except OSError:
            text = ""
        for m in re.finditer(r"(/[^\s'\"]+)/bin/nvcc\b", text):
            if _is_cuda_root(Path(m.group(1))):
                return Path(m.group(1))
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/opt/cuda"]
    for c in candidates:
        if _is_cuda_root(Path(c)):
            return Path(c)
    return None


def _fail(msg: str):
    sys.stderr.write(f"\nraad-kernels build error: {msg}\n\n")
    sys.exit(1)


def _note(msg: str):
    sys.stderr.write(f"raad-kernels: {msg}\n")


# torch.utils.cpp_extension reads CUDA_HOME when imported: settle it first.
_cuda_root = find_cuda_root()
if _cuda_root is not None and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = str(_cuda_root)
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;9.0")

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:
    _fail("PyTorch must be installed first, and the build run without isolation:\n"
          "    pip install torch && pip install --no-build-isolation .")

_cxx = os.environ.get("CXX", "").split()
if _cxx and not shutil.which(_cxx[0]):
    _fail(f"the C++ compiler named by CXX={os.environ['CXX']!r} was not found. Point CXX at an "
          "installed compiler (or unset it) and run the install again.")
if not _cxx and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
    _fail("no C++ compiler found (looked for c++, g++, clang++). Install one, e.g.\n"
          "    apt-get install g++        # Debian/Ubuntu\n"
          "and run the install again.")

CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG"]
# Files with these name parts get the matching ISA flags alone; the code checks the running
# CPU before calling into them, so the same build runs on CPUs without them.
ISA_FLAGS = {
    "_avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma",
                "-mf16c", "-mavx2"],
    "_amx": ["-mamx-tile", "-mamx-int8", "-mamx-bf16", "-mavx512f", "-mavx512bw", "-mavx512vl",
             "-mavx512vnni", "-mavx512dq", "-mfma", "-mf16c", "-mavx2"],
    "_avx2": ["-mavx2", "-mfma", "-mf16c"],
}


class Build(BuildExtension):
    """Per-file ISA flags: BuildExtension compiles through one command per extension, so the
    ISA-specific sources are compiled into static objects by their own compile calls."""

    def finalize_options(self):
        super().finalize_options()
        # Editable installs build in a fresh temp folder each time; a fixed one lets ninja reuse
        # the objects of unchanged sources, so a rebuild after a small change is quick.
        if getattr(self, "editable_mode", False):
            self.build_temp = str(ROOT / "build" / "temp")

    def build_extensions(self):
        from concurrent.futures import ThreadPoolExecutor
        for ext in self.extensions:
            jobs = []
            for src in list(ext.sources):
                for tag, flags in ISA_FLAGS.items():
                    if tag in Path(src).stem:
                        ext.sources.remove(src)
                        jobs.append((src, flags))
                        break
            # one compiler process per ISA file, side by side (each takes tens of seconds)
            with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
                objs = pool.map(lambda job: self.compiler.compile(
                    [job[0]], output_dir=self.build_temp,
                    include_dirs=ext.include_dirs + self._torch_includes(),
                    extra_postargs=CXX_FLAGS + ["-fPIC"] + job[1]), jobs)
                isa_objs = [o for group in objs for o in group]
            ext.extra_objects = list(ext.extra_objects or []) + isa_objs
        super().build_extensions()

    @staticmethod
    def _torch_includes():
        from torch.utils.cpp_extension import include_paths
        return include_paths()


def cpu_extension():
    if os.environ.get("RAAD_SKIP_CPU") == "1":
        _note("RAAD_SKIP_CPU=1: skipping the CPU extension")
        return None
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    sources.append("csrc/bindings/cpu_bindings.cpp")
    return CppExtension(
        "raad_kernels._cpu", sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )


def cuda_extension():
    if os.environ.get("RAAD_SKIP_CUDA") == "1":
        _note("RAAD_SKIP_CUDA=1: skipping the CUDA extension")
        return None
    if torch.version.cuda is None:
        _note(f"torch {torch.__version__} is a CPU-only build: skipping the CUDA extension")
        return None
    if _cuda_root is None:
        _note("no CUDA toolkit found (set CUDA_HOME to the folder with bin/nvcc): skipping the CUDA extension")
        return None
    _note(f"CUDA toolkit at {os.environ['CUDA_HOME']}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    sources.append("csrc/bindings/cuda_bindings.cpp")
    return CUDAExtension(
        "raad_kernels._cuda", sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            # .cu files include no torch headers: plain CUDA keeps nvcc fast.
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )


extensions = [e for e in (cpu_extension(), cuda_extension()) if e is not None]

setup(ext_modules=extensions, cmdclass={"build_ext": Build})
