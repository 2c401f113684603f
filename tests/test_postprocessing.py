"""Post-processing of predicted labels: specks, detached and small aneurysms, at the real voxel volume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import postprocessing_scene
from monai.data import MetaTensor

from scripts.postprocessing import CleanSegmentationd, clean_segmentation


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
