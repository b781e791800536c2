"""``ainode rules``: every command's success path and every refused input's exit code.

Commands run in-process through the same error mapping as the console script
(``node.cli.exit_code``); one test runs the installed ``ainode`` to prove the
mapping end to end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select
from typer.testing import CliRunner

from node.cli import app, exit_code
from storage import migrate
from storage.audit import os_actor
from storage.db import Database
from storage.errors import NodeError
from storage.models import AuditEvent, Job, RoutingRule, Series, Study
from tests.support.data import dicom_series_dir

CLI = app


class Node:
    """One configured node (SQLite in a temp dir, one configured destination)."""

    def __init__(self, tmp: Path) -> None:
        self.config = tmp / "node.yaml"
        self.config.write_text(yaml.safe_dump({
            "storage": {"data_dir": str(tmp / "data"), "min_free_mb": 0},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                              "port": 4242}],
            "logging": {"level": "WARNING"},
        }))
        self.db = Database(f"sqlite:///{tmp / 'data' / 'ainode.db'}")
        migrate.upgrade(self.db)

    def run(self, *args: str) -> tuple[int, str]:
        result = CliRunner().invoke(CLI, ["--config", str(self.config), *args])
        if isinstance(result.exception, NodeError):
            return exit_code(result.exception), f"ainode: error: {result.exception}"
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.output

    def ok(self, *args: str) -> str:
        code, out = self.run(*args)
        assert code == 0, out
        return out

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))


@pytest.fixture
def node(tmp_path: Path) -> Node:
    n = Node(tmp_path)
    yield n
    n.db.dispose()


ABDOMEN = ["rules", "add", "abdomen-ct", "--when", "Modality=CT",
           "--when", "SeriesDescription~abd|body|pancrea|portal", "--when", "SliceThickness<=3",
           "--pipeline", "pancreas-ct", "--send-to", "pacs", "--priority", "10"]


def test_add_list_show(node: Node) -> None:
    out = node.ok(*ABDOMEN)
    assert "abdomen-ct" in out and "SliceThickness<=3" in out
    (rule,) = node.json("rules", "list")
    assert rule["when"] == ["Modality=CT", "SeriesDescription~abd|body|pancrea|portal",
                            "SliceThickness<=3"]
    assert (rule["pipeline"], rule["send_to"], rule["priority"], rule["version"]) == (
        "pancreas-ct", ["pacs"], 10, 1)
    assert rule["created_by"] == os_actor()
    assert node.json("rules", "show", "abdomen-ct")[0]["name"] == "abdomen-ct"
    with node.db.session() as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.event == "rule.created")).one()
        assert ev.actor == os_actor() and ev.details["definition"]["name"] == "abdomen-ct"


def test_edit_keeps_versions_and_audits_the_change(node: Node) -> None:
    node.ok(*ABDOMEN)
    node.ok("rules", "edit", "abdomen-ct", "--drop-when", "SliceThickness<=3",
            "--add-when", "SliceThickness<=2.5", "--shadow")
    node.ok("rules", "disable", "abdomen-ct")
    node.ok("rules", "enable", "abdomen-ct")
    history = node.json("rules", "show", "abdomen-ct", "--history")
    assert [h["version"] for h in history] == [1, 2, 3, 4]
    assert [h["current"] for h in history] == [False, False, False, True]
    assert history[0]["when"][-1] == "SliceThickness<=3" and not history[0]["shadow"]
    assert history[1]["when"][-1] == "SliceThickness<=2.5" and history[1]["shadow"]
    assert [h["enabled"] for h in history] == [True, True, False, True]
    assert node.json("rules", "show", "abdomen-ct", "--version", "1")[0]["version"] == 1
    with node.db.session() as s:
        change = s.scalars(select(AuditEvent).where(AuditEvent.event == "rule.changed")
                           .order_by(AuditEvent.id)).first()
        assert change is not None and change.actor == os_actor()
        assert change.details["changes"]["when"][1][-1] == "SliceThickness<=2.5"
        assert change.details["changes"]["shadow"] == [False, True]


def test_remove_then_add_again_continues_versions(node: Node) -> None:
    node.ok(*ABDOMEN)
    node.ok("rules", "remove", "abdomen-ct")
    assert node.json("rules", "list") == []
    assert node.json("rules", "list", "--all")[0]["current"] is False
    node.ok(*ABDOMEN)
    assert node.json("rules", "list")[0]["version"] == 2


def test_export_import_round_trip_and_prune(node: Node, tmp_path: Path) -> None:
    node.ok(*ABDOMEN)
    node.ok("rules", "add", "mr", "--when", "Modality=MR", "--pipeline", "pancreas-mr")
    exported = tmp_path / "rules.yaml"
    node.ok("rules", "export", "--output", str(exported))
    doc = yaml.safe_load(exported.read_text())
    assert [r["name"] for r in doc["rules"]] == ["abdomen-ct", "mr"]
    assert {r["action"] for r in node.json("rules", "import", str(exported))} == {"unchanged"}
    doc["rules"][0]["priority"] = 20
    del doc["rules"][1]
    doc["rules"].append({"name": "ct-shadow", "when": ["Modality=CT"],
                         "pipeline": "pancreas-ct", "shadow": True})
    exported.write_text(yaml.safe_dump(doc))
    actions = {r["rule"]: r["action"] for r in node.json(
        "rules", "import", str(exported), "--prune")}
    assert actions == {"abdomen-ct": "changed", "ct-shadow": "created", "mr": "removed"}
    rules = {r["name"]: r for r in node.json("rules", "list")}
    assert set(rules) == {"abdomen-ct", "ct-shadow"} and rules["abdomen-ct"]["priority"] == 20


REFUSED = [
    (["rules", "add", "x", "--when", "Modalty=CT", "--pipeline", "pancreas-ct"],
     "unknown DICOM keyword 'Modalty'"),
    (["rules", "add", "x", "--when", "SeriesDescription~(abd", "--pipeline", "pancreas-ct"],
     "bad regular expression"),
    (["rules", "add", "x", "--when", "SliceThickness<=thin", "--pipeline", "pancreas-ct"],
     "needs a number"),
    (["rules", "add", "x", "--when", "Modality", "--pipeline", "pancreas-ct"],
     "cannot parse condition"),
    (["rules", "add", "x", "--pipeline", "liver-ct"], "unknown pipeline 'liver-ct'"),
    (["rules", "add", "x", "--pipeline", "pancreas-ct", "--send-to", "nowhere"],
     "unknown destination 'nowhere'"),
    (["rules", "add", "bad name", "--pipeline", "pancreas-ct"], "invalid rule name"),
    (["rules", "add", "x", "--pipeline", "pancreas-ct", "--stable-age", "-1"], "stable age"),
    (["rules", "show", "nope"], "no rule 'nope'"),
    (["rules", "edit", "nope", "--priority", "1"], "no rule 'nope'"),
    (["rules", "enable", "nope"], "no rule 'nope'"),
    (["rules", "remove", "nope"], "no rule 'nope'"),
    (["rules", "test"], "exactly one of --series"),
    (["rules", "test", "--series", "1.2.3"], "no received series"),
    (["rules", "test", "--path", "/nonexistent"], "is not a folder"),
    (["rules", "replay", "--since", "last tuesday"], "cannot read time"),
    (["rules", "import", "/nonexistent.yaml"], "cannot read"),
]


@pytest.mark.parametrize(("args", "message"), REFUSED, ids=[" ".join(a[:3]) for a, _ in REFUSED])
def test_refused_input_exits_2(node: Node, args: list[str], message: str) -> None:
    code, out = node.run(*args)
    assert code == 2 and message in out, out
    with node.db.session() as s:
        assert s.scalar(select(func.count()).select_from(RoutingRule)) == 0


def test_refused_changes_to_an_existing_rule_exit_2(node: Node, tmp_path: Path) -> None:
    node.ok(*ABDOMEN)
    for args, message in [
        (ABDOMEN, "already exists"),
        (["rules", "edit", "abdomen-ct"], "nothing to change"),
        (["rules", "edit", "abdomen-ct", "--pipeline", "nope"], "unknown pipeline"),
        (["rules", "edit", "abdomen-ct", "--send-to", "nowhere"], "unknown destination"),
        (["rules", "edit", "abdomen-ct", "--drop-when", "Modality=MR"], "has no condition"),
        (["rules", "edit", "abdomen-ct", "--add-when", "Foo=1"], "unknown DICOM keyword"),
    ]:
        code, out = node.run(*args)
        assert code == 2 and message in out, (args, out)
    bad = tmp_path / "bad.yaml"
    for text, message in [("rules: [{name: a, pipeline: pancreas-ct, sendto: [pacs]}]",
                           "unknown key"),
                          ("rules: [{name: a, pipeline: pancreas-ct, when: ['X=1']}]",
                           "unknown DICOM keyword"),
                          ("[{name: a, pipeline: pancreas-ct}, {name: a, pipeline: x}]",
                           "repeated"),
                          ("rules: {name: a", "not valid YAML")]:
        bad.write_text(text)
        code, out = node.run("rules", "import", str(bad), "--prune")
        assert code == 2 and message in out, (text, out)
    # nothing changed by any refusal: still the one rule, version 1
    assert [(r["name"], r["version"]) for r in node.json("rules", "list")] == [("abdomen-ct", 1)]


def test_rules_test_on_a_folder_explains_each_rule(node: Node) -> None:
    node.ok(*ABDOMEN)
    node.ok("rules", "add", "thin-ct", "--when", "Modality=CT", "--when", "SliceThickness<=1",
            "--pipeline", "pancreas-ct")
    node.ok("rules", "add", "mr", "--when", "Modality=MR", "--pipeline", "pancreas-mr")
    rows = node.json("rules", "test", "--path", str(dicom_series_dir("ct_abdomen_siemens")))
    by_rule = {r["rule"]: r for r in rows}
    assert by_rule["abdomen-ct"]["matched"] is True
    assert by_rule["thin-ct"]["matched"] is False
    assert by_rule["thin-ct"]["explanation"] == "SliceThickness<=1: 3 <= 1 is false"
    failed = [c for c in by_rule["mr"]["conditions"] if not c["matched"]]
    assert failed == [{"condition": "Modality=MR", "matched": False, "actual": "CT",
                       "reason": "'CT' does not equal 'MR'"}]
    table = node.ok("rules", "test", "--path", str(dicom_series_dir("ct_abdomen_siemens")))
    assert "MATCH" in table and "3 <= 1 is false" in table


def add_series(db: Database, uid: str, **attrs: Any) -> None:
    with db.session() as s:
        study = s.scalars(select(Study)).first() or Study(study_instance_uid="1.2.3.4")
        s.add(Series(series_instance_uid=uid, study=study, modality=attrs.pop("Modality"),
                     series_description=attrs.pop("SeriesDescription", None),
                     calling_ae=attrs.pop("CallingAE", None), state="routed", attributes=attrs))


def test_rules_test_on_a_stored_series_that_matches_no_rule(node: Node) -> None:
    node.ok(*ABDOMEN)
    add_series(node.db, "1.2.3.4.1", Modality="CT", SeriesDescription="Head routine",
               SliceThickness=5.0, CallingAE="PACS")
    (row,) = node.json("rules", "test", "--series", "1.2.3.4.1")
    assert row["matched"] is False
    assert row["explanation"] == (
        "SeriesDescription~abd|body|pancrea|portal: 'Head routine' does not match "
        "/abd|body|pancrea|portal/i; SliceThickness<=3: 5 <= 3 is false")


SC = "1.2.840.10008.5.1.4.1.1.7"
LOCALIZER_TYPE = ["ORIGINAL", "PRIMARY", "LOCALIZER"]


@pytest.mark.parametrize(("attrs", "kind", "words", "opt_in"), [
    ({"ImageType": LOCALIZER_TYPE}, "localizer", "a localizer (ImageType "
     "ORIGINAL\\PRIMARY\\LOCALIZER)", "ImageType~LOCALIZER"),
    ({"SOPClassUID": SC}, "secondary capture", "a Secondary Capture object",
     f"SOPClassUID={SC}"),
    ({"ImageType": ["DERIVED", "SECONDARY", "MPR"]}, "derived",
     "a derived image (ImageType DERIVED\\SECONDARY\\MPR)", "ImageType~DERIVED"),
    ({"PhotometricInterpretation": "RGB"}, "colour", "a colour image "
     "(PhotometricInterpretation RGB)", "PhotometricInterpretation=RGB"),
])
def test_rules_test_shows_a_series_routing_skips_and_why(
        node: Node, attrs: dict[str, Any], kind: str, words: str, opt_in: str) -> None:
    """A matched rule of a series routing skips says SKIPPED and why, not its pipeline;
    a rule that names what the series is still routes it; an image series is unchanged."""
    node.ok(*ABDOMEN)
    node.ok("rules", "add", "asks-for-it", "--when", "Modality=CT", "--when", opt_in,
            "--pipeline", "pancreas-ct")
    node.ok("rules", "add", "mr", "--when", "Modality=MR", "--pipeline", "pancreas-mr")
    add_series(node.db, "1.2.3.4.9", Modality="CT", SeriesDescription="Abdomen portal",
               SliceThickness=2.0, **attrs)
    add_series(node.db, "1.2.3.4.8", Modality="CT", SeriesDescription="Abdomen portal",
               SliceThickness=2.0, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    rows = {r["rule"]: r for r in node.json("rules", "test", "--series", "1.2.3.4.9")}
    skipped = rows["abdomen-ct"]
    assert skipped["matched"] is True and skipped["routed"] is False
    assert skipped["skip_reason"] is not None and words in skipped["skip_reason"]
    assert skipped["not_an_image"]["kind"] == kind
    assert rows["asks-for-it"]["routed"] is True and rows["asks-for-it"]["skip_reason"] is None
    assert rows["mr"]["matched"] is False and rows["mr"]["routed"] is False
    assert rows["mr"]["skip_reason"] is None
    table = node.ok("rules", "test", "--series", "1.2.3.4.9")
    line = next(ln for ln in table.splitlines() if "abdomen-ct" in ln)
    assert "SKIPPED" in line and "MATCH" not in line, table
    assert "MATCH" in next(ln for ln in table.splitlines() if "asks-for-it" in ln), table
    assert "routing skips" in " ".join(table.split()), table
    image = {r["rule"]: r for r in node.json("rules", "test", "--series", "1.2.3.4.8")}
    assert image["abdomen-ct"]["routed"] is True and image["abdomen-ct"]["not_an_image"] is None
    assert "SKIPPED" not in node.ok("rules", "test", "--series", "1.2.3.4.8")


def test_rules_test_on_a_folder_reads_routings_skip_decision(node: Node, tmp_path: Path) -> None:
    """--path decides as routing does: a folder of localizers is skipped; one that starts
    with a localizer and goes on with axial images is routed."""
    import pydicom

    node.ok("rules", "add", "all-ct", "--when", "Modality=CT", "--pipeline", "pancreas-ct")
    files = sorted(p for p in dicom_series_dir("ct_abdomen_siemens").iterdir() if p.is_file())
    scouts, mixed = tmp_path / "scouts", tmp_path / "mixed"
    for folder, uid, localizers in ((scouts, "1.2.3.4.50", 2), (mixed, "1.2.3.4.51", 1)):
        folder.mkdir()
        for i, src in enumerate(files[:2]):
            ds = pydicom.dcmread(src)
            ds.SeriesInstanceUID = uid
            if i < localizers:
                ds.ImageType = LOCALIZER_TYPE
            ds.save_as(folder / f"{i:02d}.dcm")
    (row,) = node.json("rules", "test", "--path", str(scouts))
    assert row["matched"] is True and row["routed"] is False
    assert row["not_an_image"]["kind"] == "localizer" and "localizer" in row["skip_reason"]
    assert "SKIPPED" in node.ok("rules", "test", "--path", str(scouts))
    (row,) = node.json("rules", "test", "--path", str(mixed))
    assert row["routed"] is True and row["not_an_image"] is None
    assert "MATCH" in node.ok("rules", "test", "--path", str(mixed))


def test_replay_shows_what_would_be_routed_without_running(node: Node, tmp_path: Path) -> None:
    node.ok(*ABDOMEN)
    add_series(node.db, "1.2.3.4.1", Modality="CT", SeriesDescription="Abdomen portal",
               SliceThickness=2.0)
    add_series(node.db, "1.2.3.4.2", Modality="CT", SeriesDescription="Head", SliceThickness=2.0)
    rows = {r["series"]: r for r in node.json("rules", "replay", "--since", "7d")}
    assert rows["1.2.3.4.1"]["would_route_to"] == ["abdomen-ct -> pancreas-ct"]
    assert rows["1.2.3.4.2"]["would_route_to"] == []
    proposed = tmp_path / "proposed.yaml"
    proposed.write_text(yaml.safe_dump({"rules": [
        {"name": "all-ct", "when": ["Modality=CT"], "pipeline": "pancreas-ct"}]}))
    rows = {r["series"]: r for r in node.json("rules", "replay", "--rules", str(proposed))}
    assert rows["1.2.3.4.2"]["would_route_to"] == ["all-ct -> pancreas-ct"]
    with node.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


def test_console_script_exit_codes(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("ainode")
    exe_path = str(exe) if exe.exists() else shutil.which("ainode")
    assert exe_path, "the ainode console script is not installed"
    node = Node(tmp_path)
    base = [exe_path, "--config", str(node.config)]
    bad = subprocess.run([*base, "rules", "add", "x", "--when", "Foo=1", "--pipeline",
                          "pancreas-ct"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown DICOM keyword 'Foo'" in bad.stderr
    good = subprocess.run([*base, "rules", "add", "x", "--when", "Modality=CT", "--pipeline",
                           "pancreas-ct", "--json"], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)[0]["name"] == "x"
    node.db.dispose()
