"""The evaluation's aneurysm files (``scripts.evaluation_report``, written by the evaluate workflow's handler).

One hand-made case on an anisotropic, x-flipped grid: a vessel along x, a true aneurysm on it that the
prediction finds (truth #2, prediction #2), a larger free true sphere of radius 3 mm that the prediction misses
(truth #1) and a free predicted sphere where there is no aneurysm (prediction #1, a false positive).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage
from PIL import Image

from scripts.data.preview import COMPARISON_GAP, render_oriented_preview
from scripts.evaluation_report import (
    ANEURYSM_TABLE,
    REPORT_FILE,
    CaseAneurysms,
    compare_aneurysms,
    write_case_aneurysms,
    write_evaluation,
)
from scripts.handlers import SegmentationMetricsWriter
from scripts.measurements import RUN_TABLE_COLUMNS, aneurysm_components, measure_aneurysms
from scripts.metrics import case_metrics, format_markdown_table

SHAPE = (48, 40, 32)
SPACING = (0.5, 0.4, 0.6)
# x flipped, so that voxel order and world order differ
AFFINE = np.array([[-0.5, 0, 0, 20.0], [0, 0.4, 0, -5.0], [0, 0, 0.6, 3.0], [0, 0, 0, 1]])
MISSED_RADIUS = 3.0  # mm: 5 voxels along the coarsest axis, where the stated volume tolerance holds
H = max(SPACING)


def _world(voxel) -> np.ndarray:
    return AFFINE[:3, :3] @ np.asarray(voxel, dtype=float) + AFFINE[:3, 3]


WORLD = (np.indices(SHAPE).reshape(3, -1).T @ AFFINE[:3, :3].T + AFFINE[:3, 3]).reshape(*SHAPE, 3)
VESSEL_AXIS = _world((0, 28, 16))  # the vessel runs along world x through this point's y and z
MISSED_CENTRE = _world((12.3, 11.8, 16.2))
FOUND_CENTRE = _world((34, 28, 16)) + (0.0, -2.2, 0.0)  # 2.2 mm off the vessel's axis
FALSE_CENTRE = _world((38, 9, 6))


def _ball(centre, radius) -> np.ndarray:
    return ((WORLD - centre) ** 2).sum(-1) <= radius**2


def volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, truth, prediction), each (48, 40, 32)."""
    vessel = ((WORLD[..., 1:] - VESSEL_AXIS[1:]) ** 2).sum(-1) <= 1.2**2
    truth = np.zeros(SHAPE, np.uint8)
    truth[vessel] = 1
    truth[_ball(FOUND_CENTRE, 2.0) & ~vessel] = 2
    pred = truth.copy()
    truth[_ball(MISSED_CENTRE, MISSED_RADIUS)] = 2
    pred[_ball(FALSE_CENTRE, 2.5)] = 2
    image = np.where(truth > 0, 1000.0, 50.0) + np.random.default_rng(0).normal(0, 20, SHAPE)
    return image.astype(np.float32), truth, pred


@pytest.fixture(scope="module")
def case():
    return volumes()


def test_true_and_predicted_aneurysms_are_numbered_measured_and_matched(case):
    _, truth, pred = case
    result = compare_aneurysms("a.nii.gz", pred, truth, AFFINE)
    assert result.truth == measure_aneurysms(truth, AFFINE) and result.prediction == measure_aneurysms(
        pred, AFFINE
    )
    assert len(result.truth) == len(result.prediction) == 2
    # truth #1 the free sphere (missed), #2 the one on the vessel (found by prediction #2)
    assert result.detected == [False, True] and result.truth_overlaps == [[], [2]]
    # prediction #1 the free sphere (false positive), #2 the true aneurysm
    assert result.false_positive == [True, False] and result.prediction_overlaps == [[], [2]]
    # the flags add up to the detection metric's counts of the case
    record = case_metrics(pred, truth, SPACING)
    assert sum(result.detected) == record["aneurysm_hits"] == 1
    assert sum(result.false_positive) == record["aneurysm_false_positives"] == 1
    assert len(result.truth) == record["aneurysm_true_components"]


def test_a_sphere_of_known_radius_is_measured_within_the_stated_tolerance(case):
    _, truth, pred = case
    missed = compare_aneurysms("a.nii.gz", pred, truth, AFFINE).truth[0]
    assert not missed.touches_vessel
    assert missed.volume_mm3 == pytest.approx(missed.voxels * 0.5 * 0.4 * 0.6)  # the real spacing
    assert missed.volume_mm3 == pytest.approx(4 / 3 * math.pi * MISSED_RADIUS**3, rel=0.03)
    assert abs(missed.max_diameter_mm - 2 * MISSED_RADIUS) <= H / 2
    np.testing.assert_allclose(missed.centroid_ras_mm, MISSED_CENTRE, atol=0.1 * H)  # in world mm, x flipped


def test_the_component_map_follows_the_measurements_numbers(case):
    _, truth, pred = case
    ties = np.zeros(SHAPE, np.uint8)  # three blocks of 27 voxels: numbered by centroid, x flipped
    for start in ((4, 4, 4), (20, 30, 10), (40, 4, 20)):
        ties[tuple(slice(i, i + 3) for i in start)] = 2
    for label in (truth, pred, ties):
        measurements, numbers = aneurysm_components(label, AFFINE)
        assert set(np.unique(numbers)) == {0, *(m.index for m in measurements)}
        assert ((numbers > 0) == (label == 2)).all()
        for m in measurements:
            voxels = np.argwhere(numbers == m.index)
            assert len(voxels) == m.voxels
            np.testing.assert_allclose(_world(voxels.mean(axis=0)), m.centroid_ras_mm, atol=1e-9)


def test_case_json_holds_both_sources_with_their_flags(case, tmp_path):
    image, truth, pred = case
    result = write_case_aneurysms(tmp_path, "a.nii.gz", pred, truth, AFFINE, image, extra={"label": "x"})
    document = json.loads((tmp_path / "a_aneurysms.json").read_text())
    assert document["case"] == "a.nii.gz" and document["label"] == "x" and document["picture"] == "a_mip.png"
    assert [a["detected"] for a in document["truth"]] == [False, True]
    assert [a["false_positive"] for a in document["prediction"]] == [True, False]
    assert [a["overlapping_predictions"] for a in document["truth"]] == [[], [2]]
    assert [a["index"] for a in document["truth"]] == [1, 2]
    assert document["truth"][0]["max_diameter_mm"] == result.truth[0].max_diameter_mm
    assert document["detection"] | {"rule": None} == {
        "true_aneurysms": 2,
        "detected": 1,
        "predicted_aneurysms": 2,
        "false_positives": 1,
        "rule": None,
    }


def test_the_picture_is_truth_beside_prediction(case, tmp_path):
    image, truth, pred = case
    result = write_case_aneurysms(tmp_path, "a.nii.gz", pred, truth, AFFINE, image)
    path = tmp_path / "a_mip.png"
    assert path.stat().st_size > 0
    with Image.open(path) as picture:
        picture.verify()  # a whole PNG
    pixels = np.asarray(Image.open(path).convert("RGB"))
    halves = [
        np.asarray(
            render_oriented_preview(
                image,
                label,
                AFFINE,
                slices=False,
                vessel_alpha=0.35,
                title=f"a {result.describe(source)}",
                world_numbers=[(m.centroid_ras_mm, str(m.index)) for m in found],
            )
        )
        for label, source, found in ((truth, "truth", result.truth), (pred, "prediction", result.prediction))
    ]
    width = halves[0].shape[1]
    assert pixels.shape == (halves[0].shape[0], 2 * width + COMPARISON_GAP, 3)  # wider than one view
    np.testing.assert_array_equal(pixels[:, :width], halves[0])  # truth on the left
    np.testing.assert_array_equal(pixels[:, width + COMPARISON_GAP :], halves[1])  # prediction on the right
    assert not np.array_equal(halves[0], halves[1])


def _evaluate(tmp_path: Path, cases: dict[str, tuple], pictures: bool = True):
    records, results = [], []
    for name, (image, truth, pred) in cases.items():
        records.append({"case": name, **case_metrics(pred, truth, SPACING)})
        results.append(write_case_aneurysms(tmp_path, name, pred, truth, AFFINE, image if pictures else None))
    return write_evaluation(records, tmp_path, results), results


def test_run_table_has_a_row_per_aneurysm_with_source_and_flags(case, tmp_path):
    image, truth, _ = case
    _evaluate(tmp_path, {"a.nii.gz": case, "b.nii.gz": (image, truth, truth)})
    with open(tmp_path / ANEURYSM_TABLE, newline="") as table:
        reader = csv.DictReader(table)
        assert reader.fieldnames[: len(RUN_TABLE_COLUMNS)] == list(RUN_TABLE_COLUMNS)  # as inference's table
        rows = [
            (r["case"], r["source"], r["index"], r["detected"], r["false_positive"], r["overlapping"])
            for r in reader
        ]
    assert rows == [
        ("a.nii.gz", "truth", "1", "False", "", ""),
        ("a.nii.gz", "truth", "2", "True", "", "2"),
        ("a.nii.gz", "prediction", "1", "", "True", ""),
        ("a.nii.gz", "prediction", "2", "", "False", "2"),
        ("b.nii.gz", "truth", "1", "True", "", "1"),
        ("b.nii.gz", "truth", "2", "True", "", "2"),
        ("b.nii.gz", "prediction", "1", "", "False", "1"),
        ("b.nii.gz", "prediction", "2", "", "False", "2"),
    ]


def test_report_shows_the_summary_every_aneurysm_and_every_picture(case, tmp_path):
    image, truth, _ = case
    summary, results = _evaluate(tmp_path, {"a.nii.gz": case, "b.nii.gz": (image, truth, truth)})
    report = (tmp_path / REPORT_FILE).read_text()
    assert format_markdown_table(summary).rstrip("\n") in report
    assert (tmp_path / "summary.md").read_text().rstrip("\n") in report
    for result in results:
        assert f"]({result.stem}_mip.png)" in report and (tmp_path / f"{result.stem}_mip.png").is_file()
    lines = [line for line in report.splitlines() if line.startswith(("| a.nii.gz |", "| b.nii.gz |"))]
    assert len(lines) == 8
    assert "| a.nii.gz | truth | 1 | **missed** |" in report
    assert "| a.nii.gz | prediction | 1 | **false positive** |" in report
    assert "| a.nii.gz | truth | 2 | detected | prediction 2 |" in report


def test_without_pictures_no_png_is_written_nor_linked(case, tmp_path):
    _evaluate(tmp_path, {"a.nii.gz": case}, pictures=False)
    assert not list(tmp_path.glob("*.png"))
    assert ".png" not in (tmp_path / REPORT_FILE).read_text()
    assert json.loads((tmp_path / "a_aneurysms.json").read_text())["picture"] is None


def test_a_case_without_aneurysms_is_listed_as_such(tmp_path):
    empty = np.zeros(SHAPE, np.uint8)
    _evaluate(tmp_path, {"empty.nii.gz": (None, empty, empty)}, pictures=False)
    assert (tmp_path / ANEURYSM_TABLE).read_text().count("\n") == 1  # the header only
    assert "No true and no predicted aneurysm in: empty.nii.gz." in (tmp_path / REPORT_FILE).read_text()


def test_a_failure_leaves_no_report(case, tmp_path, monkeypatch):
    image, truth, pred = case
    result = write_case_aneurysms(tmp_path, "a.nii.gz", pred, truth, AFFINE, None)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("scripts.evaluation_report.write_run_table", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_evaluation([{"case": "a.nii.gz", **case_metrics(pred, truth, SPACING)}], tmp_path, [result])
    assert not (tmp_path / REPORT_FILE).exists() and not (tmp_path / ANEURYSM_TABLE).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


# --------------------------------------------------------------------------------------------------------
# the evaluate workflow's handler


def _run_handler(tmp_path: Path, case, **kwargs) -> Path:
    """The handler on one case as the evaluate workflow hands it over: label and image read from files."""
    image, truth, pred = case
    nib.save(nib.Nifti1Image(image, AFFINE), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image(truth, AFFINE), tmp_path / "label.nii.gz")
    load = LoadImage(image_only=True, ensure_channel_first=True)
    out = tmp_path / "eval"
    handler = SegmentationMetricsWriter(str(out), label_key="original_label", **kwargs)
    engine = SimpleNamespace(state=SimpleNamespace(metrics={}))
    handler._clear(engine)
    engine.state.batch = [
        {"original_label": load(tmp_path / "label.nii.gz"), "image": load(tmp_path / "image.nii.gz")}
    ]
    engine.state.output = [{"pred": torch.as_tensor(pred[None])}]  # (1, D, H, W), on the label's grid
    handler._score(engine)
    handler._write(engine)
    return out


def test_the_handler_writes_every_file_at_the_label_s_geometry(case, tmp_path):
    out = _run_handler(tmp_path, case)
    names = {p.name for p in out.iterdir()}
    assert names == {
        "per_case.csv",
        "summary.json",
        "summary.md",
        ANEURYSM_TABLE,
        REPORT_FILE,
        "label_aneurysms.json",
        "label_mip.png",
    }
    document = json.loads((out / "label_aneurysms.json").read_text())
    assert document["image"] == str(tmp_path / "image.nii.gz")
    expected = compare_aneurysms("label.nii.gz", case[2], case[1], AFFINE)
    # the same measurements as on the arrays, up to the NIfTI header's float32 affine
    assert [a["max_diameter_mm"] for a in document["truth"]] == pytest.approx(
        [m.max_diameter_mm for m in expected.truth], rel=1e-6
    )
    np.testing.assert_allclose(document["truth"][0]["centroid_ras_mm"], MISSED_CENTRE, atol=0.1 * H)
    assert "](label_mip.png)" in (out / REPORT_FILE).read_text()


def test_the_handler_without_pictures_writes_no_png(case, tmp_path):
    out = _run_handler(tmp_path, case, save_pictures=False)
    assert (out / "label_aneurysms.json").is_file() and not list(out.glob("*.png"))


@pytest.mark.parametrize("value", ["false", 0, None])
def test_save_pictures_must_be_a_real_bool(value):
    with pytest.raises(ValueError, match="save_pictures must be True or False"):
        SegmentationMetricsWriter("unused", save_pictures=value)


def test_a_case_result_without_a_known_ending_keeps_its_name():
    assert CaseAneurysms("scan", [], [], [], [], [], []).stem == "scan"
    assert CaseAneurysms("scan.nii", [], [], [], [], [], []).stem == "scan"
