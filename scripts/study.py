"""The paper's ablation and cross-centre tables, on the same data for every row, with one command.

Run from the bundle root (or with it on ``PYTHONPATH``)::

    python -m scripts.study --output_dir runs/study --budget cpu
    python -m scripts.study --output_dir runs/study --budget cpu --rows plain_unet,random_features
    python -m scripts.study --output_dir runs/study --budget full --dino_model /weights/dinov3-vits16 \
        --dinov2_model /weights/dinov2-small

Rows (what each table line changes) and budgets (data size and schedule) are data in
``configs/study.yaml``. For every selected row the study trains ``configs/train.yaml`` on the training
centre (A) and evaluates the best checkpoint (best validation Dice on A's validation split) with
``configs/evaluate.yaml`` on the test split of every test centre (A, B, C), each through
``monai.bundle.ConfigWorkflow`` exactly as the bundle's own commands do. Each workflow gets, later ones
winning: the budget's ``config``, ``dino_model`` and ``seed`` from the command, ``overrides``, the row's
own overrides; then the study's own keys (data location, scored split, output folders), which nothing
else may set.

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
    results.csv                    one line per (row, centre)
    ablation.md, cross_centre.md   the paper's two tables, rebuilt from every finished row

Resume: rerun the same command. Finished rows (with ``done.json``) are skipped; an unfinished row's
folder is deleted and the row redone from the start.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.atomic_io import write_atomically
from scripts.data import get_centre
from scripts.metrics import FAILURE_DICE_THRESHOLD
from scripts.networks import DEFAULT_DINO_MODEL, EncoderProvenance, EncoderWeightsError, count_parameters
from scripts.networks import load_encoder as _load_encoder
from scripts.synthetic import ensure_dataset

__all__ = [
    "DEFAULT_DINOV2_MODEL",
    "Budget",
    "StudyConfig",
    "StudyPlan",
    "check_encoders",
    "dataset_seed",
    "evaluate_row",
    "load_study_config",
    "main",
    "plan_study",
    "train_row",
    "write_tables",
]

logger = logging.getLogger(__name__)

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = BUNDLE_ROOT / "configs"
STUDY_CONFIG = CONFIG_DIR / "study.yaml"
TRAIN_CONFIG = CONFIG_DIR / "train.yaml"
EVALUATE_CONFIG = CONFIG_DIR / "evaluate.yaml"
META_FILE = CONFIG_DIR / "metadata.json"
LOGGING_FILE = CONFIG_DIR / "logging.conf"

DEFAULT_DINOV2_MODEL = "facebook/dinov2-small"
STUDY_VERSION = 1
# "<name>" in a row or override is replaced by the command's argument ``name``.
_PLACEHOLDER = re.compile(r"^<(\w+)>$")
_ROW_NAME = re.compile(r"^[A-Za-z][\w-]*$")
# Keys only the study sets: where data come from, which split is scored, where results go, the seed.
RESERVED_KEYS = frozenset(
    {
        "bundle_root",
        "output_dir",
        "ckpt_dir",
        "dataset_dir",
        "synthetic_dir",
        "embedding_cache_dir",
        "eval_split",
        "eval_dir",
        "model_path",
        "resume_checkpoint",
        "seed",
    }
)
# Config sections that decide what is scored and how: not to be overridden by a budget, row or user.
RESERVED_SECTIONS = frozenset(
    {"datalist", "validate", "evaluate", "initialize", "run", "finalize", "training", "evaluating"}
)
MODEL_FILE = Path("models") / "model.pt"
ENCODER_STATE_KEY = "dino.encoder._extra_state"


# --------------------------------------------------------------------------------------------------------
# configs/study.yaml


@dataclass(frozen=True)
class Budget:
    """How much data and training one study gets.

    Args:
        name: its key in ``budgets``.
        cases: centre -> number of synthetic phantoms generated for it (>= 3).
        config: overrides of ``train.yaml``, for training and evaluation alike.
        config_files: override files stacked on ``train.yaml``, relative to the bundle root.
    """

    name: str
    cases: dict[str, int]
    config: dict[str, Any]
    config_files: tuple[str, ...] = ()

    def config_paths(self) -> list[Path]:
        return [BUNDLE_ROOT / f for f in self.config_files]


@dataclass(frozen=True)
class StudyConfig:
    """``configs/study.yaml``: centres, rows (name -> overrides), their labels, budgets."""

    train_centre: str
    test_centres: tuple[str, ...]
    rows: dict[str, dict[str, Any]]
    labels: dict[str, str]
    budgets: dict[str, Budget]

    @property
    def centres(self) -> list[str]:
        """Every centre with a dataset: the training centre first."""
        return list(dict.fromkeys([self.train_centre, *self.test_centres]))


def _check_keys(where: str, overrides: Mapping[str, Any]) -> None:
    """Refuse keys that only the study may set (see :data:`RESERVED_KEYS` and :data:`RESERVED_SECTIONS`)."""
    if not isinstance(overrides, Mapping):
        raise ValueError(f"{where} must be a mapping of config keys to values, got {overrides!r}.")
    for key in overrides:
        if not isinstance(key, str) or not key:
            raise ValueError(f"{where}: config keys must be non-empty strings, got {key!r}.")
        if key in RESERVED_KEYS or key.split("#")[0] in RESERVED_SECTIONS:
            raise ValueError(
                f"{where} sets {key!r}, which the study sets itself (data location, scored split, output "
                f"folders, seed; --seed sets the seed). Reserved: {sorted(RESERVED_KEYS)} and the sections "
                f"{sorted(RESERVED_SECTIONS)}."
            )


def load_study_config(path: str | Path = STUDY_CONFIG) -> StudyConfig:
    """Read and check ``configs/study.yaml`` (or another file of the same form).

    Raises:
        ValueError: naming the file and the entry that is missing or malformed.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read the study config ({error}).") from error
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level.")
    missing = {"train_centre", "test_centres", "rows", "budgets"} - set(raw)
    if missing:
        raise ValueError(f"{path}: missing {sorted(missing)}.")

    centres = [raw["train_centre"], *raw["test_centres"]]
    for centre in centres:
        get_centre(centre)  # raises for an unknown centre
    rows = raw["rows"]
    if not isinstance(rows, dict) or not rows:
        raise ValueError(f"{path}: 'rows' must map row names to config overrides.")
    for name, overrides in rows.items():
        if not isinstance(name, str) or not _ROW_NAME.match(name):
            raise ValueError(
                f"{path}: row name {name!r} must be a letter followed by letters, digits, _ or -."
            )
        _check_keys(f"{path}: row {name!r}", overrides or {})
    labels = {name: str((raw.get("labels") or {}).get(name, name)) for name in rows}

    budgets: dict[str, Budget] = {}
    for name, entry in (raw["budgets"] or {}).items():
        where = f"{path}: budget {name!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("cases"), dict):
            raise ValueError(f"{where} needs 'cases': centre -> number of phantoms.")
        cases = {str(c): n for c, n in entry["cases"].items()}
        for centre in dict.fromkeys(centres):
            n = cases.get(centre)
            if isinstance(n, bool) or not isinstance(n, int) or n < 3:
                raise ValueError(f"{where}: cases[{centre!r}] must be an integer >= 3, got {n!r}.")
        config = dict(entry.get("config") or {})
        _check_keys(where, config)
        files = tuple(str(f) for f in entry.get("config_files") or ())
        for file in files:
            if not (BUNDLE_ROOT / file).is_file():
                raise ValueError(f"{where}: config file {file!r} not found under {BUNDLE_ROOT}.")
        budgets[name] = Budget(name=name, cases=cases, config=config, config_files=files)
    if not budgets:
        raise ValueError(f"{path}: no budgets.")
    return StudyConfig(
        train_centre=str(raw["train_centre"]),
        test_centres=tuple(str(c) for c in raw["test_centres"]),
        rows={name: dict(overrides or {}) for name, overrides in rows.items()},
        labels=labels,
        budgets=budgets,
    )


# --------------------------------------------------------------------------------------------------------
# planning: every row's settings, before anything runs


@dataclass
class StudyPlan:
    """What one invocation does.

    Attributes:
        config: the study config.
        budget: the chosen budget.
        seed: training seed; the dataset seeds derive from it.
        selected: the rows to run (study.yaml order).
        settings: row -> its overrides for every workflow, for *all* rows (finished rows are reused only
            when theirs equal these).
        effective: row -> ``use_dino``, ``dino_model``, ``dino_config``, ``epochs``, ``val_interval`` as the
            bundle config resolves them.
    """

    config: StudyConfig
    budget: Budget
    seed: int
    selected: list[str]
    settings: dict[str, dict[str, Any]]
    effective: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def train_files(self) -> list[Path]:
        return [TRAIN_CONFIG, *self.budget.config_paths()]

    @property
    def evaluate_files(self) -> list[Path]:
        return [*self.train_files, EVALUATE_CONFIG]


def _parse_rows(rows: str | Sequence[str] | None, config: StudyConfig) -> list[str]:
    """``"a,b"`` (or what ``fire`` makes of it: a tuple), a list, or None (all rows) -> names in study order."""
    if rows is None:
        return list(config.rows)
    names = [r.strip() for r in rows.split(",")] if isinstance(rows, str) else [str(r).strip() for r in rows]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in config.rows]
    if unknown or not names:
        raise ValueError(f"rows must name rows of configs/study.yaml {list(config.rows)}, got {rows!r}.")
    return [n for n in config.rows if n in names]


def _substitute(value: Any, placeholders: Mapping[str, Any], where: str) -> Any:
    """Replace every string ``"<name>"`` (in nested dicts and lists too) by ``placeholders[name]``."""
    if isinstance(value, dict):
        return {k: _substitute(v, placeholders, where) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_substitute(v, placeholders, where) for v in value]
    if isinstance(value, str) and (match := _PLACEHOLDER.match(value)):
        if match.group(1) not in placeholders:
            raise ValueError(f"{where}: unknown placeholder {value!r}; known: {sorted(placeholders)}.")
        return placeholders[match.group(1)]
    return value


def _json_normal(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists), so settings compare with done.json."""
    return json.loads(json.dumps(value))


def _parse_overrides(overrides: Mapping[str, Any] | str | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, str):
        try:
            overrides = yaml.safe_load(overrides)
        except yaml.YAMLError as error:
            raise ValueError(f"overrides must be a mapping (JSON or YAML), got {overrides!r}.") from error
    if not isinstance(overrides, Mapping):
        raise ValueError(f"overrides must be a mapping of config keys to values, got {overrides!r}.")
    return dict(overrides)


def _effective_settings(config_files: Sequence[Path], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The values the bundle config resolves for the keys the study checks before running."""
    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    parser.update(dict(settings))
    keys = ("use_dino", "dino_model", "dino_config", "epochs", "val_interval")
    return {key: parser.get_parsed_content(key) for key in keys}


def plan_study(
    budget: str,
    rows: str | Sequence[str] | None = None,
    dino_model: str = DEFAULT_DINO_MODEL,
    dinov2_model: str = DEFAULT_DINOV2_MODEL,
    seed: int = 0,
    overrides: Mapping[str, Any] | str | None = None,
    config: StudyConfig | None = None,
) -> StudyPlan:
    """Resolve every row's settings and check them; nothing is loaded, generated or written.

    A row's settings are, later ones winning: the budget's ``config``; ``dino_model`` and ``seed`` from the
    arguments; ``overrides``; the row's own overrides. ``"<dino_model>"`` and ``"<dinov2_model>"`` anywhere
    in them stand for the arguments of those names.

    Raises:
        ValueError: an unknown budget or row, a reserved key in ``overrides``, an unknown placeholder, a
            negative seed, or a row whose ``val_interval`` exceeds ``epochs`` (it would never save a model).
    """
    config = config or load_study_config()
    if budget not in config.budgets:
        raise ValueError(f"budget must be one of {list(config.budgets)}, got {budget!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    user = _parse_overrides(overrides)
    _check_keys("overrides", user)
    chosen = config.budgets[budget]
    placeholders = {"dino_model": str(dino_model), "dinov2_model": str(dinov2_model)}
    plan = StudyPlan(config=config, budget=chosen, seed=seed, selected=_parse_rows(rows, config), settings={})
    for row, row_overrides in config.rows.items():
        merged = {**chosen.config, "dino_model": dino_model, **user, **row_overrides, "seed": seed}
        plan.settings[row] = _json_normal(_substitute(merged, placeholders, f"row {row!r}"))
    for row in plan.selected:
        effective = _effective_settings(plan.train_files, plan.settings[row])
        if effective["val_interval"] > effective["epochs"]:
            raise ValueError(
                f"row {row!r}: val_interval {effective['val_interval']} > epochs {effective['epochs']}: "
                "training would never validate, so no model would be selected."
            )
        plan.effective[row] = effective
    return plan


# --------------------------------------------------------------------------------------------------------
# encoders and data


def check_encoders(plan: StudyPlan, rows: Sequence[str]) -> dict[str, EncoderProvenance | None]:
    """Load every encoder ``rows`` need (each distinct one once); return row -> provenance (None: no encoder).

    Raises:
        EncoderWeightsError: an encoder cannot be loaded; the message names the rows that need it, the
            loader's explanation of how to get the weights, and how to leave those rows out.
    """
    needed: dict[str, list[str]] = {}
    for row in rows:
        if plan.effective[row]["use_dino"]:
            key = json.dumps([plan.effective[row]["dino_model"], plan.effective[row]["dino_config"]])
            needed.setdefault(key, []).append(row)
    loaded: dict[str, EncoderProvenance] = {}
    for key, users in needed.items():
        dino_model, dino_config = json.loads(key)
        try:
            loaded[key] = _load_encoder(dino_model, dino_config=dino_config).provenance
        except EncoderWeightsError as error:
            others = [r for r in plan.selected if r not in users]
            leave_out = f"--rows {','.join(others)}" if others else "a --rows list without them"
            raise EncoderWeightsError(
                f"Row(s) {users} need the encoder weights dino_model={dino_model!r}, which cannot be loaded; "
                f"nothing was trained. To run the other rows only, pass {leave_out}.\n{error}"
            ) from error
        gc.collect()
        logger.info(
            "encoder %s for %s: %s (sha256 %s...)",
            dino_model,
            users,
            "RANDOM weights" if loaded[key].is_random else "pretrained weights",
            loaded[key].sha256[:12],
        )
    return {
        row: loaded[json.dumps([plan.effective[row]["dino_model"], plan.effective[row]["dino_config"]])]
        if plan.effective[row]["use_dino"]
        else None
        for row in rows
    }


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


def _bind_output_dir(output_dir: Path, plan: StudyPlan, write: bool) -> None:
    """Refuse an ``output_dir`` made for other data; write ``study.json`` when ``write``."""
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


def _prepare_data(output_dir: Path, plan: StudyPlan) -> dict[str, Path]:
    """Generate (once) every centre's dataset; returns centre -> dataset folder."""
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
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    extra = state.get(ENCODER_STATE_KEY)
    if extra is None:
        return None
    provenance = EncoderProvenance(source=str(extra["source"]), sha256=str(extra["sha256"]))
    return {"source": provenance.source, "sha256": provenance.sha256, "is_random": provenance.is_random}


def _config_hashes(files: Sequence[Path]) -> dict[str, str]:
    return {str(f.relative_to(BUNDLE_ROOT)): hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files}


def _run_row(
    output_dir: Path,
    plan: StudyPlan,
    row: str,
    datasets: Mapping[str, Path],
    expected_encoder: EncoderProvenance | None,
) -> dict[str, Any]:
    row_dir = output_dir / "rows" / row
    cache_dir = output_dir / "embedding_cache"
    if row_dir.exists():
        logger.info("row %s: removing its unfinished (or outdated) run in %s; redoing it", row, row_dir)
        shutil.rmtree(row_dir)
    row_dir.mkdir(parents=True)
    settings = plan.settings[row]
    logger.info("row %s: training on centre %s (%s)", row, plan.config.train_centre, settings)
    trained = train_row(row_dir, plan.train_files, settings, datasets[plan.config.train_centre], cache_dir)
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
            row_dir, plan.evaluate_files, settings, datasets[centre], cache_dir, centre
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
    record = {
        "version": STUDY_VERSION,
        "row": row,
        "budget": plan.budget.name,
        "seed": plan.seed,
        "settings": settings,
        "config_files": [str(f.relative_to(BUNDLE_ROOT)) for f in plan.evaluate_files],
        "config_sha256": _config_hashes(plan.evaluate_files),
        "encoder": encoder,
        **trained,
        "eval_seconds": sum(c["eval_seconds"] for c in centres.values()),
        "centres": centres,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_atomically(row_dir / "done.json", json.dumps(record, indent=2) + "\n")
    return record


def _finished(output_dir: Path, plan: StudyPlan, row: str, warn: bool = True) -> dict[str, Any] | None:
    """The row's ``done.json`` when it was made with this plan's settings, else None (``warn``: say why)."""
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
        and record.get("config_files") == [str(f.relative_to(BUNDLE_ROOT)) for f in plan.evaluate_files]
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
        for name, digest in _config_hashes(plan.evaluate_files).items()
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


# --------------------------------------------------------------------------------------------------------
# tables


def _finite(value: Any, what: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} = {value!r} is not a finite number.")
    return number


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _mean_std(stats: Mapping[str, Any], digits: int) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _label(plan: StudyPlan, row: str, record: Mapping[str, Any] | None) -> str:
    random = record is not None and record["encoder"] is not None and record["encoder"]["is_random"]
    return plan.config.labels[row] + (" †" if random else "")


CSV_COLUMNS = [
    "row",
    "label",
    "centre",
    "in_centre",
    "encoder_source",
    "encoder_sha256",
    "encoder_is_random",
    "n_cases",
    "aneurysm_dice_mean",
    "aneurysm_dice_std",
    "aneurysm_hd95_mean",
    "aneurysm_hd95_std",
    "vessel_dice_mean",
    "vessel_dice_std",
    "vessel_hd95_mean",
    "vessel_hd95_std",
    "failures_k",
    "failure_rate",
    "detection_sensitivity",
    "detection_fp_per_case",
    "train_seconds",
    "eval_seconds",
    "trainable_params",
    "budget",
    "seed",
]


def _csv_lines(plan: StudyPlan, row: str, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    lines = []
    encoder = record["encoder"]
    for centre in plan.config.test_centres:
        result = record["centres"][centre]
        summary = result["summary"]
        line: dict[str, Any] = {
            "row": row,
            "label": plan.config.labels[row],
            "centre": centre,
            "in_centre": centre == plan.config.train_centre,
            "encoder_source": encoder["source"] if encoder else "none",
            "encoder_sha256": encoder["sha256"] if encoder else "",
            "encoder_is_random": bool(encoder and encoder["is_random"]),
            "n_cases": result["n_cases"],
        }
        for name in ("aneurysm", "vessel"):
            for metric in ("dice", "hd95"):
                stats = summary["classes"][name][metric]
                for part in ("mean", "std"):
                    what = f"{row}/{centre} {name} {metric} {part}"
                    line[f"{name}_{metric}_{part}"] = round(_finite(stats[part], what), 6)
        line["failures_k"] = summary["failure"]["k"]
        line["failure_rate"] = round(_finite(summary["failure"]["rate"], "failure rate"), 6)
        detection = summary["detection"] or {}
        sensitivity = detection.get("sensitivity")
        # no true aneurysm among the test cases: no sensitivity (empty, never NaN)
        line["detection_sensitivity"] = "" if sensitivity is None else round(float(sensitivity), 6)
        line["detection_fp_per_case"] = round(float(detection.get("false_positives_per_case", 0.0)), 6)
        line["train_seconds"] = round(record["train_seconds"], 1)
        line["eval_seconds"] = round(result["eval_seconds"], 1)
        line["trainable_params"] = record["trainable_params"]
        line["budget"] = record["budget"]
        line["seed"] = record["seed"]
        lines.append(line)
    return lines


def _notes(plan: StudyPlan, done: Mapping[str, Mapping[str, Any]], centres: Sequence[str]) -> list[str]:
    """What every table says under it."""
    seeds = ", ".join(f"{c} {dataset_seed(plan.seed, c)}" for c in plan.config.centres)
    cases = ", ".join(f"{c} {plan.budget.cases[c]}" for c in plan.config.centres)
    n = {c: sorted({r["centres"][c]["n_cases"] for r in done.values()}) for c in centres}
    n_text = ", ".join(f"{c}: {'/'.join(map(str, v)) or '-'}" for c, v in n.items())
    penalties = sorted({r["centres"][c]["summary"]["penalty_mm"] for r in done.values() for c in centres})
    penalty = "/".join(f"{p:g}" for p in penalties) if penalties else "the penalty"
    lines = [
        f"Budget `{plan.budget.name}` (phantoms generated per centre: {cases}), seed {plan.seed} "
        f"(dataset seeds: {seeds}); every row trained on the same {plan.config.train_centre} training split "
        f"with the same seed.",
        f"Each mean ± std (population std) is over the n test cases of a centre ({n_text}), the same cases "
        "for every row, scored in each case's own geometry and spacing; the model scored is each row's "
        f"checkpoint with the best mean validation Dice on {plan.config.train_centre}'s validation split, "
        "so test cases never train or select a model.",
        f"A missed or spurious structure scores Dice 0 and HD95 = {penalty} mm (never skipped). Failure: "
        f"aneurysm Dice < {FAILURE_DICE_THRESHOLD:g}, k of n cases.",
    ]
    random = [r for r, rec in done.items() if rec["encoder"] and rec["encoder"]["is_random"]]
    if random:
        lines.append(
            "† RANDOM frozen encoder weights, no pretrained semantics: "
            + ", ".join(f"{plan.config.labels[r]} (`{done[r]['encoder']['source']}`)" for r in random)
            + "."
        )
    else:
        lines.append("No row used random encoder weights.")
    encoders = [
        f"{plan.config.labels[r]}: `{rec['encoder']['source']}` (sha256 {rec['encoder']['sha256'][:12]}…)"
        for r, rec in done.items()
        if rec["encoder"]
    ]
    if encoders:
        lines.append("Encoders: " + "; ".join(encoders) + ".")
    return lines


def _ablation_table(plan: StudyPlan, done: Mapping[str, Mapping[str, Any]]) -> str:
    centre = plan.config.train_centre
    lines = [
        f"# Ablation (trained and tested on centre {centre})",
        "",
        "| Method | Aneurysm Dice | Aneurysm HD95 (mm) | Vessel Dice | Failures | Train time |",
        "|---|---|---|---|---|---|",
    ]
    for row in plan.config.rows:
        record = done.get(row)
        if record is None:
            lines.append(f"| {plan.config.labels[row]} | not run | | | | |")
            continue
        summary = record["centres"][centre]["summary"]
        aneurysm, vessel = summary["classes"]["aneurysm"], summary["classes"]["vessel"]
        cells = [
            _label(plan, row, record),
            _mean_std(aneurysm["dice"], 3),
            _mean_std(aneurysm["hd95"], 2),
            _mean_std(vessel["dice"], 3),
            f"{summary['failure']['k']}/{summary['failure']['n']}",
            _duration(record["train_seconds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *_notes(plan, done, [centre])]) + "\n"


def _cross_centre_table(plan: StudyPlan, done: Mapping[str, Mapping[str, Any]]) -> str:
    centres = plan.config.test_centres
    unseen = [c for c in centres if c != plan.config.train_centre]
    lines = [
        f"# Cross-centre (trained on centre {plan.config.train_centre}; "
        f"{', '.join(unseen) or 'no other centre'} unseen, no fine-tuning)",
        "",
        "| Method | " + " | ".join(f"{c} aneurysm Dice | {c} failures" for c in centres) + " |",
        "|---|" + "---|---|" * len(centres),
    ]
    for row in plan.config.rows:
        record = done.get(row)
        if record is None:
            lines.append(f"| {plan.config.labels[row]} | not run |" + " |" * (2 * len(centres) - 1))
            continue
        cells = [_label(plan, row, record)]
        for centre in centres:
            summary = record["centres"][centre]["summary"]
            cells += [
                _mean_std(summary["classes"]["aneurysm"]["dice"], 3),
                f"{summary['failure']['k']}/{summary['failure']['n']}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *_notes(plan, done, centres)]) + "\n"


def write_tables(output_dir: str | Path, plan: StudyPlan, warn: bool = True) -> str:
    """Rebuild ``results.csv``, ``ablation.md`` and ``cross_centre.md`` from every finished row.

    Rows without a ``done.json`` made with this plan's settings appear as "not run" (and not in the CSV);
    ``warn`` logs why a finished row does not count.

    Returns:
        both tables, as written.
    """
    output_dir = Path(output_dir)
    done = {
        row: rec for row in plan.config.rows if (rec := _finished(output_dir, plan, row, warn)) is not None
    }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row, record in done.items():
        writer.writerows(_csv_lines(plan, row, record))
    ablation, cross_centre = _ablation_table(plan, done), _cross_centre_table(plan, done)
    write_atomically(output_dir / "results.csv", buffer.getvalue())
    write_atomically(output_dir / "ablation.md", ablation)
    write_atomically(output_dir / "cross_centre.md", cross_centre)
    logger.info("tables of %d finished row(s) written to %s", len(done), output_dir)
    return ablation + "\n" + cross_centre


# --------------------------------------------------------------------------------------------------------
# command


def main(
    output_dir: str,
    budget: str = "cpu",
    rows: str | Sequence[str] | None = None,
    dino_model: str = DEFAULT_DINO_MODEL,
    dinov2_model: str = DEFAULT_DINOV2_MODEL,
    seed: int = 0,
    overrides: Mapping[str, Any] | str | None = None,
) -> str:
    """Train and evaluate the selected rows of ``configs/study.yaml``, then write the tables.

    Args:
        output_dir: the study folder (see the module docstring); rerun with the same one to resume.
        budget: a budget of ``configs/study.yaml``: ``micro`` (tests), ``cpu`` (well under an hour on a 2-core
            CPU), ``full`` (the paper's GPU schedule). Default ``cpu``.
        rows: rows to run, comma-separated or a list; default all. Finished rows that are not selected
            still appear in the tables.
        dino_model: encoder weights of every row that does not name its own (hub id, local folder, Meta
            ``.pth``, or ``random[:SEED]``); ``<dino_model>`` in study.yaml. Default DINOv3 ViT-S/16.
        dinov2_model: ``<dinov2_model>`` in study.yaml (the DINOv2-small row). Default
            ``facebook/dinov2-small``.
        seed: training seed of every row; the dataset seeds derive from it. Default 0.
        overrides: config overrides for every workflow of every row (a mapping, or JSON/YAML text), above
            the budget and ``dino_model`` and below the row's own.

    Returns:
        the two tables (Markdown), as written to ``ablation.md`` and ``cross_centre.md``.

    Raises:
        ValueError: bad arguments, or an ``output_dir`` made with other data.
        EncoderWeightsError: an encoder a row to run needs cannot be loaded (before anything is trained).
    """
    plan = plan_study(budget, rows, dino_model, dinov2_model, seed, overrides)
    output = Path(output_dir).expanduser().resolve()
    _bind_output_dir(output, plan, write=False)
    finished = {row: _finished(output, plan, row) is not None for row in plan.selected}
    to_run = [row for row in plan.selected if not finished[row]]
    encoders = check_encoders(plan, to_run)

    output.mkdir(parents=True, exist_ok=True)
    _bind_output_dir(output, plan, write=True)
    datasets = _prepare_data(output, plan)
    for index, row in enumerate(plan.selected, start=1):
        if finished[row]:
            logger.info("row %d/%d %s: finished earlier, skipped", index, len(plan.selected), row)
            continue
        logger.info("row %d/%d %s", index, len(plan.selected), row)
        _run_row(output, plan, row, datasets, encoders[row])
        write_tables(output, plan, warn=False)
    tables = write_tables(output, plan)
    logger.info("study written to %s", output)
    return tables


if __name__ == "__main__":
    import logging.config

    import fire

    logging.config.fileConfig(LOGGING_FILE, disable_existing_loggers=False)
    fire.Fire(main)
