"""The two-stage pancreas pipeline (plus the optional slice classifier): the models' room.

Stage 1 finds the gland on the whole scan at low resolution; its box plus a
margin in mm is the region of interest. Stage 2 looks only at that region at
high resolution, with sliding windows blended by a Gaussian, for a lesion map
and the tumour type. Everything the writers need is mapped back onto the
*source* grid, so each mask frame refers to the slice it was drawn on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from pipelines.models.package import LoadedModel, load_package
from pipelines.pancreas.applicability import (
    Applicability,
    CoarseView,
    anatomy_check,
    coarse_view,
    competence_check,
    series_check,
)
from pipelines.pancreas.candidates import (
    Candidate,
    ScoreMode,
    combine_score,
    extract_candidates,
)
from pipelines.pancreas.measures import (
    centroid_lps,
    long_axis_diameter_mm,
    pancreas_location,
    volume_ml,
    voxel_to_lps,
)
from pipelines.pancreas.output import TUMOUR_TYPES, Lesion, PancreasReport
from pipelines.pancreas.preprocess import model_input, slice_roi, slice_stack, stage2_roi
from pipelines.pancreas.quality import input_descriptors
from pipelines.preprocess import pixels, resample_like
from pipelines.results import AlgorithmInfo, AnalysisResult
from storage.errors import ModelError, PipelineError

log = logging.getLogger(__name__)

__all__ = ["SHIPPED_WEIGHTS", "PancreasPipeline", "PipelineSettings", "SeriesInfo"]

SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


@dataclass(frozen=True)
class PipelineSettings:
    margin_mm: float = 10.0
    pancreas_threshold: float = 0.5
    min_pancreas_ml: float = 1.0
    overlap: float = 0.5
    # PANORAMA's reference extraction keeps 40% of each peak; the demo weights' maps are
    # peakier, and 20% matched lesion extents better on a validation phantom set
    # (seeds 800000-800029: AP 0.64 -> 0.67, sensitivity >= 10 mm 0.76 -> 0.82).
    candidate_fraction: float = 0.2
    min_confidence: float = 0.1
    max_lesions: int = 5
    min_lesion_voxels: int = 2
    score_mode: ScoreMode = "mean"
    slice_hierarchical: bool = False
    slice_top_k: int = 3
    # A lesion candidate is reported only if it lies within this distance (mm) of the
    # predicted pancreas, i.e. overlaps the gland dilated by it: a tumour grows from the
    # gland and may bulge beyond its outline, but a "lesion" a few cm away is not one.
    lesion_margin_mm: float = 10.0
    # The applicability step (pipelines.pancreas.applicability); off only for experiments
    # that want the raw model output (evaluation of the models alone).
    applicability: bool = True
    # CT: stage 1's pancreas only inside the body outline (the applicability step's own,
    # CT above -500 HU, filled). A window of air above a slim patient in a 50 cm field
    # of view is nothing a network trained on bodies has seen, and it answered with
    # "pancreas" there on the real Siemens series; the gland is never outside the body.
    body_gate: bool = True
    # The gland is the largest component plus every part of at least ``gland_min_part``
    # of its size within ``gland_join_mm`` of it: at 3 mm the thin neck often breaks, and
    # the largest piece alone left the head out (Dice 0.55 on the real
    # TotalSegmentator example, its head 24 mm from the body).
    gland_join_mm: float = 30.0
    gland_min_part: float = 0.1
    # The stage-2 package's calibration (``ainode calibrate``) applied to the reported
    # patient score and lesion confidences; off for fitting one (it needs the raw scores).
    calibrated: bool = True
    # Grad-CAM of the tumour-type head on the source grid (pipelines.explain), for the
    # evidence maps (PMAP, EVSC); off where nobody looks at it (evaluation, fitting).
    evidence_maps: bool = True


@dataclass
class _Stage1:
    mask: npt.NDArray[np.bool_]  # on the stage-1 grid
    grid: sitk.Image
    prob_max: float
    pancreas_ml: float = 0.0  # the largest component kept as the gland
    predicted_ml: float = 0.0  # everything above the threshold, every component


@dataclass(frozen=True)
class SeriesInfo:
    """What the header says the series shows (the series check reads it)."""

    modality: str = ""
    body_part: str = ""
    anatomic_region: str = ""
    image_type: tuple[str, ...] = ()


@dataclass
class PancreasPipeline:
    """``pancreas-ct`` / ``pancreas-mr``: models are loaded once and reused per job."""

    name: str
    stage1: LoadedModel
    stage2: LoadedModel
    slice_model: LoadedModel | None = None
    settings: PipelineSettings = field(default_factory=PipelineSettings)
    min_slices: int = 8
    # Where each stage's package came from ("stage1_source": "models_dir" | "shipped",
    # ...): set by the factory, recorded in every result's provenance.
    model_sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_packages(
        cls, name: str, stage1: Path, stage2: Path, slice_model: Path | None = None,
        *, device: str = "auto", settings: PipelineSettings | None = None,
    ) -> PancreasPipeline:
        s1 = load_package(stage1, device)
        s2 = load_package(stage2, device)
        sc = load_package(slice_model, device) if slice_model and slice_model.exists() else None
        if s1.manifest.task != "pancreas-localisation":
            raise ModelError(f"{stage1.name} is a {s1.manifest.task} model, not stage 1")
        if s2.manifest.task != "lesion-detection":
            raise ModelError(f"{stage2.name} is a {s2.manifest.task} model, not stage 2")
        return cls(name, s1, s2, sc, settings or PipelineSettings())

    def model_identity(self) -> str:
        """Every model's name and version: what the job provenance records in full."""
        return "+".join(f"{m.name}@{m.version}" for m in self._manifests())

    def model_version(self) -> str:
        """A version of at most 64 characters (DICOM LO, and the jobs table).

        The full identity when it fits; otherwise the stage versions plus a
        hash of the full identity, so two different model sets never share a
        version (job de-duplication relies on it).
        """
        full = self.model_identity()
        if len(full) <= 64:
            return full
        digest = hashlib.sha256(full.encode()).hexdigest()[:12]
        versions = "/".join(m.version for m in self._manifests())
        return f"{versions[:48]} #{digest}"

    def _manifests(self) -> list[Any]:
        parts = [self.stage1.manifest, self.stage2.manifest]
        if self.slice_model is not None:
            parts.append(self.slice_model.manifest)
        return parts

    # --- public entry points -------------------------------------------------------------

    def run(self, volume: object, *, evidence: bool | None = None) -> AnalysisResult:
        """Analyse a pipelines.volume.Volume (or a SimpleITK image): the generic result.

        ``evidence`` overrides ``settings.evidence_maps`` for this call: the Grad-CAM
        costs three backward passes (seconds on a CPU), so the job runner asks for it
        only when a destination of the job accepts an evidence kind.
        """
        if evidence is None or evidence == self.settings.evidence_maps:
            return self.report(volume).to_result()
        return self._with_evidence(evidence).report(volume).to_result()

    def _with_evidence(self, evidence: bool) -> PancreasPipeline:
        """This pipeline (same loaded stages) with evidence maps switched on or off."""
        return dataclasses.replace(
            self, settings=dataclasses.replace(self.settings, evidence_maps=evidence))

    def report(self, volume: object) -> PancreasReport:
        """What :meth:`run` finds, in the pipeline's own terms (what evaluation scores)."""
        modality: str
        info = SeriesInfo()
        if isinstance(volume, sitk.Image):
            img, uids, frames = volume, [], None
            modality = self.stage2.manifest.input.modality
        else:
            to_sitk = getattr(volume, "to_sitk", None)
            if to_sitk is None:
                raise PipelineError("input", f"cannot analyse a {type(volume).__name__}")
            img = to_sitk()
            uids = list(getattr(volume, "sop_instance_uids", []))
            frames = getattr(volume, "frame_numbers", None)
            modality = str(getattr(volume, "modality", "") or "")
            info = SeriesInfo(
                modality=modality,
                body_part=str(getattr(volume, "body_part", "") or ""),
                anatomic_region=str(getattr(volume, "anatomic_region", "") or ""),
                image_type=tuple(getattr(volume, "image_type", ()) or ()),
            )
        if img.GetSize()[2] < 1:
            raise PipelineError("input", "empty volume")
        if img.GetPixelID() != sitk.sitkFloat32:  # no second copy of a float32 source grid
            img = sitk.Cast(img, sitk.sitkFloat32)
        rep = self.analyse(img, uids, frames, modality, info)
        rep.quality_descriptors = input_descriptors(img, rep.pancreas_mask)
        return rep

    def analyse(self, img: sitk.Image, uids: list[str], frames: list[int] | None,
                modality: str, info: SeriesInfo | None = None) -> PancreasReport:
        """Series check, stage 1, anatomy check, stage 2, competence check, then the report.

        Each check that fails ends the analysis with a not-assessable report
        (no lesion): the later stages never run on what an earlier check refused.
        """
        timings: dict[str, float] = {}
        info = info or SeriesInfo(modality=modality)
        algo = AlgorithmInfo(name=f"ainode {self.name}", version=self.model_version(),
                             intended_use=self.stage2.manifest.intended_use)
        provenance: dict[str, Any] = {
            "models": self.model_identity(), "device": str(self.stage2.device),
            "margin_mm": self.settings.margin_mm, "score_mode": self.settings.score_mode,
            "lesion_margin_mm": self.settings.lesion_margin_mm, "timings": timings,
            **self.model_sources,
        }
        verdict = Applicability()
        feats: npt.NDArray[np.float64] | None = None  # stage 2's pooled features, once run

        def refused(s1: _Stage1 | None = None) -> PancreasReport:
            """The report of a refused case. What stage 1 drew stays on it (on the source
            grid) so that evaluation can score stage 1; the generic result drops it."""
            provenance.update(verdict.provenance())
            log.info("not assessable: %s", verdict.reason)
            return PancreasReport(
                pipeline=self.name, algorithm=algo, source_sop_instance_uids=uids,
                patient_score=0.0, pancreas_found=s1 is not None,
                pancreas_mask=None if s1 is None else _mask_on_source(s1, img),
                source_frame_numbers=frames, provenance=provenance,
                not_assessable=verdict.reason, features=feats,
            )

        check = self.settings.applicability
        # A series without Modality is judged as what the pipeline is for (the rules for
        # CT need HU); a stated other modality fails the series check.
        as_modality = modality or self.stage2.manifest.input.modality
        t0 = time.perf_counter()
        view = coarse_view(img, as_modality) if check else None
        if view is not None:
            verdict.add(series_check(
                view, expected_modality=self.stage2.manifest.input.modality,
                modality=info.modality or modality, body_part=info.body_part,
                anatomic_region=info.anatomic_region, image_type=info.image_type))
            timings["series_check_s"] = round(time.perf_counter() - t0, 3)
            if verdict.failed:
                return refused()
        with torch.inference_mode(), self._autocast():
            t0 = time.perf_counter()
            s1 = self._stage1(img, view)
            timings["stage1_s"] = round(time.perf_counter() - t0, 3)
            provenance["stage1_max_probability"] = round(s1.prob_max, 4)
            if not s1.mask.any():
                log.info("pancreas not found (max probability %.2f)", s1.prob_max)
                provenance.update(verdict.provenance())
                return PancreasReport(
                    pipeline=self.name, algorithm=algo, source_sop_instance_uids=uids,
                    patient_score=0.0, pancreas_found=False, source_frame_numbers=frames,
                    provenance=provenance,
                )
            if view is not None:
                verdict.add(anatomy_check(view, s1.mask, s1.grid, modality=as_modality,
                                          pancreas_ml=s1.pancreas_ml,
                                          predicted_ml=s1.predicted_ml))
                if verdict.failed:
                    return refused(s1)
            roi = self._roi(s1)
            t1 = time.perf_counter()
            prob, cls, feats = self._stage2(img, roi)
            timings["stage2_s"] = round(time.perf_counter() - t1, 3)
            if check:
                comp = self.stage2.manifest.competence
                verdict.add(competence_check(
                    feats, self.stage2.competence, None if comp is None else comp.threshold,
                    fitted_on="" if comp is None else comp.fitted_on))
                if verdict.failed:
                    return refused(s1)
            provenance.update(verdict.provenance())
            slice_dist = None
            if self.slice_model is not None:
                t2 = time.perf_counter()
                slice_dist = self._slices(img, s1)
                timings["slice_s"] = round(time.perf_counter() - t2, 3)
        attribution = None
        if self.settings.evidence_maps:
            t3 = time.perf_counter()
            attribution = self.attribution(img, roi)
            timings["attribution_s"] = round(time.perf_counter() - t3, 3)
        rep = self._result(img, uids, frames, modality, s1, roi, prob, cls, slice_dist,
                           algo, provenance, attribution)
        rep.features = feats
        return rep

    # --- stages ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        dev = self.stage2.device
        if dev.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                yield
        else:
            yield

    def _stage1(self, img: sitk.Image, view: CoarseView | None = None) -> _Stage1:
        if self.stage1.manifest.weights.format == "nnunetv2":
            # nnU-Net resamples and normalises itself; its output lies on the source grid.
            probs = self.stage1.module.predict_image(img)  # type: ignore[operator]
            p = probs[1:].sum(0)
            grid = img
        else:
            x, prepared = model_input(img, self.stage1)
            grid = prepared.grid
            net = self.stage1.module
            patch = tuple(int(p) for p in self.stage1.manifest.input.patch_size)
            try:
                logits = sliding_window_inference(x, patch, 2, net, overlap=0.25,
                                                  mode="gaussian")
            except RuntimeError as exc:
                raise PipelineError("stage1", f"inference failed: {exc}") from exc
            assert isinstance(logits, torch.Tensor)
            p = torch.softmax(logits.float(), dim=1)[0, 1:].sum(0).cpu().numpy()
        if self.settings.body_gate and self.stage1.manifest.input.modality == "CT":
            view = view or coarse_view(img, "CT")
            p = np.where(view.body_on(grid), p, 0.0).astype(np.float32)
        mask = p >= self.settings.pancreas_threshold
        vox_ml = float(np.prod(grid.GetSpacing())) / 1000.0
        predicted_ml = float(mask.sum()) * vox_ml
        mask = gland_components(mask, tuple(grid.GetSpacing()),
                                join_mm=self.settings.gland_join_mm,
                                min_part=self.settings.gland_min_part)
        if float(mask.sum()) * vox_ml < self.settings.min_pancreas_ml:
            mask = np.zeros_like(mask)
        return _Stage1(mask.astype(bool), grid, float(p.max()) if p.size else 0.0,
                       pancreas_ml=float(mask.sum()) * vox_ml, predicted_ml=predicted_ml)

    def _stage2(self, img: sitk.Image, roi: sitk.Image) -> tuple[
            npt.NDArray[np.float32], npt.NDArray[np.float64] | None,
            npt.NDArray[np.float64] | None]:
        """Lesion map on ``roi``, tumour-type distribution, and the case's pooled features.

        The features (the mean over the sliding windows of what the classification
        head reads) are what the competence check scores; None for a network that
        does not expose them (MONAI bundle, nnU-Net, TorchScript).
        """
        if self.stage2.manifest.weights.format == "nnunetv2":
            # Whole image through nnU-Net, then the lesion labels cut to the ROI grid.
            probs = self.stage2.module.predict_image(img)  # type: ignore[operator]
            les = sitk.GetImageFromArray(probs[2:].sum(0) if len(probs) > 2 else probs[1])
            les.CopyInformation(img)
            return (sitk.GetArrayFromImage(resample_like(les, roi)).astype(np.float32),
                    None, None)
        x, _ = model_input(img, self.stage2, roi)
        net = self.stage2.module
        windows: list[tuple[float, npt.NDArray[np.float64]]] = []
        pooled: list[npt.NDArray[np.float64]] = []
        with_features = callable(getattr(net, "forward_with_features", None))

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            if with_features:
                seg_, cls_, feat = net.forward_with_features(patch)  # type: ignore[operator]
                pooled.extend(feat.float().cpu().numpy().astype(np.float64))
                out: Any = (seg_, cls_)
            else:
                out = net(patch)
            if isinstance(out, tuple | list):
                seg, cls = out[0], out[1]
                probs = torch.softmax(cls.float(), dim=1).cpu().numpy()
                peaks = torch.sigmoid(seg.float()).amax(dim=(1, 2, 3, 4)).cpu().numpy()
                windows.extend((float(pk), pr.astype(np.float64))
                               for pk, pr in zip(peaks, probs, strict=True))
                return seg
            return out  # a segmentation-only model (MONAI bundle, nnU-Net)

        patch = tuple(int(p) for p in self.stage2.manifest.input.patch_size)
        try:
            logits = sliding_window_inference(x, patch, 1, predictor,
                                              overlap=self.settings.overlap, mode="gaussian")
        except RuntimeError as exc:
            raise PipelineError("stage2", f"inference failed: {exc}") from exc
        assert isinstance(logits, torch.Tensor)
        lg = logits.float()
        if lg.shape[1] == 1:
            prob = torch.sigmoid(lg)[0, 0]
        else:  # multi-class segmentation: lesion = every label after the pancreas
            prob = torch.softmax(lg, dim=1)[0, 2:].sum(0) if lg.shape[1] > 2 else \
                torch.softmax(lg, dim=1)[0, 1]
        cls: npt.NDArray[np.float64] | None = None
        if windows:
            peak, best = max(windows, key=lambda w: w[0])
            cls = best if peak >= 0.5 else np.mean([w[1] for w in windows], axis=0)
        feats = np.mean(pooled, axis=0) if pooled else None
        return prob.cpu().numpy().astype(np.float32), cls, feats

    def case_features(self, img: sitk.Image, modality: str | None = None) -> tuple[
            npt.NDArray[np.float64] | None, dict[str, Any]]:
        """Stage 1 and 2 on ``img`` as :meth:`analyse` runs them: the pooled features.

        What :mod:`pipelines.training.competence` fits its statistics on, so the
        fitted and the scored features come from the very same code path. Also
        returns the series and anatomy checks' record (None features when stage
        1 finds no gland); the competence check itself is not applied.
        """
        if img.GetPixelID() != sitk.sitkFloat32:
            img = sitk.Cast(img, sitk.sitkFloat32)
        modality = modality or self.stage2.manifest.input.modality
        view = coarse_view(img, modality)
        verdict = Applicability()
        verdict.add(series_check(view, expected_modality=self.stage2.manifest.input.modality,
                                 modality=modality))
        with torch.inference_mode(), self._autocast():
            s1 = self._stage1(img, view)
            if not s1.mask.any():
                return None, verdict.provenance()
            verdict.add(anatomy_check(view, s1.mask, s1.grid, modality=modality,
                                      pancreas_ml=s1.pancreas_ml,
                                      predicted_ml=s1.predicted_ml))
            roi = self._roi(s1)
            _, _, feats = self._stage2(img, roi)
        return feats, verdict.provenance()

    def attribution_layers(self) -> list[str]:
        """The stage-2 network's last three encoder levels by name; [] when it has none."""
        enc = getattr(self.stage2.module, "enc", None)
        if self.stage2.manifest.weights.format != "state_dict" or \
                not isinstance(enc, torch.nn.ModuleList) or len(enc) < 3:
            return []
        return [f"enc.{i}" for i in range(len(enc) - 3, len(enc))]

    def attribution(self, img: sitk.Image, roi: sitk.Image) -> npt.NDArray[np.float32] | None:
        """Grad-CAM of the head's PDAC logit on stage 2's input over ``roi`` (its grid).

        The whole region in one pass (the encoder is convolutional and the head
        pools globally), so the map is one function of one input, not a blend
        of windows. None for a network without the encoder levels (MONAI
        bundle, nnU-Net, TorchScript): no evidence map is then written.
        """
        from pipelines.explain import grad_cam
        from pipelines.pancreas.output import TUMOUR_TYPES

        layers = self.attribution_layers()
        if not layers:
            return None
        x, _ = model_input(img, self.stage2, roi)
        try:
            return grad_cam(self.stage2.module, x, class_index=TUMOUR_TYPES.index("PDAC"),
                            layers=layers)
        except RuntimeError as exc:
            raise PipelineError("attribution", f"Grad-CAM failed: {exc}") from exc

    def attribution_method(self) -> str:
        return (f"Grad-CAM (MONAI GradCAM) of the PDAC logit of {self.stage2.manifest.name} "
                f"{self.stage2.manifest.version} on encoder levels "
                f"{', '.join(self.attribution_layers())}, mean of the per-level maps above "
                "their median over the stage-2 region (1 = strongest), resampled onto the "
                "source grid")

    def _roi(self, s1: _Stage1) -> sitk.Image:
        """Stage 2's grid from stage 1's gland (the rule training cuts its samples by)."""
        inp = self.stage2.manifest.input
        return stage2_roi(s1.mask, s1.grid, margin_mm=self.settings.margin_mm,
                          spacing=inp.spacing_mm, patch_zyx=inp.patch_size)

    def _slice_input(self, img: sitk.Image, s1: _Stage1) -> torch.Tensor:
        """The slice classifier's 2.5D stack of the stage-1 ROI, (z, 3, y, x)."""
        assert self.slice_model is not None
        inp = self.slice_model.manifest.input
        ref = slice_roi(s1.mask, s1.grid, margin_mm=self.settings.margin_mm,
                        spacing=inp.spacing_mm, size=int(inp.patch_size[-1]))
        return torch.as_tensor(slice_stack(img, inp, ref)).to(self.slice_model.device)

    def _slices(self, img: sitk.Image, s1: _Stage1) -> dict[str, float]:
        assert self.slice_model is not None
        stack = self._slice_input(img, s1)
        probs = []
        for i in range(0, len(stack), 32):
            probs.append(torch.softmax(self.slice_model.module(stack[i:i + 32]).float(), 1))
        p = torch.cat(probs).cpu().numpy().astype(np.float64)
        return aggregate_slices(p, top_k=self.settings.slice_top_k,
                                hierarchical=self.settings.slice_hierarchical)

    # --- back to the source grid --------------------------------------------------------

    def _result(
        self, img: sitk.Image, uids: list[str], frames: list[int] | None, modality: str,
        s1: _Stage1, roi: sitk.Image, prob: npt.NDArray[np.float32],
        cls: npt.NDArray[np.float64] | None, slice_dist: dict[str, float] | None,
        algo: AlgorithmInfo, provenance: dict[str, Any],
        attribution: npt.NDArray[np.float32] | None = None,
    ) -> PancreasReport:
        st = self.settings
        sx, sy, sz = (float(s) for s in img.GetSpacing())
        ox, oy, oz = (float(o) for o in img.GetOrigin())
        spacing, origin = (sx, sy, sz), (ox, oy, oz)
        direction = tuple(float(d) for d in img.GetDirection())
        m1 = _stage1_image(s1)
        pancreas = _mask_on_source(s1, img, m1)
        p_img = sitk.GetImageFromArray(prob)
        p_img.CopyInformation(roi)
        # The resampled map itself (float32), not a copy of it: 300 MB on a 512x512x300 grid.
        lesion_prob: npt.NDArray[np.float32] = pixels(resample_like(p_img, img))
        del p_img
        # More candidates than are reported: those away from the gland are dropped next.
        cands = extract_candidates(prob, fraction=st.candidate_fraction,
                                   min_confidence=st.min_confidence,
                                   max_candidates=3 * st.max_lesions,
                                   min_voxels=st.min_lesion_voxels)
        kept, dropped = near_pancreas(cands, m1, roi, st.lesion_margin_mm)
        kept = kept[:st.max_lesions]
        provenance["candidates_outside_pancreas"] = [
            {"confidence": round(c.confidence, 4),
             "distance_to_pancreas_mm": round(d, 1) if np.isfinite(d) else None}
            for c, d in dropped]
        provenance["candidates_dropped_outside_pancreas"] = len(dropped)
        classification = None
        if cls is not None:
            classification = {t: float(v) for t, v in zip(TUMOUR_TYPES, cls, strict=True)}
        if slice_dist is not None:
            provenance["slice_classifier"] = {k: round(v, 4) for k, v in slice_dist.items()}
            if classification is None:
                classification = dict(slice_dist)
        pan_lps = voxel_to_lps(np.argwhere(pancreas).astype(np.float64), spacing, origin,
                               direction) if pancreas.any() else None
        arr = sitk.GetArrayViewFromImage(img)  # read only, while img lives: no copy
        lesions: list[Lesion] = []
        for c, dist in kept:
            lab = sitk.GetImageFromArray(c.mask.astype(np.uint8))
            lab.CopyInformation(roi)
            mask = _label_on(lab, img)
            if not mask.any():  # thinner than one source slice: keep its peak voxel
                peak = roi.TransformIndexToPhysicalPoint([int(i) for i in c.peak_index[::-1]])
                try:
                    k = img.TransformPhysicalPointToIndex(peak)
                except RuntimeError:
                    continue
                if not all(0 <= k[i] < img.GetSize()[i] for i in range(3)):
                    continue
                mask[k[2], k[1], k[0]] = True
            cen = centroid_lps(mask, spacing, origin, direction)
            lesions.append(Lesion(
                index=len(lesions) + 1,
                mask=mask,
                confidence=round(c.confidence, 4),
                diameter_mm=round(long_axis_diameter_mm(mask, spacing), 1),
                volume_ml=round(volume_ml(mask, spacing), 3),
                centroid_lps_mm=cen,
                location=pancreas_location(cen, pan_lps) if pan_lps is not None and
                len(pan_lps) > 3 else None,
                mean_hu=round(float(arr[mask].mean()), 1) if modality == "CT" else None,
                type_probabilities=classification,
                distance_to_pancreas_mm=round(dist, 1),
            ))
        lesion_max = float(prob.max()) if prob.size else 0.0
        pdac = classification.get("PDAC") if classification else None
        score = float(np.clip(combine_score(pdac, lesion_max, st.score_mode), 0.0, 1.0))
        provenance["lesion_max"] = round(lesion_max, 4)
        provenance["classification_pdac"] = None if pdac is None else round(pdac, 4)
        on_source = None
        if attribution is not None:
            a_img = sitk.GetImageFromArray(attribution)
            a_img.CopyInformation(roi)
            on_source = np.clip(pixels(resample_like(a_img, img)), 0.0, 1.0).astype(np.float32)
        report = PancreasReport(
            pipeline=self.name, algorithm=algo, source_sop_instance_uids=uids,
            patient_score=score, pancreas_found=True,
            pancreas_mask=pancreas, lesion_probability=lesion_prob, lesions=lesions,
            classification=classification, source_frame_numbers=frames,
            provenance=provenance, attribution=on_source,
            attribution_method=self.attribution_method() if on_source is not None else "",
        )
        return self._calibrate(report)

    def _calibrate(self, report: PancreasReport) -> PancreasReport:
        """The report with the stage-2 package's calibration applied, when it has one.

        Monotone maps, so the lesions keep their order (and numbers); the raw
        values stay on the report (and in the findings' details) for the record.
        """
        cal = self.stage2.manifest.calibration
        if not self.settings.calibrated or cal is None:
            report.provenance["calibration"] = "none"
            return report
        if cal.patient is not None:
            report.raw_patient_score = report.patient_score
            report.patient_score = round(cal.patient.apply_one(report.patient_score), 4)
        if cal.lesion is not None:
            report.lesions = [dataclasses.replace(
                les, confidence=round(cal.lesion.apply_one(les.confidence), 4),
                raw_confidence=les.confidence) for les in report.lesions]
        report.calibration = cal.describe()
        report.provenance["calibration"] = report.calibration
        return report


def near_pancreas(cands: list[Candidate], pancreas: sitk.Image, roi: sitk.Image,
                  margin_mm: float) -> tuple[list[tuple[Candidate, float]],
                                             list[tuple[Candidate, float]]]:
    """Split candidates (on ``roi``) into those within ``margin_mm`` of the gland and the rest.

    The distance is from the candidate's nearest voxel to the nearest voxel of
    the predicted pancreas (``pancreas``, a label image on any grid, resampled
    onto ``roi``), 0 when they overlap: "overlaps the gland dilated by the
    margin". Measured on the stage-2 grid, which is small, so the distance map
    costs little even for a 512 x 512 x 300 source.
    """
    pan = sitk.GetArrayFromImage(resample_like(pancreas, roi, label=True)).astype(bool)
    if not pan.any():
        return [], [(c, float("inf")) for c in cands]
    sx, sy, sz = roi.GetSpacing()
    dist = ndimage.distance_transform_edt(~pan, sampling=(sz, sy, sx))
    kept: list[tuple[Candidate, float]] = []
    dropped: list[tuple[Candidate, float]] = []
    for c in cands:
        d = float(dist[c.mask].min()) if c.mask.any() else float(dist[c.peak_index])
        (kept if d <= margin_mm else dropped).append((c, d))
    return kept, dropped


def gland_components(mask: npt.NDArray[np.bool_], spacing_xyz: tuple[float, ...], *,
                     join_mm: float, min_part: float) -> npt.NDArray[np.bool_]:
    """The largest component of ``mask`` and the sizeable parts near it (see settings)."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.asarray(ndimage.sum(mask, labels, index=range(1, n + 1)))
    main = int(np.argmax(sizes)) + 1
    keep = labels == main
    others = [i + 1 for i in range(n) if i + 1 != main and sizes[i] >= min_part * sizes[main - 1]]
    if others:
        dist = ndimage.distance_transform_edt(~keep, sampling=tuple(spacing_xyz)[::-1])
        near = ndimage.minimum(dist, labels, index=others)
        for i, d in zip(others, np.atleast_1d(near), strict=True):
            if d <= join_mm:
                keep |= labels == i
    return keep


def _stage1_image(s1: _Stage1) -> sitk.Image:
    m1 = sitk.GetImageFromArray(s1.mask.astype(np.uint8))
    m1.CopyInformation(s1.grid)
    return m1


def _mask_on_source(s1: _Stage1, img: sitk.Image,
                    m1: sitk.Image | None = None) -> npt.NDArray[np.bool_]:
    """Stage 1's gland on the source grid (``m1``: its image, when already made)."""
    m1 = _stage1_image(s1) if m1 is None else m1
    return _label_on(m1, img)


def _label_on(label: sitk.Image, img: sitk.Image) -> npt.NDArray[np.bool_]:
    """A 0/1 uint8 label image on ``img``'s grid as a bool array.

    The resampled image's own buffer seen as bool (nearest neighbour keeps the
    values 0 and 1, the bytes of False and True), the same array as
    ``GetArrayFromImage(...).astype(bool)`` without its two source-grid copies.
    """
    assert label.GetPixelID() == sitk.sitkUInt8
    out: npt.NDArray[np.bool_] = pixels(resample_like(label, img, label=True)).view(np.bool_)
    return out


def aggregate_slices(p: npt.NDArray[np.float64], *, top_k: int = 3,
                     hierarchical: bool = False) -> dict[str, float]:
    """Series-level tumour-type distribution from per-slice probabilities.

    A lesion occupies few slices, so averaging every slice would drown it in
    normal ones: the series' abnormality is the mean over the ``top_k`` most
    abnormal slices. Flat mode averages their full distributions; hierarchical
    mode decides abnormal-vs-normal first and then splits the abnormal mass by
    the type distribution of those slices.
    """
    if len(p) == 0:
        return {t: (1.0 if t == "normal" else 0.0) for t in TUMOUR_TYPES}
    k = max(1, min(top_k, len(p)))
    abnormal = 1.0 - p[:, 0]
    top = np.argsort(-abnormal, kind="stable")[:k]
    if not hierarchical:
        dist = p[top].mean(axis=0)
    else:
        a = float(abnormal[top].mean())
        types = p[top, 1:].sum(axis=0)
        types = types / max(float(types.sum()), 1e-9)
        dist = np.concatenate([[1.0 - a], a * types])
    dist = dist / dist.sum()
    return {t: float(v) for t, v in zip(TUMOUR_TYPES, dist, strict=True)}
