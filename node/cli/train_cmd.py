"""``ainode train`` (one model on a labelled folder) and ``ainode train-demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from storage.errors import InputError

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
    res = train_recipe(recipe, data, work or out.with_suffix(".work"), seed=seed,
                       iterations=iterations, minutes=minutes,
                       progress=lambda m: typer.echo(m, err=True))
    prov = {"data": str(data), "iterations": res.iterations, "seconds": round(res.seconds),
            "final_losses": {k: round(float(v), 4) for k, v in res.losses.items()},
            "command": "ainode train"}
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
