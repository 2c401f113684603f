"""Tests of scripts.score (scoring prediction folders) and scripts.evaluation_report (the three files)."""

from __future__ import annotations

import csv
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage

from scripts.evaluation_report import write_evaluation
from scripts.handlers import SegmentationMetricsWriter
from scripts.metrics import MISSING_STRUCTURE_DISTANCE_MM, case_metrics, format_markdown_table, summarize
from scripts.score import score

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (24, 20, 16)
SPACING = (0.5, 0.4, 0.8)  # anisotropic: metrics must use exactly this
AFFINE = np.array([[SPACING[0], 0, 0, -6.0], [0, SPACING[1], 0, 4.0], [0, 0, SPACING[2], 10.0], [0, 0, 0, 1]])
FILES = ("per_case.csv", "summary.json", "summary.md")


def truth_labels(seed: int = 0) -> np.ndarray:
    """(24, 20, 16) labels: a vessel along axis 0 (1) with a spherical aneurysm on its side (2)."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    labels = np.zeros(SHAPE, np.uint8)
    labels[(y - 8) ** 2 + (z - 8) ** 2 < 6] = 1
    labels[((x - 8 - seed) ** 2 + (y - 12) ** 2 + (z - 8) ** 2 < 9) & (labels == 0)] = 2
    return labels


def save(path: Path, labels: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, affine), path)
    return path


def folders(tmp_path: Path, cases: dict[str, np.ndarray]) -> tuple[Path, Path, Path]:
    """``truth/<case>.nii.gz`` for each case, an empty ``pred`` folder, and the output folder."""
    for case, labels in cases.items():
        save(tmp_path / "truth" / f"{case}.nii.gz", labels)
    (tmp_path / "pred").mkdir()
    return tmp_path / "truth", tmp_path / "pred", tmp_path / "out"


def per_case(output_dir: Path) -> dict[str, dict[str, str]]:
    with open(output_dir / "per_case.csv", newline="") as table:
        return {row["case"]: row for row in csv.DictReader(table)}


def test_perfect_prediction_scores_dice_1_and_hd95_0(tmp_path):
    truth, pred, out = folders(tmp_path, {"case_a": truth_labels()})
    save(pred / "case_a.nii.gz", truth_labels())
    summary = score(str(truth), str(pred), str(out))
    for name in ("vessel", "aneurysm"):
        assert summary["classes"][name]["dice"]["mean"] == 1.0
        assert summary["classes"][name]["hd95"]["mean"] == 0.0
    assert summary["detection"]["hits"] == summary["detection"]["true_components"] == 1
    assert per_case(out)["case_a.nii.gz"]["missing_prediction"] == "False"


@pytest.mark.parametrize("penalty_mm", [MISSING_STRUCTURE_DISTANCE_MM, 50.0])
def test_empty_prediction_misses_the_aneurysm(tmp_path, penalty_mm):
    truth, pred, out = folders(tmp_path, {"case_a": truth_labels()})
    save(pred / "case_a.nii.gz", np.zeros(SHAPE, np.uint8))
    summary = score(str(truth), str(pred), str(out), penalty_mm=penalty_mm)
    aneurysm = summary["classes"]["aneurysm"]
    assert aneurysm["dice"]["mean"] == 0.0 and aneurysm["missed"] == 1
    assert aneurysm["hd95"]["mean"] == penalty_mm
    assert summary["failure"]["k"] == 1 and summary["detection"]["hits"] == 0
    assert per_case(out)["case_a.nii.gz"]["missing_prediction"] == "False"  # empty, but present


def test_metrics_use_the_truth_s_own_anisotropic_spacing(tmp_path):
    labels = truth_labels()
    shifted = np.roll(labels, 1, axis=2)  # one voxel along the 0.8 mm axis
    truth, pred, out = folders(tmp_path, {"case_a": labels})
    save(pred / "case_a.nii.gz", shifted)
    score(str(truth), str(pred), str(out))
    row = per_case(out)["case_a.nii.gz"]
    expected = case_metrics(shifted, labels, SPACING)
    assert expected["vessel_hd95"] != case_metrics(shifted, labels, (1.0, 1.0, 1.0))["vessel_hd95"]
    for key in (
        "vessel_hd95",
        "vessel_assd",
        "aneurysm_hd95",
        "aneurysm_true_under_3mm",
        "aneurysm_true_3_to_7mm",
    ):
        assert float(row[key]) == pytest.approx(expected[key])


def test_a_missing_prediction_counts_as_a_miss_and_is_flagged(tmp_path, caplog):
    truth, pred, out = folders(tmp_path, {"case_a": truth_labels(), "case_b": truth_labels(seed=2)})
    save(pred / "case_a_seg.nii.gz", truth_labels())
    with caplog.at_level(logging.WARNING, logger="scripts.score"):
        summary = score(str(truth), str(pred), str(out))
    rows = per_case(out)
    assert rows["case_a.nii.gz"]["missing_prediction"] == "False"
    assert rows["case_b.nii.gz"]["missing_prediction"] == "True"
    assert float(rows["case_b.nii.gz"]["aneurysm_dice"]) == 0.0
    assert float(rows["case_b.nii.gz"]["vessel_hd95"]) == MISSING_STRUCTURE_DISTANCE_MM
    assert summary["n_cases"] == 2 and summary["failure"]["k"] == 1
    assert summary["detection"]["hits"] == 1 and summary["detection"]["true_components"] == 2
    assert "no prediction" in caplog.text and "case_b" in caplog.text


@pytest.mark.parametrize(
    "name",
    ["case_a.nii.gz", "case_a.nii", "case_a_seg.nii.gz", "case_a_seg.nii", "case_a/case_a_seg.nii.gz"],
)
def test_workflow_and_nnunet_names_match(tmp_path, name):
    truth, pred, out = folders(tmp_path, {"case_a": truth_labels()})
    save(pred / name, truth_labels())
    summary = score(str(truth), str(pred), str(out))
    assert summary["classes"]["aneurysm"]["dice"]["mean"] == 1.0
    assert per_case(out)["case_a.nii.gz"]["missing_prediction"] == "False"


def test_predictions_without_truth_are_ignored_with_a_warning(tmp_path, caplog):
    truth, pred, out = folders(tmp_path, {"case_a": truth_labels()})
    save(pred / "case_a.nii.gz", truth_labels())
    save(pred / "stray.nii.gz", truth_labels())
    save(pred / "other" / "case_a_seg.nii.gz", np.zeros(SHAPE, np.uint8))  # not case_a's folder
    (pred / "plans.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="scripts.score"):
        summary = score(str(truth), str(pred), str(out))
    assert summary["n_cases"] == 1 and summary["classes"]["aneurysm"]["dice"]["mean"] == 1.0
    assert "stray.nii.gz" in caplog.text and "other/case_a_seg.nii.gz" in caplog.text
    assert "plans.json" not in caplog.text


def test_no_prediction_matching_any_case_is_an_error(tmp_path):
    truth, pred, out = folders(tmp_path, {"case_a": truth_labels()})
    save(pred / "case_1_0000_seg.nii.gz", truth_labels())
    with pytest.raises(ValueError, match="No file in"):
        score(str(truth), str(pred), str(out))


@pytest.mark.parametrize(
    "names",
    [
        ("case_a.nii.gz", "case_a_seg.nii.gz"),
        ("case_a.nii.gz", "case_a.nii"),
        ("case_a_seg.nii.gz", "case_a/case_a_seg.nii.gz"),
    ],
)
def test_two_predictions_for_one_case_is_an_error_naming_both(tmp_path, names):
    truth, pred, out = folders(tmp_path, {"case_a": truth_labels()})
    for name in names:
        save(pred / name, truth_labels())
    with pytest.raises(ValueError, match="Two predictions for case 'case_a'") as error:
        score(str(truth), str(pred), str(out))
    assert all(str(pred / name) in str(error.value) for name in names)
    assert not out.exists()


def test_two_truth_files_for_one_case_is_an_error(tmp_path):
    truth, pred, out = folders(tmp_path, {"case_a": truth_labels()})
    save(truth / "case_a.nii", truth_labels())
    save(pred / "case_a.nii.gz", truth_labels())
    with pytest.raises(ValueError, match="Two truth files for case 'case_a'"):
        score(str(truth), str(pred), str(out))


def _shifted_affine() -> np.ndarray:
    affine = AFFINE.copy()
    affine[0, 3] += 0.5  # the origin 0.5 mm away
    return affine


def _other_spacing() -> np.ndarray:
    return np.diag([0.4, 0.4, 0.8, 1.0])


@pytest.mark.parametrize(
    "labels, affine, what",
    [
        (truth_labels()[:, :, :-1], AFFINE, r"shape \(24, 20, 15\) vs \(24, 20, 16\)"),
        (truth_labels(), _shifted_affine(), "affine"),
        (truth_labels(), _other_spacing(), "affine"),
    ],
    ids=["shape", "origin", "spacing"],
)
def test_a_prediction_on_another_grid_is_an_error_naming_the_case(tmp_path, labels, affine, what):
    truth, pred, out = folders(tmp_path, {"case_a": truth_labels(), "case_b": truth_labels(seed=2)})
    save(pred / "case_a.nii.gz", truth_labels())
    save(pred / "case_b.nii.gz", labels, affine)
    with pytest.raises(ValueError, match=f"Case 'case_b'.*{what}"):
        score(str(truth), str(pred), str(out))
    assert not out.exists()  # case_a was scored, but nothing is written


def test_a_prediction_within_the_affine_tolerance_is_scored(tmp_path):
    truth, pred, out = folders(tmp_path, {"case_a": truth_labels()})
    affine = AFFINE.copy()
    affine[:3] += 1e-5  # float32 round-off in another writer
    save(pred / "case_a.nii.gz", truth_labels(), affine)
    assert score(str(truth), str(pred), str(out))["classes"]["vessel"]["dice"]["mean"] == 1.0


@pytest.mark.parametrize("values", [np.uint8(3), np.float32(1.5)], ids=["label_3", "non_integer"])
def test_prediction_values_outside_the_classes_name_the_file(tmp_path, values):
    truth, pred, out = folders(tmp_path, {"case_a": truth_labels()})
    labels = truth_labels().astype(values.dtype)
    labels[0, 0, 0] = values
    path = save(pred / "case_a_seg.nii.gz", labels)
    with pytest.raises(ValueError, match=re.escape(f"{path}: label values [{float(values):g}")):
        score(str(truth), str(pred), str(out))


def test_an_unreadable_file_is_an_error_naming_it(tmp_path):
    truth, pred, out = folders(tmp_path, {"case_a": truth_labels()})
    path = pred / "case_a.nii.gz"
    path.write_bytes(b"not a NIfTI volume")
    with pytest.raises(ValueError, match=re.escape(f"{path}: cannot be read")):
        score(str(truth), str(pred), str(out))


def test_written_files_are_the_evaluate_workflow_s_format(tmp_path):
    records = [
        {"case": name, **case_metrics(pred, truth_labels(), SPACING)}
        for name, pred in (("a.nii.gz", truth_labels()), ("b.nii.gz", np.zeros(SHAPE, np.uint8)))
    ]
    summary = write_evaluation(records, tmp_path / "new" / "eval")
    folder = tmp_path / "new" / "eval"
    assert summary == summarize(records)
    assert (folder / "summary.json").read_text() == json.dumps(summary, indent=2, default=float)
    assert (folder / "summary.md").read_text() == format_markdown_table(summary) + "\n"
    rows = (folder / "per_case.csv").read_text().splitlines()
    assert rows[0] == ",".join(records[0]) and len(rows) == 3
    assert rows[2].startswith("b.nii.gz,0.0,0.0,0.0,100.0,100.0,missed,")


def _score_with_the_evaluate_handler(truth_paths: list[Path], preds: list[np.ndarray], output_dir: Path):
    """Run the evaluate workflow's handler on these cases as its evaluator hands them over."""
    handler = SegmentationMetricsWriter(str(output_dir), label_key="original_label")
    engine = SimpleNamespace(state=SimpleNamespace(metrics={}))
    load = LoadImage(image_only=True, ensure_channel_first=True)  # as the workflow loads the label
    for path, pred in zip(truth_paths, preds, strict=True):
        engine.state.batch = [{"original_label": load(path)}]
        engine.state.output = [{"pred": torch.as_tensor(pred[None])}]  # (1, D, H, W)
        handler._score(engine)
    handler._write(engine)
    return engine.state.metrics["summary"]


def test_the_files_equal_what_the_evaluate_handler_writes(tmp_path):
    cases = {"case_a": truth_labels(), "case_b": truth_labels(seed=2)}
    preds = [np.roll(cases["case_a"], 1, axis=2), np.zeros(SHAPE, np.uint8)]
    truth, pred, out = folders(tmp_path, cases)
    save(pred / "case_a_seg.nii.gz", preds[0])
    save(pred / "case_b.nii.gz", preds[1])
    summary = score(str(truth), str(pred), str(out))
    handler_summary = _score_with_the_evaluate_handler(
        [truth / f"{case}.nii.gz" for case in cases], preds, tmp_path / "handler"
    )
    assert summary == handler_summary
    for name in ("summary.json", "summary.md"):
        assert (out / name).read_text() == (tmp_path / "handler" / name).read_text()
    scored = (out / "per_case.csv").read_text().splitlines()
    handled = (tmp_path / "handler" / "per_case.csv").read_text().splitlines()
    # the same columns and values, plus score's own flag at the end
    assert [line.removesuffix(",missing_prediction").removesuffix(",False") for line in scored] == handled


def test_the_command_line(tmp_path):
    truth, pred, out = folders(tmp_path, {"case_a": truth_labels(), "case_b": truth_labels(seed=2)})
    save(pred / "case_a" / "case_a_seg.nii.gz", truth_labels())
    command = [sys.executable, "-m", "scripts.score", "--truth_dir", str(truth), "--pred_dir", str(pred)]
    result = subprocess.run(
        [*command, "--output_dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert all((out / name).is_file() for name in FILES)
    assert json.loads((out / "summary.json").read_text())["n_cases"] == 2
    assert "WARNING" in result.stdout and "case_b" in result.stdout  # the log, not a printed dict
    assert "| aneurysm |" in result.stdout and "n_cases" not in result.stdout + result.stderr
