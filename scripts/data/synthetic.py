"""Write synthetic 3DRA datasets (the bundle's default data) in the Medical Segmentation Decathlon layout.

Layout of ``output_dir``::

    imagesTr/  labelsTr/   training and validation cases
    imagesTs/  labelsTs/   test cases
    previews/              optional PNGs (maximum-intensity projections with the labels)
    dataset.json           read by ``monai.data.load_decathlon_datalist(path, data_list_key=K)``
                           for K in ``training``, ``validation``, ``test``; paths relative to output_dir

Every file is written under a temporary name in its own folder and moved into place with
``os.replace``; ``dataset.json`` is written last. An interrupted run therefore never leaves a
``dataset.json`` that points at missing or half-written files, and ``ensure_dataset`` regenerates it.

Command line::

    python -m scripts.data.synthetic --output_dir data/synthetic_A --num_cases 16 --seed 0 --centre A --previews 4
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np

from scripts.atomic_io import replace_atomically, write_atomically

from .centres import Centre, get_centre
from .phantom import (
    GENERATOR_VERSION,
    LABELS,
    Phantom,
    generate_case,
    generate_geometry,
    phantom_affine,
    render_background_only,
)
from .preview import save_preview

__all__ = ["dataset_recipe", "ensure_dataset", "main", "split_sizes", "write_dataset", "write_nifti"]

logger = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"


def split_sizes(num_cases: int) -> tuple[int, int, int]:
    """``(training, validation, test)`` counts: test about 20 %, validation about 15 %, each at least 1.

    Raises:
        ValueError: if ``num_cases < 3``.
    """
    if isinstance(num_cases, bool) or not isinstance(num_cases, int | np.integer) or num_cases < 3:
        raise ValueError(
            f"num_cases must be an integer >= 3 (training, validation, test), got {num_cases!r}."
        )
    num_test = max(1, (20 * num_cases + 50) // 100)  # 20 %, rounded half up
    num_val = max(1, (15 * num_cases + 50) // 100)  # 15 %
    return int(num_cases - num_test - num_val), int(num_val), int(num_test)


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a dataset with ``seed``: distinct across datasets and cases, reproducible."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    """Save a NIfTI through a temporary file in the same folder, then ``os.replace`` it into ``path``."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    # nibabel picks gzip from the ending
    replace_atomically(path, lambda tmp: nib.save(image, tmp), suffix=".tmp.nii.gz")


def _atomic_json(data: dict, path: str) -> None:
    write_atomically(path, json.dumps(data, indent=2) + "\n")


def write_dataset(
    output_dir: str,
    num_cases: int = 16,
    seed: int = 0,
    centre: str = "A",
    previews: int = 0,
    splits: Sequence[int] | None = None,
    negatives: int = 0,
    training_aneurysms: Sequence[float] | None = None,
    training_p_bone: float | None = None,
    training_stratified_sizes: bool = False,
    training_overlapping_loops: bool = False,
) -> str:
    """Generate ``num_cases`` cases of ``centre`` into ``output_dir`` (overwriting) and write ``dataset.json``.

    Cases ``0 .. n_train-1`` are training, the next ``n_val`` validation (both in ``imagesTr``), the rest
    test (``imagesTs``); case ``i`` is ``generate_case(case_seed(seed, i), centre)``.

    Args:
        output_dir: dataset folder (created if needed).
        num_cases: total number of cases, >= 3.
        seed: dataset seed.
        centre: centre name, see :data:`scripts.data.CENTRES`.
        previews: write PNG previews of the first ``previews`` cases into ``output_dir/previews``
            (MIPs with aneurysms in red, hard negatives circled in yellow, slices through the aneurysm).
        splits: ``(training, validation, test)`` counts summing to ``num_cases``; default
            :func:`split_sizes`. ``(0, 0, n)`` writes a test-only dataset.
        negatives: how many of the training cases (the last ones) are vessel-free: tissue texture, bone,
            artefacts and noise with an all-background label, so that a model sees whole windows and
            volumes of background. Default 0.
        training_aneurysms: probabilities of 0, 1, 2, ... aneurysms in each training phantom with vessels,
            instead of the centre's ``aneurysm_count_probs`` (which validation and test phantoms keep), so
            that a small training set shows more aneurysms. Each phantom grows the same vessel tree either
            way (its aneurysms and hard negatives differ).
        training_p_bone: probability that a training phantom (vessel-free ones included) shows bone, instead
            of the centre's ``p_bone`` (which validation and test phantoms keep), so that a small training
            set shows bone often enough to learn that a bright plate is not lumen.
        training_stratified_sizes: spread the training aneurysms over the centre's size distribution by
            construction: the ``k`` training phantoms that have an aneurysm take, in a seeded random order,
            the sizes at quantiles ``(0.5, 1.5, ..., k - 0.5) / k`` for their first aneurysm (others stay
            random), so that a small training set cannot miss the small (or the large) sacs by chance.
            Trees, counts and appearance stay as drawn.
        training_overlapping_loops: grow every training phantom's tree with one tight, overlapping loop (a
            sac-like hard negative) on a distal branch where one thin enough allows it, whatever its template
            (otherwise only the random template tries one, in 40 % of its trees: 3 of the default 28 training
            phantoms with vessels have one, 18 with this). Validation and test phantoms keep the drawn trees.

    An existing ``dataset.json`` is deleted first, so that an interrupted overwrite cannot leave it
    describing a mix of old and new cases.

    Returns:
        the path of ``dataset.json``.
    """
    style = get_centre(centre)
    recipe = dataset_recipe(
        num_cases,
        seed,
        style,
        splits,
        negatives,
        training_aneurysms,
        training_p_bone,
        training_stratified_sizes,
        training_overlapping_loops,
    )
    num_train, num_val, num_test = recipe["splits"]
    if previews < 0:
        raise ValueError(f"previews must be >= 0, got {previews}.")
    output_dir = os.path.abspath(os.fspath(output_dir))
    json_path = _clear_folder(output_dir)
    start = time.perf_counter()
    training_style = style
    if training_aneurysms is not None:
        training_style = dataclasses.replace(style, aneurysm_count_probs=tuple(recipe["training_aneurysms"]))
    if training_p_bone is not None:
        training_style = dataclasses.replace(training_style, p_bone=recipe["training_p_bone"])
    quantiles = {}
    if training_stratified_sizes:
        quantiles = _training_size_quantiles(seed, training_style, range(num_train - negatives))
    cases = _write_cases(
        output_dir,
        style,
        training_style,
        seed,
        recipe["splits"],
        negatives,
        previews,
        quantiles,
        training_overlapping_loops,
    )
    _atomic_json(_dataset_description(style, seed, recipe, cases), json_path)
    logger.info(
        "wrote %s: %d training, %d validation, %d test cases in %.1f s",
        json_path,
        num_train,
        num_val,
        num_test,
        time.perf_counter() - start,
    )
    return json_path


def _write_cases(
    output_dir: str,
    style: Centre,
    training_style: Centre,
    seed: int,
    counts: Sequence[int],
    negatives: int,
    previews: int,
    size_quantiles: dict[int, float],
    training_loops: bool,
) -> dict[str, list[dict]]:
    """Generate and save every case (see :func:`write_dataset`); return the datalist entries by split.

    Training cases are drawn with ``training_style`` (``style`` but for its aneurysm counts and bone) and, with
    ``training_loops``, a forced overlapping loop; the others with ``style``; case ``i`` in ``size_quantiles``
    takes that quantile for its first aneurysm's size.
    """
    num_train, num_val, _ = counts
    num_cases = sum(counts)
    cases: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for index in range(num_cases):
        split = "training" if index < num_train else "validation" if index < num_train + num_val else "test"
        vessel_free = split == "training" and index >= num_train - negatives
        case_style = training_style if split == "training" else style
        if vessel_free:
            phantom = _vessel_free_case(case_seed(seed, index), case_style)
        else:
            phantom = generate_case(
                case_seed(seed, index),
                case_style,
                size_quantile=size_quantiles.get(index),
                overlapping_loop=training_loops and split == "training",
            )
        name = f"3dra_{style.name}_{index:04d}"
        cases[split].append(_write_case(phantom, output_dir, name, "Ts" if split == "test" else "Tr"))
        if index < previews:
            _write_preview(phantom, os.path.join(output_dir, "previews", f"{name}.png"), name)
        info = phantom.info
        logger.info(
            "case %d/%d %s (%s): %d aneurysm(s) %s mm",
            index + 1,
            num_cases,
            name,
            split,
            info["num_aneurysms"],
            info["aneurysm_diameters_mm"],
        )
    return cases


def _training_size_quantiles(seed: int, style: Centre, indices: Sequence[int]) -> dict[int, float]:
    """``{case index: quantile}`` for the cases among ``indices`` whose geometry has an aneurysm: the quantiles
    ``(0.5, 1.5, ..., k - 0.5) / k`` in an order drawn from ``seed`` (see :func:`write_dataset`)."""
    with_sac = [i for i in indices if generate_geometry(case_seed(seed, i), style).aneurysms]
    order = np.random.default_rng([int(seed), 2]).permutation(len(with_sac))  # a stream apart from the cases'
    return {i: (int(rank) + 0.5) / len(with_sac) for i, rank in zip(with_sac, order, strict=True)}


def _clear_folder(output_dir: str) -> str:
    """Delete ``output_dir``'s ``dataset.json`` (if any) and make the image and label folders; return its path."""
    json_path = os.path.join(output_dir, DATASET_JSON)
    if os.path.exists(json_path):
        logger.info("removing the old %s before rewriting the dataset", json_path)
        os.remove(json_path)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
    return json_path


def _write_case(phantom: Phantom, output_dir: str, name: str, folder: str) -> dict:
    """Save a case's image and label into ``images{folder}`` and ``labels{folder}``; return its datalist entry."""
    image_rel = f"images{folder}/{name}.nii.gz"
    label_rel = f"labels{folder}/{name}.nii.gz"
    write_nifti(phantom.image, phantom.affine, os.path.join(output_dir, image_rel))
    write_nifti(phantom.label, phantom.affine, os.path.join(output_dir, label_rel))
    info = phantom.info
    return {
        "image": image_rel,
        "label": label_rel,
        "case": name,
        "seed": info["seed"],
        "num_aneurysms": info["num_aneurysms"],
        "aneurysm_diameters_mm": info["aneurysm_diameters_mm"],
        "num_hard_negatives": len(info["hard_negatives"]),
        "info": info,
    }


def _write_preview(phantom: Phantom, path: str, name: str) -> None:
    """PNG preview of a case: aneurysm count and sizes in the title, hard negatives circled."""
    info = phantom.info
    save_preview(
        phantom.image,
        phantom.label,
        phantom.spacing,
        path,
        title=f"{name}  {info['num_aneurysms']} aneurysm(s) {info['aneurysm_diameters_mm']} mm",
        markers=[(neg["centre_voxel"], neg["radius_mm"]) for neg in info["hard_negatives"]],
    )


def _dataset_description(
    style: Centre, seed: int, recipe: dict[str, Any], cases: dict[str, list[dict]]
) -> dict:
    """The content of ``dataset.json``: the Decathlon fields, the generator's provenance and the cases."""
    num_train, num_val, num_test = recipe["splits"]
    return {
        "name": f"synthetic-3dra-{style.name}",
        "description": "Synthetic 3D rotational angiography phantoms: cerebral arteries and saccular aneurysms",
        "reference": "scripts/data (this bundle)",
        "licence": "CC0-1.0",
        "release": GENERATOR_VERSION,
        "tensorImageSize": "3D",
        "modality": {"0": "3DRA"},
        "labels": dict(LABELS),
        "intensity_unit": "arbitrary units: background ~50-240, opacified lumen ~900-2000; rescale by percentiles",
        "generator_version": GENERATOR_VERSION,
        "centre": style.name,
        "centre_parameters": style.to_dict(),
        "seed": int(seed),
        "spacing": [float(s) for s in style.spacing],
        "shape": [int(n) for n in style.shape],
        "numTraining": num_train + num_val,
        "numValidation": num_val,
        "numTest": num_test,
        "synthetic_recipe": recipe,
        **cases,
    }


def _vessel_free_case(seed: int, centre: Centre) -> Phantom:
    """A case of background only (label all 0), as a :class:`Phantom`."""
    image, label, info = render_background_only(seed, centre)
    info = {**info, "num_aneurysms": 0, "aneurysm_diameters_mm": [], "hard_negatives": []}
    return Phantom(image, label, centre.spacing, phantom_affine(centre.shape, centre.spacing), info)


def dataset_recipe(
    num_cases: int,
    seed: int,
    centre: str | Centre,
    splits: Sequence[int] | None = None,
    negatives: int = 0,
    training_aneurysms: Sequence[float] | None = None,
    training_p_bone: float | None = None,
    training_stratified_sizes: bool = False,
    training_overlapping_loops: bool = False,
) -> dict[str, Any]:
    """Everything that shapes a synthetic dataset; two datasets with equal recipes hold the same cases.

    Written into ``dataset.json`` as ``synthetic_recipe`` and compared by :func:`ensure_dataset`.

    Args:
        num_cases: total number of cases.
        seed: dataset seed.
        centre: centre name or :class:`~scripts.data.Centre` (every field counts: spacing, shape, ...).
        splits: ``(training, validation, test)`` counts; default :func:`split_sizes`.
        negatives: vessel-free training cases (see :func:`write_dataset`).
        training_aneurysms: aneurysm-count probabilities of the training phantoms (see :func:`write_dataset`).
        training_p_bone: bone probability of the training phantoms (see :func:`write_dataset`); recorded
            only when set, so datasets written before it existed keep their recipe.
        training_stratified_sizes: training aneurysm sizes at spread quantiles (see :func:`write_dataset`);
            recorded only when ``True``, for the same reason.
        training_overlapping_loops: a forced overlapping loop in each training tree (see
            :func:`write_dataset`); recorded only when ``True``.

    Raises:
        ValueError: a setting is out of range (the message names it).
    """
    style = get_centre(centre)
    counts = split_sizes(num_cases) if splits is None else _check_splits(num_cases, splits)
    if isinstance(negatives, bool) or not isinstance(negatives, int) or not 0 <= negatives <= counts[0]:
        raise ValueError(
            f"negatives must be an integer from 0 to the {counts[0]} training cases, got {negatives!r}."
        )
    recipe = {
        "generator_version": GENERATOR_VERSION,
        "num_cases": int(num_cases),
        "seed": int(seed),
        "splits": list(counts),
        "negatives": negatives,
        "training_aneurysms": _check_counts(style, training_aneurysms),
        "centre": style.to_dict(),
    }
    if training_p_bone is not None:
        recipe["training_p_bone"] = _check_p_bone(style, training_p_bone)
    if not isinstance(training_stratified_sizes, bool):
        raise ValueError(
            f"training_stratified_sizes must be True or False, got {training_stratified_sizes!r}."
        )
    if training_stratified_sizes:
        recipe["training_stratified_sizes"] = True
    if not isinstance(training_overlapping_loops, bool):
        raise ValueError(
            f"training_overlapping_loops must be True or False, got {training_overlapping_loops!r}."
        )
    if training_overlapping_loops:
        recipe["training_overlapping_loops"] = True
    return json.loads(json.dumps(recipe))  # as it reads back from dataset.json (tuples become lists)


def _check_counts(style: Centre, probs: Sequence[float] | None) -> list[float] | None:
    """``probs`` as a list of floats, checked as the centre checks its own counts; ``None`` passes."""
    if probs is None:
        return None
    if isinstance(probs, str | bytes) or not isinstance(probs, Sequence):
        raise ValueError(
            f"training_aneurysms must be a list of probabilities of 0, 1, 2, ... aneurysms, got {probs!r}."
        )
    try:
        values = tuple(float(p) for p in probs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"training_aneurysms must hold numbers, got {list(probs)!r}.") from error
    try:
        dataclasses.replace(style, aneurysm_count_probs=values)
    except ValueError as error:
        raise ValueError(f"training_aneurysms: {error}") from error
    return list(values)


def _check_p_bone(style: Centre, p_bone: float) -> float:
    """``p_bone`` as a float, checked as the centre checks its own."""
    if isinstance(p_bone, bool) or not isinstance(p_bone, int | float):
        raise ValueError(f"training_p_bone must be a number from 0 to 1, got {p_bone!r}.")
    try:
        dataclasses.replace(style, p_bone=float(p_bone))
    except ValueError as error:
        raise ValueError(f"training_p_bone: {error}") from error
    return float(p_bone)


def _check_splits(num_cases: int, splits: Sequence[int]) -> tuple[int, int, int]:
    counts = tuple(int(n) for n in splits)
    if len(counts) != 3 or min(counts) < 0 or sum(counts) != num_cases:
        raise ValueError(
            f"splits must be 3 non-negative counts (training, validation, test) summing to num_cases="
            f"{num_cases}, got {list(splits)}."
        )
    return counts


def ensure_dataset(
    dataset_dir: str,
    num_cases: int = 16,
    seed: int = 0,
    centre: str = "A",
    splits: Sequence[int] | None = None,
    negatives: int = 0,
    training_aneurysms: Sequence[float] | None = None,
    training_p_bone: float | None = None,
    training_stratified_sizes: bool = False,
    training_overlapping_loops: bool = False,
) -> str:
    """Return ``dataset_dir/dataset.json``, generating the dataset unless the one there has the same recipe.

    The recipe (:func:`dataset_recipe`: generator version, case count, splits, seed and every centre
    setting, spacing and shape included) is stored in ``dataset.json``. A dataset written with another
    recipe, or by an older generator, is regenerated with a warning that says what differs; a
    ``dataset.json`` that this generator did not write is never overwritten.

    Args:
        dataset_dir: dataset folder.
        num_cases: number of cases (>= 1 with explicit ``splits``, else >= 3).
        seed: dataset seed.
        centre: centre name.
        splits: ``(training, validation, test)`` counts; default :func:`split_sizes`.
        negatives: vessel-free training cases (see :func:`write_dataset`).
        training_aneurysms: aneurysm-count probabilities of the training phantoms (see :func:`write_dataset`).
        training_p_bone: bone probability of the training phantoms (see :func:`write_dataset`).
        training_stratified_sizes: training aneurysm sizes at spread quantiles (see :func:`write_dataset`).
        training_overlapping_loops: a forced overlapping loop in each training tree (see :func:`write_dataset`).

    Returns:
        the path of ``dataset.json``.

    Raises:
        ValueError: the folder holds a ``dataset.json`` that is not a synthetic dataset of this generator.
    """
    recipe = dataset_recipe(
        num_cases,
        seed,
        centre,
        splits,
        negatives,
        training_aneurysms,
        training_p_bone,
        training_stratified_sizes,
        training_overlapping_loops,
    )
    json_path = os.path.join(os.path.abspath(os.fspath(dataset_dir)), DATASET_JSON)
    old = _written_recipe(json_path)
    if old == recipe:
        logger.info("reusing the existing dataset %s", json_path)
        return json_path
    if old is None:
        logger.info(
            "no dataset at %s; generating %d cases of centre %s",
            dataset_dir,
            num_cases,
            recipe["centre"]["name"],
        )
    else:
        logger.warning(
            "%s was generated with another recipe; REGENERATING it. Differences (was, asked): %s",
            json_path,
            _recipe_changes(old, recipe),
        )
    return write_dataset(
        dataset_dir,
        num_cases=num_cases,
        seed=seed,
        centre=get_centre(centre),
        splits=splits,
        negatives=negatives,
        training_aneurysms=training_aneurysms,
        training_p_bone=training_p_bone,
        training_stratified_sizes=training_stratified_sizes,
        training_overlapping_loops=training_overlapping_loops,
    )


def _written_recipe(json_path: str) -> dict[str, Any] | None:
    """The recipe stored in ``json_path`` (only the version for an old generator's); ``None`` if no file.

    Raises:
        ValueError: the file cannot be read as JSON or was not written by this generator.
    """
    if not os.path.isfile(json_path):
        return None
    try:
        with open(json_path) as handle:
            existing = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{json_path} exists but cannot be read as JSON: {error}") from error
    if "generator_version" not in existing:
        raise ValueError(
            f"{json_path} was not written by the synthetic generator (no 'generator_version'); refusing "
            "to overwrite it. Pass it as dataset_dir, or choose another synthetic_dir."
        )
    return existing.get("synthetic_recipe", {"generator_version": existing["generator_version"]})


def _recipe_changes(old: dict[str, Any], recipe: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old value, asked value)}`` for every recipe entry that differs, centre settings as ``centre.K``."""
    # a setting recorded only when on may be in one of the two alone
    keys = [k for k in {**old, **recipe} if k != "centre"]
    changed = {k: (old.get(k), recipe.get(k)) for k in keys if old.get(k) != recipe.get(k)}
    old_centre = old.get("centre") or {}
    changed |= {
        f"centre.{k}": (old_centre.get(k), v) for k, v in recipe["centre"].items() if old_centre.get(k) != v
    }
    return changed


main = write_dataset
"""The command line: ``python -m scripts.data.synthetic --output_dir D [--num_cases N] [--splits "[0,0,20]"] ...``."""


if __name__ == "__main__":
    import fire

    from scripts.cli import configure_logging

    configure_logging()
    fire.Fire(main)
