"""Which dataset a workflow reads: the user's (``dataset_dir`` with a ``dataset.json``) or the synthetic one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from scripts.data.dicom import dicom_files

__all__ = ["DATALIST_NAME", "bundle_datalist", "inference_inputs", "load_split", "resolve_datalist"]

logger = logging.getLogger(__name__)

DATALIST_NAME = "dataset.json"


def resolve_datalist(
    dataset_dir: str | None,
    synthetic_dir: str,
    synthetic_cases: int = 16,
    synthetic_seed: int = 0,
    synthetic_centre: str = "A",
    synthetic_splits: list[int] | None = None,
    synthetic_negatives: int = 0,
    synthetic_training_aneurysms: list[float] | None = None,
    synthetic_training_p_bone: float | None = None,
    synthetic_training_stratified_sizes: bool = False,
    synthetic_training_overlapping_loops: bool = False,
) -> str:
    """Path of the datalist to read, generating the synthetic default dataset when none is given.

    Args:
        dataset_dir: the user's dataset folder holding ``dataset.json`` (Decathlon-style datalist with
            ``training`` / ``validation`` / ``test`` lists of ``{"image": ..., "label": ...}``, paths
            relative to the folder), or None for the synthetic default.
        synthetic_dir: where the synthetic dataset lives (generated once, then reused; in a distributed
            run by rank 0 alone, the other ranks waiting for it).
        synthetic_cases, synthetic_seed, synthetic_centre, synthetic_splits, synthetic_negatives,
        synthetic_training_aneurysms, synthetic_training_p_bone, synthetic_training_stratified_sizes,
        synthetic_training_overlapping_loops: how to generate it (see ``scripts.data.synthetic.ensure_dataset``;
            a dataset there made another way is regenerated).

    Raises:
        FileNotFoundError: ``dataset_dir`` is given but has no datalist.
    """
    if dataset_dir:
        path = Path(dataset_dir) / DATALIST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no datalist. A dataset folder needs a dataset.json with 'training', 'validation' "
                "and 'test' lists of {'image': ..., 'label': ...} entries (see README, 'Your own data'); "
                "leave dataset_dir unset to use the synthetic phantoms."
            )
        return str(path)
    import ignite.distributed as idist

    from scripts.data.synthetic import ensure_dataset

    # In distributed runs local rank 0 generates while the other ranks wait, then they find it written.
    with idist.one_rank_first(local=True):
        return ensure_dataset(
            synthetic_dir,
            num_cases=synthetic_cases,
            seed=synthetic_seed,
            centre=synthetic_centre,
            splits=synthetic_splits,
            negatives=synthetic_negatives,
            training_aneurysms=synthetic_training_aneurysms,
            training_p_bone=synthetic_training_p_bone,
            training_stratified_sizes=synthetic_training_stratified_sizes,
            training_overlapping_loops=synthetic_training_overlapping_loops,
        )


def bundle_datalist(key: str = "datalist", overrides: dict | None = None) -> str:
    """Resolve the datalist ``key`` of ``configs/train.yaml`` + ``configs/evaluate.yaml`` as the workflows do.

    ``"datalist"`` is the training datalist (the synthetic default when ``dataset_dir`` is unset),
    ``"eval_datalist"`` the test datalist of ``eval_centre``; synthetic data are generated on first use, so
    a command outside the workflows reads the very cases they read.

    Args:
        key: the config key to resolve.
        overrides: config keys to set first, e.g. ``{"eval_centre": "B"}``.
    """
    from monai.bundle import ConfigParser

    root = Path(__file__).resolve().parents[2]
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / "train.yaml"), str(root / "configs" / "evaluate.yaml")])
    parser["bundle_root"] = str(root)
    for name, value in (overrides or {}).items():
        parser[name] = value
    return str(parser.get_parsed_content(key))


def load_split(
    datalist: str,
    key: str,
    base_dir: str | None = None,
    hard_negatives: bool = False,
    hard_negative_kinds: list[str] | None = None,
) -> list[dict]:
    """``image``/``label`` entries of one split with absolute paths, every referenced file checked to exist.

    Args:
        datalist: the datalist JSON file.
        key: the split, e.g. ``"training"``.
        base_dir: folder the relative paths start from. Default: the datalist's folder.
        hard_negatives: also give each entry ``hard_negatives``, (K, 3) voxel indices in its label file's grid
            of structures that look like an aneurysm and are not, read from the entry's
            ``info.hard_negatives[].centre_voxel`` (the synthetic phantoms write them; K = 0 where an entry has
            none), for :class:`scripts.data.crops.CacheAlignedRandCropByLabelClassesd`. Default False.
        hard_negative_kinds: only the hard negatives whose ``kind`` is one of these; None: all. Default None.

    Raises:
        ValueError: the datalist is unreadable or lacks ``key``, ``hard_negative_kinds`` is not a list of names,
            or a case's ``info.hard_negatives`` is malformed (the message names the datalist and the case).
        FileNotFoundError: an entry names a file that does not exist (the message names both).
    """
    from monai.data import load_decathlon_datalist

    path = Path(datalist)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the datalist ({error}).") from error
    if hard_negative_kinds is not None and not (
        isinstance(hard_negative_kinds, (list, tuple))
        and all(isinstance(k, str) for k in hard_negative_kinds)
    ):
        raise ValueError(
            f"hard_negative_kinds must be a list of kind names or None, got {hard_negative_kinds!r}."
        )
    if key not in raw:
        raise ValueError(f"{path}: no '{key}' list (it has {sorted(raw)}).")
    entries = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key, base_dir=base_dir)
    # Only what the pipeline reads: extra per-case fields (e.g. the phantoms' info) differ between cases
    # and could not be batched.
    entries = [
        {k: e[k] for k in ("image", "label") if k in e}
        | ({"hard_negatives": _hard_negatives(e, path, hard_negative_kinds)} if hard_negatives else {})
        for e in entries
    ]
    for entry in entries:
        for field in ("image", "label"):
            if field in entry and not Path(entry[field]).is_file():
                raise FileNotFoundError(f"{path}: '{key}' entry names {entry[field]}, which does not exist.")
    logger.info("%s: %d '%s' cases", path, len(entries), key)
    if hard_negatives:
        found = sum(len(entry["hard_negatives"]) for entry in entries)
        if found:
            logger.info("%s: %d hard negatives in %d '%s' cases", path, found, len(entries), key)
        else:  # asked for, none there: the crops centred on them would silently never happen
            logger.warning(
                "%s: no '%s' case lists hard negatives%s (info.hard_negatives[].centre_voxel): no crop will be "
                "centred on one.",
                path,
                key,
                "" if hard_negative_kinds is None else f" of the kinds {list(hard_negative_kinds)}",
            )
    return entries


def _hard_negatives(entry: dict, datalist: Path, kinds: list[str] | None) -> np.ndarray:
    """(K, 3) int voxel indices of an entry's ``info.hard_negatives[].centre_voxel`` of the given ``kinds``
    (None: all); raises ValueError naming the datalist and the entry's label when ``info`` or its
    ``hard_negatives`` has the wrong form or a position is not 3 integers."""
    info = entry.get("info", {})
    negatives = info.get("hard_negatives", []) if isinstance(info, dict) else None
    if not isinstance(negatives, list):
        raise ValueError(
            f"{datalist}: the 'info' of {entry.get('label')} is not an object with a list 'hard_negatives'."
        )
    found = []
    for negative in negatives:
        if kinds is not None and isinstance(negative, dict) and negative.get("kind") not in kinds:
            continue
        voxel = negative.get("centre_voxel") if isinstance(negative, dict) else None
        if not (isinstance(voxel, list) and len(voxel) == 3 and all(type(v) is int for v in voxel)):
            raise ValueError(
                f"{datalist}: the hard negative {negative!r} of {entry.get('label')} has no 'centre_voxel' of "
                "3 integers."
            )
        found.append(voxel)
    return np.array(found, dtype=np.int64).reshape(-1, 3)


def inference_inputs(dataset_dir: str | None = None, input_files: list[str] | None = None) -> list[dict]:
    """``[{"image": path}, ...]`` for inference: NIfTI files and folders each holding one DICOM series.

    Args:
        dataset_dir: a folder whose ``.nii`` / ``.nii.gz`` files and whose sub-folders holding DICOM files are
            the cases (a sub-folder one series, named after it), with the folder itself when it holds DICOM
            files; other sub-folders are skipped (logged). Cases in name order.
        input_files: NIfTI files or DICOM series folders, in the order given; used instead of ``dataset_dir``.

    A series folder is checked when it is read (``scripts.data.dicom.DicomSeriesReader``), so one with two
    series or a missing slice fails as one case and the others go on.

    Raises:
        ValueError: neither or no volumes given.
        FileNotFoundError: a named file or folder does not exist.
    """
    if input_files:
        files = [Path(f) for f in ([input_files] if isinstance(input_files, str) else input_files)]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"Inference input file(s) not found: {missing}")
    elif dataset_dir:
        folder = Path(dataset_dir)
        children = sorted(folder.iterdir())
        niftis = [p for p in children if p.is_file() and p.name.endswith((".nii", ".nii.gz"))]
        subfolders = [p for p in children if p.is_dir() and not p.name.startswith(".")]
        series = [p for p in [folder, *subfolders] if dicom_files(p)]
        skipped = [p.name for p in subfolders if p not in series]
        if skipped:
            logger.info("%s: sub-folders without DICOM files, skipped: %s", folder, skipped)
        files = sorted(niftis + series)
    else:
        raise ValueError(
            "Inference needs input_files (a list of NIfTI files or DICOM series folders) or dataset_dir "
            "(a folder of them)."
        )
    if not files:
        raise ValueError(f"{dataset_dir}: no .nii or .nii.gz files and no DICOM series folders to segment.")
    return [{"image": str(f)} for f in files]
