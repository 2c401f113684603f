"""Post-processing of predicted labels: specks, detached and small aneurysms, at the real voxel volume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import blurred_lumen_scene, flat_aneurysm_scene, postprocessing_scene, shipped_settings
from monai.data import MetaTensor
from scipy import ndimage

from scripts.postprocessing import (
    CleanSegmentationd,
    GrowToLumend,
    SuppressDarkForegroundd,
    clean_segmentation,
    grow_to_lumen,
)


def test_off_by_default():
    np.testing.assert_array_equal(
        clean_segmentation(postprocessing_scene(), (1.0, 1.0, 1.0)), postprocessing_scene()
    )


def test_each_rule_does_its_own_job():
    label = postprocessing_scene()
    specks = clean_segmentation(label, (1.0, 1.0, 1.0), min_component_mm3=2.0)
    assert specks[25, 25, 25] == 0 and (specks == 2).sum() == (label == 2).sum()
    detached = clean_segmentation(label, (1.0, 1.0, 1.0), detached_aneurysm_label=0)
    assert (detached[2:6, 2:6, 2:6] == 0).all() and (detached[10:15, 17:22, 13:18] == 2).all()
    small = clean_segmentation(label, (1.0, 1.0, 1.0), min_aneurysm_mm3=10.0)
    assert (small[20:22, 17:19, 14:16] == 1).all()  # touches the vessel: becomes vessel
    assert (small[10:15, 17:22, 13:18] == 2).all() and (small[2:6, 2:6, 2:6] == 2).all()


def test_volumes_use_the_spacing():
    # 8 voxels of 0.5^3 mm^3 = 1 mm^3: kept at a 0.9 mm^3 bound, turned into vessel at 1.1
    label = postprocessing_scene()
    kept = clean_segmentation(label, (0.5, 0.5, 0.5), min_aneurysm_mm3=0.9)
    assert (kept[20:22, 17:19, 14:16] == 2).all()
    gone = clean_segmentation(label, (0.5, 0.5, 0.5), min_aneurysm_mm3=1.1)
    assert (gone[20:22, 17:19, 14:16] == 1).all()


def test_dictionary_transform_reads_the_spacing_from_the_affine():
    affine = torch.tensor([[0.0, 0.0, 0.5, 0.0], [0.5, 0.0, 0.0, 0.0], [0.0, -0.5, 0.0, 0.0], [0, 0, 0, 1.0]])
    pred = MetaTensor(torch.as_tensor(postprocessing_scene()[None]), affine=affine)
    out = CleanSegmentationd("pred", min_aneurysm_mm3=1.1)({"pred": pred})["pred"]
    assert out.shape == pred.shape and (out[0, 20:22, 17:19, 14:16] == 1).all()
    assert (pred[0, 20:22, 17:19, 14:16] == 2).all()  # the input is left alone
    with pytest.raises(ValueError, match="detached_aneurysm_label"):
        CleanSegmentationd("pred", detached_aneurysm_label=2)


def _vessel_scene() -> tuple[MetaTensor, MetaTensor]:
    """A bright tube (lumen 1.0) with noise around it, and probabilities that call the tube, a dark corner and
    a face of the volume foreground (what a model did on a blank volume)."""
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 0.02, (1, 24, 24, 24)).astype(np.float32)
    image[0, 10:14, 10:14, :] = 1.0
    probabilities = np.zeros((3, 24, 24, 24), np.float32)
    probabilities[0] = 1
    for box in (np.s_[10:14, 10:14, :], np.s_[0:3, 0:3, 0:3], np.s_[:, :, 0]):
        probabilities[(0, *box)], probabilities[(1, *box)] = 0.2, 0.8
    affine = torch.diag(torch.tensor([0.4, 0.4, 0.4, 1.0]))
    return MetaTensor(image, affine=affine), MetaTensor(probabilities, affine=affine)


def test_dark_foreground_becomes_background_and_lumen_stays():
    image, probabilities = _vessel_scene()
    out = SuppressDarkForegroundd("pred", min_intensity=0.1)({"image": image, "pred": probabilities})["pred"]
    labels = out.argmax(0)
    assert (labels[10:14, 10:14, 1:] == 1).all()  # the lumen, its edge voxels included
    assert (labels[0:3, 0:3, 0:3] == 0).all() and (labels[:9, :9, 0] == 0).all()
    torch.testing.assert_close(out.sum(0), torch.ones(24, 24, 24))  # still probabilities
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, probabilities.affine)  # Invertd needs it


def test_a_blank_volume_gets_no_foreground_and_zero_turns_the_rule_off():
    _, probabilities = _vessel_scene()
    blank = MetaTensor(torch.zeros(1, 24, 24, 24))
    out = SuppressDarkForegroundd("pred", min_intensity=0.1)({"image": blank, "pred": probabilities})["pred"]
    assert (out.argmax(0) == 0).all()
    off = SuppressDarkForegroundd("pred", min_intensity=0.0)({"image": blank, "pred": probabilities})["pred"]
    assert torch.equal(off, probabilities)


@pytest.mark.parametrize(
    "image, settings, message",
    [
        (torch.zeros(1, 24, 24, 23), {}, "image's grid"),
        (torch.zeros(24, 24, 24), {}, r"\(1, D, H, W\) image"),
        (torch.zeros(1, 24, 24, 24), {"min_intensity": 1.0}, "min_intensity"),
        (torch.zeros(1, 24, 24, 24), {"min_intensity": -0.1}, "min_intensity"),
    ],
)
def test_dark_rule_refuses_what_it_cannot_read(image, settings, message):
    _, probabilities = _vessel_scene()
    with pytest.raises(ValueError, match=message):
        SuppressDarkForegroundd("pred", **{"min_intensity": 0.1, **settings})(
            {"image": image, "pred": probabilities}
        )


def test_islands_below_a_fraction_of_the_largest_component_go():
    label = np.zeros((40, 40, 40), np.uint8)
    label[5:35, 18:22, 18:22] = 1  # the tree: 480 voxels
    label[18:22, 22:25, 18:22] = 2  # an aneurysm on it
    label[2:5, 2:5, 2:5] = 1  # an island of 27 voxels (5.6 % of the tree and its aneurysm, 528 voxels)
    label[30:33, 30:33, 30:33] = 2  # an aneurysm island, 27 voxels
    for fraction, island_kept in ((0.05, True), (0.06, False)):
        out = clean_segmentation(label, (1.0, 1.0, 1.0), min_component_fraction=fraction)
        assert bool(out[3, 3, 3]) == island_kept and bool(out[31, 31, 31]) == island_kept
        np.testing.assert_array_equal(
            out[5:35, 18:25, 18:22], label[5:35, 18:25, 18:22]
        )  # the tree stays whole
    with pytest.raises(ValueError, match="min_component_fraction"):
        clean_segmentation(label, (1.0, 1.0, 1.0), min_component_fraction=1.5)


@pytest.mark.parametrize("rule", [{"min_aneurysm_height_mm": 2.0}, {"min_aneurysm_aspect_ratio": 0.5}])
def test_flat_aneurysms_along_a_vessel_become_vessel(rule):
    label = flat_aneurysm_scene()
    out = clean_segmentation(label, (1.0, 1.0, 1.0), **rule)
    assert (out[18:25, 17, 14:17] == 1).all()
    assert (out[5:10, 17:22, 13:18] == 2).all()
    assert (out[label != 2] == label[label != 2]).all()


def test_flat_rule_measures_in_millimetres_and_spares_detached_aneurysms():
    label = flat_aneurysm_scene()
    label[2:6, 2:6, 2:6] = 2  # touches no vessel: no neck to measure, left to the detached rule
    # the protruding one rises 5 voxels: 2.5 mm at 0.5 mm spacing
    fine = clean_segmentation(label, (0.5, 0.5, 0.5), min_aneurysm_height_mm=2.0)
    assert (fine[5:10, 17:22, 13:18] == 2).all()
    finer = clean_segmentation(label, (0.5, 0.5, 0.5), min_aneurysm_height_mm=3.0)
    assert (finer[5:10, 17:22, 13:18] == 1).all() and (finer[2:6, 2:6, 2:6] == 2).all()
    with pytest.raises(ValueError, match="min_aneurysm_height_mm"):
        clean_segmentation(label, (1.0, 1.0, 1.0), min_aneurysm_height_mm=-1.0)
    with pytest.raises(ValueError, match="min_aneurysm_aspect_ratio"):
        CleanSegmentationd("pred", min_aneurysm_aspect_ratio=-0.1)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_labels_grow_to_the_half_maximum_edge_of_the_lumen_and_no_further():
    image, truth, inner = blurred_lumen_scene()
    grown = grow_to_lumen(inner, image, fraction=0.4, steps=6)
    for label in (1, 2):
        assert _dice(inner == label, truth == label) < 0.85
        assert _dice(grown == label, truth == label) > 0.95
    # the dark background (noise 2 % of the lumen) is never reached, six steps or not
    assert not (grown[ndimage.gaussian_filter(image, 1.0) < 0.2] > 0).any()
    assert (inner == grown)[inner > 0].all()  # labels already there stay


def test_each_step_adds_at_most_one_voxel_layer():
    image = np.ones((20, 20, 20), np.float32)  # a bright slab: only the steps stop the growth
    label = np.zeros((20, 20, 20), np.uint8)
    label[10, 10, 10] = 1
    for steps in (1, 3):
        grown = grow_to_lumen(label, image, fraction=0.4, steps=steps)
        reach = ndimage.binary_dilation(
            label > 0, structure=ndimage.generate_binary_structure(3, 1), iterations=steps
        )
        np.testing.assert_array_equal(grown > 0, reach)


def test_the_floor_keeps_a_label_on_a_bright_texture_from_spreading_over_it():
    rng = np.random.default_rng(0)
    texture = rng.uniform(0.0, 0.18, (20, 20, 20)).astype(np.float32)  # a background texture, under the floor
    texture[8:12, 8:12, 8:12] = 0.19  # a bump of it that a model called vessel
    label = np.zeros((20, 20, 20), np.uint8)
    label[8:12, 8:12, 8:12] = 1
    np.testing.assert_array_equal(grow_to_lumen(label, texture, fraction=0.4, steps=6, floor=0.2), label)
    data = {"pred": MetaTensor(torch.as_tensor(label[None])), "image": torch.as_tensor(texture[None])}
    np.testing.assert_array_equal(
        GrowToLumend("pred", fraction=0.4, steps=6, floor=0.2)(data)["pred"][0], label
    )
    assert (grow_to_lumen(label, texture, fraction=0.4, steps=6) > 0).sum() > 8 * label.sum()
    lumen = texture + 0.5  # the same labels in a lumen: the floor does not stop the growth
    assert (grow_to_lumen(label, lumen, fraction=0.4, steps=1, floor=0.2) > 0).sum() > label.sum()


def test_a_grown_voxel_takes_its_neighbour_s_label_aneurysm_over_vessel():
    image = np.ones((9, 9, 9), np.float32)
    label = np.zeros((9, 9, 9), np.uint8)
    label[4, 4, 2], label[4, 4, 6] = 1, 2  # vessel on one side, aneurysm on the other
    grown = grow_to_lumen(label, image, fraction=0.4, steps=1)
    assert grown[4, 4, 1] == 1 and grown[4, 4, 7] == 2
    label[4, 4, 4] = 1
    grown = grow_to_lumen(label, image, fraction=0.4, steps=1)
    assert grown[4, 4, 5] == 2  # between vessel and aneurysm: aneurysm


def test_vessel_grows_only_its_own_layers_while_aneurysm_grows_all():
    image = np.ones((21, 21, 21), np.float32)  # a bright slab (a bone plate): only the steps stop the growth
    label = np.zeros((21, 21, 21), np.uint8)
    label[10, 10, 3], label[10, 10, 17] = 1, 2
    faces = ndimage.generate_binary_structure(3, 1)
    grown = grow_to_lumen(label, image, fraction=0.4, steps=4, vessel_steps=1)
    for value, steps in ((1, 1), (2, 4)):
        reach = ndimage.binary_dilation(label == value, structure=faces, iterations=steps)
        np.testing.assert_array_equal(grown == value, reach)
    data = {"pred": MetaTensor(torch.as_tensor(label[None])), "image": torch.as_tensor(image[None])}
    out = GrowToLumend("pred", fraction=0.4, steps=4, vessel_steps=1)(data)["pred"][0].numpy()
    np.testing.assert_array_equal(out, grown)
    # None: vessel grows every layer, as aneurysm does
    np.testing.assert_array_equal(
        grow_to_lumen(label, image, 0.4, 4, vessel_steps=None), grow_to_lumen(label, image, 0.4, 4)
    )
    # a cap above the steps is the steps: the growth turned off by steps 0 stays off with the default cap
    np.testing.assert_array_equal(
        grow_to_lumen(label, image, 0.4, 4, vessel_steps=9), grow_to_lumen(label, image, 0.4, 4)
    )
    np.testing.assert_array_equal(grow_to_lumen(label, image, 0.4, 0, vessel_steps=6), label)
    for vessel_steps in (-1, 1.0, True, "1"):
        with pytest.raises(ValueError, match="lumen vessel_steps"):
            grow_to_lumen(label, image, 0.4, 4, vessel_steps=vessel_steps)
        with pytest.raises(ValueError, match="lumen vessel_steps"):
            GrowToLumend("pred", fraction=0.4, steps=4, vessel_steps=vessel_steps)


def test_growth_is_off_at_zero_and_refuses_bad_settings():
    image, _, inner = blurred_lumen_scene()
    for fraction, steps in ((0.0, 6), (0.4, 0)):
        np.testing.assert_array_equal(grow_to_lumen(inner, image, fraction, steps), inner)
    blank = np.zeros_like(inner)
    np.testing.assert_array_equal(grow_to_lumen(blank, image, 0.4, 6), blank)
    for fraction, steps, floor, name in (
        (1.0, 6, 0.2, "fraction"),
        (-0.1, 6, 0.2, "fraction"),
        (True, 6, 0.2, "fraction"),
        ("0.4", 6, 0.2, "fraction"),
        (0.4, -1, 0.2, "steps"),
        (0.4, 2.5, 0.2, "steps"),
        (0.4, True, 0.2, "steps"),
        (0.4, 6, 1.0, "floor"),
        (0.4, 6, -0.2, "floor"),
        (0.4, 6, None, "floor"),
    ):
        with pytest.raises(ValueError, match=f"lumen {name}"):
            grow_to_lumen(inner, image, fraction, steps, floor)
        with pytest.raises(ValueError, match=f"lumen {name}"):
            GrowToLumend("pred", fraction=fraction, steps=steps, floor=floor)
    with pytest.raises(ValueError, match="one shape"):
        grow_to_lumen(inner, image[:-1], 0.4, 6)


def test_dictionary_transform_grows_on_the_named_image_and_checks_its_grid():
    image, truth, inner = blurred_lumen_scene()
    affine = torch.diag(torch.tensor([0.4, 0.4, 0.4, 1.0]))
    data = {
        "pred": MetaTensor(torch.as_tensor(inner[None]), affine=affine),
        "lumen_image": torch.as_tensor(image[None]),
    }
    out = GrowToLumend("pred", image_key="lumen_image", fraction=0.4, steps=6)(data)
    np.testing.assert_array_equal(out["pred"][0].numpy(), grow_to_lumen(inner, image, 0.4, 6))
    assert isinstance(out["pred"], MetaTensor) and torch.equal(out["pred"].affine, affine)
    np.testing.assert_array_equal(data["pred"][0].numpy(), inner)  # the input is left alone
    data["lumen_image"] = data["lumen_image"][:, :-1]
    with pytest.raises(ValueError, match="pred: expected .* on the grid of lumen_image"):
        GrowToLumend("pred", image_key="lumen_image", fraction=0.4, steps=6)(data)


def shipped_clean_up() -> dict:
    """The clean-up settings configs/inference.yaml ships."""
    keys = (
        "min_component_mm3",
        "min_aneurysm_mm3",
        "detached_aneurysm_label",
        "min_component_fraction",
        "min_aneurysm_height_mm",
        "min_aneurysm_aspect_ratio",
    )
    return shipped_settings("postprocess_", keys)


def speckle(shape=(80, 80, 80), count=60, seed=0) -> np.ndarray:
    """Labels a model gave a textured background without vessels (docs/recipe.md, 0.9.11): scattered
    specks of vessel and aneurysm, each a box of 1 to 4 voxels a side (0.5 mm voxels: up to 8 mm^3)."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.int64)
    for _ in range(count):
        size = rng.integers(1, 5, 3)
        corner = rng.integers(0, np.array(shape) - size)
        label[tuple(slice(c, c + s) for c, s in zip(corner, size, strict=True))] = rng.integers(1, 3)
    return label


def test_the_shipped_clean_up_leaves_nothing_of_speckle_in_a_volume_without_vessels():
    # the fraction rule alone keeps the largest speck and those near its size: no vessel tree sets the scale
    label, settings = speckle(), shipped_clean_up()
    assert ndimage.label(label > 0)[1] > 40
    assert not clean_segmentation(label, (0.5, 0.5, 0.5), **settings).any()
    assert clean_segmentation(label, (0.5, 0.5, 0.5), **{**settings, "min_component_mm3": 0.0}).any()


def test_the_shipped_clean_up_keeps_a_thin_artery_alone_in_its_volume():
    # 1 mm across and 40 mm long (31 mm^3), the only structure of a small field of view
    label = np.zeros((100, 20, 20), np.int64)
    _, yy, xx = np.mgrid[:100, :20, :20]
    label[(yy - 10) ** 2 + (xx - 10) ** 2 <= 1] = 1
    assert 25 < label.sum() * 0.4**3 < 40
    np.testing.assert_array_equal(clean_segmentation(label, (0.4, 0.4, 0.4), **shipped_clean_up()), label)
