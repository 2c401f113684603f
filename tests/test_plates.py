"""Vessel labels on bone plates: removed where the image is a sheet, kept on tubes of any calibre."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import bone_scene, inference_config, shipped_settings
from monai.data import MetaTensor
from monai.transforms import Compose

from scripts.plates import RemovePlatesd, remove_plates

SPACING = (0.5, 0.5, 0.5)  # bone_scene's


DEFAULTS = shipped_settings(
    "postprocess_plate_", ("sigmas_mm", "max_ratio", "min_strength", "min_mm3", "aneurysm_ratio")
)


@pytest.mark.parametrize("tube_radius_mm", [1.0, 1.5, 2.5])
def test_the_plate_goes_and_the_artery_and_its_sac_stay(tube_radius_mm):
    image, label, tube, slab, sac = bone_scene(tube_radius_mm)
    out = remove_plates(label, image, SPACING, **DEFAULTS)
    plate_vessel = slab & (label == 1)
    assert (out[plate_vessel] == 0).mean() > 0.8  # the plate's rim, a tube-like edge, may stay
    assert (out[tube & ~sac] == 1).mean() > 0.95
    np.testing.assert_array_equal(out[sac], 2)
    np.testing.assert_array_equal(out[slab & (label == 2)], 0)  # the false aneurysm on the bone goes with it
    np.testing.assert_array_equal(label[plate_vessel], 1)  # the input is left alone
    kept = remove_plates(label, image, SPACING, **{**DEFAULTS, "aneurysm_ratio": 0.0})
    np.testing.assert_array_equal(kept[label == 2], 2)  # at 0 aneurysm labels are never changed


def test_a_sac_on_its_artery_stays_where_its_dome_touches_the_plate():
    # a sac rising from the artery to the plate (a paraclinoid aneurysm against the clinoid): it touches the
    # plate at its dome and the artery at its neck, far more voxels of the one than of the other
    image, label, tube, slab, _ = bone_scene()
    x, y, z = np.meshgrid(*[np.arange(56) * 0.5] * 3, indexing="ij")
    dome = ((x - 20.0) ** 2 + (y - 14.0) ** 2 + (z - 13.2) ** 2 <= 4.5**2) & ~tube & ~slab
    label[dome] = 2
    out = remove_plates(label, image, SPACING, **DEFAULTS)
    assert (out[slab & (label == 1)] == 0).mean() > 0.8  # the plate around it goes
    np.testing.assert_array_equal(out[dome], 2)
    # with a ratio below its own (plate contact over artery contact) it would go
    assert (remove_plates(label, image, SPACING, **{**DEFAULTS, "aneurysm_ratio": 0.01})[dome] == 0).all()


def test_a_wide_artery_is_a_tube_at_the_larger_scale():
    # a 5 mm internal carotid: at 2 mm alone its wall is a sheet; the 3 mm scale keeps it
    image, label, tube, _, _ = bone_scene(2.5, plate=False)
    only_small = remove_plates(label, image, SPACING, **{**DEFAULTS, "sigmas_mm": (2.0,)})
    assert (only_small[tube] == 1).mean() < 0.8
    assert (remove_plates(label, image, SPACING, **DEFAULTS)[tube] == 1).mean() > 0.98


def test_regions_below_the_volume_bound_and_empty_scales_are_left_alone():
    image, label, _, slab, _ = bone_scene()
    plate_mm3 = slab.sum() * np.prod(SPACING)
    np.testing.assert_array_equal(
        remove_plates(label, image, SPACING, **{**DEFAULTS, "min_mm3": 1.5 * plate_mm3}), label
    )
    np.testing.assert_array_equal(
        remove_plates(label, image, SPACING, **{**DEFAULTS, "sigmas_mm": []}), label
    )
    blank = np.zeros_like(label)
    np.testing.assert_array_equal(remove_plates(blank, image, SPACING, **DEFAULTS), blank)


def test_scales_are_in_mm():
    # the same scene at 1 mm a voxel is a scene twice as large: its plate is 6 mm thick, and a 4 mm scale
    # (2 mm at the test's true 0.5 mm) finds it where a 2 mm scale (1 mm) is too fine for it
    image, label, _, slab, _ = bone_scene()
    at_1mm = {**DEFAULTS, "min_mm3": 8 * DEFAULTS["min_mm3"]}
    np.testing.assert_array_equal(
        remove_plates(label, image, (1.0, 1.0, 1.0), **{**at_1mm, "sigmas_mm": (4.0, 6.0)}),
        remove_plates(label, image, SPACING, **DEFAULTS),
    )


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("sigmas_mm", 2.0, "plate sigmas_mm must be a list"),
        ("sigmas_mm", "2", "plate sigmas_mm must be a list"),
        ("sigmas_mm", [2.0, 0.0], "plate sigmas_mm must be a list"),
        ("sigmas_mm", [True], "plate sigmas_mm must be a list"),
        ("max_ratio", 0.0, "plate max_ratio must be a number in"),
        ("max_ratio", 1.5, "plate max_ratio must be a number in"),
        ("max_ratio", "false", "plate max_ratio must be a number in"),
        ("min_strength", -0.1, "plate min_strength must be a number >= 0"),
        ("min_mm3", float("nan"), "plate min_mm3 must be a number >= 0"),
        ("aneurysm_ratio", -1.0, "plate aneurysm_ratio must be a number >= 0"),
        ("aneurysm_ratio", "false", "plate aneurysm_ratio must be a number >= 0"),
    ],
)
def test_settings_out_of_range_are_refused_by_name(setting, value, message):
    image, label, *_ = bone_scene()
    with pytest.raises(ValueError, match=message):
        remove_plates(label, image, SPACING, **{**DEFAULTS, setting: value})
    with pytest.raises(ValueError, match=message):
        RemovePlatesd("pred", **{**DEFAULTS, setting: value})


def test_dictionary_transform_reads_the_spacing_from_the_affine_and_checks_the_grid():
    image, label, *_ = bone_scene()
    affine = torch.diag(torch.tensor([*SPACING, 1.0], dtype=torch.float64))
    data = {
        "pred": MetaTensor(torch.as_tensor(label[None]), affine=affine),
        "lumen_image": torch.as_tensor(image[None]),
    }
    out = RemovePlatesd("pred", image_key="lumen_image", **DEFAULTS)(data)
    np.testing.assert_array_equal(out["pred"][0].numpy(), remove_plates(label, image, SPACING, **DEFAULTS))
    assert isinstance(out["pred"], MetaTensor) and torch.equal(out["pred"].affine, affine)
    np.testing.assert_array_equal(data["pred"][0].numpy(), label)
    data["lumen_image"] = data["lumen_image"][:, :-1]
    with pytest.raises(ValueError, match="pred: expected .* on the grid of lumen_image"):
        RemovePlatesd("pred", image_key="lumen_image", **DEFAULTS)(data)
    with pytest.raises(ValueError, match="one shape"):
        remove_plates(label, image[:-1], SPACING, **DEFAULTS)


def test_the_shipped_chain_leaves_no_piece_of_a_removed_plate():
    # a 2 mm plate: along its rims the image is an edge, not a sheet, and the plate rule leaves four pieces of
    # about 10 mm^3 there; the steps the inference workflow runs after it take them, and keep the artery
    image, label, tube, slab, sac = bone_scene(plate_thickness_mm=2.0)
    parser = inference_config()
    steps = parser["postprocessing"]["transforms"]
    from_plates = steps[steps.index("@remove_plates") : -1]  # up to the writer of the case's outputs
    assert "WriteCaseOutputsd" in steps[-1]["_target_"]
    chain = Compose([parser.get_parsed_content(step.removeprefix("@")) for step in from_plates])
    affine = torch.diag(torch.tensor([*SPACING, 1.0], dtype=torch.float64))
    data = {
        "pred": MetaTensor(torch.as_tensor(label[None]), affine=affine),
        "lumen_image": torch.as_tensor(image[None]),
    }
    pieces = remove_plates(label, image, SPACING, **DEFAULTS)
    assert 200 < (pieces[slab] > 0).sum() < 0.2 * slab.sum()
    out = chain(data)["pred"][0].numpy()
    assert not out[slab].any()
    np.testing.assert_array_equal(out[tube | sac], pieces[tube | sac])
