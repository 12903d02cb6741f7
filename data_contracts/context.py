"""A Great Expectations 1.x project for the contracts, and a plain-Python view of its results.

    ctx = ContractContext("reports/contracts")
    result = ctx.validate("sft", frame, suite, run_name="raw")   # -> SuiteResult
    index_html = ctx.build_docs()

A file-mode GX project at `<root>/gx/` with its Data Docs at `<root>/data_docs/`, rewritten from the suites
in code on every run; only the latest run of each suite is kept. `quarantine_rows` turns a run's
row-level failures into per-row quarantine reasons (validate_data, the image-text contract).
Why: docs/choices.md#validate_data.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.exceptions import DataContextError

log = logging.getLogger("ruyi.contracts")

DATASOURCE = "ruyi"
DOCS_SITE = "local_site"


@dataclass
class ExpectationFailure:
    """One failed expectation of a suite run.

    Attributes:
        expectation: GX expectation type, e.g. "expect_column_values_to_not_match_regex".
        column: the column it checks (None for table-level or column-pair expectations).
        description: the contract in words (the expectation's `description`).
        kwargs: the expectation's arguments (regex, bounds, ...), without huge value sets.
        rows: labels of the failing rows, in frame order (empty for table-level failures).
        values: the failing values, aligned with `rows`.
        observed: GX's observed value for aggregate expectations.
        exception: the error message when evaluating the expectation raised.
    """

    expectation: str
    column: str | None
    description: str
    kwargs: dict[str, Any]
    rows: list[Any] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)
    observed: Any = None
    exception: str | None = None

    @property
    def row_level(self) -> bool:
        """True when the failure is attributed to specific rows (so they can be quarantined)."""
        return bool(self.rows) and self.exception is None

    @property
    def name(self) -> str:
        target = self.column
        if target is None and "column_A" in self.kwargs:
            target = f"{self.kwargs['column_A']}, {self.kwargs['column_B']}"
        return f"{self.expectation}({target})" if target else self.expectation

    def show(self, value: Any) -> str:
        """A failing value for a message: for a forbidden pattern, the match in its context."""
        regex = self.kwargs.get("regex")
        if "not_match_regex" in self.expectation and isinstance(value, str) and regex:
            match = re.search(regex, value)
            if match:
                start, end = max(0, match.start() - 30), min(len(value), match.end() + 30)
                return (
                    f"{match.group(0)!r} in "
                    + ("..." if start else "")
                    + repr(value[start:end])
                    + ("..." if end < len(value) else "")
                )
        if isinstance(value, float):
            return f"{value:.6g}"
        return _short(value)

    def to_dict(self, max_rows: int | None = None) -> dict[str, Any]:
        rows = self.rows if max_rows is None else self.rows[:max_rows]
        return {
            "expectation": self.expectation,
            "column": self.column,
            "description": self.description,
            "kwargs": self.kwargs,
            "unexpected_count": len(self.rows),
            "rows": [str(r) for r in rows],
            "values": [self.show(v) for v in self.values[: len(rows)]],
            "observed": _jsonable(self.observed),
            "exception": self.exception,
        }


@dataclass
class SuiteResult:
    """A suite run on one frame: what was evaluated and what failed."""

    suite: str
    success: bool
    evaluated: int
    failures: list[ExpectationFailure]
    num_rows: int

    def describe(self, sample_rows: int = 5) -> str:
        """Multi-line text naming every failed expectation, its count and sample rows with values."""
        lines = []
        for f in self.failures:
            head = f"  - {f.name}: {f.description}"
            if f.exception:
                lines.append(f"{head}\n      could not be evaluated: {f.exception}")
            elif f.rows:
                lines.append(f"{head} ({len(f.rows)} of {self.num_rows} rows)")
                for row, value in list(zip(f.rows, f.values))[:sample_rows]:
                    lines.append(f"      {row}: {f.show(value)}")
                if len(f.rows) > sample_rows:
                    lines.append(f"      ... and {len(f.rows) - sample_rows} more")
            else:
                lines.append(f"{head} (observed: {_short(f.observed)})")
        return "\n".join(lines)


def _short(value: Any, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


class ContractContext:
    """A file-mode GX project at `<root>/gx` with its Data Docs site at `<root>/data_docs`.

    Args:
        root: directory for the GX project and the Data Docs (created if missing).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.context = gx.get_context(mode="file", project_root_dir=str(self.root))
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        site = dict(self.context.get_config().data_docs_sites[DOCS_SITE])
        # Relative to <root>/gx: the site lands in <root>/data_docs.
        site["store_backend"] = {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": "../data_docs/",
        }
        site["show_how_to_buttons"] = False
        self.context.update_data_docs_site(DOCS_SITE, site)
        self.datasource = self.context.data_sources.add_or_update_pandas(DATASOURCE)

    @property
    def docs_dir(self) -> Path:
        return self.root / "data_docs"

    def forget(self, suite_name: str) -> None:
        """Removes the stored validation results of `suite_name` (only the latest run is kept)."""
        store = self.context.validation_results_store
        for key in store.list_keys():
            if key.expectation_suite_identifier.name == suite_name:
                store.remove_key(key)

    def validate(self, name: str, frame, suite: gx.ExpectationSuite, run_name: str = "run") -> SuiteResult:
        """Validates a pandas DataFrame with `suite` and stores the result for the Data Docs.

        Args:
            name: the suite/asset name (one validation definition per name).
            frame: pandas DataFrame, shape (rows, columns); its index labels name the rows.
            suite: the expectation suite (its name is set to `name`).
            run_name: shown in the Data Docs ("raw", "validated", ...).

        Returns:
            SuiteResult with every failed expectation and its failing row labels.
        """
        suite.name = name
        # Replace, not add_or_update: the latter diffs the old and new expectations pairwise (slow).
        try:
            self.context.suites.delete(name)
        except DataContextError:  # no such suite yet
            pass
        suite = self.context.suites.add(suite)
        try:
            asset = self.datasource.get_asset(name)
        except LookupError:
            asset = self.datasource.add_dataframe_asset(name)
        batch = next((b for b in asset.batch_definitions if b.name == "whole"), None)
        if batch is None:
            batch = asset.add_batch_definition_whole_dataframe("whole")
        definition = self.context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        result = definition.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "COMPLETE"},
            run_id=RunIdentifier(run_name=run_name),
        )
        failures = []
        for r in result.results:
            if r.success:
                continue
            config = r.expectation_config
            kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "result_format")}
            if isinstance(kwargs.get("value_set"), list) and len(kwargs["value_set"]) > 20:
                kwargs["value_set"] = f"<{len(kwargs['value_set'])} values>"
            info = r.exception_info or {}
            raised = info.get("raised_exception")
            res = r.result or {}
            failures.append(
                ExpectationFailure(
                    expectation=config.type,
                    column=config.kwargs.get("column"),
                    description=config.description or "",
                    kwargs=kwargs,
                    rows=list(res.get("unexpected_index_list") or []),
                    values=list(res.get("unexpected_list") or []),
                    observed=res.get("observed_value"),
                    exception=info.get("exception_message") if raised else None,
                )
            )
        return SuiteResult(
            suite=name,
            success=bool(result.success),
            evaluated=len(result.results),
            failures=failures,
            num_rows=len(frame),
        )

    def build_docs(self) -> Path:
        """Rebuilds the Data Docs site from the stored results; returns the path of its index.html."""
        if self.docs_dir.exists():
            shutil.rmtree(self.docs_dir)
        self.context.build_data_docs(site_names=[DOCS_SITE])
        index = self.docs_dir / "index.html"
        log.info("Data Docs: %s", index)
        return index


# --- quarantine: which rows a failed suite run sets aside, and why (every dataset contract) ---------
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
