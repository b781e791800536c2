"""Readers' feedback through the CLI, the REST API and the console, in the live figures.

A seeded set of verdicts whose PPV is known by hand: 20 region findings on 10
series, 12 agreed (one after the reader changed their mind), 5 disagreed (one
by a 2:1 majority against an agreeing viewer), 3 uncertain. So PPV is 12/17,
FP per series 5/11 (11 reviewed series: the 10 plus one with a reference
only), sensitivity 3/4 and specificity 1/2 on the references recorded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from node.web import create_app
from pipelines.evaluation.live import FindingRecord, SeriesRecord, figures, rating
from storage.models import (
    AuditEvent,
    Finding,
    Job,
    JobOutcome,
    JobState,
    Series,
    SeriesState,
    Study,
    utcnow,
)
from tests.test_web import Web, _login, _make

CLI = str(Path(sys.executable).with_name("ainode"))


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AINODE_")}
    env.update({"AINODE_STORAGE__DATA_DIR": str(data_dir), "AINODE_STORAGE__MIN_FREE_MB": "0",
                "COLUMNS": "200"})
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120, env=env,
                          cwd=data_dir.parent)


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    ctx = _make(tmp_path)
    with TestClient(create_app(ctx)) as client:
        yield Web(ctx, client, tmp_path / "data")
    ctx.close()
    ctx.db.dispose()


def _seed(web: Web) -> tuple[list[str], list[int]]:
    """11 series with a done job each; series i < 10 has region findings 2i and 2i+1."""
    uids, fids = [], []
    now = utcnow()
    with web.ctx.db.session() as s:
        study = Study(study_instance_uid="1.2.826.0.1.3680043.9.20.1")
        for i in range(11):
            se = Series(series_instance_uid=f"1.2.826.0.1.3680043.9.20.1.{i}", study=study,
                        modality="CT", state=SeriesState.ROUTED, series_description="abdomen",
                        attributes={"Manufacturer": "A" if i < 5 else "B",
                                    "ManufacturerModelName": "X1"})
            job = Job(series=se, pipeline="pancreas-ct", model_version="m@1",
                      state=JobState.DONE, outcome=JobOutcome.ASSESSED,
                      finished_at=now - timedelta(days=1))
            s.add(job)
            s.add(Finding(job=job, kind="patient", label="PDAC", probability=0.7))
            if i < 10:
                for k in range(2):
                    s.add(Finding(job=job, kind="lesion", label=f"lesion {k + 1}",
                                  probability=0.6,
                                  details={"centroid_lps_mm": [10.0 * k, 0.0, 0.0]}))
            uids.append(se.series_instance_uid)
        s.flush()
        fids = list(s.scalars(sa.select(Finding.id).where(Finding.kind == "lesion")
                              .order_by(Finding.id)))
    assert len(fids) == 20
    return uids, fids


def test_rating_is_the_majority_of_the_newest_verdicts() -> None:
    assert rating(["agree", "disagree", "disagree"]) == "fp"
    assert rating(["agree", "uncertain"]) == "tp"
    assert rating(["agree", "disagree"]) == "unrated"
    assert rating(["uncertain"]) == "unrated"
    recs = [SeriesRecord("a", (FindingRecord(1, "tp"), FindingRecord(2, "fp")), True, True),
            SeriesRecord("b", (), False, True)]
    f = figures(recs)
    assert (f["ppv"], f["fp_per_series"], f["sensitivity"], f["specificity"]) == \
        (0.5, 0.5, 1.0, 1.0)


def test_seeded_verdicts_from_cli_api_and_console_give_the_known_ppv(web: Web) -> None:
    uids, f = _seed(web)
    data = web.data_dir
    # The CLI: a reader changes their mind (the newest counts), two readers disagree.
    for args in (("verdict", str(f[0]), "disagree", "--reader", "r1"),
                 ("verdict", str(f[0]), "agree", "--reader", "r1", "--comment", "on review"),
                 ("verdict", str(f[1]), "disagree", "--reader", "r2"),
                 ("verdict", str(f[1]), "disagree", "--reader", "r3"),
                 ("reference", uids[0], "PDAC", "--reader", "path")):
        done = cli(data, "feedback", *args)
        assert done.returncode == 0, done.stderr
    bad = cli(data, "feedback", "verdict", str(f[2]), "maybe")
    assert bad.returncode == 2 and "unknown verdict" in bad.stderr
    # The API, as a viewer (readers are viewers): f1 agreed by vic, outvoted 2:1.
    token = _login(web.client, "vic")
    hdr = {"X-CSRF-Token": token}
    plan = [(f[1], "agree")] + [(f[i], "agree") for i in range(2, 12)] + \
        [(f[i], "disagree") for i in range(13, 17)] + [(f[i], "uncertain") for i in (17, 18, 19)]
    for fid, verdict in plan:
        r = web.client.post(f"/api/v1/findings/{fid}/verdict", json={"verdict": verdict},
                            headers=hdr)
        assert r.status_code == 200, r.text
    # The console's form on the series result page: f12 agreed there.
    page = web.client.get(f"/series/{uids[6]}")
    assert f'id="verdict-{f[12]}"' in page.text and 'id="reference-form"' in page.text
    # Each finding is one row of five cells, its verdict form in the fifth (a stray
    # </tr> once put the forms in rows of their own, under no header), and the
    # research-use line says so once.
    table = re.search(r'<table id="findings">(.*?)</table>', page.text, re.S)
    assert table is not None
    trs = [r for r in re.split(r"<tr>", table.group(1)) if r.strip()]
    assert len(trs) >= 3  # the header and each of series 6's findings
    assert all(len(re.findall(r"<t[hd][ >]", r)) == 5 for r in trs), trs
    assert all('class="verdict"' in r for r in trs[1:])
    disclaimer = re.search(r'<div class="disclaimer" id="disclaimer">(.*?)</div>', page.text,
                           re.S)
    assert disclaimer is not None and disclaimer.group(1).count("Research use only") == 1
    r = web.client.post(f"/series/{uids[6]}/verdict", data={
        "csrf": token, "finding_id": str(f[12]), "verdict": "agree", "comment": ""},
        follow_redirects=False)
    assert r.status_code == 303, r.text
    assert "so far: agree" in web.client.get(f"/series/{uids[6]}").text
    for uid, dx in ((uids[6], "PDAC"), (uids[7], "PDAC"), (uids[8], "IPMN")):
        r = web.client.post(f"/api/v1/series/{uid}/reference", json={"diagnosis": dx},
                            headers=hdr)
        assert r.status_code == 200 and r.json()["positive"] is True
    csv_path = data.parent / "refs.csv"
    csv_path.write_text(f"series_uid,diagnosis\n{uids[9]},normal\n{uids[10]},normal\n")
    done = cli(data, "feedback", "import", str(csv_path))
    assert done.returncode == 0, done.stderr
    # Live figures from the CLI: every verdict above is in them.
    live = cli(data, "evaluate", "--live", "--since", "90d", "--bootstrap", "200", "--json")
    assert live.returncode == 0, live.stderr
    rep = json.loads(live.stdout)
    overall = rep["overall"]
    assert overall["counts"]["agreed"] == 12 and overall["counts"]["disagreed"] == 5
    assert overall["counts"]["unrated"] == 3
    assert overall["ppv"]["value"] == round(12 / 17, 4)
    assert overall["fp_per_series"]["value"] == round(5 / 11, 4)
    assert overall["sensitivity"]["value"] == 0.75
    assert overall["specificity"]["value"] == 0.5
    lo, hi = overall["ppv"]["ci95"]
    assert lo < 12 / 17 < hi and lo >= 0 and hi <= 1
    # By scanner: series 0-4 ("A X1") hold f0..f9: f1 the only rejected one.
    assert rep["by"]["scanner"]["A X1"]["ppv"]["value"] == 0.9
    assert set(rep["by"]["protocol"]) == {"abdomen"}
    # The API gives the same figures.
    api = web.client.get("/api/v1/evaluation/live", params={"since": "90d",
                                                           "bootstrap": 200}).json()
    assert api["overall"]["ppv"] == overall["ppv"]
    # Audited: one row per verdict and per reference, with who gave it.
    with web.ctx.db.session() as s:
        verdicts = list(s.scalars(sa.select(AuditEvent).where(
            AuditEvent.event == "finding.verdict")))
        refs = s.scalar(sa.select(sa.func.count()).where(AuditEvent.event == "series.reference"))
    assert len(verdicts) == 4 + len(plan) + 1 and refs == 6
    assert {v.actor for v in verdicts} >= {"r1", "r2", "r3", "web:vic"}
    listed = cli(data, "feedback", "list", "--series", uids[0], "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["finding"]: r for r in json.loads(listed.stdout)}
    assert rows[f[0]]["verdicts"] == "agree" and rows[f[0]]["reference"] == "PDAC"


def test_verdicts_are_refused_for_unknown_or_unscored_findings(web: Web) -> None:
    _seed(web)
    token = _login(web.client, "vic")
    r = web.client.post("/api/v1/findings/999999/verdict", json={"verdict": "agree"},
                        headers={"X-CSRF-Token": token})
    assert r.status_code == 400 and "no finding" in r.json()["detail"]
    r = web.client.post("/api/v1/findings/1/verdict", json={"verdict": "agree"})
    assert r.status_code in (401, 403)  # a session post without its CSRF token


def test_the_result_page_scrolls_outlines_and_evidence_maps_apart(web: Web) -> None:
    """A series with evidence maps gets two viewers: the outline slider opens on the
    middle outline slice, never on an evidence PNG that sorts into the middle."""
    uids, _ = _seed(web)
    folder = web.ctx.cache_dir / uids[0] / "out-0"  # this seeded series has no Output rows
    folder.mkdir(parents=True)
    outlines = [f"slice_{z:04d}_1.2.{z}.png" for z in range(10, 15)]
    maps = [f"evidence_{z:04d}_1.2.{z}.png" for z in range(0, 21)]
    for name in outlines + maps:
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / ".done").touch()
    _login(web.client, "vic")
    page = web.client.get(f"/series/{uids[0]}").text
    main = re.search(r'<img id="overlay" src="[^"]*/overlay/([^"]+)"', page)
    ev = re.search(r'<img id="evidence" src="[^"]*/overlay/([^"]+)"', page)
    assert main is not None and main.group(1) == outlines[2]
    assert ev is not None and ev.group(1) == maps[10]
    assert 'max="4"' in page and 'max="20"' in page  # each slider through its own kind
