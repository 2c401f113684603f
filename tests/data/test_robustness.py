"""Volumes without a vessel: written on their centre's grid, all-background labels, scored by scripts.score."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from scripts.data.centres import get_centre
from scripts.data.phantom import phantom_affine, render_background_only
from scripts.data.robustness import write_robustness_volumes
from scripts.labels import ANEURYSM_LABEL, VESSEL_LABEL
from scripts.score import score


def test_volumes_are_written_on_their_centres_grid_with_empty_labels(tmp_path):
    names = write_robustness_volumes(str(tmp_path), ["blank:A", "background:B:1000"])
    assert names == ["blank_A", "background_B_1000"]
    for name, centre in zip(names, ("A", "B"), strict=True):
        image = nib.load(tmp_path / "imagesTs" / f"{name}.nii.gz")
        label = nib.load(tmp_path / "labelsTs" / f"{name}.nii.gz")
        style = get_centre(centre)
        assert image.shape == label.shape == tuple(style.shape)
        np.testing.assert_allclose(image.affine, phantom_affine(style.shape, style.spacing), atol=1e-5)
        assert not np.asarray(label.dataobj).any()
    blank = np.asarray(nib.load(tmp_path / "imagesTs" / "blank_A.nii.gz").dataobj)
    assert not blank.any()
    background = np.asarray(nib.load(tmp_path / "imagesTs" / "background_B_1000.nii.gz").dataobj)
    np.testing.assert_array_equal(background, render_background_only(1000, "B")[0])  # reproducible
    assert np.isfinite(background).all() and background.std() > 0


@pytest.mark.parametrize("spec", ["blank", "background:A", "background:A:x", "noise:A:1", "blank:Z"])
def test_a_bad_spec_is_refused_before_anything_is_written(tmp_path, spec):
    with pytest.raises(ValueError, match="blank|centre"):
        write_robustness_volumes(str(tmp_path), ["blank:A", spec])
    assert not any(tmp_path.iterdir())


def test_score_counts_what_a_model_labels_in_a_vessel_free_volume(tmp_path):
    write_robustness_volumes(str(tmp_path / "set"), ["blank:A"])
    label = nib.load(tmp_path / "set" / "labelsTs" / "blank_A.nii.gz")
    prediction = np.zeros(label.shape, np.uint8)
    prediction[:6, :5, :4] = VESSEL_LABEL  # 120 voxels along a face, as a window border would give
    prediction[50:53, 50:53, 50:53] = ANEURYSM_LABEL  # one false aneurysm, 27 voxels
    (tmp_path / "pred").mkdir()
    nib.save(nib.Nifti1Image(prediction, label.affine), tmp_path / "pred" / "blank_A_seg.nii.gz")
    score(str(tmp_path / "set" / "labelsTs"), str(tmp_path / "pred"), str(tmp_path / "score"))
    with open(tmp_path / "score" / "per_case.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert int(row["vessel_pred_voxels"]) == 120 and int(row["aneurysm_pred_voxels"]) == 27
