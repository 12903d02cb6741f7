"""User-supplied data for prepare_data: JSONL or Parquet files at local paths or `s3://bucket/key` URIs.

    python -m tasks.prepare_data --set 'data.sources=[corpus.jsonl, s3://bucket/gsm8k.parquet]'

`map_rows` turns rows with `question` + `answer` into math problems and rows with `text` into corpus
documents; anything else is a StageError naming the file and line or row. S3 uses boto3 with the standard
AWS configuration and the artifact store's client (`tasks.core.s3`: a dead endpoint is transient, exit 75).
Row mapping rules: docs/choices.md#prepare_data.
A bad row is a `RowError` naming file:line (JSONL) or row (Parquet): with `on_violation=fail` the first
one stops the stage, with `quarantine` prepare_data sets bad rows aside; file-level problems (unreadable,
not JSONL/Parquet, not UTF-8, no usable column, empty) always stop it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.files import decode_utf8
from tasks.core.stage import StageError, log
from tasks.data.mathgen import (
    Problem,
    answer_line,
    extract_answer,
    format_number,
    has_answer_line,
    parse_number,
    with_answer_line,
    worked_steps,
)


@dataclass(frozen=True)
class Record:
    """One row of a user file and where it came from ("data.jsonl:12", "s3://b/k.parquet:row 3").

    `line` is the JSONL line or the 1-based Parquet row; a line that is not a JSON object has `error`
    set (and its raw text as `row["raw"]`).
    """

    where: str
    row: dict[str, Any]
    line: int = 0
    error: str | None = None


class RowError(StageError):
    """One bad row of a user file (not the file as a whole); the message starts with file:line."""


@dataclass
class Source:
    """One user file: its URI, format, content hash and rows."""

    uri: str
    format: str
    sha256: str
    records: list[Record] = field(default_factory=list)


@dataclass(frozen=True)
class Document:
    """A corpus document (the data contract's corpus row without its id)."""

    text: str
    source: str


def _format_of(uri: str) -> str:
    name = uri.lower()
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise StageError(f"data.sources: {uri}: unsupported file type (expected .jsonl, .jsonl.gz or .parquet)")


def _read_bytes(uri: str) -> bytes:
    if uri.startswith("s3://"):
        return _read_s3(uri)
    path = Path(uri)
    if not path.is_file():
        raise StageError(f"data.sources: file not found: {uri}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise StageError(f"data.sources: cannot read {uri}: {e.strerror or e}") from None


def _read_s3(uri: str) -> bytes:
    """The object's bytes, through the project's one S3 client (`tasks.core.s3`): the same retries and
    errors as the artifact store (an unreachable endpoint is a TransientStoreError, a rejected key not)."""
    from botocore.exceptions import BotoCoreError

    from tasks.core.s3 import s3_client, s3_errors

    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise StageError(f"data.sources: {uri}: expected s3://bucket/key")
    try:
        client = s3_client()
    except (ValueError, BotoCoreError) as e:  # e.g. AWS_PROFILE names no profile, a malformed endpoint
        raise StageError(
            f"data.sources: cannot read {uri}: the S3 client cannot be configured from the environment "
            f"(AWS_PROFILE, AWS_ENDPOINT_URL*, AWS_MAX_ATTEMPTS, ...): {e}"
        ) from None
    with s3_errors(
        f"data.sources: cannot read {uri}", endpoint=client.meta.endpoint_url, bucket=bucket, key=key
    ):
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def _jsonl_records(uri: str, data: bytes) -> Iterator[Record]:
    if uri.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise StageError(f"{uri}: not a valid gzip file ({e})") from None
    text = decode_utf8(data, uri)
    # Lines end at "\n" only (as editors count them): str.splitlines() would also split at U+2028 etc.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield Record(f"{uri}:{lineno}", {"raw": line}, lineno, f"not valid JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            yield Record(
                f"{uri}:{lineno}", {"raw": line}, lineno, f"expected a JSON object, got {type(row).__name__}"
            )
            continue
        yield Record(f"{uri}:{lineno}", row, lineno)


def _parquet_records(uri: str, data: bytes) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # Arrow must never own a Python object here. A BufferReader over the Python bytes holds them
        # (an arrow::py::PyBuffer), and pq.read_table's dataset scanner finishes on Arrow's IO thread
        # pool even with use_threads off: the last reference to that buffer was then dropped on an
        # Arrow thread, which takes the GIL to free it. In a process that stopped on a bad row right
        # after the read, that thread met interpreter shutdown and aborted the process ("terminate
        # called without an active exception", SIGABRT; core dump: PyBuffer::~PyBuffer in
        # PyGILState_Ensure on an Arrow ThreadPool worker). So the bytes are copied into Arrow's own
        # memory, and the file is read by ParquetFile in the calling thread (no scanner, no
        # pre-buffering, no decode threads).
        sink = pa.BufferOutputStream()
        sink.write(data)
        with pq.ParquetFile(pa.BufferReader(sink.getvalue()), pre_buffer=False) as parquet:
            table = parquet.read(use_threads=False)
    except (pa.ArrowException, OSError) as e:
        raise StageError(f"{uri}: not a readable Parquet file ({e})") from None
    if table.num_rows and not {"text", "question"} & set(table.column_names):
        raise StageError(
            f"{uri}: no 'text' (corpus) or 'question' (math) column; columns: {table.column_names}"
        )
    for index, row in enumerate(table.to_pylist(), 1):
        yield Record(f"{uri}:row {index}", row, index)


def load_source(uri: str) -> Source:
    """Reads one user file (local path or s3:// URI; JSONL or Parquet).

    Rows that are not JSON objects are kept as records with `error` set (bad rows, see map_rows).

    Raises:
        StageError: missing/unreadable file, not UTF-8 (naming file:line), no rows.
    """
    fmt = _format_of(uri)
    data = _read_bytes(uri)
    records = list(_jsonl_records(uri, data) if fmt == "jsonl" else _parquet_records(uri, data))
    if not records:
        raise StageError(f"{uri}: no rows (empty file)")
    log.info("source %s: %d rows (%s)", uri, len(records), fmt)
    return Source(uri=uri, format=fmt, sha256=hashlib.sha256(data).hexdigest(), records=records)


def _string(record: Record, key: str, required: bool = True) -> str | None:
    value = record.row.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"{record.where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def _math_problem(record: Record, origin: str, levels: list[int]) -> tuple[Problem, bool]:
    question = _string(record, "question").strip()
    raw_answer = record.row.get("answer")
    if isinstance(raw_answer, (int, float)) and not isinstance(raw_answer, bool):
        raw_answer = str(raw_answer)
    if not isinstance(raw_answer, str) or not raw_answer.strip():
        raise RowError(
            f"{record.where}: field 'answer' must be a number or a solution ending in "
            f"'#### <number>', got {raw_answer!r}"
        )
    solution = _string(record, "solution", required=False)
    if has_answer_line(raw_answer):  # GSM8K style: the answer field is the worked solution
        if solution is not None:
            raise RowError(f"{record.where}: both 'solution' and a worked solution in 'answer'; keep one")
        solution, answer = raw_answer, extract_answer(raw_answer)
        if answer is None:
            raise RowError(f"{record.where}: no number after '####' in 'answer'")
    else:
        value = parse_number(raw_answer)
        if value is None:
            raise RowError(f"{record.where}: answer {raw_answer!r} is not a number")
        answer = format_number(value)
    if "/" in answer:
        raise RowError(
            f"{record.where}: answer {answer} has no finite decimal form (the contract needs plain numbers)"
        )
    had_solution = solution is not None
    if solution is None:
        solution = answer_line(answer)
    else:
        solution = solution.strip()
        final = extract_answer(solution)
        if final is None:
            solution = f"{solution}\n{answer_line(answer)}"
        elif parse_number(final) != parse_number(answer):
            raise RowError(
                f"{record.where}: the solution's final answer {final} differs from answer {answer}"
            )
        else:  # the canonical final line: "#### $1,000." -> "#### 1000"
            solution = with_answer_line(solution, answer)
    level = record.row.get("level")
    if level is None:
        steps = len(worked_steps(solution).strip().splitlines())
        level = min(sorted(levels), key=lambda lvl: abs(lvl - steps))
    elif isinstance(level, bool) or not isinstance(level, int) or level not in levels:
        raise RowError(
            f"{record.where}: field 'level' must be one of data.math_levels {sorted(levels)}, "
            f"got {level!r} (add the level to data.math_levels or drop the row)"
        )
    return Problem(
        question=question, solution=solution, answer=answer, level=level, origin=origin
    ), had_solution


def map_rows(
    sources: list[Source],
    levels: list[int],
    quarantine: list[dict[str, Any]] | None = None,
) -> tuple[list[Document], list[Problem], dict[str, Any]]:
    """Maps user rows to corpus documents and math problems (see docs/choices.md#prepare_data).

    Args:
        sources: the loaded user files.
        levels: the allowed difficulty levels (`data.math_levels`).
        quarantine: None: the first bad row raises its RowError. A list: each bad row is appended
            to it as {"file", "line", "where", "reasons": [{"check", "description"}], "row"} and skipped.

    Returns:
        (documents, problems, stats) where stats counts rows per kind and per source file (and the
        bad rows set aside per file, `quarantined`).

    Raises:
        RowError: a bad row, when `quarantine` is None.
    """
    documents: list[Document] = []
    problems: list[Problem] = []
    stats: dict[str, Any] = {"files": {}, "math_without_solution": 0}
    for source in sources:
        name = source.uri.rstrip("/").rsplit("/", 1)[-1]
        origin = f"user:{name}"
        counts = {"corpus": 0, "math": 0, "quarantined": 0}
        for record in source.records:
            try:
                if record.error is not None:
                    raise RowError(f"{record.where}: {record.error}")
                if record.row.get("question") is not None:  # a Parquet corpus row has question None
                    problem, had_solution = _math_problem(record, origin, levels)
                    problems.append(problem)
                    stats["math_without_solution"] += int(not had_solution)
                    counts["math"] += 1
                elif "text" in record.row:
                    text = _string(record, "text")
                    doc_source = record.row.get("source")
                    if not (isinstance(doc_source, str) and doc_source):
                        doc_source = origin
                    documents.append(Document(text=text, source=doc_source))
                    counts["corpus"] += 1
                else:
                    raise RowError(
                        f"{record.where}: a row needs 'text' (corpus) or 'question' + 'answer' "
                        f"(math); "
                        f"got keys {sorted(record.row)}"
                    )
            except RowError as e:
                if quarantine is None:
                    raise
                reason = str(e).removeprefix(f"{record.where}: ")
                quarantine.append(
                    {
                        "file": source.uri,
                        "line": record.line,
                        "where": record.where,
                        "reasons": [{"check": "source row", "description": reason}],
                        "row": json.loads(json.dumps(record.row, default=repr)),
                    }
                )
                counts["quarantined"] += 1
        stats["files"][source.uri] = {
            "format": source.format,
            "sha256": source.sha256,
            "rows": len(source.records),
            **counts,
        }
    return documents, problems, stats
