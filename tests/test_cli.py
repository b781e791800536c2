"""The installed ``ainode`` entry point."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLI = Path(sys.executable).with_name("ainode")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = str(CLI) if CLI.exists() else shutil.which("ainode")
    assert exe, "the ainode console script is not installed in this environment"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_help_lists_the_commands() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("db", "config"):
        assert command in proc.stdout


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("ainode ")


@pytest.mark.parametrize("args", [["db", "nonsense"], ["no-such-command"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert run(*args).returncode == 2
