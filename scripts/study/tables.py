"""The study's tables: ``results.csv``, ``ablation.md`` and ``cross_centre.md``, from every finished row.

A row that was selected but cannot run here (an external row whose package is missing) is shown as skipped,
with the reason, in both tables and in ``results.csv`` (``skip_reason``); other rows without a result show
as "not run" and are not in the CSV.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.atomic_io import write_atomically
from scripts.metrics import FAILURE_DICE_THRESHOLD, format_mean_std

from .plan import StudyPlan
from .run import dataset_seed, finished_record

__all__ = ["CSV_COLUMNS", "write_tables"]

logger = logging.getLogger(__name__)


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
    "skip_reason",
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
        params = record["trainable_params"]
        line["trainable_params"] = "" if params is None else params  # not counted (nnU-Net)
        line["budget"] = record["budget"]
        line["seed"] = record["seed"]
        line["skip_reason"] = ""
        lines.append(line)
    return lines


def _skipped_lines(plan: StudyPlan, row: str, reason: str) -> list[dict[str, Any]]:
    """A skipped row's lines: which row and centre, the budget and seed, why; no figures."""
    return [
        {
            "row": row,
            "label": plan.config.labels[row],
            "centre": centre,
            "in_centre": centre == plan.config.train_centre,
            "budget": plan.budget.name,
            "seed": plan.seed,
            "skip_reason": reason,
        }
        for centre in plan.config.test_centres
    ]


def _missing_cell(row: str, skipped: Mapping[str, str]) -> str:
    """The first cell after the label of a row without results: why it was skipped, or "not run"."""
    if row not in skipped:
        return "not run"
    reason = " ".join(skipped[row].split()).replace("|", "\\|")  # one line, no cell break
    return f"skipped: {reason}"


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
        "model.pt as its training chose it (train.yaml's model_selection: by default the model at the end of "
        f"training, as nnU-Net's; 'best': the best score on {plan.config.train_centre}'s validation split), "
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
    external = [r for r in done if plan.is_external(r)]
    for row in external:  # only nnunet exists
        lines.append(
            f"{plan.config.labels[row]}: nnU-Net v2's own pipeline and default trainer "
            f"(`scripts/nnunet_baseline.py`) on the same {plan.config.train_centre} training/validation split "
            f"(its fold 0), for {done[row]['settings']['budget_minutes']:g} min of wall clock (preprocessing "
            "included, on the CPU), without the seed; its final checkpoint is scored (no selection on the "
            "validation split), by `scripts/score.py` with the same metrics. No encoder."
        )
    encoders = [
        f"{plan.config.labels[r]}: `{rec['encoder']['source']}` (sha256 {rec['encoder']['sha256'][:12]}…)"
        for r, rec in done.items()
        if rec["encoder"]
    ]
    if encoders:
        lines.append("Encoders: " + "; ".join(encoders) + ".")
    return lines


def _ablation_table(
    plan: StudyPlan, done: Mapping[str, Mapping[str, Any]], skipped: Mapping[str, str]
) -> str:
    centre = plan.config.train_centre
    lines = [
        f"# Ablation (trained and tested on centre {centre})",
        "",
        "| Method | Aneurysm Dice | Aneurysm HD95 (mm) | Vessel Dice | Failures | Train time |",
        "|---|---|---|---|---|---|",
    ]
    for row in plan.config.all_rows:
        record = done.get(row)
        if record is None:
            lines.append(f"| {plan.config.labels[row]} | {_missing_cell(row, skipped)} | | | | |")
            continue
        summary = record["centres"][centre]["summary"]
        aneurysm, vessel = summary["classes"]["aneurysm"], summary["classes"]["vessel"]
        cells = [
            _label(plan, row, record),
            format_mean_std(aneurysm["dice"], 3),
            format_mean_std(aneurysm["hd95"], 2),
            format_mean_std(vessel["dice"], 3),
            f"{summary['failure']['k']}/{summary['failure']['n']}",
            _duration(record["train_seconds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *_notes(plan, done, [centre])]) + "\n"


def _cross_centre_table(
    plan: StudyPlan, done: Mapping[str, Mapping[str, Any]], skipped: Mapping[str, str]
) -> str:
    centres = plan.config.test_centres
    unseen = [c for c in centres if c != plan.config.train_centre]
    lines = [
        f"# Cross-centre (trained on centre {plan.config.train_centre}; "
        f"{', '.join(unseen) or 'no other centre'} unseen, no fine-tuning)",
        "",
        "| Method | " + " | ".join(f"{c} aneurysm Dice | {c} failures" for c in centres) + " |",
        "|---|" + "---|---|" * len(centres),
    ]
    for row in plan.config.all_rows:
        record = done.get(row)
        if record is None:
            missing = _missing_cell(row, skipped)
            lines.append(f"| {plan.config.labels[row]} | {missing} |" + " |" * (2 * len(centres) - 1))
            continue
        cells = [_label(plan, row, record)]
        for centre in centres:
            summary = record["centres"][centre]["summary"]
            cells += [
                format_mean_std(summary["classes"]["aneurysm"]["dice"], 3),
                f"{summary['failure']['k']}/{summary['failure']['n']}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *_notes(plan, done, centres)]) + "\n"


def write_tables(
    output_dir: str | Path, plan: StudyPlan, warn: bool = True, skipped: Mapping[str, str] | None = None
) -> str:
    """Rebuild ``results.csv``, ``ablation.md`` and ``cross_centre.md`` from every finished row.

    Rows without a ``done.json`` made with this plan's settings appear as "not run" (and not in the CSV),
    or, when in ``skipped``, as skipped with the reason (in the CSV too, ``skip_reason``, no figures).

    Args:
        output_dir: the study folder.
        plan: the study plan.
        warn: log why a finished row does not count. Default True.
        skipped: row -> why it could not run here. Default none.

    Returns:
        both tables, as written.
    """
    output_dir = Path(output_dir)
    skipped = dict(skipped or {})
    done = {
        row: rec
        for row in plan.config.all_rows
        if (rec := finished_record(output_dir, plan, row, warn)) is not None
    }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in plan.config.all_rows:
        if row in done:
            writer.writerows(_csv_lines(plan, row, done[row]))
        elif row in skipped:
            writer.writerows(_skipped_lines(plan, row, skipped[row]))
    ablation, cross_centre = _ablation_table(plan, done, skipped), _cross_centre_table(plan, done, skipped)
    write_atomically(output_dir / "results.csv", buffer.getvalue())
    write_atomically(output_dir / "ablation.md", ablation)
    write_atomically(output_dir / "cross_centre.md", cross_centre)
    logger.info("tables of %d finished row(s) written to %s", len(done), output_dir)
    return ablation + "\n" + cross_centre
