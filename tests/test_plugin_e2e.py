"""A third-party pipeline and output kind, end to end through the real node.

The plug-in (``tests/plugins/site/ainode_keyimages``) is published the way
``pip install`` would publish it, a dist-info with entry points on the
node's ``PYTHONPATH``, and nothing else changes: the rule names its pipeline,
the destination's ``accepts`` names its kind, and a real CT series sent with
dcmtk ``storescu`` comes out at a dcmtk ``storescp`` as the plug-in's Key
Object Selection (dciodvfy-clean) beside the built-in SR. If any room of the
node still listed pipelines or output kinds of its own, this would fail at
the rule, the config, the job or the sender.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa

from storage.models import Finding, Job, JobState, Output, Transfer, TransferState
from tests.plugins import publish
from tests.support.data import dicom_series_dir
from tests.support.net import wait_for
from tests.support.node import REPO, start_node
from tests.support.peers import dcmtk_env, require, store_scp

pytestmark = [pytest.mark.peers, pytest.mark.slow]

PLUGIN_SITE = REPO / "tests" / "plugins" / "site"
SINK_AET = "SINK"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp: the destination PACS, writing what it receives into a folder."""
    with store_scp(tmp_path / "sink", SINK_AET) as port:
        yield port, tmp_path / "sink"


def _brightest(files: list[Path]) -> str:
    """The slice the plug-in must flag, found here independently of the node."""
    means = {}
    for f in files:
        ds = pydicom.dcmread(f)
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        means[str(ds.SOPInstanceUID)] = float(np.mean(ds.pixel_array * slope + intercept))
    return max(means, key=lambda uid: means[uid])


def test_a_plugin_pipeline_and_writer_run_end_to_end(
    tmp_path: Path, sink: tuple[int, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    site = tmp_path / "site"
    publish(site, "ainode-keyimages", {
        "ainode.pipelines": {"brightest-slice": "ainode_keyimages:brightest_slice"},
        "ainode.writers": {"kos": "ainode_keyimages.writer"},
    })
    # The node and its CLI are subprocesses: the plug-in reaches them as an installed
    # package would, through their import path.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(site), str(PLUGIN_SITE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    sink_port, received = sink
    node = start_node(tmp_path, workers=1, callers=["STORESCU"], extra={
        "destinations": [{"name": "sink", "ae_title": SINK_AET, "host": "127.0.0.1",
                          "port": sink_port, "accepts": ["KOS", "SR"]}],
    })
    try:
        add = node.ainode("rules", "add", "key-images", "--when", "Modality=CT",
                          "--pipeline", "brightest-slice", "--send-to", "sink")
        assert add.returncode == 0, add.stdout + add.stderr
        files = sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))
        sent = subprocess.run([require("storescu"), "-aet", "STORESCU", "-aec", "AINODE",
                               "-xv", "127.0.0.1", str(node.port), *map(str, files)],
                              env=dcmtk_env(), capture_output=True, text=True, timeout=300)
        assert sent.returncode == 0, sent.stdout + sent.stderr

        def delivered() -> list[pydicom.Dataset] | None:
            got = [pydicom.dcmread(p) for p in received.rglob("*") if p.is_file()]
            kinds = {str(ds.SOPClassUID) for ds in got}
            return got if KOS in kinds and len(got) >= 2 else None

        objects = wait_for(delivered, timeout=180, what="the KOS and the SR at the sink")
    finally:
        node.stop()

    kos = next(ds for ds in objects if ds.SOPClassUID == KOS)
    sr = next(ds for ds in objects if ds.Modality == "SR" and ds.SOPClassUID != KOS)
    flagged = {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
               for item in kos.ContentSequence if "ReferencedSOPSequence" in item}
    assert flagged == {_brightest(files)}
    assert str(kos.StudyInstanceUID) == str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert "Brightest slice" in str(sr.ContentSequence)
    path = tmp_path / "kos.dcm"
    kos.save_as(path, enforce_file_format=True)
    check = subprocess.run([require("dciodvfy"), "-new", str(path)], capture_output=True,
                           text=True, timeout=120)
    errors = [line for line in (check.stdout + check.stderr).splitlines()
              if line.startswith("Error")]
    assert errors == []

    with node.db.session() as s:
        job = s.scalars(sa.select(Job)).one()
        assert (job.pipeline, job.state) == ("brightest-slice", JobState.DONE)
        assert job.model_version == "1.0.0-test"
        assert job.rule_key == "key-images@v1"
        assert sorted(s.scalars(sa.select(Output.kind))) == ["KOS", "SR"]
        assert [f.label for f in s.scalars(sa.select(Finding))] == ["brightest slice"]
        states = set(s.scalars(sa.select(Transfer.state)))
        assert states == {TransferState.SENT}
