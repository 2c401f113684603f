"""Write one of our datasets as an nnU-Net v2 raw dataset, keeping our split (``nnunetv2`` is not needed here).

Command line::

    python -m scripts.export_nnunet --dataset_dir D --output_dir O --dataset_id N [--name DINO3DRA] \\
        [--channel_name zscore] [--overwrite True]

``--dataset_dir`` is a folder with our ``dataset.json`` datalist (``training``, ``validation`` and optional
``test`` lists of ``{"image": ..., "label": ...}``); left out, it is the synthetic default dataset of
``configs/train.yaml``, generated into ``data/synthetic`` if needed with that config's settings.

Layout written (nnU-Net v2's raw format)::

    O/Dataset{N:03d}_{name}/
        imagesTr/<case>_0000.nii.gz   our training and validation cases
        labelsTr/<case>.nii.gz
        imagesTs/<case>_0000.nii.gz   our test cases
        labelsTs/<case>.nii.gz        their labels, to score nnU-Net's predictions later (nnU-Net ignores them)
        dataset.json                  channel_names, labels, numTraining, file_ending (+ provenance)
        splits_final.json             one fold: our training cases vs our validation cases

nnU-Net draws its own random 5-fold split unless ``nnUNet_preprocessed/Dataset{N:03d}_{name}/splits_final.json``
exists. To keep ours, run ``nnUNetv2_plan_and_preprocess -d N --verify_dataset_integrity`` (which creates that
folder), make sure ``splits_final.json`` is there, and train fold 0 (``nnUNetv2_train N 3d_fullres 0``). Recent
nnU-Net releases (2.8.1 does) copy it from the raw folder while planning, and refuse to plan if the one already
there holds another split (delete it after re-exporting a changed split); with older releases copy it by hand.

Case identifiers are the label files' names without ``.nii``/``.nii.gz`` (the image's name for a test case
without label). nnU-Net names labels and predictions ``<case>.nii.gz``, so its predictions carry our label
file names and can be scored against our own label folders; images in nnU-Net's own naming
(``case_0000.nii.gz`` beside ``case.nii.gz``) do not become ``case_0000_0000``. nnU-Net strips exactly one
``_XXXX`` channel suffix, so identifiers that end in digits (``3dra_A_0003``) are safe. Two cases with the
same identifier (also differing only in letter case, which collide on macOS and Windows file systems) are
refused before anything is written.

Every case is checked as training checks it (:class:`scripts.data.validation.ValidateCased`: one 3D
channel, finite intensities, label values 0/1/2, label shape and affine those of the image), with errors
that name the file. Images keep their voxel values and data type (``.nii`` becomes ``.nii.gz``); labels
are stored as ``uint8``. Both files of a case get the image's affine as qform and sform alike, so nibabel
and SimpleITK (nnU-Net's reader) see one geometry and nnU-Net's shape, spacing, origin and direction
checks pass.

Nothing is half-written: the dataset is assembled in a hidden temporary folder next to the destination
(``O/.Dataset..._name.tmp-*``, which nnU-Net's ``Dataset{N:03d}`` lookup never matches) and renamed into
place at the end; a failure removes it. An existing dataset folder is replaced only with
``--overwrite True``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from scripts.data import LABELS
from scripts.data.datalist import bundle_datalist, load_split, resolve_datalist
from scripts.data.validation import ValidateCased
from scripts.switches import check_switch

__all__ = ["export_nnunet"]

logger = logging.getLogger(__name__)

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
FILE_ENDING = ".nii.gz"
# nnU-Net's labels: name -> value, background 0 and consecutive (ours are {"0": "background", ...})
NNUNET_LABELS: dict[str, int] = {
    name: int(value) for value, name in sorted(LABELS.items(), key=lambda v: int(v[0]))
}
# our datalist key -> nnU-Net folder suffix: images{Tr,Ts}, labels{Tr,Ts}
SPLITS = {"training": "Tr", "validation": "Tr", "test": "Ts"}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class ExportCase(NamedTuple):
    """One case to export: nnU-Net identifier, our split, absolute image and label paths (label may be None)."""

    case_id: str
    split: str
    image: str
    label: str | None


def _strip_nifti(path: str) -> str:
    """File name of ``path`` without ``.nii.gz``/``.nii`` (any letter case); refuses other files."""
    name = Path(path).name
    for ending in (".nii.gz", ".nii"):
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    raise ValueError(f"{path}: not a NIfTI file (.nii or .nii.gz); nnU-Net export reads NIfTI only.")


def plan_cases(datalist: str) -> list[ExportCase]:
    """Every case of ``datalist`` with its nnU-Net identifier, checked for collisions before anything is read.

    Raises:
        ValueError: no training or no validation case, a training/validation case without label, a file
            that is not NIfTI, or two cases with one identifier (the message names both files).
        FileNotFoundError: an entry names a missing file (from :func:`load_split`).
    """
    keys = json.loads(Path(datalist).read_text())
    cases: list[ExportCase] = []
    for split in SPLITS:
        if split == "test" and not keys.get(split):
            logger.info("%s: no test cases; imagesTs stays empty", datalist)
            continue
        entries = load_split(datalist, split)
        if not entries and split != "test":
            raise ValueError(f"{datalist}: the '{split}' list is empty; nnU-Net's fold needs both splits.")
        for entry in entries:
            label = entry.get("label")
            if label is None and split != "test":
                raise ValueError(f"{datalist}: '{split}' entry {entry['image']} has no label.")
            _strip_nifti(entry["image"])  # refuses a non-NIfTI image before anything is read
            cases.append(ExportCase(_strip_nifti(label or entry["image"]), split, entry["image"], label))
    seen: dict[str, ExportCase] = {}
    for case in cases:
        other = seen.setdefault(case.case_id.casefold(), case)
        if other is not case:
            raise ValueError(
                f"{case.label or case.image} ('{case.split}') and {other.label or other.image} "
                f"('{other.split}') both become nnU-Net case '{case.case_id}' (identifiers are file names "
                "without .nii/.nii.gz, compared ignoring letter case); rename one of them."
            )
    return cases


def _load(path: str) -> nib.Nifti1Image:
    """``path`` with trailing length-1 axes dropped: ``(X, Y, Z, 1)`` -> ``(X, Y, Z)`` (spatial axes stay)."""
    return nib.squeeze_image(nib.load(path))


def _as_checked(array: np.ndarray, affine: np.ndarray, path: str) -> MetaTensor:
    """``(1, X, Y, Z)`` float32 view for :class:`ValidateCased`, naming ``path`` in its errors."""
    values = torch.from_numpy(np.asarray(array, dtype=np.float32)[None])  # (X, Y, Z) -> (1, X, Y, Z)
    return MetaTensor(values, affine=torch.as_tensor(affine), meta={"filename_or_obj": path})


def _nifti(array: np.ndarray, affine: np.ndarray, code: int, units: tuple[str, str]) -> nib.Nifti1Image:
    """A NIfTI-1 image whose qform and sform both hold ``affine``, so every reader sees one geometry."""
    image = nib.Nifti1Image(array, affine, dtype=array.dtype)  # explicit: nibabel refuses int64 otherwise
    image.header.set_xyzt_units(*units)
    image.set_qform(affine, code=code)
    image.set_sform(affine, code=code)
    return image


def write_case(case: ExportCase, folder: Path) -> None:
    """Check one case and write ``images*/<case>_0000.nii.gz`` and ``labels*/<case>.nii.gz`` under ``folder``.

    Raises:
        ValueError: the case fails :class:`ValidateCased` (the message names the file and the problem).
    """
    source = _load(case.image)
    image = np.asanyarray(source.dataobj)  # scaled values, in their own dtype
    image = image.astype(image.dtype.newbyteorder("="), copy=False)
    data: dict[str, Any] = {"image": _as_checked(image, source.affine, case.image)}
    if case.label is not None:
        label_source = _load(case.label)
        label = np.asanyarray(label_source.dataobj)
        data["label"] = _as_checked(label, label_source.affine, case.label)
    ValidateCased(labels=list(NNUNET_LABELS.values()))(data)
    code = int(source.header["sform_code"]) or int(source.header["qform_code"]) or 1
    units = source.header.get_xyzt_units()
    suffix = SPLITS[case.split]
    nib.save(
        _nifti(image, source.affine, code, units), folder / f"images{suffix}" / f"{case.case_id}_0000.nii.gz"
    )
    if case.label is not None:
        # values are within NNUNET_LABELS (checked above), so the cast is exact; geometry is the image's
        labels = _nifti(label.astype(np.uint8), source.affine, code, units)
        nib.save(labels, folder / f"labels{suffix}" / f"{case.case_id}{FILE_ENDING}")


def _dataset_json(cases: list[ExportCase], name: str, channel_name: str, datalist: str) -> dict[str, Any]:
    """nnU-Net's ``dataset.json``: its four required keys, then provenance it ignores."""
    return {
        "channel_names": {"0": channel_name},
        "labels": dict(NNUNET_LABELS),
        "numTraining": sum(c.split != "test" for c in cases),
        "file_ending": FILE_ENDING,
        "name": name,
        "description": "3D rotational angiography: cerebral vessels and aneurysms (DINO-3DRA bundle export)",
        "source_datalist": str(Path(datalist).resolve()),
        "numTest": sum(c.split == "test" for c in cases),
    }


def _splits_final(cases: list[ExportCase]) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json``: one fold, our training cases vs our validation cases."""
    return [
        {
            "train": [c.case_id for c in cases if c.split == "training"],
            "val": [c.case_id for c in cases if c.split == "validation"],
        }
    ]


def _check_arguments(dataset_id: Any, name: Any, channel_name: Any, overwrite: Any) -> None:
    """Refuse bad arguments before anything is read, naming the argument and the value."""
    check_switch("overwrite", overwrite)
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ValueError(
            f"dataset_id must be an integer from 1 to 999 (nnU-Net's DatasetXXX), got {dataset_id!r}."
        )
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"name must be letters, digits, '_' or '-' (e.g. DINO3DRA), got {name!r}.")
    if not isinstance(channel_name, str) or not channel_name.strip():
        raise ValueError(
            f"channel_name must be a non-empty string (e.g. zscore or CT), got {channel_name!r}."
        )


def _check_destination(output: Path, dest: Path, datalist: str, overwrite: bool) -> None:
    """Refuse an existing dataset (unless ``overwrite``), another dataset with this id, and source inside dest."""
    if dest.resolve() in Path(datalist).resolve().parents:
        raise ValueError(f"{dest} holds the source datalist {datalist}; export to another folder.")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass --overwrite True to replace it.")
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder; remove it first.")
    prefix = dest.name.split("_", 1)[0] + "_"  # "Dataset007_"
    others = (
        sorted(p.name for p in output.glob(f"{prefix}*") if p.name != dest.name) if output.is_dir() else []
    )
    if others:
        raise FileExistsError(
            f"{output} already holds {others} with the id of {dest.name}; nnU-Net refuses two datasets with "
            "one id. Choose another --dataset_id."
        )


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished ``tmp`` to ``dest``; a replaced ``dest`` is moved aside first, deleted last."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
        os.replace(dest, old / dest.name)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old / dest.name, dest)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old)


def _write_raw_dataset(
    folder: Path, cases: list[ExportCase], name: str, channel_name: str, datalist: str
) -> dict[str, Any]:
    """Write the cases, ``dataset.json`` and ``splits_final.json`` into ``folder``; return the dataset.json."""
    for split_folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / split_folder).mkdir()
    for index, case in enumerate(cases, 1):
        write_case(case, folder)
        logger.info("%d/%d %s (%s) <- %s", index, len(cases), case.case_id, case.split, case.image)
    dataset_json = _dataset_json(cases, name, channel_name, datalist)
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
    (folder / "splits_final.json").write_text(json.dumps(_splits_final(cases), indent=2) + "\n")
    return dataset_json


def _log_next_steps(dest: Path, dataset_json: dict[str, Any], dataset_id: int) -> None:
    """Log what was written and where ``splits_final.json`` must go for nnU-Net to keep our split."""
    logger.info(
        "wrote %s: %d training + validation cases (imagesTr), %d test cases (imagesTs). To keep our split, "
        "%s must be in $nnUNet_preprocessed/%s/ (nnUNetv2_plan_and_preprocess -d %d copies it in recent "
        "releases; otherwise copy it there after planning), then train fold 0.",
        dest,
        dataset_json["numTraining"],
        dataset_json["numTest"],
        dest / "splits_final.json",
        dest.name,
        dataset_id,
    )


def export_nnunet(
    output_dir: str,
    dataset_id: int,
    dataset_dir: str | None = None,
    name: str = "DINO3DRA",
    channel_name: str = "zscore",
    overwrite: bool = False,
) -> str:
    """Write our dataset as ``output_dir/Dataset{dataset_id:03d}_{name}`` in nnU-Net v2's raw format.

    Our training and validation cases go to ``imagesTr``/``labelsTr``, our test cases to
    ``imagesTs``/``labelsTs``; ``splits_final.json`` keeps our split as fold 0. It must reach
    ``nnUNet_preprocessed/Dataset{dataset_id:03d}_{name}/`` (recent nnU-Net releases copy it there while
    planning; otherwise copy it after ``nnUNetv2_plan_and_preprocess``), or nnU-Net trains on its own random
    split (see the module docstring).

    Args:
        output_dir: nnU-Net's raw folder (``$nnUNet_raw``); created if needed.
        dataset_id: nnU-Net dataset id, 1 to 999.
        dataset_dir: our dataset folder holding ``dataset.json``; None for the synthetic default of
            ``configs/train.yaml`` (generated into ``data/synthetic`` if needed).
        name: dataset name after the id. Default ``"DINO3DRA"``.
        channel_name: nnU-Net's ``channel_names["0"]``, which chooses its intensity normalisation. Default
            ``"zscore"``: each case z-scored on its own. ``"CT"`` would instead clip every case to the
            0.5-99.5 percentiles of the whole training set's foreground and z-score with that set's mean
            and standard deviation, which presumes calibrated, comparable units (Hounsfield). 3DRA
            reconstructions are in scanner-specific units that differ between systems, protocols and
            centres (as our synthetic centres do), and our own pipeline normalises per case too
            (``scripts/data/intensity.py``), so per-case z-scoring is the like-for-like choice. Use
            ``"CT"`` for a single-scanner dataset with a fixed reconstruction, where absolute values carry
            meaning.
        overwrite: replace an existing ``Dataset{dataset_id:03d}_{name}`` folder. Must be a real bool.
            Default False.

    Returns:
        the path of the written dataset folder.

    Raises:
        ValueError: a bad argument, or a case that fails the checks (the message names the file).
        FileExistsError: the dataset folder exists and ``overwrite`` is False, or another dataset there
            has this id.
    """
    _check_arguments(dataset_id, name, channel_name, overwrite)
    datalist = (
        resolve_datalist(dataset_dir, synthetic_dir="")
        if dataset_dir
        else bundle_datalist("datalist", {"dataset_dir": None})
    )
    output = Path(output_dir)
    dest = output / f"Dataset{dataset_id:03d}_{name}"
    _check_destination(output, dest, datalist, overwrite)
    cases = plan_cases(datalist)
    output.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output, prefix=f".{dest.name}.tmp-"))
    try:
        dataset_json = _write_raw_dataset(tmp, cases, name, channel_name, datalist)
        _move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log_next_steps(dest, dataset_json, dataset_id)
    return str(dest)


if __name__ == "__main__":
    import fire

    from scripts.cli import configure_logging

    configure_logging()
    fire.Fire(export_nnunet, serialize=lambda path: None)  # the log names the folder
