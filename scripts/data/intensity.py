"""Per-volume intensity scaling for 3DRA that does not turn plain background into bright structure.

3DRA comes in arbitrary units (12-bit counts, HU-like, 0..1), so every volume is scaled by its own
statistics. Scaling by low and high percentiles alone (as MONAI's ``ScaleIntensityRangePercentiles``
does) maps the top 0.5 % of voxels to 1 whatever they are: in a volume with few or no vessels, noise and
soft-tissue texture are stretched to the lumen's brightness, and a frozen 2D encoder that sees the slice
takes them for bright structure.

:class:`RobustScaleIntensityd` maps the background level (the median, since the lumen fills a few
percent of a 3DRA volume) to 0 and ``median + scale`` to 1, clipping to [0, 1], where
``scale = max(p_upper - median, noise_floor * sigma)`` and ``sigma`` is the background noise estimated
from the median absolute deviation (``1.4826 * MAD``). With vessels present ``p_upper`` lies in the lumen
and decides; in a volume of background only, ``p_upper`` is a few noise standard deviations away and the
noise floor keeps the image dark instead of stretching it. A constant volume (blank) maps to zeros.

Many reconstructions set the outside of the axial reconstruction circle to one constant (0, the unit's
floor, -1024, ...), which can be brighter than every tissue value: in a signed unit with the tissue at
-28,000, a fill of 0 would be the "lumen". When all eight corners of the volume hold the same value and it
is brighter than the median of the other voxels, the voxels at that value that connect to a corner, and the
partial-volume edge of the circle, are taken as fill: they are left out of the statistics and mapped to 0.
A fill darker than the tissue maps to 0 anyway and is left alone, as is a background clipped to 0 (a
subtracted volume), whose edge must not be cut into the vessels.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from scripts.switches import check_switch

__all__ = ["RobustScaleIntensityd", "fill_mask", "robust_scale"]

_MAD_TO_SIGMA = 1.4826  # MAD of a Gaussian is 0.6745 sigma


def fill_mask(image: np.ndarray, edge: int = 2) -> np.ndarray | None:
    """A constant brighter than the tissue that fills the volume's eight corners (outside the reconstruction
    circle), and its edge.

    The fill is the voxels at the corners' value that connect to a corner; the ``edge`` voxels next to it are
    added, because the boundary of the circle is partial-volume (between the fill and the tissue) and would
    be a bright ring.

    Args:
        image: (..., D, H, W) intensities; the corners are those of the last three axes, and a voxel is fill
            only if it is in every leading index (channel).
        edge: voxels added around the fill. Default 2.

    Returns:
        boolean array of ``image``'s shape, or ``None`` when the corners differ (no fill), the corner value is
        not above the median of the other voxels (a dark fill, or a background clipped to 0), there are no
        other voxels (a constant volume) or ``image`` has fewer than three axes. Values within a relative
        1e-5 of the corner value count, so that a fill resampled by linear interpolation is still found.
    """
    if image.ndim < 3:
        return None
    corners = image[..., [0, -1], :, :][..., [0, -1], :][..., [0, -1]].ravel()
    value = corners[0]
    tolerance = 1e-5 * max(1.0, abs(float(value)))
    if np.abs(corners - value).max() > tolerance:
        return None
    equal = (np.abs(image - value) <= tolerance).reshape(-1, *image.shape[-3:]).all(axis=0)
    components, _ = ndimage.label(equal)
    touching = np.unique(components[[0, -1]][:, [0, -1]][:, :, [0, -1]])
    fill = np.isin(components, touching[touching > 0])
    rest = image.reshape(-1, *image.shape[-3:])[:, ~fill]
    if not rest.size or float(value) <= float(np.median(rest)):  # a constant volume, or a dark fill
        return None
    if edge > 0:
        fill = ndimage.binary_dilation(fill, iterations=edge)
    return np.array(np.broadcast_to(fill, image.shape))


def robust_scale(
    image: torch.Tensor, upper_percentile: float = 99.9, noise_floor: float = 15.0, exclude_fill: bool = True
) -> torch.Tensor:
    """Scale one volume to [0, 1]: background median to 0, lumen level to 1.

    Args:
        image: (C, D, H, W) or any shape; statistics are over all its values but the fill.
        upper_percentile: the percentile taken as the lumen level when vessels are present. Default 99.9.
        noise_floor: ``median + noise_floor * sigma`` is the least that maps to 1. Default 15.
        exclude_fill: leave the constant outside the reconstruction circle (:func:`fill_mask`) out of the
            statistics and map it to 0. Default True.

    Returns:
        float32 tensor of ``image``'s shape (a MetaTensor stays one, its metadata kept).
    """
    array = image.detach().float().cpu().numpy()
    fill = fill_mask(array) if exclude_fill else None
    values = array.ravel() if fill is None else array[~fill]
    median = float(np.median(values))
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(values - median)))
    upper = float(np.percentile(values, upper_percentile))
    scale = max(upper - median, noise_floor * sigma)
    out = image.float() - median
    if scale > 0:
        out = out / scale
    if fill is not None:
        out[torch.as_tensor(fill, device=out.device)] = 0.0
    return out.clamp_(0.0, 1.0)


class RobustScaleIntensityd(MapTransform):
    """Dictionary wrapper of :func:`robust_scale`.

    Args:
        keys: image keys.
        upper_percentile: see :func:`robust_scale`. Default 99.9.
        noise_floor: see :func:`robust_scale`. Default 15.
        exclude_fill: see :func:`robust_scale`. Default True.
        allow_missing_keys: as in MONAI.
    """

    def __init__(
        self,
        keys: KeysCollection,
        upper_percentile: float = 99.9,
        noise_floor: float = 15.0,
        exclude_fill: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 50.0 < upper_percentile <= 100.0:
            raise ValueError(f"upper_percentile must be in (50, 100], got {upper_percentile}.")
        if noise_floor < 0:
            raise ValueError(f"noise_floor must be >= 0, got {noise_floor}.")
        self.upper_percentile = upper_percentile
        self.noise_floor = noise_floor
        check_switch("intensity_exclude_fill", exclude_fill)
        self.exclude_fill = exclude_fill

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key] if isinstance(d[key], torch.Tensor) else torch.as_tensor(np.asarray(d[key]))
            d[key] = robust_scale(image, self.upper_percentile, self.noise_floor, self.exclude_fill)
        return d
