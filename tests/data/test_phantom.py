"""Phantoms (``generate_case``): determinism, arrays, labels and affine, aneurysms on their vessels.

Look-alikes are labelled vessel, and the lumen boundary is rendered with partial volume.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from scripts.data import generate_case, generate_geometry, get_centre, phantom_affine

SEEDS = [0, 1, 2, 3, 4, 5]
# look-alikes that must stay below aneurysm size: a wall bump below the smallest dome, an infundibulum < 3 mm
SMALL_LOOKALIKES = {"wall_bump": get_centre("A").aneurysm_min_mm, "infundibulum": 3.0}


@pytest.fixture(scope="module")
def cases():
    """A handful of default-centre cases, rendered once."""
    return {seed: generate_case(seed) for seed in SEEDS}


def _ball(label: np.ndarray, centre_voxel, radius_mm: float, spacing) -> np.ndarray:
    """Label values inside a ball of ``radius_mm`` around ``centre_voxel``."""
    spacing = np.asarray(spacing)
    centre = np.asarray(centre_voxel)
    reach = np.ceil(radius_mm / spacing).astype(int)
    low = np.maximum(centre - reach, 0)
    high = np.minimum(centre + reach + 1, label.shape)
    grids = np.meshgrid(*[np.arange(lo, hi) for lo, hi in zip(low, high, strict=True)], indexing="ij")
    dist = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing, strict=True)))
    return label[tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))][dist <= radius_mm]


def test_same_seed_same_case_different_seed_different_case(cases):
    again = generate_case(SEEDS[1])
    np.testing.assert_array_equal(again.image, cases[SEEDS[1]].image)
    np.testing.assert_array_equal(again.label, cases[SEEDS[1]].label)
    assert again.info == cases[SEEDS[1]].info
    other = cases[SEEDS[2]]
    assert not np.array_equal(other.image, again.image)
    assert not np.array_equal(other.label, again.label)


@pytest.mark.parametrize("seed", SEEDS)
def test_arrays_labels_and_affine(cases, seed):
    case = cases[seed]
    centre = get_centre("A")
    assert case.image.shape == case.label.shape == centre.shape
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert set(np.unique(case.label).tolist()) <= {0, 1, 2}
    assert (case.label == 1).sum() > 1000, "a vessel tree must be visible"
    assert ((case.label == 2).sum() > 0) == (case.info["num_aneurysms"] > 0)
    assert case.spacing == centre.spacing
    np.testing.assert_allclose(case.affine, phantom_affine(centre.shape, centre.spacing))
    np.testing.assert_allclose(np.diag(case.affine)[:3], centre.spacing)
    assert np.all(np.isfinite(case.image))


@pytest.mark.parametrize("seed", SEEDS)
def test_every_aneurysm_component_touches_vessel(cases, seed):
    label = cases[seed].label
    components, count = ndimage.label(label == 2, structure=np.ones((3, 3, 3)))
    near_vessel = ndimage.binary_dilation(label == 1, structure=np.ones((3, 3, 3)))
    for index in range(1, count + 1):
        assert near_vessel[components == index].any(), f"seed {seed}: aneurysm component {index} floats"
    for record in cases[seed].info["aneurysms"]:
        assert record["voxels"] > 20, f"seed {seed}: aneurysm {record} barely drawn"


@pytest.mark.parametrize("seed", SEEDS)
def test_hard_negatives_are_labelled_vessel(cases, seed):
    case = cases[seed]
    negatives = case.info["hard_negatives"]
    assert negatives, f"seed {seed}: no hard negative"
    for neg in negatives:
        if neg["kind"] in SMALL_LOOKALIKES:  # the others are normal vessels: wide, curved or branching
            assert neg["size_mm"] < SMALL_LOOKALIKES[neg["kind"]], f"seed {seed}: {neg} is aneurysm-sized"
        assert case.label[tuple(neg["centre_voxel"])] == 1, f"seed {seed}: {neg} is not vessel"
        values = _ball(case.label, neg["centre_voxel"], neg["radius_mm"], case.spacing)
        assert not np.any(values == 2), f"seed {seed}: {neg} overlaps an aneurysm label"


def test_partial_volume_at_the_lumen_boundary(cases):
    """Rendered from a signed distance: boundary voxels are darker than the lumen core, brighter than tissue."""
    case = cases[SEEDS[0]]
    vessel = case.label > 0
    core = ndimage.binary_erosion(vessel, iterations=2)
    rim = vessel & ~ndimage.binary_erosion(vessel)
    outside = ~ndimage.binary_dilation(vessel, iterations=4)
    units = case.info["appearance"]["units"]
    canonical = (case.image - units["offset"]) / units["scale"]  # back to AU, whatever units were drawn
    core_i, rim_i, bg_i = (float(np.median(canonical[m])) for m in (core, rim, outside))
    assert bg_i + 0.2 * (core_i - bg_i) < rim_i < core_i - 0.1 * (core_i - bg_i)
    assert 600 < core_i < 2100 and bg_i < 0.5 * core_i


@pytest.mark.parametrize("seed", [-1, 1.5, "3"])
def test_bad_seed_raises(seed):
    with pytest.raises(ValueError, match="seed"):
        generate_geometry(seed)
