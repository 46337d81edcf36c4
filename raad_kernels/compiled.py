"""Modules whose forward runs compiled (a plan's ``compile`` section).

``torch.compile`` with inductor's ``freezing`` (the weights folded in as constants, convolutions
with their activations fused and their weights pre-packed for oneDNN): on a CPU this is where
torch's eager convolutions and elementwise ops lose to OpenVINO. On a 2-vCPU AMX Xeon at 256 px,
RAAD's EfficientNet teacher ran 36 ms eager in fp32 and 17 ms compiled under bf16 autocast, its
ViT student 78 ms eager under bf16 autocast and 63 ms compiled (batches of 8;
docs/history/raad.md). A plan chosen by measured speed (``raad fit --budget``) compiles a part
where that measured faster.

The compiled forward runs only where freezing applies, in inference (gradients off, the module
in eval mode); training runs the eager forward. The first call of each input shape compiles
(seconds). Where compiling fails (no C++ compiler, an unsupported op), the module warns once and
runs eagerly from then on. The module's state dict is unchanged.
"""

from __future__ import annotations

import copy
import functools
import types
import warnings
from collections.abc import Iterable

import torch
from torch import nn

_MARK = "_raad_compiled"

#: what torch.compile is given (inductor's freezing; a second batch size compiles a graph for
#: any batch size)
OPTIONS = {"freezing": True}


def _own_frame(fn):
    """``fn`` called through a function with a code object of its own. torch.compile keeps its
    compiled graphs per code object, at most ``recompile_limit`` (8) of them, and past that runs
    the frame eagerly without a word. Modules share code objects (their class's forward; every
    autocast-wrapped module the wrapper's ``__call__``), and each call that fails the guards of
    the graphs already there (another module behind the same wrapper, another signature) adds
    one: a fit's candidates reached the limit, and the bench after it ran those parts eagerly."""
    def call(*args, **kwargs):
        return fn(*args, **kwargs)
    return types.FunctionType(call.__code__.replace(), call.__globals__, call.__name__, call.__defaults__,
                              call.__closure__)


class _CompiledForward:
    """The module's eager forward and its compiled form; see the module notes."""

    def __init__(self, module: nn.Module, eager, name: str):
        self.module, self.eager, self.name = module, eager, name
        self.failed: str | None = None
        self.compiled_calls = 0   # forwards the compiled form ran (the eager one runs the others)
        functools.update_wrapper(self, eager, updated=())
        try:
            self.compiled = torch.compile(_own_frame(eager), options=OPTIONS)
        except Exception as e:   # torch.compile refused its options: eager from the start
            self._fail(e)

    def __deepcopy__(self, memo):
        # the copy compiles its own module's forward (a compiled function is not copied)
        new = object.__new__(_CompiledForward)
        new.__dict__.update(self.__dict__)
        new.module, new.eager = copy.deepcopy(self.module, memo), copy.deepcopy(self.eager, memo)
        new.__wrapped__ = new.eager
        new.compiled_calls = 0
        if self.failed is None:
            new.compiled = torch.compile(_own_frame(new.eager), options=OPTIONS)
        return new

    def __call__(self, *args, **kwargs):
        if self.failed is not None or self.module.training or torch.is_grad_enabled():
            return self.eager(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
            self.compiled_calls += 1
            return out
        except Exception as e:   # compiling failed: run eagerly, from now on if eager works
            out = self.eager(*args, **kwargs)   # a bad input raises here, with its own message
            self._fail(e)
            return out

    def _fail(self, e: Exception) -> None:
        self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        warnings.warn(f"raad-kernels: compiling {self.name or '<root>'} failed ({self.failed}); it runs "
                      "eagerly", stacklevel=3)


def compile_modules(model: nn.Module, modules: Iterable[str], where: str = "compile") -> list[str]:
    """Run each named module of ``model`` (exact names, "" for the model) compiled (see the
    module notes). Every name is checked before any module changes. Returns the names."""
    from .plan import named_modules
    names = list(modules)
    for n, m in named_modules(model, names, where).items():
        remove_compiled(m)
        m.forward = _CompiledForward(m, m.forward, n)
        setattr(m, _MARK, True)
    return names


def remove_compiled(module: nn.Module) -> None:
    """Undo :func:`compile_modules` on one module (its forward as it was before; nothing if it
    was not compiled)."""
    if getattr(module, _MARK, False):
        module.forward = module.forward.eager
        if getattr(module.forward, "__self__", None) is module and module.forward.__func__ is type(module).forward:
            del module.forward   # the class's own forward shows through again
        setattr(module, _MARK, False)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module``'s forward was compiled by :func:`compile_modules`."""
    return bool(getattr(module, _MARK, False))


def compile_failed(module: nn.Module) -> str | None:
    """Why compiling ``module`` failed (it runs eagerly), or None."""
    fwd = module.forward
    return fwd.failed if isinstance(fwd, _CompiledForward) else None
