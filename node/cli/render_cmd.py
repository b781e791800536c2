"""``ainode render SERIES_UID --out DIR``: PNGs of what the radiologist will see.

Why: an engineer checking a result should not need a DICOM viewer. The
slices come from the spool, the outlines from the newest SEG the node wrote
for the series, the text from that job's findings; drawing is the same code
that burns the Secondary Capture overlay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import pydicom
import typer
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from node.cli.context import get
from node.errors import InputError, StorageError
from pipelines.dicom_out.render import Layer, masks_from_seg, render_pngs
from storage.models import Finding, Instance, Job, Output, Series

__all__ = ["render"]


def _sort_key(ds: pydicom.Dataset) -> tuple[float, int]:
    """Position along the slice normal (not InstanceNumber, which may run backwards)."""
    iop = ds.get("ImageOrientationPatient")
    ipp = ds.get("ImagePositionPatient")
    if iop is not None and ipp is not None:
        normal = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
        return float(np.dot(normal, np.array(ipp, float))), 0
    return 0.0, int(ds.get("InstanceNumber") or 0)


def _legend(findings: list[Finding]) -> list[str]:
    lines = []
    for f in sorted(findings, key=lambda f: (f.kind != "patient", f.id)):
        if f.kind == "patient":
            lines.append(f"{f.label}: PDAC probability {f.probability or 0:.2f}")
        else:
            where = f.location or "pancreas region"
            lines.append(f"{f.label}: {where}, {f.diameter_mm or 0:.0f} mm, "
                         f"p={f.probability or 0:.2f}")
    return lines


def render(
    ctx: typer.Context,
    series_uid: Annotated[str, typer.Argument(help="SeriesInstanceUID of a received series")],
    out: Annotated[Path, typer.Option("--out", help="folder for the PNG files")],
    all_slices: Annotated[bool, typer.Option(
        "--all", help="every slice, not only those with an outline")] = False,
) -> None:
    """Write PNG slices of a series with the segmentation outline and the finding text."""
    actx = get(ctx)
    store = actx.filestore()
    with actx.db.session() as s:
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
        legend = _legend(findings)
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
    written = render_pngs(sources, layers, legend, out, all_slices=all_slices)
    typer.echo(f"{len(written)} PNG file(s) written to {out}")
