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

    python -m scripts.synthetic --output_dir data/synthetic_A --num_cases 16 --seed 0 --centre A --previews 4
"""

from __future__ import annotations

import json
import logging
import os
import time

import nibabel as nib
import numpy as np

from scripts.atomic_io import replace_atomically, write_atomically
from scripts.data import GENERATOR_VERSION, LABELS, generate_case, get_centre, save_preview

__all__ = ["case_seed", "ensure_dataset", "main", "split_sizes", "write_dataset"]

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


def _atomic_nifti(array: np.ndarray, affine: np.ndarray, path: str) -> None:
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
    remove_old: bool = True,
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
        remove_old: delete an existing ``dataset.json`` first, so that an interrupted overwrite cannot
            leave it describing a mix of old and new cases. ``ensure_dataset`` passes False: another
            process may be writing the same (deterministic) dataset at the same time.

    Returns:
        the path of ``dataset.json``.
    """
    style = get_centre(centre)
    num_train, num_val, num_test = split_sizes(num_cases)
    if previews < 0:
        raise ValueError(f"previews must be >= 0, got {previews}.")
    output_dir = os.path.abspath(os.fspath(output_dir))
    json_path = os.path.join(output_dir, DATASET_JSON)
    if remove_old and os.path.exists(json_path):
        logger.info("removing the old %s before rewriting the dataset", json_path)
        os.remove(json_path)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(output_dir, sub), exist_ok=True)

    splits: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    start = time.perf_counter()
    for index in range(num_cases):
        split = "training" if index < num_train else "validation" if index < num_train + num_val else "test"
        folder = "Ts" if split == "test" else "Tr"
        name = f"3dra_{style.name}_{index:04d}"
        phantom = generate_case(case_seed(seed, index), style)
        image_rel = f"images{folder}/{name}.nii.gz"
        label_rel = f"labels{folder}/{name}.nii.gz"
        _atomic_nifti(phantom.image, phantom.affine, os.path.join(output_dir, image_rel))
        _atomic_nifti(phantom.label, phantom.affine, os.path.join(output_dir, label_rel))
        info = phantom.info
        splits[split].append(
            {
                "image": image_rel,
                "label": label_rel,
                "case": name,
                "seed": info["seed"],
                "num_aneurysms": info["num_aneurysms"],
                "aneurysm_diameters_mm": info["aneurysm_diameters_mm"],
                "num_hard_negatives": len(info["hard_negatives"]),
                "info": info,
            }
        )
        if index < previews:
            save_preview(
                phantom.image,
                phantom.label,
                phantom.spacing,
                os.path.join(output_dir, "previews", f"{name}.png"),
                title=f"{name}  {info['num_aneurysms']} aneurysm(s) {info['aneurysm_diameters_mm']} mm",
                markers=[(neg["centre_voxel"], neg["radius_mm"]) for neg in info["hard_negatives"]],
            )
        logger.info(
            "case %d/%d %s (%s): %d aneurysm(s) %s mm",
            index + 1,
            num_cases,
            name,
            split,
            info["num_aneurysms"],
            info["aneurysm_diameters_mm"],
        )

    dataset = {
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
        **splits,
    }
    _atomic_json(dataset, json_path)
    logger.info(
        "wrote %s: %d training, %d validation, %d test cases in %.1f s",
        json_path,
        num_train,
        num_val,
        num_test,
        time.perf_counter() - start,
    )
    return json_path


def ensure_dataset(dataset_dir: str, num_cases: int = 16, seed: int = 0, centre: str = "A") -> str:
    """Return ``dataset_dir/dataset.json``, generating the dataset first if it does not exist.

    An existing ``dataset.json`` is reused as it is, without regenerating anything (a warning is logged
    when its centre or seed differ from the ones asked for).

    Args:
        dataset_dir: dataset folder.
        num_cases: number of cases to generate when there is no dataset yet (>= 3).
        seed: dataset seed.
        centre: centre name.

    Returns:
        the path of ``dataset.json``.
    """
    style = get_centre(centre)
    json_path = os.path.join(os.path.abspath(os.fspath(dataset_dir)), DATASET_JSON)
    if os.path.isfile(json_path):
        try:
            with open(json_path) as handle:
                existing = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{json_path} exists but cannot be read as JSON: {error}") from error
        logger.info("reusing the existing dataset %s", json_path)
        if existing.get("centre") != style.name or existing.get("seed") != seed:
            logger.warning(
                "%s was written for centre %s, seed %s (asked: centre %s, seed %s); reusing it anyway",
                json_path,
                existing.get("centre"),
                existing.get("seed"),
                style.name,
                seed,
            )
        return json_path
    logger.info("no dataset at %s; generating %d cases of centre %s", dataset_dir, num_cases, style.name)
    return write_dataset(dataset_dir, num_cases=num_cases, seed=seed, centre=style, remove_old=False)


def main(output_dir: str, num_cases: int = 16, seed: int = 0, centre: str = "A", previews: int = 0) -> str:
    """Write a synthetic 3DRA dataset; returns the path of its ``dataset.json``."""
    return write_dataset(output_dir, num_cases=num_cases, seed=seed, centre=centre, previews=previews)


if __name__ == "__main__":
    import fire

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fire.Fire(main)
