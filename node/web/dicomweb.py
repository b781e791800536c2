"""DICOMweb (PS3.18): STOW-RS into the C-STORE ingest path, QIDO-RS, WADO-RS.

STOW-RS is another transport into ``storage.ingest.Ingestor``, exactly as a
C-STORE is: each part is persisted (file fsynced, row committed, audit row)
before the response names it in ReferencedSOPSequence; a refused part is in
FailedSOPSequence with the same status the C-STORE receiver would answer
(node.network.status): A700 below the disk floor, C210 missing or invalid
UIDs, 0111 a different dataset under a stored SOP Instance UID, A701 a
storage failure. A repeat of stored bytes is a success, stored once.

WADO-RS serves the stored files as they arrived (no transcoding), and the
node's results (SEG, SR, ...) under their own series in the same study.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import Counter, Histogram
from sqlalchemy import func, select

from node.network import status as dimse
from node.web.auth import Admin, Viewer
from node.web.context import WebContext
from storage.errors import ConflictError, InputError, OutOfSpaceError, StorageError
from storage.ingest import Peer
from storage.models import Instance, Job, Output, Series, Study
from storage.part10 import transfer_syntax

__all__ = ["STOW_INSTANCES", "parse_multipart", "router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

STOW_INSTANCES = Counter("ainode_stow_instances_total",
                         "STOW-RS instances by outcome (stored, duplicate, or the DICOM "
                         "failure status in hex)", ["status"])
STOW_SECONDS = Histogram("ainode_stow_request_seconds", "STOW-RS request duration",
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.I)
DICOM_JSON = "application/dicom+json"


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(part content type, part bytes) of a multipart/related body; InputError if malformed.

    A plain ``application/dicom`` body is one part. Parts are sliced out of
    the body without copying headers into a parser: a 300-slice CT is a few
    hundred parts of half a megabyte.
    """
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "application/dicom":
        return [("application/dicom", body)]
    if ctype != "multipart/related":
        raise InputError(f"unsupported content type {ctype!r}: multipart/related; "
                         "type=\"application/dicom\" or application/dicom")
    m = _BOUNDARY.search(content_type)
    if m is None:
        raise InputError("multipart/related without a boundary")
    delim = b"--" + m.group(1).encode("latin-1")
    parts: list[tuple[str, bytes]] = []
    pos = body.find(delim)
    if pos < 0:
        raise InputError("multipart body without its boundary")
    while True:
        pos += len(delim)
        if body[pos:pos + 2] == b"--":
            break
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise InputError("multipart part without headers")
        headers = body[pos:head_end].decode("latin-1")
        nxt = body.find(b"\r\n" + delim, head_end + 4)
        if nxt < 0:
            raise InputError("multipart body not closed by its boundary")
        ptype = "application/dicom"
        for line in headers.split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                ptype = value.split(";")[0].strip().lower()
        parts.append((ptype, body[head_end + 4:nxt]))
        pos = nxt + 2
    return parts


def _uids(part10: bytes) -> dict[str, str]:
    from storage.part10 import scan

    values = scan(part10, ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                           "SeriesInstanceUID"]) or {}
    return {k: str(v) for k, v in values.items() if v}


def _ref(sop_class: str | None, sop_uid: str | None, base: str, study: str | None,
         series: str | None, *, reason: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "00081150": {"vr": "UI", "Value": [sop_class]} if sop_class else {"vr": "UI"},
        "00081155": {"vr": "UI", "Value": [sop_uid]} if sop_uid else {"vr": "UI"},
    }
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    elif study and series and sop_uid:
        item["00081190"] = {"vr": "UR", "Value": [
            f"{base}/studies/{study}/series/{series}/instances/{sop_uid}"]}
    return item


@router.post("/studies", summary="STOW-RS: store instances (same path as C-STORE)")
@router.post("/studies/{study_uid}", summary="STOW-RS into one study", include_in_schema=False)
async def stow(request: Request, user: Admin, study_uid: str | None = None) -> Response:
    ctx: WebContext = request.app.state.ctx
    started = time.monotonic()
    body = await request.body()
    try:
        parts = parse_multipart(body, request.headers.get("content-type", ""))
    except InputError as exc:
        raise HTTPException(415 if "content type" in str(exc) else 400, str(exc)) from exc
    del body
    from starlette.concurrency import run_in_threadpool

    host = request.client.host if request.client else None
    peer = Peer(ae_title=f"STOW:{user.username}"[:16], host=host)
    result = await run_in_threadpool(_store_parts, ctx, parts, peer, study_uid,
                                     str(request.base_url).rstrip("/") + "/dicomweb")
    STOW_SECONDS.observe(time.monotonic() - started)
    ok, failed = result["00081199"]["Value"], result.get("00081198", {}).get("Value", [])
    code = 200 if not failed else (202 if ok else 409)
    if not failed:
        result.pop("00081198", None)
    return JSONResponse(result, status_code=code, media_type=DICOM_JSON)


def _store_parts(ctx: WebContext, parts: list[tuple[str, bytes]], peer: Peer,
                 study_uid: str | None, base: str) -> dict[str, Any]:
    ok: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for ptype, data in parts:
        uids = _uids(data)
        sop_class, sop_uid = uids.get("SOPClassUID"), uids.get("SOPInstanceUID")
        if ptype != "application/dicom":
            failed.append(_ref(sop_class, sop_uid, base, None, None,
                               reason=dimse.BAD_IDENTIFIERS))
            STOW_INSTANCES.labels(f"{dimse.BAD_IDENTIFIERS:04X}").inc()
            continue
        part_study = uids.get("StudyInstanceUID")
        if study_uid is not None and part_study != study_uid:
            # PS3.18 10.5: an instance of another study than the URL's is refused.
            failed.append(_ref(sop_class, sop_uid, base, None, None, reason=0xA900))
            STOW_INSTANCES.labels("A900").inc()
            continue
        try:
            res = ctx.ingestor.ingest(data, transfer_syntax_uid=transfer_syntax(data) or "",
                                      peer=peer)
        except OutOfSpaceError:
            reason = dimse.OUT_OF_RESOURCES
        except InputError:
            reason = dimse.BAD_IDENTIFIERS
        except ConflictError:
            reason = dimse.DUPLICATE_CONFLICT
        except StorageError:
            log.exception("storage failure in STOW-RS", extra={"sop_instance_uid": sop_uid})
            reason = dimse.STORAGE_FAILURE
        else:
            ok.append(_ref(sop_class, sop_uid, base, part_study,
                           uids.get("SeriesInstanceUID")))
            STOW_INSTANCES.labels(res.outcome.value).inc()
            continue
        failed.append(_ref(sop_class, sop_uid, base, None, None, reason=reason))
        STOW_INSTANCES.labels(f"{reason:04X}").inc()
    return {"00081190": {"vr": "UR", "Value": [f"{base}/studies/{study_uid}"]}
            if study_uid else {"vr": "UR"},
            "00081199": {"vr": "SQ", "Value": ok}, "00081198": {"vr": "SQ", "Value": failed}}


# -- QIDO-RS -------------------------------------------------------------------------------


def _el(vr: str, value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": str(value)}]}
    return {"vr": vr, "Value": [value]}


def _page(items: list[Any], offset: int, limit: int | None) -> list[Any]:
    return items[offset:offset + limit] if limit else items[offset:]


Limit = Annotated[int | None, Query(ge=1, le=10000)]
Offset = Annotated[int, Query(ge=0)]


@router.get("/studies", summary="QIDO-RS: search for studies")
def search_studies(request: Request, user: Viewer, limit: Limit = None, offset: Offset = 0
                   ) -> Response:
    ctx: WebContext = request.app.state.ctx
    q = request.query_params
    stmt = select(Study).order_by(Study.id)
    if q.get("StudyInstanceUID"):
        stmt = stmt.where(Study.study_instance_uid.in_(q["StudyInstanceUID"].split(",")))
    if q.get("PatientID") and user.is_admin:
        stmt = stmt.where(Study.patient_id == q["PatientID"])
    if q.get("StudyDate"):
        lo, _, hi = q["StudyDate"].partition("-")
        stmt = stmt.where(Study.study_date >= lo) if lo else stmt
        stmt = stmt.where(Study.study_date <= (hi or lo)) if (hi or "-" not in
                                                              q["StudyDate"]) else stmt
    out = []
    with ctx.db.session() as s:
        counts = {sid: (int(n), int(i or 0), mods) for sid, n, i, mods in s.execute(
            select(Series.study_id, func.count(Series.id), func.sum(Series.instance_count),
                   func.group_concat(Series.modality) if ctx.db.engine.dialect.name == "sqlite"
                   else func.string_agg(Series.modality, ","))
            .group_by(Series.study_id)).all()}
        for st in s.scalars(stmt):
            n_series, n_inst, mods = counts.get(st.id, (0, 0, ""))
            modalities = sorted({m for m in (mods or "").split(",") if m})
            if q.get("ModalitiesInStudy") and q["ModalitiesInStudy"] not in modalities:
                continue
            item = {
                "0020000D": _el("UI", st.study_instance_uid),
                "00080020": _el("DA", st.study_date),
                "00081030": _el("LO", st.study_description),
                "00080061": {"vr": "CS", "Value": modalities} if modalities else {"vr": "CS"},
                "00201206": _el("IS", n_series),
                "00201208": _el("IS", n_inst),
            }
            if user.is_admin:  # identities only for the role that may see them
                item["00100010"] = _el("PN", st.patient_name)
                item["00100020"] = _el("LO", st.patient_id)
                item["00080050"] = _el("SH", st.accession_number)
            out.append(item)
    return JSONResponse(_page(out, offset, limit), media_type=DICOM_JSON)


def _result_series(s: Any, study_uid: str) -> dict[str, list[Output]]:
    grouped: dict[str, list[Output]] = {}
    for o in s.scalars(select(Output).join(Job, Output.job_id == Job.id)
                       .join(Series, Job.series_id == Series.id)
                       .join(Study, Series.study_id == Study.id)
                       .where(Study.study_instance_uid == study_uid)):
        grouped.setdefault(o.series_instance_uid, []).append(o)
    return grouped


@router.get("/studies/{study_uid}/series", summary="QIDO-RS: series of a study (with results)")
def search_series(request: Request, study_uid: str, user: Viewer, limit: Limit = None,
                  offset: Offset = 0) -> Response:
    ctx: WebContext = request.app.state.ctx
    modality = request.query_params.get("Modality")
    out = []
    with ctx.db.session() as s:
        for se in s.scalars(select(Series).join(Study, Series.study_id == Study.id)
                            .where(Study.study_instance_uid == study_uid).order_by(Series.id)):
            out.append({"0020000D": _el("UI", study_uid),
                        "0020000E": _el("UI", se.series_instance_uid),
                        "00080060": _el("CS", se.modality),
                        "00200011": _el("IS", se.series_number),
                        "0008103E": _el("LO", se.series_description),
                        "00201209": _el("IS", se.instance_count)})
        for uid, outs in _result_series(s, study_uid).items():
            kind = outs[0].kind
            out.append({"0020000D": _el("UI", study_uid), "0020000E": _el("UI", uid),
                        "00080060": _el("CS", "PR" if kind == "GSPS" else
                                        ("OT" if kind == "SC" else kind)),
                        "0008103E": _el("LO", f"ainode {kind}"),
                        "00201209": _el("IS", len(outs))})
    if modality:
        out = [o for o in out if o["00080060"].get("Value") == [modality]]
    if not out and not _study_exists(ctx, study_uid):
        raise HTTPException(404, "no such study")
    return JSONResponse(_page(out, offset, limit), media_type=DICOM_JSON)


def _study_exists(ctx: WebContext, study_uid: str) -> bool:
    with ctx.db.session() as s:
        return s.scalar(select(Study.id).where(Study.study_instance_uid == study_uid)) is not None


def _files(ctx: WebContext, study_uid: str, series_uid: str | None = None,
           sop_uid: str | None = None) -> list[tuple[str, str, int | None, Path]]:
    """(SOP class, SOP instance, instance number, path) of received instances and results."""
    found: list[tuple[str, str, int | None, Path]] = []
    with ctx.db.session() as s:
        q = (select(Instance, Series.series_instance_uid).join(Series)
             .join(Study, Series.study_id == Study.id)
             .where(Study.study_instance_uid == study_uid))
        if series_uid:
            q = q.where(Series.series_instance_uid == series_uid)
        if sop_uid:
            q = q.where(Instance.sop_instance_uid == sop_uid)
        for inst, _ in s.execute(q.order_by(Instance.instance_number, Instance.id)).all():
            found.append((inst.sop_class_uid, inst.sop_instance_uid, inst.instance_number,
                          ctx.store.spool_path(inst.path)))
        for uid, outs in _result_series(s, study_uid).items():
            if series_uid and uid != series_uid:
                continue
            for o in outs:
                if sop_uid and o.sop_instance_uid != sop_uid:
                    continue
                found.append((o.sop_class_uid, o.sop_instance_uid, None,
                              ctx.store.result_path(o.path)))
    return found


@router.get("/studies/{study_uid}/series/{series_uid}/instances",
            summary="QIDO-RS: instances of a series")
def search_instances(request: Request, study_uid: str, series_uid: str, user: Viewer,
                     limit: Limit = None, offset: Offset = 0) -> Response:
    ctx: WebContext = request.app.state.ctx
    files = _files(ctx, study_uid, series_uid)
    if not files:
        raise HTTPException(404, "no such series")
    out = [{"0020000D": _el("UI", study_uid), "0020000E": _el("UI", series_uid),
            "00080016": _el("UI", cls), "00080018": _el("UI", sop),
            "00200013": _el("IS", num)} for cls, sop, num, _ in files]
    return JSONResponse(_page(out, offset, limit), media_type=DICOM_JSON)


# -- WADO-RS -------------------------------------------------------------------------------

_WADO_BOUNDARY = "ainode-wado-boundary-7c1f"


def _multipart(paths: list[Path]) -> Iterator[bytes]:
    for p in paths:
        yield (f"--{_WADO_BOUNDARY}\r\nContent-Type: application/dicom\r\n"
               f"Content-Length: {p.stat().st_size}\r\n\r\n").encode()
        with p.open("rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk
        yield b"\r\n"
    yield f"--{_WADO_BOUNDARY}--\r\n".encode()


def _retrieve(request: Request, files: list[tuple[str, str, int | None, Path]]) -> Response:
    if not files:
        raise HTTPException(404, "nothing stored under these UIDs")
    accept = request.headers.get("accept", "*/*")
    if not any(a in accept for a in ("multipart/related", "*/*", "application/dicom")):
        raise HTTPException(406, 'WADO-RS here answers multipart/related; '
                            'type="application/dicom" (the files as stored)')
    paths = [f[3] for f in files]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise HTTPException(410, f"{len(missing)} stored file(s) are gone (spool retention)")
    return StreamingResponse(_multipart(paths), media_type=(
        f'multipart/related; type="application/dicom"; boundary={_WADO_BOUNDARY}'))


@router.get("/studies/{study_uid}", summary="WADO-RS: a whole study (with results)")
def retrieve_study(request: Request, study_uid: str, user: Viewer) -> Response:
    return _retrieve(request, _files(request.app.state.ctx, study_uid))


@router.get("/studies/{study_uid}/series/{series_uid}", summary="WADO-RS: one series")
def retrieve_series(request: Request, study_uid: str, series_uid: str, user: Viewer
                    ) -> Response:
    return _retrieve(request, _files(request.app.state.ctx, study_uid, series_uid))


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
            summary="WADO-RS: one instance")
def retrieve_instance(request: Request, study_uid: str, series_uid: str, sop_uid: str,
                      user: Viewer) -> Response:
    return _retrieve(request, _files(request.app.state.ctx, study_uid, series_uid, sop_uid))
