"""Score a folder of predicted label volumes against the true ones, as the evaluate workflow does::

    python -m scripts.score --truth_dir data/labelsTs --pred_dir outputs/inference --output_dir outputs/score

writes ``per_case.csv``, ``summary.json`` and ``summary.md`` in the evaluate workflow's format
(:func:`scripts.evaluation_report.write_evaluation`), so the figures of any method (nnU-Net, another
checkpoint, hand-edited labels) sit beside its own. Labels: 0 background, 1 vessel, 2 aneurysm.

* **Cases** are the NIfTI files (``.nii.gz``, ``.nii``) directly in ``truth_dir``; case ``X`` is
  ``X.nii.gz`` or ``X.nii`` (both at once is an error).
* **Matching**: a prediction of case ``X`` is one of ``X.nii.gz``, ``X.nii`` (nnU-Net writes
  ``X.nii.gz``, the case name without the ``_0000`` channel suffix of its inputs), ``X_seg.nii.gz`` or
  ``X_seg.nii`` (as ``SaveImaged(output_postfix="seg")`` in ``configs/evaluate.yaml`` and
  ``scripts.batch_inference`` in ``configs/inference.yaml`` name it), directly in ``pred_dir`` or in its subfolder ``X/``
  (``SaveImaged(separate_folder=True)``). Two files matching one case, or one file matching two cases,
  is an error naming them. Other files are ignored; NIfTI files matching no case are logged as a
  warning.
* **Missing predictions** count as misses: the case is scored as an all-background prediction (Dice 0
  and HD95 = ASSD = ``penalty_mm`` for every class the truth has), flagged ``missing_prediction`` in
  ``per_case.csv`` and listed in a warning. A ``pred_dir`` in which no file matches any case is an
  error (a wrong folder or naming), not n misses.
* **Geometry**: metrics use the truth's own voxel spacing (its NIfTI header). A prediction must lie on
  the truth's grid: the same shape and an affine equal within :data:`AFFINE_ATOL_MM`; anything else is
  an error naming the case, the shapes and the affines. Nothing is resampled.
* **Values**: a volume with values other than 0 and the classes of
  :data:`scripts.metrics.DEFAULT_CLASSES`, or one that cannot be read, is an error naming the file.
* **Nothing half-written**: every case is read and scored before the first file is written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np

from scripts.evaluation_report import write_evaluation
from scripts.labels import BACKGROUND_LABEL
from scripts.metrics import DEFAULT_CLASSES, MISSING_STRUCTURE_DISTANCE_MM, case_metrics

__all__ = [
    "AFFINE_ATOL_MM",
    "find_cases",
    "match_predictions",
    "score",
]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
#: what ``SaveImaged(output_postfix="seg")`` appends to the input's name
PREDICTION_POSTFIX = "_seg"
#: tolerance on each affine entry (mm) between a prediction and its truth, as ``ValidateCased``'s
AFFINE_ATOL_MM = 1e-3


def _stem(path: Path) -> str | None:
    """``X.nii.gz`` / ``X.nii`` -> ``X``; None for other files."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def find_cases(truth_dir: Path) -> dict[str, Path]:
    """Case name -> true label file, for the NIfTI files directly in ``truth_dir`` (sorted by name).

    Raises:
        FileNotFoundError: when ``truth_dir`` is not a folder.
        ValueError: when it holds no NIfTI file, or one case as both ``.nii`` and ``.nii.gz``.
    """
    if not truth_dir.is_dir():
        raise FileNotFoundError(f"{truth_dir}: truth_dir is not a folder.")
    cases: dict[str, Path] = {}
    for path in sorted(truth_dir.iterdir()):
        name = _stem(path)
        if name is None or not path.is_file():
            continue
        if name in cases:
            raise ValueError(f"Two truth files for case {name!r}: {cases[name]} and {path}.")
        cases[name] = path
    if not cases:
        raise ValueError(f"{truth_dir}: no NIfTI label volume (.nii.gz, .nii) in truth_dir.")
    return cases


def _prediction_files(pred_dir: Path) -> list[Path]:
    """NIfTI files directly in ``pred_dir`` and in its immediate subfolders, sorted."""
    files = [p for p in pred_dir.iterdir() if p.is_file() and _stem(p) is not None]
    for folder in (p for p in pred_dir.iterdir() if p.is_dir()):
        files += [p for p in folder.iterdir() if p.is_file() and _stem(p) is not None]
    return sorted(files)


def _cases_named_by(path: Path, pred_dir: Path) -> set[str]:
    """The case names a prediction file can stand for: ``X`` for ``X.nii[.gz]`` and ``X_seg.nii[.gz]``.

    A file in a subfolder stands only for the case the subfolder is named after.
    """
    stem = _stem(path)
    names = {stem} if stem else set()
    if stem and stem.endswith(PREDICTION_POSTFIX):
        names.add(stem[: -len(PREDICTION_POSTFIX)])
    if path.parent != pred_dir:
        names &= {path.parent.name}
    return names


def match_predictions(cases: Iterable[str], pred_dir: Path) -> tuple[dict[str, Path], list[Path]]:
    """Match the prediction files in ``pred_dir`` to ``cases`` by name (see the module docstring).

    Args:
        cases: the case names (truth file names without extension).
        pred_dir: folder of the predictions.

    Returns:
        ``(matched, unmatched)``: case -> its prediction file, for the cases that have one, and the
        NIfTI files that match no case.

    Raises:
        FileNotFoundError: when ``pred_dir`` is not a folder.
        ValueError: when two files match one case, or one file matches two cases.
    """
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"{pred_dir}: pred_dir is not a folder.")
    known = set(cases)
    matched: dict[str, Path] = {}
    unmatched: list[Path] = []
    for path in _prediction_files(pred_dir):
        names = sorted(_cases_named_by(path, pred_dir) & known)
        if not names:
            unmatched.append(path)
            continue
        if len(names) > 1:
            raise ValueError(f"{path} matches more than one case: {names}.")
        if names[0] in matched:
            raise ValueError(
                f"Two predictions for case {names[0]!r}: {matched[names[0]]} and {path}; keep one."
            )
        matched[names[0]] = path
    return matched, unmatched


class LabelVolume(NamedTuple):
    """A label volume as read from its file.

    Attributes:
        labels: (D, H, W) uint8 labels in the file's voxel order.
        affine: (4, 4) voxel-to-world affine (mm).
        spacing: (3,) voxel spacing (mm) along (D, H, W), from the header.
    """

    labels: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


def read_label_volume(path: Path, allowed: Iterable[int]) -> LabelVolume:
    """Read a NIfTI label volume and check its values.

    Args:
        path: the ``.nii`` / ``.nii.gz`` file.
        allowed: the label values it may hold (background and the classes).

    Returns:
        The volume, trailing singleton dimensions dropped ((D, H, W, 1) -> (D, H, W)).

    Raises:
        ValueError: naming the file, when it cannot be read, is not 3D, or holds non-integer values or
            values outside ``allowed``.
    """
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
        zooms = [float(z) for z in image.header.get_zooms()[:3]]
    except Exception as error:  # nibabel raises many kinds: ImageFileError, OSError, EOFError, zlib.error...
        raise ValueError(
            f"{path}: cannot be read as a NIfTI volume ({type(error).__name__}: {error})."
        ) from error
    if data.ndim > 3 and all(size == 1 for size in data.shape[3:]):
        data = data.reshape(data.shape[:3])  # (D, H, W, 1, ...) -> (D, H, W)
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D label volume, got shape {data.shape}.")
    values = np.unique(data)
    allowed_values = sorted(allowed)
    unknown = values[~np.isin(values, allowed_values)]
    if unknown.size:
        raise ValueError(
            f"{path}: label values {unknown[:10].tolist()} outside the allowed {allowed_values} "
            f"(0 background, {', '.join(f'{k} {v}' for k, v in DEFAULT_CLASSES.items())})."
        )
    spacing = (zooms[0], zooms[1], zooms[2])
    return LabelVolume(data.astype(np.uint8), np.asarray(image.affine, dtype=np.float64), spacing)


def _check_same_grid(
    case: str, truth_path: Path, pred_path: Path, truth: LabelVolume, pred: LabelVolume
) -> None:
    """Raise ValueError unless the prediction has the truth's shape and affine (within the tolerance)."""
    same_shape = pred.labels.shape == truth.labels.shape
    if same_shape and np.allclose(pred.affine, truth.affine, rtol=0.0, atol=AFFINE_ATOL_MM):
        return
    raise ValueError(
        f"Case {case!r}: the prediction {pred_path} is not on the grid of the truth {truth_path} "
        f"(shape {pred.labels.shape} vs {truth.labels.shape}; affine\n{pred.affine.round(4)}\nvs\n"
        f"{truth.affine.round(4)}). Predictions are never resampled here: save them on the truth's grid."
    )


def score_case(
    case: str, truth_path: Path, pred_path: Path | None, penalty_mm: float = MISSING_STRUCTURE_DISTANCE_MM
) -> dict[str, Any]:
    """One ``per_case.csv`` record: :func:`scripts.metrics.case_metrics` at the truth's own spacing.

    Args:
        case: the case name (for errors).
        truth_path: the true label file.
        pred_path: the prediction file, or None for a missing prediction (scored as all background).
        penalty_mm: HD95 and ASSD of a missed or spurious structure.

    Returns:
        ``{"case": <truth file name>, **case_metrics(...), "missing_prediction": bool}``.
    """
    allowed = [BACKGROUND_LABEL, *DEFAULT_CLASSES]
    truth = read_label_volume(truth_path, allowed)
    if pred_path is None:
        pred_labels = np.zeros_like(truth.labels)  # a missed case: nothing predicted
    else:
        pred = read_label_volume(pred_path, allowed)
        _check_same_grid(case, truth_path, pred_path, truth, pred)
        pred_labels = pred.labels
    metrics = case_metrics(pred_labels, truth.labels, truth.spacing, DEFAULT_CLASSES, penalty_mm)
    record = {"case": truth_path.name, **metrics, "missing_prediction": pred_path is None}
    logger.info(
        "%s: %s%s",
        case,
        ", ".join(f"{name} Dice {record[f'{name}_dice']:.3f}" for name in DEFAULT_CLASSES.values()),
        " (no prediction)" if pred_path is None else "",
    )
    return record


def score(
    truth_dir: str, pred_dir: str, output_dir: str, penalty_mm: float = MISSING_STRUCTURE_DISTANCE_MM
) -> dict[str, Any]:
    """Score the predictions in ``pred_dir`` against the labels in ``truth_dir``; write the three files.

    Args:
        truth_dir: folder of the true label volumes (one case per ``.nii.gz`` / ``.nii`` file).
        pred_dir: folder of the predicted label volumes, named as in the module docstring.
        output_dir: folder for ``per_case.csv``, ``summary.json``, ``summary.md``; created if needed.
        penalty_mm: HD95 and ASSD (mm) of a missed or spurious structure. Default
            :data:`scripts.metrics.MISSING_STRUCTURE_DISTANCE_MM`, as the evaluate workflow.

    Returns:
        The summary written to ``summary.json`` (:func:`scripts.metrics.summarize`).

    Raises:
        FileNotFoundError: when ``truth_dir`` or ``pred_dir`` is not a folder.
        ValueError: on ambiguous names, no prediction matching any case, unreadable files, values
            outside the classes, or a prediction on another grid than its truth (see the module
            docstring); then nothing is written.
    """
    truth_folder, pred_folder = Path(truth_dir), Path(pred_dir)
    cases = find_cases(truth_folder)
    matched, unmatched = match_predictions(cases, pred_folder)
    if not matched:
        raise ValueError(
            f"No file in {pred_folder} matches any of the {len(cases)} cases of {truth_folder} "
            f"(e.g. {next(iter(cases))}.nii.gz or {next(iter(cases))}{PREDICTION_POSTFIX}.nii.gz)."
        )
    if unmatched:
        logger.warning(
            "%d NIfTI files in %s match no truth case and are ignored: %s",
            len(unmatched),
            pred_folder,
            ", ".join(str(p.relative_to(pred_folder)) for p in unmatched),
        )
    missing = [case for case in cases if case not in matched]
    if missing:
        logger.warning(
            "%d of %d cases have no prediction and are scored as misses (all background): %s",
            len(missing),
            len(cases),
            ", ".join(missing),
        )
    records = [score_case(case, path, matched.get(case), penalty_mm) for case, path in cases.items()]
    return write_evaluation(records, output_dir)


if __name__ == "__main__":
    import fire

    from scripts.cli import configure_logging

    configure_logging()
    fire.Fire(score, serialize=lambda summary: None)  # the log holds the summary table
