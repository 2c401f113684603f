"""Per-volume intensity scaling: lumen to 1, background to 0, and background-only volumes stay dark."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from scripts.data.intensity import RobustScaleIntensityd, fill_mask, robust_scale


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


def _outside_circle(shape) -> np.ndarray:
    """(D, H, W) mask of the outside of an axial circle of radius 0.45 * D (the first two axes in-plane)."""
    x, y = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape[:2]), indexing="ij")
    return np.broadcast_to((np.hypot(x, y) > 0.45 * shape[0])[:, :, None], shape).copy()


@pytest.mark.parametrize("vessels", [True, False])
def test_a_fill_brighter_than_the_tissue_is_not_taken_for_lumen(vessels):
    """A signed unit with the tissue far below 0 and the outside of the reconstruction circle filled with 0."""
    image = _volume(np.random.default_rng(3), vessels=vessels, offset=-28000.0)
    outside = _outside_circle(image.shape[1:])
    image[0][torch.as_tensor(outside)] = 0.0
    out = robust_scale(image)
    assert float(out[0][torch.as_tensor(outside)].abs().max()) == 0.0
    inside = out[0][torch.as_tensor(~outside)]
    if vessels:
        assert float(out[0, 21:25, 21:25, :].mean()) > 0.9
    else:
        assert float(inside.max()) < 0.4
    reference = robust_scale(_volume(np.random.default_rng(3), vessels=vessels, offset=-28000.0))
    away = torch.as_tensor(
        ~ndimage.binary_dilation(outside, iterations=2)
    )  # the edge of the circle is fill too
    torch.testing.assert_close(out[0][away], reference[0][away], atol=0.05, rtol=0)
    # without the rule the fill is the brightest value and maps to 1
    assert float(robust_scale(image, exclude_fill=False)[0][torch.as_tensor(outside)].min()) == 1.0


def test_fill_mask_is_a_bright_corner_constant_and_its_edge():
    image = np.random.default_rng(4).normal(100.0, 20.0, size=(1, 24, 24, 24)).astype(np.float32)
    assert fill_mask(image) is None  # noise in the corners: no fill
    outside = _outside_circle((24, 24, 24))
    image[0][outside] = 5000.0
    image[0, 0, 0, 0] = 5000.0 * (1 + 3e-6)  # as linear resampling of a constant leaves it
    image[0, 12, 12, 12] = 5000.0  # inside the circle: not connected to a corner, not fill
    assert np.array_equal(fill_mask(image, edge=0)[0], outside)
    mask = fill_mask(image)[0]
    grown = ndimage.binary_dilation(outside, iterations=2)
    assert np.array_equal(mask, grown) and not mask[12, 12, 12]
    image[0, -1, -1, -1] = 4000.0
    assert fill_mask(image) is None
    assert fill_mask(np.zeros((4, 4))) is None


def test_a_dark_fill_or_a_background_clipped_to_zero_is_left_alone():
    """A subtracted volume: background clipped to 0 around a vessel; no edge may be cut into the vessel."""
    rng = np.random.default_rng(6)
    image = np.clip(rng.normal(0.0, 20.0, size=(1, 32, 32, 32)), 0, None).astype(np.float32)
    image[0, 14:18, 14:18, :] = 1500.0
    assert fill_mask(image) is None
    out = robust_scale(torch.as_tensor(image))
    torch.testing.assert_close(out, robust_scale(torch.as_tensor(image), exclude_fill=False))
    assert float(out[0, 14:18, 14:18, :].min()) > 0.9
    image[0][_outside_circle((32, 32, 32))] = -1024.0  # a fill below the tissue
    assert fill_mask(image) is None


def test_the_partial_volume_edge_of_the_circle_maps_to_zero():
    """A fill of 0 over tissue at -28,000 leaves a ring of in-between values at the circle's edge."""
    image = _volume(np.random.default_rng(5), vessels=False, offset=-28000.0)
    outside = _outside_circle(image.shape[1:])
    ring = ndimage.binary_dilation(outside, iterations=1) & ~outside
    image[0][torch.as_tensor(outside)] = 0.0
    image[0][torch.as_tensor(ring)] = -14000.0
    out = robust_scale(image)
    assert float(out.max()) < 0.4


def test_exclude_fill_must_be_a_real_boolean():
    with pytest.raises(ValueError, match="intensity_exclude_fill must be True or False"):
        RobustScaleIntensityd("image", exclude_fill="false")
