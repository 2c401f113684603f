"""The study's plan: ``configs/study.yaml`` read and checked, every row's config files and overrides, encoders loaded.

A row of the paper's ablation is an override file stacked on ``configs/train.yaml`` (``configs/ablation/``);
:func:`plan_study` gives each row its files and the overrides of the command and the budget, less the keys
the row's file sets. Nothing here trains, generates or writes; :func:`plan_study` and :func:`check_encoders`
run before anything does, so a bad argument or missing encoder weights stop the study first.
"""

from __future__ import annotations

import gc
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from monai.bundle import ConfigParser

from scripts.data import get_centre
from scripts.networks import DEFAULT_DINO_MODEL, EncoderProvenance, EncoderWeightsError
from scripts.networks import load_encoder as _load_encoder

__all__ = [
    "BUNDLE_ROOT",
    "CONFIG_DIR",
    "DEFAULT_DINOV2_MODEL",
    "STUDY_KEYS",
    "StudyPlan",
    "check_encoders",
    "load_study_config",
    "plan_study",
]

logger = logging.getLogger(__name__)

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = BUNDLE_ROOT / "configs"
STUDY_CONFIG = CONFIG_DIR / "study.yaml"
TRAIN_CONFIG = CONFIG_DIR / "train.yaml"
EVALUATE_CONFIG = CONFIG_DIR / "evaluate.yaml"

# The encoder configs/ablation/dinov2_small.yaml names; the command's --dinov2_model replaces it.
DEFAULT_DINOV2_MODEL = "facebook/dinov2-small"
_ROW_NAME = re.compile(r"^[A-Za-z][\w-]*$")
# Top-level config names the study sets itself (where data come from, which split is scored, where results
# go, the seed) or that decide what is scored: no budget, row file or --overrides may set them, nor anything
# under them (``validate#dataset#data#key``).
STUDY_KEYS = frozenset(
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
        "datalist",
        "validate",
        "evaluate",
        "initialize",
        "run",
        "finalize",
        "training",
        "evaluating",
    }
)
# Rows ``external_rows`` of study.yaml may name: another method than train.yaml, each run by its own module
# on the same data and scored the same way. nnunet: nnU-Net v2 (:mod:`scripts.study.nnunet`).
EXTERNAL_ROWS = ("nnunet",)


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
        nnunet_minutes: wall clock of the ``nnunet`` row (preprocessing and training), None without that row.
    """

    name: str
    cases: dict[str, int]
    config: dict[str, Any]
    config_files: tuple[str, ...] = ()
    nnunet_minutes: float | None = None

    def config_paths(self) -> list[Path]:
        return [BUNDLE_ROOT / f for f in self.config_files]


@dataclass(frozen=True)
class StudyConfig:
    """``configs/study.yaml``: centres, rows (name -> override file), external rows, their labels, budgets.

    Attributes:
        rows: the rows that are ``train.yaml`` with an override file: name -> the file (under the bundle root).
        external_rows: the rows that are another method (names of :data:`EXTERNAL_ROWS`), after ``rows``
            in the tables.
    """

    train_centre: str
    test_centres: tuple[str, ...]
    rows: dict[str, Path]
    labels: dict[str, str]
    budgets: dict[str, Budget]
    external_rows: tuple[str, ...] = ()

    @property
    def centres(self) -> list[str]:
        """Every centre with a dataset: the training centre first."""
        return list(dict.fromkeys([self.train_centre, *self.test_centres]))

    @property
    def all_rows(self) -> list[str]:
        """Every row in table order: ``rows``, then ``external_rows``."""
        return [*self.rows, *self.external_rows]


def _check_keys(where: str, overrides: Mapping[str, Any]) -> None:
    """Refuse keys that only the study may set (:data:`STUDY_KEYS`, or a key under one of them)."""
    if not isinstance(overrides, Mapping):
        raise ValueError(f"{where} must be a mapping of config keys to values, got {overrides!r}.")
    for key in overrides:
        if not isinstance(key, str) or not key:
            raise ValueError(f"{where}: config keys must be non-empty strings, got {key!r}.")
        if key.split("#")[0] in STUDY_KEYS:
            raise ValueError(
                f"{where} sets {key!r}, which the study sets itself (data location, scored split, output "
                f"folders, seed; --seed sets the seed). The study's own keys: {sorted(STUDY_KEYS)}."
            )


def _read_row_file(path: Path) -> dict[str, Any]:
    """A row's override file as the bundle reads it (``ConfigParser.load_config_file``), checked.

    Raises:
        ValueError: naming the file, when it cannot be read, is not a mapping or sets a key of :data:`STUDY_KEYS`.
    """
    try:
        content = ConfigParser.load_config_file(path)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read the row's override file ({error}).") from error
    _check_keys(str(path), content)
    return dict(content)


def _rows(path: Path, rows: Any) -> dict[str, Path]:
    """Check ``rows`` (name -> override file relative to the bundle root); returns name -> absolute file."""
    if not isinstance(rows, dict) or not rows:
        raise ValueError(f"{path}: 'rows' must map row names to override files (configs/ablation/...).")
    files: dict[str, Path] = {}
    for name, file in rows.items():
        if not isinstance(name, str) or not _ROW_NAME.match(name):
            raise ValueError(
                f"{path}: row name {name!r} must be a letter followed by letters, digits, _ or -."
            )
        files[name] = (BUNDLE_ROOT / str(file)).resolve()
        if (
            not isinstance(file, str)
            or not files[name].is_file()
            or not files[name].is_relative_to(BUNDLE_ROOT)
        ):
            raise ValueError(f"{path}: row {name!r}: override file {file!r} not found under {BUNDLE_ROOT}.")
        _read_row_file(files[name])
    return files


def _budget(path: Path, name: str, entry: Any, centres: Sequence[str], external: Sequence[str]) -> Budget:
    """Check one entry of ``budgets``.

    Raises:
        ValueError: naming the file, the budget and the entry that is missing or malformed.
    """
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
    minutes = entry.get("nnunet_minutes")
    if "nnunet" in external and (
        isinstance(minutes, bool) or not isinstance(minutes, int | float) or not minutes > 0
    ):
        raise ValueError(
            f"{where}: nnunet_minutes (the nnunet row's wall clock) must be > 0, got {minutes!r}."
        )
    return Budget(
        name=name,
        cases=cases,
        config=config,
        config_files=files,
        nnunet_minutes=float(minutes) if "nnunet" in external else None,
    )


def load_study_config(path: str | Path = STUDY_CONFIG) -> StudyConfig:
    """Read and check ``configs/study.yaml`` (or another file of the same form), and its rows' override files.

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
    rows = _rows(path, raw["rows"])
    external = _external_rows(path, raw.get("external_rows"), rows)
    labels = {name: str((raw.get("labels") or {}).get(name, name)) for name in [*rows, *external]}
    budgets = {
        name: _budget(path, name, entry, centres, external) for name, entry in (raw["budgets"] or {}).items()
    }
    if not budgets:
        raise ValueError(f"{path}: no budgets.")
    return StudyConfig(
        train_centre=str(raw["train_centre"]),
        test_centres=tuple(str(c) for c in raw["test_centres"]),
        rows=rows,
        labels=labels,
        budgets=budgets,
        external_rows=external,
    )


def _external_rows(path: Path, external: Any, rows: Mapping[str, Any]) -> tuple[str, ...]:
    """Check ``external_rows``: a list of names of :data:`EXTERNAL_ROWS`, none of them also in ``rows``."""
    if external is None:
        return ()
    if not isinstance(external, list) or any(name not in EXTERNAL_ROWS for name in external):
        raise ValueError(
            f"{path}: 'external_rows' must be a list of rows of {list(EXTERNAL_ROWS)}, got {external!r}."
        )
    both = sorted(set(external) & set(rows))
    if both or len(set(external)) != len(external):
        raise ValueError(f"{path}: 'external_rows' names {both or external} twice.")
    return tuple(external)


# --------------------------------------------------------------------------------------------------------
# planning: every row's files and overrides, before anything runs


@dataclass
class StudyPlan:
    """What one invocation does.

    Attributes:
        config: the study config.
        budget: the chosen budget.
        seed: training seed; the dataset seeds derive from it.
        selected: the rows to run (study.yaml order).
        settings: row -> its overrides on top of its config files (:meth:`train_files`), for every workflow of
            *all* rows (finished rows are reused only when theirs equal these); an external row's are its
            method and its budget's wall clock.
        effective: row -> ``use_dino``, ``dino_model``, ``dino_config``, ``epochs``, ``val_interval`` as the
            bundle config resolves them (selected rows of ``train.yaml`` only).
    """

    config: StudyConfig
    budget: Budget
    seed: int
    selected: list[str]
    settings: dict[str, dict[str, Any]]
    effective: dict[str, dict[str, Any]] = field(default_factory=dict)

    def train_files(self, row: str) -> list[Path]:
        """``train.yaml``, the budget's config files, then ``row``'s override file."""
        return [TRAIN_CONFIG, *self.budget.config_paths(), self.config.rows[row]]

    def evaluate_files(self, row: str) -> list[Path]:
        """:meth:`train_files`, then ``evaluate.yaml``."""
        return [*self.train_files(row), EVALUATE_CONFIG]

    def is_external(self, row: str) -> bool:
        """Whether ``row`` is another method (``external_rows``), not ``train.yaml`` with overrides."""
        return row in self.config.external_rows

    def row_config_files(self, row: str) -> list[Path]:
        """The bundle config files ``row`` is trained and evaluated with (none for an external row)."""
        return [] if self.is_external(row) else self.evaluate_files(row)


def _parse_rows(rows: str | Sequence[str] | None, config: StudyConfig) -> list[str]:
    """``"a,b"`` (or what ``fire`` makes of it: a tuple), a list, or None (all rows) -> names in study order."""
    if rows is None:
        return config.all_rows
    names = [r.strip() for r in rows.split(",")] if isinstance(rows, str) else [str(r).strip() for r in rows]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in config.all_rows]
    if unknown or not names:
        raise ValueError(f"rows must name rows of configs/study.yaml {config.all_rows}, got {rows!r}.")
    return [n for n in config.all_rows if n in names]


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


def _row_settings(
    row_file: Mapping[str, Any], common: Mapping[str, Any], dinov2_model: str | None
) -> dict[str, Any]:
    """A row's overrides: ``common`` less the keys its file sets (the row decides what it is about), and
    ``dinov2_model`` as the ``dino_model`` of a row whose file names :data:`DEFAULT_DINOV2_MODEL`."""
    settings = {key: value for key, value in common.items() if key not in row_file}
    if dinov2_model is not None and row_file.get("dino_model") == DEFAULT_DINOV2_MODEL:
        settings["dino_model"] = str(dinov2_model)
    return settings


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
    dinov2_model: str | None = None,
    seed: int = 0,
    overrides: Mapping[str, Any] | str | None = None,
    config: StudyConfig | None = None,
) -> StudyPlan:
    """Give every row its config files and overrides and check them; nothing is loaded, generated or written.

    A row's workflows stack ``train.yaml``, the budget's ``config_files`` and the row's override file; on top
    come, later ones winning, the budget's ``config``, ``dino_model`` and ``seed`` from the arguments, and
    ``overrides``, less every key the row's file sets. ``dinov2_model`` (None: as the file says) becomes the
    ``dino_model`` of a row whose file names ``facebook/dinov2-small``. An external row's settings are its
    method and the budget's wall clock for it (``{"method": "nnunet", "budget_minutes": ...}``); no override
    reaches it.

    Raises:
        ValueError: an unknown budget or row, a key of :data:`STUDY_KEYS` in ``overrides``, a negative seed,
            or a row whose ``val_interval`` exceeds ``epochs`` (it would never save a model).
    """
    config = config or load_study_config()
    if budget not in config.budgets:
        raise ValueError(f"budget must be one of {list(config.budgets)}, got {budget!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    user = _parse_overrides(overrides)
    _check_keys("overrides", user)
    chosen = config.budgets[budget]
    common = {**chosen.config, "dino_model": dino_model, **user, "seed": seed}
    plan = StudyPlan(config=config, budget=chosen, seed=seed, selected=_parse_rows(rows, config), settings={})
    for row, file in config.rows.items():
        plan.settings[row] = _row_settings(_read_row_file(file), common, dinov2_model)
    for row in config.external_rows:  # only nnunet exists (EXTERNAL_ROWS)
        plan.settings[row] = {"method": row, "budget_minutes": chosen.nnunet_minutes}
    for row in plan.selected:
        if plan.is_external(row):
            continue
        effective = _effective_settings(plan.train_files(row), plan.settings[row])
        if effective["val_interval"] > effective["epochs"]:
            raise ValueError(
                f"row {row!r}: val_interval {effective['val_interval']} > epochs {effective['epochs']}: "
                "training would never validate, so no model would be selected."
            )
        plan.effective[row] = effective
    return plan


# --------------------------------------------------------------------------------------------------------
# encoders


def check_encoders(plan: StudyPlan, rows: Sequence[str]) -> dict[str, EncoderProvenance | None]:
    """Load every encoder ``rows`` need (each distinct one once); return row -> provenance (None: no encoder).

    An external row (another method) has no encoder.

    Raises:
        EncoderWeightsError: an encoder cannot be loaded; the message names the rows that need it, the
            loader's explanation of how to get the weights, and how to leave those rows out.
    """
    keys = {
        row: json.dumps([plan.effective[row]["dino_model"], plan.effective[row]["dino_config"]])
        for row in rows
        if not plan.is_external(row) and plan.effective[row]["use_dino"]
    }
    needed: dict[str, list[str]] = {}
    for row, key in keys.items():
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
    return {row: loaded[keys[row]] if row in keys else None for row in rows}
