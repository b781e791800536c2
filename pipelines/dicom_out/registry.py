"""The one registry of output writers: every result kind the node can write, and its facts.

Why one registry: a kind's name, the SOP classes its objects have, its series
number and whether a destination takes it by default were once written out in
five places. Now the config's ``accepts`` validation and defaults, the
worker's choice of what to write, the destination commands, the demo and the
receiver's accepted SOP classes all read them from here, and
``write_results`` calls the writers in the order of their series offsets (so
the SR, which refers to the SEG, comes after it, whatever was imported first).

This module is light on purpose (no highdicom, no torch): the config and the
receiver import it at start-up. The built-in writers are declared in
``pipelines.dicom_out.builtins``, whose functions import their heavy modules
only when they write.

A new output kind, in a module of its own::

    import pydicom
    from pipelines.dicom_out.registry import WriterContext, writer

    @writer("TXT", sop_classes=("1.2.840.10008.5.1.4.1.1.7",), series_offset=10)
    def write_txt(ctx: WriterContext) -> list[pydicom.Dataset]:
        ...  # ctx.result, ctx.sources, ctx.series_number, ctx.written["SEG"]

The function gets a :class:`WriterContext` and returns a dataset, a list of
datasets or None (nothing to show for this result). The module registers the
kind when it is imported; a package makes the node import it by publishing
it in the entry-point group ``ainode.writers`` (``[project.entry-points.
"ainode.writers"] txt = "mypackage.txt_writer"``), read on first use. Kind
names are 1-8 upper-case letters or digits (the Output table's column);
``series_offset`` is added to the job's series-number base (9000), must
be unique and orders the writers; ``default=True`` puts the kind in a destination's default
``accepts``; ``needs_pixels=True`` says it renders the source pixels, so the
job must read full datasets, not only headers.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pipelines.plugins import published
from storage.errors import ConfigError, InputError

if TYPE_CHECKING:
    import pydicom

    from pipelines.results import AnalysisResult

__all__ = [
    "GROUP",
    "WriteFunction",
    "WriterContext",
    "WriterSpec",
    "default_kinds",
    "get",
    "kinds",
    "result_sop_classes",
    "specs",
    "unregister",
    "writer",
]

log = logging.getLogger(__name__)

GROUP = "ainode.writers"
BUILTINS = "pipelines.dicom_out.builtins"
_KIND = re.compile(r"^[A-Z][A-Z0-9]{0,7}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


@dataclass(frozen=True)
class WriterContext:
    """What one writer sees: the result, the sources, its series number, what came before.

    ``written`` holds, per kind, what the writers before this one produced in
    the same run (the SR refers to the SEG through it); ``options`` carries
    the caller's switches (``fractional`` for the SEG).
    """

    result: AnalysisResult
    sources: Sequence[pydicom.Dataset]
    series_number: int
    options: Mapping[str, Any] = field(default_factory=dict)
    written: Mapping[str, Sequence[pydicom.Dataset]] = field(default_factory=dict)

    def first(self, kind: str) -> pydicom.Dataset | None:
        """The first object of ``kind`` written earlier in this run, if any."""
        objs = self.written.get(kind, ())
        return objs[0] if objs else None


WriteFunction = Callable[
    [WriterContext], "pydicom.Dataset | Sequence[pydicom.Dataset] | None"]
F = TypeVar("F", bound=WriteFunction)


@dataclass(frozen=True)
class WriterSpec:
    """A registered kind: its writer and the facts every other module reads."""

    kind: str
    write: WriteFunction
    sop_classes: tuple[str, ...]
    series_offset: int
    default: bool = False
    needs_pixels: bool = False
    description: str = ""

    @property
    def origin(self) -> str:
        fn = self.write
        return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


_specs: dict[str, WriterSpec] = {}
_discovered = False
_lock = threading.RLock()


def writer(kind: str, *, sop_classes: Sequence[str], series_offset: int,
           default: bool = False, needs_pixels: bool = False,
           description: str = "") -> Callable[[F], F]:
    """Register the decorated function as the writer of ``kind`` (see the module docstring).

    Registering a kind again from the same function (a reloaded module)
    replaces it; from another function it is refused, as is a series offset
    another kind uses: two writers would fight over one kind or one series.
    """
    if not _KIND.match(kind):
        raise ValueError(f"writer kind {kind!r}: 1-8 upper-case letters or digits")
    classes = tuple(sop_classes)
    bad = [c for c in classes if not _UID.match(c) or len(c) > 64]
    if not classes or bad:
        raise ValueError(f"writer {kind}: sop_classes must be SOP class UIDs; got {bad or classes}")
    if not 0 <= series_offset <= 999:
        raise ValueError(f"writer {kind}: series_offset {series_offset} not in 0..999")

    def deco(fn: F) -> F:
        if getattr(fn, "__module__", None) != BUILTINS:
            importlib.import_module(BUILTINS)  # built-ins first: a clash names the newcomer
        spec = WriterSpec(kind, fn, classes, series_offset, default, needs_pixels,
                          description)
        with _lock:
            old = _specs.get(kind)
            if old is not None and old.origin != spec.origin:
                raise ValueError(f"writer kind {kind} is already registered by {old.origin}")
            clash = [s.kind for s in _specs.values()
                     if s.series_offset == series_offset and s.kind != kind]
            if clash:
                raise ValueError(f"writer {kind}: series_offset {series_offset} is taken by "
                                 f"{clash[0]}")
            _specs[kind] = spec
        return fn

    return deco


def unregister(kind: str) -> None:
    """Forget ``kind`` (a test's clean-up, or a plug-in replacing a writer)."""
    with _lock:
        _specs.pop(kind, None)


def _discover() -> None:
    """Import the built-ins, then every module published in :data:`GROUP`, once.

    A plug-in that cannot be imported stops whoever asked (the config check
    at start-up, first of all) with a ConfigError naming it: silently leaving
    out a kind would drop results that a destination was set up to receive.
    """
    global _discovered
    with _lock:
        if _discovered:
            return
        _discovered = True  # before importing: a plug-in may ask the registry itself
        importlib.import_module(BUILTINS)
        for ep in (pub.entry_point for pub in published(GROUP)):
            try:
                ep.load()
            except Exception as exc:  # any error of a plug-in's import is the plug-in's fault
                _discovered = False
                raise ConfigError(f"writer plug-in {ep.name!r} ({ep.value}) cannot be loaded: "
                                  f"{type(exc).__name__}: {exc}") from exc
            log.debug("writer plug-in loaded", extra={"plugin": ep.name, "module": ep.value})


def specs() -> tuple[WriterSpec, ...]:
    """Every registered writer, in write order (by series offset)."""
    _discover()
    with _lock:
        return tuple(sorted(_specs.values(), key=lambda s: s.series_offset))


def kinds() -> tuple[str, ...]:
    return tuple(s.kind for s in specs())


def default_kinds() -> tuple[str, ...]:
    """What a destination accepts when its configuration does not say."""
    return tuple(s.kind for s in specs() if s.default)


def result_sop_classes() -> tuple[str, ...]:
    """Every SOP class a registered kind may have, once each, in write order."""
    return tuple(dict.fromkeys(c for s in specs() for c in s.sop_classes))


def get(kind: str) -> WriterSpec:
    """The writer of ``kind``; InputError naming the known kinds otherwise."""
    for spec in specs():
        if spec.kind == kind:
            return spec
    raise InputError(f"unknown result kind {kind!r}; known: {', '.join(kinds())}")
