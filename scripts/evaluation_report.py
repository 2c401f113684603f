"""The evaluation's files, written alike by the evaluate workflow and ``python -m scripts.score``.

Always: ``per_case.csv`` (one row per record, columns in the first record's key order), ``summary.json``
(:func:`scripts.metrics.summarize`) and ``summary.md`` (:func:`scripts.metrics.format_markdown_table`).

With the aneurysms of each case (the evaluate workflow, :class:`scripts.handlers.SegmentationMetricsWriter`):

* per case, ``<case>`` being the label's file name without ``.nii.gz`` / ``.nii``
  (:func:`write_case_aneurysms`):

  - ``<case>_aneurysms.json``: :func:`scripts.measurements.measure_aneurysms` of every true aneurysm and
    every predicted aneurysm component, on the label's own grid and affine (the prediction inverted to
    it), each numbered 1..N by size within its source as the measurements number them; each true one
    says whether it was ``detected`` and each predicted one whether it is a ``false_positive``, by the
    rule of the detection metric (:func:`scripts.metrics.detection_counts`, applied to one component at
    a time, so the flags add up to the case's ``aneurysm_hits`` and ``aneurysm_false_positives``), and
    which numbers of the other source it overlaps;
  - ``<case>_mip.png`` (unless pictures are off): axial, coronal and sagittal maximum-intensity
    projections of the image, truth on the left and prediction on the right, vessel green, aneurysms red
    with their numbers (:func:`scripts.data.preview.save_oriented_comparison`, as inference draws them);

* per run: ``aneurysms.csv``, one row per aneurysm (:func:`scripts.measurements.write_run_table`'s
  columns, as inference's ``measurements.csv``, then ``source`` ``truth`` or ``prediction``,
  ``detected``, ``false_positive`` and ``overlapping``), and ``report.md``: the summary table (the text
  of ``summary.md``), the aneurysm table and the pictures (links relative to the folder).

Every file is written atomically (:mod:`scripts.atomic_io`), a case's JSON after its picture, and the run's
files only once all their content is computed, so a failure leaves no half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from scripts.atomic_io import replace_atomically, write_atomically
from scripts.data.preview import save_oriented_comparison
from scripts.labels import ANEURYSM_LABEL
from scripts.measurements import (
    COORDINATE_SYSTEM,
    AneurysmMeasurement,
    aneurysm_components,
    table_rows,
    write_run_table,
)
from scripts.metrics import detection_counts, format_markdown_table, summarize

__all__ = [
    "ANEURYSM_TABLE",
    "REPORT_FILE",
    "CaseAneurysms",
    "compare_aneurysms",
    "write_case_aneurysms",
    "write_evaluation",
]

logger = logging.getLogger(__name__)

ANEURYSM_TABLE, REPORT_FILE = "aneurysms.csv", "report.md"
CASE_SUFFIXES = {"picture": "_mip.png", "measurements": "_aneurysms.json"}
"""Per-case files, ``<case><suffix>``; the measurements are written last."""
SOURCES = ("truth", "prediction")


@dataclass(frozen=True)
class CaseAneurysms:
    """The true and the predicted aneurysms of one evaluated case.

    Attributes:
        case: the case as ``per_case.csv`` names it (the label's file name).
        truth: measurements of the true aneurysms, numbered 1..N by size.
        prediction: measurements of the predicted aneurysm components, numbered 1..M by size.
        detected: per true aneurysm (in number order), whether the prediction hit it.
        false_positive: per predicted component, whether it overlaps no true aneurysm voxel.
        truth_overlaps: per true aneurysm, the numbers of the predicted components that overlap it.
        prediction_overlaps: per predicted component, the numbers of the true aneurysms it overlaps.
        picture: the picture's file name in the evaluation folder; None when none was drawn.
    """

    case: str
    truth: list[AneurysmMeasurement]
    prediction: list[AneurysmMeasurement]
    detected: list[bool]
    false_positive: list[bool]
    truth_overlaps: list[list[int]]
    prediction_overlaps: list[list[int]]
    picture: str | None = None

    @property
    def stem(self) -> str:
        """The start of the case's file names: ``case`` without ``.nii.gz`` / ``.nii`` (as inference names
        its outputs, ``scripts.batch_inference.case_name``; not imported, to keep ``scripts.score`` light)."""
        for ending in (".nii.gz", ".nii"):
            if self.case.endswith(ending) and len(self.case) > len(ending):
                return self.case[: -len(ending)]
        return self.case

    def describe(self, source: str) -> str:
        """``truth: 2 aneurysms, 1 detected`` or ``prediction: 1 aneurysm, 0 false positives``."""
        found = self.truth if source == "truth" else self.prediction
        text = f"{source}: {len(found)} aneurysm{'' if len(found) == 1 else 's'}"
        if source == "truth":
            return f"{text}, {sum(self.detected)} detected" if found else text
        count = sum(self.false_positive)
        return f"{text}, {count} false positive{'' if count == 1 else 's'}" if found else text


def _component_flags(numbers: np.ndarray, count: int, other: np.ndarray, as_truth: bool) -> list[bool]:
    """Per numbered component, :func:`detection_counts` of it alone against the other source's mask.

    Args:
        numbers: (D, H, W) map of components 1..count (:func:`aneurysm_components`).
        count: number of components.
        other: (D, H, W) bool aneurysm mask of the other source.
        as_truth: the components are true ones (flag: hit) rather than predicted (flag: false positive).
    """
    flags = []
    for number, box in enumerate(ndimage.find_objects(numbers, max_label=count), start=1):
        component = numbers[box] == number  # the whole component lies in its box
        if as_truth:
            flags.append(detection_counts(other[box], component)["hits"] == 1)
        else:
            flags.append(detection_counts(component, other[box])["false_positives"] == 1)
    return flags


def _overlaps(numbers: np.ndarray, count: int, other_numbers: np.ndarray) -> list[list[int]]:
    """Per numbered component, the sorted numbers of the other source's components it shares voxels with."""
    found = []
    for number, box in enumerate(ndimage.find_objects(numbers, max_label=count), start=1):
        shared = np.unique(other_numbers[box][numbers[box] == number])
        found.append([int(n) for n in shared if n])
    return found


def compare_aneurysms(case: str, pred: np.ndarray, label: np.ndarray, affine: np.ndarray) -> CaseAneurysms:
    """Measure the true and the predicted aneurysms of one case and match them.

    Args:
        case: the case's name (the label's file name).
        pred: (D, H, W) predicted labels 0/1/2 on the label's grid.
        label: (D, H, W) true labels 0/1/2.
        affine: (4, 4) voxel-to-world (RAS mm) matrix of that grid.

    Returns:
        the :class:`CaseAneurysms` (no picture).

    Raises:
        ValueError: on shapes that differ, or as :func:`scripts.measurements.measure_aneurysms`.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"{case}: prediction shape {pred.shape} differs from the label's {label.shape}")
    truth, true_numbers = aneurysm_components(label, affine)
    prediction, pred_numbers = aneurysm_components(pred, affine)
    return CaseAneurysms(
        case=case,
        truth=truth,
        prediction=prediction,
        detected=_component_flags(true_numbers, len(truth), pred == ANEURYSM_LABEL, as_truth=True),
        false_positive=_component_flags(
            pred_numbers, len(prediction), label == ANEURYSM_LABEL, as_truth=False
        ),
        truth_overlaps=_overlaps(true_numbers, len(truth), pred_numbers),
        prediction_overlaps=_overlaps(pred_numbers, len(prediction), true_numbers),
    )


def _case_document(result: CaseAneurysms, extra: Mapping[str, Any]) -> dict[str, Any]:
    """What ``<case>_aneurysms.json`` holds."""
    return {
        "case": result.case,
        "coordinate_system": COORDINATE_SYSTEM,
        **extra,
        "picture": result.picture,
        "detection": {
            "true_aneurysms": len(result.truth),
            "detected": sum(result.detected),
            "predicted_aneurysms": len(result.prediction),
            "false_positives": sum(result.false_positive),
            "rule": "26-connected components; a true aneurysm is detected when a predicted aneurysm voxel "
            "overlaps it, a predicted one is a false positive when it overlaps no true aneurysm voxel",
        },
        "truth": [
            {**m.as_dict(), "detected": hit, "overlapping_predictions": shared}
            for m, hit, shared in zip(result.truth, result.detected, result.truth_overlaps, strict=True)
        ],
        "prediction": [
            {**m.as_dict(), "false_positive": false, "overlapping_truth": shared}
            for m, false, shared in zip(
                result.prediction, result.false_positive, result.prediction_overlaps, strict=True
            )
        ],
    }


def write_case_aneurysms(
    output_dir: str | Path,
    case: str,
    pred: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    image: np.ndarray | None = None,
    extra: Mapping[str, Any] | None = None,
) -> CaseAneurysms:
    """:func:`compare_aneurysms` and write ``<case>_mip.png`` (with an image) and ``<case>_aneurysms.json``.

    Args:
        output_dir: the evaluation folder.
        case: the case's name (the label's file name); the files are named after it without ``.nii.gz``.
        pred: (D, H, W) predicted labels 0/1/2 on the label's grid.
        label: (D, H, W) true labels 0/1/2.
        affine: (4, 4) voxel-to-world (RAS mm) matrix of that grid.
        image: (D, H, W) intensities on that grid, for the picture; None draws no picture.
        extra: further JSON entries (e.g. the label's and image's files).

    Returns:
        the :class:`CaseAneurysms`, with the picture's file name when one was drawn.
    """
    output_dir = Path(output_dir)
    result = compare_aneurysms(case, pred, label, affine)
    if image is not None:
        picture = f"{result.stem}{CASE_SUFFIXES['picture']}"
        _write_picture(
            output_dir / picture, np.asarray(image), np.asarray(label), np.asarray(pred), affine, result
        )
        result = replace(result, picture=picture)
    path = output_dir / f"{result.stem}{CASE_SUFFIXES['measurements']}"
    write_atomically(path, json.dumps(_case_document(result, extra or {}), indent=2, allow_nan=False) + "\n")
    logger.info("%s: %s; %s -> %s", case, result.describe("truth"), result.describe("prediction"), path.name)
    return result


def _write_picture(
    path: Path,
    image: np.ndarray,
    label: np.ndarray,
    pred: np.ndarray,
    affine: np.ndarray,
    result: CaseAneurysms,
) -> None:
    """Truth (left) and prediction (right) over the image's MIPs, each aneurysm numbered, atomically."""
    numbers = [
        [(m.centroid_ras_mm, str(m.index)) for m in found] for found in (result.truth, result.prediction)
    ]
    titles = [f"{result.stem} {result.describe(source)}" for source in SOURCES]
    replace_atomically(
        path,
        lambda tmp: save_oriented_comparison(
            image,
            [label, pred],
            affine,
            tmp,
            titles=titles,
            world_numbers=numbers,
            slices=False,
            vessel_alpha=0.35,
        ),
        suffix=".tmp.png",
    )


def aneurysm_rows(results: Sequence[CaseAneurysms]) -> list[dict[str, Any]]:
    """One :func:`scripts.measurements.table_rows` row per aneurysm, truth then prediction of each case, with
    ``source``, ``detected`` (truth), ``false_positive`` (prediction) and ``overlapping`` (the other source's
    numbers, ``;``-separated); None where a column does not apply."""
    rows = []
    for result in results:
        for row, hit, shared in zip(
            table_rows(result.case, result.truth), result.detected, result.truth_overlaps, strict=True
        ):
            rows.append(
                {**row, "source": "truth", "detected": hit, "false_positive": None, "overlapping": shared}
            )
        for row, false, shared in zip(
            table_rows(result.case, result.prediction),
            result.false_positive,
            result.prediction_overlaps,
            strict=True,
        ):
            rows.append(
                {
                    **row,
                    "source": "prediction",
                    "detected": None,
                    "false_positive": false,
                    "overlapping": shared,
                }
            )
    for row in rows:
        row["overlapping"] = ";".join(str(n) for n in row["overlapping"])
    return rows


def _table_line(row: Mapping[str, Any]) -> str:
    """One aneurysm as a row of ``report.md``'s table."""

    def number(key: str) -> str:
        return "" if row[key] is None else f"{row[key]:.2f}"

    if row["source"] == "truth":
        outcome = "detected" if row["detected"] else "**missed**"
        other = "prediction"
    else:
        outcome = "**false positive**" if row["false_positive"] else "true positive"
        other = "truth"
    overlapping = f"{other} {row['overlapping'].replace(';', ', ')}" if row["overlapping"] else ""
    centroid = ", ".join(f"{row[f'centroid_{a}_ras_mm']:.1f}" for a in "xyz")
    cells = [row["case"], row["source"], str(row["index"]), outcome, overlapping, f"{row['volume_mm3']:.1f}"]
    cells += [number(k) for k in ("max_diameter_mm", "neck_width_mm", "height_mm", "dome_width_mm")]
    cells += [number("dome_neck_ratio"), number("aspect_ratio"), centroid]
    return "| " + " | ".join(cells) + " |"


def format_report(
    summary_table: str, results: Sequence[CaseAneurysms], rows: Sequence[Mapping[str, Any]]
) -> str:
    """``report.md``: the summary table, the aneurysm table and each case's picture.

    Args:
        summary_table: the text of ``summary.md`` (:func:`scripts.metrics.format_markdown_table`).
        results: one :class:`CaseAneurysms` per case, in the order of ``per_case.csv``.
        rows: :func:`aneurysm_rows` of ``results``.
    """
    lines = [
        "# Evaluation report",
        "",
        f"{len(results)} cases. Research use only, not for diagnosis.",
        "",
        "## Summary",
        "",
        summary_table.rstrip("\n"),
        "",
        "## Aneurysms",
        "",
        "True and predicted aneurysms, numbered per case and source by size as in the pictures; millimetres "
        "in the label's RAS world coordinates (details in `<case>_aneurysms.json`, all rows in "
        f"`{ANEURYSM_TABLE}`). Detected: a predicted aneurysm voxel overlaps the true one; false positive: "
        "a predicted aneurysm that overlaps no true one (the detection metric's rule).",
        "",
        "| case | source | # | outcome | overlaps | volume (mm³) | max diameter | neck | height | dome width "
        "| dome/neck | aspect | centroid RAS (x, y, z) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_table_line(row) for row in rows),
    ]
    without = [r.case for r in results if not r.truth and not r.prediction]
    if without:
        lines += ["", "No true and no predicted aneurysm in: " + ", ".join(without) + "."]
    pictured = [r for r in results if r.picture is not None]
    if pictured:
        lines += ["", "## Pictures", ""]
        lines += [
            "Maximum-intensity projections of each image, truth on the left and prediction on the right: "
            "vessel green, aneurysms red with their numbers.",
            "",
        ]
        for r in pictured:
            lines += [f"### {r.case}", "", f"{r.describe('truth')}; {r.describe('prediction')}.", ""]
            lines += [f"![{r.stem}]({r.picture})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_evaluation(
    records: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    aneurysms: Sequence[CaseAneurysms] | None = None,
) -> dict[str, Any]:
    """Summarize per-case records and write ``per_case.csv``, ``summary.json`` and ``summary.md``, and with
    ``aneurysms`` also ``aneurysms.csv`` and ``report.md``.

    Everything is computed before the first file is written, and each file is written atomically
    (:func:`scripts.atomic_io.write_atomically`), so a failure leaves no half-written file.

    Args:
        records: one :func:`scripts.metrics.case_metrics` record per case, with a ``case`` key first;
            extra columns (e.g. ``missing_prediction``) are written to the CSV and ignored by the
            summary.
        output_dir: folder of the files; created if needed.
        aneurysms: the cases' :class:`CaseAneurysms` (from :func:`write_case_aneurysms`, which wrote the
            per-case files), in the order of ``records``. Default None: no aneurysm table, no report.

    Returns:
        The :func:`scripts.metrics.summarize` result that ``summary.json`` holds.

    Raises:
        ValueError: as :func:`scripts.metrics.summarize` (e.g. no record, or a NaN metric).
    """
    output_dir = Path(output_dir)
    summary = summarize(records)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    markdown = format_markdown_table(summary)
    summary_json = json.dumps(summary, indent=2, default=float)
    if aneurysms is not None:
        rows = aneurysm_rows(aneurysms)
        report = format_report(markdown, aneurysms, rows)
    write_atomically(output_dir / "per_case.csv", table.getvalue())
    write_atomically(output_dir / "summary.json", summary_json)
    write_atomically(output_dir / "summary.md", markdown + "\n")
    if aneurysms is not None:
        write_run_table(output_dir / ANEURYSM_TABLE, rows)
        write_atomically(output_dir / REPORT_FILE, report)
    logger.info("Evaluation of %d cases written to %s\n%s", len(records), output_dir, markdown)
    return summary
