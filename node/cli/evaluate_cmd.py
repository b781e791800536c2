"""``ainode evaluate``: PANORAMA metrics of a pipeline on a labelled folder.

``--set-name`` names the test set's source in the output, because figures on
phantoms from the training generator are no evidence of generalisation and
must not be read together with figures from another source; ``--compare``
prints two finished evaluations side by side instead of running one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from storage.errors import InputError


def _load_metrics(folder: Path) -> dict[str, Any]:
    path = folder / "metrics.json" if folder.is_dir() else folder
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"--compare {folder}: no metrics.json there") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"--compare {path}: not JSON ({exc})") from exc
    if not isinstance(data, dict) or "n_cases" not in data:
        raise InputError(f"--compare {path}: not an `ainode evaluate` metrics.json")
    return data


def evaluate(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Option("--data", help="MSD Task07-layout folder")] =
        None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="where metrics.json, tables, plots go")] = None,
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
    set_name: Annotated[str | None, typer.Option(
        "--set-name", help="the test set's source, written into metrics.json/metrics.md "
        "(e.g. 'generator-v1 fresh', 'randomised-appearance')")] = None,
    uncalibrated: Annotated[bool, typer.Option(
        "--uncalibrated", help="ignore the package's calibration (score the raw values)")] =
        False,
    compare: Annotated[tuple[Path, Path] | None, typer.Option(
        "--compare", help="print two evaluations (folders or metrics.json) side by side "
        "and exit; nothing is run")] = None,
    live: Annotated[bool, typer.Option(
        "--live", help="figures from readers' verdicts and reference diagnoses in the "
        "database instead of a labelled folder")] = False,
    since: Annotated[str, typer.Option("--since", help="--live: window, e.g. 90d")] = "90d",
    model: Annotated[str, typer.Option(
        "--model", help="--live: 'active', a candidate's name or a model version")] =
        "active",
    card: Annotated[Path | None, typer.Option(
        "--card", help="--live: also write the figures into this model package's card")] =
        None,
    as_json: Annotated[bool, typer.Option("--json", help="--live: print JSON")] = False,
    write_reference: Annotated[Path | None, typer.Option(
        "--write-reference", help="store the cases' quality records in this (stage-2) model "
        "package as its drift reference, named by --set-name (ainode qa report compares "
        "live jobs with it)")] = None,
) -> None:
    """Run PIPELINE on DATA: metrics.json, metrics.md, ROC/FROC and reliability PNGs, ECE.

    With ``--live``: PPV of findings, FP per series and sensitivity where references
    exist, from what readers recorded (``ainode feedback``), by scanner and protocol.
    """
    from pipelines.evaluation.run import compare_table, markdown_table

    if live:
        _live(ctx, since, model, bootstrap, out, card, as_json)
        return
    if compare is not None:
        a, b = compare
        typer.echo(compare_table(_load_metrics(a), _load_metrics(b), (str(a), str(b))), nl=False)
        return
    if data is None or out is None:
        raise InputError("--data and --out are required (or --compare DIR1 DIR2)")
    from pipelines.evaluation.run import evaluate as run
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
                                score_mode=score_mode,  # type: ignore[arg-type]
                                calibrated=not uncalibrated, evidence_maps=False)
    pipe = build_pipeline(pipeline, models, device=device, settings=settings)
    metrics = run(data, out, pipe, n_boot=bootstrap, max_cases=max_cases,
                  progress=None if quiet else (lambda m: typer.echo(m, err=True)),
                  set_name=set_name)
    typer.echo(markdown_table(metrics))
    typer.echo(f"written: {out / 'metrics.json'}, {out / 'metrics.md'}, "
               f"{out / 'roc.png'}, {out / 'froc.png'}, {out / 'reliability.png'}, "
               f"{out / 'qa_reference.json'}")
    if write_reference is not None:
        _write_reference(write_reference, out, set_name or str(data))


def _write_reference(pkg: Path, out: Path, fitted_on: str) -> None:
    """The evaluation's quality records into ``pkg`` (a model package) as its reference."""
    from pipelines.models.package import QA_REFERENCE_FILE, write_qa_reference

    records = json.loads((out / QA_REFERENCE_FILE).read_text())
    if not records:
        raise InputError("--write-reference: the pipeline gave no quality records")
    m = write_qa_reference(pkg, records, fitted_on=fitted_on)
    typer.echo(f"drift reference of {m.name} {m.version}: {len(records)} cases "
               f"({fitted_on}) in {pkg / QA_REFERENCE_FILE}")


def _live(ctx: typer.Context, since: str, model: str, n_boot: int, out: Path | None,
          card: Path | None, as_json: bool) -> None:
    from node.cli.audit_cmd import parse_since
    from node.cli.context import get
    from node.live import live_figures, live_markdown

    with get(ctx).db.session() as s:
        report = live_figures(s, parse_since(since), model=model, n_boot=n_boot)
    report["window"] = since
    text = live_markdown(report)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "live_metrics.json").write_text(json.dumps(report, indent=2))
        (out / "live_metrics.md").write_text(text)
    if card is not None:
        from node.live import write_card

        write_card(card, report, text)
    typer.echo(json.dumps(report, indent=2) if as_json else text.rstrip("\n"))
