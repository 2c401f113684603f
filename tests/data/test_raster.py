"""Rasterisation: the signed distance field of capsules and its partial-volume occupancy."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.data import DistanceField, occupancy


def test_distance_field_and_occupancy():
    field = DistanceField((20, 20, 20), (0.5, 0.5, 0.5))
    field.add_capsule(np.array([5.0, 5.0, 2.0]), np.array([5.0, 5.0, 8.0]), 1.0, 1.0, value=0.8)
    # voxel (10, 12, 10) sits 1 mm from the axis: on the surface
    assert field.distance[10, 12, 10] == pytest.approx(0.0, abs=1e-5)
    assert field.distance[10, 10, 10] == pytest.approx(-1.0, abs=1e-5)
    assert field.value[10, 10, 10] == pytest.approx(0.8)
    occ = occupancy(field.distance, (0.5, 0.5, 0.5))
    assert occ[10, 10, 10] == 1.0 and occ[0, 0, 0] == 0.0 and occ[10, 12, 10] == pytest.approx(0.5)
