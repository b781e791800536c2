"""Model sets under trial: shadowed beside the active models, compared live, promoted.

Why a candidate is a whole folder: a pipeline loads its stages' packages from
one models folder, so a candidate is the active folder's packages with the
new ones in their place. A shadow job then runs exactly the set that
promotion makes active, and ``promote`` is a copy of that folder's new
packages into ``inference.models_dir`` (the old ones kept under
``.retired/``), audited. The shadow rule is a normal shadow rule (results
recorded, never sent: ``node.jobs.run``) whose ``models`` names the candidate.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.config import NodeConfig
from node.routing import store as rule_store
from storage.audit import audit
from storage.errors import ConfigError, InputError
from storage.models import ModelCandidate, utcnow

__all__ = ["candidates_root", "create_candidate", "list_candidates", "promote"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")


def candidates_root(config: NodeConfig) -> Path:
    inf = config.inference
    return Path(inf.candidates_dir) if inf.candidates_dir else \
        Path(config.storage.data_dir) / "models" / "candidates"


def _manifest(pkg: Path) -> Any:
    from pipelines.models.package import verify_package

    return verify_package(pkg)


def create_candidate(session: Session, config: NodeConfig, name: str, packages: list[Path],
                     *, rule: str, actor: str, pipelines: list[str]) -> ModelCandidate:
    """Register ``packages`` as candidate ``name`` and shadow it beside rule ``rule``.

    The shadow rule ``<rule>-shadow-<name>`` has the rule's conditions and pipeline,
    no destinations, ``shadow`` on and ``models`` = ``name``.
    """
    if not _NAME.match(name):
        raise InputError(f"invalid candidate name {name!r}: letters, digits, '.', '_', '-'")
    if session.scalars(select(ModelCandidate).where(ModelCandidate.name == name)).first():
        raise InputError(f"a candidate named {name!r} exists already")
    if not packages:
        raise InputError("name at least one package folder")
    manifests = [_manifest(p) for p in packages]  # ModelError: refused before anything
    base = rule_store.get_rule(session, rule)
    folder = candidates_root(config) / name
    if folder.exists():
        raise InputError(f"{folder} exists already; remove it or choose another name")
    folder.mkdir(parents=True)
    new = {m.name for m in manifests}
    active = Path(config.inference.models_dir) if config.inference.models_dir else None
    if active is not None and active.is_dir():
        for pkg in sorted(p.parent for p in active.glob("*/model.yaml")):
            if pkg.name not in new:
                shutil.copytree(pkg, folder / pkg.name)
    for src, m in zip(packages, manifests, strict=True):
        shutil.copytree(src, folder / m.name)
    spec = replace(rule_store.spec_of(base), name=f"{rule}-shadow-{name}"[:64],
                   destinations=(), shadow=True, models=name)
    spec.check_shape()
    cand = ModelCandidate(name=name, path=str(folder.resolve()), rule_name=spec.name,
                          packages=[{"name": m.name, "version": m.version,
                                     "sha256": m.weights.sha256} for m in manifests],
                          created_by=actor[:128])
    session.add(cand)
    session.flush()
    rule_store.add_rule(session, spec, actor=actor, pipelines=pipelines)
    audit(session, "model.shadowed", actor=actor, candidate=name, rule=spec.name,
          beside=rule, packages=cand.packages)
    return cand


def list_candidates(session: Session) -> list[ModelCandidate]:
    return list(session.scalars(select(ModelCandidate).order_by(ModelCandidate.id)))


def promote(session: Session, config: NodeConfig, name: str, *, actor: str
            ) -> dict[str, Any]:
    """Make candidate ``name``'s new packages the active ones, audited ``model.promoted``.

    The packages it replaces move to ``<models_dir>/.retired/<time>/`` (a rollback is
    copying them back); its shadow rule is removed, its jobs stay for the record.
    """
    cand = session.scalars(select(ModelCandidate).where(ModelCandidate.name == name)).first()
    if cand is None:
        raise InputError(f"no candidate {name!r} (ainode models candidates)")
    if cand.state != "shadow":
        raise InputError(f"candidate {name!r} is {cand.state}, not in shadow")
    if config.inference.models_dir is None:
        raise ConfigError("promotion installs into inference.models_dir; set it in the "
                          "config (the shipped weights are never overwritten)")
    active = Path(config.inference.models_dir)
    active.mkdir(parents=True, exist_ok=True)
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    retired: list[dict[str, str]] = []
    installed: list[dict[str, str]] = []
    for pkg in cand.packages:
        src, dest = Path(cand.path) / pkg["name"], active / pkg["name"]
        m = _manifest(src)  # still the package that was shadowed
        if m.weights.sha256 != pkg["sha256"]:
            raise InputError(f"candidate {name!r}: {pkg['name']} changed since it was "
                             "shadowed; refusing to promote")
        if dest.exists():
            old = _manifest(dest)
            keep = active / ".retired" / stamp / pkg["name"]
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(dest), keep)
            retired.append({"name": old.name, "version": old.version, "kept": str(keep)})
        tmp = active / f".{pkg['name']}.promoting"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        tmp.rename(dest)
        installed.append({"name": m.name, "version": m.version})
    cand.state = "promoted"
    cand.promoted_at = utcnow()
    if cand.rule_name:
        with contextlib.suppress(InputError):  # removed by hand already
            rule_store.remove_rule(session, cand.rule_name, actor=actor)
    audit(session, "model.promoted", actor=actor, candidate=name, installed=installed,
          retired=retired, models_dir=str(active))
    return {"candidate": name, "installed": installed, "retired": retired,
            "models_dir": str(active)}
