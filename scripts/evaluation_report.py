"""The evaluation's three files, written alike by the evaluate workflow and ``python -m scripts.score``.

``per_case.csv`` (one row per record, columns in the first record's key order), ``summary.json``
(:func:`scripts.metrics.summarize`) and ``summary.md`` (:func:`scripts.metrics.format_markdown_table`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.atomic_io import write_atomically
from scripts.metrics import format_markdown_table, summarize

__all__ = ["write_evaluation"]

logger = logging.getLogger(__name__)


def write_evaluation(records: Sequence[Mapping[str, Any]], output_dir: str | Path) -> dict[str, Any]:
    """Summarize per-case records and write ``per_case.csv``, ``summary.json`` and ``summary.md``.

    Everything is computed before the first file is written, and each file is written atomically
    (:func:`scripts.atomic_io.write_atomically`), so a failure leaves no half-written file.

    Args:
        records: one :func:`scripts.metrics.case_metrics` record per case, with a ``case`` key first;
            extra columns (e.g. ``missing_prediction``) are written to the CSV and ignored by the
            summary.
        output_dir: folder of the three files; created if needed.

    Returns:
        The :func:`scripts.metrics.summarize` result that ``summary.json`` holds.

    Raises:
        ValueError: as :func:`scripts.metrics.summarize` (e.g. no record, or a NaN metric).
    """
    output_dir = Path(output_dir)
    summary = summarize(records)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    markdown = format_markdown_table(summary)
    summary_json = json.dumps(summary, indent=2, default=float)
    write_atomically(output_dir / "per_case.csv", table.getvalue())
    write_atomically(output_dir / "summary.json", summary_json)
    write_atomically(output_dir / "summary.md", markdown + "\n")
    logger.info("Evaluation of %d cases written to %s\n%s", len(records), output_dir, markdown)
    return summary
