"""Slice profiles: per-slice vectors with in-plane borders that expand to the full volume they stand for.

The blocks computed on profiles are checked against the paper's full-size formulas in
``test_room_lite.py`` and ``test_fusion.py``; ``profile_cases`` holds the geometries they share.
"""

from __future__ import annotations

import pytest
import torch
from profile_cases import GEOMETRIES, broadcast

from scripts.networks.slice_profile import SliceProfile


@pytest.mark.parametrize(("shape", "slice_axis"), GEOMETRIES)
def test_profile_counts_and_expansion(shape, slice_axis):
    per_slice = torch.randn(2, 3, shape[slice_axis])
    profile = SliceProfile.from_slices(per_slice, shape, slice_axis)
    assert profile.counts().sum().item() == shape[0] * shape[1] * shape[2]
    assert torch.equal(profile.expand(), broadcast(per_slice, shape, slice_axis))
    assert max(profile.values.shape[2:]) <= max(3, shape[slice_axis])


def test_profile_rejects_a_shape_with_another_number_of_slices():
    with pytest.raises(ValueError, match="5 slices on axis 2"):
        SliceProfile.from_slices(torch.zeros(1, 2, 5), (4, 4, 6), 2)
