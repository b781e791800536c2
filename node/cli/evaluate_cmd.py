"""``ainode evaluate``: PANORAMA metrics of a pipeline on a labelled folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from storage.errors import InputError


def evaluate(
    data: Annotated[Path, typer.Option("--data", help="MSD Task07-layout folder")],
    out: Annotated[Path, typer.Option("--out", help="where metrics.json, tables, plots go")],
    pipeline: Annotated[str, typer.Option(help="pancreas-ct | pancreas-mr")] = "pancreas-ct",
    models: Annotated[Path | None, typer.Option(help="models folder (default: shipped)")] =
        None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    bootstrap: Annotated[int, typer.Option(help="bootstrap replicates")] = 1000,
    max_cases: Annotated[int | None, typer.Option(help="evaluate the first N cases")] = None,
    quiet: Annotated[bool, typer.Option(help="no per-case lines")] = False,
    candidate_fraction: Annotated[float, typer.Option(
        help="dynamic threshold: fraction of each peak kept as the lesion")] = 0.2,
    score_mode: Annotated[str, typer.Option(help="mean | max | classification | lesion")] =
        "mean",
) -> None:
    """Run PIPELINE on every case of DATA and write metrics.json, metrics.md, roc/froc PNGs."""
    from pipelines.evaluation.run import evaluate as run
    from pipelines.evaluation.run import markdown_table
    from pipelines.pancreas import build_pipeline

    if not data.is_dir():
        raise InputError(f"--data {data}: not a folder")
    if pipeline not in ("pancreas-ct", "pancreas-mr"):
        raise InputError(f"unknown pipeline {pipeline!r}")
    from pipelines.pancreas import PipelineSettings

    if not 0.0 < candidate_fraction < 1.0:
        raise InputError("--candidate-fraction must lie between 0 and 1")
    if score_mode not in ("mean", "max", "classification", "lesion", "product"):
        raise InputError(f"unknown --score-mode {score_mode!r}")
    settings = PipelineSettings(candidate_fraction=candidate_fraction,
                                score_mode=score_mode)  # type: ignore[arg-type]
    pipe = build_pipeline(pipeline, models, device=device, settings=settings)
    metrics = run(data, out, pipe, n_boot=bootstrap, max_cases=max_cases,
                  progress=None if quiet else (lambda m: typer.echo(m, err=True)))
    typer.echo(markdown_table(metrics))
    typer.echo(f"written: {out / 'metrics.json'}, {out / 'metrics.md'}, "
               f"{out / 'roc.png'}, {out / 'froc.png'}")
