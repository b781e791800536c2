"""Candidate model sets: the rule field, the fine-tune's refusal, the registry's reload."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node.routing.rules import RuleSpec
from pipelines import registry
from storage.errors import InputError

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("ainode"))


def test_a_rule_running_candidate_models_must_be_a_shadow_rule() -> None:
    with pytest.raises(InputError, match="must be a shadow rule"):
        RuleSpec.build("r", pipeline="pancreas-ct", models="site1")
    spec = RuleSpec.build("r", pipeline="pancreas-ct", shadow=True, models="site1")
    assert RuleSpec.from_dict(spec.to_dict()) == spec
    assert "models" not in RuleSpec.build("q", pipeline="pancreas-ct").to_dict()


def test_train_init_refuses_a_package_of_another_network(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AINODE_")}
    done = subprocess.run(
        [CLI, "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "pkg"),
         "--task", "stage1", "--init", str(REPO / "pipelines/weights/pancreas-ct-stage2")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "is not the recipe's" in done.stderr and "Traceback" not in done.stderr


def test_the_registry_key_changes_when_a_package_in_the_folder_changes(tmp_path: Path
                                                                       ) -> None:
    shutil.copytree(REPO / "pipelines/weights/pancreas-ct-stage2",
                    tmp_path / "pancreas-ct-stage2")
    before = registry._key("pancreas-ct", tmp_path, "cpu")
    assert before == registry._key("pancreas-ct", tmp_path, "cpu")
    manifest = tmp_path / "pancreas-ct-stage2" / "model.yaml"
    st = manifest.stat()
    os.utime(manifest, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = registry._key("pancreas-ct", tmp_path, "cpu")
    assert after[:3] == before[:3] and after != before
