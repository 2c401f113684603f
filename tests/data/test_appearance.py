"""Per-case appearance randomisation: determinism, spread of the draws, labels untouched, centres, speed."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage

from scripts.data import generate_case, generate_geometry, get_centre, render_labels
from scripts.data.appearance import BONE_KINDS, TEXTURE_KINDS, UNIT_KINDS, render_intensity
from scripts.data.phantom import render_background_only

SHAPE = (48, 48, 48)
SPREAD_SEEDS = range(30)


def small(name: str, shape=SHAPE):
    """Centre ``name`` on a small grid (same spacing and appearance ranges)."""
    return dataclasses.replace(get_centre(name), shape=shape)


def measure(case) -> dict:
    """Unit-free statistics of a case: CNR, lumen/tissue ratio (canonical units), relative noise."""
    units = case.info["appearance"]["units"]
    canonical = (case.image - np.float32(units["offset"])) / np.float32(units["scale"])
    core = ndimage.binary_erosion(case.label > 0, iterations=1)
    far = ~ndimage.binary_dilation(case.label > 0, iterations=4)
    step = np.diff(canonical, axis=0)[far[1:] & far[:-1]]
    noise = 1.4826 * float(np.median(np.abs(step - np.median(step)))) / np.sqrt(2)  # robust to streaks
    lumen, tissue = float(np.median(canonical[core])), float(np.median(canonical[far]))
    return {
        "cnr": (lumen - tissue) / max(noise, 1e-6),
        "ratio": lumen / tissue,
        "noise": noise / (lumen - tissue),
    }


@pytest.fixture(scope="module")
def spread():
    """30 small centre-A cases."""
    return [generate_case(seed, small("A")) for seed in SPREAD_SEEDS]


def test_deterministic_and_json():
    a, b = generate_case(4, small("A")), generate_case(4, small("A"))
    np.testing.assert_array_equal(a.image, b.image)
    assert a.info == b.info
    json.dumps(a.info)
    first, _, info = render_background_only(4, small("B"))
    again, _, info_again = render_background_only(4, small("B"))
    np.testing.assert_array_equal(first, again)
    assert info == info_again
    json.dumps(info)
    assert not np.array_equal(generate_case(5, small("A")).image[:4], a.image[:4])


def test_draws_span_the_ranges(spread):
    stats = [measure(case) for case in spread]
    cnr = np.array([s["cnr"] for s in stats])
    ratio = np.array([s["ratio"] for s in stats])
    assert cnr.min() < 12 and cnr.max() > 40, f"measured CNR {np.round(np.sort(cnr), 1)}"
    assert ratio.min() < 5 and ratio.max() > 15, f"measured lumen/tissue {np.round(np.sort(ratio), 1)}"
    draws = [case.info["appearance"] for case in spread]
    assert {d["units"]["kind"] for d in draws} == set(UNIT_KINDS)
    maxima = np.array([float(np.abs(case.image).max()) for case in spread])
    assert maxima.max() / maxima.min() > 1000, "value ranges from about 1 to tens of thousands"
    textures = {t["kind"] for d in draws for t in d["textures"]}
    assert textures == set(TEXTURE_KINDS)
    assert any(len(d["textures"]) == 2 for d in draws), "mixed textures"
    blur = np.array([max(d["blur_sigma_mm"]) for d in draws])
    assert blur.min() < 0.15 and blur.max() > 0.4
    assert any(len(set(d["blur_sigma_mm"])) > 1 for d in draws), "anisotropic blur"
    for artefact in ("streaks", "rings", "stripes", "fov", "opacification", "metal", "bones"):
        count = sum(artefact in d for d in draws)
        assert 0 < count < len(draws), f"{artefact} in {count} of {len(draws)} cases"
    assert sum("metal" in d for d in draws) <= 0.3 * len(draws), "metal only occasionally"
    assert any(d["fov"]["visible"] for d in draws if "fov" in d)
    for case in spread:
        assert np.all(np.isfinite(case.image)) and np.ptp(case.image) > 0, "never blank, never constant"
        assert case.image.dtype == np.float32


def test_bone_kinds_occur():
    centre = small("C")
    kinds = {
        b["kind"]
        for seed in range(25)
        for b in render_background_only(seed, centre)[2]["appearance"].get("bones", [])
    }
    assert kinds == set(BONE_KINDS)


def test_labels_unaffected_by_appearance():
    centre = small("A")
    for seed in (1, 2):
        geometry = generate_geometry(seed, centre)
        label, vessels, sacs = render_labels(geometry)
        np.testing.assert_array_equal(generate_case(seed, centre).label, label)
        distance = np.minimum(vessels.distance, sacs.distance)
        value = vessels.value.copy()
        before = distance.copy(), value.copy()
        extent = (np.asarray(centre.shape) - 1) * np.asarray(centre.spacing)
        for stream in range(3):
            rng = np.random.default_rng(stream)
            render_intensity(distance, value, centre, rng, extent, extent / 2)
        np.testing.assert_array_equal(distance, before[0])
        np.testing.assert_array_equal(value, before[1])


def test_centres_keep_their_character():
    stats, blur, bone, cnr = {}, {}, {}, {}
    for name in "ABC":
        cases = [generate_case(seed, small(name)) for seed in range(8)]
        stats[name] = np.median([measure(case)["noise"] for case in cases])
        blur[name] = np.median([max(case.info["appearance"]["blur_sigma_mm"]) for case in cases])
        cnr[name] = np.median([case.info["appearance"]["cnr"] for case in cases])
        bone[name] = np.mean([("bones" in case.info["appearance"]) for case in cases])
    assert stats["B"] > 1.3 * stats["A"], f"B noisier relative to contrast: {stats}"
    assert cnr["A"] > 2.0 * cnr["B"], f"drawn CNR: {cnr}"
    assert blur["C"] > 1.5 * blur["A"], f"C blurrier: {blur}"
    assert bone["C"] > bone["A"], f"C has more bone: {bone}"


@pytest.mark.parametrize("name", ["A", "B", "C"])
def test_background_only(name):
    for seed in (0, 3):
        image, label, info = render_background_only(seed, small(name))
        assert image.shape == label.shape == SHAPE and image.dtype == np.float32
        assert label.dtype == np.uint8 and not label.any()
        assert np.all(np.isfinite(image)) and np.ptp(image) > 0
        assert info["background_only"] and info["centre"] == name
        json.dumps(info)


def test_contrast_ratio_must_exceed_one():
    with pytest.raises(ValueError, match="contrast_ratio"):
        dataclasses.replace(get_centre("A"), contrast_ratio=(0.8, 3.0))
    with pytest.raises(ValueError, match="cnr"):
        dataclasses.replace(get_centre("A"), cnr=(0.0, 3.0))
