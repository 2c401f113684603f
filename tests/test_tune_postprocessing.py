"""Tuning the post-processing: the grid search picks the setting that scores best against the truth."""

from __future__ import annotations

from conftest import flat_aneurysm_scene, postprocessing_scene

from scripts.tune_postprocessing import tune


def test_tuning_prefers_the_setting_that_removes_false_aneurysms():
    truth = postprocessing_scene()
    truth[2:6, 2:6, 2:6] = 0  # the detached blob is a false positive of the prediction
    truth[25, 25, 25] = 0
    rows = tune([(postprocessing_scene(), truth, (1.0, 1.0, 1.0))])
    best = rows[0]
    # the speck goes by its volume or by its share of the largest component
    assert best["detached_aneurysm_label"] == 0 and (
        best["min_component_mm3"] > 0 or best["min_component_fraction"] > 0
    )
    untouched = next(
        r
        for r in rows
        if r["detached_aneurysm_label"] is None
        and r["min_component_mm3"] == 0
        and r["min_component_fraction"] == 0
    )
    assert best["score"] > untouched["score"]


def test_tuning_turns_the_flat_aneurysm_rule_on_when_a_wall_patch_is_false():
    truth = flat_aneurysm_scene()
    truth[truth == 2] = 1
    truth[5:10, 17:22, 13:18] = 2  # only the protruding one is an aneurysm
    rows = tune([(flat_aneurysm_scene(), truth, (1.0, 1.0, 1.0))])
    best = rows[0]
    assert best["min_aneurysm_height_mm"] > 0 or best["min_aneurysm_aspect_ratio"] > 0
    assert best["aneurysm_f1"] == 1.0
    assert {"min_aneurysm_height_mm", "min_aneurysm_aspect_ratio"} <= set(rows[-1])
