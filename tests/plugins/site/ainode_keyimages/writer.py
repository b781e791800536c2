"""The ``KOS`` output kind: a Key Object Selection Document flagging the finding's slice.

Registered by importing this module (the ``ainode.writers`` entry point names it).
"""

from __future__ import annotations

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pipelines.dicom_out.registry import WriterContext, writer

__all__ = ["KOS_SOP_CLASS", "write_kos"]

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


@writer("KOS", sop_classes=(KOS_SOP_CLASS,), series_offset=50,
        description="Key Object Selection of the finding's slice (test plug-in)")
def write_kos(ctx: WriterContext) -> pydicom.Dataset | None:
    flagged = {str(f.details.get("sop_instance_uid", "")) for f in ctx.result.findings}
    selected = [ds for ds in ctx.sources if str(ds.SOPInstanceUID) in flagged]
    if not selected:
        return None
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest, referenced_objects=selected,
        description=ctx.result.summary_text[:1024],
    )
    return hd.ko.KeyObjectSelectionDocument(
        evidence=selected, content=content, series_instance_uid=generate_uid(),
        series_number=ctx.series_number, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="ainode-keyimages",
    )
