"""Build logic in setup.py: finding the CUDA root behind an nvcc wrapper, the compiler message."""

import ast
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_functions(*names):
    """The named top-level functions of setup.py, without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    ns = {"os": os, "re": re, "glob": glob, "shutil": shutil, "Path": Path}
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    exec(compile(ast.Module(body=funcs, type_ignores=[]), "setup.py", "exec"), ns)
    return ns


def _fake_cuda(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_cuda_root_found_through_a_wrapper_script(tmp_path, monkeypatch):
    real = _fake_cuda(tmp_path / "cuda-13.0")
    wrap = tmp_path / "wrapbin"
    wrap.mkdir()
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    (wrap / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrap))
    ns = _setup_functions("_is_cuda_root", "find_cuda_root")
    monkeypatch.setattr(ns["glob"], "glob", lambda pattern: [])
    ns["Path"] = Path
    found = ns["find_cuda_root"]()
    assert found == real


def test_cuda_home_wins_when_valid(tmp_path, monkeypatch):
    real = _fake_cuda(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(real))
    assert _setup_functions("_is_cuda_root", "find_cuda_root")["find_cuda_root"]() == real


def test_missing_compiler_gives_one_clear_message(tmp_path):
    env = dict(os.environ, CXX="/nonexistent/c++", RAAD_SKIP_CUDA="1")
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "-t", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "raad-kernels build error" in r.stderr and "CXX='/nonexistent/c++'" in r.stderr
    assert "Traceback" not in r.stderr


def test_extensions_are_built_in_this_checkout():
    import raad_kernels as rk
    st = rk.backends()
    assert st["cpu"].built, st["cpu"].reason
    import torch
    if torch.version.cuda is not None and shutil.which("nvcc") and os.environ.get("RAAD_SKIP_CUDA") != "1":
        assert st["cuda"].built, st["cuda"].reason
