"""Drift statistics on phantom streams: a shifted stream alerts, an unshifted one does not.

The shift is the scanner's: extra image noise (a noisier protocol) and an
unenhanced-like contrast phase (organ enhancement halved). Seeded and small.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.evaluation.drift import compare, intensity_descriptors, psi
from pipelines.phantom.generator import PhantomSpec, generate


def _record(seed: int, *, noise: float = 0.0, phase: float = 1.0) -> dict[str, object]:
    ph = generate(PhantomSpec(seed=seed, contrast="ct", spacing=(1.5, 1.5, 3.0)))
    img = ph.image.astype(np.float64)
    organ = ph.label > 0
    img[organ] = 45.0 + (img[organ] - 45.0) * phase
    if noise:
        img = img + np.random.default_rng(seed + 10_000).normal(0.0, noise, img.shape)
    d = intensity_descriptors(img, ph.label)
    # A compact feature summary: the organ's intensity histogram (8 bins) stands in for
    # encoder features here, so that the test needs no network run.
    hist = np.histogram(img[organ], bins=8, range=(-100, 300))[0] / max(int(organ.sum()), 1)
    return {"series": f"1.2.826.0.1.{seed}", "descriptors": d, "features": hist.tolist()}


@pytest.fixture(scope="module")
def reference() -> list[dict[str, object]]:
    return [_record(s) for s in range(100, 116)]


def test_unshifted_stream_raises_no_alert(reference: list[dict[str, object]]) -> None:
    rep = compare(reference, [_record(s) for s in range(200, 212)], seed=1)
    print("unshifted", rep.descriptors, rep.feature_mmd, rep.feature_mmd_p)
    assert rep.alerts == []


def test_shifted_stream_alerts(reference: list[dict[str, object]]) -> None:
    rep = compare(reference, [_record(s, noise=40.0, phase=0.5) for s in range(300, 312)], seed=1)
    print("shifted", rep.descriptors, rep.feature_mmd, rep.feature_mmd_p)
    assert any(a.startswith("organ_") for a in rep.alerts)
    assert rep.feature_mmd_p is not None and rep.feature_mmd_p < 0.01


def test_psi_is_zero_on_the_same_sample_and_grows_with_shift() -> None:
    x = np.random.default_rng(0).normal(size=500)
    assert psi(x, x) < 1e-6
    assert psi(x, x + 0.5) < psi(x, x + 2.0)
