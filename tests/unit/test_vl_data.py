"""The image-text data contract (real Great Expectations): generated splits pass it and are disjoint,
every kind of bad image or row is quarantined with its reason (nothing valid dropped), user sources in
JSONL (image paths, base64) and Parquet (bytes) go through the same checks."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from data_contracts.context import ContractContext
from data_contracts.vl import ImageBounds
from tasks.core.stage import ContractViolation, StageError
from tasks.data.sources import RowError
from tasks.data.vldata import check_vl_rows, read_vl_split, write_vl_splits
from tasks.data.vlgen import TASKS
from tasks.data.vlsources import load_vl_source

COUNTS = {"train": 30, "select": 10, "eval": 20}
BOUNDS = ImageBounds(grid=16, min_side=16, max_side=256)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return ContractContext(tmp_path_factory.mktemp("contracts"))


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    out = tmp_path_factory.mktemp("vl") / "splits"
    manifest = write_vl_splits(out, COUNTS, seed=5, embed=False)
    return out, manifest


def _png(mode="RGB", size=(64, 64), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, "white" if mode != "1" else 1).save(buf, format=fmt)
    return buf.getvalue()


def _url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _pixels(row, reader) -> str:
    image = row["image"]
    data = base64.b64decode(image.split(",", 1)[1]) if image.startswith("data:") else reader(image)
    return hashlib.sha256(np.asarray(Image.open(io.BytesIO(data))).tobytes()).hexdigest()


def test_bounds_from_the_vision_config():
    bounds = ImageBounds.from_vision_config(SimpleNamespace(patch_size=16, spatial_merge_size=2))
    assert (bounds.grid, bounds.min_side) == (32, 32)
    with pytest.raises(ValueError, match="bad image bounds"):
        ImageBounds(grid=16, min_side=8)


def test_generated_splits_pass_the_contract_and_are_disjoint(splits, ctx, tmp_path):
    out, manifest = splits
    assert {f: v["rows"] for f, v in manifest["files"].items()} == {
        f"{s}.jsonl": n for s, n in COUNTS.items()
    }
    assert manifest["mix"]["eval"] == {t: 2 for t in sorted(TASKS)}  # the held-out VQA mix by task type
    seen: dict[str, set] = {}
    for split in COUNTS:
        rows, labels, reader = read_vl_split(out / f"{split}.jsonl")
        assert {r["split"] for r in rows} == {split} and all(r["image"].startswith("images/") for r in rows)
        checked = check_vl_rows(ctx, rows, labels, BOUNDS, reader, on_violation="fail")
        assert checked.kept == labels and not checked.reasons and checked.evaluated > 25
        keys = {json.dumps(r["spec"], sort_keys=True) for r in rows} | {_pixels(r, reader) for r in rows}
        for other, other_keys in seen.items():
            assert not keys & other_keys, (split, other)
        seen[split] = keys
    # The same seed embedded: the same images, as PNG data URLs.
    write_vl_splits(tmp_path / "emb", {"eval": 20}, seed=5, embed=True)
    emb, _, emb_reader = read_vl_split(tmp_path / "emb" / "eval.jsonl")
    files, _, reader = read_vl_split(out / "eval.jsonl")
    assert all(r["image"].startswith("data:image/png;base64,") for r in emb)
    assert [_pixels(r, emb_reader) for r in emb] == [_pixels(r, reader) for r in files]
    # An unknown split is refused before anything is written.
    with pytest.raises(ValueError, match="counts="):
        write_vl_splits(tmp_path / "bad", {"test": 3}, seed=5)
    assert not (tmp_path / "bad").exists()


# row index -> (how it is broken, the failing column, a piece of the reason's description or detail)
BREAKAGES = {
    1: (lambda r: r.update(image=_url(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)), "_image_error", "not a PNG"),
    2: (lambda r: r.update(image=_url(_png()[:60])), "_image_error", "does not decode"),
    3: (lambda r: r.update(image=_url(_png("L"))), "_image_mode", "'L'"),
    4: (lambda r: r.update(image=_url(_png("RGBA"))), "_image_mode", "'RGBA'"),
    5: (lambda r: r.update(image=_url(_png(size=(64, 60)))), "_image_off_grid", "64x60"),
    6: (lambda r: r.update(image=_url(_png(size=(512, 64)))), "_image_width", "512"),
    7: (lambda r: r.update(image="images/eval/missing.png"), "_image_error", "cannot read image file"),
    8: (lambda r: r.pop("question"), "question", "question present"),
    9: (lambda r: r.pop("image"), "image", "image present"),
    10: (lambda r: r.update(answer_type="int", answer="three", task="arithmetic"), "answer", "whole number"),
    11: (lambda r: r.update(answer_type="text", task="scene_count"), "_task_answer_type", "scene_count:text"),
    12: (lambda r: r.update(answer_type="float", answer="1/2", task="geometry"), "answer", "decimal number"),
    13: (
        lambda r: r.update(answer_type="choice", answer="purple", choices=["red"], task="chart_pie"),
        "_answer_in_choices",
        "one of the row's choices",
    ),
    14: (lambda r: r.update(answer=7), "answer", "answer is a string"),
    15: (lambda r: r.update(colour="red"), "_unknown_fields", "colour"),
    16: (lambda r: r.update(id="vl-eval-000000"), "id", "duplicate of"),
    17: (lambda r: r.update(image="data:text/plain;base64,aGk="), "_image_error", "data URL must start"),
}


def test_each_bad_row_is_quarantined_with_its_reason(splits, ctx):
    out, _ = splits
    rows, labels, reader = read_vl_split(out / "eval.jsonl")
    for i, (breaks, _, _) in BREAKAGES.items():
        breaks(rows[i])
    checked = check_vl_rows(ctx, rows, labels, BOUNDS, reader)
    assert set(checked.reasons) == {labels[i] for i in BREAKAGES}
    assert checked.kept == [
        label for i, label in enumerate(labels) if i not in BREAKAGES
    ]  # nothing valid lost
    for i, (_, column, words) in BREAKAGES.items():
        reasons = checked.reasons[labels[i]]
        assert labels[i].endswith(f"eval.jsonl:{i + 1}")
        text = [f"{r['description']} {r.get('detail', '')}" for r in reasons if r["column"] == column]
        assert any(words in t for t in text), (i, reasons)


def test_fail_mode_names_the_file_row_and_value(splits, ctx):
    out, _ = splits
    rows, labels, reader = read_vl_split(out / "select.jsonl")
    rows[3]["image"] = _url(_png(size=(48, 40)))
    with pytest.raises(ContractViolation, match=r"select\.jsonl:4: '48x40'") as e:
        check_vl_rows(ctx, rows, labels, BOUNDS, reader, on_violation="fail")
    assert "multiples of the patch grid 16" in str(e.value)
    with pytest.raises(ContractViolation, match="at least one row"):
        check_vl_rows(ctx, [], [], BOUNDS, reader)


def test_user_sources_jsonl_paths_and_base64_parquet_bytes(tmp_path, ctx):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "img").mkdir()
    good = _png(size=(32, 48))
    (tmp_path / "img" / "a.png").write_bytes(good)
    (tmp_path / "img" / "gray.png").write_bytes(_png("L", (32, 32)))
    jpeg = _png(size=(32, 32), fmt="JPEG")
    lines = [
        {"image": "img/a.png", "question": "How many squares?", "answer": 3},
        {
            "image_b64": base64.b64encode(jpeg).decode(),
            "question": "Colour?",
            "answer": "red",
            "choices": ["red", "blue"],
        },
        {"image": _url(good), "question": "Area?", "answer": 7.5, "task": "geometry"},
        {"image": "img/gone.png", "question": "Q?", "answer": "a"},
        "not json",
        {"image": "img/gray.png", "question": "Q?", "answer": "a"},
        {"image_b64": "!!!", "question": "Q?", "answer": "a"},
        {"image": "img/a.png", "answer": "a"},
        {"image": "img/a.png", "question": "Q?", "answer": "many", "answer_type": "int"},
    ]
    src = tmp_path / "vqa.jsonl"
    src.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    result = load_vl_source(str(src), ctx, BOUNDS)
    assert [r["question"] for r in result.rows] == ["How many squares?", "Colour?", "Area?"]
    assert [(r["answer"], r["answer_type"]) for r in result.rows] == [
        ("3", "int"),
        ("red", "choice"),
        ("7.5", "float"),
    ]
    assert all(r["image"].startswith("data:image/") for r in result.rows)
    assert Image.open(io.BytesIO(base64.b64decode(result.rows[0]["image"].split(",")[1]))).size == (32, 48)
    bad = {q["line"]: q for q in result.quarantined}
    assert sorted(bad) == [4, 5, 6, 7, 8, 9] and all(q["file"] == str(src) for q in bad.values())
    assert bad[5]["where"] == f"{src}:5" and "not valid JSON" in bad[5]["reasons"][0]["description"]
    assert "cannot read image file 'img/gone.png'" in bad[4]["reasons"][0]["detail"]
    assert [r["column"] for r in bad[6]["reasons"]] == ["_image_mode"]
    assert "not valid base64" in bad[7]["reasons"][0]["detail"]
    assert [r["column"] for r in bad[8]["reasons"]] == ["question"]
    assert [r["column"] for r in bad[9]["reasons"]] == ["answer"]
    (tmp_path / "moved.jsonl").write_text(
        json.dumps({"image": "a.png", "question": "Q?", "answer": "a"}) + "\n"
    )
    with pytest.raises(StageError, match=r"every row is bad.*moved\.jsonl:1: image decodes.*'a\.png'"):
        load_vl_source(str(tmp_path / "moved.jsonl"), ctx, BOUNDS)
    with pytest.raises(RowError, match=r"vqa\.jsonl:5: not valid JSON"):
        load_vl_source(str(src), ctx, BOUNDS, on_violation="fail")

    table = pa.table(
        {
            "image": [good, b"\x89PNG garbage", _png(size=(32, 20))],
            "question": ["How many bars?", "Q?", "Q?"],
            "answer": ["4", "a", "b"],
        }
    )
    pq.write_table(table, tmp_path / "vqa.parquet")
    result = load_vl_source(str(tmp_path / "vqa.parquet"), ctx, BOUNDS)
    assert [r["id"] for r in result.rows] == ["vqa-1"]
    bad = {q["line"]: q for q in result.quarantined}
    assert bad[2]["where"].endswith("vqa.parquet:row 2") and bad[2]["reasons"][0]["column"] == "_image_error"
    assert bad[2]["row"]["image"].startswith("<12 bytes")
    assert bad[3]["reasons"][0]["detail"] == "'32x20'"
    with pytest.raises(ContractViolation, match=r"vqa\.parquet:row 2"):
        load_vl_source(str(tmp_path / "vqa.parquet"), ctx, BOUNDS, on_violation="fail")
    # Hugging Face datasets' Image feature: a {"bytes", "path"} struct (bytes, or a path beside the file).
    images = [
        {"bytes": good, "path": None},
        {"bytes": None, "path": "img/a.png"},
        {"bytes": b"xx", "path": None},
    ]
    pq.write_table(
        pa.table({"image": images, "question": ["A?", "B?", "C?"], "answer": ["1", "2", "3"]}),
        tmp_path / "hf.parquet",
    )
    result = load_vl_source(str(tmp_path / "hf.parquet"), ctx, BOUNDS)
    assert [r["question"] for r in result.rows] == ["A?", "B?"]
    assert [(q["line"], q["row"]["image"]["bytes"]) for q in result.quarantined] == [
        (3, "<2 bytes, sha256 " + hashlib.sha256(b"xx").hexdigest()[:16] + ">")
    ]
