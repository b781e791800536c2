"""Time and peak memory to write SEG + SR + GSPS for a 512x512x300 CT with two lesions.

Reference, side by side in the same run: highdicom's plain Segmentation
constructor given the whole (300, 512, 512, segments) array and all 300
source images (what a writer does without cropping to the slices that hold
a segment). Source headers are the real Philips phantom CT header repeated
at 300 positions (no pixel data is needed for SEG/SR/GSPS).

    .venv/bin/python bench/bench_writers.py [--runs 3]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.dicom_out.common import fill_tracking_uids
from pipelines.dicom_out.gsps import write_gsps
from pipelines.dicom_out.seg import segment_algorithm, write_seg
from pipelines.dicom_out.sr import write_sr
from pipelines.pancreas.output import Lesion, PancreasReport
from pipelines.results import AlgorithmInfo, AnalysisResult
from tests.support.data import dicom_series_dir

N, ROWS, COLS = 300, 512, 512


def sources() -> list[pydicom.Dataset]:
    first = sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))[0]
    base = pydicom.dcmread(first, stop_before_pixels=True)
    series_uid = hd.UID()
    out = []
    for z in range(N):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = hd.UID()
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = z + 1
        ds.ImagePositionPatient = [-115.0, -115.0, float(z) * 2.0]
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out


def sphere(center: tuple[int, int, int], radius_px: float, zscale: float) -> np.ndarray:
    z, y, x = np.ogrid[:N, :ROWS, :COLS]
    return np.asarray(((z - center[0]) * zscale) ** 2 + (y - center[1]) ** 2
                      + (x - center[2]) ** 2 <= radius_px ** 2)


def result_for(srcs: list[pydicom.Dataset]) -> AnalysisResult:
    pan = np.zeros((N, ROWS, COLS), bool)
    pan[120:200, 220:300, 150:380] = True
    l1 = sphere((150, 260, 200), 25, 2.0 / 0.45)
    l2 = sphere((180, 250, 330), 12, 2.0 / 0.45)
    return fill_tracking_uids(PancreasReport(
        "pancreas-ct", AlgorithmInfo("ainode pancreas-ct", "bench"),
        [str(d.SOPInstanceUID) for d in srcs], 0.9, True, pan, None,
        [Lesion(1, l1, 0.92, 23.0, 5.0, (0, 0, 0), "head", 30.0),
         Lesion(2, l2, 0.7, 11.0, 0.6, (0, 0, 0), "tail", 40.0)],
    ).to_result())


def ours(result: AnalysisResult, srcs: list[pydicom.Dataset]) -> None:
    seg = write_seg(result, srcs)
    write_sr(result, srcs, seg=seg)
    write_gsps(result, srcs)


def ours_seg_only(result: AnalysisResult, srcs: list[pydicom.Dataset]) -> None:
    write_seg(result, srcs)


def reference(result: AnalysisResult, srcs: list[pydicom.Dataset]) -> None:
    pixels = np.stack([s.mask for s in result.segments], axis=-1)
    cat = [hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")] + \
        [hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")] * 2
    typ = [hd.sr.CodedConcept("15776009", "SCT", "Pancreas")] + \
        [hd.sr.CodedConcept("108369006", "SCT", "Neoplasm")] * 2
    descs = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=f"s{i + 1}", segmented_property_category=cat[i],
        segmented_property_type=typ[i], algorithm_type="AUTOMATIC",
        algorithm_identification=segment_algorithm(result)) for i in range(3)]
    hd.seg.Segmentation(
        source_images=srcs, pixel_array=pixels, segmentation_type="BINARY",
        segment_descriptions=descs, series_instance_uid=hd.UID(), series_number=1,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="x",
        manufacturer_model_name="x", software_versions="x", device_serial_number="0",
    )


def measure(fn: Callable[[], None]) -> tuple[float, float]:
    """(seconds, peak MiB): timed without tracemalloc, whose hooks slow Python-heavy code."""
    gc.collect()
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    gc.collect()
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return elapsed, peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    srcs = sources()
    result = result_for(srcs)
    cases: dict[str, Callable[[], None]] = {
        "reference: hd Segmentation, full array": lambda: reference(result, srcs),
        "ainode SEG (cropped to segment slices)": lambda: ours_seg_only(result, srcs),
        "ainode SEG + SR + GSPS": lambda: ours(result, srcs),
    }
    stats: dict[str, tuple[float, float]] = {}
    for name, fn in cases.items():
        runs = [measure(fn) for _ in range(args.runs)]
        stats[name] = (statistics.median(r[0] for r in runs), max(r[1] for r in runs))
    ref_t, ref_m = stats["reference: hd Segmentation, full array"]
    print(f"{N}x{ROWS}x{COLS} source, 2 lesions + pancreas, "
          f"{sum(bool(m.any()) for m in result.segments[0].mask)} pancreas slices; "
          f"median of {args.runs} runs; peak = tracemalloc peak (Python + numpy heap)")
    print(f"{'case':42s} {'time s':>8s} {'x ref':>7s} {'peak MiB':>9s} {'x ref':>7s}")
    for name, (t, m) in stats.items():
        print(f"{name:42s} {t:8.2f} {t / ref_t:7.2f} {m:9.0f} {m / ref_m:7.2f}")


if __name__ == "__main__":
    main()
