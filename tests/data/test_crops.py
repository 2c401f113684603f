"""Training crops: windows of plain background on request, found exactly, still on the cache grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.data.crops import CacheAlignedRandCropByLabelClassesd, aligned_starts, empty_window_starts


def _label() -> np.ndarray:
    label = np.zeros((40, 40, 30), np.uint8)
    label[2:12, 3:9, :] = 1  # a vessel along the slice axis, in one in-plane corner
    label[5:8, 9:12, 10:14] = 2
    return label


def test_empty_windows_are_exactly_those_without_foreground():
    label, roi, grid = _label(), (16, 16, 16), 8
    found = {tuple(s) for s in empty_window_starts(label > 0, roi, grid, slice_axis=2)}
    brute = {
        (a, b, c)
        for a in aligned_starts(40, 16, grid)
        for b in aligned_starts(40, 16, grid)
        for c in range(30 - 16 + 1)
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
