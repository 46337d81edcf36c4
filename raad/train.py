"""`raad fit`: teacher features → student + autoencoder → HQS plan → stage 1 → stage 2.

0. The training images decide the layout (:func:`resolve_layout`): with ``align`` on
   (``auto``: elongated objects at varying angles, see :mod:`raad.pose`) every image is turned
   to the canonical pose first, and all that follows sees only those; ``autoencoder`` auto
   drops that branch on textures.
1. The frozen teacher runs once per training image; its stem (the student's input) and
   normalised targets are cached, so training steps run only the student and the autoencoder.
2. Training (EfficientAD losses): hard-feature mining for the student (the mean of the squared
   errors above their 0.999 quantile, plus a small share of the plain mean so early steps move
   every patch), autoencoder reconstruction of the targets, and student imitation of the
   autoencoder.
3. Held-out normal images set the quantile normalisation of both maps; the training images set
   their per-position profiles (the autoencoder's corners, the student's border ring).
4. HQS scores the attention layers; the plan is chosen by measured speed under ``budget``
   (default: the fastest whose damage stays under ``max_damage``; :mod:`raad.speedplan`), or
   by bits under ``avg_bits`` (:mod:`raad.hqs`).
5. Stage 1 swaps the attention for QuantAttention at the plan's bits and applies the rest of
   the plan (W8A8 linears, bf16 parts; post-training).
6. Stage 2 fine-tunes the student under fake quantization (straight-through estimator) at a low
   learning rate, weighting each patch by where the float model's discrepancy concentrates
   (1 + d/mean d), then recalibrates the quantiles with the quantized model.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

import raad_kernels as rk

from . import data as D
from . import hqs
from . import memory as M
from . import pose as P
from .checkpoint import save_json, save_run
from .model import Detector, ModelConfig
from .predict import calibrate_fit
from .speedplan import budget_plan, linears_section

Q_LOW, Q_HIGH = 0.9, 0.995   # quantiles of held-out normal maps → 0 and 0.1 (EfficientAD)
# EfficientAD mines the errors above their 0.999 quantile over 70 000 steps; with a few hundred
# steps that leaves the student near the mean (docs/history/raad.md)
HARD_QUANTILE = 0.9
HARD_MIX = 0.1   # share of the plain mean in the student loss (moves every patch early on)


@dataclass
class FitOptions:
    steps: int = 300
    batch_size: int = 8
    lr: float = 1.5e-3   # how it was chosen: docs/history/raad.md
    # the plan: by measured speed (budget: "fastest", the fastest plan whose damage stays under
    # max_damage, or milliseconds per batch: the least damage within them; raad.speedplan), or,
    # with avg_bits, by bits (the paper's setting; 16 = no plan, everything float). Neither
    # given: budget "fastest".
    avg_bits: float | None = None
    budget: str | float | None = None
    max_damage: float = hqs.MAX_DAMAGE
    stage2_steps: int = 60
    stage2_lr: float = 1e-4
    linear_bits: int = 8   # the student blocks' linears in the plan: 8 = W8A8, 16 = float
    compile: bool = True   # a plan by measured speed may compile parts (CPU; raad_kernels.compiled)
    holdout: float = 0.15
    seed: int = 0
    device: str = "cpu"   # where the run will score: the plan is timed and the threshold set there
    backend: str = "auto"
    fpr: float = 0.01   # the decision threshold's target false-alarm rate (raad.threshold)

    def check(self):
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.stage2_steps < 0:
            raise ValueError(f"--stage2-steps must be >= 0, got {self.stage2_steps}")
        if self.avg_bits is not None and self.budget is not None:
            raise ValueError(f"give --avg-bits (a plan by bits) or --budget (a plan by measured speed), "
                             f"not both (got --avg-bits {self.avg_bits} and --budget {self.budget})")
        if self.avg_bits is not None:
            hqs.check_avg_bits(self.avg_bits)
        if self.budget is not None:
            self.budget = hqs.check_budget(self.budget)
        if isinstance(self.max_damage, bool) or not isinstance(self.max_damage, (int, float)) or \
                not 0 <= self.max_damage < 1:
            raise ValueError(f"--max-damage must be a number in [0, 1) (0.01 = 1 % of the map), got {self.max_damage!r}")
        if self.linear_bits not in (8, 16):
            raise ValueError(f"--linear-bits must be 8 (int8 weights and activations) or 16 (float), "
                             f"got {self.linear_bits}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is visible on this machine")
        if not 0 < self.fpr < 0.5:
            raise ValueError(f"--fpr must be a false-alarm rate between 0 and 0.5 (0.01 = 1 %), got {self.fpr}")
        return self

    def mode(self) -> str:
        """"float" (no plan), "bits" (HQS under avg_bits) or "budget" (by measured speed)."""
        if self.avg_bits == hqs.FLOAT_BITS:
            return "float"
        return "bits" if self.avg_bits is not None else "budget"


def _bar(it, desc, total=None, show=True):
    return tqdm(it, desc=desc, total=total, disable=not show, leave=False, dynamic_ncols=True)


def load_images(paths, size, show=True) -> torch.Tensor:
    return torch.stack([D.load_image(p, size) for p in _bar(paths, "loading images", show=show)])


@torch.no_grad()
def cache_teacher(det: Detector, images: torch.Tensor, batch: int = 8, show=True):
    stems, targets = [], []
    for i in _bar(range(0, len(images), batch), "teacher features", show=show):
        s, t = det.teacher_features(images[i:i + batch])
        stems.append(s)
        targets.append(t)
    return torch.cat(stems), torch.cat(targets)


def student_losses(det: Detector, stem, target, weight=None, window=None):
    """(student hard loss, autoencoder loss, student–autoencoder loss) on one batch.
    ``window``: (row, column, size) in student tokens: the student sees only that square of the
    grid (with its own position embeddings); the autoencoder, which decodes the whole grid from
    one code, still sees the whole stem and is compared on the window."""
    full_stem = stem
    if window is not None:
        y0, x0, n = window
        p = stem.shape[-1] // target.shape[-1]          # student-input cells per token
        stem = stem[..., p * y0:p * (y0 + n), p * x0:p * (x0 + n)]
        target = target[..., y0:y0 + n, x0:x0 + n]
        if weight is not None:
            weight = weight[..., y0:y0 + n, x0:x0 + n]
    with det.student.window_at(None if window is None else window[:2]):
        s, s_ae = det.student(stem)
    d = (target - s).pow(2)
    if weight is not None:
        d = d * weight[:, None]
    # hard-feature mining (EfficientAD): the loss follows the worst-fitted features
    q = torch.quantile(d.detach().flatten()[:: max(1, d.numel() // 2**20)], HARD_QUANTILE)
    l_st = d[d >= q].mean() + HARD_MIX * d.mean()
    if det.ae is None:
        return l_st, torch.zeros(()), torch.zeros(())
    a = det.ae(full_stem)
    if window is not None:
        a = a[..., y0:y0 + n, x0:x0 + n]
    l_ae = (target - a).pow(2).mean()
    l_stae = (a.detach() - s_ae).pow(2).mean()
    return l_st, l_ae, l_stae


#: Training steps on windows of the token grid: the student's cost grows with the square of its
#: tokens, so on grids larger than WINDOW tokens a side the first (1 - FULL_SHARE) of the steps
#: see a random WINDOW × WINDOW square (its own slice of the position embeddings), and the last
#: FULL_SHARE the whole grid (attention over every token, as when scoring).
WINDOW = 16
FULL_SHARE = 0.25


def train(det: Detector, stems, targets, steps, lr, batch, seed, params, weights=None, desc="training",
          show=True, ae_trainable=True):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=1e-5)
    # OneCycleLR divides by zero when pct_start * steps == 1 (steps=10 at 0.1)
    pct = 0.1 if steps != 10 else 0.15
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct)
    det.student.train()
    if det.ae is not None:
        det.ae.train(ae_trainable)
    grid = targets.shape[-1]
    windowed = int(steps * (1 - FULL_SHARE)) if grid > WINDOW else 0
    log = []
    bar = _bar(range(steps), desc, show=show)
    for step in bar:
        idx = torch.randint(0, len(stems), (min(batch, len(stems)),), generator=g)
        w = None if weights is None else weights[idx]
        window = None
        if step < windowed:
            y0, x0 = torch.randint(0, grid - WINDOW + 1, (2,), generator=g).tolist()
            window = (y0, x0, WINDOW)
        l_st, l_ae, l_stae = student_losses(det, stems[idx], targets[idx], w, window)
        loss = l_st + (l_ae if ae_trainable else 0.0) + l_stae
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == steps - 1:
            rec = {"step": step, "loss_st": l_st.item(), "loss_ae": l_ae.item(), "loss_stae": l_stae.item()}
            log.append(rec)
            bar.set_postfix(st=f"{rec['loss_st']:.3f}", ae=f"{rec['loss_ae']:.3f}")
    det.eval()
    return log


@torch.no_grad()
def position_profile(det: Detector, stems: torch.Tensor, targets: torch.Tensor, batch: int = 8):
    """``det.st_pos`` and ``det.ae_pos`` from the (normalised) training stems and targets (see
    :mod:`raad.model`): the autoencoder map's mean per position, scaled to mean 1; the student
    map's border-ring mean relative to the interior's, where above 1, else 1. Set before the
    quantiles, which are taken on the divided maps."""
    st_sum, ae_sum = 0.0, 0.0
    for i in range(0, len(stems), batch):
        chunk = stems[i:i + batch]
        s, s_ae = det.student(chunk)
        st_sum = st_sum + det.st_error(targets[i:i + batch], s).sum(dim=0, keepdim=True)
        if det.ae is not None:
            ae_sum = ae_sum + det.ae_error(chunk, s_ae).sum(dim=0, keepdim=True)
    ring = torch.ones_like(det.st_pos, dtype=torch.bool)
    ring[:, 1:-1, 1:-1] = False
    st = st_sum / len(stems)
    det.st_pos.copy_(torch.where(ring, (st / st[~ring].mean()).clamp_min(1.0), torch.ones(())))
    if det.ae is not None:
        ae = ae_sum / len(stems)
        det.ae_pos.copy_((ae / ae.mean()).clamp_min(1e-3))


@torch.no_grad()
def calibrate(det: Detector, normals: torch.Tensor, stems: torch.Tensor, targets: torch.Tensor,
              batch: int = 8):
    """Quantile normalisation of both maps on held-out normal images, after their per-position
    profiles on the training ``stems`` and ``targets``."""
    position_profile(det, stems, targets, batch)
    sts, aes = [], []
    for i in range(0, len(normals), batch):
        st, ae = det.raw_maps(normals[i:i + batch])
        sts.append(st.flatten())
        if ae is not None:
            aes.append(ae.flatten())
    qs = torch.tensor([Q_LOW, Q_HIGH])
    det.q_st.copy_(torch.quantile(torch.cat(sts), qs))
    if aes:
        det.q_ae.copy_(torch.quantile(torch.cat(aes), qs))
    if det.memory is not None:   # again: after stage 1 its fine search runs at int8
        det.memory.calibrate(memory_features(det, normals), Q_LOW, Q_HIGH)


@torch.no_grad()
def discrepancy_weights(det: Detector, stems, targets, batch: int = 8):
    """Per-patch weights 1 + d / mean(d) from the float student's squared error."""
    ds = []
    for i in range(0, len(stems), batch):
        s, _ = det.student(stems[i:i + batch])
        ds.append(det.st_error(targets[i:i + batch], s))
    d = torch.cat(ds)
    return 1.0 + d / d.mean().clamp_min(1e-12)


def quant_modules(det: Detector) -> dict:
    """Every attention of the detector as QuantAttention at 16/16 (float) — swapped in place."""
    names = det.attention_modules()
    rk.quantize_model(det, {n: (16, 16) for n in names})
    return {n: det.get_submodule(n) for n in names}


@dataclass
class Prepared:
    """A category ready for training: float detector, cached teacher features, held-out normals."""

    category: str
    det: Detector
    stems: torch.Tensor
    targets: torch.Tensor
    normals: torch.Tensor
    n_train: int
    memory: dict | None = None   # what build_memory chose (mode, size, layout ratio)
    layout: dict | None = None   # what resolve_layout chose (and the figures it read)


@torch.no_grad()
def memory_features(det: Detector, images: torch.Tensor, batch: int = 8) -> dict:
    """The memory's representations of ``images`` (see :mod:`raad.memory`): the teacher's stem
    only, not its targets."""
    parts = [M.representations(det.teacher.stem(x, fine=True)[1], x, det.cfg.memory_region)
             for x in images.split(batch)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def build_memory(det: Detector, images: torch.Tensor, normals: torch.Tensor, seed: int = 0) -> dict:
    """Resolve ``--memory auto``, fill the memory from the training ``images`` and calibrate it
    on the held-out ``normals``. Returns what was chosen."""
    bank, held = memory_features(det, images), memory_features(det, normals)
    mode, ratio = det.cfg.memory, None
    if mode == "auto":
        ratio = M.layout_ratio(bank, held, det.cfg.memory_radius)
        mode = "local" if ratio < M.FIXED_LAYOUT_RATIO else "global"
    cells = bank["fine"].shape[0] * bank["fine"].shape[-2] * bank["fine"].shape[-1]
    size = min(det.cfg.memory_size, cells)
    mem = det.set_memory(mode, size)
    mem.build(bank, seed)
    mem.calibrate(held, Q_LOW, Q_HIGH)
    return {"mode": mode, "size": size, "layout_ratio": None if ratio is None else round(ratio, 3)}


@torch.no_grad()
def resolve_layout(cfg: ModelConfig, images: torch.Tensor) -> tuple[ModelConfig, dict]:
    """Resolve ``--align auto`` and ``--autoencoder auto`` from the training ``images`` (one
    :func:`raad.pose.decide`): (the config with both fixed, what was chosen and read)."""
    need = "auto" in (cfg.align, cfg.autoencoder)
    read = P.decide(images) if need else {}
    align = read.get("align", "off") if cfg.align == "auto" else cfg.align
    ae = ("on" if read.get("object") else "off") if cfg.autoencoder == "auto" else cfg.autoencoder
    return replace(cfg, align=align, autoencoder=ae), {**read, "align": align, "autoencoder": ae}


@torch.no_grad()
def canonical_images(det: Detector, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """``images`` in the detector's canonical pose (unchanged with ``align`` "off")."""
    return torch.cat([det.canonical(x)[0] for x in images.split(batch)]) if len(images) else images


def holdout_split(paths: list, holdout: float, where) -> tuple[list, list]:
    """(training paths, held-out paths): a fixed, spread-out hold-out of every k-th image, at
    least 2, with at least 2 left to train on (``where`` names the folder in the error)."""
    n_val = max(2, int(round(len(paths) * holdout)))
    if len(paths) - n_val < 2:
        raise D.DataError([(where, f"{len(paths)} images; at least {n_val + 2} are needed "
                                   f"({n_val} held out for calibration and scoring)")])
    val_idx = set(list(range(0, len(paths), max(1, len(paths) // n_val)))[:n_val])
    return ([p for i, p in enumerate(paths) if i not in val_idx],
            [p for i, p in enumerate(paths) if i in val_idx])


def prepare(category_dir, cfg: ModelConfig, opts: FitOptions, show=True) -> Prepared:
    cat = D.validate(category_dir, need_test=False)
    train_paths, val_paths = holdout_split(list(cat.train), opts.holdout, Path(category_dir) / "train" / "good")
    images = load_images(train_paths, cfg.image_size, show)
    normals = load_images(val_paths, cfg.image_size, show)
    cfg, layout = resolve_layout(cfg, images)
    torch.manual_seed(opts.seed)
    det = Detector(cfg)
    # everything below sees the images in the canonical pose
    images, normals = canonical_images(det, images), canonical_images(det, normals)
    stems, targets = cache_teacher(det, images, show=show)
    det.s_mean.copy_(stems.mean(dim=(0, 2, 3), keepdim=True))
    det.s_std.copy_(stems.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))
    stems = (stems - det.s_mean) / det.s_std
    det.t_mean.copy_(targets.mean(dim=(0, 2, 3), keepdim=True))
    det.t_std.copy_(targets.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))
    targets = (targets - det.t_mean) / det.t_std
    memory = build_memory(det, images, normals, opts.seed) if det.cfg.memory != "off" else None
    return Prepared(cat.name, det, stems, targets, normals, len(train_paths), memory, layout)


def train_float(prep: Prepared, opts: FitOptions, show=True) -> list:
    det = prep.det
    params = list(det.student.parameters()) + (list(det.ae.parameters()) if det.ae is not None else [])
    log = train(det, prep.stems, prep.targets, opts.steps, opts.lr, opts.batch_size, opts.seed, params,
                desc="training student", show=show)
    calibrate(det, prep.normals, prep.stems, prep.targets)
    return log


def deployment_plan(attn_plan: dict, opts: FitOptions) -> dict:
    """A plan by bits plus, with ``opts.linear_bits == 8``, the W8A8 linears section; a plan by
    measured speed (it has ``timing``) already holds what its measurements chose."""
    if "timing" in attn_plan:
        return attn_plan
    plan = {k: v for k, v in attn_plan.items() if k != "linears"}
    if opts.linear_bits == 8:
        plan["linears"] = linears_section()
    return plan


def hqs_plan(prep: Prepared, opts: FitOptions, show=True):
    """Score the layers of the (float) detector and choose the plan (by bits, or by measured
    speed: :mod:`raad.speedplan`); returns (plan, scores, speed report or None)."""
    mods = quant_modules(prep.det)
    scores = hqs.score_layers(prep.det, mods, prep.normals, seed=opts.seed,
                              progress=lambda it: _bar(it, "HQS scoring", show=show))
    if opts.mode() == "budget":
        plan, report = budget_plan(prep.det, mods, scores, prep.normals,
                                   replace(opts, budget=opts.budget or "fastest"))
        return plan, scores, report
    return deployment_plan(hqs.make_plan(scores, opts.avg_bits), opts), scores, None


def quantize_and_finetune(prep: Prepared, det: Detector, plan: dict, opts: FitOptions, stage2: bool,
                          weights=None, show=True) -> list:
    """Stage 1 (apply the plan) and, with ``stage2``, fine-tuning under fake quantization.
    ``weights``: per-patch stage-2 weights (default: from ``det`` before quantizing)."""
    if stage2 and weights is None:
        weights = discrepancy_weights(det, prep.stems, prep.targets)
    # the plan's compiled parts stay eager here: fine-tuning trains them, and compiling for the
    # calibration's batch shapes would cost the fit seconds for a rounding's difference
    # (load_run compiles them)
    rk.quantize_model(det, {k: v for k, v in deployment_plan(plan, opts).items() if k != "compile"},
                      backend=opts.backend)
    if det.memory is not None:
        det.memory.int8 = True
    log = []
    if stage2 and opts.stage2_steps:
        log = train(det, prep.stems, prep.targets, opts.stage2_steps, opts.stage2_lr, opts.batch_size,
                    opts.seed + 1, list(det.student.parameters()), weights=weights,
                    desc="stage 2 (fake-quant)", show=show, ae_trainable=False)
    calibrate(det, prep.normals, prep.stems, prep.targets)
    return log


class Stopwatch:
    """Wall seconds per named stage (``with clock("train"): ...``), for the fit's report."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t, 1)


def fit_category(category_dir, run_dir, cfg: ModelConfig, opts: FitOptions, show=True) -> dict:
    """Fit one category; writes the run folder. Returns the fit summary."""
    opts.check()
    from raad_kernels.allocator import keep_freed_memory
    keep_freed_memory()   # training allocates the same large activations every step
    t_start = time.perf_counter()
    clock = Stopwatch()
    with clock("prepare"):   # images, layout, teacher features, memory
        prep = prepare(category_dir, cfg, opts, show)
    with clock("train"):
        train_log = train_float(prep, opts, show)
    summary = {"category": prep.category, "train_images": prep.n_train,
               "holdout_images": len(prep.normals), "layout": prep.layout, "memory": prep.memory,
               "train_log": train_log}
    plan = None
    if opts.mode() != "float":
        with clock("hqs"):
            plan, scores, speed = hqs_plan(prep, opts, show)
        save_json(Path(run_dir) / "hqs.json", {**hqs.details(scores), **({"speed": speed} if speed else {})})
        if speed:
            summary["speed_plan"] = speed
        with clock("quantize_stage2"):
            summary["stage2_log"] = quantize_and_finetune(prep, prep.det, plan, opts, stage2=True, show=show)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    summary["stage_seconds"] = clock.seconds
    save_run(run_dir, prep.det, fit=asdict(opts), plan=plan,
             extra={"summary": {k: v for k, v in summary.items() if not k.endswith("_log")}})
    # the decision threshold, from the held-out normals' image scores (raad.predict, raad.threshold)
    summary["threshold"] = calibrate_fit(run_dir, category_dir, opts, show)
    save_json(Path(run_dir) / "fit_log.json", summary)
    return summary


def fit(data_dir, run_dir, cfg: ModelConfig, opts: FitOptions, show=True) -> dict:
    """Fit every category of ``data_dir`` (one category, or a folder of them) into
    ``run_dir/<category>``. Data are validated before any training starts."""
    dirs = D.category_dirs(data_dir)
    for d in dirs:  # everything checked up front: no half-fitted set because image 57 is broken
        D.validate(d, need_test=False)
    out = {}
    for d in dirs:
        out[d.name] = fit_category(d, Path(run_dir) / d.name, cfg, opts, show)
    return out
