"""PNG slices of a received series with the node's outlines and finding text.

When the node wrote evidence maps for it (PMAP, for a destination that takes
them), the slices they cover are rendered too, as the evidence SC shows them
(``evidence_*.png``).

Why: an engineer checking a result should not need a DICOM viewer. The slices
come from the spool, the outlines from the newest SEG the node wrote for the
series, the text from that job's findings; drawing is the same code that
burns the Secondary Capture overlay. Used by ``ainode render`` and the demo.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from storage.db import Database
from storage.errors import InputError, StorageError
from storage.filestore import FileStore
from storage.models import Finding, Instance, Job, Output, Series

__all__ = ["legend_lines", "render_series"]


def _sort_key(ds: pydicom.Dataset) -> tuple[float, int]:
    """Position along the slice normal (not InstanceNumber, which may run backwards)."""
    iop = ds.get("ImageOrientationPatient")
    ipp = ds.get("ImagePositionPatient")
    if iop is not None and ipp is not None:
        normal = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
        return float(np.dot(normal, np.array(ipp, float))), 0
    return 0.0, int(ds.get("InstanceNumber") or 0)


def legend_lines(findings: list[Finding]) -> list[str]:
    """Series-level findings first; each in the pipeline's own legend words when it gave them.

    Those are the Secondary Capture's legend lines (node.findings keeps them in
    the row's details), so a PNG says what the SC says; rows without them are
    worded from their columns.
    """
    lines = []
    for f in sorted(findings, key=lambda f: (f.kind != "patient", f.id)):
        given = (f.details or {}).get("legend")
        prob = f"{f.probability:.2f}" if f.probability is not None else "n/a"
        if given:
            lines.append(str(given))
        elif f.kind == "patient":
            lines.append(f"{f.label}: {prob}")
        else:
            where = f" in {f.location}" if f.location else ""
            size = f"{f.diameter_mm:.0f} mm" if f.diameter_mm is not None else "size n/a"
            lines.append(f"{f.label[:1].upper()}{f.label[1:]}{where}, {size}, probability {prob}")
    return lines


def _render_evidence(store: FileStore, pmap_paths: list[str],
                     sources: Sequence[pydicom.Dataset], legend: list[str],
                     out: Path) -> list[Path]:
    """The evidence PNGs (``evidence_*.png``) from the job's Parametric Maps, if it wrote any."""
    if not pmap_paths:
        return []
    from pipelines.dicom_out.evidence import read_pmap, render_evidence_pngs

    maps = [read_pmap(pydicom.dcmread(store.result_path(p))) for p in pmap_paths]
    return render_evidence_pngs(sources, maps, legend, out)


def render_series(db: Database, store: FileStore, series_uid: str, out: Path, *,
                  all_slices: bool = False) -> list[Path]:
    """Write the PNGs; returns their paths. InputError for an unknown or empty series."""
    from pipelines.dicom_out.render import Layer, masks_from_seg, render_pngs
    from pipelines.dicom_out.sc import NOT_FOR_DIAGNOSIS

    with db.session() as s:
        series = s.scalars(select(Series).where(Series.series_instance_uid == series_uid)
                           ).one_or_none()
        if series is None:
            raise InputError(f"no series {series_uid!r} in the database")
        paths = [i.path for i in s.scalars(select(Instance).where(Instance.series_id ==
                                                                    series.id))]
        seg_row = s.execute(
            select(Output, Job).join(Job, Output.job_id == Job.id)
            .where(Job.series_id == series.id, Output.kind == "SEG")
            .order_by(Output.created_at.desc(), Output.id.desc()).limit(1)
        ).first()
        seg_path = seg_row[0].path if seg_row else None
        findings = list(s.scalars(select(Finding).where(Finding.job_id == seg_row[1].id))
                        ) if seg_row else []
        legend = legend_lines(findings)
        # The evidence maps of the newest job that wrote any (a destination took PMAP).
        pmap_job = s.scalars(
            select(Output.job_id).join(Job, Output.job_id == Job.id)
            .where(Job.series_id == series.id, Output.kind == "PMAP")
            .order_by(Output.created_at.desc(), Output.id.desc()).limit(1)).first()
        pmap_paths = [o.path for o in s.scalars(
            select(Output).where(Output.job_id == pmap_job, Output.kind == "PMAP")
            .order_by(Output.id))] if pmap_job is not None else []
    if not paths:
        raise InputError(f"series {series_uid} has no stored instances")
    try:
        sources = sorted((pydicom.dcmread(store.spool_path(p)) for p in paths), key=_sort_key)
    except (OSError, InvalidDicomError) as exc:
        raise StorageError(f"cannot read an instance of {series_uid}: {exc}") from exc
    layers: list[Layer] = []
    if seg_path is not None:
        seg = pydicom.dcmread(store.result_path(seg_path))
        layers = masks_from_seg(seg, [str(d.SOPInstanceUID) for d in sources])
        if not legend:
            legend = [layer.label for layer in layers]
    else:
        legend = ["no segmentation written for this series"]
        all_slices = True
    legend = [NOT_FOR_DIAGNOSIS, *legend]  # as on the Secondary Capture
    try:
        written = list(render_pngs(sources, layers, legend, out, all_slices=all_slices))
        return written + _render_evidence(store, pmap_paths, sources, legend, out)
    except InputError as exc:
        # The writer names the instance and its transfer syntax; the operator asked for a
        # series, so the line names that too.
        raise InputError(f"cannot render series {series_uid}: {exc}"[:400]) from exc
    except (ValueError, AttributeError) as exc:
        # Pixel data pydicom cannot decode (stored before the receiver checked its
        # length, or by another writer): one line and an exit code, not a traceback.
        raise InputError(f"cannot render series {series_uid}: pixel data cannot be decoded "
                         f"({exc})"[:300]) from exc
