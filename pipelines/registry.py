"""Pipelines by registered name: routing rules and scripts name a pipeline, never code.

A pipeline is a factory published in the entry-point group ``ainode.pipelines``
(the built-ins in this project's ``pyproject.toml``; a hospital's own pipeline
in the package it ``pip install``s), so adding one touches no module of the
node. Discovery reads the installed distributions' metadata only: listing the
names imports nothing, and a plug-in that fails to import fails the jobs that
use it with a ModelError naming it, never the node or the other pipelines.

Every factory is called as ``factory(models_dir=..., device=...)``: the
configuration decides where the weights come from and where they run, never
the pipeline module. Models stay loaded between jobs because the registry
keeps the built instance, one per (name, models directory, device).
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipelines.plugins import published
from storage.errors import ModelError

if TYPE_CHECKING:
    from pipelines.results import AnalysisResult

log = logging.getLogger(__name__)

__all__ = ["GROUP", "Pipeline", "available", "get", "model_packages", "quality_reference",
           "refresh", "register"]

GROUP = "ainode.pipelines"


class Pipeline(Protocol):
    """What the job runner calls. ``volume`` is a pipelines.volume.Volume."""

    name: str
    min_slices: int

    def model_version(self) -> str: ...

    def run(self, volume: object) -> AnalysisResult: ...


def run_pipeline(pipeline: Pipeline, volume: object, *, evidence: bool) -> AnalysisResult:
    """``pipeline.run(volume)``, asking for evidence maps when the pipeline takes the
    ``evidence`` keyword (the built-in pancreas pipelines do; a plug-in need not)."""
    import inspect

    run = pipeline.run
    try:
        takes = "evidence" in inspect.signature(run).parameters
    except (TypeError, ValueError):
        takes = False
    return run(volume, evidence=evidence) if takes else run(volume)  # type: ignore[call-arg]


# Called with the keyword arguments ``models_dir`` (a Path, or None for the
# pipeline's shipped weights) and ``device`` ("auto", "cpu", "cuda[:N]").
# A factory may also offer ``packages(models_dir)``: which model package each
# stage would use and from where, for ``ainode models list``.
Factory = Callable[..., Pipeline]
_PIPELINE_PARTS = ("name", "min_slices", "model_version", "run")


@dataclass(frozen=True)
class _Source:
    """Where a name comes from; it names the culprit in every error about the plug-in."""

    origin: str
    entry_point: EntryPoint | None = None
    factory: Factory | None = None  # registered in process


_registered: dict[str, Factory] = {}
_discovered: dict[str, _Source] | None = None  # None: not read yet
_conflicts: dict[str, list[str]] = {}
_loaded: dict[str, tuple[str, Factory]] = {}  # name -> (origin, checked factory)
# key -> (the factory that built it, the instance)
_instances: dict[tuple[str, str, str, str], tuple[Factory, Pipeline]] = {}
_lock = threading.RLock()


def register(name: str) -> Callable[[Factory], Factory]:
    """In-process registration (tests, scripts); it takes precedence over an entry point."""

    def deco(factory: Factory) -> Factory:
        with _lock:
            _registered[name] = factory
            _loaded.pop(name, None)
        return factory

    return deco


def refresh() -> None:
    """Read the installed plug-ins again (after a package was installed into a running process).

    Built instances are kept; one is rebuilt only when its name now resolves to
    another factory.
    """
    global _discovered
    with _lock:
        _discovered = None
        _conflicts.clear()
        _loaded.clear()


def _discover() -> dict[str, _Source]:
    """Every installed distribution's entry points in :data:`GROUP`.

    Read through :func:`pipelines.plugins.published` (every copy of the
    metadata, first copy per distribution); two distributions naming the
    same pipeline are a conflict, refused when it is asked for.
    """
    global _discovered
    if _discovered is None:
        found: dict[str, _Source] = {}
        owners: dict[str, dict[str, str]] = {}  # pipeline -> {distribution: origin}
        for pub in published(GROUP):
            name = pub.entry_point.name
            owners.setdefault(name, {})[pub.key] = pub.origin
            found.setdefault(name, _Source(pub.origin, entry_point=pub.entry_point))
        _conflicts.clear()
        _conflicts.update({n: list(o.values()) for n, o in owners.items() if len(o) > 1})
        _discovered = found
    return _discovered


def _sources() -> dict[str, _Source]:
    sources = dict(_discover())
    for name, factory in _registered.items():
        where = f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', '?')}"
        sources[name] = _Source(f"{where}, registered in process", factory=factory)
    return sources


def available() -> list[str]:
    """Every pipeline name a rule may use; nothing is imported to list them."""
    with _lock:
        return sorted(_sources())


def _factory(name: str) -> tuple[str, Factory]:
    """The checked factory of ``name`` and its origin (loaded once per origin)."""
    sources = _sources()
    if name not in sources:
        raise ModelError(f"unknown pipeline {name!r}; known: {', '.join(sorted(sources))}")
    src = sources[name]
    cached = _loaded.get(name)
    if cached is not None and cached[0] == src.origin:
        return cached
    if src.factory is None and name in _conflicts:
        raise ModelError(f"pipeline {name!r} is published by more than one installed package "
                         f"({'; '.join(_conflicts[name])}); uninstall all but one")
    factory = src.factory
    if factory is None:
        assert src.entry_point is not None
        try:
            factory = src.entry_point.load()
        except Exception as exc:  # any error of a plug-in's import is the plug-in's fault
            log.error("pipeline plug-in cannot be loaded", exc_info=exc,
                      extra={"pipeline": name, "origin": src.origin})
            raise ModelError(f"pipeline plug-in {name!r} ({src.origin}) cannot be loaded: "
                             f"{type(exc).__name__}: {exc}") from exc
    _check_signature(name, src.origin, factory)
    _loaded[name] = (src.origin, factory)
    return src.origin, factory


def _check_signature(name: str, origin: str, factory: object) -> None:
    """Refuse a factory that cannot take ``models_dir`` and ``device`` before it is ever called.

    Checked rather than probed: a factory that ignored the configuration would
    run weights nobody chose, so the mismatch is the plug-in's error.
    """
    if not callable(factory):
        raise ModelError(f"pipeline plug-in {name!r} ({origin}) is a "
                         f"{type(factory).__name__}, not a callable factory")
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: trust the call
        return
    try:
        sig.bind(models_dir=None, device="auto")
    except TypeError as exc:
        raise ModelError(
            f"pipeline plug-in {name!r} ({origin}): its factory must accept the keyword "
            f"arguments models_dir and device, but its signature is {sig} ({exc})"
        ) from exc


def _key(name: str, models_dir: Path | None, device: str) -> tuple[str, str, str, str]:
    folder = str(Path(models_dir).expanduser().resolve()) if models_dir else ""
    return name, folder, device, _stamp(folder)


def _stamp(folder: str) -> str:
    """What the packages in ``folder`` are now: each manifest's name and change time.

    Part of the cache key, so a package promoted or imported into a running node's
    models folder (``ainode models promote``) is what the next job loads, without a
    restart; an unchanged folder costs one ``stat`` per package.
    """
    if not folder:
        return ""
    try:
        return ";".join(f"{m.parent.name}:{m.stat().st_mtime_ns}"
                        for m in sorted(Path(folder).glob("*/model.yaml")))
    except OSError:
        return "?"


def get(name: str, *, models_dir: Path | None = None, device: str = "auto") -> Pipeline:
    """The loaded pipeline ``name`` (built once per process and settings, then reused)."""
    with _lock:
        origin, factory = _factory(name)
        key = _key(name, models_dir, device)
        cached = _instances.get(key)
        if cached is not None and cached[0] is factory:
            return cached[1]
        where = Path(key[1]) if key[1] else None
        try:
            pipeline = factory(models_dir=where, device=device)
        except ModelError:
            raise
        except Exception as exc:
            log.error("pipeline factory failed", exc_info=exc,
                      extra={"pipeline": name, "origin": origin})
            raise ModelError(f"pipeline {name!r} ({origin}) could not be built: "
                             f"{type(exc).__name__}: {exc}") from exc
        lacking = [p for p in _PIPELINE_PARTS if not hasattr(pipeline, p)]
        if lacking:
            raise ModelError(f"pipeline plug-in {name!r} ({origin}): its factory returned a "
                             f"{type(pipeline).__name__}, which lacks {', '.join(lacking)}")
        for old in [k for k in _instances if k[:3] == key[:3]]:
            del _instances[old]  # the same folder's previous packages: let them go
        _instances[key] = (factory, pipeline)
        return pipeline


def model_packages(name: str, models_dir: Path | None = None) -> Mapping[str, Any]:
    """Per stage, the model package ``name`` would load with ``models_dir`` (its ``packages``).

    Empty for a pipeline whose factory does not say; nothing is built or loaded.
    """
    with _lock:
        _, factory = _factory(name)
    packages = getattr(factory, "packages", None)
    if not callable(packages):
        return {}
    result = packages(models_dir)
    return dict(result)


def quality_reference(name: str, models_dir: Path | None = None
                      ) -> tuple[str, str, list[dict[str, Any]]] | None:
    """The drift reference of pipeline ``name``: (package, fitted on, records), or None.

    Read from the packages the pipeline would load (stage 2 first, where
    ``ainode evaluate --write-reference`` puts it), without building the
    pipeline: the periodic quality check needs no weights in memory.
    """
    from pipelines.models.package import load_qa_reference, read_manifest

    found = model_packages(name, models_dir)
    for stage in sorted(found, key=lambda k: (k != "stage2", k)):
        pkg = found[stage]
        path = getattr(pkg, "path", None)
        if path is None:
            continue
        m = read_manifest(Path(path))
        records = load_qa_reference(Path(path), m)
        if records is not None and m.qa_reference is not None:
            return f"{m.name} {m.version}", m.qa_reference.fitted_on, records
    return None
