"""Which rows a failed suite run quarantines, and why: shared by every dataset contract.

    reasons = {}
    quarantine_rows(reasons, labels, result.failures)   # label -> [{"expectation", "column", ...}]

Every failing row of a row-level expectation is bad; for a uniqueness expectation the first clean
occurrence of a value is kept and the later ones are quarantined as its duplicates. No GX import.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

UNIQUE_EXPECTATION = "expect_column_values_to_be_unique"


def failure_reason(failure, detail: str | None = None) -> dict[str, Any]:
    """The quarantine reason of one failed expectation (`context.ExpectationFailure`)."""
    reason = {
        "expectation": failure.expectation,
        "column": failure.column,
        "description": failure.description,
    }
    if detail:
        reason["detail"] = detail
    return reason


def _value_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def quarantine_rows(
    reasons: dict[str, list[dict[str, Any]]],
    order: Sequence[str],
    failures: Iterable,
    detail_columns: Iterable[str] = (),
) -> None:
    """Adds to `reasons` (row label -> reasons) the rows to quarantine for the row-level `failures`.

    Args:
        reasons: updated in place; labels already in it count as bad.
        order: every row label in data order (the first occurrence of a duplicate is the one kept).
        failures: `ExpectationFailure`s of one suite run.
        detail_columns: columns whose failing value is itself the explanation (a derived error
            message, a size): it becomes the reason's `detail`.
    """
    failures = list(failures)
    detail_columns = set(detail_columns)
    for f in failures:
        if f.expectation != UNIQUE_EXPECTATION:
            values = list(f.values) + [None] * (len(f.rows) - len(f.values))  # every failing row counts
            for label, value in zip(f.rows, values):
                detail = f.show(value) if f.column in detail_columns else None
                reasons.setdefault(label, []).append(failure_reason(f, detail))
    position = {label: i for i, label in enumerate(order)}
    for f in failures:
        if f.expectation != UNIQUE_EXPECTATION:
            continue
        groups: dict[str, list[str]] = {}
        for label, value in zip(f.rows, f.values):
            groups.setdefault(_value_key(value), []).append(label)
        for labels in groups.values():
            labels.sort(key=position.__getitem__)
            keep = next((label for label in labels if label not in reasons), None)
            for label in labels:
                if label != keep:
                    reasons.setdefault(label, []).append(
                        failure_reason(f, f"duplicate of {keep or labels[0]}")
                    )
