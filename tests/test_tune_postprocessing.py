"""Tuning the post-processing: the grid search picks the setting that scores best against the truth."""

from __future__ import annotations

from conftest import postprocessing_scene

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
