"""The detector's forward replayed from CUDA graphs (`raad score` and `raad bench` on a GPU).

A 256 px forward of this small detector is hundreds of kernel launches of a few microseconds
each: timed eagerly, a GPU comparison measures Python and the launch queue, not the kernels.
:class:`Graphed` captures the whole forward once per input shape (after a warm-up call outside
the capture, which compiles the Triton kernels and fills the shape caches) and replays it. The
kernels' call path has no host synchronisation and allocates through torch, so the graph's
private memory pool serves it (tests/test_triton_backend.py checks both). If a capture fails,
the eager forward runs from then on and ``fallback`` says why.
"""

from __future__ import annotations

import torch
from torch import nn


class Graphed(nn.Module):
    def __init__(self, det: nn.Module, warmup: int = 2):
        super().__init__()
        self.det, self.cfg, self.warmup = det, det.cfg, warmup
        self.graphs: dict = {}
        self.fallback: str | None = None

    @torch.no_grad()
    def _capture(self, x: torch.Tensor):
        static_in = x.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):        # warm-up on a side stream, as torch's docs advise
            for _ in range(self.warmup):
                self.det(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.det(static_in)
        return static_in, graph, static_out

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda" or self.fallback is not None:
            return self.det(x)
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(x)
            except Exception as e:  # noqa: BLE001 - any capture failure: run eagerly, say why
                self.fallback = f"{type(e).__name__}: {e}"
                return self.det(x)
        static_in, graph, static_out = self.graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()   # the next replay overwrites static_out


def graphed(det: nn.Module, device) -> nn.Module:
    """``det`` wrapped in :class:`Graphed` on a CUDA device; ``det`` itself elsewhere."""
    return Graphed(det) if torch.device(device).type == "cuda" else det
