"""Tests of scripts.metrics with hand-computed expected values."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from scripts.metrics import (
    MISSING_STRUCTURE_DISTANCE_MM,
    case_metrics,
    class_metrics,
    detection_counts,
    format_markdown_table,
    summarize,
)

SHAPE = (20, 20, 20)
ANISO = (0.5, 0.5, 2.0)


def _volume() -> np.ndarray:
    return np.zeros(SHAPE, dtype=np.uint8)


def _case_with_vessel_and_aneurysm() -> np.ndarray:
    label = _volume()
    label[2:18, 9:11, 9:11] = 1  # a straight vessel along axis 0
    label[8:12, 11:15, 8:12] = 2  # a 4^3 aneurysm on its side
    return label


# --------------------------------------------------------------------------------------------------------
# per-case metrics


def test_perfect_prediction():
    label = _case_with_vessel_and_aneurysm()
    record = case_metrics(label.copy(), label, spacing=ANISO)
    for name in ("vessel", "aneurysm"):
        assert record[f"{name}_dice"] == 1.0
        assert record[f"{name}_jaccard"] == 1.0
        assert record[f"{name}_volume_similarity"] == 1.0
        assert record[f"{name}_hd95"] == 0.0
        assert record[f"{name}_assd"] == 0.0
        assert record[f"{name}_status"] == "present"
    assert record["vessel_true_voxels"] == 16 * 2 * 2
    assert (
        record["aneurysm_true_components"],
        record["aneurysm_hits"],
        record["aneurysm_false_positives"],
    ) == (
        1,
        1,
        0,
    )
    assert record["failure"] is False


# A 10^3 cube at [5, 15)^3, predicted shifted by one voxel along `axis`, spacing (0.5, 0.5, 2.0).
# Overlap 9 * 10 * 10 = 900 voxels: Dice = 2 * 900 / 2000 = 0.9, Jaccard = 900 / 1100 = 9/11, VS = 1.
# Surfaces (6-neighbour): 1000 - 8^3 = 488 voxels each; by symmetry both directions give the same
# distances. Prediction -> truth, with s = spacing[axis]:
#  * the 100 voxels of the predicted face outside the truth: one step s along the shifted axis;
#  * the 8 x 8 inner voxels of the opposite predicted face lie inside the truth, not on its surface:
#    the nearest truth surface voxel is one step s back along the shifted axis, or d in {1, 2, 3, 4}
#    steps sideways to a truth side face (each d twice per row), at d * that axis' spacing;
#  * the other 324 surface voxels lie on the truth's side faces: 0.
# Shift along axis 2 (s = 2.0): sideways steps are 0.5 mm, so the inner face gives 0.5 * min(di, dj) with
#   min = 1, 2, 3, 4 for 28, 20, 12, 4 voxels: sum 14 + 20 + 18 + 8 = 60; per direction 100 * 2.0 + 60
#   = 260, ASSD = 520 / 976. Sorted: 324 x 0, 28 x 0.5, 20 x 1.0, 12 x 1.5, 104 x 2.0; the 95th
#   percentile (index 0.95 * 487 = 462.65) is 2.0 mm: the spacing of the shifted axis.
# Shift along axis 0 or 1 (s = 0.5): no sideways step is shorter than 0.5 mm, so all 164 non-zero
#   distances are 0.5: ASSD = 2 * 164 * 0.5 / 976 = 164 / 976, HD95 = 0.5 mm.
@pytest.mark.parametrize(
    "axis, expected_hd95, expected_assd",
    [(0, 0.5, 164 / 976), (1, 0.5, 164 / 976), (2, 2.0, 520 / 976)],
    ids=["axis0-0.5mm", "axis1-0.5mm", "axis2-2.0mm"],
)
def test_shifted_cube_anisotropic(axis, expected_hd95, expected_assd):
    label = _volume()
    label[5:15, 5:15, 5:15] = 2
    pred = np.roll(label, 1, axis=axis)
    record = case_metrics(pred, label, spacing=ANISO, classes={2: "aneurysm"})
    assert record["aneurysm_dice"] == pytest.approx(0.9)
    assert record["aneurysm_jaccard"] == pytest.approx(9 / 11)
    assert record["aneurysm_volume_similarity"] == pytest.approx(1.0)
    assert record["aneurysm_hd95"] == pytest.approx(expected_hd95)
    assert record["aneurysm_assd"] == pytest.approx(expected_assd)
    assert record["aneurysm_status"] == "present"
    assert record["failure"] is False


@pytest.mark.parametrize("swap", [False, True], ids=["pred-smaller", "pred-larger"])
def test_volume_similarity_of_masks_of_different_sizes(swap):
    """30 true voxels, 10 predicted, 5 shared: VS = 1 - |10 - 30| / 40 = 0.5 whichever is larger.

    Dice (2 * 5 / 40 = 0.25) and Jaccard (5 / 35) differ from VS here, so each is checked on its own.
    """
    true_mask = np.zeros(SHAPE, dtype=bool)
    true_mask[0:2, 0, 0:15] = True  # 30 voxels
    pred_mask = np.zeros(SHAPE, dtype=bool)
    pred_mask[0, 0, 10:20] = True  # 10 voxels, 5 of them in the truth
    if swap:
        pred_mask, true_mask = true_mask, pred_mask
    result = class_metrics(pred_mask, true_mask, spacing=ANISO)
    assert result["volume_similarity"] == pytest.approx(0.5)
    assert result["dice"] == pytest.approx(0.25)
    assert result["jaccard"] == pytest.approx(1 / 7)


# The failure definition: aneurysm Dice < 0.5. Four true voxels in a row; the prediction overlaps two of
# them: with 4 predicted voxels Dice = 2 * 2 / 8 = 0.5 exactly (not a failure), with 5 it is 4 / 9 (a failure).
@pytest.mark.parametrize(
    "pred_stop, dice, failure", [(6, 0.5, False), (7, 4 / 9, True)], ids=["dice-0.5", "dice-4/9"]
)
def test_failure_is_aneurysm_dice_strictly_below_one_half(pred_stop, dice, failure):
    label = _volume()
    label[10, 10, 0:4] = 2
    pred = _volume()
    pred[10, 10, 2:pred_stop] = 2
    record = case_metrics(pred, label, spacing=ANISO)
    assert record["aneurysm_dice"] == dice
    assert record["failure"] is failure
    assert summarize([{"case": "c", **record}])["failure"]["k"] == int(failure)


@pytest.mark.parametrize("penalty_mm", [None, 42.0])
def test_empty_prediction_is_missed_with_penalty(penalty_mm):
    label = _case_with_vessel_and_aneurysm()
    kwargs = {} if penalty_mm is None else {"penalty_mm": penalty_mm}
    record = case_metrics(_volume(), label, spacing=ANISO, **kwargs)
    expected_distance = MISSING_STRUCTURE_DISTANCE_MM if penalty_mm is None else penalty_mm
    for name in ("vessel", "aneurysm"):
        assert record[f"{name}_status"] == "missed"
        assert (
            record[f"{name}_dice"] == record[f"{name}_jaccard"] == record[f"{name}_volume_similarity"] == 0.0
        )
        assert record[f"{name}_hd95"] == record[f"{name}_assd"] == expected_distance
    assert record["failure"] is True
    assert (
        record["aneurysm_true_components"],
        record["aneurysm_hits"],
        record["aneurysm_false_positives"],
    ) == (
        1,
        0,
        0,
    )
    assert record["penalty_mm"] == expected_distance


def test_spurious_aneurysm_on_empty_truth():
    label = _volume()
    label[2:18, 9:11, 9:11] = 1
    pred = label.copy()
    pred[3:6, 3:6, 3:6] = 2
    record = case_metrics(pred, label, spacing=ANISO)
    assert record["vessel_dice"] == 1.0
    assert record["aneurysm_status"] == "spurious"
    assert record["aneurysm_dice"] == 0.0
    assert record["aneurysm_hd95"] == record["aneurysm_assd"] == MISSING_STRUCTURE_DISTANCE_MM
    assert (
        record["aneurysm_true_components"],
        record["aneurysm_hits"],
        record["aneurysm_false_positives"],
    ) == (
        0,
        0,
        1,
    )
    assert record["failure"] is True  # aneurysm Dice 0 < 0.5


def test_both_empty():
    record = case_metrics(_volume(), _volume(), spacing=(1.0, 1.0, 1.0))
    for name in ("vessel", "aneurysm"):
        assert record[f"{name}_status"] == "both_empty"
        assert (
            record[f"{name}_dice"] == record[f"{name}_jaccard"] == record[f"{name}_volume_similarity"] == 1.0
        )
        assert record[f"{name}_hd95"] == record[f"{name}_assd"] == 0.0
    assert record["failure"] is False
    assert record["aneurysm_true_components"] == record["aneurysm_false_positives"] == 0


def test_detection_two_true_one_hit_one_spurious():
    label = _volume()
    label[2:5, 2:5, 2:5] = 2  # true aneurysm A
    label[12:15, 12:15, 12:15] = 2  # true aneurysm B
    pred = _volume()
    pred[4:7, 4:7, 4:7] = 2  # overlaps A by the single voxel (4, 4, 4)
    pred[2:4, 15:18, 2:4] = 2  # overlaps nothing
    record = case_metrics(pred, label, spacing=(1.0, 1.0, 1.0))
    assert record["aneurysm_true_components"] == 2
    assert record["aneurysm_hits"] == 1
    assert record["aneurysm_false_positives"] == 1
    # Dice = 2 * 1 / (54 + 27 + 12)
    assert record["aneurysm_dice"] == pytest.approx(2 / 93)


def test_components_are_26_connected():
    true_mask = np.zeros(SHAPE, dtype=bool)
    true_mask[5, 5, 5] = true_mask[6, 6, 6] = True  # touch only at a corner: one component
    pred_mask = np.zeros(SHAPE, dtype=bool)
    pred_mask[6, 6, 6] = True
    assert detection_counts(pred_mask, true_mask) == {"true_components": 1, "hits": 1, "false_positives": 0}


def _brute_force_distances(pred_mask, true_mask, spacing):
    """Surface distances by padding (outside = background) and all-pairs distances: no cropping, no EDT."""

    def surface_points(mask):
        padded = np.pad(mask, 1)
        interior = padded[1:-1, 1:-1, 1:-1].copy()
        for axis in range(3):
            for step in (-1, 1):
                interior &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~interior) * np.asarray(spacing)

    distances = cdist(surface_points(pred_mask), surface_points(true_mask))
    d_pt, d_tp = distances.min(axis=1), distances.min(axis=0)
    hd95 = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
    return hd95, (d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size)


@pytest.mark.parametrize("seed", range(4))
def test_cropped_edt_matches_brute_force(seed):
    """Random blobs, some touching the volume border and far apart, against all-pairs distances."""
    rng = np.random.default_rng(seed)
    shape = (14, 12, 10)
    pred_mask = np.zeros(shape, dtype=bool)
    true_mask = np.zeros(shape, dtype=bool)
    pred_mask[: rng.integers(2, 6), 2:7, rng.integers(0, 4) : 8] = True  # touches the border at axis 0
    pred_mask[11:13, 9:12, 0:2] = True  # a far blob touching two borders
    true_mask[1:5, 3:8, 2:9] = True
    true_mask |= rng.random(shape) > 0.97  # scattered voxels
    spacing = (0.7, 0.4, 1.3)
    result = class_metrics(pred_mask, true_mask, spacing)
    expected_hd95, expected_assd = _brute_force_distances(pred_mask, true_mask, spacing)
    assert result["hd95"] == pytest.approx(expected_hd95)
    assert result["assd"] == pytest.approx(expected_assd)


# --------------------------------------------------------------------------------------------------------
# invalid inputs


@pytest.mark.parametrize(
    "pred, label, spacing, match",
    [
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 5), int), (1, 1, 1), r"\(4, 4, 4\).*\(4, 4, 5\)"),
        (np.zeros((4, 4), int), np.zeros((4, 4), int), (1, 1, 1), r"3D.*\(4, 4\)"),
        (np.full((4, 4, 4), 3), np.zeros((4, 4, 4), int), (1, 1, 1), r"pred .*unknown label values \[3\]"),
        (np.zeros((4, 4, 4), int), np.full((4, 4, 4), -1), (1, 1, 1), r"label .*unknown label values \[-1\]"),
        (np.full((4, 4, 4), 0.5), np.zeros((4, 4, 4), int), (1, 1, 1), r"non-integer values \[0.5\]"),
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), (1, 0, 1), r"spacing.*\(1, 0, 1\)"),
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), (1, 1), r"spacing.*\(1, 1\)"),
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), (1, -2, 1), r"spacing.*-2"),
    ],
    ids=[
        "shapes",
        "not-3d",
        "unknown-pred",
        "unknown-label",
        "float-labels",
        "zero-spacing",
        "2-spacing",
        "neg",
    ],
)
def test_invalid_inputs_raise(pred, label, spacing, match):
    with pytest.raises(ValueError, match=match):
        case_metrics(pred, label, spacing=spacing)


def test_label_outside_requested_classes_raises():
    label = _case_with_vessel_and_aneurysm()
    with pytest.raises(ValueError, match=r"unknown label values \[1\]"):
        case_metrics(label, label, spacing=(1, 1, 1), classes={2: "aneurysm"})


@pytest.mark.parametrize("penalty_mm", [0.0, -1.0, math.nan, math.inf])
def test_invalid_penalty_raises(penalty_mm):
    with pytest.raises(ValueError, match="penalty_mm"):
        case_metrics(_volume(), _volume(), spacing=(1, 1, 1), penalty_mm=penalty_mm)


# --------------------------------------------------------------------------------------------------------
# summaries


def _record(case, a_dice, a_hd95, a_status, true_cc, hits, fps):
    return {
        "case": case,
        "vessel_dice": 0.8,
        "vessel_jaccard": 0.7,
        "vessel_volume_similarity": 0.9,
        "vessel_hd95": 1.0,
        "vessel_assd": 0.5,
        "vessel_status": "present",
        "aneurysm_dice": a_dice,
        "aneurysm_jaccard": a_dice / 2,
        "aneurysm_volume_similarity": 1.0,
        "aneurysm_hd95": a_hd95,
        "aneurysm_assd": a_hd95,
        "aneurysm_status": a_status,
        "aneurysm_true_components": true_cc,
        "aneurysm_hits": hits,
        "aneurysm_false_positives": fps,
        "failure": a_dice < 0.5,
        "penalty_mm": 5.0,
    }


RECORDS = [
    _record("c1", 0.9, 1.0, "present", 1, 1, 0),
    _record("c2", 0.6, 3.0, "present", 2, 1, 1),
    _record("c3", 0.0, 5.0, "missed", 1, 0, 2),
]


def _check_summary(summary):
    assert summary["n_cases"] == 3
    aneurysm = summary["classes"]["aneurysm"]
    # Dice 0.9, 0.6, 0.0: mean 0.5; population std sqrt((0.4^2 + 0.1^2 + 0.5^2) / 3) = sqrt(0.14)
    assert aneurysm["dice"]["mean"] == pytest.approx(0.5)
    assert aneurysm["dice"]["std"] == pytest.approx(math.sqrt(0.14))
    assert aneurysm["dice"]["n"] == 3
    # HD95 1, 3, 5: mean 3, population std sqrt((4 + 0 + 4) / 3)
    assert aneurysm["hd95"]["mean"] == pytest.approx(3.0)
    assert aneurysm["hd95"]["std"] == pytest.approx(math.sqrt(8 / 3))
    assert (aneurysm["present"], aneurysm["missed"], aneurysm["spurious"], aneurysm["both_empty"]) == (
        2,
        1,
        0,
        0,
    )
    vessel = summary["classes"]["vessel"]
    assert vessel["dice"] == {"mean": pytest.approx(0.8), "std": pytest.approx(0.0), "n": 3}
    assert summary["failure"] == {"k": 1, "n": 3, "rate": pytest.approx(1 / 3), "threshold": 0.5}
    detection = summary["detection"]
    assert (detection["true_components"], detection["hits"], detection["false_positives"]) == (4, 2, 3)
    assert detection["sensitivity"] == pytest.approx(0.5)
    assert detection["false_positives_per_case"] == pytest.approx(1.0)
    assert summary["penalty_mm"] == 5.0


def test_summarize_hand_made_records():
    _check_summary(summarize(RECORDS))


def test_summarize_records_read_back_from_csv():
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(RECORDS[0]))
    writer.writeheader()
    writer.writerows(RECORDS)
    _check_summary(summarize(list(csv.DictReader(io.StringIO(buffer.getvalue())))))


def test_summarize_case_metrics_output():
    label = _case_with_vessel_and_aneurysm()
    records = [
        {"case": "perfect", **case_metrics(label, label, spacing=ANISO)},
        {"case": "empty", **case_metrics(_volume(), label, spacing=ANISO)},
    ]
    summary = summarize(records)
    assert summary["classes"]["aneurysm"]["dice"]["mean"] == pytest.approx(0.5)
    assert summary["classes"]["aneurysm"]["hd95"]["mean"] == pytest.approx(MISSING_STRUCTURE_DISTANCE_MM / 2)
    assert summary["failure"]["k"] == 1
    assert summary["detection"]["sensitivity"] == pytest.approx(0.5)


@pytest.mark.parametrize("value", [math.nan, math.inf, "nan"])
def test_summarize_nan_raises_naming_case(value):
    records = [dict(r) for r in RECORDS]
    records[1]["aneurysm_hd95"] = value
    with pytest.raises(ValueError, match=r"c2.*aneurysm_hd95"):
        summarize(records)


def test_summarize_empty_raises():
    with pytest.raises(ValueError, match="empty"):
        summarize([])


def test_summarize_missing_key_raises():
    records = [dict(r) for r in RECORDS]
    del records[2]["aneurysm_assd"]
    with pytest.raises(ValueError, match=r"c3.*aneurysm_assd"):
        summarize(records)


def test_markdown_table():
    table = format_markdown_table(summarize(RECORDS))
    lines = table.splitlines()
    assert lines[0].startswith("| Class | Dice | HD95 (mm) |")
    assert "| aneurysm | 0.500 ± 0.374 | 3.00 ± 1.63 |" in table
    assert "| vessel | 0.800 ± 0.000 |" in table
    assert "| 3 | 1 / 0 / 0 |" in table
    assert "1/3 (33.3%)" in table
    assert "sensitivity 50.0% (2/4 components)" in table
    assert "1.00 false positives per case" in table
    assert "5 mm" in table


def test_surface_distances_agree_with_monai_on_irregular_anisotropic_masks():
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    rng = np.random.default_rng(0)

    def blob(shift: int) -> np.ndarray:
        mask = np.zeros((40, 36, 30), bool)
        mask[8 + shift : 25 + shift, 10:24, 5:20] = True
        return ndimage.binary_dilation(mask, iterations=2) & (rng.random(mask.shape) > 0.1)

    pred, true, spacing = blob(0), blob(3), (0.4, 0.5, 0.8)
    ours = class_metrics(pred, true, spacing=spacing)
    # (1, 2, *spatial) one-hot: background, foreground
    onehot = [torch.from_numpy(np.stack([~m, m])[None].astype(np.float32)) for m in (pred, true)]
    hd95 = compute_hausdorff_distance(*onehot, include_background=False, percentile=95, spacing=spacing)
    assd = compute_average_surface_distance(
        *onehot, include_background=False, symmetric=True, spacing=spacing
    )
    assert ours["hd95"] == pytest.approx(hd95.item(), rel=1e-5)
    assert ours["assd"] == pytest.approx(assd.item(), rel=1e-5)


def _ball(shape, spacing, centre_mm, diameter_mm) -> np.ndarray:
    grid = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, centre_mm, strict=True)) <= (diameter_mm / 2) ** 2


def test_detection_sensitivity_per_aneurysm_size():
    # balls of 2, 5 and 9 mm (one per size bin) on an anisotropic grid; the 2 and 9 mm ones are found
    shape, spacing = (60, 48, 40), (0.5, 0.4, 0.3)
    balls = [_ball(shape, spacing, (c, 9.0, 6.0), d) for c, d in ((3.0, 2.0), (10.0, 5.0), (22.0, 9.0))]
    label = _volume_of(shape, balls, 2)
    pred = _volume_of(shape, [balls[0], balls[2]], 2)
    record = case_metrics(pred, label, spacing)
    assert [record[f"aneurysm_true_{key}"] for key in ("under_3mm", "3_to_7mm", "over_7mm")] == [1, 1, 1]
    assert [record[f"aneurysm_hits_{key}"] for key in ("under_3mm", "3_to_7mm", "over_7mm")] == [1, 0, 1]
    # a second case with one missed 2 mm aneurysm: the bins add up over cases
    other = case_metrics(np.zeros(shape, np.uint8), _volume_of(shape, [balls[0]], 2), spacing)
    by_size = summarize([{"case": "a", **record}, {"case": "b", **other}])["detection"]["by_size"]
    assert by_size["under_3mm"] == {"name": "< 3 mm", "true_components": 2, "hits": 1, "sensitivity": 0.5}
    assert by_size["3_to_7mm"]["sensitivity"] == 0.0
    assert by_size["over_7mm"]["sensitivity"] == 1.0
    table = format_markdown_table(summarize([record, other]))
    assert "Sensitivity by size (equivalent-sphere diameter): < 3 mm 50.0% (1/2), 3-7 mm 0.0% (0/1)" in table


def _volume_of(shape, masks, value) -> np.ndarray:
    volume = np.zeros(shape, dtype=np.uint8)
    for mask in masks:
        volume[mask] = value
    return volume
