"""Tuning the post-processing: the grid search picks the setting that scores best against the truth."""

from __future__ import annotations

import json
import logging
import math

import nibabel as nib
import numpy as np
import pytest
from conftest import blurred_lumen_scene, bone_scene, flat_aneurysm_scene, postprocessing_scene
from scipy import ndimage

from scripts import plates
from scripts.plates import hessian_eigenvalues, remove_plates
from scripts.postprocessing import clean_segmentation, grow_to_lumen
from scripts.selection_metric import case_score
from scripts.tune_postprocessing import GRID, LUMEN_GRID, PLATE_GRID, SHAPE_GRID, VESSEL_GRID, main, tune


def test_tuning_prefers_the_setting_that_removes_false_aneurysms():
    truth = postprocessing_scene()
    truth[2:6, 2:6, 2:6] = 0  # the detached blob is a false positive of the prediction
    truth[25, 25, 25] = 0
    rows = tune([(postprocessing_scene(), truth, (1.0, 1.0, 1.0))], min_component_mm3=0.0)
    best = rows[0]
    # without the volume floor, the speck goes by its share of the largest component
    assert best["detached_aneurysm_label"] == 0 and best["min_component_fraction"] > 0
    untouched = next(
        r for r in rows if r["detached_aneurysm_label"] is None and r["min_component_fraction"] == 0
    )
    assert best["score"] > untouched["score"]
    # the floor (the configs' 20 mm^3) removes it in every row
    rows = tune([(postprocessing_scene(), truth, (1.0, 1.0, 1.0))])
    assert all(r["min_component_mm3"] == 20.0 for r in rows)
    rule_free = [
        r
        for r in rows
        if r["detached_aneurysm_label"] is None
        and r["min_component_fraction"] == r["min_aneurysm_mm3"] == r["min_aneurysm_height_mm"] == 0
    ]
    assert rule_free and all(r["vessel_dice"] == 1.0 for r in rule_free)
    assert untouched["vessel_dice"] < 1.0  # without the floor the speck stayed


def test_tuning_turns_the_flat_aneurysm_rule_on_when_a_wall_patch_is_false():
    truth = flat_aneurysm_scene()
    truth[truth == 2] = 1
    truth[5:10, 17:22, 13:18] = 2  # only the protruding one is an aneurysm
    rows = tune([(flat_aneurysm_scene(), truth, (1.0, 1.0, 1.0))])
    best = rows[0]
    assert best["min_aneurysm_height_mm"] > 0 or best["min_aneurysm_aspect_ratio"] > 0
    assert best["aneurysm_f1"] == 1.0
    assert {"min_aneurysm_height_mm", "min_aneurysm_aspect_ratio"} <= set(rows[-1])


def test_tuning_grows_the_labels_only_when_the_truth_holds_the_bright_rim():
    image, truth, inner = blurred_lumen_scene()
    rows = tune([(inner, truth, (1.0, 1.0, 1.0))], [image])
    assert rows[0]["lumen_fraction"] > 0 and rows[0]["lumen_steps"] > 0
    off = next(r for r in rows if r["lumen_steps"] == 0)
    assert rows[0]["vessel_dice"] > 0.95 > 0.85 > off["vessel_dice"]
    # where the truth ends at the labels (the rim is something else that is bright), the growth stays off
    rows = tune([(inner, inner, (1.0, 1.0, 1.0))], [image])
    assert rows[0]["lumen_steps"] == 0 and rows[0]["score"] == 1.0
    # a floor above the rim stops the growth, so it is not chosen
    rows = tune([(inner, truth, (1.0, 1.0, 1.0))], [0.9 * image], lumen_floor=0.99)  # no voxel reaches 0.99
    assert rows[0]["lumen_steps"] == 0
    # without images the growth is not tried
    assert all(r["lumen_steps"] == 0 for r in tune([(inner, truth, (1.0, 1.0, 1.0))]))


def test_tuning_caps_the_vessel_growth_when_only_the_sac_s_rim_is_lumen():
    image, truth, _ = blurred_lumen_scene()
    # the sac labelled four voxels inside its truth, the tube two; the tube's truth ends one voxel outside its
    # labels (something else bright lies around it), the sac's holds its whole rim
    tube = ndimage.binary_erosion(truth > 0, iterations=2) & (truth == 1)
    inner = np.where(ndimage.binary_erosion(truth == 2, iterations=4), 2, np.where(tube, 1, 0)).astype(
        np.uint8
    )
    truth = np.where(truth == 1, ndimage.binary_dilation(tube) & (truth == 1), truth).astype(np.uint8)
    rows = tune([(inner, truth, (1.0, 1.0, 1.0))], [image])
    best = rows[0]
    assert best["lumen_steps"] > 0 and best["lumen_vessel_steps"] is not None
    assert (
        best["lumen_vessel_steps"] < best["lumen_steps"]
        and best["lumen_vessel_steps"] in VESSEL_GRID["lumen_vessel_steps"]
    )
    uncapped = next(
        r
        for r in rows
        if r["lumen_vessel_steps"] is None
        and (r["lumen_fraction"], r["lumen_steps"]) == (best["lumen_fraction"], best["lumen_steps"])
    )
    assert best["vessel_dice"] > uncapped["vessel_dice"] and best["score"] > uncapped["score"]
    # where the tube's rim is lumen too, vessel grows every layer
    image, truth, inner = blurred_lumen_scene()
    rows = tune([(inner, truth, (1.0, 1.0, 1.0))], [image])
    assert rows[0]["lumen_steps"] > 0 and rows[0]["lumen_vessel_steps"] is None


def test_tuning_removes_vessel_labels_on_a_plate_only_where_the_truth_has_no_vessel():
    image, label, _, slab, _ = bone_scene()
    truth = np.where(slab & (label == 1), 0, label)  # the plate was bone: labelled vessel by mistake
    spacing = (0.5, 0.5, 0.5)
    rows = tune([(label, truth, spacing)], [image])
    best = rows[0]
    assert best["plate_sigmas_mm"] == [2.0, 3.0] and best["plate_max_ratio"] in PLATE_GRID["plate_max_ratio"]
    off = next(r for r in rows if not r["plate_sigmas_mm"] and r["lumen_steps"] == best["lumen_steps"])
    assert best["vessel_dice"] > off["vessel_dice"] + 0.1
    assert best["plate_aneurysm_ratio"] == 0.0  # this truth keeps the aneurysm on the bone
    # a bump labelled aneurysm that rises 4 mm from the plate (not flat: the flat rule keeps it), bone in truth:
    # the components on the plate go with it
    x, y, z = np.meshgrid(*[np.arange(56) * 0.5] * 3, indexing="ij")
    bump = ((x - 18.0) ** 2 + (y - 18.0) ** 2 + (z - 21.5) ** 2 <= 3.0**2) & ~slab
    pred = np.where(bump, 2, label)
    on_bone = tune([(pred, np.where(slab | bump, 0, label), spacing)], [image])[0]
    assert on_bone["plate_sigmas_mm"] == [2.0, 3.0] and on_bone["plate_aneurysm_ratio"] > 0
    assert on_bone["aneurysm_f1"] == 1.0
    # where the plate is vessel after all (a truth that keeps it), the rule stays off
    assert not tune([(label, label, spacing)], [image])[0]["plate_sigmas_mm"]


def test_each_plate_setting_scores_what_the_rule_gives_with_one_hessian_per_case_and_scale(monkeypatch):
    # a 2 mm plate, whose rims the rule leaves in pieces under the volume floor
    image, label, _, slab, _ = bone_scene(plate_thickness_mm=2.0)
    truth = np.where(slab & (label == 1), 0, label)
    spacing = (0.5, 0.5, 0.5)
    calls = []
    monkeypatch.setattr(
        plates, "hessian_eigenvalues", lambda *args: calls.append(args[3]) or hessian_eigenvalues(*args)
    )
    rows = tune([(label, truth, spacing), (label, label, spacing)], [image, image])
    plate_rows = [r for r in rows if r["plate_sigmas_mm"]]
    assert len(plate_rows) == math.prod(len(values) for values in PLATE_GRID.values())
    assert sorted(calls) == [2.0, 2.0, 3.0, 3.0]  # two cases, two scales, however many settings
    best = rows[0]
    grown = grow_to_lumen(
        clean_segmentation(label, spacing, **{k: best[k] for k in ["min_component_mm3", *GRID, *SHAPE_GRID]}),
        image,
        best["lumen_fraction"],
        best["lumen_steps"],
        0.2,
        best["lumen_vessel_steps"],
    )
    floor = {"min_component_mm3": best["min_component_mm3"]}
    for row in plate_rows:
        settings = {k.removeprefix("plate_"): row[k] for k in PLATE_GRID}
        expected = [
            case_score(
                clean_segmentation(remove_plates(grown, image, spacing, **settings), spacing, **floor), t
            )["score"]
            for t in (truth, label)
        ]
        assert row["score"] == pytest.approx(np.mean(expected))


def test_command_writes_every_scored_setting_and_logs_the_flat_rule_trade_off(tmp_path, caplog):
    """``main`` on saved predictions: ``postprocessing.json`` holds the best setting, no post-processing and
    every row scored (both stages), and the log shows the flat-aneurysm rule's rows on top of the best."""
    truth = flat_aneurysm_scene()
    truth[truth == 2] = 1
    truth[5:10, 17:22, 13:18] = 2
    for folder in ("images", "labels", "predictions"):
        (tmp_path / folder).mkdir()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for name, array in (("images", truth.astype(np.float32)), ("labels", truth)):
        nib.save(nib.Nifti1Image(array, affine), tmp_path / name / "case.nii.gz")
    nib.save(nib.Nifti1Image(flat_aneurysm_scene(), affine), tmp_path / "predictions" / "case_seg.nii.gz")
    entry = {"image": "images/case.nii.gz", "label": "labels/case.nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps({"validation": [entry]}))
    with caplog.at_level(logging.INFO, logger="scripts.tune_postprocessing"):
        best = main(str(tmp_path / "predictions"), str(tmp_path / "dataset.json"))
    written = json.loads((tmp_path / "predictions" / "postprocessing.json").read_text())
    shape_size = math.prod(len(values) for values in SHAPE_GRID.values())
    lumen_size = math.prod(len(values) for values in LUMEN_GRID.values())
    plate_size = math.prod(len(values) for values in PLATE_GRID.values())
    grid_size = math.prod(len(values) for values in GRID.values()) + shape_size + lumen_size + plate_size
    assert written["best"] == best == written["rows"][0] and len(written["rows"]) == grid_size
    assert (
        written["none"]["score"] < best["score"] and written["cases"] == 1 and written["lumen_floor"] == 0.2
    )
    assert written["min_component_mm3"] == 20.0 and "--postprocess_min_component_mm3 20.0" in caplog.text
    (trade_off,) = [r.getMessage() for r in caplog.records if "flat-aneurysm rule" in r.getMessage()]
    assert len(trade_off.splitlines()) == 1 + 1 + shape_size  # title, header, one row per rule
    (growth,) = [r.getMessage() for r in caplog.records if "lumen's edge" in r.getMessage()]
    assert (
        len(growth.splitlines()) == 1 + 1 + 1 + lumen_size
    )  # title, header, growth off, one row per setting
