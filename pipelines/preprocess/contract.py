"""A model package's input contract, as the preprocessing every path runs.

Training makes a model's samples, a job makes its inputs and ``ainode
evaluate`` scores it, all through :class:`ModelInput`: if any of them built
the input another way, a model would be evaluated and run on inputs it was
never trained on. The forward records what it did (source grid, model grid,
intensity statistics) in a provenance, and the inverse uses only that record
to bring a prediction back onto the source grid (MONAI's ``Invertd`` idea).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813

from pipelines.preprocess.core import Preprocessor, Provenance, Step
from pipelines.preprocess.grids import grid_of
from pipelines.preprocess.intensity import intensity_preset
from pipelines.preprocess.steps import Intensity, Reorient, ResampleToGrid, ResampleToSpacing
from storage.errors import ModelError

__all__ = ["Contract", "ModelInput", "Prepared"]


class Contract(Protocol):
    """What :class:`ModelInput` reads from ``pipelines.models.package.InputContract``."""

    @property
    def spacing_mm(self) -> tuple[float, float, float]: ...

    @property
    def intensity_preset(self) -> str: ...

    @property
    def intensity_window(self) -> tuple[float, float] | None: ...

    @property
    def orientation(self) -> str: ...

    @property
    def reorient(self) -> bool: ...


@dataclass(frozen=True)
class Prepared:
    """A model input and the record of how it was made: the inverse's other half."""

    image: sitk.Image  # network-input intensities on the model grid
    provenance: Provenance

    @property
    def grid(self) -> sitk.Image:
        """The model grid (the image carries it): where predictions lie."""
        return self.image

    def array(self) -> npt.NDArray[np.float32]:
        """The input as a (z, y, x) float32 array (a copy the caller may keep)."""
        return sitk.GetArrayFromImage(self.image)

    def label(self, label: sitk.Image) -> npt.NDArray[Any]:
        """A reference label on the source grid taken to the model grid (nearest),
        the way the image went: a training target lies on its input's voxels."""
        return sitk.GetArrayFromImage(Preprocessor.forward_label(label, self.provenance))

    def invert_label(self, prediction: npt.NDArray[Any] | sitk.Image) -> npt.NDArray[np.uint8]:
        """A label on the model grid back on the source grid, (slices, rows, cols)."""
        return Preprocessor.invert_label(prediction, self.provenance)

    def invert_probability(
        self, prediction: npt.NDArray[Any] | sitk.Image
    ) -> npt.NDArray[np.float32]:
        """A probability map on the model grid back on the source grid (linear)."""
        return Preprocessor.invert_probability(prediction, self.provenance)


@dataclass(frozen=True)
class ModelInput:
    """A named intensity preset at a model spacing: what an input contract asks for.

    ``orientation`` (e.g. "LPS"): the axes are first permuted and flipped into it,
    losslessly, so a model sees every scan with the patient the same way round: a
    NIfTI in RAS and a DICOM series in LPS then give the same input. None: the
    source's own axes (what models trained before 0.5.0 saw; their contracts say
    ``reorient: false``).
    """

    preset: str
    spacing_mm: tuple[float, float, float]  # (x, y, z)
    window: tuple[float, float] | None = None  # ct_range only
    orientation: str | None = None

    @classmethod
    def of(cls, contract: Contract) -> ModelInput:
        """The preprocessing a model package's input contract declares."""
        return cls(contract.intensity_preset, contract.spacing_mm, contract.intensity_window,
                   contract.orientation if contract.reorient else None)

    def steps(self, onto: sitk.Image | None = None) -> list[Step]:
        """Whole scan at the model spacing, or onto a given grid (a stage-2 ROI)."""
        try:
            spec = intensity_preset(self.preset)
            intensity = Intensity(self.preset, self.window)
        except ValueError as exc:
            raise ModelError(f"input contract: {exc}") from exc
        grid: Step
        if onto is None:
            grid = ResampleToSpacing(self.spacing_mm, default=spec.background)
        else:
            grid = ResampleToGrid(grid_of(onto), default=spec.background)
        # Onto a given grid (a stage-2 ROI): that grid fixes the axes already.
        first: list[Step] = ([] if self.orientation is None or onto is not None
                             else [Reorient(self.orientation)])
        return [*first, grid, intensity]

    def forward(self, image: sitk.Image, *, onto: sitk.Image | None = None) -> Prepared:
        """The model's input for ``image`` (scanner units on the source grid)."""
        pre = Preprocessor(self.steps(onto), name=self.preset)
        out, provenance = pre.forward(image, modality=intensity_preset(self.preset).modality)
        return Prepared(out, provenance)
