"""Which series are not images a pipeline can judge: the one list, for routing and the loader.

Why here, on the ground floor: routing (``node``) skips such a series before
any job exists, and the volume loader (``pipelines.volume``) drops localizer
slices from a series it loads; both must mean the same words by "localizer",
so the words live in the lowest room both import. The test reads routing
attributes as ``storage.ingest.header`` keeps them (plain str, int, float and
lists of those), so it runs on ``Series.attributes`` without opening a file.

What counts as "not an image to analyse", and why each:

* a localizer (scout, topogram, surview): a projection, not a cross-section;
* a Secondary Capture (single- or multi-frame): a screenshot or an exam
  summary, with no patient geometry a volume could be built from;
* a derived image (ImageType value 1 ``DERIVED``): a reformat, a map or a
  processed copy of an acquired series, which the models were not made for
  and which usually duplicates the original series anyway;
* a colour image (RGB, YBR_*, PALETTE COLOR): a rendering or a fused overlay;
* a result object (SEG, SR, presentation states, key object selections and
  the like, or any SOP class this node itself writes): not pixels at all.

Each answer names the attribute and the value that decided it, so routing
can tell an admin why, and so a rule that names that value on purpose can
route the series anyway (see ``node.orchestration``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COLOUR_PHOTOMETRICS",
    "LOCALIZER_WORDS",
    "NON_IMAGE_MODALITIES",
    "SECONDARY_CAPTURE_CLASSES",
    "NotAnImage",
    "image_type_words",
    "is_localizer_type",
    "not_an_image",
]

# Words scanners put in ImageType for a planning projection (any value, any position).
LOCALIZER_WORDS: frozenset[str] = frozenset(
    {"LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM", "SURVIEW"})

# Secondary Capture Image Storage and the four multi-frame SC classes (PS3.4 B.5).
SECONDARY_CAPTURE_CLASSES: Mapping[str, str] = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
}

# Modalities (PS3.3 C.7.3.1.1.1) whose objects carry no image to analyse.
NON_IMAGE_MODALITIES: frozenset[str] = frozenset(
    {"SEG", "SR", "PR", "KO", "REG", "RTSTRUCT", "RTPLAN", "RTRECORD", "DOC"})

# Photometric interpretations of colour pixel data (PS3.3 C.7.6.3.1.2).
COLOUR_PHOTOMETRICS: frozenset[str] = frozenset(
    {"RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422",
     "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "ARGB", "CMYK", "HSV"})


@dataclass(frozen=True, slots=True)
class NotAnImage:
    """Why a series is not routed to a pipeline: what it is, and what said so."""

    kind: str  # "localizer", "secondary capture", "derived", "colour", "result object"
    keyword: str  # the attribute that decided it
    value: str  # the value of that attribute that decided it
    reason: str  # one sentence for the audit log and the series row

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "keyword": self.keyword, "value": self.value,
                "reason": self.reason}


def image_type_words(image_type: Any) -> set[str]:
    """The upper-case words of an ImageType value, one string or several values.

    ``SURVIEW_IMAGE`` and ``LOCALIZER`` both yield their word: vendors join
    words with underscores and spaces alike, and a value kept as one string
    (``ORIGINAL\\PRIMARY\\LOCALIZER``) is split where DICOM splits it.
    """
    if image_type is None:
        return set()
    values = [image_type] if isinstance(image_type, str | bytes) else list(image_type)
    words: set[str] = set()
    for v in values:
        text = v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)
        words.update(text.upper().replace("_", " ").replace("\\", " ").split())
    return words


def is_localizer_type(image_type: Any) -> bool:
    """True when an ImageType (or FrameType) value names a localizer."""
    return bool(image_type_words(image_type) & LOCALIZER_WORDS)


_BACKSLASH = "\\"  # how DICOM writes several values; no backslash in an f-string before 3.12


def _values(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split("\\")]
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def not_an_image(attributes: Mapping[str, Any], *,
                 result_sop_classes: Collection[str] = ()) -> NotAnImage | None:
    """Why the series these routing attributes describe is no image to analyse, or None.

    ``attributes`` are keyword -> value as ``storage.ingest.header`` keeps
    them. ``result_sop_classes`` are the SOP classes the caller's own writers
    produce (the node's results coming back with a study). An attribute that
    is absent never makes a series a non-image: a sparse header is routed as
    before and left to the volume loader.
    """
    sop_class = str(attributes.get("SOPClassUID") or "").strip()
    modality = str(attributes.get("Modality") or "").strip().upper()
    if sop_class in SECONDARY_CAPTURE_CLASSES:
        return NotAnImage("secondary capture", "SOPClassUID", sop_class,
                          f"a {SECONDARY_CAPTURE_CLASSES[sop_class]} object "
                          f"(SOP class {sop_class}), not an acquired image series")
    if sop_class in result_sop_classes:
        return NotAnImage("result object", "SOPClassUID", sop_class,
                          f"a result object (SOP class {sop_class}, modality "
                          f"{modality or 'none'}), not an image series")
    if modality in NON_IMAGE_MODALITIES:
        return NotAnImage("result object", "Modality", modality,
                          f"a {modality} object, not an image series")
    image_type = attributes.get("ImageType")
    words = image_type_words(image_type) & LOCALIZER_WORDS
    if words:
        return NotAnImage("localizer", "ImageType", sorted(words)[0],
                          f"a localizer (ImageType {_BACKSLASH.join(_values(image_type))}), "
                          "not a cross-sectional series")
    kinds = _values(image_type)
    if kinds and kinds[0].upper() == "DERIVED":
        return NotAnImage("derived", "ImageType", "DERIVED",
                          f"a derived image (ImageType {_BACKSLASH.join(kinds)}), "
                          "not an acquired one")
    photometric = str(attributes.get("PhotometricInterpretation") or "").strip().upper()
    if photometric in COLOUR_PHOTOMETRICS:
        return NotAnImage("colour", "PhotometricInterpretation", photometric,
                          f"a colour image (PhotometricInterpretation {photometric}), "
                          "not a greyscale acquisition")
    return None
