"""Pipelines by registered name: routing rules and scripts name a pipeline, never code.

A pipeline module registers a factory under its name (``pancreas-ct``,
``pancreas-mr``); the node asks the registry for it when a job runs. Models
stay loaded between jobs because the registry keeps the built instance, one
per (name, models directory, device): the configuration decides where the
weights come from and where they run, never the pipeline module.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pipelines.results import AnalysisResult
from storage.errors import ModelError

__all__ = ["Pipeline", "available", "get", "register"]


class Pipeline(Protocol):
    """What the job runner calls. ``volume`` is a pipelines.volume.Volume."""

    name: str
    min_slices: int

    def model_version(self) -> str: ...

    def run(self, volume: object) -> AnalysisResult: ...


# A factory takes ``models_dir`` (None: the shipped weights) and ``device``
# keyword arguments; one that takes none (a test's) is called without them.
Factory = Callable[..., Pipeline]

_factories: dict[str, Factory] = {}
_instances: dict[tuple[str, str, str], Pipeline] = {}
_lock = threading.Lock()
# Modules whose import registers the built-in pipelines.
_BUILTIN_MODULES: tuple[str, ...] = ("pipelines.pancreas",)


def register(name: str) -> Callable[[Factory], Factory]:
    def deco(factory: Factory) -> Factory:
        _factories[name] = factory
        return factory

    return deco


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def available() -> list[str]:
    _load_builtins()
    return sorted(_factories)


def get(name: str, *, models_dir: Path | None = None, device: str = "auto") -> Pipeline:
    """The loaded pipeline ``name`` (built once per process and settings, then reused)."""
    _load_builtins()
    key = (name, str(models_dir or ""), device)
    with _lock:
        if key not in _instances:
            if name not in _factories:
                raise ModelError(f"unknown pipeline {name!r}; known: {', '.join(available())}")
            factory = _factories[name]
            if inspect.signature(factory).parameters:
                _instances[key] = factory(models_dir=models_dir, device=device)
            else:
                _instances[key] = factory()
        return _instances[key]
