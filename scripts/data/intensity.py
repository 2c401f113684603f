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
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["RobustScaleIntensityd", "robust_scale"]

_MAD_TO_SIGMA = 1.4826  # MAD of a Gaussian is 0.6745 sigma


def robust_scale(
    image: torch.Tensor, upper_percentile: float = 99.9, noise_floor: float = 15.0
) -> torch.Tensor:
    """Scale one volume to [0, 1]: background median to 0, lumen level to 1.

    Args:
        image: (C, D, H, W) or any shape; statistics are over all its values.
        upper_percentile: the percentile taken as the lumen level when vessels are present. Default 99.9.
        noise_floor: ``median + noise_floor * sigma`` is the least that maps to 1. Default 15.

    Returns:
        float32 tensor of ``image``'s shape (a MetaTensor stays one, its metadata kept).
    """
    values = image.detach().float().cpu().numpy().ravel()
    median = float(np.median(values))
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(values - median)))
    upper = float(np.percentile(values, upper_percentile))
    scale = max(upper - median, noise_floor * sigma)
    out = image.float() - median
    if scale > 0:
        out = out / scale
    return out.clamp_(0.0, 1.0)


class RobustScaleIntensityd(MapTransform):
    """Dictionary wrapper of :func:`robust_scale`.

    Args:
        keys: image keys.
        upper_percentile: see :func:`robust_scale`. Default 99.9.
        noise_floor: see :func:`robust_scale`. Default 15.
        allow_missing_keys: as in MONAI.
    """

    def __init__(
        self,
        keys: KeysCollection,
        upper_percentile: float = 99.9,
        noise_floor: float = 15.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 50.0 < upper_percentile <= 100.0:
            raise ValueError(f"upper_percentile must be in (50, 100], got {upper_percentile}.")
        if noise_floor < 0:
            raise ValueError(f"noise_floor must be >= 0, got {noise_floor}.")
        self.upper_percentile = upper_percentile
        self.noise_floor = noise_floor

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key] if isinstance(d[key], torch.Tensor) else torch.as_tensor(np.asarray(d[key]))
            d[key] = robust_scale(image, self.upper_percentile, self.noise_floor)
        return d
