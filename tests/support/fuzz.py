"""Hostile bytes against a live node: malformed PDUs and malformed data sets (hypothesis).

Each case is sent on its own TCP connection, as raw bytes (a polite client would
refuse to send most of them). After each one the harness checks what the node
promised: it is still running (main and receiver processes), it answered with a
DIMSE status, an A-ASSOCIATE-RJ, an A-ABORT or a close within the timeouts
(never a hang), a success was stored complete and byte for byte, and a failure
stored nothing. Every ``probe_every`` cases a well-behaved sender (echoscu and a
one-file storescu) must be served, and the node's RSS (main plus receiver
processes) is sampled. Any broken promise is a defect, recorded with the case.

``python -m tests.support.fuzz --seconds 600 --seed 19`` (``make fuzz``) starts a
node and runs for that long; ``tests/test_fuzz.py`` runs a short seeded version.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import random
import socket
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from tests.support.data import dicom_series_dir
from tests.support.net import free_port
from tests.support.node import NodeProc, echo_ok, start_node
from tests.support.pdu import CT_IMAGE, RELEASE_RQ, associate_rq, read_pdu
from tests.support.peers import dcmtk_env, require

__all__ = ["FuzzReport", "fuzz", "node_rss_mb", "start_fuzz_node"]

EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
PDU_KINDS = ("bad_type", "bad_length", "item_past_pdu", "huge_length", "garbage_before",
             "garbage_after", "bit_flips", "truncated_pdv", "pdv_past_pdu")
DATA_KINDS = ("tag", "vr", "length", "short_pixels", "deep_sequence", "deflate_bomb",
              "huge_element", "truncated_dataset")


@dataclass
class FuzzReport:
    cases: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    defects: list[str] = field(default_factory=list)
    probes: int = 0
    rss_mb: list[float] = field(default_factory=list)

    def count(self, kind: str, outcome: str) -> None:
        self.cases += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


def node_rss_mb(pid: int) -> float:
    """RSS of the node: its main process and its children (the receiver processes)."""
    pids = {pid}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            pids |= {int(p) for p in (task / "children").read_text().split()}
        except OSError:
            continue
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


# -- building blocks -------------------------------------------------------------


def _implicit(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def store_command(sop_class: str, sop_uid: str, message_id: int = 1) -> bytes:
    body = b"".join((
        _implicit(0x00000002, sop_class.encode()),
        _implicit(0x00000100, struct.pack("<H", 0x0001)),
        _implicit(0x00000110, struct.pack("<H", message_id)),
        _implicit(0x00000700, struct.pack("<H", 0)),
        _implicit(0x00000800, struct.pack("<H", 0x0000)),
        _implicit(0x00001000, sop_uid.encode()),
    ))
    return _implicit(0x00000000, struct.pack("<L", len(body))) + body


def pdata(context_id: int, control: int, payload: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(payload) + 2, context_id, control) + payload
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def _status_of(pdu: bytes) -> int | None:
    """The Status (0000,0900) of a C-STORE-RSP in a P-DATA-TF PDU, if that is what it is."""
    if pdu[:1] != b"\x04" or len(pdu) < 12:
        return None
    at = pdu.find(struct.pack("<HHL", 0x0000, 0x0900, 2), 12)
    return None if at < 0 else int(struct.unpack_from("<H", pdu, at + 8)[0])


@dataclass(frozen=True)
class _Source:
    dataset: bytes  # the data set of a real CT slice (after its file meta), explicit LE
    sop_uid: str
    pixel_at: int  # offset of the Pixel Data element header in ``dataset``


def _source() -> _Source:
    import pydicom

    f = sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))[0]
    raw = f.read_bytes()
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    assert str(ds.file_meta.TransferSyntaxUID) == EXPLICIT
    # The data set starts after the File Meta group: its group length (0002,0000) is
    # the UL at offset 140, counted from offset 144.
    dataset = raw[144 + struct.unpack_from("<L", raw, 140)[0]:]
    return _Source(dataset, str(ds.SOPInstanceUID),
                   dataset.find(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW"))


def _elements(dataset: bytes, limit: int) -> list[tuple[int, int]]:
    """(offset, header size) of the top-level explicit-LE elements before ``limit``."""
    out, pos = [], 0
    long_vrs = {b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF", b"OD", b"OL", b"UC", b"UR"}
    while pos + 8 <= limit:
        vr = dataset[pos + 4:pos + 6]
        if vr in long_vrs:
            (length,) = struct.unpack_from("<L", dataset, pos + 8)
            size = 12
        else:
            (length,) = struct.unpack_from("<H", dataset, pos + 6)
            size = 8
        out.append((pos, size))
        if length == 0xFFFFFFFF:
            break  # a sequence of undefined length: stop listing here
        pos += size + length
    return out


def _with_uid(dataset: bytes, old: str, new: str) -> bytes:
    """The data set under a fresh SOP Instance UID of the same length (each case its own)."""
    return dataset.replace(old.encode(), new.encode(), 1)


# Each case its own SOP Instance UID, across every batch of a run.
_UIDS = itertools.count(int(time.time()) % 100000 * 100000)


def _fresh_uid(old: str, n: int) -> str:
    suffix = str(n)
    return old[: len(old) - len(suffix)] + suffix if len(old) > len(suffix) else old


@functools.cache
def _bomb_tail() -> bytes:
    """A private OB element of 1 GiB of zeros, deflated (about 1 MB): compressed once and
    appended after the sync-flushed head of each case (raw deflate blocks concatenate)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = comp.compress(struct.pack("<HH2sHL", 0x0009, 0x1011, b"OB", 0, 1 << 30))
    zeros = bytes(1 << 20)
    for _ in range(1024):
        out += comp.compress(zeros)
    return out + comp.flush()


def mutate_dataset(src: _Source, kind: str, rnd: random.Random) -> tuple[bytes, str]:
    """(data set bytes, transfer syntax) for one malformed-data-set case."""
    ds = bytearray(src.dataset)
    elems = _elements(src.dataset, src.pixel_at)
    if kind == "tag":
        pos, _ = rnd.choice(elems)
        ds[pos:pos + 4] = rnd.randbytes(4)
    elif kind == "vr":
        pos, _ = rnd.choice(elems)
        ds[pos + 4:pos + 6] = bytes(rnd.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ\0\xff")
                                    for _ in range(2))
    elif kind == "length":
        pos, size = rnd.choice(elems)
        value = rnd.choice([0, 1, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFF0, rnd.randrange(1 << 32)])
        if size == 12:
            struct.pack_into("<L", ds, pos + 8, value)
        else:
            struct.pack_into("<H", ds, pos + 6, value & 0xFFFF)
    elif kind == "short_pixels":
        keep = rnd.randrange(len(ds) - 524288, len(ds) - 2)
        struct.pack_into("<L", ds, src.pixel_at + 8, keep - src.pixel_at - 12)
        del ds[keep:]
    elif kind == "truncated_dataset":
        del ds[rnd.randrange(16, len(ds) - 1):]
    elif kind == "deep_sequence":
        depth = rnd.choice([50, 500, 5000])
        item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
        seq = struct.pack("<HH2sHL", 0x0009, 0x1010, b"SQ", 0, 0xFFFFFFFF)
        nested = (seq + item) * depth + (struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
                                         + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)) * depth
        at = elems[min(len(elems) - 1, 20)][0]
        ds[at:at] = nested
    elif kind == "deflate_bomb":
        head = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = head.compress(bytes(src.dataset[:src.pixel_at])) + head.flush(zlib.Z_SYNC_FLUSH)
        return body + _bomb_tail(), DEFLATED
    elif kind == "huge_element":
        at = elems[min(len(elems) - 1, 10)][0]
        ds[at:at] = struct.pack("<HH2sHL", 0x0009, 0x1012, b"OB", 0, 0xFFFFFFF0) + b"\0" * 64
    return bytes(ds), EXPLICIT


def mutate_pdu(kind: str, rnd: random.Random, sop_uid: str, dataset: bytes) -> list[bytes]:
    """The byte strings (sent one after another) of one malformed-PDU case."""
    rq = associate_rq("FUZZER", abstract=(CT_IMAGE,))
    if kind == "bad_type":
        t = rnd.choice([0x00, 0x08, 0x09, 0x7F, 0xFF])
        return [struct.pack(">BBL", t, 0, rnd.randrange(64)) + rnd.randbytes(64)]
    if kind == "bad_length":
        bad = bytearray(rq)
        struct.pack_into(">L", bad, 2, rnd.choice([0, 1, 67, len(rq) - 7, len(rq) + 100]))
        return [bytes(bad)]
    if kind == "item_past_pdu":
        bad = bytearray(rq)
        # The first variable item (application context) claims more than the PDU holds.
        struct.pack_into(">H", bad, 74 + 2, rnd.choice([0xFFFF, len(rq), 300]))
        return [bytes(bad)]
    if kind == "huge_length":
        return [struct.pack(">BBL", rnd.choice([0x01, 0x04]), 0,
                            rnd.choice([0xFFFFFFFF, 0xFFFFFFF0, 1 << 31])) + rnd.randbytes(32)]
    if kind == "garbage_before":
        return [rnd.randbytes(rnd.randrange(1, 200)) + rq]
    if kind == "garbage_after":
        return [rq + rnd.randbytes(rnd.randrange(1, 200))]
    if kind == "bit_flips":
        bad = bytearray(rq)
        for _ in range(rnd.randrange(1, 8)):
            i = rnd.randrange(len(bad))
            bad[i] ^= 1 << rnd.randrange(8)
        return [bytes(bad)]
    command = store_command(CT_IMAGE, sop_uid)
    if kind == "truncated_pdv":
        p = pdata(1, 0x03, command)
        return [rq, p[: rnd.randrange(7, len(p) - 1)]]
    # pdv_past_pdu: a PDV item whose length runs past its PDU
    p = bytearray(pdata(1, 0x03, command))
    struct.pack_into(">L", p, 6, len(command) + rnd.randrange(3, 5000))
    return [rq, bytes(p), pdata(1, 0x02, dataset[:4096])]


# -- one case against the node -------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    kind: str  # status:0xNNNN | rejected | aborted | closed | accepted-then-closed
    hung: bool = False


def _converse(port: int, chunks: list[bytes], expect_store: bytes | None,
              timeout_s: float) -> Outcome:
    """Send ``chunks`` (after an A-ASSOCIATE-AC for the second one on), then read until
    the node answers or closes; ``expect_store``: the P-DATA of a C-STORE to send."""
    deadline = time.monotonic() + timeout_s
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    except OSError:
        return Outcome("connect-failed")
    with s:
        try:
            s.sendall(chunks[0])
            if len(chunks) > 1 or expect_store is not None:
                first = read_pdu(s)
                if first[:1] != b"\x02":
                    return Outcome(_name(first))
                for c in chunks[1:]:
                    s.sendall(c)
                if expect_store is not None:
                    s.sendall(expect_store)
            while time.monotonic() < deadline:
                s.settimeout(max(0.05, deadline - time.monotonic()))
                pdu = read_pdu(s)
                status = _status_of(pdu)
                if status is not None:
                    s.sendall(RELEASE_RQ)
                    read_pdu(s)
                    return Outcome(f"status:0x{status:04X}")
                if pdu[:1] == b"\x02":
                    continue  # accepted (garbage after the request): wait for the close
                return Outcome(_name(pdu))
            return Outcome("hung", hung=True)
        except TimeoutError:
            return Outcome("hung", hung=True)
        except OSError:
            return Outcome("reset")


def _name(pdu: bytes) -> str:
    return {b"": "closed", b"\x03": "rejected", b"\x07": "aborted",
            b"\x02": "accepted"}.get(pdu[:1], f"pdu-0x{pdu[:1].hex()}")


def _store_pdus(dataset: bytes, sop_uid: str, ts_context: int) -> bytes:
    out = pdata(ts_context, 0x03, store_command(CT_IMAGE, sop_uid))
    for i in range(0, len(dataset), 16000):
        last = i + 16000 >= len(dataset)
        out += pdata(ts_context, 0x02 if last else 0x00, dataset[i:i + 16000])
    return out


class _Checker:
    def __init__(self, node: NodeProc, report: FuzzReport, probe_every: int) -> None:
        self.node = node
        self.report = report
        self.probe_every = probe_every
        self.src = _source()
        self.n = 0
        self.sample = sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))[1]

    def _defect(self, what: str) -> None:
        self.report.defects.append(what)

    def _alive(self, label: str) -> bool:
        if self.node.proc.poll() is not None:
            self._defect(f"{label}: the node exited with {self.node.proc.returncode}")
            return False
        return True

    def pdu_case(self, kind: str, seed: int) -> None:
        rnd = random.Random(seed)
        self.n += 1
        uid = _fresh_uid(self.src.sop_uid, next(_UIDS))
        chunks = mutate_pdu(kind, rnd, uid, _with_uid(self.src.dataset, self.src.sop_uid, uid))
        out = _converse(self.node.port, chunks, None, timeout_s=8.0)
        self.report.count(kind, out.kind)
        label = f"pdu {kind} seed {seed}"
        if out.hung:
            self._defect(f"{label}: no answer and no close within 8 s")
        if out.kind.startswith("status:0x0000"):
            self._defect(f"{label}: a malformed PDU stream was acknowledged")
        self._alive(label)
        self._maybe_probe()

    def data_case(self, kind: str, seed: int) -> None:
        rnd = random.Random(seed)
        self.n += 1
        uid = _fresh_uid(self.src.sop_uid, next(_UIDS))
        dataset, ts = mutate_dataset(
            _Source(_with_uid(self.src.dataset, self.src.sop_uid, uid), uid,
                    self.src.pixel_at), kind, rnd)
        rq = associate_rq("FUZZER", abstract=(CT_IMAGE,), transfer=ts)
        out = _converse(self.node.port, [rq], _store_pdus(dataset, uid, 1), timeout_s=15.0)
        self.report.count(kind, out.kind)
        label = f"dataset {kind} seed {seed}"
        if out.hung:
            self._defect(f"{label}: no status and no close within 15 s")
        stored = self._stored(uid)
        if out.kind == "status:0xC211":
            self._defect(f"{label}: internal error (0xC211) instead of a refusal")
        if out.kind == "status:0x0000":
            if stored is None:
                self._defect(f"{label}: acknowledged but no row")
            elif kind in ("short_pixels", "deflate_bomb", "truncated_dataset"):
                self._defect(f"{label}: acknowledged a data set that cannot be whole")
            elif not self._as_sent(stored["path"], dataset):
                self._defect(f"{label}: acknowledged, but the stored file does not end "
                             "with the data set bytes that were sent")
        elif stored is not None and out.kind.startswith("status:"):
            self._defect(f"{label}: refused ({out.kind}) but a row was stored")
        self._alive(label)
        self._maybe_probe()

    def _as_sent(self, rel: str, dataset: bytes) -> bool:
        """The spool file is the sent data set behind a file meta header, byte for
        byte: the node stores what it received, and never re-encodes it."""
        return (self.node.data_dir / "spool" / rel).read_bytes().endswith(dataset)

    def _stored(self, uid: str) -> dict[str, Any] | None:
        import sqlalchemy as sa

        from storage.models import Instance

        db = self.node.db
        try:
            with db.session() as s:
                row = s.scalars(sa.select(Instance).where(Instance.sop_instance_uid == uid)).first()
                return None if row is None else {"path": row.path, "sha256": row.sha256}
        finally:
            db.dispose()

    def _maybe_probe(self) -> None:
        if self.n % self.probe_every:
            return
        self.probe()

    def probe(self) -> None:
        import subprocess

        self.report.probes += 1
        self.report.rss_mb.append(node_rss_mb(self.node.proc.pid))
        if not echo_ok(self.node.port):
            self._defect(f"after case {self.n}: echoscu was not served")
        r = subprocess.run([require("storescu"), "-aet", "STORESCU", "-aec", "AINODE",
                            "127.0.0.1", str(self.node.port), str(self.sample)],
                           env=dcmtk_env(), capture_output=True, timeout=60)
        if r.returncode != 0:
            self._defect(f"after case {self.n}: storescu of a good file failed")

    def spool_consistent(self) -> None:
        """Every spool file has its row and hash (no partial, no unrecorded file)."""
        import sqlalchemy as sa

        from storage.models import Instance

        spool = self.node.data_dir / "spool"
        db = self.node.db
        try:
            with db.session() as s:
                rows = {i.path: i.sha256 for i in s.scalars(sa.select(Instance))}
        finally:
            db.dispose()
        files = {p.relative_to(spool).as_posix(): p for p in spool.rglob("*.dcm")
                 if ".tmp" not in p.relative_to(spool).parts}
        for rel in set(files) - set(rows):
            self._defect(f"spool file without a row: {rel}")
        for rel, p in files.items():
            if rel in rows and hashlib.sha256(p.read_bytes()).hexdigest() != rows[rel]:
                self._defect(f"spool file differs from its row: {rel}")
        if [p for p in spool.rglob(".part-*")]:
            self._defect("partial staging files in the spool")


def fuzz(node: NodeProc, *, max_examples: int, seed: int, probe_every: int = 25,
         report: FuzzReport | None = None) -> FuzzReport:
    """``max_examples`` PDU cases and as many data-set cases, seeded; returns the report."""
    report = report or FuzzReport()
    checker = _Checker(node, report, probe_every)
    checker.probe()
    conf = settings(max_examples=max_examples, deadline=None, database=None,
                    phases=[Phase.generate], suppress_health_check=list(HealthCheck),
                    derandomize=False)

    @hypothesis_seed(seed)
    @conf
    @given(kind=st.sampled_from(PDU_KINDS), case_seed=st.integers(0, 2**31))
    def pdus(kind: str, case_seed: int) -> None:
        checker.pdu_case(kind, case_seed)

    @hypothesis_seed(seed + 1)
    @conf
    @given(kind=st.sampled_from(DATA_KINDS), case_seed=st.integers(0, 2**31))
    def datasets(kind: str, case_seed: int) -> None:
        checker.data_case(kind, case_seed)

    run: Callable[[], None]
    for run in (pdus, datasets):
        run()
    checker.probe()
    checker.spool_consistent()
    return report


def start_fuzz_node(tmp: Path) -> NodeProc:
    """A node with two receiver processes and short timeouts (3 s), as the cases expect."""
    port = free_port()
    return start_node(tmp, workers=2, port=port, serve_args=("--no-jobs",), extra={"dicom": {
        "ae_title": "AINODE", "host": "127.0.0.1", "port": port,
        "allowed_callers": ["FUZZER", "STORESCU", "ECHOSCU"],
        "acse_timeout_s": 3.0, "network_timeout_s": 3.0, "max_associations": 8}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fuzz a live node for a chosen time")
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ainode-fuzz-"))
    node = start_fuzz_node(tmp)
    report = FuzzReport()
    end = time.monotonic() + args.seconds
    seed = args.seed
    try:
        while time.monotonic() < end:
            fuzz(node, max_examples=args.batch, seed=seed, report=report)
            seed += 2
    finally:
        node.stop()
    print(f"cases: {report.cases} ({report.by_kind})")
    print(f"outcomes: {report.outcomes}")
    print(f"RSS MB: min {min(report.rss_mb):.0f} max {max(report.rss_mb):.0f} "
          f"({report.probes} samples)")
    print(f"defects: {len(report.defects)}")
    for d in report.defects:
        print(f"  {d}")
    return 1 if report.defects else 0


if __name__ == "__main__":
    sys.exit(main())
