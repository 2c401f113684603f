"""Component-wise clean-up of a predicted label volume, with its settings as config keys.

An aneurysm sits on a vessel and has a size; a prediction that says otherwise is corrected:

* **specks**: foreground components (vessel and aneurysm together, 26-connected) below
  ``min_component_mm3`` are set to background;
* **islands**: foreground components below ``min_component_fraction`` of the largest one are set to
  background (one injected territory is one tree; nnU-Net's "all but the largest component", with a margin
  for branches that leave the field of view and come back);
* **detached aneurysms**: aneurysm components that touch no vessel voxel are set to
  ``detached_aneurysm_label`` (0 background, 1 vessel, or None to keep them);
* **small aneurysms**: aneurysm components below ``min_aneurysm_mm3`` that touch a vessel become vessel
  (a bump of the wall, not a lesion);
* **flat aneurysms**: aneurysm components that touch a vessel and rise less than ``min_aneurysm_height_mm``
  above their neck, or less than ``min_aneurysm_aspect_ratio`` times the neck's width, become vessel. A
  saccular aneurysm protrudes from its parent artery; a patch of the artery's own wall or a stretch of a
  wide trunk called aneurysm lies flat along it (height and neck as :mod:`scripts.measurements` defines
  them).

One rule reads the image instead: 3DRA is near-binary, lumen bright on a dark background, so

* **dark voxels** (:class:`SuppressDarkForegroundd`): where the scaled image, smoothed over about a voxel,
  stays below ``min_intensity`` of the lumen level, the class probabilities become background (a blank
  volume, or the dark background beside a window's edge, cannot hold lumen).
* **the lumen's edge** (:class:`GrowToLumend`): the labels grow, one voxel layer per step, into unlabelled
  voxels brighter than ``fraction`` of the brightest labelled voxel near them and than ``floor`` of the
  lumen level. The edge of a blurred lumen lies where the intensity falls to about half its peak (half
  maximum); a model that draws the boundary inside it misses a rim that is a large part of a thin vessel or
  a small sac. The floor keeps a false label on a bright background texture from spreading over the texture.

Volumes are in mm^3 at the prediction's own spacing. ``python -m scripts.tune_postprocessing`` chooses
the component settings on saved validation predictions, as nnU-Net chooses its post-processing; the
defaults in ``configs/`` were chosen so (``docs/recipe.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from scripts.labels import ANEURYSM_LABEL, BACKGROUND_LABEL, COMPONENT_CONNECTIVITY, VESSEL_LABEL
from scripts.measurements import aneurysm_components

__all__ = [
    "CleanSegmentationd",
    "GrowToLumend",
    "SuppressDarkForegroundd",
    "clean_segmentation",
    "dark_voxels",
    "as_label_and_image",
    "grow_to_lumen",
    "labels_and_image_of",
    "spacing_of",
    "with_labels",
]

logger = logging.getLogger(__name__)


def clean_segmentation(
    label: np.ndarray,
    spacing: Sequence[float],
    min_component_mm3: float = 0.0,
    min_aneurysm_mm3: float = 0.0,
    detached_aneurysm_label: int | None = None,
    min_component_fraction: float = 0.0,
    min_aneurysm_height_mm: float = 0.0,
    min_aneurysm_aspect_ratio: float = 0.0,
) -> np.ndarray:
    """Apply the clean-up rules of this module to one label volume.

    Args:
        label: (D, H, W) integer labels 0/1/2.
        spacing: voxel spacing in mm along the three axes.
        min_component_mm3: foreground components below this volume become background. Default 0 (off).
        min_aneurysm_mm3: aneurysm components below this volume touching a vessel become vessel.
            Default 0 (off).
        detached_aneurysm_label: new label of aneurysm components touching no vessel (None keeps them).
        min_component_fraction: foreground components below this fraction of the largest become background.
            Default 0 (off).
        min_aneurysm_height_mm: aneurysm components touching a vessel and rising less than this above their
            neck become vessel. Default 0 (off).
        min_aneurysm_aspect_ratio: the same for a height below this times the neck width. Default 0 (off).

    Returns:
        (D, H, W) cleaned labels, same dtype; the input is not modified.
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label must be (D, H, W), got shape {label.shape}.")
    shape_rules = (min_aneurysm_height_mm, min_aneurysm_aspect_ratio)
    _check_settings(
        min_component_mm3, min_aneurysm_mm3, detached_aneurysm_label, min_component_fraction, *shape_rules
    )
    voxel_mm3 = float(np.prod(spacing))
    out = label.copy()
    if min_component_mm3 > 0 or min_component_fraction > 0:
        components, count = ndimage.label(out > 0, structure=COMPONENT_CONNECTIVITY)
        sizes = np.bincount(components.ravel(), minlength=count + 1) * voxel_mm3
        sizes[0] = 0.0
        small = (sizes < min_component_mm3) | (sizes < min_component_fraction * sizes.max())
        small[0] = False
        out[small[components]] = BACKGROUND_LABEL
    aneurysm = out == ANEURYSM_LABEL
    if not aneurysm.any():
        return out
    if detached_aneurysm_label is not None or min_aneurysm_mm3 > 0:
        _relabel_detached_and_small(out, voxel_mm3, min_aneurysm_mm3, detached_aneurysm_label)
    if max(shape_rules) > 0:
        _relabel_flat(out, spacing, *shape_rules)
    return out


def _relabel_detached_and_small(
    out: np.ndarray, voxel_mm3: float, min_aneurysm_mm3: float, detached_aneurysm_label: int | None
) -> None:
    """The detached and small aneurysm rules of :func:`clean_segmentation`, in place."""
    aneurysm = out == ANEURYSM_LABEL
    components, count = ndimage.label(aneurysm, structure=COMPONENT_CONNECTIVITY)
    near_vessel = ndimage.binary_dilation(out == VESSEL_LABEL, structure=COMPONENT_CONNECTIVITY)
    touching = np.zeros(count + 1, dtype=bool)
    touching[np.unique(components[near_vessel & aneurysm])] = True
    sizes = np.bincount(components.ravel(), minlength=count + 1) * voxel_mm3
    new_label = np.full(count + 1, ANEURYSM_LABEL, dtype=out.dtype)
    if detached_aneurysm_label is not None:
        new_label[~touching] = detached_aneurysm_label
    new_label[touching & (sizes < min_aneurysm_mm3)] = VESSEL_LABEL
    out[aneurysm] = new_label[components[aneurysm]]


def _relabel_flat(
    out: np.ndarray, spacing: Sequence[float], min_height_mm: float, min_aspect_ratio: float
) -> None:
    """The flat aneurysm rule of :func:`clean_segmentation`, in place."""
    measurements, numbers = aneurysm_components(out, np.diag([*map(float, spacing), 1.0]))
    flat = [
        m.index
        for m in measurements
        if m.touches_vessel
        and (
            m.height_mm < min_height_mm or (m.aspect_ratio is not None and m.aspect_ratio < min_aspect_ratio)
        )
    ]
    if flat:
        out[np.isin(numbers, flat)] = VESSEL_LABEL


def _check_settings(
    min_component_mm3: float,
    min_aneurysm_mm3: float,
    detached_aneurysm_label: Any,
    min_component_fraction: float,
    min_aneurysm_height_mm: float,
    min_aneurysm_aspect_ratio: float,
) -> None:
    """Raise ValueError naming the first clean-up setting that is out of range."""
    if min_component_mm3 < 0 or min_aneurysm_mm3 < 0:
        raise ValueError(
            f"min_component_mm3 and min_aneurysm_mm3 must be >= 0, got {min_component_mm3}, {min_aneurysm_mm3}."
        )
    if detached_aneurysm_label not in (None, BACKGROUND_LABEL, VESSEL_LABEL):
        raise ValueError(f"detached_aneurysm_label must be None, 0 or 1, got {detached_aneurysm_label!r}.")
    if not 0 <= min_component_fraction <= 1:
        raise ValueError(f"min_component_fraction must be in [0, 1], got {min_component_fraction!r}.")
    if min_aneurysm_height_mm < 0 or min_aneurysm_aspect_ratio < 0:
        raise ValueError(
            f"min_aneurysm_height_mm and min_aneurysm_aspect_ratio must be >= 0, got {min_aneurysm_height_mm}, "
            f"{min_aneurysm_aspect_ratio}."
        )


def spacing_of(image: Any) -> tuple[float, float, float]:
    """Voxel spacing (mm) from a MetaTensor's affine."""
    affine = getattr(image, "affine", None)
    if affine is None:
        raise ValueError("The post-processing needs a MetaTensor with an affine to know the voxel spacing.")
    affine = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=float)
    return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))


def as_label_and_image(label: Any, image: Any) -> tuple[np.ndarray, np.ndarray]:
    """``label`` and ``image`` (float32) as arrays, checked to be (D, H, W) of one shape."""
    label, image = np.asarray(label), np.asarray(image, dtype=np.float32)
    if label.ndim != 3 or image.shape != label.shape:
        raise ValueError(
            f"label and image must be (D, H, W) of one shape, got {label.shape} and {image.shape}."
        )
    return label, image


def labels_and_image_of(
    d: Mapping[Hashable, Any], key: Hashable, image_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """The (D, H, W) labels of ``d[key]`` and image of ``d[image_key]`` as arrays, checked to share one
    (1, D, H, W) grid."""
    pred, image = d[key], d[image_key]
    if pred.ndim != 4 or pred.shape[0] != 1 or tuple(image.shape) != tuple(pred.shape):
        raise ValueError(
            f"{key}: expected (1, D, H, W) labels on the grid of {image_key} "
            f"{tuple(image.shape)}, got shape {tuple(pred.shape)}."
        )
    return pred[0].detach().cpu().numpy(), image[0].detach().float().cpu().numpy()


def with_labels(pred: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """A copy of the (1, D, H, W) ``pred`` (a MetaTensor keeps its metadata) holding ``labels``."""
    pred = pred.clone()
    pred[0] = torch.as_tensor(labels, dtype=pred.dtype, device=pred.device)
    return pred


class CleanSegmentationd(MapTransform):
    """Dictionary wrapper of :func:`clean_segmentation` for (1, D, H, W) label MetaTensors.

    The voxel volume comes from the tensor's affine, so it runs after ``Invertd`` at the input's own
    spacing, or before it at the training spacing.

    Args:
        keys: label keys, each (1, D, H, W) integer labels (after ``AsDiscreted(argmax=True)``).
        min_component_mm3, min_aneurysm_mm3, detached_aneurysm_label, min_component_fraction,
        min_aneurysm_height_mm, min_aneurysm_aspect_ratio: see :func:`clean_segmentation`.
        allow_missing_keys: as in MONAI.
    """

    def __init__(
        self,
        keys: KeysCollection,
        min_component_mm3: float = 0.0,
        min_aneurysm_mm3: float = 0.0,
        detached_aneurysm_label: int | None = None,
        min_component_fraction: float = 0.0,
        min_aneurysm_height_mm: float = 0.0,
        min_aneurysm_aspect_ratio: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        _check_settings(
            min_component_mm3,
            min_aneurysm_mm3,
            detached_aneurysm_label,
            min_component_fraction,
            min_aneurysm_height_mm,
            min_aneurysm_aspect_ratio,
        )
        self.settings = {
            "min_component_mm3": float(min_component_mm3),
            "min_aneurysm_mm3": float(min_aneurysm_mm3),
            "detached_aneurysm_label": detached_aneurysm_label,
            "min_component_fraction": float(min_component_fraction),
            "min_aneurysm_height_mm": float(min_aneurysm_height_mm),
            "min_aneurysm_aspect_ratio": float(min_aneurysm_aspect_ratio),
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            if pred.ndim != 4 or pred.shape[0] != 1:
                raise ValueError(f"{key}: expected (1, D, H, W) labels, got shape {tuple(pred.shape)}.")
            array = pred[0].detach().cpu().numpy()
            d[key] = with_labels(pred, clean_segmentation(array, spacing_of(pred), **self.settings))
        return d


def dark_voxels(image: np.ndarray, min_intensity: float, sigma: float = 1.0) -> np.ndarray:
    """Voxels darker than ``min_intensity`` after Gaussian smoothing, so noise alone does not decide.

    Args:
        image: (D, H, W) intensities scaled as :class:`~scripts.data.intensity.RobustScaleIntensityd` does
            (background median 0, lumen level 1).
        min_intensity: the least smoothed intensity lumen can have.
        sigma: standard deviation of the smoothing, in voxels. Default 1.

    Returns:
        (D, H, W) bool.
    """
    return ndimage.gaussian_filter(np.asarray(image, dtype=np.float32), sigma) < min_intensity


class SuppressDarkForegroundd(MapTransform):
    """Class probabilities set to background wherever the image is dark (:func:`dark_voxels`).

    Runs on the sliding window's softmax, on the grid of the preprocessed image (before ``Invertd``), so the
    argmax, the saved probabilities and everything after see the same result.

    Args:
        keys: probability keys, each (C, D, H, W) with class 0 background.
        image_key: the preprocessed (1, D, H, W) image. Default ``"image"``.
        min_intensity: see :func:`dark_voxels`; 0 turns the rule off. Default 0.
        sigma: see :func:`dark_voxels`. Default 1.
        allow_missing_keys: as in MONAI.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        min_intensity: float = 0.0,
        sigma: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0 <= min_intensity < 1 or sigma < 0:
            raise ValueError(f"min_intensity must be in [0, 1) and sigma >= 0, got {min_intensity}, {sigma}.")
        self.image_key = image_key
        self.min_intensity = float(min_intensity)
        self.sigma = float(sigma)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.min_intensity <= 0:
            return d
        image = d[self.image_key]
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(
                f"{self.image_key}: expected a (1, D, H, W) image, got shape {tuple(image.shape)}."
            )
        dark = None
        for key in self.key_iterator(d):
            probabilities = d[key]
            if probabilities.ndim != 4 or probabilities.shape[1:] != image.shape[1:]:
                raise ValueError(
                    f"{key}: expected (C, D, H, W) probabilities on the image's grid {tuple(image.shape[1:])}, "
                    f"got shape {tuple(probabilities.shape)}."
                )
            if dark is None:
                array = image[0].detach().float().cpu().numpy()
                dark = torch.as_tensor(dark_voxels(array, self.min_intensity, self.sigma))
            mask = dark.to(probabilities.device)
            suppressed = probabilities.clone()  # a MetaTensor keeps its metadata, for Invertd
            suppressed[:, mask] = 0
            suppressed[BACKGROUND_LABEL, mask] = 1
            d[key] = suppressed
        return d


def grow_to_lumen(
    label: np.ndarray,
    image: np.ndarray,
    fraction: float,
    steps: int,
    floor: float = 0.0,
    vessel_steps: int | None = None,
) -> np.ndarray:
    """Grow the foreground labels into the unlabelled bright rim of the lumen they sit in.

    Each step adds the unlabelled voxels that face a labelled one (6-connected) and are brighter than both
    ``fraction`` of the brightest labelled voxel within ``steps + 1`` voxels and ``floor``; a new voxel takes
    its neighbours' label, aneurysm over vessel. Dark background is never reached, and a structure grows by at
    most ``steps`` voxels, vessel by at most ``vessel_steps`` of them.

    Args:
        label: (D, H, W) integer labels 0/1/2.
        image: (D, H, W) intensities on the same grid, scaled as the preprocessing scales them (background
            median 0, lumen level 1).
        fraction: the least intensity of the lumen, as a fraction of the local labelled peak, in [0, 1);
            0 turns the rule off.
        steps: how many voxel layers the labels may grow; 0 turns the rule off.
        floor: the least intensity of a grown voxel, in [0, 1). Default 0.
        vessel_steps: how many of those layers vessel grows (an integer >= 0; more than ``steps`` is ``steps``);
            None (default): ``steps``.

    Returns:
        (D, H, W) labels, same dtype; the input is not modified.
    """
    label, image = as_label_and_image(label, image)
    _check_growth(fraction, steps, floor, vessel_steps)
    vessel_steps = steps if vessel_steps is None else vessel_steps
    out = label.copy()
    foreground = out > 0
    if fraction <= 0 or steps == 0 or not foreground.any():
        return out
    peak = ndimage.maximum_filter(np.where(foreground, image, 0.0), size=2 * steps + 3)
    lumen = (peak > 0) & (image > np.maximum(fraction * peak, floor))
    faces = ndimage.generate_binary_structure(3, 1)
    for step in range(steps):
        grown = ndimage.grey_dilation(out, footprint=faces)
        new = lumen & (out == BACKGROUND_LABEL) & (grown > BACKGROUND_LABEL)
        if step >= vessel_steps:
            new &= grown == ANEURYSM_LABEL
        if not new.any():
            break
        out[new] = grown[new]
    return out


def _check_growth(fraction: Any, steps: Any, floor: Any, vessel_steps: Any = None) -> None:
    """Raise ValueError naming the lumen-growth setting that is out of range or of the wrong type."""
    for name, value in (("fraction", fraction), ("floor", floor)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise ValueError(f"lumen {name} must be a number in [0, 1), got {value!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"lumen steps must be an integer >= 0, got {steps!r}.")
    if vessel_steps is not None and (
        isinstance(vessel_steps, bool) or not isinstance(vessel_steps, int) or vessel_steps < 0
    ):
        raise ValueError(f"lumen vessel_steps must be None or an integer >= 0, got {vessel_steps!r}.")


class GrowToLumend(MapTransform):
    """Dictionary wrapper of :func:`grow_to_lumen` for (1, D, H, W) labels and the image on their grid.

    In inference and evaluation it runs after ``Invertd`` and the clean-up, on the labels at the input's
    own geometry, with the scaled image inverted onto that geometry beside them; in validation on the
    training grid.

    Args:
        keys: label keys, each (1, D, H, W) integer labels.
        image_key: the (1, D, H, W) scaled image on the labels' grid. Default ``"image"``.
        fraction, steps, floor, vessel_steps: see :func:`grow_to_lumen`. Default 0 (off); ``vessel_steps``
            None (``steps``).
        allow_missing_keys: as in MONAI.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        fraction: float = 0.0,
        steps: int = 0,
        floor: float = 0.0,
        vessel_steps: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        _check_growth(fraction, steps, floor, vessel_steps)
        self.image_key = image_key
        self.fraction = float(fraction)
        self.steps = int(steps)
        self.floor = float(floor)
        self.vessel_steps = vessel_steps

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.fraction <= 0 or self.steps == 0:
            return d
        for key in self.key_iterator(d):
            labels, image = labels_and_image_of(d, key, self.image_key)
            grown = grow_to_lumen(labels, image, self.fraction, self.steps, self.floor, self.vessel_steps)
            d[key] = with_labels(d[key], grown)
        return d
