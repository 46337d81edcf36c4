"""What a user would deploy instead of the plan, built from the same fitted run (``raad bench
--peers``).

* ``bf16-autocast``, ``fp16-autocast``: the fp32 detector under ``torch.autocast`` (one line of
  torch; fp16 is the usual choice on a GPU).
* ``compile``: the fp32 detector under ``torch.compile`` (inductor; on a GPU in its
  ``reduce-overhead`` mode, which replays CUDA graphs): the one line.
* ``compile-networks``, ``compile-networks-bf16``: the detector's networks (what OpenVINO is
  given) compiled with inductor's ``freezing`` (weights folded and pre-packed, the CPU inference
  setting), in fp32 and under bf16 autocast: torch's own counterpart of the OpenVINO exports.
* OpenVINO (anomalib's CPU path): the detector's networks (teacher, student, autoencoder:
  :meth:`raad.model.Detector.neural_maps`) exported with ``openvino.convert_model`` and compiled
  in fp32 (``openvino-fp32``: ``INFERENCE_PRECISION_HINT`` f32), in OpenVINO's default precision
  for the device (``openvino``: bf16 on CPUs that have it), and quantized to INT8 by NNCF
  post-training quantization with its defaults on training images (``openvino-int8``). The maps' post-processing and the memory search stay in torch,
  as in every other variant, so the comparison is of the networks' arithmetic.

OpenVINO and NNCF are the optional ``bench`` extra (``make bench`` installs them).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

OPENVINO = ("openvino-fp32", "openvino", "openvino-int8")
TORCH = ("bf16-autocast", "fp16-autocast", "compile", "compile-networks", "compile-networks-bf16")
PEERS = TORCH + OPENVINO


class _Networks(nn.Module):
    """The detector's networks as one module with tensor outputs (what OpenVINO converts)."""

    def __init__(self, det, memory: bool):
        super().__init__()
        self.det, self.memory = det, memory

    def forward(self, image):
        st, ae, fine = self.det.neural_maps(image, self.memory)
        return tuple(t for t in (st, ae, fine) if t is not None)


class _Runner:
    """Stands in for ``Detector.neural_maps``: runs a compiled OpenVINO model and hands back
    torch tensors in the detector's layout."""

    def __init__(self, compiled, has_ae: bool, memory: bool):
        self.compiled, self.has_ae, self.memory = compiled, has_ae, memory

    def __call__(self, image, memory: bool = False):
        if memory != self.memory:
            raise RuntimeError("the OpenVINO model was exported for memory="
                               f"{self.memory}, called with memory={memory}")
        res = self.compiled(image.detach().cpu().numpy())
        outs = [torch.from_numpy(res[i].copy()) for i in range(len(res))]
        st = outs.pop(0)
        ae = outs.pop(0) if self.has_ae else None
        fine = outs.pop(0) if memory else None
        return st, ae, fine


def default_peers(device) -> tuple[str, ...]:
    """The peers worth timing on ``device``: OpenVINO on a CPU, fp16 autocast on a GPU."""
    if torch.device(device).type == "cuda":
        return ("fp16-autocast", "bf16-autocast", "compile")
    return ("bf16-autocast", "compile", "compile-networks", "compile-networks-bf16") + OPENVINO


def openvino_available() -> str | None:
    """None when OpenVINO and NNCF import; else why not."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install '.[bench]' or make bench)"
    return None


def _ov_variant(fp32_det, kind: str, x: torch.Tensor, calib: torch.Tensor | None):
    import openvino as ov
    det = copy.deepcopy(fp32_det).eval()
    memory = det.memory is not None
    with torch.no_grad():
        model = ov.convert_model(_Networks(det, memory), example_input=x)
    # as many threads as torch uses, so every variant runs on the same cores
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if kind == "openvino-fp32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    elif kind == "openvino-int8":
        import nncf
        data = calib if calib is not None else x
        items = [data[i:i + 1].numpy() for i in range(len(data))]
        model = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items))
    compiled = ov.Core().compile_model(model, "CPU", config)
    det.neural_maps = _Runner(compiled, det.ae is not None, memory)
    return det


class _Autocast(nn.Module):
    def __init__(self, det, dtype: torch.dtype):
        super().__init__()
        self.det, self.cfg, self.dtype = det, det.cfg, dtype

    def forward(self, image):
        with torch.autocast(image.device.type, dtype=self.dtype):
            return self.det(image).float()


class _Compiled(nn.Module):
    def __init__(self, det, device):
        super().__init__()
        self.det, self.cfg = det, det.cfg
        self.fn = torch.compile(det, mode="reduce-overhead" if torch.device(device).type == "cuda" else None)

    def forward(self, image):
        return self.fn(image)


class _CompiledNetworks:
    """Stands in for ``Detector.neural_maps``: the networks compiled with freezing (optionally
    under autocast), the outputs back in float32."""

    def __init__(self, det, memory: bool, dtype: torch.dtype | None):
        from raad_kernels.compiled import OPTIONS
        self.memory = memory
        eager = det.neural_maps

        def networks(image):
            with torch.autocast(image.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                return tuple(None if t is None else t.float() for t in eager(image, memory))
        self.fn = torch.compile(networks, options=OPTIONS, dynamic=False)   # the plan's compile options

    def __call__(self, image, memory: bool = False):
        if memory != self.memory:
            raise RuntimeError(f"the networks were compiled for memory={self.memory}, called with memory={memory}")
        with torch.no_grad():
            return self.fn(image)


def build(fp32_det, names, x: torch.Tensor, calib: torch.Tensor | None = None, device="cpu") -> dict:
    """{peer name: a detector-like module (``cfg`` and ``forward(image) -> maps``)} for each of
    ``names`` (from :data:`PEERS`); OpenVINO peers only on a CPU. ``x``: the batch they run on
    (its shape is the exported one); ``calib``: normal images for NNCF (default ``x``)."""
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; known: {list(PEERS)}")
    out = {}
    for n in names:
        if n.endswith("-autocast"):
            out[n] = _Autocast(copy.deepcopy(fp32_det), torch.bfloat16 if n == "bf16-autocast" else torch.float16)
        elif n == "compile":
            out[n] = _Compiled(copy.deepcopy(fp32_det), device)
        elif n.startswith("compile-networks"):
            det = copy.deepcopy(fp32_det).eval()
            det.neural_maps = _CompiledNetworks(det, det.memory is not None,
                                                torch.bfloat16 if n.endswith("bf16") else None)
            out[n] = det
        else:
            why = openvino_available()
            if why:
                raise RuntimeError(f"--peers: {why}")
            if torch.device(device).type != "cpu":
                raise ValueError(f"the OpenVINO peers run on a CPU (this bench runs on {device})")
            out[n] = _ov_variant(fp32_det, n, x, calib)
    return out
