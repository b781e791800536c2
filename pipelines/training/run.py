"""Train one recipe on a labelled folder, and the demo weights end to end.

``train_recipe`` is what ``ainode train`` runs; ``train_demo`` generates the
phantom sets (fixed seeds), trains the five demo models in turn and writes
the model packages. Finished models are kept under the work folder, so a
rerun after an interruption resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.pancreas.output import TUMOUR_TYPES
from pipelines.training.data import (
    find_cases,
    read_case,
    slice_samples,
    stage1_sample,
    stage2_sample,
)
from pipelines.training.recipes import HELD_OUT_SOURCES, RECIPES, Recipe
from pipelines.training.trainers import (
    HeadConfig,
    TrainConfig,
    TrainResult,
    finetune_stage2_head,
    train_slice,
    train_stage1,
    train_stage2,
    window_features,
)

log = logging.getLogger(__name__)

__all__ = ["DEMO_SEEDS", "train_demo", "train_recipe"]

# Training seeds of the demo sets; validation uses seeds 800000-800179 and 850000-850299,
# evaluation seeds from 900000 on (900000-900059, 910000-910119 and 920000-920179 are
# spent), never these. CT stage 2 trains on all 400, the other CT models on the first
# 160 (Recipe.train_cases); CT stage 2's refine and head steps have sets of their own
# (Recipe.refine_seeds: 1000..1399, Recipe.head_seeds: 400..799).
DEMO_SEEDS = {"ct": range(0, 400), "mr_t1": range(100000, 100060)}


def _config(r: Recipe, seed: int, iterations: int | None, minutes: float | None) -> TrainConfig:
    return TrainConfig(
        arch=r.arch, params=dict(r.params), iterations=iterations or r.iterations, lr=r.lr,
        batch=r.batch, max_minutes=minutes or r.max_minutes, seed=seed, patch_zyx=r.patch_zyx,
        ckpt_every=25 if r.task == "slice-classification" else 50, phases=r.phases,
        small_lesion_boost=r.small_lesion_boost, spacing_mm=float(min(r.spacing)),
        air_margin=r.air_margin, truncate=r.truncate,
    )


def train_recipe(
    recipe: Recipe,
    data: Path,
    work: Path,
    *,
    seed: int = 0,
    iterations: int | None = None,
    minutes: float | None = None,
    progress: Callable[[str], None] | None = None,
    max_cases: int | None = None,
    extra: Sequence[Path] = (),
    init: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``recipe`` on ``data`` (MSD layout; the first ``max_cases``) and every case
    of the folders in ``extra``; checkpoints go to ``work``. ``init``: the weights to
    start from (fine-tuning a package, ``ainode train --init``)."""
    work.mkdir(parents=True, exist_ok=True)
    cases = find_cases(data, "Tr")[:max_cases] if max_cases != 0 else []
    for more in extra:
        cases += find_cases(more, "Tr")
    t0 = time.monotonic()
    cfg = replace(_config(recipe, seed, iterations, minutes), init=init)
    ckpt = work / f"{recipe.package}.ckpt"
    if recipe.task == "pancreas-localisation":
        s1 = [stage1_sample(*read_case(c), recipe.spacing, recipe.preset, _orientation(recipe))
              for c in cases]
        _say(progress, f"{recipe.package}: {len(s1)} cases loaded in {time.monotonic() - t0:.0f}s")
        return train_stage1(s1, cfg, ckpt, progress)
    if recipe.task == "lesion-detection":
        s2, classes = _stage2_set(recipe, cases)
        _say(progress, f"{recipe.package}: {len(s2)} cases loaded in {time.monotonic() - t0:.0f}s")
        return train_stage2(s2, classes, cfg, ckpt, progress)
    if recipe.task == "slice-classification":
        stacks, labels = [], []
        for c in cases:
            img, lab = read_case(c)
            st, lb = slice_samples(img, lab, c.diagnosis or "normal", recipe.spacing,
                                   recipe.patch_zyx[-1], recipe.preset,
                                   orientation=_orientation(recipe))
            stacks.append(st)
            labels.append(lb)
        _say(progress, f"{recipe.package}: {sum(len(s) for s in stacks)} slices loaded")
        return train_slice(stacks, labels, cfg, ckpt, progress)
    raise ValueError(f"unknown task {recipe.task!r}")


def _orientation(recipe: Recipe) -> str | None:
    return "LPS" if recipe.reorient else None


def _stage2_set(recipe: Recipe, cases: list[Any]) -> tuple[
        list[tuple[np.ndarray, np.ndarray]], list[int]]:
    """Stage-2 training ROIs (wide margin for crop jitter) and each case's class."""
    s2, classes = [], []
    for c in cases:
        img, lab = read_case(c)
        s2.append(stage2_sample(img, lab, recipe.spacing, recipe.patch_zyx, recipe.preset,
                                orientation=_orientation(recipe)))
        classes.append(_class(c.diagnosis, s2[-1][1]))
    return s2, classes


def _class(diagnosis: str | None, lesion: np.ndarray) -> int:
    if diagnosis in TUMOUR_TYPES:
        return TUMOUR_TYPES.index(diagnosis)
    # No cases.csv: a lesion of unknown type counts as PDAC (the target), none as normal.
    return 1 if lesion.any() else 0


def _say(progress: Callable[[str], None] | None, msg: str) -> None:
    log.info(msg)
    if progress:
        progress(msg)


def _phantoms(recipe: Recipe, work: Path, name: str | None, seeds: range,
              progress: Callable[[str], None] | None) -> Path:
    """A phantom set under ``work`` (generated once, kept for a rerun); ``name`` None is
    the contrast's main training set, shared by its recipes."""
    from pipelines.phantom.io import write_dataset

    contrast = "ct" if recipe.modality == "CT" else "mr_t1"
    data = work / (f"data-{contrast}-{name}" if name else f"data-{contrast}")
    marker, stamp = data / ".complete", f"{seeds.start}-{seeds.stop}\n"
    if not marker.exists() or marker.read_text() != stamp:
        _say(progress, f"generating {len(seeds)} {contrast} phantoms in {data}")
        write_dataset(data, seeds, contrast=contrast)
        marker.write_text(stamp)
    return data


def _randomised(recipe: Recipe, work: Path, source: str, seeds: range,
                progress: Callable[[str], None] | None) -> Path:
    """A randomised-appearance set under ``work`` (generated once, kept for a rerun):
    ``source`` "mixed" draws every label map but the held-out ones; "realct" paints
    lesions into the real TotalSegmentator CT."""
    from pipelines.phantom.randomised import write_randomised_dataset

    modality = recipe.modality
    data = work / f"data-{modality.lower()}-randomised-{source}"
    marker = data / ".complete"
    stamp = f"{seeds.start}-{seeds.stop} without {','.join(HELD_OUT_SOURCES)}\n"
    if not marker.exists() or marker.read_text() != stamp:
        _say(progress, f"generating randomised {modality} cases ({source}, seeds "
                       f"{seeds.start}..{seeds.stop - 1}) in {data}")
        write_randomised_dataset(data, seeds, source=source,  # type: ignore[arg-type]
                                 modality=modality,  # type: ignore[arg-type]
                                 prefix=f"rand{source}", exclude_sources=HELD_OUT_SOURCES)
        marker.write_text(stamp)
    return data


def _extra_sets(recipe: Recipe, work: Path, scale: float,
                progress: Callable[[str], None] | None) -> list[Path]:
    """The recipe's randomised, real-CT and extra generator sets (generated once)."""
    out = []
    for source, span in (("mixed", recipe.randomised_seeds), ("realct", recipe.realct_seeds),
                         ("siemens", recipe.siemens_seeds),
                         ("generator", recipe.generator_seeds)):
        if span is None:
            continue
        seeds = range(*span)
        if scale < 1.0:
            seeds = seeds[: max(3, int(len(seeds) * scale))]
        out.append(_phantoms(recipe, work, f"{seeds.start}-{seeds.stop}", seeds, progress)
                   if source == "generator"
                   else _randomised(recipe, work, source, seeds, progress))
    return out


def _kept(out: Path) -> dict[str, Any] | None:
    """A finished step's result, kept beside ``final`` so that a rerun skips it."""
    if not out.exists():
        return None
    done: dict[str, Any] = torch.load(out, map_location="cpu", weights_only=False)
    return done


def _continue_end_to_end(recipe: Recipe, work: Path, st: dict[str, Any], step: str,
                         cases: list[Any], iterations: int, minutes: float, seed: int,
                         progress: Callable[[str], None] | None) -> tuple[
                             dict[str, Any], TrainResult, TrainConfig, int]:
    """The trained stage-2 model continued end to end on ``cases`` (window crops as the
    recipe says; resumes from ``ckpt/<package>.<step>.ckpt``): the new state, the run,
    its config and how many cases it saw."""
    t0 = time.monotonic()
    s2, classes = _stage2_set(recipe, cases)
    _say(progress, f"{recipe.package} {step}: {len(s2)} cases loaded in "
                   f"{time.monotonic() - t0:.0f}s")
    (work / "ckpt").mkdir(parents=True, exist_ok=True)
    cfg = replace(_config(recipe, seed, iterations, minutes), lr=recipe.refine_lr,
                  phases=(0.0, 0.0), window_crops=recipe.window_crops, init=st["state_dict"])
    res = train_stage2(s2, classes, cfg, work / "ckpt" / f"{recipe.package}.{step}.ckpt",
                       progress)
    new = {**st, "state_dict": res.model.state_dict(), "seconds": st["seconds"] + res.seconds,
           "iterations": st["iterations"] + res.iterations, "losses": res.losses}
    return new, res, cfg, len(s2)


def _losses(res: TrainResult) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in res.losses.items()}


def _refine_randomised(recipe: Recipe, work: Path, st: dict[str, Any], scale: float,
                       progress: Callable[[str], None] | None) -> dict[str, Any]:
    """The finished stage-2 model refined end to end on the randomised-appearance, real-CT
    and generator sets (kept like ``final``; resumes from its checkpoint).

    Why: trained on one generator's phantoms, the lesion map fired on whatever else it
    was shown; refined on appearance drawn afresh per case (and on a real background)
    it has to go by the lesion's shape and contrast against the gland."""
    out = work / f"{recipe.package}.final-randomised.pt"
    if (done := _kept(out)) is not None:
        return done
    extra = _extra_sets(recipe, work, scale, progress)
    scl = min(scale, 1.0)
    new, res, cfg, _ = _continue_end_to_end(
        recipe, work, st, "randomised", [c for d in extra for c in find_cases(d, "Tr")],
        max(2, int(recipe.randomised_iterations * scl)),
        recipe.randomised_minutes * max(scl, 0.05), 2, progress)
    new["randomised"] = {"iterations": res.iterations, "lr": cfg.lr,
                         "window_crops": cfg.window_crops,
                         "data": "; ".join(f"{p.name}: {len(find_cases(p, 'Tr'))} cases"
                                           for p in extra),
                         "seconds": round(res.seconds), "losses": _losses(res)}
    torch.save(new, out)
    return new


def _refine(recipe: Recipe, data: Path, work: Path, st: dict[str, Any], scale: float,
            progress: Callable[[str], None] | None) -> dict[str, Any]:
    """The trained stage-2 model refined end to end on more phantoms, with crops placed
    as inference places its windows (kept like ``final``; resumes from its checkpoint).

    Why: the lesion map of a model trained on lesion-centred crops alone turned out to
    depend on where a lesion falls in the one or two windows a stage-1 ROI gets."""
    out = work / f"{recipe.package}.final-refine.pt"
    if (done := _kept(out)) is not None:
        return done
    assert recipe.refine_seeds is not None
    seeds = range(*recipe.refine_seeds)
    if scale < 1.0:
        seeds = seeds[: max(6, int(len(seeds) * scale))]
    extra = _phantoms(recipe, work, "refine", seeds, progress)
    cases = find_cases(data, "Tr")[: st["cases"]] + find_cases(extra, "Tr")
    new, res, cfg, n = _continue_end_to_end(
        recipe, work, st, "refine", cases,
        max(2, int(recipe.refine_iterations * min(scale, 1.0))),
        recipe.refine_minutes * max(min(scale, 1.0), 0.05), 1, progress)
    new["refine"] = {"iterations": res.iterations, "lr": cfg.lr,
                     "window_crops": cfg.window_crops, "roi_jitter": cfg.roi_jitter,
                     "data": f"seeds {st['seeds'][0]}..{st['seeds'][1] - 1} and "
                             f"{seeds.start}..{seeds.stop - 1} ({n} cases)",
                     "seconds": round(res.seconds),
                     "small_lesion_boost": cfg.small_lesion_boost,
                     "losses": _losses(res)}
    torch.save(new, out)
    return new


def _finetune_head(recipe: Recipe, data: Path, work: Path, st: dict[str, Any], scale: float,
                   progress: Callable[[str], None] | None) -> dict[str, Any]:
    """Stage 2's tumour-type MLP retrained on cached frozen features (kept like ``final``)."""
    out = work / f"{recipe.package}.final-head.pt"
    if (done := _kept(out)) is not None:
        return done
    from pipelines.models.networks import build

    seeds_txt = f"seeds {st['seeds'][0]}..{st['seeds'][1] - 1} (the body's set)"
    if recipe.head_seeds is not None:
        seeds = range(*recipe.head_seeds)
        if scale < 1.0:
            seeds = seeds[: max(6, int(len(seeds) * scale))]
        data = _phantoms(recipe, work, "head", seeds, progress)
        seeds_txt = f"seeds {seeds.start}..{seeds.stop - 1} ({len(seeds)} cases)"
    model = build(recipe.arch, dict(recipe.params))
    model.load_state_dict(st["state_dict"])
    hc = HeadConfig(crops_per_case=max(1, int(recipe.head_crops_per_case * min(scale, 1.0))),
                    iterations=max(2, int(recipe.head_iterations * min(scale, 1.0))),
                    reset=recipe.head_reset, lr=recipe.head_lr)
    t_start = time.monotonic()
    s2, classes = [], []
    cached = None
    feats, labels = [], []
    for c in find_cases(data, "Tr"):
        img, lab = read_case(c)
        if recipe.head_windows:
            # The stage-1 ROI rule (box + 10 mm, at least one patch), one case at a time:
            # only features kept.
            x, y = stage2_sample(img, lab, recipe.spacing, recipe.patch_zyx, recipe.preset,
                                 margin_mm=10.0, min_extra=0, orientation=_orientation(recipe))
            f, lb = window_features(model, [(x, y)], [_class(c.diagnosis, y)],
                                    recipe.patch_zyx)
            feats.append(f)
            labels.append(lb)
            if progress and len(feats) % 20 == 0:
                progress(f"head window features: {len(feats)} cases")
            continue
        s2.append(stage2_sample(img, lab, recipe.spacing, recipe.patch_zyx, recipe.preset,
                                orientation=_orientation(recipe)))
        classes.append(_class(c.diagnosis, s2[-1][1]))
    if recipe.head_windows:
        cached = (torch.cat(feats), torch.cat(labels))
    res = finetune_stage2_head(model, s2, classes, recipe.patch_zyx, hc, progress, cached)
    seconds = time.monotonic() - t_start  # features included
    new = {**st, "state_dict": model.state_dict(), "seconds": st["seconds"] + seconds,
           "head": {"iterations": res.iterations, "crops_per_case": hc.crops_per_case,
                    "windows": recipe.head_windows, "reset": hc.reset, "lr": hc.lr,
                    "data": seeds_txt,
                    "seconds": round(seconds),
                    "losses": {k: round(float(v), 4) for k, v in res.losses.items()}}}
    if recipe.head_windows:
        del new["head"]["crops_per_case"]
    torch.save(new, out)
    return new


def train_demo(
    work: Path,
    weights_dir: Path,
    *,
    only: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
    scale: float = 1.0,
) -> dict[str, Any]:
    """Generate the phantom sets, train every demo recipe and write the packages.

    ``scale`` shrinks iterations and budgets (tests use a tiny fraction).
    """

    torch.set_num_threads(1)
    summary: dict[str, Any] = {}
    trained: dict[str, dict[str, Any]] = {}
    # Train everything first, package last: a packaging problem never costs a retrain.
    for key, recipe in RECIPES.items():
        if only and key not in only:
            continue
        contrast = "ct" if recipe.modality == "CT" else "mr_t1"
        all_seeds = DEMO_SEEDS[contrast]
        if scale < 1.0:
            all_seeds = all_seeds[: max(6, int(len(all_seeds) * scale))]
        # A recipe may train on a prefix of the set (the older CT models on seeds 0..159).
        seeds = (all_seeds[: recipe.train_cases] if recipe.train_cases is not None
                 else all_seeds)
        data = _phantoms(recipe, work, None, all_seeds, progress)
        final = work / f"{recipe.package}.final.pt"
        if final.exists():
            st = torch.load(final, map_location="cpu", weights_only=False)
        else:
            r = recipe if scale >= 1.0 else replace(
                recipe, iterations=max(2, int(recipe.iterations * scale)),
                max_minutes=recipe.max_minutes * max(scale, 0.05))
            extra = (_extra_sets(recipe, work, scale, progress)
                     if recipe.task == "pancreas-localisation" else [])
            res = train_recipe(r, data, work / "ckpt", seed=0, progress=progress,
                               max_cases=len(seeds), extra=extra)
            st = {
                "state_dict": res.model.state_dict(), "iterations": res.iterations,
                "seconds": res.seconds, "losses": res.losses, "history": res.history,
                "cases": len(seeds), "seeds": [seeds.start, seeds.stop],
                "extra": [f"{p.name}: {len(find_cases(p, 'Tr'))} cases" for p in extra],
            }
            torch.save(st, final)
        if recipe.task == "lesion-detection" and recipe.refine_iterations > 0:
            st = _refine(recipe, data, work, st, scale, progress)
        if recipe.task == "lesion-detection" and recipe.head_iterations > 0:
            st = _finetune_head(recipe, data, work, st, scale, progress)
        if recipe.task == "lesion-detection" and recipe.randomised_iterations > 0:
            st = _refine_randomised(recipe, work, st, scale, progress)
        trained[key] = st
    from pipelines.models.package import write_package

    for key, st in trained.items():
        recipe = RECIPES[key]
        contrast = "ct" if recipe.modality == "CT" else "mr_t1"
        data_txt = (f"synthetic {contrast} phantoms, seeds {st['seeds'][0]}.."
                    f"{st['seeds'][1] - 1} ({st['cases']} cases)")
        if st.get("extra"):
            data_txt += "; randomised appearance (pipelines.phantom.randomised; label maps " \
                        "of every source but " + ", ".join(HELD_OUT_SOURCES) + "): " + \
                        "; ".join(st["extra"])
        if "refine" in st:
            data_txt += f"; refined on {st['refine']['data']}"
        if "head" in st:
            data_txt += f"; tumour-type head fine-tune on {st['head']['data']}"
        if "randomised" in st:
            data_txt += ("; then refined end to end on " + st["randomised"]["data"] +
                         " (randomised appearance without " + ", ".join(HELD_OUT_SOURCES) +
                         ")")
        provenance = {
            "data": f"{data_txt}, pipelines.phantom",
            "iterations": st["iterations"], "seconds": round(st["seconds"]),
            "threads": torch.get_num_threads(), "device": "cpu",
            "command": "make train-demo",
            "final_losses": {k: round(float(v), 4) for k, v in st["losses"].items()},
        }
        if "refine" in st:
            provenance["refine"] = st["refine"]
        if "head" in st:
            provenance["head_finetune"] = st["head"]
        if "randomised" in st:
            provenance["randomised_refine"] = st["randomised"]
        path = write_package(weights_dir / recipe.package, recipe, st["state_dict"], provenance,
                             version=recipe.version)
        summary[key] = {"package": str(path), **provenance}
        _say(progress, f"{recipe.package}: written to {path}")
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":  # pragma: no cover - `make train-demo` goes through the CLI
    import sys

    logging.basicConfig(level=logging.INFO)
    out = train_demo(Path(sys.argv[1]), Path(sys.argv[2]),
                     only=sys.argv[3].split(",") if len(sys.argv) > 3 else None,
                     progress=lambda m: print(m, flush=True))
    print(json.dumps(out, indent=2, default=str))
