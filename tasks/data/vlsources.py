"""User image-text sources: JSONL or Parquet files of VQA rows, checked by the VL data contract.

    checked = load_vl_source("photos/vqa.jsonl", ctx, ImageBounds(grid=16))   # -> VLSource

A row has `question`, `answer` and the image, given as `image` (a path relative to the source
file, or a `data:image/...;base64,` URL, or Parquet bytes, or a Hugging Face datasets
`{"bytes", "path"}` struct) or as `image_b64` (base64 of the file). Optional: `id` (default
`<file stem>-<line>`), `task` (default "user"), `answer_type` (default from the answer: a JSON
integer "int", a JSON number "float", a row with `choices` "choice", else "text"), `choices`.
Numbers become strings; other fields are ignored. Files are read as `tasks.data.sources` reads text
sources (the same helpers: local or s3://, JSONL lines or Parquet rows read with one thread); the
rows then go through `tasks.data.vldata.check_vl_rows` (real GX): bad rows (unreadable or corrupt
image, wrong mode or size, missing field, bad answer type) are quarantined with their reason and
file:line, or stop with `on_violation="fail"`. Kept rows carry their image embedded (data URL).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any

from tasks.core.stage import StageError
from tasks.data.mathgen import format_number
from tasks.data.sources import Record, RowError, _read_bytes, load_source
from tasks.data.vldata import check_vl_rows, quarantine_entry

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"RIFF", "webp"))


@dataclass
class VLSource:
    """A checked user source: the rows kept (contract records, image embedded) and those set aside."""

    uri: str
    sha256: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)


def data_url(data: bytes) -> str:
    """A `data:image/<format>;base64,` URL of image bytes (format from the magic number)."""
    kind = next((name for magic, name in _MAGIC if data.startswith(magic)), "unknown")
    return f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")


def image_reader(uri: str) -> Callable[[str], bytes]:
    """Reads an image path of a row of `uri`: relative paths from the source file's directory
    (the same bucket prefix for s3://), absolute local paths as they are."""
    if uri.startswith("s3://"):
        base = uri.rsplit("/", 1)[0]

        def read_s3(path: str) -> bytes:
            if path.startswith("s3://"):
                return _read_bytes(path)
            return _read_bytes(f"{base}/{PurePosixPath(path)}")

        return read_s3
    base_dir = Path(uri).parent

    def read_local(path: str) -> bytes:
        return (base_dir / path).read_bytes()

    return read_local


def _image(row: dict[str, Any], read: Callable[[str], bytes]) -> Any:
    """The row's image as a data URL when it can be read; otherwise what was given (the contract
    reports why it does not decode)."""
    value = row.get("image")
    if value is None and "image_b64" in row:
        value = row["image_b64"]
        if not isinstance(value, str):
            return value
        try:
            return data_url(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            return "data:image/unknown;base64," + value  # fails the contract's decode check
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return data_url(bytes(value))
    if isinstance(value, str) and value and not value.startswith("data:"):
        try:
            return data_url(read(value))
        except Exception:  # missing file, S3 error: the contract's reader raises it again, named
            return value
    return value


def _answer_type(row: dict[str, Any]) -> Any:
    if "answer_type" in row:
        return row["answer_type"]
    answer = row.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool):
        return "int"
    if isinstance(answer, float):
        return "float"
    return "choice" if row.get("choices") is not None else "text"


def _answer(value: Any) -> Any:
    if isinstance(value, bool):
        return value  # not a string: fails the contract's type check
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        return format_number(Fraction(repr(value)))
    return value


def vl_record(record: Record, stem: str, read: Callable[[str], bytes]) -> dict[str, Any]:
    """The contract record of one user row (missing fields stay missing: the contract names them)."""
    row = record.row
    out: dict[str, Any] = {
        "id": row.get("id", f"{stem}-{record.line}"),
        "image": _image(row, read),
        "task": row.get("task", "user"),
        "answer_type": _answer_type(row),
    }
    for name in ("question", "answer"):
        if row.get(name) is not None:
            out[name] = _answer(row[name]) if name == "answer" else row[name]
    choices = row.get("choices")
    if choices is not None:
        out["choices"] = list(choices) if isinstance(choices, (list, tuple)) else choices
    if isinstance(out["id"], int) and not isinstance(out["id"], bool):
        out["id"] = str(out["id"])
    out["source"] = stem
    return out


def load_vl_source(uri: str, ctx, bounds, on_violation: str = "quarantine") -> VLSource:
    """Reads one user image-text file (local path or s3://; JSONL or Parquet) and checks its rows.

    Args:
        uri: the file; image paths in it are relative to its directory.
        ctx: a `data_contracts.context.ContractContext`.
        bounds: `data_contracts.vl.ImageBounds` (the patch grid of the model to train).
        on_violation: "quarantine" or "fail" (the first run with bad rows raises, naming them).

    Raises:
        StageError: the file as a whole is bad (missing, not JSONL/Parquet, empty, no usable column,
            no valid row).
        RowError: with on_violation "fail", a line that is not a JSON object (naming file:line).
        ContractViolation: bad rows with on_violation "fail", or a failure not attributable to rows.
    """
    source = load_source(uri)
    stem = uri.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
    read = image_reader(uri)
    result = VLSource(uri=uri, sha256=source.sha256)
    rows, labels = [], []
    for record in source.records:
        if record.error is not None:
            if on_violation == "fail":
                raise RowError(f"{record.where}: {record.error}")
            reason = {"check": "source row", "description": record.error}
            result.quarantined.append(
                quarantine_entry(record.where, record.row, [reason], file=uri, line=record.line)
            )
            continue
        rows.append(vl_record(record, stem, read))
        labels.append(record.where)
    if not rows:
        raise StageError(f"{uri}: no JSON object rows")
    lines = {record.where: record for record in source.records}
    checked = check_vl_rows(
        ctx, rows, labels, bounds, read, on_violation, name="vl_source_" + re.sub(r"\W", "_", stem)
    )
    by_label = dict(zip(labels, rows))
    for label in labels:
        if label in checked.reasons:
            entry = quarantine_entry(
                label, lines[label].row, checked.reasons[label], file=uri, line=lines[label].line
            )
            result.quarantined.append(entry)
        else:
            result.rows.append(by_label[label])
    result.quarantined.sort(key=lambda q: q["line"])
    if not result.rows:  # a source that contributes nothing is almost always a wrong path or format
        first = result.quarantined[0]
        reason = first["reasons"][0]
        raise StageError(
            f"{uri}: every row is bad, none kept; first: {first['where']}: {reason['description']}"
            + (f" ({reason['detail']})" if reason.get("detail") else "")
        )
    return result
