"""``ainode train`` (one model on a labelled folder) and ``ainode train-demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from storage.errors import InputError, ModelError

TASKS = {"stage1": "stage1", "stage2": "stage2", "slice": "slice"}


def train(
    data: Annotated[Path, typer.Option("--data", help="MSD-layout folder (imagesTr/labelsTr)")],
    out: Annotated[Path, typer.Option("--out", help="package folder to write")],
    task: Annotated[str, typer.Option(help="stage1 | stage2 | slice")] = "stage2",
    modality: Annotated[str, typer.Option(help="ct | mr")] = "ct",
    work: Annotated[Path | None, typer.Option(help="checkpoint folder (resume from it)")] =
        None,
    iterations: Annotated[int | None, typer.Option(help="override the recipe")] = None,
    minutes: Annotated[float | None, typer.Option(help="wall-clock budget")] = None,
    seed: int = 0,
    version: str = "0.1.0",
    init: Annotated[Path | None, typer.Option(
        "--init", help="fine-tune: start from this model package's weights (a folder; "
        "same architecture as the recipe)")] = None,
) -> None:
    """Train one model on DATA and write it as a model package to OUT."""
    from pipelines.models.package import write_package
    from pipelines.training.recipes import RECIPES
    from pipelines.training.run import train_recipe

    key = f"{modality}-{task}"
    if key not in RECIPES:
        raise InputError(f"no recipe for --modality {modality} --task {task}")
    if not data.is_dir():
        raise InputError(f"--data {data}: not a folder")
    recipe = RECIPES[key]
    weights, start = _init_weights(init, recipe) if init is not None else (None, None)
    res = train_recipe(recipe, data, work or out.with_suffix(".work"), seed=seed,
                       iterations=iterations, minutes=minutes,
                       progress=lambda m: typer.echo(m, err=True), init=weights)
    prov = {"data": str(data), "iterations": res.iterations, "seconds": round(res.seconds),
            "final_losses": {k: round(float(v), 4) for k, v in res.losses.items()},
            "command": "ainode train"}
    if start is not None:
        prov["fine_tuned_from"] = start
    path = write_package(out, recipe, res.model.state_dict(), prov, version=version)
    typer.echo(f"wrote {path}")


def train_demo(
    work: Annotated[Path, typer.Option(help="phantoms and checkpoints (resumable)")] =
        Path("data/train-demo"),
    weights: Annotated[Path | None, typer.Option(help="where the packages go")] = None,
    only: Annotated[str | None, typer.Option(help="comma-separated recipe keys")] = None,
) -> None:
    """Generate phantoms and train the shipped demo weights (under two hours on one CPU thread)."""
    from pipelines.pancreas.model import SHIPPED_WEIGHTS
    from pipelines.training.run import train_demo as run

    summary = run(work, weights or SHIPPED_WEIGHTS, only=only.split(",") if only else None,
                  progress=lambda m: typer.echo(m, err=True))
    for key, s in summary.items():
        typer.echo(f"{key}: {s['package']} ({s['iterations']} iterations, {s['seconds']} s)")


def _init_weights(pkg: Path, recipe: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The verified weights of package ``pkg`` when its network is the recipe's.

    Why refuse a mismatch: loading a state dict into another architecture fails deep in
    torch, or worse, half-succeeds; a fine-tune must start from the model it names.
    """
    import torch

    from pipelines.models.package import verify_package

    try:
        m = verify_package(pkg)
    except ModelError as exc:
        raise InputError(f"--init {pkg}: {exc}") from exc
    if m.weights.format != "state_dict":
        raise InputError(f"--init {pkg}: {m.weights.format} weights cannot be fine-tuned here")
    if (m.architecture.name, dict(m.architecture.params)) != (recipe.arch,
                                                              dict(recipe.params)):
        raise InputError(f"--init {pkg}: its network ({m.architecture.name} "
                         f"{m.architecture.params}) is not the recipe's ({recipe.arch} "
                         f"{recipe.params})")
    state = torch.load(pkg / m.weights.file, map_location="cpu", weights_only=True)
    return state, {"package": m.name, "version": m.version, "sha256": m.weights.sha256}
