"""``ainode dataset export``: the hospital's own reader-segmented cases as a training set.

What makes a case: a stored CT or MR series, a DICOM SEG a reader sent to the
node that references it (not one the node wrote), whose segments map to the
training labels (``dataset.segments``: pancreas = 1, lesion = 2, by segment
code or label), and a reference diagnosis (``ainode feedback reference``, or
a CSV given to the export). A series lacking any of these is listed with the
reason and left out.

De-identification is GDCM's ``gdcmanon`` (PS3.15 E.1.1, the Basic Application
Level Confidentiality Profile; Debian's libgdcm-tools), run on copies of the
source instances; the volume is then read from the de-identified files, so
nothing the export holds was read from an identified header. gdcmanon keeps
the original attributes encrypted in the files for a later re-identification;
the key pair lives under ``dataset.deid_dir`` (made on first use), and with the
case -> original UID/ID mapping it stays on the node: the export holds neither,
and de-identified DICOM copies (``--with-dicom``) lose that encrypted sequence.

The layout is what ``pipelines.training.data.find_cases`` reads:
``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz``, ``cases.csv``
(``case_id,diagnosis``) and a ``dataset.json`` describing it.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from sqlalchemy import select

from node.config import NodeConfig
from storage.audit import audit
from storage.db import Database
from storage.errors import ConfigError, InputError
from storage.feedback import latest_references
from storage.filestore import FileStore
from storage.models import Instance, Output, Series, utcnow

__all__ = ["ExportSummary", "deid_dir", "export_dataset"]

log = logging.getLogger(__name__)

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABELS = {"pancreas": 1, "lesion": 2}
ENCRYPTED_ATTRIBUTES = 0x04000500


@dataclass
class ExportSummary:
    out: Path
    cases: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # series UID -> why
    mapping: Path | None = None


def deid_dir(config: NodeConfig) -> Path:
    d = config.dataset.deid_dir
    return Path(d) if d else Path(config.storage.data_dir) / "deid"


def _certificate(folder: Path) -> Path:
    """The de-identification certificate (its private key beside it), made once."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert, key = folder / "deid-cert.pem", folder / "deid-key.pem"
    if not cert.exists():
        openssl = shutil.which("openssl")
        if openssl is None:
            raise ConfigError("openssl is needed once to make the de-identification key")
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", str(key), "-out", str(cert), "-days", "3650",
                        "-subj", "/CN=ainode de-identification"],
                       check=True, capture_output=True, timeout=60)
        key.chmod(0o600)
    return cert


def _gdcmanon(config: NodeConfig, src: Path, dst: Path, cert: Path) -> None:
    tool = shutil.which(config.dataset.gdcmanon)
    if tool is None:
        raise ConfigError(f"{config.dataset.gdcmanon!r} not found: install GDCM's tools "
                          "(Debian: apt-get install libgdcm-tools)")
    done = subprocess.run([tool, "-e", "-c", str(cert), "-i", str(src), "-o", str(dst)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise InputError(f"gdcmanon failed: {(done.stderr or done.stdout).strip()[:300]}")


def _code(item: Any) -> str | None:
    seq = item.get("SegmentedPropertyTypeCodeSequence")
    if not seq:
        return None
    return f"{seq[0].CodingSchemeDesignator}:{seq[0].CodeValue}"


def _segment_labels(seg: pydicom.Dataset, config: NodeConfig) -> dict[int, int]:
    """Segment number -> training label, from ``dataset.segments``."""
    out: dict[int, int] = {}
    for item in seg.SegmentSequence:
        code, label = _code(item), str(item.get("SegmentLabel", "")).strip().lower()
        for name, match in config.dataset.segments.items():
            if code in match.codes or label in {x.lower() for x in match.labels}:
                out[int(item.SegmentNumber)] = LABELS[name]
                break
    return out


def _reader_segs(session: Any, store: FileStore) -> dict[str, Path]:
    """Referenced series UID -> the newest reader-made SEG file stored for it."""
    own = set(session.scalars(select(Output.sop_instance_uid)))
    found: dict[str, Path] = {}
    rows = session.scalars(select(Instance).where(Instance.sop_class_uid == SEG_STORAGE)
                           .order_by(Instance.received_at, Instance.id))
    for inst in rows:
        if inst.sop_instance_uid in own:
            continue
        path = store.spool_path(inst.path)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            ref = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
        except (AttributeError, IndexError, OSError, pydicom.errors.InvalidDicomError):
            log.warning("stored SEG names no referenced series; ignored",
                        extra={"sop_instance_uid": inst.sop_instance_uid})
            continue
        found[ref] = path
    return found


def _csv_diagnoses(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and not {"series_uid", "diagnosis"} <= set(rows[0]):
        raise InputError(f"{path}: needs the columns series_uid and diagnosis")
    return {r["series_uid"].strip(): r["diagnosis"].strip() for r in rows}


def _vocabulary() -> dict[str, str]:
    from pipelines.pancreas.output import TUMOUR_TYPES

    return {t.lower(): t for t in TUMOUR_TYPES}


def _label_volume(seg_path: Path, labels: dict[int, int], uids: list[str],
                  shape: tuple[int, int, int]) -> np.ndarray:
    """The SEG's mapped segments on the source grid (slice order of ``uids``)."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    out = np.zeros(shape, dtype=np.uint8)
    referenced = {str(u[2]) for u in seg.get_source_image_uids()}
    idx = [k for k, uid in enumerate(uids) if uid in referenced]
    if not idx:
        raise InputError("the SEG references none of the series' instances")
    for number, value in sorted(labels.items(), key=lambda kv: kv[1]):  # lesion last
        px = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[uids[k] for k in idx], segment_numbers=[number],
            assert_missing_frames_are_empty=True)
        mask = np.asarray(px)[..., 0] > 0
        for j, k in enumerate(idx):
            out[k][mask[j]] = value
    return out


def export_dataset(db: Database, store: FileStore, config: NodeConfig, out: Path, *,
                   diagnoses_csv: Path | None = None, with_dicom: bool = False,
                   actor: str = "cli") -> ExportSummary:
    """Write every eligible case to ``out`` (MSD layout), de-identified; see the module."""
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} is not empty; export into a new folder")
    summary = ExportSummary(out)
    vocab = _vocabulary()
    extra = _csv_diagnoses(diagnoses_csv)
    secret = deid_dir(config)
    cert = _certificate(secret / "keys")
    mapping_rows: list[dict[str, str]] = []
    with db.session() as s:
        segs = _reader_segs(s, store)
        series_rows = {se.series_instance_uid: se for se in s.scalars(
            select(Series).where(Series.series_instance_uid.in_(list(segs))))}
        refs = latest_references(s, [se.id for se in series_rows.values()])
        todo = []
        for uid, seg_path in sorted(segs.items()):
            se = series_rows.get(uid)
            if se is None:
                summary.skipped[uid] = "the SEG's series was never received"
                continue
            if se.modality not in ("CT", "MR"):
                summary.skipped[uid] = f"modality {se.modality}, not CT or MR"
                continue
            ref = refs.get(se.id)
            dx = ref.diagnosis if ref is not None else extra.get(uid)
            if dx is None:
                summary.skipped[uid] = "no reference diagnosis (feedback or CSV)"
                continue
            word = vocab.get(dx.strip().lower())
            if word is None:
                summary.skipped[uid] = f"diagnosis {dx!r} is none of {sorted(vocab.values())}"
                continue
            paths = [store.spool_path(p) for p in s.scalars(
                select(Instance.path).where(Instance.series_id == se.id)
                .order_by(Instance.instance_number, Instance.id))]
            todo.append((uid, seg_path, word, paths, se.study.study_instance_uid,
                         se.study.patient_id or ""))
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    cases_csv: list[tuple[str, str]] = []
    for n, (uid, seg_path, dx, paths, study_uid, patient_id) in enumerate(todo, start=1):
        case = f"ainode_{n:04d}"
        try:
            row = _export_case(config, case, seg_path, paths, out, cert, with_dicom)
        except InputError as exc:
            summary.skipped[uid] = str(exc)
            continue
        except Exception as exc:  # geometry, an unreadable SEG: this case, not the export
            summary.skipped[uid] = f"{type(exc).__name__}: {exc}"
            continue
        cases_csv.append((case, dx))
        summary.cases.append(case)
        mapping_rows.append({"case_id": case, "series_uid": uid, "study_uid": study_uid,
                             "patient_id": patient_id, **row})
    with (out / "cases.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "diagnosis"])
        w.writerows(cases_csv)
    (out / "dataset.json").write_text(json.dumps({
        "name": "ainode export", "description": "reader-segmented cases of this node, "
        "de-identified (PS3.15 basic profile, gdcmanon)",
        "labels": {"0": "background", "1": "pancreas", "2": "lesion"},
        "numTraining": len(summary.cases), "file_ending": ".nii.gz",
        "training": [{"image": f"./imagesTr/{c}_0000.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                     for c in summary.cases]}, indent=2))
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    summary.mapping = secret / "mappings" / f"export-{stamp}.csv"
    summary.mapping.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with summary.mapping.open("w", newline="") as fh:
        w2 = csv.DictWriter(fh, fieldnames=["case_id", "series_uid", "study_uid",
                                            "patient_id", "deid_series_uid", "deid_study_uid"])
        w2.writeheader()
        w2.writerows(mapping_rows)
    summary.mapping.chmod(0o600)
    with db.session() as s:
        audit(s, "dataset.exported", actor=actor, cases=len(summary.cases),
              skipped=len(summary.skipped), out=str(out), mapping=str(summary.mapping))
    return summary


def _export_case(config: NodeConfig, case: str, seg_path: Path, paths: Iterable[Path],
                 out: Path, cert: Path, with_dicom: bool) -> dict[str, str]:
    import SimpleITK as sitk  # noqa: N813

    from pipelines.volume import load_series

    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    labels = _segment_labels(seg, config)
    if not labels:
        raise InputError("no segment of the SEG maps to pancreas or lesion "
                         "(dataset.segments)")
    with tempfile.TemporaryDirectory(prefix="ainode-deid-") as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        src.mkdir()
        originals: list[str] = []
        for k, p in enumerate(paths):
            shutil.copyfile(p, src / f"{k:05d}.dcm")
            originals.append(str(pydicom.dcmread(p, stop_before_pixels=True,
                                                 specific_tags=["SOPInstanceUID"])
                                 .SOPInstanceUID))
        _gdcmanon(config, src, dst, cert)
        files = sorted(dst.glob("*.dcm"))
        new_to_old: dict[str, str] = {}
        for f, old in zip(files, originals, strict=True):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            if str(ds.get("PatientIdentityRemoved", "")) != "YES":
                raise InputError("gdcmanon did not mark the copy de-identified")
            new_to_old[str(ds.SOPInstanceUID)] = old
        volume = load_series(files)
        uids = [new_to_old[u] for u in volume.sop_instance_uids]
        label = _label_volume(seg_path, labels, uids, volume.shape)
        image = volume.to_sitk()
        lab = sitk.GetImageFromArray(label)
        lab.CopyInformation(image)
        sitk.WriteImage(image, str(out / "imagesTr" / f"{case}_0000.nii.gz"),
                        useCompression=True)
        sitk.WriteImage(lab, str(out / "labelsTr" / f"{case}.nii.gz"), useCompression=True)
        if with_dicom:
            folder = out / "dicom" / case
            folder.mkdir(parents=True)
            for f in files:
                ds = pydicom.dcmread(f)
                if ENCRYPTED_ATTRIBUTES in ds:
                    del ds[ENCRYPTED_ATTRIBUTES]  # re-identification stays on the node
                ds.save_as(folder / f.name, enforce_file_format=True)
        return {"deid_series_uid": volume.series_instance_uid,
                "deid_study_uid": volume.study_instance_uid}
