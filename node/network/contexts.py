"""Presentation contexts the receiver accepts: image storage and verification.

Why an explicit list rather than pynetdicom's ``AllStoragePresentationContexts``:
the node analyses images; an RT plan or a free-text report sent to it is a
routing mistake at the PACS, and refusing it at negotiation tells the sender
at once instead of acknowledging an object nobody will read.

The result objects that travel inside imaging studies (segmentations,
structured measurement reports, presentation states: the node's own and other
AI products') are accepted too: every SOP class a registered writer kind may
have (``pipelines.dicom_out.registry``), so a plug-in writer's objects come
back as well. A PACS that forwards a whole study after the node has answered
sends them back; refusing them would fail the PACS's whole transfer. They are
stored, and routing rules on Modality leave them alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydicom import uid
from pynetdicom import build_context
from pynetdicom.presentation import PresentationContext

from pipelines.dicom_out import registry as writers

__all__ = [
    "IMAGE_STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "prefer_requestor_order",
    "result_storage_sop_classes",
    "supported_contexts",
    "syntax_table",
]

IMAGE_STORAGE_SOP_CLASSES: dict[str, str] = {
    "CTImageStorage": "1.2.840.10008.5.1.4.1.1.2",
    "EnhancedCTImageStorage": "1.2.840.10008.5.1.4.1.1.2.1",
    "LegacyConvertedEnhancedCTImageStorage": "1.2.840.10008.5.1.4.1.1.2.2",
    "MRImageStorage": "1.2.840.10008.5.1.4.1.1.4",
    "EnhancedMRImageStorage": "1.2.840.10008.5.1.4.1.1.4.1",
    "EnhancedMRColorImageStorage": "1.2.840.10008.5.1.4.1.1.4.3",
    "LegacyConvertedEnhancedMRImageStorage": "1.2.840.10008.5.1.4.1.1.4.4",
    "PositronEmissionTomographyImageStorage": "1.2.840.10008.5.1.4.1.1.128",
    "LegacyConvertedEnhancedPETImageStorage": "1.2.840.10008.5.1.4.1.1.128.1",
    "EnhancedPETImageStorage": "1.2.840.10008.5.1.4.1.1.130",
    "NuclearMedicineImageStorage": "1.2.840.10008.5.1.4.1.1.20",
    "SecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7",
    "MultiFrameSingleBitSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.1",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.2",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.3",
    "MultiFrameTrueColorSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.4",
    "ComputedRadiographyImageStorage": "1.2.840.10008.5.1.4.1.1.1",
    "DigitalXRayImageStorageForPresentation": "1.2.840.10008.5.1.4.1.1.1.1",
    "DigitalXRayImageStorageForProcessing": "1.2.840.10008.5.1.4.1.1.1.1.1",
    "DigitalMammographyXRayImageStorageForPresentation": "1.2.840.10008.5.1.4.1.1.1.2",
    "UltrasoundImageStorage": "1.2.840.10008.5.1.4.1.1.6.1",
    "UltrasoundMultiFrameImageStorage": "1.2.840.10008.5.1.4.1.1.3.1",
    "XRayAngiographicImageStorage": "1.2.840.10008.5.1.4.1.1.12.1",
    "EnhancedXAImageStorage": "1.2.840.10008.5.1.4.1.1.12.1.1",
    "XRayRadiofluoroscopicImageStorage": "1.2.840.10008.5.1.4.1.1.12.2",
}



def result_storage_sop_classes() -> tuple[str, ...]:
    """The writer kinds' SOP classes that are not image storage classes already."""
    images = set(IMAGE_STORAGE_SOP_CLASSES.values())
    return tuple(c for c in writers.result_sop_classes() if c not in images)


# Stored as received, never transcoded: the node accepts what scanners send.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
)

VERIFICATION = "1.2.840.10008.1.1"


def supported_contexts() -> list[PresentationContext]:
    """Verification plus every image and result storage class, each with every syntax."""
    contexts = [build_context(VERIFICATION, [uid.ExplicitVRLittleEndian,
                                             uid.ImplicitVRLittleEndian])]
    contexts += [build_context(sop, list(TRANSFER_SYNTAXES))
                 for sop in (*IMAGE_STORAGE_SOP_CLASSES.values(),
                             *result_storage_sop_classes())]
    return contexts


def syntax_table(contexts: Sequence[PresentationContext]) -> dict[str, list[str]]:
    """{abstract syntax: our transfer syntaxes in our order}: what prefer_requestor_order
    needs of the supported contexts, computed once per receiver, not per association."""
    return {str(cx.abstract_syntax): [str(t) for t in cx.transfer_syntax] for cx in contexts}


def prefer_requestor_order(
    requested: Sequence[PresentationContext], ours: Mapping[str, Sequence[str]]
) -> list[PresentationContext]:
    """Our contexts for the requested abstract syntaxes (``ours`` from ``syntax_table``),
    with transfer syntaxes re-ordered to follow the requestor's preference.

    pynetdicom picks the first of *the acceptor's* transfer syntaxes that the
    requestor proposed. A sender that offers one context with ``[JPEG 2000,
    Explicit LE]`` for a JPEG 2000 file would then be asked to decompress
    (dcmtk cannot, and fails the store), and one that offers ``[Explicit LE,
    JPEG 2000]`` for a raw file would be asked to compress. Following the
    requestor's order means the node stores what the sender holds, untouched.
    Only the requested abstract syntaxes are built: the others play no part in
    the negotiation, and building all ~100 (each UID validated) for every
    association was a large part of the cost of one.
    """
    preferred: dict[str, list[str]] = {}
    for cx in requested:
        allowed = ours.get(str(cx.abstract_syntax))
        if allowed is None:
            continue
        order = preferred.setdefault(str(cx.abstract_syntax), [])
        order += [str(t) for t in cx.transfer_syntax if str(t) in allowed and str(t) not in order]
    return [build_context(abstract, first + [t for t in ours[abstract] if t not in first])
            for abstract, first in preferred.items()]
