"""Post-processing of predicted labels: specks, detached and small aneurysms, at the real voxel volume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.postprocessing import CleanSegmentationd, clean_segmentation


def _scene() -> np.ndarray:
    label = np.zeros((30, 30, 30), np.uint8)
    label[2:28, 14:17, 14:17] = 1  # vessel
    label[10:15, 17:22, 13:18] = 2  # aneurysm on it: 125 voxels
    label[20:22, 17:19, 14:16] = 2  # small aneurysm on it: 8 voxels
    label[2:6, 2:6, 2:6] = 2  # detached aneurysm: 64 voxels
    label[25, 25, 25] = 1  # one-voxel vessel speck
    return label


def test_off_by_default():
    np.testing.assert_array_equal(clean_segmentation(_scene(), (1.0, 1.0, 1.0)), _scene())


def test_each_rule_does_its_own_job():
    label = _scene()
    specks = clean_segmentation(label, (1.0, 1.0, 1.0), min_component_mm3=2.0)
    assert specks[25, 25, 25] == 0 and (specks == 2).sum() == (label == 2).sum()
    detached = clean_segmentation(label, (1.0, 1.0, 1.0), detached_aneurysm_label=0)
    assert (detached[2:6, 2:6, 2:6] == 0).all() and (detached[10:15, 17:22, 13:18] == 2).all()
    small = clean_segmentation(label, (1.0, 1.0, 1.0), min_aneurysm_mm3=10.0)
    assert (small[20:22, 17:19, 14:16] == 1).all()  # touches the vessel: becomes vessel
    assert (small[10:15, 17:22, 13:18] == 2).all() and (small[2:6, 2:6, 2:6] == 2).all()


def test_volumes_use_the_spacing():
    # 8 voxels of 0.5^3 mm^3 = 1 mm^3: kept at a 0.9 mm^3 bound, turned into vessel at 1.1
    label = _scene()
    kept = clean_segmentation(label, (0.5, 0.5, 0.5), min_aneurysm_mm3=0.9)
    assert (kept[20:22, 17:19, 14:16] == 2).all()
    gone = clean_segmentation(label, (0.5, 0.5, 0.5), min_aneurysm_mm3=1.1)
    assert (gone[20:22, 17:19, 14:16] == 1).all()


def test_dictionary_transform_reads_the_spacing_from_the_affine():
    affine = torch.tensor([[0.0, 0.0, 0.5, 0.0], [0.5, 0.0, 0.0, 0.0], [0.0, -0.5, 0.0, 0.0], [0, 0, 0, 1.0]])
    pred = MetaTensor(torch.as_tensor(_scene()[None]), affine=affine)
    out = CleanSegmentationd("pred", min_aneurysm_mm3=1.1)({"pred": pred})["pred"]
    assert out.shape == pred.shape and (out[0, 20:22, 17:19, 14:16] == 1).all()
    assert (pred[0, 20:22, 17:19, 14:16] == 2).all()  # the input is left alone
    with pytest.raises(ValueError, match="detached_aneurysm_label"):
        CleanSegmentationd("pred", detached_aneurysm_label=2)


def test_tuning_prefers_the_setting_that_removes_false_aneurysms():
    from scripts.tune_postprocessing import tune

    truth = _scene()
    truth[2:6, 2:6, 2:6] = 0  # the detached blob is a false positive of the prediction
    truth[25, 25, 25] = 0
    rows = tune([(_scene(), truth, (1.0, 1.0, 1.0))])
    best = rows[0]
    assert best["detached_aneurysm_label"] == 0 and best["min_component_mm3"] > 0
    untouched = next(r for r in rows if r["detached_aneurysm_label"] is None and r["min_component_mm3"] == 0)
    assert best["score"] > untouched["score"]
