"""The per-case score table: one CSV row per case, ``case_id`` first, then the score columns.

A leaf (nothing from the package), so that the evaluator, the checkpoint callback keeping the best
evaluation's table and ``unet-eval`` write it alike without importing one another.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def write_cases_csv(path: Path, rows: Sequence[dict]) -> None:
    """Per-case rows (``case_id`` then the score keys) as CSV; NaN written as ``nan``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
