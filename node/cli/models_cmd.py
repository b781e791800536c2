"""``ainode models``: list, show, verify and import model packages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

import pipelines
from node.cli.context import get
from node.cli.output import emit
from storage.errors import ModelError

if TYPE_CHECKING:
    from types import ModuleType

# The shipped demo packages (pipelines/weights). Kept as a plain path so that
# `ainode` starts without importing torch: the package module is loaded only
# when a `models` command runs (every other command, `serve` included, pays
# neither the start-up time nor the memory).
SHIPPED_WEIGHTS = Path(pipelines.__file__).resolve().parent / "weights"


def _pkg() -> ModuleType:
    import pipelines.models.package as package

    return package

app = typer.Typer(help="Model packages (model.yaml + weights).", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="JSON instead of a table.")]


def _roots(ctx: typer.Context) -> list[Path]:
    cfg = get(ctx).config
    roots = [SHIPPED_WEIGHTS]
    if cfg.inference.models_dir is not None:
        roots.insert(0, Path(cfg.inference.models_dir))
    return roots


def _find(ctx: typer.Context, name: str) -> Path:
    p = Path(name)
    if (p / "model.yaml").exists():
        return p
    for root in _roots(ctx):
        if (root / name / "model.yaml").exists():
            return root / name
    typer.echo(f"ainode: error: no model package named {name!r}", err=True)
    raise typer.Exit(2)


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Every package in the configured models folder and the shipped demo weights."""
    rows = []
    for root in _roots(ctx):
        for pkg in _pkg().find_packages(root):
            try:
                m = _pkg().read_manifest(pkg)
                rows.append({"name": m.name, "version": m.version, "task": m.task,
                             "modality": m.input.modality, "architecture": m.architecture.name,
                             "format": m.weights.format, "path": str(pkg)})
            except ModelError as exc:
                rows.append({"name": pkg.name, "version": "?", "task": f"INVALID: {exc}",
                             "path": str(pkg)})
    emit(rows, ["name", "version", "task", "modality", "architecture", "format", "path"],
         as_json=as_json, title="Model packages")


@app.command("show")
def show(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """The manifest of package NAME (a name or a folder)."""
    try:
        m = _pkg().read_manifest(_find(ctx, name))
    except ModelError as exc:
        typer.echo(f"ainode: error: {exc}", err=True)
        raise typer.Exit(2) from exc
    data = m.model_dump(mode="json")
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        import yaml

        typer.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@app.command("verify")
def verify(ctx: typer.Context, names: Annotated[list[str] | None, typer.Argument()] = None,
           as_json: JsonOpt = False) -> None:
    """Check manifests and weight hashes; exit 2 when any package is refused."""
    pkgs = [_find(ctx, n) for n in names] if names else \
        [p for r in _roots(ctx) for p in _pkg().find_packages(r)]
    rows, bad = [], 0
    for pkg in pkgs:
        try:
            m = _pkg().verify_package(pkg)
            rows.append({"name": m.name, "version": m.version, "status": "ok",
                         "sha256": m.weights.sha256[:16]})
        except ModelError as exc:
            bad += 1
            rows.append({"name": pkg.name, "version": "?", "status": f"REFUSED: {exc}"})
    emit(rows, ["name", "version", "status", "sha256"], as_json=as_json, title="Verification")
    if bad:
        raise typer.Exit(2)


@app.command("import")
def import_(
    ctx: typer.Context,
    source: Path,
    kind: Annotated[str, typer.Option(help="package | monai-bundle | nnunet")] = "package",
    name: Annotated[str | None, typer.Option(help="package name (bundles, nnU-Net)")] = None,
    task: Annotated[str, typer.Option(help="pancreas-localisation | lesion-detection")] =
        "pancreas-localisation",
    to: Annotated[Path | None, typer.Option("--to", help="models folder (default: config)")] =
        None,
    force: Annotated[bool, typer.Option(help="replace an existing package")] = False,
) -> None:
    """Import a model package, a MONAI bundle or an nnU-Net v2 results folder."""
    cfg = get(ctx).config
    dest = to or (Path(cfg.inference.models_dir) if cfg.inference.models_dir else
                  Path(cfg.storage.data_dir) / "models")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "package":
            out = _pkg().import_package(source, dest, force=force)
        elif kind == "monai-bundle":
            from pipelines.models.bundle import import_monai_bundle

            out = import_monai_bundle(source, dest, name=name, task=task, force=force)
        elif kind == "nnunet":
            from pipelines.models.nnunet import import_nnunet_folder

            out = import_nnunet_folder(source, dest, name=name, task=task, force=force)
        else:
            typer.echo(f"ainode: error: unknown --kind {kind!r}", err=True)
            raise typer.Exit(2)
    except ModelError as exc:
        typer.echo(f"ainode: error: {exc}", err=True)
        raise typer.Exit(2) from exc
    m = _pkg().verify_package(out)
    typer.echo(f"imported {m.name} {m.version} ({m.task}) into {out}")
