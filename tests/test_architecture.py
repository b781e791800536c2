"""The rooms' import direction: node -> {pipelines, storage}, pipelines -> storage, never upwards.

Why a test and not only ``make lint``: an upward import is the kind of
shortcut that works at once and costs later (storage would need the node's
config to load, pipelines the CLI), so ``make test`` refuses it too. The
contracts themselves live in pyproject.toml's ``[tool.importlinter]``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from importlinter.api import read_configuration

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = {"storage-is-the-ground-floor", "pipelines-below-node", "layers"}
_UPWARD = re.compile(r"^\s*(from\s+node[.\s]|import\s+node\b)", re.MULTILINE)


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    found = str(exe) if exe.exists() else shutil.which("lint-imports")
    assert found, "lint-imports is not installed (pip install -e '.[dev]')"
    return found


def test_the_import_contracts_are_configured() -> None:
    config = read_configuration(str(ROOT / "pyproject.toml"))
    ids = {c.get("id") for c in config["contracts_options"]}
    assert ids >= CONTRACTS


def test_the_import_contracts_are_kept() -> None:
    run = subprocess.run([_lint_imports(), "--config", "pyproject.toml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_no_lower_room_names_node() -> None:
    """The issue's acceptance check (``grep -rn "from node\\|import node" storage
    pipelines``), on the source text as a reviewer reads it, one import per line."""
    offenders = [
        f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}"
        for room in ("storage", "pipelines")
        for path in sorted((ROOT / room).rglob("*.py"))
        for text in [path.read_text(encoding="utf-8")]
        for m in _UPWARD.finditer(text)
    ]
    assert offenders == []
