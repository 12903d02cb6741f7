"""Stage `validate_data`: checks `data/raw/` against the data contracts and publishes `data/validated/`.

    python -m tasks.validate_data [--params params.yaml] [--set validate_data.on_violation=quarantine]

Reads `data/raw/` (the seven JSONL files and manifest.json; the select files are checked to share no
text with the others). Writes `data/validated/` (the rows that passed,
byte for byte, and a manifest), `data/quarantine/` (bad rows with their reasons, under `quarantine`;
`sources.jsonl`: the bad user rows prepare_data set aside),
`reports/contracts/` (GX project and Data Docs), `metrics/validate_data.json`, `plots/validate_data/`.
A violation raises `ContractViolation`, never retried. Choices: docs/choices.md#validate_data.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.files import (
    atomic_dir,
    atomic_file,
    pyplot,
    read_jsonl,
    save_figure,
    sha256_file,
    write_json,
    write_jsonl,
    write_metrics,
)
from tasks.core.params import Params
from tasks.core.paths import Workspace
from tasks.core.stage import ContractViolation, StageError, log, stage_main

STAGE = "validate_data"


@dataclass
class _Row:
    file: str
    line: int
    text: str  # the raw line, newline included
    data: dict[str, Any]


@dataclass
class _Dataset:
    """The rows of one contract (all its files), in file order, keyed by label."""

    name: str
    files: tuple[str, ...]
    rows: dict[str, _Row] = field(default_factory=dict)
    reasons: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # quarantined label -> reasons

    @property
    def kept(self) -> list[str]:
        return [label for label in self.rows if label not in self.reasons]


def read_manifest(raw_dir: Path, files: list[str]) -> dict[str, Any]:
    """Reads `raw_dir/manifest.json` and checks every file against it (rows and sha256).

    Raises:
        StageError: the manifest is missing or unreadable.
        ContractViolation: a file is missing from the manifest or does not match it.
    """
    path = raw_dir / "manifest.json"
    if not path.is_file():
        raise StageError(f"{path} not found (run the prepare_data stage first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StageError(f"{path}: not valid JSON ({e.msg})") from None
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries, dict):
        raise StageError(f"{path}: expected an object with a 'files' mapping")
    problems = []
    for name in files:
        entry = entries.get(name)
        file = raw_dir / name
        if not file.is_file():
            raise StageError(f"input file not found: {file} (run the prepare_data stage first)")
        if not isinstance(entry, dict) or "sha256" not in entry or "rows" not in entry:
            problems.append(f"{path}: no 'rows'/'sha256' entry for {name}")
        elif sha256_file(file) != entry["sha256"]:
            problems.append(f"{file}: sha256 differs from {path} (the file changed after prepare_data)")
    if problems:
        raise ContractViolation(
            "raw data does not match its manifest:\n  " + "\n  ".join(problems),
            [{"suite": "manifest", "expectation": "sha256 and rows match manifest.json", "rows": problems}],
        )
    return manifest


def load_rows(raw_dir: Path, name: str, manifest: dict[str, Any]) -> list[_Row]:
    """Rows of one JSONL file with their line numbers and raw text.

    Parsing (and its errors, naming file:line) is `tasks.core.read_jsonl`; a second pass pairs
    each row with its non-blank line.
    """
    path = raw_dir / name
    data = read_jsonl(path)
    with open(path, encoding="utf-8") as f:
        lines = [
            (n, text if text.endswith("\n") else text + "\n") for n, text in enumerate(f, 1) if text.strip()
        ]
    if len(lines) != len(data):  # read_jsonl skips exactly the blank lines
        raise StageError(f"{path}: {len(data)} rows but {len(lines)} non-blank lines")
    expected = manifest["files"][name]["rows"]
    if expected != len(data):
        raise ContractViolation(
            f"{path}: {len(data)} rows but manifest.json says {expected}",
            [{"suite": "manifest", "expectation": "rows match manifest.json", "rows": [str(path)]}],
        )
    return [_Row(file=name, line=n, text=text, data=row) for (n, text), row in zip(lines, data)]


def _failure_records(suite: str, result, limit: int) -> list[dict[str, Any]]:
    return [{"suite": suite, **f.to_dict(max_rows=limit)} for f in result.failures]


def _validate(
    ctx, params: Params, dataset: _Dataset, datasets: dict[str, _Dataset], labels: list[str], run_name: str
):
    """Runs the suite of `dataset` on the rows `labels`; a held-out dataset (eval, select_corpus, select) is
    checked against the rows of the datasets before it that passed (`suites.held_out_references`)."""
    from data_contracts.suites import CONTRACTS, build_frame, build_suite, held_out_references

    contract = CONTRACTS[dataset.name]
    needed = {*contract.question_overlap, *contract.paragraph_overlap, *contract.arithmetic_overlap}
    if contract.question_overlap:
        needed.add("corpus")
    refs = held_out_references(
        contract,
        {name: [datasets[name].rows[label].data for label in datasets[name].kept] for name in needed},
    )
    try:
        frame = build_frame(
            contract,
            [dataset.rows[label].data for label in labels],
            labels,
            refs.corpus,
            refs.paragraphs,
            refs.arithmetic,
        )
    except ValueError as e:
        raise ContractViolation(f"{contract.name}: {e}") from None
    suite = build_suite(contract, params, refs.question_keys)
    return ctx.validate(contract.name, frame, suite, run_name=run_name)


def run(params: Params) -> dict[str, Any]:
    """Validates data/raw, publishes data/validated and data/quarantine; returns the metrics."""
    from tqdm import tqdm

    from data_contracts.context import ContractContext, quarantine_rows
    from data_contracts.suites import CONTRACTS, ORDER

    settings = params.validate_data
    ws = Workspace.from_params(params)
    raw_dir = ws.raw
    if not raw_dir.is_dir():
        raise StageError(f"{raw_dir} not found (run the prepare_data stage first)")
    manifest = read_manifest(raw_dir, [file for name in ORDER for file in CONTRACTS[name].files])
    source_rows = read_source_quarantine(raw_dir, manifest, settings.on_violation)

    ctx = ContractContext(ws.reports("contracts"))
    datasets: dict[str, _Dataset] = {}
    suites: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    records: list[dict[str, Any]] = []
    sample = settings.sample_rows
    try:
        for name in tqdm(ORDER, desc="validate_data", unit="dataset"):
            files = CONTRACTS[name].files
            dataset = datasets[name] = _Dataset(name=name, files=files)
            for file in files:
                for row in load_rows(raw_dir, file, manifest):
                    dataset.rows[f"{raw_dir / file}:{row.line}"] = row
            ctx.forget(name)
            result = _validate(ctx, params, dataset, datasets, list(dataset.rows), "raw")
            suites[name] = {
                "expectations_evaluated": result.evaluated,
                "expectations_failed": len(result.failures),
                "failed": sorted({f.name for f in result.failures}),
            }
            if result.success:
                continue
            where = f"{name} ({', '.join(files)})"
            table_level = [f.name for f in result.failures if not f.row_level]
            if settings.on_violation == "fail" or table_level:
                why = (
                    ""
                    if settings.on_violation == "fail"
                    else f"; not attributable to rows: {', '.join(table_level)}"
                )
                errors.append(
                    f"{where}: {len(result.failures)} of {result.evaluated} expectations failed{why}\n"
                    + result.describe(sample)
                )
                records += _failure_records(name, result, sample)
                continue
            quarantine_rows(dataset.reasons, list(dataset.rows), result.failures)
            over = []
            for file in files:
                total = sum(1 for r in dataset.rows.values() if r.file == file)
                bad = sum(1 for label in dataset.reasons if dataset.rows[label].file == file)
                if bad > settings.max_quarantine_fraction * total:
                    over.append(
                        f"{raw_dir / file}: {bad} of {total} rows ({bad / total:.1%}) would be quarantined, "
                        f"over validate_data.max_quarantine_fraction={settings.max_quarantine_fraction}"
                    )
            if over:
                errors.append(
                    f"{where}: too many bad rows to quarantine\n  "
                    + "\n  ".join(over)
                    + "\n"
                    + result.describe(sample)
                )
                records += _failure_records(name, result, sample)
                continue
            log.info("%s: quarantining %d of %d rows", name, len(dataset.reasons), len(dataset.rows))
            recheck = _validate(ctx, params, dataset, datasets, dataset.kept, "validated")
            if not recheck.success:
                errors.append(
                    f"{where}: the rows kept after quarantine still fail\n" + recheck.describe(sample)
                )
                records += _failure_records(name, recheck, sample)
    finally:
        try:  # the docs show what was validated, also when the stage fails
            docs = ctx.build_docs()
        except Exception as e:  # never mask the stage's own error
            log.warning("could not build the Data Docs: %s", e)
            docs = ctx.docs_dir / "index.html"

    if errors:
        raise ContractViolation(
            f"data contract violated (validate_data.on_violation={settings.on_violation}); "
            f"Data Docs: {docs}\n" + "\n".join(errors),
            records,
        )
    return _publish(params, raw_dir, manifest, datasets, suites, docs, source_rows)


def read_source_quarantine(
    raw_dir: Path, manifest: dict[str, Any], on_violation: str
) -> list[dict[str, Any]]:
    """The bad user rows prepare_data set aside in quarantine mode (manifest `source_quarantine`).

    Raises:
        ContractViolation: the file does not match the manifest, or there are such rows but
            on_violation is `fail` (data/raw was prepared in quarantine mode: run prepare_data again).
    """
    entry = manifest.get("source_quarantine")
    if not entry:
        return []
    path = raw_dir / entry["file"]
    if not path.is_file() or sha256_file(path) != entry["sha256"]:
        raise ContractViolation(
            f"{path}: missing or its sha256 differs from {raw_dir / 'manifest.json'}",
            [{"suite": "manifest", "expectation": "sha256 matches manifest.json", "rows": [str(path)]}],
        )
    rows = read_jsonl(path)
    if on_violation == "fail":
        first = rows[0]
        raise ContractViolation(
            f"{path}: prepare_data set aside {len(rows)} bad user rows (quarantine mode) but "
            f"validate_data.on_violation is fail; first: {first['where']}: "
            f"{first['reasons'][0]['description']} "
            f"(run prepare_data again with the same on_violation)",
            [
                {
                    "suite": "sources",
                    "expectation": "user rows are valid",
                    "rows": [r["where"] for r in rows[:5]],
                }
            ],
        )
    return rows


def _publish(
    params: Params,
    raw_dir: Path,
    manifest: dict[str, Any],
    datasets: dict[str, _Dataset],
    suites: dict[str, dict[str, Any]],
    docs: Path,
    source_rows: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    ws = Workspace.from_params(params)
    source_rows = source_rows or []
    per_file: dict[str, dict[str, int]] = {}
    with atomic_dir(ws.validated) as out, atomic_dir(ws.quarantine) as qdir:
        files_entry = {}
        summary = {}
        for dataset in datasets.values():
            for file in dataset.files:
                labels = [label for label, row in dataset.rows.items() if row.file == file]
                bad = [label for label in labels if label in dataset.reasons]
                if bad:
                    with open(out / file, "w", encoding="utf-8") as f:
                        f.writelines(
                            dataset.rows[label].text for label in labels if label not in dataset.reasons
                        )
                else:
                    shutil.copyfile(raw_dir / file, out / file)
                write_jsonl(
                    qdir / f"{Path(file).stem}.jsonl",
                    [
                        {
                            "file": file,
                            "line": dataset.rows[label].line,
                            "reasons": dataset.reasons[label],
                            "row": dataset.rows[label].data,
                        }
                        for label in bad
                    ],
                )
                kept = len(labels) - len(bad)
                files_entry[file] = {
                    "rows": kept,
                    "sha256": sha256_file(out / file),
                    "bytes": (out / file).stat().st_size,
                }
                per_file[file] = {
                    "rows_checked": len(labels),
                    "rows_passed": kept,
                    "rows_quarantined": len(bad),
                }
                summary[file] = len(bad)
        validated = dict(manifest)
        validated["raw_files"] = manifest["files"]
        validated["files"] = files_entry
        validated["validation"] = {
            "on_violation": params.validate_data.on_violation,
            "quarantined": summary,
            "suites": sorted(suites),
        }
        per_source: dict[str, int] = {}
        for row in source_rows:
            per_source[row["file"]] = per_source.get(row["file"], 0) + 1
        if source_rows:
            validated["validation"]["sources_quarantined"] = per_source
        write_jsonl(qdir / "sources.jsonl", source_rows)
        write_json(
            qdir / "summary.json",
            {
                "quarantined": summary,
                "sources": per_source,
                "on_violation": params.validate_data.on_violation,
            },
        )
        write_json(out / "manifest.json", validated)
    metrics = {
        "passed": True,
        "on_violation": params.validate_data.on_violation,
        "datasets": per_file,
        "suites": suites,
        "rows_checked": sum(v["rows_checked"] for v in per_file.values()),
        "rows_quarantined": sum(v["rows_quarantined"] for v in per_file.values()) + len(source_rows),
        # Of those: bad rows of the user's own files (data.sources), set aside by prepare_data.
        "source_rows_quarantined": len(source_rows),
        "expectations_evaluated": sum(s["expectations_evaluated"] for s in suites.values()),
        "expectations_failed": sum(s["expectations_failed"] for s in suites.values()),
        # As configured (not resolved), so the metrics do not depend on where the workspace lives.
        "data_docs": str(ws.reports("contracts") / "data_docs" / "index.html"),
    }
    write_metrics(params, STAGE, metrics)
    _plot(params, per_file)
    log.info(
        "validate_data: %d rows checked, %d quarantined, %d expectations evaluated; Data Docs: %s",
        metrics["rows_checked"],
        metrics["rows_quarantined"],
        metrics["expectations_evaluated"],
        docs,
    )
    return metrics


def _plot(params: Params, per_file: dict[str, dict[str, int]]) -> None:
    plt = pyplot()

    out = Workspace.from_params(params).plots(STAGE)
    names = list(per_file)
    with atomic_file(out / "rows.csv") as f:
        f.write("file,rows_passed,rows_quarantined\n")
        for name in names:
            f.write(f"{name},{per_file[name]['rows_passed']},{per_file[name]['rows_quarantined']}\n")
    fig, ax = plt.subplots(figsize=(6, 3))
    passed = [per_file[n]["rows_passed"] for n in names]
    bad = [per_file[n]["rows_quarantined"] for n in names]
    ax.bar(names, passed, label="passed")
    ax.bar(names, bad, bottom=passed, label="quarantined", color="tab:red")
    ax.set(ylabel="rows", title="validate_data: rows per file")
    ax.legend()
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    save_figure(fig, out / "rows.png")


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
