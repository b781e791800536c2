"""``--config`` before and after the command name: both spellings mean the same file.

The in-process tests read the config back through ``ainode config show``; the
subprocess test is what a user types, ``ainode serve --config FILE``, answered
over DICOM by dcmtk's echoscu, then ``ainode status --config FILE`` on its data.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from node.cli import app
from tests.support.node import AINODE, REPO, echo_ok, start_node


def _config(tmp: Path, port: int, name: str = "node.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump({"dicom": {"ae_title": "CFGTEST", "port": port},
                                    "storage": {"data_dir": str(tmp / "data")},
                                    "logging": {"level": "WARNING"}}))
    return path


def _shown_port(*args: str, env: dict[str, str] | None = None) -> tuple[int, int | None]:
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exit_code != 0:
        return result.exit_code, None
    return 0, int(json.loads(result.output)["dicom"]["port"])


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_is_read_on_either_side_of_the_command(tmp_path: Path, where: str) -> None:
    cfg = str(_config(tmp_path, 11112 if where == "before" else 11113))
    args = (["--config", cfg, "config", "show", "--json"] if where == "before"
            else ["config", "show", "--json", "--config", cfg])
    assert _shown_port(*args) == (0, 11112 if where == "before" else 11113)


def test_short_form_and_nested_commands_take_it_too(tmp_path: Path) -> None:
    cfg = str(_config(tmp_path, 11114))
    assert _shown_port("config", "show", "-c", cfg, "--json") == (0, 11114)
    # commands of a sub-app (ainode db ..., ainode rules ...) read the same file
    for args in (["db", "upgrade"], ["rules", "list", "--json"]):
        result = CliRunner().invoke(app, [*args, "--config", cfg])
        assert result.exit_code == 0, (args, result.output, result.exception)
    assert (tmp_path / "data" / "ainode.db").exists()  # its database, not the default one


def test_the_command_line_wins_over_the_environment(tmp_path: Path) -> None:
    env_cfg = str(_config(tmp_path, 11115, "env.yaml"))
    cli_cfg = str(_config(tmp_path, 11116, "cli.yaml"))
    env = {"AINODE_CONFIG": env_cfg}
    assert _shown_port("config", "show", "--json", env=env) == (0, 11115)
    assert _shown_port("config", "show", "--json", "--config", cli_cfg, env=env) == (0, 11116)


def test_two_different_files_are_a_usage_error(tmp_path: Path) -> None:
    one, two = str(_config(tmp_path, 11117, "one.yaml")), str(_config(tmp_path, 11118, "two.yaml"))
    assert _shown_port("--config", one, "config", "show", "--json", "--config", two)[0] == 2
    # the same file twice is no contradiction
    assert _shown_port("--config", one, "config", "show", "--json", "--config", one) == (0, 11117)


@pytest.mark.peers
@pytest.mark.slow
def test_serve_with_config_after_the_command_starts_the_node(tmp_path: Path) -> None:
    node = start_node(tmp_path, workers=1, serve_args=("--no-jobs",), config_after=True)
    try:
        assert echo_ok(node.port)
        for args in (["status", "--json", "--config", str(node.config)],
                     ["--config", str(node.config), "status", "--json"]):
            status = subprocess.run([*AINODE, *args], cwd=REPO, capture_output=True,
                                    text=True, timeout=120)
            assert status.returncode == 0, status.stderr
            (info,) = json.loads(status.stdout)
            assert info["queue_depth"] == 0 and "disk_free_mb" in info
    finally:
        assert node.stop() == 0
    assert "listening" in node.log.read_text()
