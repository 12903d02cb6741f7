"""Image-text datasets: the VL contract run with quarantine, and the generated splits written to disk.

    write_vl_splits("data/vl", {"train": 400, "select": 50, "eval": 100}, seed=0)   # embed=True
    rows, labels, reader = read_vl_split("data/vl/eval.jsonl")
    checked = check_vl_rows(ctx, rows, labels, ImageBounds(grid=16), reader)

`write_vl_splits` draws train images from the train hash range and select / eval from the two halves
of the held-out range (`vlgen.heldout_part`), checks that no two splits share a spec or pixels, and
writes one JSONL per split (images embedded as PNG data URLs, or PNG files under `images/<split>/`)
plus `manifest.json` (rows, sha256, the task mix of each split), atomically. `check_vl_rows` runs
the `data_contracts.vl` suite (real GX) and quarantines bad rows with their reasons, as
validate_data does for text rows. The VL profile's prepare_data and validate_data run them
(tasks/training/vl_pipeline.py). Choices: docs/choices.md#vision-language-family.
"""

from __future__ import annotations

import base64
import collections
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.files import atomic_dir, sha256_file, write_json, write_jsonl
from tasks.core.stage import ContractViolation, StageError, log
from tasks.data.vlgen import VQAItem, check_disjoint, generate_vqa

VL_SPLIT_NAMES = ("train", "select", "eval")
PNG_DATA_URL = "data:image/png;base64,"


@dataclass
class VLCheck:
    """The outcome of `check_vl_rows`.

    Attributes:
        kept: labels of the rows that passed, in input order.
        reasons: label -> quarantine reasons ({"expectation", "column", "description"[, "detail"]}).
        evaluated: expectations evaluated on all rows; failed: names of the failed expectations.
    """

    kept: list[str]
    reasons: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    evaluated: int = 0
    failed: list[str] = field(default_factory=list)


def check_vl_rows(
    ctx,
    rows: Sequence[dict[str, Any]],
    labels: Sequence[str],
    bounds,
    read_image: Callable[[str], bytes],
    on_violation: str = "quarantine",
    name: str = "vl",
    sample_rows: int = 5,
) -> VLCheck:
    """Validates image-text rows with the VL suite; bad rows are quarantined (or the first run fails).

    Args:
        ctx: a `data_contracts.context.ContractContext` (the GX project; results go to its Data Docs).
        rows / labels: the records and one label each ("train.jsonl:3"), named in every error.
        bounds: `data_contracts.vl.ImageBounds`.
        read_image: reads an image path of a row (`data_contracts.vl.local_reader`).
        on_violation: "quarantine" (bad rows set aside with their reasons) or "fail".
        name: the suite / asset name in the GX project.

    Raises:
        ContractViolation: naming the failed expectations and sample rows with their values, when
            on_violation is "fail", when a failure is not attributable to rows (e.g. no rows), or when
            the kept rows still fail.
    """
    from data_contracts.context import quarantine_rows
    from data_contracts.vl import DETAIL_COLUMNS, build_vl_frame, build_vl_suite

    if on_violation not in ("quarantine", "fail"):
        raise StageError(f"on_violation={on_violation!r}: must be 'quarantine' or 'fail'")
    labels = list(labels)

    def validate(subset: list[str], run_name: str):
        index = {label: i for i, label in enumerate(labels)}
        try:
            frame = build_vl_frame([rows[index[label]] for label in subset], subset, bounds, read_image)
        except ValueError as e:
            raise ContractViolation(f"{name}: {e}") from None
        return ctx.validate(name, frame, build_vl_suite(bounds, name), run_name=run_name)

    if len(set(labels)) != len(labels):
        raise StageError(f"{name}: row labels must be unique")
    ctx.forget(name)
    result = validate(labels, "raw")
    check = VLCheck(kept=labels, evaluated=result.evaluated, failed=sorted({f.name for f in result.failures}))
    if result.success:
        return check
    table_level = [f.name for f in result.failures if not f.row_level]
    if on_violation == "fail" or table_level:
        why = "" if on_violation == "fail" else f"; not attributable to rows: {', '.join(table_level)}"
        raise ContractViolation(
            f"{name}: {len(result.failures)} of {result.evaluated} expectations failed "
            f"(on_violation={on_violation}){why}\n" + result.describe(sample_rows),
            [{"suite": name, **f.to_dict(max_rows=sample_rows)} for f in result.failures],
        )
    quarantine_rows(check.reasons, labels, result.failures, detail_columns=DETAIL_COLUMNS)
    check.kept = [label for label in labels if label not in check.reasons]
    log.info("%s: quarantining %d of %d rows", name, len(check.reasons), len(labels))
    if check.kept:
        recheck = validate(check.kept, "validated")
        if not recheck.success:
            raise ContractViolation(
                f"{name}: the rows kept after quarantine still fail\n" + recheck.describe(sample_rows),
                [{"suite": name, **f.to_dict(max_rows=sample_rows)} for f in recheck.failures],
            )
    return check


def quarantine_entry(label: str, row: dict[str, Any], reasons: list[dict[str, Any]], **where: Any) -> dict:
    """A quarantine record (as validate_data's: where, reasons, row); an embedded image is abbreviated
    to its size and hash, bytes to their length."""
    return {"where": label, **where, "reasons": reasons, "row": {k: _short(v) for k, v in row.items()}}


def _short(value: Any) -> Any:
    import hashlib

    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes, sha256 {hashlib.sha256(value).hexdigest()[:16]}>"
    if isinstance(value, str) and len(value) > 200:
        digest = hashlib.sha256(value.encode()).hexdigest()[:16]
        return f"<{len(value)} characters, sha256 {digest}: {value[:40]}...>"
    if isinstance(value, dict):  # e.g. a datasets {"bytes", "path"} image struct
        return {str(k): _short(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_short(v) for v in value]
    return json.loads(json.dumps(value, default=repr))


def vl_row(item: VQAItem, row_id: str, image: str, split: str) -> dict[str, Any]:
    """The contract's record of a generated item (`image`: a data URL or a path) in `split`."""
    return {
        "id": row_id,
        "image": image,
        "question": item.question,
        "answer": item.answer,
        "answer_type": item.answer_type,
        "task": item.task,
        "split": split,
        "choices": list(item.choices),
        "spec": item.spec,
    }


def generate_vl_splits(
    counts: dict[str, int], seed: int, size: int = 64, block: int = 16, tasks: Sequence[str] | None = None
) -> dict[str, list[VQAItem]]:
    """Items of each split in `counts` (train / select / eval), tasks cycling so every split has the
    same task mix; checked pairwise disjoint (spec and pixels).

    Raises:
        ValueError: an unknown split or a negative count; shared images (a generator bug).
    """
    unknown = sorted(set(counts) - set(VL_SPLIT_NAMES))
    if unknown or any(not isinstance(n, int) or n < 0 for n in counts.values()):
        raise ValueError(f"counts={counts}: splits must be among {VL_SPLIT_NAMES}, counts >= 0")
    items = {}
    for split, n in counts.items():
        if split == "train":
            items[split] = generate_vqa(n, seed, "train", tasks, size=size, block=block)
        else:
            items[split] = generate_vqa(n, seed, "heldout", tasks, size=size, block=block, part=split)
    names = list(items)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            try:
                check_disjoint(items[a], items[b])
            except ValueError as e:
                raise ValueError(f"splits {a} and {b} share an image: {e}") from None
    return items


def write_vl_splits(
    out_dir: str | Path,
    counts: dict[str, int],
    seed: int,
    embed: bool = True,
    size: int = 64,
    block: int = 16,
    tasks: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Writes the generated splits to `out_dir` (replaced atomically); returns its manifest.

    `<split>.jsonl` rows are the `data_contracts.vl` records with `image` a PNG data URL (`embed`) or
    the path `images/<split>/<id>.png` relative to `out_dir`. The manifest lists each file's rows and
    sha256, the task mix of each split, the seed, image size and patch grid `block`.
    """
    items = generate_vl_splits(counts, seed, size=size, block=block, tasks=tasks)
    manifest: dict[str, Any] = {
        "seed": seed,
        "image_size": size,
        "grid": block,
        "images": "embedded" if embed else "files",
        "disjoint": "checked: no spec or pixels shared between splits",
        "files": {},
        "mix": {},
    }
    with atomic_dir(out_dir) as out:
        for split, split_items in items.items():
            rows = []
            for i, item in enumerate(split_items):
                row_id = f"vl-{split}-{i:06d}"
                png = item.png_bytes()
                if embed:
                    image = PNG_DATA_URL + base64.b64encode(png).decode("ascii")
                else:
                    image = f"images/{split}/{row_id}.png"
                    (out / image).parent.mkdir(parents=True, exist_ok=True)
                    (out / image).write_bytes(png)
                rows.append(vl_row(item, row_id, image, split))
            write_jsonl(out / f"{split}.jsonl", rows)
            manifest["files"][f"{split}.jsonl"] = {
                "rows": len(rows),
                "sha256": sha256_file(out / f"{split}.jsonl"),
            }
            manifest["mix"][split] = dict(sorted(collections.Counter(x.task for x in split_items).items()))
        write_json(out / "manifest.json", manifest)
    log.info("vl splits: %s -> %s", {s: len(v) for s, v in items.items()}, out_dir)
    return manifest


def read_vl_split(path: str | Path) -> tuple[list[dict[str, Any]], list[str], Callable[[str], bytes]]:
    """(rows, labels "path:line", image reader relative to the file's directory) of a split file.

    Raises:
        StageError: a missing file or a line that is not JSON (naming file:line).
    """
    from data_contracts.vl import local_reader
    from tasks.core.files import read_jsonl

    path = Path(path)
    rows = read_jsonl(path)
    with open(path, encoding="utf-8") as f:
        lines = [n for n, text in enumerate(f, 1) if text.strip()]
    return rows, [f"{path}:{n}" for n in lines], local_reader(path.parent)
