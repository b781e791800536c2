"""``ainode models``: list, show, verify and import model packages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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
    """Every package in the configured models folder and the shipped demo weights.

    ``source`` says which folder a package is in and ``used_by`` which pipeline
    stages a job would run it for: a package in ``inference.models_dir``
    replaces the shipped one of the same name, stage by stage.
    """
    cfg = get(ctx).config
    models_dir = Path(cfg.inference.models_dir) if cfg.inference.models_dir else None
    used_by = _stage_uses(models_dir)
    rows = []
    seen: set[Path] = set()
    for root in _roots(ctx):
        source = "shipped" if root == SHIPPED_WEIGHTS else "models_dir"
        for pkg in _pkg().find_packages(root):
            seen.add(pkg.resolve())
            rows.append(_row(pkg, source, used_by))
    for path, (source, _) in sorted(used_by.items()):  # a plug-in's own shipped packages
        if path not in seen:
            rows.append(_row(path, source, used_by))
    replaced = {r["name"] for r in rows if r["source"] == "models_dir" and r["used_by"] != "-"}
    for r in rows:
        if r["source"] == "shipped" and r["used_by"] == "-" and r["name"] in replaced:
            r["used_by"] = "- (replaced by models_dir)"
    emit(rows, ["name", "version", "task", "modality", "architecture", "format", "source",
                "used_by", "path"], as_json=as_json, title="Model packages")


def _stage_uses(models_dir: Path | None) -> dict[Path, tuple[str, list[str]]]:
    """Package folder -> (its source, the ``pipeline:stage`` names that load it)."""
    from pipelines import registry

    uses: dict[Path, tuple[str, list[str]]] = {}
    for name in registry.available():
        try:
            packages = registry.model_packages(name, models_dir)
        except ModelError as exc:  # a broken plug-in: say so, list the rest
            typer.echo(f"ainode: warning: {exc}", err=True)
            continue
        for stage, found in packages.items():
            if found is not None:
                entry = uses.setdefault(Path(found.path).resolve(), (found.source, []))
                entry[1].append(f"{name}:{stage}")
    return uses


def _row(pkg: Path, source: str, used_by: dict[Path, tuple[str, list[str]]]) -> dict[str, Any]:
    users = used_by.get(pkg.resolve(), (source, []))[1]
    row: dict[str, Any] = {"name": pkg.name, "source": source, "path": str(pkg),
                           "used_by": ", ".join(users) or "-"}
    try:
        m = _pkg().read_manifest(pkg)
        row.update({"name": m.name, "version": m.version, "task": m.task,
                    "modality": m.input.modality, "architecture": m.architecture.name,
                    "format": m.weights.format})
    except ModelError as exc:
        row.update({"version": "?", "task": f"INVALID: {exc}"})
    return row


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


@app.command("shadow")
def shadow(
    ctx: typer.Context,
    packages: Annotated[list[Path], typer.Argument(help="the new package folder(s)")],
    rule: Annotated[str, typer.Option("--rule", help="run beside this rule's jobs")],
    name: Annotated[str | None, typer.Option(
        "--name", help="the candidate's name (default: first package's name-version)")] =
        None,
) -> None:
    """Run PACKAGES in shadow beside RULE on live traffic: results kept, never sent."""
    from node.candidates import create_candidate
    from pipelines import registry
    from storage.audit import os_actor

    app_ctx = get(ctx)
    if name is None:
        m = _pkg().read_manifest(packages[0])
        name = f"{m.name}-{m.version}".replace("+", "-")[:48]
    with app_ctx.db.session() as s:
        cand = create_candidate(s, app_ctx.config, name, packages, rule=rule,
                                actor=os_actor(), pipelines=registry.available())
        typer.echo(f"candidate {cand.name} in shadow beside {rule} (rule {cand.rule_name}, "
                   f"folder {cand.path})")


@app.command("candidates")
def candidates(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Model sets under trial (shadow), promoted or retired."""
    from node.candidates import list_candidates

    with get(ctx).db.session() as s:
        rows = [{"name": c.name, "state": c.state, "rule": c.rule_name or "-",
                 "packages": ", ".join(f"{p['name']}@{p['version']}" for p in c.packages),
                 "created_at": c.created_at, "path": c.path} for c in list_candidates(s)]
    emit(rows, ["name", "state", "rule", "packages", "created_at"], as_json=as_json,
         title="Model candidates",
         wide_columns=["name", "state", "rule", "packages", "created_at", "path"])


@app.command("compare")
def compare(
    ctx: typer.Context,
    a: Annotated[str, typer.Argument(help="'active', a candidate's name or a model version")],
    b: Annotated[str, typer.Argument(help="the same, for the other model set")],
    since: Annotated[str, typer.Option("--since", help="window, e.g. 30d")] = "30d",
    bootstrap: Annotated[int, typer.Option(help="bootstrap replicates")] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Both model sets' live figures on the series both judged, with 95% intervals."""
    from node.cli.audit_cmd import parse_since
    from node.live import compare as run
    from node.live import compare_markdown

    with get(ctx).db.session() as s:
        report = run(s, a, b, parse_since(since), n_boot=bootstrap)
    typer.echo(json.dumps(report, indent=2) if as_json else
               compare_markdown(report).rstrip("\n"))


@app.command("promote")
def promote(ctx: typer.Context, name: str) -> None:
    """Make candidate NAME's packages the active ones (audited; old ones kept)."""
    from node.candidates import promote as run
    from storage.audit import os_actor

    app_ctx = get(ctx)
    with app_ctx.db.session() as s:
        done = run(s, app_ctx.config, name, actor=os_actor())
    for p in done["installed"]:
        typer.echo(f"promoted {p['name']} {p['version']} into {done['models_dir']}")
    for p in done["retired"]:
        typer.echo(f"retired {p['name']} {p['version']} (kept in {p['kept']})")
