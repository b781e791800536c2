"""Training loops for stage 1, stage 2 and the slice classifier.

Each loop checkpoints every ``ckpt_every`` iterations (model, optimiser,
scheduler, iteration, RNG state) and resumes from the checkpoint, so an
interrupted ``ainode train-demo`` on a 2-core machine loses minutes, not the
hour. A stage is also bounded by wall-clock minutes: the demo recipe must fit
the machine it runs on, and the budget is recorded in the provenance.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandGaussianNoise,
    RandScaleIntensity,
    RandShiftIntensity,
)
from torch import nn

from pipelines.models.networks import build

log = logging.getLogger(__name__)

__all__ = [
    "HeadConfig", "TrainConfig", "TrainResult", "finetune_stage2_head", "stage2_windows",
    "train_slice", "train_stage1", "train_stage2", "window_features",
]

# Class weights of the tumour-type head: PDAC 3:1 against the rest (the seed paper's weighting).
PDAC_WEIGHTS = (1.0, 3.0, 1.0, 1.0, 1.0)


@dataclass
class TrainConfig:
    arch: str
    params: dict[str, Any]
    iterations: int
    lr: float = 1e-3
    batch: int = 2
    max_minutes: float = 60.0
    ckpt_every: int = 50
    seed: int = 0
    # One thread: on a shared 2-core machine two OpenMP threads wait on each other.
    threads: int = 1
    # stage 2 only: fractions of iterations for (segmentation, frozen-encoder classification)
    phases: tuple[float, float] = (0.55, 0.15)
    patch_zyx: tuple[int, int, int] = (32, 48, 80)
    # stage 2 only: cases whose lesion is smaller than a sphere of ``small_lesion_mm`` are
    # drawn (1 + boost) times as often as the other cases of their tumour type.
    small_lesion_boost: float = 0.0
    small_lesion_mm: float = 20.0
    spacing_mm: float = 2.5
    # stage 2 only: the fraction of crops placed as inference places its windows (a
    # sliding-window position, overlap ``window_overlap``, on a stage-1-like ROI whose
    # centre is off by up to ``roi_jitter`` voxels) instead of around a lesion voxel.
    window_crops: float = 0.0
    window_overlap: float = 0.5
    roi_jitter: int = 4
    # start from these weights (a refinement of a trained model; ``ainode train --init``)
    init: dict[str, torch.Tensor] | None = None
    # stage 1 only: crops reach past the scan by up to this fraction of a patch (air)
    air_margin: float = 0.0
    # stage 1 only: this fraction of the samples end (top or bottom) inside the gland,
    # the rest of the stack air, as a short series of the upper abdomen does
    truncate: float = 0.0


@dataclass
class TrainResult:
    model: nn.Module
    iterations: int
    seconds: float
    losses: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    cache: tuple[torch.Tensor, torch.Tensor] | None = None  # stage-2 head features


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _augment() -> Compose:
    return Compose([
        RandScaleIntensity(factors=0.08, prob=0.5),
        RandShiftIntensity(offsets=0.04, prob=0.5),
        RandAdjustContrast(gamma=(0.85, 1.2), prob=0.3),
        RandGaussianNoise(prob=0.3, std=0.02),
    ])


class _Progress:
    """Running losses on one line (a bar on a terminal, a line per report in a log)."""

    def __init__(self, name: str, total: int, out: Callable[[str], None] | None) -> None:
        self.name, self.total, self.out = name, total, out
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()

    def update(self, it: int, losses: dict[str, float], force: bool = False) -> None:
        if self.out is None:
            return
        if not (force or self.tty or it % 25 == 0):
            return
        frac = it / max(self.total, 1)
        bar = "#" * int(frac * 20)
        loss_txt = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
        line = (f"{self.name} [{bar:<20}] {it}/{self.total} "
                f"{time.monotonic() - self.t0:6.0f}s {loss_txt}")
        self.out(line)


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return state


def _loop(
    name: str,
    cfg: TrainConfig,
    ckpt: Path | None,
    model: nn.Module,
    step: Callable[[int, nn.Module], dict[str, torch.Tensor]],
    param_groups: Callable[[int, bool], Sequence[nn.Parameter]],
    phase_of: Callable[[int], int],
    progress: Callable[[str], None] | None,
) -> TrainResult:
    torch.set_num_threads(cfg.threads)
    _seed_all(cfg.seed)
    start_it = 0
    phase = phase_of(0)
    opt = torch.optim.Adam(param_groups(phase, False), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=3)
    history: list[dict[str, float]] = []
    elapsed0 = 0.0
    if ckpt is not None and (st := _load(ckpt)) is not None:
        model.load_state_dict(st["model"])
        start_it, phase, history, elapsed0 = st["it"], st["phase"], st["history"], st["elapsed"]
        # The learning rate of the phase resumed in (used when no optimiser state comes back).
        opt = torch.optim.Adam(param_groups(phase, False),
                               lr=cfg.lr * (0.5 if phase == 2 else 1))
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=3)
        try:
            opt.load_state_dict(st["opt"])
            sched.load_state_dict(st["sched"])
        except (ValueError, KeyError):
            log.info("optimiser state not restored for %s (phase change)", name)
        torch.set_rng_state(st["rng"])
        np.random.set_state(st["np_rng"])
        random.setstate(st["py_rng"])
        log.info("resumed %s at iteration %d", name, start_it)
    bar = _Progress(name, cfg.iterations, progress)
    t0 = time.monotonic()
    running: dict[str, float] = {}
    window: list[float] = []
    it = start_it
    model.train()
    while it < cfg.iterations:
        if elapsed0 + time.monotonic() - t0 > cfg.max_minutes * 60:
            log.warning("%s stopped by its time budget at iteration %d", name, it)
            if progress:
                progress(f"{name}: time budget of {cfg.max_minutes} min reached at {it}")
            break
        new_phase = phase_of(it)
        if new_phase != phase:
            phase = new_phase
            opt = torch.optim.Adam(param_groups(phase, True),
                                   lr=cfg.lr * (0.5 if phase == 2 else 1))
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=3)
        losses = step(phase, model)
        total = losses.pop("loss")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        it += 1
        losses["loss"] = total.detach()
        for k, v in losses.items():
            running[k] = 0.9 * running.get(k, float(v)) + 0.1 * float(v)
        window.append(float(losses["loss"]))
        if it % cfg.ckpt_every == 0 or it == cfg.iterations:
            sched.step(float(np.mean(window)))
            history.append({"it": float(it), **{k: round(v, 5) for k, v in running.items()}})
            window = []
            if ckpt is not None:
                _save(ckpt, {
                    "model": model.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "it": it, "phase": phase, "history": history,
                    "elapsed": elapsed0 + time.monotonic() - t0,
                    "rng": torch.get_rng_state(), "np_rng": np.random.get_state(),
                    "py_rng": random.getstate(),
                })
        bar.update(it, running)
    bar.update(it, running, force=True)
    model.eval()
    return TrainResult(model, it, elapsed0 + time.monotonic() - t0, dict(running), history)


def _crop(x: npt.NDArray, y: npt.NDArray, patch: Sequence[int], rng: np.random.Generator,
          focus: npt.NDArray | None) -> tuple[npt.NDArray, npt.NDArray]:
    """A patch from (x, y), padded with zeros when smaller; around ``focus`` if given."""
    pad = [(0, max(0, p - s)) for p, s in zip(patch, x.shape, strict=True)]
    if any(b for _, b in pad):
        x = np.pad(x, pad)
        y = np.pad(y, pad)
    start = []
    for d, (p, s) in enumerate(zip(patch, x.shape, strict=True)):
        hi = s - p
        if focus is not None:
            c = int(focus[d])
            lo_s, hi_s = max(0, c - p + 4), min(hi, c - 4)
            start.append(int(rng.integers(lo_s, hi_s + 1)) if lo_s <= hi_s
                         else int(np.clip(c - p // 2, 0, hi)))
        else:
            start.append(int(rng.integers(0, hi + 1)))
    sl = tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))
    return x[sl], y[sl]


def _scan_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window starts along one axis as MONAI's sliding_window_inference lays them out."""
    if size <= patch:
        return [0]
    step = max(int(patch * (1 - overlap)), 1)
    n = math.ceil((size - patch) / step) + 1
    return [min(i * step, size - patch) for i in range(n)]


def _window_crop(x: npt.NDArray, y: npt.NDArray, patch: Sequence[int], rng: np.random.Generator,
                 margin_vox: int, jitter: int, overlap: float) -> tuple[npt.NDArray, npt.NDArray]:
    """A crop where inference would put a window.

    ``stage2_sample`` keeps ``margin_vox`` more voxels on each side of the gland than
    the stage-1 ROI rule does; the ROI is that box (at least one patch), its centre
    moved by up to ``jitter`` voxels the way an imperfect stage-1 mask moves it, and
    the crop is one of its sliding windows. Training on these teaches the lesion map
    to see a lesion wherever it falls in the window inference happens to use."""
    start = []
    for p, s in zip(patch, x.shape, strict=True):
        r = min(max(s - 2 * margin_vox, p), s)
        lo = (s - r) // 2 + int(rng.integers(-jitter, jitter + 1))
        lo = int(np.clip(lo, 0, s - r))
        starts = _scan_starts(r, p, overlap)
        start.append(lo + starts[int(rng.integers(len(starts)))])
    sl = tuple(slice(a, a + p) for a, p in zip(start, patch, strict=True))
    return x[sl], y[sl]


def _truncate(x: npt.NDArray, y: npt.NDArray, rng: np.random.Generator
              ) -> tuple[npt.NDArray, npt.NDArray]:
    """The stack cut at a slice through the gland, above or below, and the cut-off
    part made air (what the sliding window pads a short series with)."""
    zs = np.nonzero(y.any(axis=(1, 2)))[0]
    if len(zs) < 2:
        return x, y
    cut = int(rng.integers(zs[0] + 1, zs[-1] + 1))
    x, y = x.copy(), y.copy()
    if rng.random() < 0.5:
        x[cut:], y[cut:] = 0, 0
    else:
        x[:cut], y[:cut] = 0, 0
    return x, y


def train_stage1(
    samples: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]],
    cfg: TrainConfig,
    ckpt: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Pancreas segmentation at low resolution, Dice + cross-entropy, random patches."""
    model = build(cfg.arch, cfg.params)
    if cfg.init is not None:
        model.load_state_dict(cfg.init)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    aug = _augment()
    rng = np.random.default_rng(cfg.seed)

    def step(phase: int, m: nn.Module) -> dict[str, torch.Tensor]:
        xs, ys = [], []
        for _ in range(cfg.batch):
            x, y = samples[int(rng.integers(len(samples)))]
            if cfg.truncate > 0 and rng.random() < cfg.truncate:
                x, y = _truncate(x, y, rng)
            if cfg.air_margin > 0:
                # Air round the scan (0 after every CT preset's clip, as the sliding
                # window's padding): what a window sees past a small body in a wide
                # field of view, or past the first and last slice.
                air = [(a, a) for a in (int(rng.integers(0, int(p * cfg.air_margin) + 1))
                                        for p in cfg.patch_zyx)]
                x, y = np.pad(x, air), np.pad(y, air)
            focus = None
            if rng.random() < 0.7:
                idx = np.argwhere(y > 0)
                if len(idx):
                    focus = idx[int(rng.integers(len(idx)))]
            xc, yc = _crop(x, y, cfg.patch_zyx, rng, focus)
            xs.append(aug(xc[None]))
            ys.append(yc[None])
        xb = torch.as_tensor(np.stack(xs), dtype=torch.float32)
        yb = torch.as_tensor(np.stack(ys).astype(np.int64))
        loss = loss_fn(m(xb), yb)
        return {"loss": loss}

    return _loop("stage1", cfg, ckpt, model, step, lambda p, t: list(model.parameters()),
                 lambda it: 0, progress)


def train_stage2(
    samples: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]],
    classes: list[int],
    cfg: TrainConfig,
    ckpt: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Lesion map + tumour type, stage-wise: segmentation head, then the classification
    head on a frozen encoder, then both end to end."""
    model = build(cfg.arch, cfg.params)
    if cfg.init is not None:
        model.load_state_dict(cfg.init)
    seg_loss = DiceCELoss(sigmoid=True, batch=True)
    cls_loss = nn.CrossEntropyLoss(weight=torch.tensor(PDAC_WEIGHTS, dtype=torch.float32))
    aug = _augment()
    rng = np.random.default_rng(cfg.seed)
    n1 = int(cfg.iterations * cfg.phases[0])
    n2 = n1 + int(cfg.iterations * cfg.phases[1])
    lesion_idx = [np.argwhere(y > 0) for _, y in samples]
    # Balance the tumour types: every class drawn equally often; within a class, cases
    # with a small lesion (the ones the map misses) weigh 1 + small_lesion_boost.
    small_vox = (math.pi / 6.0) * cfg.small_lesion_mm**3 / cfg.spacing_mm**3
    w = np.array([1.0 + cfg.small_lesion_boost * float(0 < len(ix) < small_vox)
                  for ix in lesion_idx])
    cls_arr = np.array(classes)
    for c in set(classes):
        w[cls_arr == c] /= w[cls_arr == c].sum()
    w /= w.sum()

    def phase_of(it: int) -> int:
        return 0 if it < n1 else (1 if it < n2 else 2)

    def params(phase: int, transition: bool) -> list[nn.Parameter]:
        if phase == 1 and transition:
            model.reset_classifier()  # type: ignore[operator]
        enc = set(map(id, model.encoder_parameters()))  # type: ignore[operator]
        for p in model.parameters():
            p.requires_grad_(not (phase == 1 and id(p) in enc))
        if phase == 1:
            return list(model.classifier_parameters())  # type: ignore[operator]
        return list(model.parameters())

    def step(phase: int, m: nn.Module) -> dict[str, torch.Tensor]:
        xs, ys, cs = [], [], []
        for _ in range(cfg.batch):
            i = int(rng.choice(len(samples), p=w))
            x, y = samples[i]
            idx = lesion_idx[i]
            if cfg.window_crops and rng.random() < cfg.window_crops:
                xc, yc = _window_crop(x, y, cfg.patch_zyx, rng, round(10.0 / cfg.spacing_mm),
                                      cfg.roi_jitter, cfg.window_overlap)
            else:
                # Mostly around a lesion; sometimes anywhere, so the gland's normal parts
                # and the margin are seen often enough to learn to stay quiet there.
                focus = idx[int(rng.integers(len(idx)))] if len(idx) and rng.random() < 0.75 \
                    else None
                if focus is None:
                    focus = np.array([int(rng.integers(0, s)) for s in x.shape])
                xc, yc = _crop(x, y, cfg.patch_zyx, rng, focus)
            xs.append(aug(xc[None]))
            ys.append(yc[None])
            # A crop that lost the lesion shows a normal gland.
            cs.append(classes[i] if (yc > 0).sum() >= 3 or classes[i] == 0 else 0)
        xb = torch.as_tensor(np.stack(xs), dtype=torch.float32)
        yb = torch.as_tensor(np.stack(ys).astype(np.float32))
        cb = torch.as_tensor(cs, dtype=torch.int64)
        seg, cls = m(xb)
        ls = seg_loss(seg, yb)
        lc = cls_loss(cls, cb)
        loss = ls if phase == 0 else (lc if phase == 1 else ls + 0.5 * lc)
        return {"loss": loss, "seg": ls.detach(), "cls": lc.detach()}

    return _loop("stage2", cfg, ckpt, model, step, params, phase_of, progress)


def train_slice(
    stacks: list[npt.NDArray[np.float32]],
    labels: list[npt.NDArray[np.int64]],
    cfg: TrainConfig,
    ckpt: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """The 2.5D slice classifier: class-balanced slices, weighted cross-entropy."""
    model = build(cfg.arch, cfg.params)
    if cfg.init is not None:
        model.load_state_dict(cfg.init)
    x_all = np.concatenate(stacks)
    y_all = np.concatenate(labels)
    counts = np.bincount(y_all, minlength=5).astype(float)
    w = np.where(counts[y_all] > 0, 1.0 / np.maximum(counts[y_all], 1), 0.0)
    w /= w.sum()
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(PDAC_WEIGHTS, dtype=torch.float32))
    rng = np.random.default_rng(cfg.seed)

    def step(phase: int, m: nn.Module) -> dict[str, torch.Tensor]:
        idx = rng.choice(len(y_all), size=cfg.batch, p=w)
        xb = torch.as_tensor(x_all[idx])
        xb = xb * (1 + 0.08 * (torch.rand(len(idx), 1, 1, 1) - 0.5)) + 0.02 * torch.randn_like(xb)
        flip = rng.random() < 0.5
        if flip:  # anterior-posterior flips keep the left-right anatomy
            xb = torch.flip(xb, dims=[2])
        yb = torch.as_tensor(y_all[idx])
        return {"loss": loss_fn(m(xb), yb)}

    res = _loop("slice", cfg, ckpt, model, step, lambda p, t: list(model.parameters()),
                lambda it: 0, progress)
    res.losses["slices"] = float(len(y_all))
    res.losses["epochs"] = round(res.iterations * cfg.batch / max(len(y_all), 1), 2)
    if not math.isfinite(res.losses.get("loss", 0.0)):
        log.warning("slice classifier loss is not finite")
    return res


@dataclass
class HeadConfig:
    """Fine-tuning the stage-2 tumour-type MLP on cached, frozen features."""

    crops_per_case: int = 12
    iterations: int = 3000
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-3
    lesion_focus: float = 0.75
    reset: bool = True  # a fresh MLP; False continues from the trained one
    seed: int = 0
    threads: int = 1


def _pooled_features(
    model: nn.Module, samples: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]],
    classes: list[int], patch: tuple[int, int, int], hc: HeadConfig,
    progress: Callable[[str], None] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cls head's input (pooled pyramid features) for random augmented crops."""
    rng = np.random.default_rng(hc.seed)
    aug = _augment()
    head = model.get_submodule("cls_head")
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _o: captured.append(inp[0].detach()))
    labels: list[int] = []
    model.eval()
    try:
        with torch.no_grad():
            for n, (x, y) in enumerate(samples):
                idx = np.argwhere(y > 0)
                xs = []
                for _ in range(hc.crops_per_case):
                    if len(idx) and rng.random() < hc.lesion_focus:
                        focus = idx[int(rng.integers(len(idx)))]
                    else:
                        focus = np.array([int(rng.integers(0, s)) for s in x.shape])
                    xc, yc = _crop(x, y, patch, rng, focus)
                    xs.append(aug(xc[None]))
                    # The same rule as train_stage2: a crop that lost the lesion is normal.
                    labels.append(classes[n] if (yc > 0).sum() >= 3 or classes[n] == 0 else 0)
                model(torch.as_tensor(np.stack(xs), dtype=torch.float32))
                if progress and (n + 1) % 20 == 0:
                    progress(f"head features: {n + 1}/{len(samples)} cases")
    finally:
        hook.remove()
    return torch.cat(captured), torch.as_tensor(labels, dtype=torch.int64)


def finetune_stage2_head(
    model: nn.Module,
    samples: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]],
    classes: list[int],
    patch: tuple[int, int, int],
    hc: HeadConfig | None = None,
    progress: Callable[[str], None] | None = None,
    cached: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> TrainResult:
    """Retrain the tumour-type MLP of a trained stage-2 model, everything else frozen.

    The encoder, lesion decoder and feature pyramid are fixed, so their pooled output
    is computed once per crop and cached; the MLP then trains thousands of class-
    balanced, PDAC-weighted (3:1) iterations in seconds. The lesion map is unchanged.
    ``cached`` (features, labels) from an earlier call skips the feature pass.
    """
    hc = hc or HeadConfig()
    torch.set_num_threads(hc.threads)
    _seed_all(hc.seed)
    t0 = time.monotonic()
    feats, labels = cached or _pooled_features(model, samples, classes, patch, hc, progress)
    head = model.get_submodule("cls_head")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in head.modules() if hc.reset else []:
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    for p in head.parameters():
        p.requires_grad_(True)
    counts = np.bincount(labels.numpy(), minlength=5).astype(float)
    w = np.where(counts[labels.numpy()] > 0, 1.0 / np.maximum(counts[labels.numpy()], 1), 0.0)
    w /= w.sum()
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(PDAC_WEIGHTS, dtype=torch.float32))
    opt = torch.optim.AdamW(head.parameters(), lr=hc.lr, weight_decay=hc.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, hc.iterations)
    rng = np.random.default_rng(hc.seed + 1)
    head.train()
    running = 0.0
    history: list[dict[str, float]] = []
    for it in range(1, hc.iterations + 1):
        idx = torch.as_tensor(rng.choice(len(labels), size=hc.batch, p=w))
        loss = loss_fn(head(feats[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = float(loss) if it == 1 else 0.98 * running + 0.02 * float(loss)
        if it % 250 == 0 or it == hc.iterations:
            history.append({"it": float(it), "cls": round(running, 5)})
            if progress:
                progress(f"head [{it}/{hc.iterations}] cls={running:.4f}")
    head.eval()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        acc = float((head(feats).argmax(1) == labels).float().mean())
    losses = {"cls": running, "train_crop_accuracy": acc, "crops": float(len(labels))}
    res = TrainResult(model, hc.iterations, time.monotonic() - t0, losses, history)
    res.cache = (feats, labels)
    return res


def stage2_windows(
    model: nn.Module, x: npt.NDArray[np.float32], y: npt.NDArray[np.uint8],
    patch: tuple[int, int, int], overlap: float = 0.5,
) -> tuple[torch.Tensor, npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Every sliding window of a stage-2 ROI as inference visits it (same patch, overlap
    and order): the classification head's input, the window's lesion-map peak and the
    number of reference lesion voxels in it. The label rides along as a second input
    channel, so the windows are exactly MONAI's."""
    head = model.get_submodule("cls_head")
    feats: list[torch.Tensor] = []
    peaks: list[float] = []
    lesvox: list[float] = []
    hook = head.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].detach()))

    def predictor(p: torch.Tensor) -> torch.Tensor:
        seg, _ = model(p[:, :1])
        peaks.extend(torch.sigmoid(seg.float()).amax(dim=(1, 2, 3, 4)).tolist())
        lesvox.extend(p[:, 1].sum(dim=(1, 2, 3)).tolist())
        return seg  # type: ignore[no-any-return]

    xt = torch.as_tensor(np.stack([x, (y > 0)]), dtype=torch.float32)[None]
    model.eval()
    try:
        with torch.inference_mode():
            sliding_window_inference(xt, patch, 1, predictor, overlap=overlap, mode="gaussian")
    finally:
        hook.remove()
    return (torch.cat(feats).clone(), np.asarray(peaks, np.float32),
            np.asarray(lesvox, np.float32))


def window_features(
    model: nn.Module, samples: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]],
    classes: list[int], patch: tuple[int, int, int], *, overlap: float = 0.5,
    min_lesion_voxels: int = 3, progress: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's inputs and labels for every inference window of every case.

    Inference classifies a case from the window with the highest lesion peak (or the
    mean over windows when no peak reaches 0.5), with no augmentation; training the
    head on those same windows of unseen cases removes the gap between random training
    crops and what the head is shown in use. A window that holds fewer than
    ``min_lesion_voxels`` reference lesion voxels is labelled normal (as in training)."""
    xs, ys = [], []
    for n, ((x, y), c) in enumerate(zip(samples, classes, strict=True)):
        f, _, lv = stage2_windows(model, x, y, patch, overlap)
        lab = np.where((lv >= min_lesion_voxels) | (c == 0), c, 0)
        xs.append(f)
        ys.append(torch.as_tensor(lab, dtype=torch.int64))
        if progress and (n + 1) % 20 == 0:
            progress(f"head window features: {n + 1}/{len(samples)} cases")
    return torch.cat(xs), torch.cat(ys)
