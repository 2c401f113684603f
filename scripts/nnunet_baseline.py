"""nnU-Net v2 beside DINO-3DRA on the same data, budget and metrics (``nnunetv2`` is an optional dependency).

One command exports the training dataset, plans and preprocesses ``3d_fullres``, trains nnU-Net's own
``nnUNetTrainer`` for a wall-clock budget, predicts the test cases of each centre and scores them with
:mod:`scripts.score`, so its figures sit beside the evaluate workflow's::

    pip install nnunetv2 torch==2.13.0    # the pin keeps this project's torch
    python -m scripts.nnunet_baseline run --work_dir runs/nnunet --budget_minutes 20 --centres A,B,C
    python -m scripts.nnunet_baseline predict --input_dir DIR --output_dir OUT [--use_mirroring True]

The datasets are the bundle's own: the training datalist of ``configs/train.yaml`` (``--dataset_dir``
for yours) and, per centre, the test datalist of ``configs/evaluate.yaml`` (``eval_centre``), resolved
by those configs, so both methods see the very same cases. Our training/validation split becomes
nnU-Net's fold 0 (``splits_final.json``).

The budget: nnU-Net's default schedule (1000 epochs x 250 iterations) does not fit a CPU. The trainer is
nnU-Net's default one, unchanged (network, loss, augmentation, poly learning rate), driven for a wall
clock budget: epochs of ``iterations_per_epoch`` iterations until ``budget_minutes`` minus the
preprocessing time is spent; the learning-rate schedule is stretched to the number of epochs that fit,
measured on the first one. ``summary.json`` records the iterations and seconds it got.

Layout of ``work_dir``: ``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results`` (nnU-Net's own),
``inputs_<centre>``, ``truth_<centre>`` and ``predictions_<centre>`` (test images and labels linked under
nnU-Net's naming, its predictions),
``eval_<centre>`` (``per_case.csv``, ``summary.json``, ``summary.md`` as the evaluate workflow writes),
``summary.json`` (budget, iterations, timings and each centre's summary).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["link_test_cases", "main", "require_nnunet", "run_nnunet", "train_for"]

logger = logging.getLogger(__name__)

CONFIGURATION = "3d_fullres"
FOLD = 0


def require_nnunet() -> None:
    """Raise ImportError saying how to install ``nnunetv2`` when it is not importable."""
    try:
        import nnunetv2  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "nnunetv2 is not installed: it is an optional dependency of this bundle. Install it with "
            "`pip install nnunetv2 torch==2.13.0` (the pin keeps this project's torch)."
        ) from error


NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def set_nnunet_paths(work_dir: Path) -> dict[str, Path]:
    """Point nnU-Net's three folders into ``work_dir`` (nnU-Net reads them when first imported).

    Returns:
        ``{"nnUNet_raw": path, "nnUNet_preprocessed": path, "nnUNet_results": path}``.
    """
    folders = {name: work_dir / name for name in NNUNET_FOLDERS}
    for name, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder)
    return folders


def plan_and_preprocess(dataset_id: int, num_processes: int = 2) -> None:
    """nnU-Net's fingerprint, plans and ``3d_fullres`` preprocessing, with its dataset integrity check."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=True)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=(CONFIGURATION,), num_processes=(num_processes,))


def _device() -> Any:
    """The first GPU where there is one (nnU-Net's default), else the CPU."""
    import torch

    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def train_for(dataset_id: int, budget_s: float, iterations_per_epoch: int = 10) -> dict[str, float]:
    """Train nnU-Net's default trainer on fold 0 for ``budget_s`` seconds of wall clock (GPU if there is one).

    Returns:
        ``{"epochs", "iterations", "seconds"}`` it got.
    """
    from nnunetv2.run.run_training import get_trainer_from_args

    start = time.perf_counter()
    trainer = get_trainer_from_args(str(dataset_id), CONFIGURATION, FOLD, device=_device())
    trainer.num_iterations_per_epoch = iterations_per_epoch
    trainer.num_val_iterations_per_epoch = max(1, iterations_per_epoch // 5)
    trainer.on_train_start()
    epochs = 0
    while epochs < trainer.num_epochs:
        _run_epoch(trainer)
        epochs += 1
        if epochs == 1:  # now the epoch's cost is known: stretch the schedule to what fits
            per_epoch = time.perf_counter() - start
            trainer.num_epochs = max(1, math.floor(budget_s / per_epoch))
            trainer.lr_scheduler.max_steps = trainer.num_epochs
            logger.info("nnU-Net: %.0f s per epoch -> %d epochs in the budget", per_epoch, trainer.num_epochs)
    trainer.on_train_end()  # writes checkpoint_final.pth
    seconds = time.perf_counter() - start
    return {"epochs": epochs, "iterations": epochs * iterations_per_epoch, "seconds": seconds}


def _run_epoch(trainer: Any) -> None:
    """One epoch as ``nnUNetTrainer.run_training`` runs it."""
    import torch

    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    outputs = [
        trainer.train_step(next(trainer.dataloader_train)) for _ in range(trainer.num_iterations_per_epoch)
    ]
    trainer.on_train_epoch_end(outputs)
    with torch.no_grad():
        trainer.on_validation_epoch_start()
        val = [
            trainer.validation_step(next(trainer.dataloader_val))
            for _ in range(trainer.num_val_iterations_per_epoch)
        ]
        trainer.on_validation_epoch_end(val)
    trainer.on_epoch_end()


def trained_model_dir(results: Path, dataset_id: int) -> Path:
    """nnU-Net's output folder of the fold-0 ``3d_fullres`` model under ``results`` (``nnUNet_results``)."""
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    return results / convert_id_to_dataset_name(dataset_id) / f"nnUNetTrainer__nnUNetPlans__{CONFIGURATION}"


def predict(model_dir: Path, input_dir: Path, output_dir: Path, use_mirroring: bool) -> float:
    """Predict every ``<case>_0000.nii.gz`` in ``input_dir``; returns the seconds it took."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    start = time.perf_counter()
    device = _device()
    predictor = nnUNetPredictor(
        use_mirroring=use_mirroring,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(FOLD,))
    predictor.predict_from_files(
        str(input_dir), str(output_dir), num_processes_preprocessing=1, num_processes_segmentation_export=1
    )
    return time.perf_counter() - start


def link_test_cases(datalist: str, images: Path, labels: Path) -> None:
    """Link the ``test`` cases of ``datalist`` as ``images/<case>_0000.nii.gz`` and ``labels/<case>.nii.gz``.

    ``<case>`` is the label's file name without extension: nnU-Net names its prediction of
    ``<case>_0000.nii.gz`` ``<case>.nii.gz``, which :mod:`scripts.score` matches to ``labels/<case>.nii.gz``.
    """
    from scripts.data.datalist import load_split

    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for entry in load_split(datalist, "test"):
        case = Path(entry["label"]).name.removesuffix(".gz").removesuffix(".nii")
        for source, target in ((entry["image"], images / f"{case}_0000"), (entry["label"], labels / case)):
            if not str(source).endswith(".nii.gz"):
                raise ValueError(f"{source}: nnU-Net reads .nii.gz here; convert the test cases first.")
            target = target.with_name(target.name + ".nii.gz")
            if not target.exists():
                target.symlink_to(Path(source).resolve())


def _prepare(folders: dict[str, Path], train_dataset_dir: str | None, dataset_id: int) -> None:
    """Export the training dataset into ``nnUNet_raw``, plan and preprocess it, and put our split where
    nnU-Net's training reads it."""
    from scripts.export_nnunet import export_nnunet

    exported = export_nnunet(
        dataset_dir=train_dataset_dir,
        output_dir=str(folders["nnUNet_raw"]),
        dataset_id=dataset_id,
        overwrite=True,
    )
    plan_and_preprocess(dataset_id)
    preprocessed = folders["nnUNet_preprocessed"] / Path(exported).name
    shutil.copy(Path(exported) / "splits_final.json", preprocessed / "splits_final.json")


def _predict_and_score(
    model: Path, work: Path, name: str, datalist: str, use_mirroring: bool
) -> dict[str, Any]:
    """Predict the ``test`` cases of ``datalist`` with the trained ``model`` and score them into
    ``work/eval_<name>``; return the prediction seconds and the score summary."""
    from scripts.score import score

    inputs, truth, predictions = (work / f"{kind}_{name}" for kind in ("inputs", "truth", "predictions"))
    link_test_cases(datalist, inputs, truth)
    seconds = predict(model, inputs, predictions, use_mirroring)
    result = score(truth_dir=str(truth), pred_dir=str(predictions), output_dir=str(work / f"eval_{name}"))
    logger.info("nnU-Net on %s: predicted in %.0f s, scored into %s", name, seconds, work / f"eval_{name}")
    return {"prediction_s": seconds, "summary": result}


def run_nnunet(
    work_dir: str | Path,
    train_dataset_dir: str | None,
    test_datalists: dict[str, str],
    dataset_id: int = 501,
    budget_minutes: float = 20.0,
    iterations_per_epoch: int = 10,
    use_mirroring: bool = False,
) -> dict[str, Any]:
    """Export, preprocess, train for the budget, then predict and score every test datalist.

    Args:
        work_dir: folder of everything this writes (see the module docstring).
        train_dataset_dir: dataset folder (``dataset.json``) to train on; None for the synthetic default.
        test_datalists: name -> datalist whose ``test`` cases are predicted and scored into ``eval_<name>``.
        dataset_id: nnU-Net dataset id.
        budget_minutes: wall clock for preprocessing and training together.
        iterations_per_epoch: nnU-Net iterations between validations and schedule steps.
        use_mirroring: nnU-Net's test-time mirroring (its default; 8x the prediction time in 3D).

    Returns:
        the summary also written to ``work_dir/summary.json``.
    """
    if not isinstance(use_mirroring, bool):
        raise ValueError(f"use_mirroring must be True or False (Python spelling), got {use_mirroring!r}.")
    require_nnunet()
    work = Path(work_dir).resolve()
    folders = set_nnunet_paths(work)
    start = time.perf_counter()
    _prepare(folders, train_dataset_dir, dataset_id)
    prepared_s = time.perf_counter() - start
    training = train_for(dataset_id, budget_minutes * 60 - prepared_s, iterations_per_epoch)
    summary: dict[str, Any] = {
        "budget_minutes": budget_minutes,
        "preprocessing_s": prepared_s,
        "training": training,
        "use_mirroring": use_mirroring,
        "test": {},
    }
    model = trained_model_dir(folders["nnUNet_results"], dataset_id)
    for name, datalist in test_datalists.items():
        summary["test"][name] = _predict_and_score(model, work, name, datalist, use_mirroring)
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def main(
    work_dir: str = "runs/nnunet",
    dataset_dir: str | None = None,
    dataset_id: int = 501,
    budget_minutes: float = 20.0,
    centres: str | Sequence[str] = ("A", "B", "C"),
    iterations_per_epoch: int = 10,
    use_mirroring: bool = False,
) -> dict[str, Any]:
    """The command: :func:`run_nnunet` on the bundle's datasets.

    Args:
        dataset_dir: your dataset folder (``dataset.json``), trained on and its ``test`` split scored;
            None for the synthetic default, scored on the test phantoms of each of ``centres``.
        centres: test centres (``configs/evaluate.yaml`` ``eval_centre``), without ``dataset_dir``.
        work_dir, dataset_id, budget_minutes, iterations_per_epoch, use_mirroring: see :func:`run_nnunet`.
    """
    from scripts.data.datalist import bundle_datalist

    if dataset_dir:
        tests = {"dataset": bundle_datalist("datalist", {"dataset_dir": dataset_dir})}
    else:
        names = [c.strip() for c in centres.split(",")] if isinstance(centres, str) else list(centres)
        tests = {c: bundle_datalist("eval_datalist", {"eval_centre": c}) for c in names}
    return run_nnunet(
        work_dir, dataset_dir, tests, dataset_id, budget_minutes, iterations_per_epoch, use_mirroring
    )


def predict_folder(
    input_dir: str,
    output_dir: str,
    work_dir: str = "runs/nnunet",
    dataset_id: int = 501,
    use_mirroring: bool = False,
) -> float:
    """The command ``predict``: the trained model of ``work_dir`` on every ``<case>_0000.nii.gz`` of ``input_dir``.

    Returns:
        the seconds it took (model loading, preprocessing, prediction and export).
    """
    if not isinstance(use_mirroring, bool):
        raise ValueError(f"use_mirroring must be True or False (Python spelling), got {use_mirroring!r}.")
    require_nnunet()
    folders = set_nnunet_paths(Path(work_dir).resolve())
    model = trained_model_dir(folders["nnUNet_results"], dataset_id)
    seconds = predict(model, Path(input_dir), Path(output_dir), use_mirroring)
    logger.info("nnU-Net predicted %s in %.1f s (mirroring %s)", input_dir, seconds, use_mirroring)
    return seconds


if __name__ == "__main__":
    import fire

    from scripts.cli import configure_logging

    configure_logging()
    fire.Fire({"run": main, "predict": predict_folder})
