"""Pipelines by registered name: routing rules and scripts name a pipeline, never code.

A pipeline module registers a factory under its name (``pancreas-ct``,
``pancreas-mr``); the node asks the registry for it when a job runs. Models
stay loaded between jobs because the registry keeps the built instance.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Protocol

from node.errors import ModelError
from pipelines.results import AnalysisResult

__all__ = ["Pipeline", "available", "get", "register"]


class Pipeline(Protocol):
    """What the job runner calls. ``volume`` is a pipelines.volume.Volume."""

    name: str
    min_slices: int

    def model_version(self) -> str: ...

    def run(self, volume: object) -> AnalysisResult: ...


Factory = Callable[[], Pipeline]

_factories: dict[str, Factory] = {}
_instances: dict[str, Pipeline] = {}
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


def get(name: str) -> Pipeline:
    """The loaded pipeline ``name`` (built once per process, then reused)."""
    _load_builtins()
    with _lock:
        if name not in _instances:
            if name not in _factories:
                raise ModelError(f"unknown pipeline {name!r}; known: {', '.join(available())}")
            _instances[name] = _factories[name]()
        return _instances[name]
