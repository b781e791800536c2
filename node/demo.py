"""``ainode demo``: one study from PACS to the node and back, on the embedded default.

What it shows is the product's whole loop with real programs on both sides:
a local Orthanc stands in for the hospital PACS; a CT series goes into it
(by default a synthetic abdominal phantom with a lesion, written by the
project's own generator, so a fresh clone anywhere can run it); Orthanc
pushes the study to the node with C-STORE, exactly as a PACS routing rule
would; the node completes the series, routes it, runs the pancreas pipeline
with the shipped demo weights, writes SEG/SR/GSPS/SC and sends them back to
Orthanc. The demo then prints the findings, the turnaround, where each
result went, and renders PNGs an engineer can look at without a viewer.

When Orthanc is not installed (and cannot be, without root), a small local
storage SCP receives the results instead and the node is fed directly; the
demo says so.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from node.config import DestinationConfig, NodeConfig
from node.pacs import Orthanc, find_tool, orthanc, wait_for
from pipelines.pancreas.output import LESION_CONFIDENCE_NAME
from pipelines.results import probability_text
from storage.audit import os_actor
from storage.errors import InputError, NodeError
from storage.models import (
    AuditEvent,
    Destination,
    Finding,
    Job,
    JobState,
    Output,
    Series,
    Transfer,
    TransferState,
    utcnow,
)

__all__ = ["DEMO_DESTINATION", "DEMO_RULE", "DemoReport", "run_demo"]

log = logging.getLogger(__name__)

DEMO_PACS_AET = "DEMOPACS"
DEMO_DESTINATION = "demo-pacs"
DEMO_RULE = "demo-pancreas-ct"
DEMO_SEED = 424242  # never used to train the shipped weights
Say = Callable[[str], None]


@dataclass
class DemoReport:
    series_uid: str
    study_uid: str
    job_id: int | None = None
    job_state: str | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    turnaround_s: float | None = None
    pngs: list[Path] = field(default_factory=list)
    pacs_series: list[str] = field(default_factory=list)  # modalities of the study in PACS
    pacs: str = "orthanc"
    node_dir: Path | None = None  # the demo's own data directory


# -- input -------------------------------------------------------------------------------


def demo_series(folder: Path, say: Say) -> list[Path]:
    """Write the default demo input: a phantom CT with a pancreatic lesion."""
    from pipelines.pancreas.measures import long_axis_diameter_mm
    from pipelines.phantom.generator import PhantomSpec, generate
    from pipelines.phantom.io import write_dicom_series

    spec = PhantomSpec(seed=DEMO_SEED, contrast="ct", diagnosis="PDAC", lesion_diameter_mm=24.0)
    phantom = generate(spec)
    paths = write_dicom_series(phantom, folder, seed=DEMO_SEED)
    # The ground truth measured as the node measures a finding (3D long axis over voxel
    # edges, pipelines.pancreas.measures), so the two numbers can be compared; the
    # generator's 24 mm is the size it was asked for, before deformation and lobulation.
    truth_mm = long_axis_diameter_mm(phantom.label == 2, phantom.spacing)
    say(f"input     synthetic phantom CT, {len(paths)} slices, PDAC-like lesion in the "
        f"pancreatic {phantom.lesion_location}: ground-truth long axis {truth_mm:.0f} mm "
        f"(measured as the node measures; seed {DEMO_SEED})")
    return paths


def read_series_folder(folder: Path) -> tuple[list[Path], str, str]:
    """DICOM files of one series in ``folder``; refuses a folder holding several series."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    files: list[Path] = []
    uids: set[tuple[str, str]] = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        if not study or not series:
            raise InputError(f"{path.name} has no Study/Series Instance UID; repair it first")
        uids.add((study, series))
        files.append(path)
    if not files:
        raise InputError(f"no DICOM files in {folder}")
    if len(uids) > 1:
        raise InputError(f"{folder} holds {len(uids)} series; give the demo one series")
    study, series = uids.pop()
    return files, study, series


# -- set-up in the database -----------------------------------------------------------


def demo_config(config: NodeConfig, work: Path) -> NodeConfig:
    """The node's config with a data directory of the demo's own, emptied for each run.

    Why: the demo adds a rule (``Modality=CT`` to a PACS on a port that dies with
    the demo) and a destination; in the node's own database a later ``ainode
    serve`` would route every CT there. In ``<data_dir>/demo/node`` (SQLite) they
    never leave the demo, and an empty one per run makes each run's job its own.
    No broker either: a ``queue.broker_url`` in the node's config would hand the
    demo's job to Celery workers that read another database and never see it.
    """
    node_dir = work / "node"
    if node_dir.exists():
        shutil.rmtree(node_dir)
    node_dir.mkdir(parents=True)
    storage = config.storage.model_copy(update={
        "data_dir": node_dir, "database_url": None, "spool_dir": None, "results_dir": None})
    queue = config.queue.model_copy(update={"broker_url": None})
    return config.model_copy(update={"storage": storage, "destinations": [], "queue": queue})


def ensure_destination(service: Any, name: str, ae_title: str, port: int) -> None:
    """Point the demo destination at this run's PACS port (it changes every run).

    It takes every kind the node can write: the demo shows them all.
    """
    from pipelines.dicom_out import registry as writers
    from storage import destinations
    from storage.audit import audit

    cfg = DestinationConfig(name=name, ae_title=ae_title, host="127.0.0.1", port=port,
                            accepts=list(writers.kinds()))
    with service.db.session() as s:
        row = destinations.by_name(s, name)
        if row is None:
            destinations.add(s, cfg, actor=os_actor())
        else:
            row.ae_title, row.host, row.port = ae_title, "127.0.0.1", port
            row.accepts, row.enabled = list(cfg.accepts), True
            audit(s, "destination.updated", actor=os_actor(), destination=name,
                  fields=["port"], origin="demo")


def ensure_rule(service: Any, name: str, destination: str) -> None:
    from node.routing import store as rules
    from node.routing.rules import RuleSpec
    from pipelines import registry

    with service.db.session() as s:
        current = [r for r in rules.current_rules(s) if r.name == name]
        if current:
            return
        spec = RuleSpec.build(name, pipeline="pancreas-ct", when=["Modality=CT"],
                              send_to=[destination], priority=10)
        rules.add_rule(s, spec, actor=os_actor(), pipelines=registry.available(),
                       configured_destinations=[d.name for d in service.config.destinations])


# -- waiting -------------------------------------------------------------------------------


def _job_settled(service: Any, series_uid: str, *,
                 since: datetime | None = None) -> tuple[Job, list[Transfer]] | None:
    """This run's job once it and its transfers are settled (a job made before
    ``since`` is an earlier run's, never reported as this one's)."""
    with service.db.session() as s:
        series = s.scalars(select(Series).where(Series.series_instance_uid == series_uid)
                           ).one_or_none()
        if series is None:
            return None
        q = select(Job).where(Job.series_id == series.id)
        if since is not None:
            q = q.where(Job.created_at >= since)
        job = s.scalars(q.order_by(Job.id.desc())).first()
        if job is None or job.state in (JobState.QUEUED, JobState.RUNNING):
            return None
        transfers = list(s.scalars(select(Transfer).join(Output).where(Output.job_id == job.id)))
        if any(t.state is TransferState.PENDING for t in transfers):
            return None
        if job.state is JobState.DONE and job.turnaround_s is None and transfers:
            return None  # turnaround is stamped by the next scheduler tick
        return job, transfers


def _stage(service: Any, series_uid: str) -> str:
    with service.db.session() as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.series_uid == series_uid)
                       .order_by(AuditEvent.id.desc())).first()
        return ev.event if ev else "waiting for the first instance"


# -- the run -------------------------------------------------------------------------------


@contextmanager
def _pacs(workdir: Path, node_aet: str, node_port: int, say: Say) -> Iterator[Orthanc | None]:
    if find_tool("Orthanc") is None:
        say("pacs      Orthanc is not installed (apt-get install orthanc, as root): a local "
            "storage SCP stands in for the PACS, and the demo sends the series to the node "
            "itself")
        yield None
        return
    with orthanc(workdir, aet=DEMO_PACS_AET,
                 modalities={"ainode": (node_aet, "127.0.0.1", node_port)}) as pacs:
        say(f"pacs      Orthanc {DEMO_PACS_AET} on 127.0.0.1:{pacs.dicom_port} "
            f"(REST on 127.0.0.1:{pacs.http_port}, loopback only)")
        yield pacs


def _push_via_orthanc(pacs: Orthanc, files: list[Path]) -> None:
    study_ids = set()
    for path in files:
        answer = pacs.upload(path)
        study_ids.add(answer["ParentStudy"])
    pacs.post("/modalities/ainode/store", {"Resources": sorted(study_ids), "Synchronous": True},
              timeout=600)


def _push_direct(config: NodeConfig, port: int, files: list[Path]) -> None:
    from node.send.scu import Peer, associate, contexts_for, store

    datasets = [pydicom.dcmread(p) for p in files]
    peer = Peer(name="node", ae_title=config.dicom.ae_title, host="127.0.0.1", port=port,
                calling_ae_title="DEMO")
    with associate(peer, contexts_for(datasets)) as assoc:
        for ds in datasets:
            if store(assoc, ds) != 0:
                raise NodeError(f"the node refused {ds.SOPInstanceUID}")


def run_demo(config: NodeConfig, *, series_dir: Path | None = None, say: Say = print,
             timeout_s: float = 1800.0) -> DemoReport:
    """Run the loop once; returns what happened. Raises NodeError on a failed step."""
    from node.pacs import LocalStoreSCP
    from node.render import render_series
    from node.service import NodeService

    work = config.storage.data_dir.resolve() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    config = demo_config(config, work)
    for stale in ("pacs", "received"):  # the stand-in PACS starts empty too: its study
        shutil.rmtree(work / stale, ignore_errors=True)  # then holds this run's results only
    started = utcnow()
    if series_dir is None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        files = demo_series(work / "input" / stamp, say)
        files, study_uid, series_uid = read_series_folder(work / "input" / stamp)
    else:
        files, study_uid, series_uid = read_series_folder(series_dir)
        say(f"input     {len(files)} DICOM files from {series_dir}")
    service = NodeService(config, workers=1, run_jobs=True)
    service.start()
    local: LocalStoreSCP | None = None
    try:
        say(f"node      AE {config.dicom.ae_title} on {config.dicom.host}:{service.port}, "
            f"database {service.db.safe_url}")
        with _pacs(work / "pacs", config.dicom.ae_title, service.port, say) as pacs:
            if pacs is None:
                local = LocalStoreSCP(work / "received", ae_title=DEMO_PACS_AET)
                local.start()
                ensure_destination(service, DEMO_DESTINATION, DEMO_PACS_AET, local.port)
            else:
                ensure_destination(service, DEMO_DESTINATION, DEMO_PACS_AET, pacs.dicom_port)
            ensure_rule(service, DEMO_RULE, DEMO_DESTINATION)
            say(f"rule      {DEMO_RULE}: Modality=CT -> pancreas-ct -> {DEMO_DESTINATION}")
            t0 = time.monotonic()
            if pacs is not None:
                say("send      PACS -> node (Orthanc C-STORE to the node)")
                _push_via_orthanc(pacs, files)
            else:
                say("send      demo -> node (C-STORE)")
                _push_direct(config, service.port, files)
            last = ""

            def settled() -> tuple[Job, list[Transfer]] | None:
                nonlocal last
                stage = _stage(service, series_uid)
                if stage != last:
                    say(f"  ... {time.monotonic() - t0:5.1f}s  {stage}")
                    last = stage
                return _job_settled(service, series_uid, since=started)

            outcome = wait_for(settled, timeout=timeout_s, interval=0.5,
                               what="the job and its transfers")
            assert outcome is not None  # wait_for returns only a truthy value
            job, transfers = outcome
            report = _report(service, job, transfers, study_uid, series_uid)
            report.node_dir = config.storage.data_dir
            if pacs is not None:
                report.pacs_series = _pacs_modalities(pacs, study_uid)
            else:
                report.pacs = "local storage SCP"
            report.pngs = render_series(service.db, service.store, series_uid,
                                        work / "render" / series_uid)
            return report
    finally:
        if local is not None:
            local.stop()
        service.stop()


def _report(service: Any, job: Job, transfers: list[Transfer], study_uid: str,
            series_uid: str) -> DemoReport:
    report = DemoReport(series_uid=series_uid, study_uid=study_uid, job_id=job.id,
                        job_state=job.state.value, turnaround_s=job.turnaround_s)
    with service.db.session() as s:
        for f in s.scalars(select(Finding).where(Finding.job_id == job.id).order_by(Finding.id)):
            report.findings.append({
                "kind": f.kind, "label": f.label, "probability": f.probability,
                "location": f.location, "diameter_mm": f.diameter_mm, "volume_ml": f.volume_ml,
            })
        dests = {d.id: d.name for d in s.scalars(select(Destination))}
        for out in s.scalars(select(Output).where(Output.job_id == job.id).order_by(Output.id)):
            sent = [f"{dests.get(t.destination_id)}:{t.state.value}"
                    for t in s.scalars(select(Transfer).where(Transfer.output_id == out.id))]
            report.outputs.append({"kind": out.kind, "path": str(service.store.result_path(
                out.path)), "sent": sent})
        if job.error:
            report.findings.append({"kind": "error", "label": job.error})
    return report


def _pacs_modalities(pacs: Orthanc, study_uid: str) -> list[str]:
    found = pacs.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
    if not found:
        return []
    series = pacs.get(f"/studies/{found[0]}/series")
    return sorted(s["MainDicomTags"].get("Modality", "?") for s in series)


def print_report(report: DemoReport, say: Say = print) -> None:
    say("")
    say(f"job {report.job_id}: {report.job_state}")
    for f in report.findings:
        if f["kind"] == "patient":
            say(f"  patient   {f['label']}: {probability_text(f['probability'])}")
        elif f["kind"] == "lesion":
            say(f"  lesion    {f['label']} in pancreatic {f['location'] or '?'}: "
                f"long axis {f['diameter_mm']:.0f} mm, {f['volume_ml']:.1f} ml, "
                f"{LESION_CONFIDENCE_NAME.lower()} {probability_text(f['probability'])}")
        else:
            say(f"  {f['kind']:9} {f['label']}")
    if report.turnaround_s is not None:
        say(f"turnaround {report.turnaround_s:.1f} s (last instance received -> results "
            "accepted by every destination)")
    for o in report.outputs:
        say(f"  {o['kind']:5} {o['path']}  -> {', '.join(o['sent']) or 'not sent'}")
    if report.pacs_series:
        say(f"in PACS   study {report.study_uid} now holds series: "
            f"{', '.join(report.pacs_series)}")
    if report.pngs:
        say(f"rendered  {len(report.pngs)} PNG(s) in {report.pngs[0].parent}")
    say(f"demo node data in {report.node_dir} (removed and made afresh by the next demo run)")
    say("NOT FOR CLINICAL USE: demo weights trained on synthesised images (model cards: "
        "pipelines/weights/*/MODEL_CARD.md).")
