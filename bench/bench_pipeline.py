"""Benchmark: the whole pancreas-ct pipeline on a 512x512x300 CT, old code against new.

One command (``make bench-pipeline``; ``python bench/bench_pipeline.py [RUNS]
[--base REF] [--threads 2,1] [--no-extras]``). The base design is the code of
git commit ``REF`` (default 7608efa, the 2.0 GB peak), exported with ``git
archive`` into a temporary folder; the new one is this working tree. Both run
the same input: one CT made once (a phantom resampled onto 512x512x300 at
0.59 x 0.47 x 0.45 mm) and written to a temporary .mha file. Every
measurement runs in its own child process, so its peak memory (ru_maxrss,
the process's peak RSS: torch, the models, the 300 MB input and everything
the run allocates) is its own; old and new runs alternate, so a load change
on a shared machine hits both. Each child also hashes what the pipeline
returned (the gland mask, the lesion map, each lesion mask, the score) so the
table says whether the two designs give the same outputs.

Extras (the current code only, skipped by ``--no-extras``): the stage-2
network slid over the *whole* CT (the single-stage design the two-stage ROI
replaces) and the 2D slice classifier.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHAPE_ZYX = (300, 512, 512)
DEFAULT_BASE = "7608efa"


def _ct():  # type: ignore[no-untyped-def]
    """A phantom resampled onto a 512x512x300 grid (0.59 x 0.47 x 0.45 mm)."""
    import SimpleITK as sitk  # noqa: N813

    from pipelines.phantom import PhantomSpec, generate, phantom_to_sitk

    img, _ = phantom_to_sitk(generate(PhantomSpec(seed=2024, diagnosis="PDAC",
                                                  lesion_diameter_mm=25.0)))
    size = [SHAPE_ZYX[2], SHAPE_ZYX[1], SHAPE_ZYX[0]]
    phys = [sz * sp for sz, sp in zip(img.GetSize(), img.GetSpacing(), strict=True)]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([p / s for p, s in zip(phys, size, strict=True)])
    ref.SetOrigin(img.GetOrigin())
    return sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _sha(a: Any) -> str:
    import numpy as np

    a = np.ascontiguousarray(a)
    return f"{a.dtype}{list(a.shape)}:{hashlib.sha256(memoryview(a).cast('B')).hexdigest()[:16]}"


def _outputs(res: Any) -> dict[str, str]:
    """What the pipeline returned, hashed: the result of this tree or of the base commit."""
    out: dict[str, str] = {}
    if hasattr(res, "segments"):  # the generic AnalysisResult (segments and findings)
        for seg in res.segments:
            out[f"mask:{seg.key}"] = _sha(seg.mask)
            if seg.probability is not None:
                out["lesion_probability"] = _sha(seg.probability)
        patient = [f for f in res.findings if f.kind == "patient"]
        out["patient_score"] = repr(round(float(patient[0].probability), 6)) if patient else ""
        out["status"] = str(getattr(res, "status", ""))
    else:  # 7608efa: the pancreas fields on the result itself
        if res.pancreas_mask is not None:
            out["mask:pancreas"] = _sha(res.pancreas_mask)
        for les in res.lesions:
            out[f"mask:lesion-{les.index}"] = _sha(les.mask)
        if res.lesions and res.lesion_probability is not None:
            out["lesion_probability"] = _sha(res.lesion_probability)
        out["patient_score"] = repr(round(float(res.patient_score), 6))
        out["status"] = "assessed" if res.pancreas_found else "not_assessable"
    return out


def one(kind: str, threads: int, code: Path, ct: Path) -> dict[str, Any]:
    """One measurement in this (child) process, with the ``pipelines`` package of ``code``."""
    sys.path.insert(0, str(code))
    import SimpleITK as sitk  # noqa: N813
    import torch

    torch.set_num_threads(threads)
    import pipelines
    from pipelines.pancreas import build_pipeline

    if not Path(pipelines.__file__).resolve().is_relative_to(code.resolve()):
        raise SystemExit(f"pipelines came from {pipelines.__file__}, not {code}")
    pipe = build_pipeline("pancreas-ct", device="cpu")
    img = sitk.ReadImage(str(ct))
    gc.collect()
    out: dict[str, Any] = {"threads": float(torch.get_num_threads()), "rss_before_mb": _rss_mb()}
    c0, t0 = time.process_time(), time.perf_counter()
    res = None
    if kind == "pipeline":
        res = pipe.run(img)
        out.update({f"{k}": float(v) for k, v in res.provenance["timings"].items()})
    elif kind == "single-stage":
        from monai.inferers import sliding_window_inference

        from pipelines.pancreas.preprocess import model_input

        x, _ = model_input(img, pipe.stage2)  # the whole CT at the stage-2 spacing
        with torch.inference_mode():
            sliding_window_inference(x, tuple(pipe.stage2.manifest.input.patch_size), 1,
                                     lambda p: pipe.stage2.module(p)[0], overlap=0.5,
                                     mode="gaussian")
    elif kind == "slice":
        net = pipe.slice_model.module  # type: ignore[union-attr]
        batch = torch.rand(32, 3, 150, 150)
        with torch.inference_mode():
            net(batch[:4])  # warm-up
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(3):
                net(batch)
        wall = time.perf_counter() - t0
        out["ms_per_slice"] = 1000.0 * wall / (3 * 32)
    out["wall_s"] = time.perf_counter() - t0
    out["cpu_s"] = time.process_time() - c0
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out["work_mb"] = out["peak_mb"] - out["rss_before_mb"]
    if res is not None:  # hashed after the peak was read: hashing allocates nothing large
        out["outputs"] = _outputs(res)
    return out


def _child(kind: str, threads: int, code: Path, ct: Path) -> dict[str, Any]:
    p = subprocess.run([sys.executable, __file__, "--one", kind, str(threads), str(code),
                        str(ct)], capture_output=True, text=True, cwd=code)
    if p.returncode:
        raise SystemExit(f"{kind} ({code}) failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _export(ref: str, into: Path) -> str:
    """The tree of commit ``ref`` in ``into`` (git archive); returns the short hash."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", f"{ref}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    with subprocess.Popen(["git", "-C", str(ROOT), "archive", sha],
                          stdout=subprocess.PIPE) as git:
        assert git.stdout is not None
        with tarfile.open(fileobj=git.stdout, mode="r|") as tar:
            tar.extractall(into, filter="data")
    if git.returncode:
        raise SystemExit(f"git archive {ref} failed")
    return sha


def _median(rs: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, v in rs[0].items() if isinstance(v, float)]
    return {k: statistics.median(r[k] for r in rs) for k in keys}


def _row(name: str, m: dict[str, float], runs: list[dict[str, Any]]) -> str:
    stages = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in m.items()
                       if k.endswith("_s") and k not in ("wall_s", "cpu_s"))
    walls = "/".join(f"{r['wall_s']:.2f}" for r in runs)
    return (f"{name:<30}{m['wall_s']:>8.2f}{m['cpu_s']:>8.2f}{m['peak_mb']:>9.0f}"
            f"{m['work_mb']:>9.0f}  runs {walls}; {stages}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="?", type=int, default=3)
    ap.add_argument("--base", default=DEFAULT_BASE, help="git commit of the old design")
    ap.add_argument("--threads", default="2", help="comma-separated torch thread counts")
    ap.add_argument("--no-extras", action="store_true",
                    help="skip the single-stage reference and the slice classifier")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        ct = Path(tmp) / "ct.mha"
        import SimpleITK as sitk  # noqa: N813

        sitk.WriteImage(_ct(), str(ct))  # uncompressed: reading it costs the children little
        base_dir = Path(tmp) / "base"
        base = _export(args.base, base_dir)
        variants = {f"old ({base})": base_dir, "new (this tree)": ROOT}
        rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in range(args.runs):
            order = list(variants.items())
            for name, code in order if r % 2 == 0 else order[::-1]:
                for t in threads:
                    rows.setdefault((name, t), []).append(_child("pipeline", t, code, ct))
        extras: dict[str, list[dict[str, Any]]] = {}
        if not args.no_extras:
            extras["single-stage ref., new"] = [_child("single-stage", 2, ROOT, ct)]
            for t in (2, 1):
                extras[f"slice classifier, {t} thr"] = [_child("slice", t, ROOT, ct)
                                                        for _ in range(args.runs)]
    print(f"pancreas-ct on a CT of {SHAPE_ZYX[2]}x{SHAPE_ZYX[1]}x{SHAPE_ZYX[0]}, median of "
          f"{args.runs} runs per row (old and new alternating); peak = the child's peak RSS, "
          "work = peak minus RSS before the run (torch, models and the 300 MB input loaded)")
    print(f"{'measurement':<30}{'wall s':>8}{'cpu s':>8}{'peak MB':>9}{'work MB':>9}  details")
    med = {key: _median(rs) for key, rs in rows.items()}
    names = list(variants)
    for t in threads:
        for name in names:
            print(_row(f"{name}, {t} thr", med[(name, t)], rows[(name, t)]))
    for t in threads:
        old, new = med[(names[0], t)], med[(names[1], t)]
        outs = {json.dumps(r.get("outputs"), sort_keys=True)
                for name in names for r in rows[(name, t)]}
        same = "identical" if len(outs) == 1 else "differ"
        print(f"ratio new/old, {t} thr: wall {new['wall_s'] / old['wall_s']:.2f}x, "
              f"cpu {new['cpu_s'] / old['cpu_s']:.2f}x, peak {new['peak_mb'] / old['peak_mb']:.2f}x"
              f", work {new['work_mb'] / old['work_mb']:.2f}x; outputs of every run {same}")
        if len(outs) > 1:
            for name in names:
                o = rows[(name, t)][0].get("outputs", {})
                print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in sorted(o.items())))
    for key, rs in extras.items():
        m = _median(rs)
        extra = f"  {m['ms_per_slice']:.1f} ms/slice" if "ms_per_slice" in m else ""
        print(f"{key:<30}{m['wall_s']:>8.2f}{m['cpu_s']:>8.2f}{m['peak_mb']:>9.0f}"
              f"{m['work_mb']:>9.0f}{extra}")
    if "single-stage ref., new" in extras and (names[1], 2) in med:
        ss = extras["single-stage ref., new"][0]["wall_s"]
        print(f"ratio single-stage / two-stage (new, 2 thr) wall time: "
              f"{ss / med[(names[1], 2)]['wall_s']:.1f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]),
                             Path(sys.argv[5]))))
    else:
        main()
