"""Benchmark: load (and preprocess) a 512x512x300 CT series, against SimpleITK's series reader.

One command:  .venv/bin/python bench/bench_preprocess.py [--runs 3] [--uncompressed]

Preprocessing is measured as a job runs it: ``pipelines.preprocess.ModelInput`` of
the shipped CT stage-1 package's input contract (whole scan to 3 mm, ``ct_pancreas``
intensities), and the declared ``ct_pancreas`` preset at 0.8x0.8x2 mm (reorient,
resample, the same intensities) as the cost of a fine model grid.

The series is built in a temp dir from the 20 real slices of ct_abdomen_siemens
(JPEG 2000 lossless as received; --uncompressed stores them decoded), repeated
to 300 slices at 2 mm with fresh UIDs. Every measurement runs in a fresh child
process so peak memory (ru_maxrss) belongs to that measurement alone; the RSS
after imports is reported too, so the working memory is peak minus base.
Reported: median wall time over the runs and the ratio to SimpleITK's plain
ImageSeriesReader (GDCM ordering included, as a node would have to do it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLICES = 300


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _child(mode: str, folder: Path) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    sys.path.insert(0, str(ROOT))
    import SimpleITK as sitk  # noqa: N813

    if mode != "sitk":
        from pipelines.models.package import read_manifest
        from pipelines.pancreas.model import SHIPPED_WEIGHTS
        from pipelines.preprocess import ModelInput, ct_pancreas
        from pipelines.volume import load_series

        stage1 = ModelInput.of(read_manifest(SHIPPED_WEIGHTS / "pancreas-ct-stage1").input)
    base = _rss_mb()
    started = time.perf_counter()
    if mode == "sitk":
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        image = reader.Execute()
        shape = list(reversed(image.GetSize()))
    else:
        volume = load_series(sorted(folder.iterdir()))
        shape = list(volume.shape)
        if mode == "load+stage1":
            shape = list(stage1.forward(volume.to_sitk()).array().shape)
        if mode == "load+ct_pancreas":
            image, _ = ct_pancreas().forward(volume)
            shape = list(reversed(image.GetSize()))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "base_mb": base, "shape": shape}))


def _build_series(folder: Path, uncompressed: bool) -> None:
    sys.path.insert(0, str(ROOT))
    import pydicom
    from pydicom.uid import generate_uid

    from tests.support.data import dicom_series_dir

    sources = sorted(dicom_series_dir("ct_abdomen_siemens").iterdir())
    study, series = (
        generate_uid(entropy_srcs=["bench-study"]),
        generate_uid(entropy_srcs=["bench-series"]),
    )
    for k in range(SLICES):
        ds = pydicom.dcmread(sources[k % len(sources)])
        if uncompressed:
            ds.decompress()
        uid = generate_uid(entropy_srcs=["bench", str(k)])
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, -804.5 + 2.0 * k]
        ds.InstanceNumber = SLICES - k
        ds.save_as(folder / f"{k:04d}.dcm")


def _measure(mode: str, folder: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(folder)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--uncompressed", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], Path(args.child[1]))
        return

    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        folder = Path(tmp)
        _build_series(folder, args.uncompressed)
        modes = ["sitk", "load", "load+stage1", "load+ct_pancreas"]
        results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for _ in range(args.runs):  # interleaved, so drift hits every mode alike
            for mode in modes:
                results[mode].append(_measure(mode, folder))

    syntax = "explicit VR LE" if args.uncompressed else "JPEG 2000 lossless"
    print(
        f"512x512x{SLICES} CT ({syntax}), {args.runs} runs each, median; "
        f"{os.cpu_count()} CPUs, no GPU"
    )
    ref_t = statistics.median(r["seconds"] for r in results["sitk"])
    ref_m = statistics.median(r["peak_mb"] - r["base_mb"] for r in results["sitk"])
    print(f"{'what':<40} {'time s':>8} {'ratio':>6} {'peak MB':>8} {'work MB':>8} {'ratio':>6}")
    for mode in modes:
        t = statistics.median(r["seconds"] for r in results[mode])
        peak = statistics.median(r["peak_mb"] for r in results[mode])
        work = statistics.median(r["peak_mb"] - r["base_mb"] for r in results[mode])
        label = {
            "sitk": "SimpleITK ImageSeriesReader (reference)",
            "load": "pipelines.volume.load_series",
            "load+stage1": "load_series + CT stage-1 input (3 mm)",
            "load+ct_pancreas": "load_series + ct_pancreas (0.8x0.8x2 mm)",
        }[mode]
        print(
            f"{label:<40} {t:>8.2f} {t / ref_t:>6.2f} {peak:>8.0f} {work:>8.0f} "
            f"{work / ref_m:>6.2f}"
        )
    print(f"stage-1 input shape (z, y, x): {results['load+stage1'][0]['shape']}")
    print(f"ct_pancreas 0.8 mm shape (z, y, x): {results['load+ct_pancreas'][0]['shape']}")


if __name__ == "__main__":
    main()
