"""The study's ``nnunet`` row: nnU-Net v2 (``3d_fullres``, its default trainer) on the study's own data.

:func:`scripts.nnunet_baseline.run_nnunet` trains on the training centre's dataset (``data/<train_centre>/``,
its training/validation split as nnU-Net's fold 0) for the budget's ``nnunet_minutes`` of wall clock
(preprocessing included), predicts the test split of every test centre and scores it with
:mod:`scripts.score` into ``rows/nnunet/eval_<centre>/``: the files the other rows' evaluation writes.
``done.json`` is written as for them, so ``results.csv`` and both tables hold the row. It has no encoder,
its parameters are not counted, and nnU-Net's final checkpoint is scored (nnU-Net selects none on the
validation split).

``nnunetv2`` is an optional dependency: without it the row is skipped, and :func:`unavailable_reason` says
why and how to install it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scripts import nnunet_baseline
from scripts.data.datalist import DATALIST_NAME

from .plan import StudyPlan
from .run import fresh_row_dir, scored_summary, write_done

__all__ = ["run_nnunet_row", "unavailable_reason"]

logger = logging.getLogger(__name__)


def unavailable_reason() -> str | None:
    """Why the ``nnunet`` row cannot run here (``nnunetv2`` is not importable, and how to install it); None if it can."""
    try:
        nnunet_baseline.require_nnunet()
    except ImportError as error:
        return str(error)
    return None


def run_nnunet_row(
    output_dir: Path, plan: StudyPlan, row: str, datasets: Mapping[str, Path]
) -> dict[str, Any]:
    """Train nnU-Net on the training centre for the budget's minutes, score every test centre, write done.json.

    Args:
        output_dir: the study folder; the row's work goes to ``rows/<row>/`` (emptied first).
        plan: the study plan; ``plan.settings[row]["budget_minutes"]`` is the wall clock.
        row: the row's name (``nnunet``).
        datasets: centre -> dataset folder (``dataset.json``), as :func:`scripts.study.run.prepare_data` made.

    Returns:
        the row's ``done.json`` record.

    Raises:
        RuntimeError: a centre's scored n is not the size of its test split.
    """
    row_dir = fresh_row_dir(output_dir, row)
    train_centre = plan.config.train_centre
    tests = {centre: str(datasets[centre] / DATALIST_NAME) for centre in plan.config.test_centres}
    minutes = plan.settings[row]["budget_minutes"]
    logger.info(
        "row %s: nnU-Net on centre %s for %g min, then tested on %s", row, train_centre, minutes, list(tests)
    )
    summary = nnunet_baseline.run_nnunet(
        work_dir=row_dir,
        train_dataset_dir=str(datasets[train_centre]),
        test_datalists=tests,
        budget_minutes=minutes,
    )
    trained = {
        "train_seconds": float(summary["preprocessing_s"]) + float(summary["training"]["seconds"]),
        "trainable_params": None,
        "nnunet": {key: summary[key] for key in ("preprocessing_s", "training", "use_mirroring")},
    }
    centres: dict[str, Any] = {}
    for centre in plan.config.test_centres:
        seconds = float(summary["test"][centre]["prediction_s"])
        centres[centre] = scored_summary(row_dir / f"eval_{centre}", datasets[centre], seconds)
        aneurysm = centres[centre]["summary"]["classes"]["aneurysm"]["dice"]
        logger.info(
            "row %s, centre %s: aneurysm Dice %.3f ± %.3f over %d cases",
            row,
            centre,
            aneurysm["mean"],
            aneurysm["std"],
            centres[centre]["n_cases"],
        )
    return write_done(row_dir, plan, row, None, trained, centres)
