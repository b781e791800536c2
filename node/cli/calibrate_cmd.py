"""``ainode calibrate``: fit a calibration of the reported scores and store it in a package.

Why a command of its own and not a flag of ``evaluate``: it writes into a model
package, which changes what every later job reports; ``evaluate`` only
measures. The scores are fitted uncalibrated (the package's current
calibration, if any, is ignored while fitting), through the evaluation's own
loop, so the fit sees exactly the numbers an evaluation scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from storage.errors import InputError

__all__ = ["calibrate"]


def calibrate(
    data: Annotated[Path, typer.Option("--data", help="validation set, MSD Task07 layout")],
    pipeline: Annotated[str, typer.Option(help="pancreas-ct | pancreas-mr")] = "pancreas-ct",
    models: Annotated[Path | None, typer.Option(help="models folder (default: shipped)")] =
        None,
    write: Annotated[Path | None, typer.Option(
        "--write", help="the stage-2 package to store it in (default: the one MODELS holds; "
        "the shipped package only when named here)")] = None,
    method: Annotated[str, typer.Option(help="temperature | isotonic")] = "temperature",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    max_cases: Annotated[int | None, typer.Option(help="use the first N cases")] = None,
    set_name: Annotated[str | None, typer.Option(
        "--set-name", help="what the validation set is, recorded with the calibration")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="fit and print, write nothing")] = False,
    quiet: Annotated[bool, typer.Option(help="no per-case lines")] = False,
) -> None:
    """Fit temperature or isotonic scaling on DATA and store it in the stage-2 package."""
    import json

    from pipelines.evaluation.calibration import fit_records
    from pipelines.evaluation.run import run_cases
    from pipelines.models.package import verify_package, write_calibration
    from pipelines.pancreas import PipelineSettings, build_pipeline, model_packages

    if method not in ("temperature", "isotonic"):
        raise InputError(f"unknown --method {method!r}; known: temperature, isotonic")
    if not data.is_dir():
        raise InputError(f"--data {data}: not a folder")
    target = write
    if target is None:
        found = model_packages(pipeline, models).get("stage2")
        if found is None or found.source == "shipped":
            raise InputError("no stage-2 package in --models to calibrate; name the package "
                             "with --write (the shipped one too, deliberately)")
        target = found.path
    verify_package(target)
    settings = PipelineSettings(calibrated=False, evidence_maps=False)
    pipe = build_pipeline(pipeline, models, device=device, settings=settings)
    if pipe.stage2.path.resolve() != target.resolve():
        raise InputError(f"--write {target} is not the stage-2 package this pipeline runs "
                         f"({pipe.stage2.path}); pass the --models folder that holds it")
    records = run_cases(data, pipe, max_cases=max_cases,
                        progress=None if quiet else (lambda m: typer.echo(m, err=True)))
    fitted_on = (f"{set_name or data.name}: {len(records)} cases of {data} "
                 f"({sum(r.assessable for r in records)} assessed)")
    try:
        entry = fit_records(records, method, fitted_on,  # type: ignore[arg-type]
                            {"method": method, "pipeline": pipeline,
                             "models": pipe.model_version()})
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    typer.echo(json.dumps(entry.model_dump(mode="json"), indent=2))
    if dry_run:
        typer.echo("dry run: nothing written")
        return
    m = write_calibration(target, entry)
    typer.echo(f"calibration stored in {target / 'model.yaml'}; {m.name} is now {m.version}")
