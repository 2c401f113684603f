"""Per-volume intensity scaling: lumen to 1, background to 0, and background-only volumes stay dark."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.data.intensity import RobustScaleIntensityd, robust_scale


def _volume(rng, vessels: bool, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    image = rng.normal(100.0, 20.0, size=(1, 48, 48, 48))
    if vessels:
        image[0, 20:26, 20:26, :] = 1500.0 + rng.normal(0.0, 20.0, size=(6, 6, 48))
    return torch.as_tensor(image * scale + offset, dtype=torch.float32)


@pytest.mark.parametrize("scale, offset", [(1.0, 0.0), (0.001, 0.0), (2.0, -1024.0), (40.0, 3000.0)])
def test_lumen_maps_near_one_and_background_near_zero_in_any_units(scale, offset):
    image = _volume(np.random.default_rng(0), vessels=True, scale=scale, offset=offset)
    out = robust_scale(image)
    assert out.min() >= 0 and out.max() <= 1
    assert float(out[0, 21:25, 21:25, :].mean()) > 0.9
    assert float(out[0, :10].mean()) < 0.02


def test_a_background_only_volume_is_not_stretched_to_lumen_brightness():
    # percentile scaling (MONAI's ScaleIntensityRangePercentiles 0.5-99.5) would put 0.5 % of this noise at 1
    out = robust_scale(_volume(np.random.default_rng(1), vessels=False))
    assert float(out.max()) < 0.4
    assert float((out > 0.3).float().mean()) < 1e-4


@pytest.mark.parametrize("value", [0.0, 7.5])
def test_a_blank_volume_maps_to_zeros(value):
    out = robust_scale(torch.full((1, 8, 8, 8), value))
    assert torch.equal(out, torch.zeros_like(out))


def test_dictionary_transform_keeps_the_metadata():
    image = MetaTensor(
        _volume(np.random.default_rng(2), vessels=True), affine=torch.diag(torch.tensor([0.3, 0.3, 0.5, 1.0]))
    )
    out = RobustScaleIntensityd("image")({"image": image})["image"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    torch.testing.assert_close(out.affine, image.affine)
    with pytest.raises(ValueError, match="upper_percentile"):
        RobustScaleIntensityd("image", upper_percentile=40.0)
