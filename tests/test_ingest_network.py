"""The running node (`ainode serve`, two receiver processes) against real dcmtk tools.

dcmtk's echoscu/storescu are the peers wherever they can express the case;
pynetdicom sends only what storescu refuses to send (empty UIDs) or where the
exact DIMSE status of one store is asserted.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pynetdicom._config
import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid
from pynetdicom import AE

from storage.models import AuditEvent, Instance, Series, SeriesState
from tests.support.data import dicom_series_dir, list_series_dirs, repaired_siemens
from tests.support.net import wait_for
from tests.support.node import STABLE_AGE_S, NodeProc, echo_ok, start_node
from tests.support.peers import dcmtk_env, require

pytestmark = [pytest.mark.peers, pytest.mark.slow]



@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProc]:
    n = start_node(tmp_path)
    yield n
    n.stop()


def sendable_series(tmp: Path) -> list[Path]:
    return [repaired_siemens(tmp) if d.name == "ct_abdomen_siemens" else d
            for d in list_series_dirs()]


def expected_by_series(dirs: list[Path]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for d in dirs:
        for f in d.glob("*.dcm"):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            out.setdefault(str(ds.SeriesInstanceUID), set()).add(str(ds.SOPInstanceUID))
    return out


def storescu(port: int, *paths: Path, aet: str = "STORESCU", verbose: bool = False,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("storescu"), *(["-v"] if verbose else []), "-aet", aet, "-aec", "AINODE",
         "-R", "-xv", "+sd",
         "127.0.0.1", str(port), *map(str, paths)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=timeout,
    )


def assert_landed(node: NodeProc, expected: dict[str, set[str]]) -> None:
    """Files, rows and SOP Instance UIDs agree, and each series becomes complete."""
    db = node.db
    try:
        def complete() -> bool:
            with db.session() as s:
                rows = s.execute(sa.select(Series.series_instance_uid, Series.state)).all()
            states = {uid: state for uid, state in rows}
            # Routing may already have moved a completed series on to "routed".
            return all(states.get(uid) in (SeriesState.COMPLETE, SeriesState.ROUTED)
                       for uid in expected)

        wait_for(complete, timeout=STABLE_AGE_S + 30, what="series completion")
        with db.session() as s:
            for series_uid, sops in expected.items():
                series = s.execute(sa.select(Series).where(
                    Series.series_instance_uid == series_uid)).scalar_one()
                rows = s.execute(sa.select(Instance).where(Instance.series_id == series.id))
                instances = list(rows.scalars())
                assert {i.sop_instance_uid for i in instances} == sops, series_uid
                assert series.instance_count == len(sops)
                files = list((node.data_dir / "spool").glob(f"*/{series_uid}/*.dcm"))
                assert {p.stem for p in files} == sops
                for i in instances:  # each file readable and matching its row
                    path = node.data_dir / "spool" / i.path
                    assert path.stat().st_size == i.size_bytes
                    assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == \
                        i.sop_instance_uid
    finally:
        db.dispose()


def audit_rows(node: NodeProc, event: str) -> list[AuditEvent]:
    db = node.db
    try:
        with db.session() as s:
            return list(s.execute(sa.select(AuditEvent).where(AuditEvent.event == event))
                        .scalars())
    finally:
        db.dispose()


def pynetdicom_send(port: int, items: list[Path | pydicom.Dataset],
                    sop_class: str | None = None) -> list[int]:
    """Store each item on one association with pynetdicom; return the DIMSE statuses."""
    ae = AE(ae_title="PYSENDER")
    classes = {sop_class} if sop_class else set()
    for item in items:
        ds = item if isinstance(item, pydicom.Dataset) else pydicom.dcmread(item,
                                                                             stop_before_pixels=True)
        classes.add(str(ds.file_meta.MediaStorageSOPClassUID))
        ts = str(ds.file_meta.TransferSyntaxUID)
    for c in classes:
        ae.add_requested_context(c, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    statuses = []
    # Send files as stored (UIDs from the file meta, dataset bytes untouched), the
    # way a PACS forwards what it holds; pynetdicom's switch for it is module-level.
    chunked = pynetdicom._config.STORE_SEND_CHUNKED_DATASET
    pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True
    try:
        for item in items:
            rsp = assoc.send_c_store(item)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    finally:
        pynetdicom._config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    return statuses


# -- verification and access control ----------------------------------------------------


def test_echoscu_succeeds_and_an_unlisted_calling_ae_is_rejected(node: NodeProc) -> None:
    assert echo_ok(node.port, "ECHOSCU")
    r = subprocess.run([require("echoscu"), "-aet", "INTRUDER", "-aec", "AINODE", "127.0.0.1",
                        str(node.port)], env=dcmtk_env(), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0
    assert "Calling AE Title Not Recognized" in r.stdout + r.stderr
    rejected = audit_rows(node, "association.rejected")
    assert [(a.actor, a.outcome) for a in rejected] == [("INTRUDER", "failure")]


# -- every real series, one storescu per series ----------------------------------------


def test_storescu_of_every_shared_series_lands_and_completes(
    node: NodeProc, tmp_path: Path
) -> None:
    dirs = sendable_series(tmp_path)
    for d in dirs:
        r = storescu(node.port, d)
        assert r.returncode == 0, r.stdout + r.stderr
    assert_landed(node, expected_by_series(dirs))
    listing = node.ainode("series", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert {r["series_uid"] for r in rows} == set(expected_by_series(dirs))
    assert all(r["state"] in ("complete", "routed") for r in rows)  # routed: no rule matched
    studies = json.loads(node.ainode("studies", "list", "--json").stdout)
    assert sum(s["instance_count"] for s in studies) == sum(len(list(d.glob("*.dcm")))
                                                            for d in dirs)
    table = node.ainode("series", "list")
    assert table.returncode == 0
    assert all(r["state"] in table.stdout for r in rows)


def test_four_concurrent_storescu_processes_all_land(node: NodeProc, tmp_path: Path) -> None:
    dirs = [repaired_siemens(tmp_path), dicom_series_dir("mr_head_ge_3dt1"),
            dicom_series_dir("mr_head_ge_epi4d"), dicom_series_dir("ct_phantom_philips")]
    procs = [subprocess.Popen(
        [require("storescu"), "-aet", "STORESCU", "-aec", "AINODE", "-R", "-xv", "+sd",
         "127.0.0.1", str(node.port), str(d)],
        env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) for d in dirs]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    assert_landed(node, expected_by_series(dirs))


# -- refusals: each with its status and audit event ---------------------------------------


def test_duplicate_is_acknowledged_once_and_conflict_is_kept_aside(
    node: NodeProc, tmp_path: Path
) -> None:
    src = sorted(dicom_series_dir("mr_head_siemens_t1sag").glob("*.dcm"))[0]
    first = storescu(node.port, src)
    again = storescu(node.port, src)
    assert first.returncode == 0 and again.returncode == 0, again.stdout + again.stderr
    assert len(audit_rows(node, "instance.duplicate")) == 1
    changed = pydicom.dcmread(src)
    changed.SeriesDescription = "edited elsewhere"
    buf = BytesIO()
    changed.save_as(buf, enforce_file_format=True)
    changed_path = tmp_path / "changed.dcm"
    changed_path.write_bytes(buf.getvalue())
    assert pynetdicom_send(node.port, [changed_path]) == [0x0111]
    conflict = audit_rows(node, "instance.conflict")
    assert len(conflict) == 1 and conflict[0].outcome == "failure"
    kept = list((node.data_dir / "quarantine").glob("*.dcm"))
    assert [pydicom.dcmread(p).SeriesDescription for p in kept] == ["edited elsewhere"]
    stored = list((node.data_dir / "spool").rglob(f"{changed.SOPInstanceUID}.dcm"))
    original = pydicom.dcmread(src).SeriesDescription
    assert [pydicom.dcmread(p).SeriesDescription for p in stored] == [original]


def test_unrepaired_files_with_empty_uids_get_a_failure_status(node: NodeProc) -> None:
    files = sorted(dicom_series_dir("ct_abdomen_siemens").glob("*.dcm"))[:3]
    statuses = pynetdicom_send(node.port, list(files))
    assert statuses == [0xC210] * 3
    rejected = audit_rows(node, "instance.rejected")
    assert len(rejected) == 3 and all(r.details["reason"] == "bad_dataset" for r in rejected)
    assert list((node.data_dir / "spool").rglob("*.dcm")) == []


def test_unsupported_sop_class_is_refused_at_negotiation(node: NodeProc) -> None:
    ae = AE(ae_title="PYSENDER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    try:
        assert assoc.is_established
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert accepted == {"1.2.840.10008.1.1"}
    finally:
        assoc.release()
    rows = wait_for(lambda: [a for a in audit_rows(node, "association.accepted")
                             if a.actor == "PYSENDER"], timeout=10, what="association audit")
    assert rows[0].details["refused_sop_classes"] == ["1.2.840.10008.5.1.4.1.1.88.11"]


def test_low_disk_answers_out_of_resources_before_writing(tmp_path: Path) -> None:
    node = start_node(tmp_path, min_free_mb=10**9, workers=1)
    try:
        src = sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))[:2]
        assert pynetdicom_send(node.port, list(src)) == [0xA700, 0xA700]
        r = storescu(node.port, src[0], verbose=True)
        assert r.returncode != 0
        assert "Refused: OutOfResources" in r.stderr, r.stdout + r.stderr
        rejected = audit_rows(node, "instance.rejected")
        assert len(rejected) == 3 and {r.details["reason"] for r in rejected} == {"low_disk"}
        assert list((node.data_dir / "spool").rglob("*.dcm")) == []
    finally:
        node.stop()


# -- crash safety ---------------------------------------------------------------------------


def synthetic_ct(tmp: Path, n: int) -> Path:
    """n 512x512 CT slices cloned from the Philips phantom with fresh UIDs (test-only data)."""
    out = tmp / f"synthetic_ct_{n}"
    out.mkdir()
    base = pydicom.dcmread(sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))[0])
    study, series = generate_uid(), generate_uid()
    for i in range(n):
        base.StudyInstanceUID, base.SeriesInstanceUID = study, series
        base.SOPInstanceUID = generate_uid()
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        base.InstanceNumber = i + 1
        base.save_as(out / f"{i:04d}.dcm", enforce_file_format=True)
    return out


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkill_mid_transfer_loses_nothing_acknowledged(tmp_path: Path, backend: str,
                                                         request: pytest.FixtureRequest) -> None:
    """On both databases: what a power cut leaves between a file's fsync and its row's
    commit depends on the back end's own durability."""
    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    src = synthetic_ct(tmp_path, 150)
    node = start_node(tmp_path, database_url=url)
    cmd = [require("storescu"), "-v", "-aet", "STORESCU", "-aec", "AINODE", "-R", "+C", "+sd",
           "127.0.0.1", str(node.port), str(src)]
    sender = subprocess.Popen(cmd, env=dcmtk_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    acked: list[str] = []
    current: list[str] = []
    lines: list[str] = []

    def read() -> None:
        assert sender.stdout is not None
        for line in sender.stdout:
            lines.append(line)
            m = re.search(r"Sending file: (\S+)", line)
            if m:
                current[:] = [m.group(1)]
            elif "Received Store Response (Success)" in line and current:
                acked.append(current[0])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_for(lambda: len(acked) >= 30, timeout=120, what="30 acknowledged stores")
    node.kill_all()
    sender.wait(timeout=60)
    reader.join(timeout=10)
    assert 30 <= len(acked) < 150, "the kill must land mid-transfer"
    restarted = start_node(tmp_path, data_dir=node.data_dir, port=node.port, database_url=url)
    try:
        spool = node.data_dir / "spool"
        assert not [p for p in spool.rglob("*") if p.name.startswith(".part-")]
        assert not list((spool / ".tmp").iterdir())
        db = restarted.db
        try:
            with db.session() as s:
                rows = {i.sop_instance_uid: i for i in s.execute(sa.select(Instance)).scalars()}
        finally:
            db.dispose()
        # No spool file without its row (the start-up sweep removed and audited any
        # that the kill left between a file's link and its row's commit).
        spooled = {p.relative_to(spool).as_posix() for p in spool.rglob("*.dcm")
                   if ".tmp" not in p.relative_to(spool).parts}
        assert spooled == {i.path for i in rows.values()}
        for path in acked:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert uid in rows, f"acknowledged {uid} has no row"
            stored = pydicom.dcmread(spool / rows[uid].path)  # complete and readable
            assert stored.PixelData == pydicom.dcmread(path).PixelData
        # The sender retries the whole series: everything lands, nothing twice.
        r = storescu(restarted.port, src)
        assert r.returncode == 0, r.stdout + r.stderr
        assert_landed(restarted, expected_by_series([src]))
    finally:
        restarted.stop()


def _try_hold(ae: AE, port: int, held: list[object]) -> bool:
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    if assoc.is_established:
        held.append(assoc)
    return assoc.is_established


def test_association_limit_is_the_nodes_across_receiver_processes(tmp_path: Path) -> None:
    """dicom.max_associations = 2 with two receiver processes: two open associations
    (held by a client), and dcmtk's echoscu is then refused; once one is released it
    gets through again."""
    from tests.support.net import free_port

    port = free_port()
    node = start_node(tmp_path, workers=2, port=port, extra={"dicom": {
        "ae_title": "AINODE", "host": "127.0.0.1", "port": port,
        "allowed_callers": ["ECHOSCU", "HOLDER"], "max_associations": 2}})
    try:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        # The readiness probe's association thread ends a moment after its release,
        # so the first attempts may still meet it: retry until both are held.
        held = []
        for _ in range(2):
            wait_for(lambda: _try_hold(ae, port, held), timeout=10, what="an association")
        assert len(held) == 2
        assert not echo_ok(port)
        held[0].release()  # type: ignore[attr-defined]
        wait_for(lambda: echo_ok(port), timeout=10, what="a free association slot")
        held[1].release()  # type: ignore[attr-defined]
    finally:
        node.stop()


def _receiver_pids(node: NodeProc) -> set[int]:
    """Children of every thread of the node (a replacement is started from a scheduler
    thread, and /proc lists children per thread)."""
    pids: set[int] = set()
    for task in Path(f"/proc/{node.proc.pid}/task").iterdir():
        try:
            pids |= {int(p) for p in (task / "children").read_text().split()}
        except OSError:
            continue
    return pids


def test_a_dead_receiver_process_is_replaced(tmp_path: Path) -> None:
    """SIGKILL one receiver process: the node starts another, audits it, and four
    concurrent senders are all stored afterwards (so every process serves again)."""
    import os
    import signal

    node = start_node(tmp_path, workers=2)
    try:
        (victim,) = _receiver_pids(node)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(_receiver_pids(node) - {victim}) == 1, timeout=30,
                 what="a replacement receiver process")
        series = [dicom_series_dir("ct_phantom_philips"), dicom_series_dir("mr_head_ge_3dt1"),
                  dicom_series_dir("mr_head_philips_classic"),
                  dicom_series_dir("mr_head_siemens_t1sag")]
        senders = [subprocess.Popen([require("storescu"), "-aet", "STORESCU", "-aec", "AINODE",
                                     "+sd", "-R", "127.0.0.1", str(node.port), str(s)],
                                    env=dcmtk_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE) for s in series]
        for p in senders:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()[-2000:]
        expected = sum(1 for s in series for f in s.rglob("*") if f.is_file())
        with node.db.session() as s:
            assert s.scalar(sa.select(sa.func.count()).select_from(Instance)) == expected
        # The audit row follows the replacement's readiness (about a second after it
        # appears): the four transfers can be done before it is written.
        replaced = wait_for(lambda: audit_rows(node, "receiver.replaced"), timeout=30,
                            what="the receiver.replaced audit row")
        assert len(replaced) == 1 and replaced[0].details["pid"] == victim
    finally:
        node.stop()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_associations_cost_the_node_no_cpu(tmp_path: Path) -> None:
    """Four open, idle associations: the node's CPU over 3 s stays what it is with
    none. pynetdicom's own loops poll every millisecond in two threads per
    association (node.network.reactor says why that matters); this fails if the
    event-driven loops are ever lost, e.g. by a pynetdicom upgrade."""
    node = start_node(tmp_path, workers=1, callers=["HOLDER"], serve_args=("--no-jobs",))
    try:
        def cpu_over(seconds: float) -> float:
            before = _cpu_s(node.proc.pid)
            time.sleep(seconds)
            return _cpu_s(node.proc.pid) - before

        time.sleep(1.0)
        quiet = cpu_over(3.0)
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        held: list[object] = []
        for _ in range(4):
            wait_for(lambda: _try_hold(ae, node.port, held), timeout=10, what="an association")
        time.sleep(1.0)  # past the audit rows of their establishment
        busy = cpu_over(3.0)
        for assoc in held:
            assoc.release()  # type: ignore[attr-defined]
        print(f"node CPU over 3 s: {quiet:.3f} s with no association, {busy:.3f} s with 4 idle")
        assert busy - quiet < 0.25, (quiet, busy)  # polling: about 0.55
    finally:
        node.stop()


def test_dead_and_silent_peers_free_their_association_slot(tmp_path: Path) -> None:
    """With one association allowed, each way a peer can leave or go quiet must free
    the slot promptly, whatever the receiver's loops are waiting on: an A-ABORT, a
    TCP connection that never sends its A-ASSOCIATE-RQ (ACSE timeout), and an
    established association that goes silent (network timeout)."""
    from tests.support.net import free_port

    port = free_port()
    node = start_node(tmp_path, workers=1, port=port, extra={"dicom": {
        "ae_title": "AINODE", "host": "127.0.0.1", "port": port,
        "allowed_callers": ["ECHOSCU", "HOLDER"], "max_associations": 1,
        "acse_timeout_s": 1.0, "network_timeout_s": 1.5}})
    try:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        held: list[object] = []
        wait_for(lambda: _try_hold(ae, port, held), timeout=10, what="an association")
        assert not echo_ok(port)
        held.pop().abort()  # type: ignore[attr-defined]
        wait_for(lambda: echo_ok(port), timeout=5, what="the slot after an A-ABORT")

        silent = socket.create_connection(("127.0.0.1", port))
        silent.settimeout(10)
        start = time.monotonic()
        received = b""
        while chunk := silent.recv(1024):  # until the node closes it (a timeout raises)
            received += chunk
        assert time.monotonic() - start < 5
        assert received in (b"", bytes.fromhex("07000000000400000000")), received  # or A-ABORT
        silent.close()
        wait_for(lambda: echo_ok(port), timeout=5, what="the slot after a silent connection")

        wait_for(lambda: _try_hold(ae, port, held), timeout=10, what="an association")
        assoc = held.pop()
        wait_for(lambda: not assoc.is_established,  # type: ignore[attr-defined]
                 timeout=6, what="the node to end an idle association")
        wait_for(lambda: echo_ok(port), timeout=5, what="the slot after a network timeout")
    finally:
        node.stop()
