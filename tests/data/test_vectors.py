"""The vector helpers the vessel-tree and lesion generators share: unit length, orthogonality, rotation."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.data.vectors import perpendicular, rotate, unit


@pytest.mark.parametrize("v", [[3.0, 4.0, 0.0], [0.0, 0.0, -2.5], [1e-3, -2e-3, 5e-4]])
def test_unit_has_length_one_along_the_input(v):
    u = unit(np.array(v))
    assert np.linalg.norm(u) == pytest.approx(1.0)
    assert np.allclose(np.cross(u, v), 0.0) and u @ np.array(v) > 0


def test_unit_keeps_a_zero_vector_zero():
    assert np.array_equal(unit(np.zeros(3)), np.zeros(3))


def test_perpendicular_is_a_random_unit_vector_orthogonal_to_d():
    rng = np.random.default_rng(0)
    d = unit(np.array([1.0, 2.0, 3.0]))
    draws = np.array([perpendicular(rng, d) for _ in range(20)])
    assert np.allclose(np.linalg.norm(draws, axis=1), 1.0)
    assert np.allclose(draws @ d, 0.0, atol=1e-12)
    assert len({tuple(np.round(v, 6)) for v in draws}) == len(draws)


@pytest.mark.parametrize(
    "d, axis, angle, expected",
    [
        ([1.0, 0.0, 0.0], [0.0, 0.0, 1.0], np.pi / 2, [0.0, 1.0, 0.0]),
        ([0.0, 1.0, 0.0], [1.0, 0.0, 0.0], np.pi, [0.0, -1.0, 0.0]),
        ([0.0, 0.0, 2.0], [0.0, 0.0, 1.0], 1.234, [0.0, 0.0, 2.0]),
    ],
)
def test_rotate_turns_about_the_axis_counter_clockwise(d, axis, angle, expected):
    assert np.allclose(rotate(np.array(d), np.array(axis), angle), expected, atol=1e-12)
