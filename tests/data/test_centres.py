"""Centres: their styles differ measurably, unknown names are refused naming the known ones, fields valid."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from scripts.data import CENTRES, generate_case, generate_geometry, get_centre


def test_centres_differ_measurably():
    stats = {}
    for name in CENTRES:
        case = generate_case(11, name)
        far = ~ndimage.binary_dilation(case.label > 0, iterations=4)
        lumen = case.image[ndimage.binary_erosion(case.label > 0, iterations=2)]
        # noise from neighbour differences (the smooth background cancels out)
        step = np.diff(case.image, axis=0)[far[1:] & far[:-1]]
        stats[name] = {
            "spacing": case.spacing,
            "fov": tuple(n * s for n, s in zip(case.image.shape, case.spacing, strict=True)),
            "noise": float(np.std(step) / np.sqrt(2)),
            "contrast": float(np.median(lumen) - np.median(case.image[far])),
        }
    assert len({s["spacing"] for s in stats.values()}) == 3
    assert stats["B"]["spacing"][2] > stats["B"]["spacing"][0], "B has thicker slices"
    assert min(stats["B"]["fov"]) > max(stats["A"]["fov"])
    # units differ per case: B is noisier relative to its own contrast (test_appearance checks more seeds)
    assert stats["B"]["noise"] / stats["B"]["contrast"] > stats["A"]["noise"] / stats["A"]["contrast"]
    sizes = {
        n: np.mean([a.size_mm for s in range(25) for a in generate_geometry(s, n).aneurysms]) for n in "AC"
    }
    assert sizes["C"] > sizes["A"] + 1.0, "centre C has larger aneurysms"


@pytest.mark.parametrize(
    "call", [lambda: get_centre("Z"), lambda: generate_case(0, "nope"), lambda: generate_geometry(0, "a")]
)
def test_unknown_centre_raises(call):
    with pytest.raises(ValueError, match="known centres: \\['A', 'B', 'C'\\]"):
        call()


def test_centre_validates_its_fields():
    with pytest.raises(ValueError, match="aneurysm_count_probs"):
        dataclasses.replace(get_centre("A"), aneurysm_count_probs=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="spacing"):
        dataclasses.replace(get_centre("A"), spacing=(0.4, 0.0, 0.4))


def test_small_custom_centre_works():
    small = dataclasses.replace(get_centre("A"), shape=(64, 64, 64))
    case = generate_case(2, small)
    assert case.image.shape == (64, 64, 64) and case.info["centre"] == "A"
