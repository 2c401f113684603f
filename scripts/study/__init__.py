"""The paper's ablation and cross-centre tables, on the same data for every row, with one command.

Run from the bundle root (or with it on ``PYTHONPATH``)::

    python -m scripts.study --output_dir runs/study --budget cpu
    python -m scripts.study --output_dir runs/study --budget cpu --rows plain_unet,random_features
    python -m scripts.study --output_dir runs/study --budget full --dino_model /weights/dinov3-vits16 \
        --dinov2_model /weights/dinov2-small

Each row of the paper's ablation is an override file stacked on ``configs/train.yaml``
(``configs/ablation/<row>.yaml``); ``configs/study.yaml`` lists them, with the budgets (data size and
schedule). For every selected row the study trains ``configs/train.yaml`` + the budget's config files + the
row's file on the training centre (A) and evaluates the best checkpoint (best validation Dice on A's
validation split) with ``configs/evaluate.yaml`` stacked on them, on the test split of every test centre
(A, B, C), each through ``monai.bundle.ConfigWorkflow`` exactly as the bundle's own commands do. On top
come, later ones winning: the budget's ``config``, ``dino_model`` and ``seed`` from the command,
``overrides``, less the keys the row's file sets (a row decides what it is about); then the study's own
keys (data location, scored split, output folders), which nothing else may set.

The ``nnunet`` row (``external_rows`` in study.yaml) is another method, not ``train.yaml``: nnU-Net v2's
``3d_fullres`` default trainer (:mod:`scripts.nnunet_baseline`) on the same training centre's dataset for
the budget's ``nnunet_minutes`` of wall clock, scored on the same test splits with the same metrics
(:mod:`scripts.score`). ``nnunetv2`` is optional: without it a selected ``nnunet`` row is skipped with a
warning saying why and how to install it, and the tables and ``results.csv`` show it as skipped.

What keeps the numbers honest:

* One set of data for every row: the training centre's dataset and every test centre's dataset are
  generated once (seeds derived from ``seed`` and the centre, so no two centres share a phantom), and
  ``output_dir`` stays bound to them (``study.json``): a rerun with other cases or another seed stops.
* Test cases never train or select a model; every test case counts (the scored ``n`` is checked against
  the datalist), and a missed or spurious structure scores Dice 0 and the penalty HD95
  (:mod:`scripts.metrics`), never a NaN that a mean skips.
* Every encoder the rows to run need is loaded before anything is trained; one that cannot be loaded
  stops the study with the loader's error (which says how to get the weights). Random weights are
  never swapped in: the source and SHA-256 of the encoder each row was trained with are read back from
  its checkpoint, written to ``results.csv`` and under both tables, and random ones are marked.
* A finished row is reused only when its settings are exactly this run's; one with other settings
  shows as "not run" until it is rerun.

Layout of ``output_dir``::

    study.json                     budget cases, seed and dataset seeds this folder is bound to
    data/<centre>/                 synthetic datasets (dataset.json + NIfTI), generated once
    embedding_cache/               slice embeddings, shared by every row with the same encoder
    rows/<row>/models/             model.pt (best validation Dice) and the resumable checkpoint
    rows/<row>/eval_<centre>/      per_case.csv, summary.json, summary.md
    rows/<row>/done.json           written last: settings, encoder, timings and summaries of the row
    rows/nnunet/nnUNet_*/          nnU-Net's own raw, preprocessed and results folders (nnunet row)
    results.csv                    one line per (row, centre), skipped rows with the reason
    ablation.md, cross_centre.md   the paper's two tables, rebuilt from every finished row

Resume: rerun the same command. Finished rows (with ``done.json``) are skipped; an unfinished row's
folder is deleted and the row redone from the start.

The package, one job per module: :mod:`scripts.study.plan` (``configs/study.yaml``, every row's files and
overrides, the encoder check), :mod:`scripts.study.run` (the data, training and evaluating a row, ``done.json``,
resume), :mod:`scripts.study.nnunet` (the nnU-Net row), :mod:`scripts.study.tables` (``results.csv`` and the
two tables); :func:`main` here ties them together, and ``__main__`` is the command.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.networks import DEFAULT_DINO_MODEL

from .nnunet import run_nnunet_row, unavailable_reason
from .plan import DEFAULT_DINOV2_MODEL, StudyPlan, check_encoders, load_study_config, plan_study
from .run import bind_output_dir, finished_record, prepare_data, run_row
from .tables import CSV_COLUMNS, write_tables

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_DINOV2_MODEL",
    "DEFAULT_DINO_MODEL",
    "load_study_config",
    "main",
    "plan_study",
    "write_tables",
]

logger = logging.getLogger(__name__)


def main(
    output_dir: str,
    budget: str = "cpu",
    rows: str | Sequence[str] | None = None,
    dino_model: str = DEFAULT_DINO_MODEL,
    dinov2_model: str | None = None,
    seed: int = 0,
    overrides: Mapping[str, Any] | str | None = None,
) -> str:
    """Train and evaluate the selected rows of ``configs/study.yaml``, then write the tables.

    Args:
        output_dir: the study folder (see the module docstring); rerun with the same one to resume.
        budget: a budget of ``configs/study.yaml``: ``micro`` (tests), ``cpu`` (well under an hour on a 2-core
            CPU), ``full`` (the paper's GPU schedule). Default ``cpu``.
        rows: rows to run, comma-separated or a list; default all (``nnunet`` included). Finished rows that
            are not selected still appear in the tables. A selected ``nnunet`` row without ``nnunetv2``
            installed is skipped, with a warning and in the tables, saying why and how to install it.
        dino_model: encoder weights of every row whose file does not set ``dino_model`` (hub id, local
            folder, Meta ``.pth``, or ``random[:SEED]``). Default DINOv3 ViT-S/16.
        dinov2_model: encoder weights of the row whose file names ``facebook/dinov2-small`` (the DINOv2-small
            row), e.g. a local copy. Default None: as the file says.
        seed: training seed of every row; the dataset seeds derive from it. Default 0.
        overrides: config overrides for every workflow of every row (a mapping, or JSON/YAML text), above
            the budget and ``dino_model``; a row whose file sets a key keeps its own value.

    Returns:
        the two tables (Markdown), as written to ``ablation.md`` and ``cross_centre.md``.

    Raises:
        ValueError: bad arguments, or an ``output_dir`` made with other data.
        EncoderWeightsError: an encoder a row to run needs cannot be loaded (before anything is trained).
    """
    plan = plan_study(budget, rows, dino_model, dinov2_model, seed, overrides)
    output = Path(output_dir).expanduser().resolve()
    bind_output_dir(output, plan, write=False)
    finished = {row: finished_record(output, plan, row) is not None for row in plan.selected}
    skipped = _unavailable([row for row in plan.selected if not finished[row]], plan)
    to_run = [row for row in plan.selected if not finished[row] and row not in skipped]
    encoders = check_encoders(plan, to_run)

    output.mkdir(parents=True, exist_ok=True)
    bind_output_dir(output, plan, write=True)
    datasets = prepare_data(output, plan) if to_run else {}
    for index, row in enumerate(plan.selected, start=1):
        if finished[row] or row in skipped:
            why = "finished earlier" if finished[row] else "cannot run here (see the warning above)"
            logger.info("row %d/%d %s: %s, skipped", index, len(plan.selected), row, why)
            continue
        logger.info("row %d/%d %s", index, len(plan.selected), row)
        if plan.is_external(row):
            run_nnunet_row(output, plan, row, datasets)
        else:
            run_row(output, plan, row, datasets, encoders[row])
        write_tables(output, plan, warn=False, skipped=skipped)
    tables = write_tables(output, plan, skipped=skipped)
    logger.info("study written to %s", output)
    return tables


def _unavailable(rows: Sequence[str], plan: StudyPlan) -> dict[str, str]:
    """Row -> why it cannot run here, for the external rows among ``rows`` whose package is missing (logged)."""
    skipped = {}
    for row in rows:
        if plan.is_external(row) and (reason := unavailable_reason()) is not None:
            logger.warning("row %s is skipped (the tables say so): %s", row, reason)
            skipped[row] = reason
    return skipped
