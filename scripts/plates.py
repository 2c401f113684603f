"""Vessel labels on bone plates set to background, where the image is a sheet rather than a tube.

In 3DRA the skull base, the clinoid processes and the petrous bone show as bright plates a few mm thick
that the network labels vessel in part (docs/recipe.md, 0.9.10). The shape tells them apart where the
intensity does not: across a vessel the image falls off in two directions, across a plate in one. At a
scale near a plate's half thickness, the Hessian of the image has eigenvalues ``l1 <= l2 <= l3``; inside a
bright structure ``l1`` is strongly negative, and

* a tube (vessel) has ``l2`` about as negative as ``l1``;
* a sheet (plate) has ``l2`` near 0, so ``|l2| / |l1|`` is small (Frangi et al., MICCAI 1998, the plate
  measure of their vesselness).

Vessel-labelled voxels where ``|l2| / |l1| < max_ratio`` and ``-l1 >= min_strength`` (scale-normalised,
in units of the lumen level) at every scale of ``sigmas_mm`` are sheet-like; connected regions of them
(26-connected) of at least ``min_mm3`` become background. The larger scale and the size bound keep the
wall of a wide artery labelled, which at the small scale alone is a sheet. An aneurysm component whose
border touches those removed regions at least ``aneurysm_ratio`` times as much as it touches vessel labels
is a bright bump on the bone, not a sac on an artery, and becomes background as well (0.9.11); other
aneurysm labels are never changed.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from scripts.labels import ANEURYSM_LABEL, BACKGROUND_LABEL, COMPONENT_CONNECTIVITY, VESSEL_LABEL
from scripts.postprocessing import as_label_and_image, labels_and_image_of, spacing_of, with_labels

__all__ = ["PlateMeasure", "RemovePlatesd", "hessian_eigenvalues", "remove_plates"]

logger = logging.getLogger(__name__)


def hessian_eigenvalues(
    image: np.ndarray, spacing: Sequence[float], mask: np.ndarray, sigma_mm: float
) -> np.ndarray:
    """The scale-normalised Hessian eigenvalues of the image at the voxels of ``mask``.

    Args:
        image: (D, H, W) intensities, lumen level 1.
        spacing: (3,) voxel spacing in mm.
        mask: (D, H, W) bool, the voxels where the eigenvalues are wanted.
        sigma_mm: the Gaussian scale of the Hessian, in mm (> 0).

    Returns:
        (N, 3) float32, ascending per voxel (``l1`` the most negative), N the voxels of ``mask`` in C order.
    """
    if not mask.any():
        return np.empty((0, 3), dtype=np.float32)
    sigma = float(sigma_mm) / np.asarray(spacing, dtype=np.float64)
    image = np.asarray(image, dtype=np.float32)
    hessian = np.empty((int(mask.sum()), 3, 3), dtype=np.float32)
    for i in range(3):
        for j in range(i, 3):
            order = [0, 0, 0]
            order[i] += 1
            order[j] += 1
            # scale-normalised: the derivative in voxels times sigma in voxels, per axis
            derivative = ndimage.gaussian_filter(image, sigma, order=order)[mask] * (sigma[i] * sigma[j])
            hessian[:, i, j] = hessian[:, j, i] = derivative
    return np.linalg.eigvalsh(hessian)


def _is_sheet(eigenvalues: np.ndarray, max_ratio: float, min_strength: float) -> np.ndarray:
    """(N, 3) ascending eigenvalues -> (N,) bool: a bright sheet (strong ``l1``, ``|l2|`` small beside it)."""
    l1, l2 = eigenvalues[:, 0], eigenvalues[:, 1]
    return (l1 <= -min_strength) & (np.abs(np.minimum(l2, 0.0)) < max_ratio * np.maximum(-l1, 1e-6))


class PlateMeasure:
    """The Hessian eigenvalues of a label volume's vessel voxels at every scale, computed once.

    What :func:`remove_plates` computes before it thresholds: :meth:`remove` then applies any threshold and
    volume bound without computing the Hessian again, as ``scripts.tune_postprocessing`` does for each
    setting of its grid.

    Args:
        label: (D, H, W) integer labels 0/1/2.
        image: (D, H, W) intensities on the same grid, lumen level 1.
        spacing: (3,) voxel spacing in mm.
        sigmas_mm: the Hessian's scales in mm, each > 0.
    """

    def __init__(
        self, label: np.ndarray, image: np.ndarray, spacing: Sequence[float], sigmas_mm: Sequence[float]
    ) -> None:
        self.label, image = as_label_and_image(label, image)
        self.spacing = tuple(float(s) for s in spacing)
        self.vessel = self.label == VESSEL_LABEL
        self.eigenvalues = [hessian_eigenvalues(image, self.spacing, self.vessel, s) for s in sigmas_mm]

    def remove(
        self, max_ratio: float, min_strength: float, min_mm3: float, aneurysm_ratio: float = 0.0
    ) -> np.ndarray:
        """The labels with the vessel voxels of sheet-like regions of at least ``min_mm3`` set to background,
        and the aneurysm components on them with ``aneurysm_ratio`` (see :func:`remove_plates`); a new
        array."""
        out = self.label.copy()
        if not self.eigenvalues or not self.vessel.any():
            return out
        sheet = np.zeros(self.vessel.shape, dtype=bool)
        sheet[self.vessel] = np.logical_and.reduce(
            [_is_sheet(eigenvalues, max_ratio, min_strength) for eigenvalues in self.eigenvalues]
        )
        regions, count = ndimage.label(sheet, COMPONENT_CONNECTIVITY)
        volumes = np.bincount(regions.ravel(), minlength=count + 1)[1:] * float(np.prod(self.spacing))
        plates = np.isin(regions, 1 + np.flatnonzero(volumes >= min_mm3))
        out[plates] = BACKGROUND_LABEL
        if plates.any():
            logger.info("plates: %d vessel voxels on sheet-like regions set to background", int(plates.sum()))
            if aneurysm_ratio > 0:
                _remove_aneurysms_on(plates, out, aneurysm_ratio)
        return out


def _remove_aneurysms_on(plates: np.ndarray, out: np.ndarray, ratio: float) -> None:
    """Set to background, in ``out``, the aneurysm components whose border touches at least ``ratio`` times as
    many voxels of ``plates`` (the vessel labels just removed) as of vessel labels."""
    components, _ = ndimage.label(out == ANEURYSM_LABEL, COMPONENT_CONNECTIVITY)
    on_plates = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        component = components[box] == index
        border = ndimage.binary_dilation(component, COMPONENT_CONNECTIVITY) & ~component
        plate, vessel = int(plates[box][border].sum()), int((out[box][border] == VESSEL_LABEL).sum())
        if plate > 0 and plate >= ratio * vessel:
            on_plates.append(index)
    if on_plates:
        gone = np.isin(components, on_plates)
        out[gone] = BACKGROUND_LABEL
        logger.info(
            "plates: %d aneurysm component(s), %d voxels, on the plates set to background",
            len(on_plates),
            int(gone.sum()),
        )


def remove_plates(
    label: np.ndarray,
    image: np.ndarray,
    spacing: Sequence[float],
    sigmas_mm: Sequence[float],
    max_ratio: float,
    min_strength: float,
    min_mm3: float,
    aneurysm_ratio: float = 0.0,
) -> np.ndarray:
    """Set to background the vessel labels on sheet-like regions of at least ``min_mm3``, and the aneurysm
    components that sit on those regions more than on a vessel.

    A voxel is sheet-like when it is at every scale of ``sigmas_mm``: at a scale near a plate's half
    thickness alone, the wall of a wide artery (5 mm across) is a sheet as well; at a scale near its radius
    the artery is a tube, while a plate, far wider than it is thick, stays a sheet.

    Args:
        label: (D, H, W) integer labels 0/1/2.
        image: (D, H, W) intensities on the same grid, scaled as the preprocessing scales them (background
            median 0, lumen level 1).
        spacing: (3,) voxel spacing in mm.
        sigmas_mm: the Hessian's scales in mm, each > 0; empty turns the rule off.
        max_ratio: the largest ``|l2| / |l1|`` of a sheet, in (0, 1].
        min_strength: the least scale-normalised ``-l1`` of a sheet, >= 0.
        min_mm3: the least volume of a sheet-like region that is removed, >= 0.
        aneurysm_ratio: an aneurysm component whose border (26-neighbours) touches at least this many times
            as many removed plate voxels as vessel voxels is set to background too: a bright bump on bone, not
            a sac on an artery. Default 0 (off); other aneurysm labels are never changed.

    Returns:
        (D, H, W) labels, same dtype; the input is not modified.
    """
    check_plate_settings(sigmas_mm, max_ratio, min_strength, min_mm3, aneurysm_ratio)
    measure = PlateMeasure(label, image, spacing, sigmas_mm)
    return measure.remove(max_ratio, min_strength, min_mm3, aneurysm_ratio)


def check_plate_settings(
    sigmas_mm: Any, max_ratio: Any, min_strength: Any, min_mm3: Any, aneurysm_ratio: Any = 0.0
) -> None:
    """Raise ValueError naming the plate setting that is out of range or not a number."""

    def number(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, int | float) and bool(np.isfinite(value))

    if isinstance(sigmas_mm, str | bytes) or not isinstance(sigmas_mm, Sequence):
        raise ValueError(f"plate sigmas_mm must be a list of numbers > 0 (mm), got {sigmas_mm!r}.")
    if not all(number(sigma) and sigma > 0 for sigma in sigmas_mm):
        raise ValueError(f"plate sigmas_mm must be a list of numbers > 0 (mm), got {sigmas_mm!r}.")
    bounds = {
        "max_ratio": (max_ratio, "a number in (0, 1]", lambda v: 0 < v <= 1),
        "min_strength": (min_strength, "a number >= 0", lambda v: v >= 0),
        "min_mm3": (min_mm3, "a number >= 0", lambda v: v >= 0),
        "aneurysm_ratio": (aneurysm_ratio, "a number >= 0", lambda v: v >= 0),
    }
    for name, (value, expected, ok) in bounds.items():
        if not number(value) or not ok(value):
            raise ValueError(f"plate {name} must be {expected}, got {value!r}.")


class RemovePlatesd(MapTransform):
    """Dictionary wrapper of :func:`remove_plates` for (1, D, H, W) labels and the image on their grid.

    Runs after :class:`~scripts.postprocessing.GrowToLumend`, on the same labels and image; the spacing
    comes from the labels' affine.

    Args:
        keys: label keys, each (1, D, H, W) integer labels.
        image_key: the (1, D, H, W) scaled image on the labels' grid. Default ``"image"``.
        sigmas_mm, max_ratio, min_strength, min_mm3, aneurysm_ratio: see :func:`remove_plates`. Default
            ``sigmas_mm`` empty (off).
        allow_missing_keys: as in MONAI.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        sigmas_mm: Sequence[float] = (),
        max_ratio: float = 0.5,
        min_strength: float = 0.03,
        min_mm3: float = 200.0,
        aneurysm_ratio: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        check_plate_settings(sigmas_mm, max_ratio, min_strength, min_mm3, aneurysm_ratio)
        self.image_key = image_key
        self.settings = {
            "sigmas_mm": tuple(float(sigma) for sigma in sigmas_mm),
            "max_ratio": float(max_ratio),
            "min_strength": float(min_strength),
            "min_mm3": float(min_mm3),
            "aneurysm_ratio": float(aneurysm_ratio),
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self.settings["sigmas_mm"]:
            return d
        for key in self.key_iterator(d):
            labels, image = labels_and_image_of(d, key, self.image_key)
            d[key] = with_labels(d[key], remove_plates(labels, image, spacing_of(d[key]), **self.settings))
        return d
