"""Segmentation metrics for DINO-3DRA that cannot flatter: no NaN that a mean silently skips.

Labels are 0 background, 1 vessel, 2 aneurysm. For every evaluated class, :func:`case_metrics` returns
Dice, Jaccard, volume similarity, HD95 and ASSD (both in mm, with the real, possibly anisotropic, voxel
spacing) and the status of the case for that class; for the aneurysm class it adds connected-component
detection counts and the per-case ``failure`` flag. :func:`summarize` turns a list of such records into
means, standard deviations and counts, and :func:`format_markdown_table` prints the summary in the
paper's form.

Documented choices:

* **Surfaces** are the voxels of a mask with at least one 6-neighbour outside the mask; everything
  outside the volume counts as background, so a mask touching the border has a surface there.
* **HD95** is the *maximum of the two directed 95th percentiles*: the 95th percentile of the distances
  from each predicted surface voxel to the nearest true surface voxel, the same from truth to
  prediction, and the larger of the two (as MONAI's ``compute_hausdorff_distance(percentile=95)``).
  Percentiles use numpy's default linear interpolation.
* **ASSD** is the mean of the pooled surface distances of both directions:
  ``(sum d(P->T) + sum d(T->P)) / (|S_P| + |S_T|)``.
* **Status and penalty** per class: ``present`` (both non-empty, metrics computed), ``missed`` (truth
  non-empty, prediction empty), ``spurious`` (truth empty, prediction non-empty) and ``both_empty``.
  Missed and spurious score Dice = Jaccard = volume similarity = 0 and HD95 = ASSD = ``penalty_mm``
  (default :data:`MISSING_STRUCTURE_DISTANCE_MM`); both empty is a correct "nothing here" and scores
  Dice = Jaccard = volume similarity = 1, HD95 = ASSD = 0.
* **Failure** of a case: aneurysm Dice < :data:`FAILURE_DICE_THRESHOLD`.
* **Detection**: aneurysm components with 26-connectivity; a true component is hit when any predicted
  aneurysm voxel overlaps it, a predicted component overlapping no true aneurysm voxel is a false
  positive. Sensitivity is also given per size bin (:data:`SIZE_BINS`), the size of a true component
  being its equivalent-sphere diameter ``(6 V / pi) ** (1/3)`` from its volume in mm^3. The label is
  the sac beyond the parent wall, so this reads somewhat below a dome diameter measured by hand.
* **Summary std** is the population standard deviation (``ddof=0``); ``n`` is always reported beside
  it, so the sample value is ``std * sqrt(n / (n - 1))``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from scripts.labels import ANEURYSM_LABEL, BACKGROUND_LABEL, COMPONENT_CONNECTIVITY, LABEL_NAMES, VESSEL_LABEL

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CLASSES",
    "FAILURE_DICE_THRESHOLD",
    "MISSING_STRUCTURE_DISTANCE_MM",
    "SIZE_BINS",
    "case_metrics",
    "class_metrics",
    "detection_counts",
    "format_markdown_table",
    "format_mean_std",
    "summarize",
]

DEFAULT_CLASSES: dict[int, str] = {label: LABEL_NAMES[label] for label in (VESSEL_LABEL, ANEURYSM_LABEL)}

MISSING_STRUCTURE_DISTANCE_MM = 100.0
"""HD95 and ASSD (mm) given to a class that is missed or spurious (exactly one of truth/prediction empty)."""

FAILURE_DICE_THRESHOLD = 0.5
"""A case fails when its aneurysm Dice is strictly below this value."""

METRICS: tuple[str, ...] = ("dice", "jaccard", "volume_similarity", "hd95", "assd")
"""Per-class metric names; record keys are ``f"{class_name}_{metric}"``."""

SIZE_BINS: tuple[tuple[str, str, float, float], ...] = (
    ("under_3mm", "< 3 mm", 0.0, 3.0),
    ("3_to_7mm", "3-7 mm", 3.0, 7.0),
    ("over_7mm", "> 7 mm", 7.0, math.inf),
)
"""Aneurysm size bins ``(key, display name, lower, upper)`` in mm of equivalent-sphere diameter,
``lower <= d < upper``; record keys ``f"{class_name}_true_{key}"`` and ``f"{class_name}_hits_{key}"``."""

STATUSES: tuple[str, ...] = ("present", "missed", "spurious", "both_empty")
"""Per-class case status; record key ``f"{class_name}_status"``."""

# 6-connectivity defines the surface; aneurysm components are scripts.labels.COMPONENT_CONNECTIVITY's (26).
_SURFACE_STRUCTURE = ndimage.generate_binary_structure(3, 1)
# Voxels of margin around the union of both masks when cropping before the distance transforms. The
# result is exact for any margin >= 0 (see ``_crop_box``); one voxel keeps the surfaces visibly inside.
_CROP_MARGIN = 1


# --------------------------------------------------------------------------------------------------------
# validation helpers


def _check_classes(classes: Mapping[int, str]) -> dict[int, str]:
    if not classes:
        raise ValueError(f"classes must name at least one foreground label, got {classes!r}")
    checked: dict[int, str] = {}
    for label, name in classes.items():
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label <= BACKGROUND_LABEL:
            raise ValueError(f"class labels must be positive integers, got {label!r} in {dict(classes)!r}")
        if not isinstance(name, str) or not name or not name.isidentifier():
            raise ValueError(f"class names must be identifier-like strings, got {name!r} for label {label}")
        checked[int(label)] = name
    if len(set(checked.values())) != len(checked):
        raise ValueError(f"class names must be unique, got {dict(classes)!r}")
    return checked


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as err:
        raise ValueError(f"spacing must be 3 positive numbers in mm, got {spacing!r}") from err
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be 3 positive finite numbers in mm, got {spacing!r}")
    return values[0], values[1], values[2]


def _check_penalty(penalty_mm: float) -> float:
    value = float(penalty_mm)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"penalty_mm must be a positive finite distance in mm, got {penalty_mm!r}")
    return value


def _as_label_volume(volume: Any, name: str) -> np.ndarray:
    """Return ``volume`` as a 3D integer numpy array; floats are accepted only if integral."""
    array = np.asarray(volume)
    if array.ndim != 3:
        raise ValueError(f"{name} must be a 3D label volume (D, H, W), got shape {array.shape}")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        return array
    if np.issubdtype(array.dtype, np.floating):
        rounded = np.round(array)
        bad = array != rounded  # also True for NaN
        if bad.any():
            examples = np.unique(array[bad])[:5].tolist()
            raise ValueError(f"{name} must hold integer labels, got non-integer values {examples}")
        return rounded.astype(np.int64)
    raise ValueError(f"{name} must hold integer labels, got dtype {array.dtype}")


def _unknown_values(array: np.ndarray, allowed: Sequence[int]) -> list[int]:
    outside = array[~np.isin(array, np.asarray(allowed))]
    return np.unique(outside)[:10].tolist()


def _confusion(pred: np.ndarray, label: np.ndarray, allowed: Sequence[int]) -> np.ndarray:
    """Joint voxel counts ``conf[true, pred]`` of shape (K, K), K = max allowed label + 1.

    Raises ValueError naming any label value outside ``allowed`` in either volume.
    """
    k = max(allowed) + 1
    for array, name in ((pred, "pred"), (label, "label")):
        if array.size and (int(array.min()) < 0 or int(array.max()) >= k):
            raise ValueError(
                f"{name} contains unknown label values {_unknown_values(array, allowed)}; "
                f"allowed are {sorted(allowed)}"
            )
    # one pass over both volumes: index = true * K + pred
    joint = label.astype(np.intp) * k + pred
    conf = np.bincount(joint.ravel(), minlength=k * k).reshape(k, k)
    not_allowed = [v for v in range(k) if v not in allowed]
    for counts, name in ((conf.sum(axis=0), "pred"), (conf.sum(axis=1), "label")):
        unknown = [v for v in not_allowed if counts[v] > 0]
        if unknown:
            raise ValueError(f"{name} contains unknown label values {unknown}; allowed are {sorted(allowed)}")
    return conf


# --------------------------------------------------------------------------------------------------------
# geometry


def _crop_box(*masks: np.ndarray, margin: int = _CROP_MARGIN) -> tuple[slice, ...] | None:
    """Bounding box of the union of ``masks`` padded by ``margin`` voxels (clipped to the volume).

    Cropping is exact for the surface distances: outside the box there is only background, so the
    6-neighbour surface test sees the same neighbours (erosion treats outside-the-array as background,
    as the volume border is treated), and every surface voxel of either mask lies inside the box, so the
    nearest surface voxel to any query point inside the box is found by the EDT of the cropped array.
    Returns None when all masks are empty.
    """
    union = masks[0].copy()
    for mask in masks[1:]:
        union |= mask
    found = ndimage.find_objects(union.view(np.uint8))
    if not found:
        return None
    return tuple(
        slice(max(s.start - margin, 0), min(s.stop + margin, size))
        for s, size in zip(found[0], union.shape, strict=True)
    )


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one 6-neighbour outside it (outside-the-array is background)."""
    eroded = ndimage.binary_erosion(mask, structure=_SURFACE_STRUCTURE, border_value=0)
    return mask & ~eroded


def _surface_distances(
    pred_mask: np.ndarray, true_mask: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm between two non-empty masks of the same (cropped) shape.

    Returns:
        ``(d_pred_to_true, d_true_to_pred)``: 1D arrays, one distance per surface voxel of the first
        mask to the nearest surface voxel of the second.
    """
    surface_pred = _surface(pred_mask)
    surface_true = _surface(true_mask)
    # EDT of the complement of a surface = distance (mm) from every voxel to its nearest surface voxel.
    to_true = ndimage.distance_transform_edt(~surface_true, sampling=spacing)
    d_pred_to_true = to_true[surface_pred]
    del to_true
    to_pred = ndimage.distance_transform_edt(~surface_pred, sampling=spacing)
    d_true_to_pred = to_pred[surface_true]
    return d_pred_to_true, d_true_to_pred


# --------------------------------------------------------------------------------------------------------
# per-case metrics


def _overlap_metrics(tp: int, n_pred: int, n_true: int) -> dict[str, float]:
    total = n_pred + n_true
    return {
        "dice": 2.0 * tp / total,
        "jaccard": tp / (total - tp),
        "volume_similarity": 1.0 - abs(n_pred - n_true) / total,
    }


def class_metrics(
    pred_mask: np.ndarray,
    true_mask: np.ndarray,
    spacing: Sequence[float],
    penalty_mm: float = MISSING_STRUCTURE_DISTANCE_MM,
) -> dict[str, float | str]:
    """Metrics of one binary structure.

    Args:
        pred_mask: predicted mask, bool array (D, H, W).
        true_mask: true mask, bool array (D, H, W), same shape.
        spacing: voxel spacing in mm along (D, H, W), positive, anisotropic allowed.
        penalty_mm: HD95 and ASSD given when exactly one mask is empty. Defaults to
            :data:`MISSING_STRUCTURE_DISTANCE_MM`.

    Returns:
        ``{"dice", "jaccard", "volume_similarity", "hd95", "assd"}`` as floats (never NaN or inf) and
        ``"status"`` in :data:`STATUSES`.

    Raises:
        ValueError: if the shapes differ or are not 3D, or spacing / penalty is not positive.
    """
    pred_mask = np.asarray(pred_mask, dtype=bool)
    true_mask = np.asarray(true_mask, dtype=bool)
    if pred_mask.shape != true_mask.shape or pred_mask.ndim != 3:
        raise ValueError(
            f"pred and label must be 3D with the same shape, got {pred_mask.shape} and {true_mask.shape}"
        )
    spacing3 = _check_spacing(spacing)
    penalty = _check_penalty(penalty_mm)
    n_pred = int(np.count_nonzero(pred_mask))
    n_true = int(np.count_nonzero(true_mask))
    tp = int(np.count_nonzero(pred_mask & true_mask)) if n_pred and n_true else 0
    return _class_metrics_from_counts(pred_mask, true_mask, tp, n_pred, n_true, spacing3, penalty)


def _fixed_result(overlap: float, distance_mm: float, status: str) -> dict[str, float | str]:
    return {
        "dice": overlap,
        "jaccard": overlap,
        "volume_similarity": overlap,
        "hd95": distance_mm,
        "assd": distance_mm,
        "status": status,
    }


def _class_metrics_from_counts(
    pred_mask: np.ndarray,
    true_mask: np.ndarray,
    tp: int,
    n_pred: int,
    n_true: int,
    spacing: tuple[float, float, float],
    penalty_mm: float,
) -> dict[str, float | str]:
    if n_pred == 0 and n_true == 0:  # a correct "nothing here"
        return _fixed_result(overlap=1.0, distance_mm=0.0, status="both_empty")
    if n_pred == 0 or n_true == 0:  # the fixed penalty, never NaN
        return _fixed_result(
            overlap=0.0, distance_mm=penalty_mm, status="missed" if n_pred == 0 else "spurious"
        )
    result: dict[str, float | str] = dict(_overlap_metrics(tp, n_pred, n_true))
    if tp == n_pred == n_true:  # identical masks: every surface distance is 0
        result.update(hd95=0.0, assd=0.0, status="present")
        return result
    box = _crop_box(pred_mask, true_mask)
    d_pt, d_tp = _surface_distances(pred_mask[box], true_mask[box], spacing)
    hd95 = max(float(np.percentile(d_pt, 95)), float(np.percentile(d_tp, 95)))
    assd = float((d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size))
    result.update(hd95=hd95, assd=assd, status="present")
    return result


def detection_counts(
    pred_mask: np.ndarray, true_mask: np.ndarray, spacing: Sequence[float] | None = None
) -> dict[str, int]:
    """Connected-component detection counts (26-connectivity) of one structure.

    A true component is a hit when any predicted voxel overlaps it; a predicted component overlapping
    no true voxel is a false positive.

    Args:
        pred_mask: predicted mask, bool array (D, H, W).
        true_mask: true mask, bool array (D, H, W), same shape.
        spacing: voxel spacing in mm along (D, H, W); when given, true components and hits are also
            counted per :data:`SIZE_BINS` bin of equivalent-sphere diameter.

    Returns:
        ``{"true_components", "hits", "false_positives"}`` as ints, plus ``true_{bin}`` and
        ``hits_{bin}`` for every bin when ``spacing`` is given.
    """
    pred_mask = np.asarray(pred_mask, dtype=bool)
    true_mask = np.asarray(true_mask, dtype=bool)
    if pred_mask.shape != true_mask.shape:
        raise ValueError(
            f"pred and label must have the same shape, got {pred_mask.shape} and {true_mask.shape}"
        )
    counts = {"true_components": 0, "hits": 0, "false_positives": 0}
    if spacing is not None:
        spacing = _check_spacing(spacing)
        counts.update({f"{kind}_{key}": 0 for key, *_ in SIZE_BINS for kind in ("true", "hits")})
    box = _crop_box(pred_mask, true_mask, margin=0)
    if box is None:
        return counts
    pred_mask, true_mask = pred_mask[box], true_mask[box]
    true_cc, n_true = ndimage.label(true_mask, structure=COMPONENT_CONNECTIVITY)
    pred_cc, n_pred = ndimage.label(pred_mask, structure=COMPONENT_CONNECTIVITY)
    is_hit = np.zeros(n_true + 1, dtype=bool)
    is_hit[true_cc[pred_mask]] = True
    is_hit[0] = False
    overlapping_pred_ids = np.unique(pred_cc[true_mask])
    counts.update(
        true_components=int(n_true),
        hits=int(is_hit.sum()),
        false_positives=int(n_pred - np.count_nonzero(overlapping_pred_ids)),
    )
    if spacing is not None:
        volumes_mm3 = np.bincount(true_cc.ravel(), minlength=n_true + 1)[1:] * float(np.prod(spacing))
        diameters = np.cbrt(6.0 * volumes_mm3 / math.pi)
        for key, _, lower, upper in SIZE_BINS:
            in_bin = (diameters >= lower) & (diameters < upper)
            counts[f"true_{key}"] = int(in_bin.sum())
            counts[f"hits_{key}"] = int((in_bin & is_hit[1:]).sum())
    return counts


def case_metrics(
    pred: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float],
    classes: Mapping[int, str] | None = None,
    penalty_mm: float = MISSING_STRUCTURE_DISTANCE_MM,
) -> dict[str, Any]:
    """Per-case, per-class metrics of a predicted label volume against the true one.

    Example::

        record = {"case": "case_007", **case_metrics(pred, label, spacing=(0.5, 0.5, 0.5))}

    Args:
        pred: predicted label volume (D, H, W), integer values in ``{0} | classes`` (bool or integral
            floats accepted).
        label: true label volume (D, H, W), same shape and values.
        spacing: voxel spacing in mm along (D, H, W); positive, anisotropic allowed.
        classes: foreground label -> name; the names prefix the record keys. Defaults to
            :data:`DEFAULT_CLASSES` ``{1: "vessel", 2: "aneurysm"}``. Any value outside
            ``{0} | classes`` in either volume is an error rather than silently ignored.
        penalty_mm: HD95 and ASSD (mm) of a missed or spurious structure. Defaults to
            :data:`MISSING_STRUCTURE_DISTANCE_MM`.

    Returns:
        A flat record (one CSV row). For each class ``name``: ``{name}_dice``, ``{name}_jaccard``,
        ``{name}_volume_similarity``, ``{name}_hd95``, ``{name}_assd`` (floats, never NaN),
        ``{name}_status`` (one of :data:`STATUSES`), ``{name}_true_voxels``, ``{name}_pred_voxels``.
        If :data:`ANEURYSM_LABEL` is among the classes, also ``{name}_true_components``,
        ``{name}_hits``, ``{name}_false_positives``, ``{name}_true_{bin}`` and ``{name}_hits_{bin}``
        per :data:`SIZE_BINS` bin, and ``failure`` (aneurysm Dice <
        :data:`FAILURE_DICE_THRESHOLD`). Finally ``penalty_mm``, so a summary can state it.

    Raises:
        ValueError: on different or non-3D shapes, unknown label values, non-positive spacing or
            penalty, or invalid classes.
    """
    classes = _check_classes(DEFAULT_CLASSES if classes is None else classes)
    pred_arr = _as_label_volume(pred, "pred")
    label_arr = _as_label_volume(label, "label")
    if pred_arr.shape != label_arr.shape:
        raise ValueError(f"pred and label shapes differ: pred {pred_arr.shape} vs label {label_arr.shape}")
    spacing3 = _check_spacing(spacing)
    penalty = _check_penalty(penalty_mm)
    conf = _confusion(pred_arr, label_arr, [BACKGROUND_LABEL, *classes])

    record: dict[str, Any] = {}
    for value, name in classes.items():
        class_record = _class_record(pred_arr == value, label_arr == value, conf, value, spacing3, penalty)
        record.update({f"{name}_{key}": item for key, item in class_record.items()})
    if ANEURYSM_LABEL in classes:
        record["failure"] = bool(record[f"{classes[ANEURYSM_LABEL]}_dice"] < FAILURE_DICE_THRESHOLD)
    record["penalty_mm"] = penalty
    logger.debug("case metrics: %s", record)
    return record


def _class_record(
    pred_mask: np.ndarray,
    true_mask: np.ndarray,
    conf: np.ndarray,
    value: int,
    spacing: tuple[float, float, float],
    penalty: float,
) -> dict[str, Any]:
    """One class's part of :func:`case_metrics`'s record, keys without the class name: the metrics, status
    and voxel counts, and for :data:`ANEURYSM_LABEL` the detection counts.

    Args:
        pred_mask: (D, H, W) bool, the predicted voxels of the class.
        true_mask: (D, H, W) bool, its true voxels.
        conf: (K, K) joint voxel counts ``conf[true, pred]`` from :func:`_confusion`.
        value: the class's label value.
        spacing: voxel spacing in mm along (D, H, W).
        penalty: HD95 and ASSD (mm) of a missed or spurious structure.
    """
    n_true, n_pred, tp = int(conf[value, :].sum()), int(conf[:, value].sum()), int(conf[value, value])
    metrics = _class_metrics_from_counts(pred_mask, true_mask, tp, n_pred, n_true, spacing, penalty)
    record = {key: metrics[key] for key in (*METRICS, "status")}
    record["true_voxels"] = n_true
    record["pred_voxels"] = n_pred
    if value == ANEURYSM_LABEL:
        record.update(detection_counts(pred_mask, true_mask, spacing))
    return record


# --------------------------------------------------------------------------------------------------------
# summaries


def _case_name(record: Mapping[str, Any], index: int) -> str:
    return str(record["case"]) if "case" in record else f"record #{index}"


def _get(record: Mapping[str, Any], key: str, index: int) -> Any:
    if key not in record:
        raise ValueError(f"{_case_name(record, index)} has no {key!r}; keys are {sorted(record)}")
    return record[key]


def _as_finite_float(record: Mapping[str, Any], key: str, index: int) -> float:
    raw = _get(record, key, index)
    try:
        value = float(raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{_case_name(record, index)}: {key} = {raw!r} is not a number") from err
    if not math.isfinite(value):
        raise ValueError(
            f"{_case_name(record, index)}: {key} = {raw!r} is not finite; metrics may not be NaN"
        )
    return value


def _as_count(record: Mapping[str, Any], key: str, index: int) -> int:
    value = _as_finite_float(record, key, index)
    if value < 0 or value != int(value):
        raise ValueError(f"{_case_name(record, index)}: {key} = {value!r} is not a non-negative count")
    return int(value)


_TRUE_STRINGS = {"true", "1", "yes"}
_FALSE_STRINGS = {"false", "0", "no"}


def _as_bool(record: Mapping[str, Any], key: str, index: int) -> bool:
    """Bools, 0/1 and their CSV spellings ("True", "False", "1", "0")."""
    raw = _get(record, key, index)
    if isinstance(raw, (bool, np.bool_)):
        return bool(raw)
    text = str(raw).strip().lower()
    if text in _TRUE_STRINGS:
        return True
    if text in _FALSE_STRINGS:
        return False
    raise ValueError(f"{_case_name(record, index)}: {key} = {raw!r} is not a boolean")


def _prefixes(record: Mapping[str, Any], suffix: str) -> list[str]:
    return sorted(key[: -len(suffix)] for key in record if key.endswith(suffix))


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Summary statistics of per-case records from :func:`case_metrics` (or read back from their CSV).

    Args:
        records: one record per case, all with the same classes; a ``case`` key, if present, names
            the case in errors.

    Returns:
        ``{"n_cases", "penalty_mm", "classes", "failure", "detection"}`` where

        * ``classes[name][metric] = {"mean", "std", "n"}`` for each metric in :data:`METRICS`, with
          the population std (``ddof=0``) over all ``n`` cases, penalties included, and
          ``classes[name]["n"]`` and ``classes[name][status]`` counting the cases of each status in
          :data:`STATUSES`;
        * ``failure = {"k", "n", "rate", "threshold"}`` (k failed of n cases), or None when the records
          carry no ``failure``;
        * ``detection = {"class", "true_components", "hits", "false_positives", "n", "sensitivity",
          "false_positives_per_case", "by_size"}`` with sensitivity = hits / true components (None when
          there is no true component at all), or None when the records carry no detection counts;
          ``by_size[key] = {"name", "true_components", "hits", "sensitivity"}`` per :data:`SIZE_BINS`
          bin, or None when the records carry no per-size counts.

    Raises:
        ValueError: on an empty list, a missing key, a NaN or infinite value (naming the case), an
            unknown status, or records with different classes.
    """
    names = _class_names(records)
    classes = {name: _class_summary(records, name) for name in names}
    failure = _failure_summary(records)
    detection = _detection_summary(records, names)
    return {
        "n_cases": len(records),
        "penalty_mm": _penalty(records),
        "classes": classes,
        "failure": failure,
        "detection": detection,
    }


def _class_names(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The class names of the records (``<class>_status`` keys), which must be the same in every record."""
    if len(records) == 0:
        raise ValueError("summarize needs at least one record, got an empty list")
    names = _prefixes(records[0], "_status")
    if not names:
        raise ValueError(
            f"{_case_name(records[0], 0)} has no '<class>_status' key; keys are {sorted(records[0])}"
        )
    for index, record in enumerate(records):
        if _prefixes(record, "_status") != names:
            raise ValueError(
                f"{_case_name(record, index)} has classes {_prefixes(record, '_status')}, "
                f"the first record has {names}"
            )
    return names


def _class_summary(records: Sequence[Mapping[str, Any]], name: str) -> dict[str, Any]:
    """``summarize(records)["classes"][name]``: mean, std and n of each metric, and the cases per status."""
    n = len(records)
    entry: dict[str, Any] = {}
    for metric in METRICS:
        values = np.array([_as_finite_float(r, f"{name}_{metric}", i) for i, r in enumerate(records)])
        entry[metric] = {"mean": float(values.mean()), "std": float(values.std(ddof=0)), "n": n}
    statuses = [str(_get(r, f"{name}_status", i)) for i, r in enumerate(records)]
    for index, status in enumerate(statuses):
        if status not in STATUSES:
            case = _case_name(records[index], index)
            raise ValueError(f"{case}: {name}_status = {status!r}, expected one of {STATUSES}")
    entry["n"] = n
    entry.update({status: statuses.count(status) for status in STATUSES})
    return entry


def _failure_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """``summarize(records)["failure"]``: k failed cases of n, or None when no record carries ``failure``."""
    if not any("failure" in r for r in records):
        return None
    # then every record must carry it
    failed = sum(_as_bool(r, "failure", i) for i, r in enumerate(records))
    n = len(records)
    return {"k": failed, "n": n, "rate": failed / n, "threshold": FAILURE_DICE_THRESHOLD}


def _detection_summary(records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, Any] | None:
    """``summarize(records)["detection"]``, for the first of ``names`` with detection counts; None when none
    has them."""
    detection_names = [name for name in _prefixes(records[0], "_true_components") if name in names]
    if not detection_names:
        return None
    name, n = detection_names[0], len(records)
    true_total = sum(_as_count(r, f"{name}_true_components", i) for i, r in enumerate(records))
    hits = sum(_as_count(r, f"{name}_hits", i) for i, r in enumerate(records))
    false_positives = sum(_as_count(r, f"{name}_false_positives", i) for i, r in enumerate(records))
    return {
        "class": name,
        "true_components": true_total,
        "hits": hits,
        "false_positives": false_positives,
        "n": n,
        "sensitivity": hits / true_total if true_total else None,
        "false_positives_per_case": false_positives / n,
        "by_size": _detection_by_size(records, name),
    }


def _penalty(records: Sequence[Mapping[str, Any]]) -> float | None:
    """The one ``penalty_mm`` the records were scored with, or None when they do not say."""
    penalties = {_as_finite_float(r, "penalty_mm", i) for i, r in enumerate(records) if "penalty_mm" in r}
    if len(penalties) > 1:
        raise ValueError(f"records were scored with different penalties {sorted(penalties)} mm")
    return penalties.pop() if penalties else None


def _detection_by_size(records: Sequence[Mapping[str, Any]], name: str) -> dict[str, Any] | None:
    """Per-size-bin true components, hits and sensitivity, or None when the records lack the counts."""
    if f"{name}_true_{SIZE_BINS[0][0]}" not in records[0]:
        return None
    by_size = {}
    for key, display, _, _ in SIZE_BINS:
        true_total = sum(_as_count(r, f"{name}_true_{key}", i) for i, r in enumerate(records))
        hits = sum(_as_count(r, f"{name}_hits_{key}", i) for i, r in enumerate(records))
        by_size[key] = {
            "name": display,
            "true_components": true_total,
            "hits": hits,
            "sensitivity": hits / true_total if true_total else None,
        }
    return by_size


def format_mean_std(stats: Mapping[str, float], digits: int) -> str:
    """``{"mean": m, "std": s}`` -> ``"m ± s"`` with ``digits`` decimals."""
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def format_markdown_table(summary: Mapping[str, Any]) -> str:
    """Markdown table of a :func:`summarize` result in the paper's form.

    One row per class: Dice, HD95 (mm), Jaccard, volume similarity, ASSD (mm) as mean ± std, n, and
    the missed / spurious / both-empty counts behind the means; then lines for the failure rate (k/n)
    and aneurysm detection (sensitivity with hits / true components, false positives per case), and a
    note on the penalty and the definitions.

    Args:
        summary: the dict returned by :func:`summarize`.

    Returns:
        The table and notes as one string ending in a newline.
    """
    header = ["Class", "Dice", "HD95 (mm)", "Jaccard", "Volume similarity", "ASSD (mm)", "n"]
    header.append("missed / spurious / both empty")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in summary["classes"].items():
        lines.append(
            f"| {name} | {format_mean_std(entry['dice'], 3)} | {format_mean_std(entry['hd95'], 2)} "
            f"| {format_mean_std(entry['jaccard'], 3)} | {format_mean_std(entry['volume_similarity'], 3)} "
            f"| {format_mean_std(entry['assd'], 2)} | {entry['n']} "
            f"| {entry['missed']} / {entry['spurious']} / {entry['both_empty']} |"
        )
    lines.append("")
    failure = summary.get("failure")
    if failure is not None:
        lines.append(
            f"Failure rate (aneurysm Dice < {failure['threshold']:g}): {failure['k']}/{failure['n']} "
            f"({100.0 * failure['rate']:.1f}%)"
        )
    detection = summary.get("detection")
    if detection is not None:
        sensitivity = _percent(detection["sensitivity"], "n/a (no true component)")
        lines.append(
            f"{detection['class'].capitalize()} detection: sensitivity {sensitivity} "
            f"({detection['hits']}/{detection['true_components']} components), "
            f"{detection['false_positives_per_case']:.2f} false positives per case "
            f"({detection['false_positives']} in {detection['n']} cases)"
        )
        if detection.get("by_size") is not None:
            bins = [
                f"{entry['name']} {_percent(entry['sensitivity'])} ({entry['hits']}/{entry['true_components']})"
                for entry in detection["by_size"].values()
            ]
            lines.append("Sensitivity by size (equivalent-sphere diameter): " + ", ".join(bins))
    penalty = summary.get("penalty_mm")
    penalty_text = f"{penalty:g} mm" if penalty is not None else "a fixed penalty"
    lines.append(
        f"Mean ± population std over n cases. Missed or spurious structures count as Dice 0 and "
        f"HD95 = ASSD = {penalty_text}; both empty counts as Dice 1, 0 mm. "
        "HD95 = max of the two directed 95th percentiles of surface distances."
    )
    return "\n".join(lines) + "\n"


def _percent(fraction: float | None, missing: str = "n/a") -> str:
    return missing if fraction is None else f"{100.0 * fraction:.1f}%"
