"""Benchmark: the whole pancreas-ct pipeline on a 512x512x300 CT, and the 2D classifier.

One command (``make bench-pipeline``). Each measurement runs in its own child
process so its peak memory (ru_maxrss) is its own. Reference, side by side:
the same stage-2 network slid over the *whole* CT (a single-stage design),
which is what the two-stage ROI saves. Prints a table and the ratios.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE_ZYX = (300, 512, 512)


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


def one(kind: str, threads: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    from pipelines.pancreas import build_pipeline

    pipe = build_pipeline("pancreas-ct", device="cpu")
    img = _ct()
    out: dict[str, float] = {"threads": float(torch.get_num_threads())}
    c0, t0 = time.process_time(), time.perf_counter()
    if kind == "pipeline":
        res = pipe.run(img)
        out.update({f"{k}": float(v) for k, v in res.provenance["timings"].items()})
        out["lesions"] = float(len(res.finding_segments()))
    elif kind == "single-stage":
        from monai.inferers import sliding_window_inference

        x, _ = pipe._prepare(img, pipe.stage2, None)  # whole CT at the stage-2 spacing
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
    return out


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 3
    rows: dict[str, list[dict[str, float]]] = {}
    for kind, threads in (("pipeline", 2), ("pipeline", 1), ("single-stage", 2), ("slice", 2),
                          ("slice", 1)):
        key = f"{kind} ({threads} thr)"
        for _ in range(runs if kind != "single-stage" else 1):
            p = subprocess.run([sys.executable, __file__, "--one", kind, str(threads)],
                               capture_output=True, text=True, check=True, cwd=ROOT)
            rows.setdefault(key, []).append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"CT {SHAPE_ZYX[2]}x{SHAPE_ZYX[1]}x{SHAPE_ZYX[0]}; median of {runs} runs "
          "(single-stage reference: 1 run)")
    print(f"{'measurement':<24}{'wall s':>9}{'cpu s':>9}{'peak MB':>9}  details")
    med: dict[str, dict[str, float]] = {}
    for key, rs in rows.items():
        m = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        med[key] = m
        extra = ", ".join(f"{k}={v:.3g}" for k, v in m.items()
                          if k not in ("wall_s", "cpu_s", "peak_mb"))
        print(f"{key:<24}{m['wall_s']:>9.2f}{m['cpu_s']:>9.2f}{m['peak_mb']:>9.0f}  {extra}")
    ss, pl = med["single-stage (2 thr)"], med["pipeline (2 thr)"]
    print(f"ratio single-stage / two-stage wall time: {ss['wall_s'] / pl['wall_s']:.1f}x")
    print(f"ratio 1 thread / 2 threads (pipeline): "
          f"{med['pipeline (1 thr)']['wall_s'] / pl['wall_s']:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
