"""Running the study: its data, each row trained and evaluated, the per-row record, resuming.

``output_dir`` is bound to its data (``study.json``); a row is finished when its ``done.json`` (written last)
holds this plan's settings, and is otherwise redone from the start.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from monai.bundle import ConfigWorkflow

from scripts.atomic_io import write_atomically
from scripts.cli import LOGGING_FILE
from scripts.data.synthetic import ensure_dataset
from scripts.networks import EncoderProvenance, count_parameters, recorded_encoder

from .plan import BUNDLE_ROOT, CONFIG_DIR, StudyPlan

__all__ = [
    "bind_output_dir",
    "dataset_seed",
    "finished_record",
    "fresh_row_dir",
    "prepare_data",
    "run_row",
    "scored_summary",
    "train_row",
    "write_done",
]

logger = logging.getLogger(__name__)

META_FILE = CONFIG_DIR / "metadata.json"
STUDY_VERSION = 1
MODEL_FILE = Path("models") / "model.pt"


# --------------------------------------------------------------------------------------------------------
# data


def dataset_seed(seed: int, centre: str) -> int:
    """Seed of a centre's synthetic dataset: distinct per centre, so no phantom of one is in another."""
    return int(np.random.SeedSequence([int(seed), *str(centre).encode()]).generate_state(1)[0])


def _study_record(plan: StudyPlan) -> dict[str, Any]:
    """What ``output_dir`` is bound to: the data (cases, centres, seeds)."""
    return {
        "version": STUDY_VERSION,
        "train_centre": plan.config.train_centre,
        "test_centres": list(plan.config.test_centres),
        "cases": {c: plan.budget.cases[c] for c in plan.config.centres},
        "seed": plan.seed,
        "dataset_seeds": {c: dataset_seed(plan.seed, c) for c in plan.config.centres},
    }


def bind_output_dir(output_dir: Path, plan: StudyPlan, write: bool) -> None:
    """Refuse an ``output_dir`` made for other data; write ``study.json`` when ``write``.

    Args:
        output_dir: the study folder.
        plan: the study's plan (budget cases, seed and dataset seeds are what binds the folder).
        write: write ``study.json`` when the folder has none yet.

    Raises:
        ValueError: ``output_dir/study.json`` records other data.
    """
    record = _study_record(plan)
    path = output_dir / "study.json"
    if path.is_file():
        existing = json.loads(path.read_text())
        differ = sorted(k for k in record if existing.get(k) != record[k])
        if differ:
            raise ValueError(
                f"{output_dir} holds a study of other data ({', '.join(differ)} differ: there "
                f"{ {k: existing.get(k) for k in differ} }, now { {k: record[k] for k in differ} }). "
                "Use another output_dir, or the same budget and seed."
            )
    elif write:
        write_atomically(path, json.dumps(record, indent=2) + "\n")


def prepare_data(output_dir: Path, plan: StudyPlan) -> dict[str, Path]:
    """Generate (once) every centre's dataset under ``output_dir/data/<centre>``.

    Args:
        output_dir: the study folder.
        plan: the study's plan (centres, their case counts and the seed).

    Returns:
        centre -> dataset folder (``dataset.json`` + NIfTI).
    """
    folders: dict[str, Path] = {}
    for centre in plan.config.centres:
        folder = output_dir / "data" / centre
        ensure_dataset(str(folder), plan.budget.cases[centre], dataset_seed(plan.seed, centre), centre)
        folders[centre] = folder
    return folders


def _test_cases(dataset_dir: Path) -> int:
    return len(json.loads((dataset_dir / "dataset.json").read_text()).get("test", []))


# --------------------------------------------------------------------------------------------------------
# one row


def _workflow(
    config_files: Sequence[Path], workflow_type: str, settings: Mapping[str, Any], **study_keys: Any
) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=[str(f) for f in config_files],
        meta_file=str(META_FILE),
        logging_file=str(LOGGING_FILE),
        workflow_type=workflow_type,
        **{**settings, **{k: str(v) for k, v in study_keys.items()}},
    )


def train_row(
    row_dir: Path,
    config_files: Sequence[Path],
    settings: Mapping[str, Any],
    dataset_dir: Path,
    cache_dir: Path,
) -> dict[str, Any]:
    """Train one row with ``bundle_root=row_dir``; returns ``train_seconds`` and ``trainable_params``."""
    start = time.perf_counter()
    workflow = _workflow(
        config_files,
        "train",
        settings,
        bundle_root=row_dir,
        dataset_dir=dataset_dir,
        embedding_cache_dir=cache_dir,
    )
    workflow.initialize()
    params = count_parameters(workflow.parser.get_parsed_content("network_def"))["total"]
    workflow.run()
    workflow.finalize()
    seconds = time.perf_counter() - start
    del workflow
    gc.collect()
    return {"train_seconds": seconds, "trainable_params": int(params)}


def evaluate_row(
    row_dir: Path,
    config_files: Sequence[Path],
    settings: Mapping[str, Any],
    dataset_dir: Path,
    cache_dir: Path,
    centre: str,
) -> dict[str, Any]:
    """Score ``row_dir``'s model on ``dataset_dir``'s test split; returns its summary, n and seconds.

    Raises:
        RuntimeError: the evaluation scored another number of cases than the test split holds.
    """
    eval_dir = row_dir / f"eval_{centre}"
    start = time.perf_counter()
    workflow = _workflow(
        config_files,
        "eval",
        settings,
        bundle_root=row_dir,
        dataset_dir=dataset_dir,
        embedding_cache_dir=cache_dir,
        eval_split="test",
        eval_dir=eval_dir,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    seconds = time.perf_counter() - start
    del workflow
    gc.collect()
    return scored_summary(eval_dir, dataset_dir, seconds)


def scored_summary(eval_dir: Path, dataset_dir: Path, seconds: float) -> dict[str, Any]:
    """``eval_dir/summary.json`` with its n and seconds, once n is checked to be the test split's size.

    Args:
        eval_dir: an evaluation's folder (``summary.json``).
        dataset_dir: the dataset it scored (``dataset.json``'s test split).
        seconds: how long the evaluation took.

    Returns:
        ``{"n_cases", "eval_seconds", "summary"}``.

    Raises:
        RuntimeError: another number of cases was scored than ``dataset_dir``'s test split holds.
    """
    summary = json.loads((eval_dir / "summary.json").read_text())
    expected = _test_cases(dataset_dir)
    if summary["n_cases"] != expected:
        raise RuntimeError(
            f"{eval_dir}: {summary['n_cases']} cases scored, but {dataset_dir}'s test split has {expected}."
        )
    return {"n_cases": int(summary["n_cases"]), "eval_seconds": seconds, "summary": summary}


def _checkpoint_encoder(model_path: Path) -> dict[str, Any] | None:
    """The encoder a checkpoint was trained with, as its state dict records it (None: plain U-Net)."""
    if not model_path.is_file():
        raise RuntimeError(f"{model_path}: training wrote no model (no validation ran?).")
    record = recorded_encoder(model_path)
    if record is None:
        return None
    provenance = EncoderProvenance(source=str(record["source"]), sha256=str(record["sha256"]))
    return {"source": provenance.source, "sha256": provenance.sha256, "is_random": provenance.is_random}


def _names(files: Sequence[Path]) -> list[str]:
    """Config files as ``done.json`` records them: relative to the bundle root."""
    return [str(f.relative_to(BUNDLE_ROOT)) for f in files]


def _config_hashes(files: Sequence[Path]) -> dict[str, str]:
    return {
        name: hashlib.sha256(f.read_bytes()).hexdigest()[:16]
        for name, f in zip(_names(files), files, strict=True)
    }


def fresh_row_dir(output_dir: Path, row: str) -> Path:
    """``rows/<row>/``, emptied: an unfinished (or outdated) run of the row is deleted, never continued.

    Args:
        output_dir: the study folder.
        row: the row's name.

    Returns:
        the new, empty ``output_dir/rows/<row>``.
    """
    row_dir = output_dir / "rows" / row
    if row_dir.exists():
        logger.info("row %s: removing its unfinished (or outdated) run in %s; redoing it", row, row_dir)
        shutil.rmtree(row_dir)
    row_dir.mkdir(parents=True)
    return row_dir


def write_done(
    row_dir: Path,
    plan: StudyPlan,
    row: str,
    encoder: Mapping[str, Any] | None,
    trained: Mapping[str, Any],
    centres: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Write the row's ``done.json`` (last, atomically), which :func:`finished_record` and the tables read.

    Args:
        row_dir: the row's folder.
        plan: the study's plan (the row's budget, seed, settings and config files are recorded).
        row: the row's name.
        encoder: the encoder read back from the scored checkpoint (None: no encoder).
        trained: ``train_seconds`` and ``trainable_params`` (None where unknown).
        centres: test centre -> ``n_cases``, ``eval_seconds`` and ``summary``.

    Returns:
        the record written.
    """
    files = plan.row_config_files(row)
    record = {
        "version": STUDY_VERSION,
        "row": row,
        "budget": plan.budget.name,
        "seed": plan.seed,
        "settings": plan.settings[row],
        "config_files": _names(files),
        "config_sha256": _config_hashes(files),
        "encoder": encoder,
        **trained,
        "eval_seconds": sum(c["eval_seconds"] for c in centres.values()),
        "centres": dict(centres),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_atomically(row_dir / "done.json", json.dumps(record, indent=2) + "\n")
    return record


def run_row(
    output_dir: Path,
    plan: StudyPlan,
    row: str,
    datasets: Mapping[str, Path],
    expected_encoder: EncoderProvenance | None,
) -> dict[str, Any]:
    """Train a row of ``train.yaml`` with overrides on the training centre, evaluate it on every test centre.

    Args:
        output_dir: the study folder.
        plan: the study's plan.
        row: the row's name.
        datasets: centre -> dataset folder, as :func:`prepare_data` made.
        expected_encoder: the encoder :func:`scripts.study.plan.check_encoders` loaded for the row (None: no
            encoder); the trained checkpoint must record the same one.

    Returns:
        the row's ``done.json`` record.

    Raises:
        RuntimeError: the checkpoint's encoder is not the expected one, or too few cases were scored.
    """
    row_dir = fresh_row_dir(output_dir, row)
    cache_dir = output_dir / "embedding_cache"
    settings = plan.settings[row]
    files = plan.train_files(row)
    logger.info(
        "row %s: training on centre %s (%s + %s)", row, plan.config.train_centre, _names(files), settings
    )
    trained = train_row(row_dir, files, settings, datasets[plan.config.train_centre], cache_dir)
    logger.info("row %s: trained in %.0f s", row, trained["train_seconds"])

    encoder = _checkpoint_encoder(row_dir / MODEL_FILE)
    if (encoder is None) != (expected_encoder is None) or (
        encoder is not None and expected_encoder is not None and encoder["sha256"] != expected_encoder.sha256
    ):
        raise RuntimeError(
            f"row {row}: the checkpoint's encoder {encoder} is not the one checked before training "
            f"{expected_encoder}."
        )

    centres: dict[str, Any] = {}
    for centre in plan.config.test_centres:
        logger.info("row %s: evaluating on the test split of centre %s", row, centre)
        centres[centre] = evaluate_row(
            row_dir, plan.evaluate_files(row), settings, datasets[centre], cache_dir, centre
        )
        aneurysm = centres[centre]["summary"]["classes"]["aneurysm"]["dice"]
        logger.info(
            "row %s, centre %s: aneurysm Dice %.3f ± %.3f over %d cases (%.0f s)",
            row,
            centre,
            aneurysm["mean"],
            aneurysm["std"],
            centres[centre]["n_cases"],
            centres[centre]["eval_seconds"],
        )
    return write_done(row_dir, plan, row, encoder, trained, centres)


def finished_record(output_dir: Path, plan: StudyPlan, row: str, warn: bool = True) -> dict[str, Any] | None:
    """The row's ``done.json`` when it was made with this plan's settings, else None.

    Args:
        output_dir: the study folder.
        plan: the study's plan; budget, seed, settings, config files and test centres must match.
        row: the row's name.
        warn: log why a finished row does not count, or that its config files changed. Default True.

    Returns:
        the ``done.json`` record, or None (not finished, unreadable, or other settings).
    """
    path = output_dir / "rows" / row / "done.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("%s cannot be read (%s): the row counts as not run", path, error)
        return None
    same = (
        record.get("version") == STUDY_VERSION
        and record.get("budget") == plan.budget.name
        and record.get("seed") == plan.seed
        and record.get("settings") == plan.settings[row]
        and record.get("config_files") == _names(plan.row_config_files(row))
        and set(record.get("centres", {})) == set(plan.config.test_centres)
    )
    if not same:
        if not warn:
            return None
        logger.warning(
            "row %s was finished with other settings (%s; now %s): it counts as not run until it is rerun",
            row,
            {k: record.get(k) for k in ("budget", "seed", "settings")},
            {"budget": plan.budget.name, "seed": plan.seed, "settings": plan.settings[row]},
        )
        return None
    changed = {
        name
        for name, digest in _config_hashes(plan.row_config_files(row)).items()
        if record.get("config_sha256", {}).get(name) != digest
    }
    if changed and warn:
        logger.warning(
            "row %s was trained before %s changed; its results are kept (delete %s to redo it)",
            row,
            sorted(changed),
            path.parent,
        )
    return record
