"""Training crops: windows of plain background, of bright background and around hard negatives on request, found
exactly, still on the cache grid."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIGS

from scripts.data.crops import (
    CacheAlignedRandCropByLabelClassesd,
    aligned_starts,
    bright_background_voxels,
    empty_window_starts,
    prepared_voxels,
)


def _label() -> np.ndarray:
    label = np.zeros((40, 40, 30), np.uint8)
    label[2:12, 3:9, :] = 1  # a vessel along the slice axis, in one in-plane corner
    label[5:8, 9:12, 10:14] = 2
    return label


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_empty_windows_are_exactly_those_without_foreground(slice_axis):
    label, roi, grid = _label(), (16, 16, 16), 8
    found = {tuple(s) for s in empty_window_starts(label > 0, roi, grid, slice_axis=slice_axis)}
    # every start along the slice axis, grid-aligned starts along the two in-plane axes
    starts = [
        range(n - 16 + 1) if axis == slice_axis else aligned_starts(n, 16, grid)
        for axis, n in enumerate(label.shape)
    ]
    brute = {
        (a, b, c)
        for a in starts[0]
        for b in starts[1]
        for c in starts[2]
        if not label[a : a + 16, b : b + 16, c : c + 16].any()
    }
    assert found == brute and len(found) > 0


def test_no_empty_window_when_the_foreground_crosses_every_one():
    label = np.ones((20, 20, 20), bool)
    assert empty_window_starts(label, (8, 8, 8), 4, 2).shape == (0, 3)


@pytest.mark.parametrize("empty_ratio, expect_share", [(0.0, (0.0, 0.0)), (3.0, (0.55, 0.95))])
def test_empty_ratio_sets_the_share_of_background_only_crops(empty_ratio, expect_share):
    label = torch.as_tensor(_label()[None])
    crop = CacheAlignedRandCropByLabelClassesd(
        ["image", "label"], "label", (16, 16, 16), ratios=[0, 1, 1], num_samples=100, grid=8,
        empty_ratio=empty_ratio,
    )  # fmt: skip
    crop.set_random_state(0)
    samples = crop({"image": label.float(), "label": label})
    share = np.mean([not bool(s["label"].any()) for s in samples])
    assert expect_share[0] <= share <= expect_share[1]
    assert all(s["label"].shape == (1, 16, 16, 16) for s in samples)
    allowed = set(aligned_starts(40, 16, 8).tolist())
    assert all(a in allowed and b in allowed for a, b, _ in crop.randomize(_label()))


def test_negative_empty_ratio_is_refused():
    with pytest.raises(ValueError, match="empty_ratio"):
        CacheAlignedRandCropByLabelClassesd(["label"], "label", (8, 8, 8), ratios=[1], empty_ratio=-1)


def _image_with_bone() -> np.ndarray:
    """``_label()``'s lumen at 1 with a 0.95 rim around it, and an unlabelled bone plate at 0.9."""
    label = _label()
    image = np.full(label.shape, 0.05, np.float32)
    image[1:13, 2:10, :] = 0.95  # a bright rim within 1 voxel of the vessel (partial volume, blur)
    image[label > 0] = 1.0
    image[30:34, 20:38, 5:25] = 0.9  # bone, darker than this lumen: the tests darken the lumen
    return image


def test_bright_background_is_bone_as_bright_as_the_lumen_not_the_vessel_rim():
    label, image = _label(), _image_with_bone()
    image[label > 0] = 0.85  # the lumen's median now below the bone
    bright = np.zeros(label.size, bool)
    bright[bright_background_voxels(image, label)] = True
    bone = np.zeros(label.shape, bool)
    bone[30:34, 20:38, 5:25] = True
    assert (bright.reshape(label.shape) == bone).all()  # the plate: not the rim, not the dark background
    image[label > 0] = 1.0  # a lumen brighter than the bone: nothing qualifies
    assert bright_background_voxels(image, label).size == 0
    assert bright_background_voxels(image, np.zeros_like(label)).size == 0  # no lumen to compare with


@pytest.mark.parametrize("bright_ratio, expect_share", [(0.0, (0.0, 0.0)), (3.0, (0.45, 0.75))])
def test_bright_ratio_sets_the_share_of_crops_centred_on_bone(bright_ratio, expect_share):
    label, image = _label(), _image_with_bone()
    image[label > 0] = 0.85
    crop = CacheAlignedRandCropByLabelClassesd(
        ["image", "label"], "label", (16, 16, 16), ratios=[0, 1, 1], num_samples=100, grid=1,
        bright_ratio=bright_ratio,
    )  # fmt: skip
    crop.set_random_state(0)
    samples = crop({"image": torch.as_tensor(image[None]), "label": torch.as_tensor(label[None])})
    # crops centred on the vessel never reach the plate: the share of crops holding bone is the weight's, 3 / 5
    share = np.mean([bool((s["image"] == 0.9).any()) for s in samples])
    assert expect_share[0] <= share <= expect_share[1]


def test_bright_ratio_needs_the_image_and_a_non_negative_weight():
    with pytest.raises(ValueError, match="bright_ratio"):
        CacheAlignedRandCropByLabelClassesd(["label"], "label", (8, 8, 8), ratios=[1], bright_ratio=-1)
    crop = CacheAlignedRandCropByLabelClassesd(["label"], "label", (16, 16, 16), ratios=[1], bright_ratio=1)
    with pytest.raises(KeyError, match="image"):
        crop({"label": torch.as_tensor(_label()[None])})


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_in_plane_starts_are_on_the_grid_and_the_slice_axis_start_is_free(slice_axis):
    """Whatever axis slices are taken across, only the two in-plane starts snap to the cache grid."""
    shape, roi, grid = (40, 48, 56), (16, 16, 16), 8
    label = (np.random.default_rng(0).random(shape) < 0.05).astype(np.uint8)  # centres everywhere ...
    label[:, :, 28:] = 0  # ... but in the upper half of the last axis: background-only windows there
    crop = CacheAlignedRandCropByLabelClassesd(
        ["label"],
        "label",
        roi,
        ratios=[0, 1],
        num_samples=200,
        empty_ratio=1.0,
        grid=grid,
        slice_axis=slice_axis,
    )
    crop.set_random_state(0)
    starts = np.array(crop.randomize(label))
    centred = np.array([label[a : a + 16, b : b + 16, c : c + 16].any() for a, b, c in starts])
    assert 0 < centred.sum() < len(starts)  # crops on a labelled voxel, and background-only windows
    for axis, size in enumerate(shape):
        aligned = np.isin(starts[:, axis], aligned_starts(size, 16, grid))
        if axis == slice_axis:  # free for both kinds of crop
            for kind in (centred, ~centred):
                assert not aligned[kind].all() and len(np.unique(starts[kind, axis])) > size // grid
        else:
            assert aligned.all(), f"axis {axis} is in-plane for slice_axis={slice_axis}"
    samples = crop({"label": torch.as_tensor(label[None])})
    assert all(s["label"].shape == (1, *roi) for s in samples)


def _two_sacs() -> np.ndarray:
    """A vessel with a 1000-voxel sac at one end, two cubes that touch only at an edge (one component, 26-
    connected), and an 8-voxel sac at the other, 40 voxels apart."""
    label = np.zeros((64, 24, 24), np.uint8)
    label[:, 10:13, 10:13] = 1
    label[2:12, 13:18, 7:17] = 2
    label[2:12, 18:23, 17:22] = 2
    label[52:54, 13:15, 10:12] = 2
    return label


@pytest.mark.parametrize("component_classes, expect_share", [((), (0.0, 0.05)), ([2], (0.4, 0.6))])
def test_component_classes_give_a_small_aneurysm_as_many_crops_as_a_large_one(
    component_classes, expect_share
):
    crop = CacheAlignedRandCropByLabelClassesd(
        ["label"], "label", (16, 16, 16), ratios=[0, 0, 1], num_samples=200, grid=1,
        component_classes=component_classes,
    )  # fmt: skip
    crop.set_random_state(0)
    starts = np.array(crop.randomize(_two_sacs()))
    small = (starts[:, 0] <= 52) & (starts[:, 0] + 16 > 53)  # the crop holds the small sac
    assert (
        expect_share[0] <= small.mean() <= expect_share[1]
    )  # by voxels 8 / 1008; by sacs 1 / 2 (6-connected 1 / 3)


def test_component_classes_are_checked():
    for bad in ("2", [True], [3], [-1], [2.0], None):
        with pytest.raises(ValueError, match="component_classes"):
            CacheAlignedRandCropByLabelClassesd(
                ["label"], "label", (8, 8, 8), ratios=[1, 1, 1], component_classes=bad
            )
    crop = CacheAlignedRandCropByLabelClassesd(
        ["label"], "label", (16, 16, 16), ratios=[0, 1, 1], num_samples=20, component_classes=[2]
    )
    crop.set_random_state(0)  # a case without an aneurysm: crops on the vessel
    vessel_only = np.where(_two_sacs() == 2, 0, _two_sacs())
    assert all((s["label"] == 1).any() for s in crop({"label": torch.as_tensor(vessel_only[None])}))


HARD_NEGATIVE = (6, 5, 27)  # on _label()'s vessel, beyond a 16-voxel crop's reach from its aneurysm (z 10-13)


@pytest.mark.parametrize("hard_negative_ratio, expect_share", [(0.0, (0.0, 0.0)), (3.0, (0.6, 0.9))])
def test_hard_negative_ratio_sets_the_share_of_crops_around_a_hard_negative(
    hard_negative_ratio, expect_share
):
    label = torch.as_tensor(_label()[None])
    crop = CacheAlignedRandCropByLabelClassesd(
        ["label"], "label", (16, 16, 16), ratios=[0, 0, 1], num_samples=100, grid=1,
        hard_negative_ratio=hard_negative_ratio,
    )  # fmt: skip
    crop.set_random_state(0)
    data = {"label": label, "hard_negatives": np.array([HARD_NEGATIVE])}
    starts = np.array(crop.randomize(_label(), hard_negatives=data["hard_negatives"]))
    around = np.all((starts <= HARD_NEGATIVE) & (np.array(HARD_NEGATIVE) < starts + 16), axis=1)
    assert expect_share[0] <= around.mean() <= expect_share[1]  # the weight's share, 3 / 4
    samples = crop(data)
    assert all(set(s) == {"label"} for s in samples)  # the ragged positions do not reach the batch


def test_hard_negatives_are_checked():
    for bad in (-1, "1", True, None):
        with pytest.raises(ValueError, match="hard_negative_ratio"):
            CacheAlignedRandCropByLabelClassesd(
                ["label"], "label", (8, 8, 8), ratios=[1], hard_negative_ratio=bad
            )
    crop = CacheAlignedRandCropByLabelClassesd(
        ["label"], "label", (16, 16, 16), ratios=[1], hard_negative_ratio=1
    )
    with pytest.raises(ValueError, match="hard_negatives"):
        crop({"label": torch.as_tensor(_label()[None])})
    crop.set_random_state(0)  # a case without any: crops by class only
    samples = crop({"label": torch.as_tensor(_label()[None]), "hard_negatives": np.zeros((0, 3), int)})
    assert len(samples) == 1 and samples[0]["label"].shape == (1, 16, 16, 16)


def test_prepared_voxels_keep_a_plain_arrays_grid_and_drop_what_falls_outside():
    label = torch.zeros(1, 10, 10, 10)
    kept = prepared_voxels([[1, 2, 3], [9, 9, 9], [10, 0, 0], [-1, 5, 5]], label)
    assert kept.tolist() == [[1, 2, 3], [9, 9, 9]]
    assert prepared_voxels(np.zeros((0, 3)), label).shape == (0, 3)


def test_training_crops_find_a_hard_negative_through_reorientation_and_resampling(tmp_path):
    """configs/train.yaml with ``crop_hard_negative_ratio``: the datalist's voxel, in a file stored flipped at
    0.8 mm, is where the crops go after the preprocessing turns it to RAS at 0.4 mm."""
    from monai.bundle import ConfigParser

    shape, marker, sac = (40, 24, 20), (3, 4, 4), (34, 19, 15)
    label = np.zeros(shape, np.uint8)
    label[marker[0] : marker[0] + 2, marker[1] : marker[1] + 2, marker[2] : marker[2] + 2] = 1
    label[sac[0] : sac[0] + 2, sac[1] : sac[1] + 2, sac[2] : sac[2] + 2] = 2
    image = np.where(label > 0, 1000.0, 0.0).astype(np.float32) + np.random.default_rng(0).random(shape)
    affine = np.diag([-0.8, 0.8, 0.8, 1.0])  # stored right to left: RAS flips the first axis
    affine[:3, 3] = [20.0, -7.0, 3.0]
    for name, array in (("image", image), ("label", label)):
        nib.save(nib.Nifti1Image(array, affine), tmp_path / f"{name}.nii.gz")
    entry = {
        "image": "image.nii.gz",
        "label": "label.nii.gz",
        "info": {"hard_negatives": [{"centre_voxel": [3, 4, 4]}]},
    }
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [entry]}))

    def crops(hard_negative_ratio):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "train.yaml"))
        parser.update(
            {"bundle_root": str(CONFIGS.parent), "datalist": str(tmp_path / "dataset.json"), "roi_size": [32] * 3,
             "crop_grid": 8, "crop_ratios": [0, 0, 1], "crop_empty_ratio": 0.0, "samples_per_case": 20,
             "crop_hard_negative_ratio": hard_negative_ratio}
        )  # fmt: skip
        (case,) = parser.get_parsed_content("train#dataset#data")
        preprocessing = parser.get_parsed_content("train#preprocessing")
        preprocessing.set_random_state(0)
        return preprocessing(case)

    on_negatives = crops(1e6)
    assert on_negatives[0]["label"].shape == (1, 32, 32, 32) and "hard_negatives" not in on_negatives[0]
    assert all((s["label"] == 1).any() and not (s["label"] == 2).any() for s in on_negatives)
    on_sac = crops(0.0)  # the sac sits where the marker would be without the flip
    assert all((s["label"] == 2).any() and not (s["label"] == 1).any() for s in on_sac)
