"""Property-based tests of the data path (user sources -> prepare_data -> validate_data), no mocks.

Hypothesis mixes generated malformed rows into generated valid math and corpus rows (JSONL, and a
Parquet corpus file) and runs the real stages in both `validate_data.on_violation` modes:
a malformed row never reaches `data/validated`; in `quarantine` mode no valid row is lost; in `fail`
mode the first bad row's `file:line` is named and nothing is published.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_contracts.overlap import paragraph_keys
from tasks.core.files import read_jsonl
from tasks.core.params import load_params
from tasks.core.stage import StageError
from tasks.data.mathgen import Problem, generate_problems, problem_key
from tasks.prepare_data import problem_texts
from tasks.prepare_data import run as prepare
from tasks.validate_data import run as validate

REPO = Path(__file__).resolve().parents[2]
LEVELS = [1, 2, 3]
NUM_EVAL, NUM_RL, NUM_SELECT = 6, 8, 3
PROPERTY_SETTINGS = settings(  # quarantine mode: ~4 s per example on 2 cores (GX); fail mode: ms
    max_examples=10,
    deadline=None,
    database=None,  # nothing written into the repository; a failure prints its example
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _pool(seed: int) -> list[Problem]:
    """Generated problems with pairwise different problem keys (each one its own split group) and no
    paragraph of their question or worked solution in common (prepare_data's overlap rule, so the select
    split never has to skip one: every valid problem has a place)."""
    out, seen = [], set()
    for p in generate_problems(200, LEVELS, seed=seed):
        keys = {problem_key(p.question)}.union(*(paragraph_keys(t) for t in problem_texts(p)))
        if not keys & seen:
            seen |= keys
            out.append(p)
    return out


# --- valid rows -----------------------------------------------------------------------------------


def _valid_math_row(p: Problem, style: int) -> dict[str, Any]:
    """One valid user math row in one of the accepted shapes."""
    if style == 0:  # GSM8K: the worked solution in 'answer'
        return {"question": p.question, "answer": p.solution}
    if style == 1:  # a bare number (JSON number), with its level
        value = float(p.answer) if "." in p.answer else int(p.answer)
        return {"question": p.question, "answer": value, "level": p.level}
    if style == 2:  # answer + separate solution
        return {"question": p.question, "answer": p.answer, "solution": p.solution}
    return {"question": p.question, "answer": p.answer}  # no solution: '#### answer' is added


_WORDS = (
    "river garden module library baker station window pattern signal orange market quiet bridge "
    "harbor lantern meadow pencil thunder violet winter yellow canyon dolphin falcon glacier island "
    "jungle kettle ladder mirror needle ocean parcel quarry rocket saddle tunnel velvet walnut"
).split()


def _valid_text(rng: random.Random, i: int) -> str:
    """A prose document of 300-700 characters, unlike every other (distinct random word sequences)."""
    sentences = []
    while sum(len(s) + 1 for s in sentences) < rng.randint(300, 700):
        words = rng.sample(_WORDS, 8)
        sentences.append(f"The {words[0]} near the {words[1]} saw {words[2]} and {i} {' '.join(words[3:])}.")
    return f"Note {i}. " + " ".join(sentences)


# --- malformed rows: (kind, raw JSONL line or Parquet row) ---------------------------------------

_BAD_MATH_KINDS = [
    "answer_word",
    "answer_null",
    "answer_bool",
    "answer_list",
    "answer_object",
    "answer_empty",
    "answer_nan",
    "answer_infinite",
    "answer_fraction",
    "level_bool",
    "level_string",
    "level_float",
    "level_out_of_range",
    "question_missing",
    "question_empty",
    "question_number",
    "question_list",
    "solution_disagrees",
    "solution_and_worked_answer",
    "worked_answer_without_number",
    "not_json",
    "json_list",
    "json_number",
    "json_string",
    "json_null",
    "unknown_keys",
]
_BAD_TEXT_KINDS = ["text_null", "text_empty", "text_blank", "text_number", "text_list", "text_object"]
_PARQUET_BAD_TEXT_KINDS = ["text_null", "text_empty", "text_blank"]


def _bad_math_line(kind: str, p: Problem) -> str:
    q, a, s = p.question, p.answer, p.solution
    wrong = str(int(float(a)) + 7)
    rows: dict[str, Any] = {
        "answer_word": {"question": q, "answer": "seven"},
        "answer_null": {"question": q, "answer": None},
        "answer_bool": {"question": q, "answer": True},
        "answer_list": {"question": q, "answer": [a]},
        "answer_object": {"question": q, "answer": {"value": a}},
        "answer_empty": {"question": q, "answer": "  "},
        "answer_fraction": {"question": q, "answer": "1/3"},
        "level_bool": {"question": q, "answer": a, "level": True},
        "level_string": {"question": q, "answer": a, "level": "2"},
        "level_float": {"question": q, "answer": a, "level": 2.0},
        "level_out_of_range": {"question": q, "answer": a, "level": 7},
        "question_missing": {"answer": a, "solution": s},
        "question_empty": {"question": "", "answer": a},
        "question_number": {"question": 12, "answer": a},
        "question_list": {"question": [q], "answer": a},
        "solution_disagrees": {"question": q, "answer": wrong, "solution": s},
        "solution_and_worked_answer": {"question": q, "answer": s, "solution": s},
        "worked_answer_without_number": {"question": q, "answer": s.rsplit("####", 1)[0] + "#### "},
        "json_list": [q, a],
        "json_number": 42,
        "json_string": q,
        "json_null": None,
        "unknown_keys": {"prompt": q, "label": a},
    }
    if kind == "answer_nan":  # JSON extension that Python's json reads as float('nan')
        return f'{{"question": {json.dumps(q)}, "answer": NaN}}'
    if kind == "answer_infinite":  # 1e400 is read as float('inf')
        return f'{{"question": {json.dumps(q)}, "answer": 1e400}}'
    if kind == "not_json":
        return f'{{"question": {json.dumps(q)}, "answer": '
    return json.dumps(rows[kind])


def _bad_text_row(kind: str, i: int) -> dict[str, Any]:
    value = {
        "text_null": None,
        "text_empty": "",
        "text_blank": " \t ",
        "text_number": 3.5,
        "text_list": [f"bad document {i}"],
        "text_object": {"body": f"bad document {i}"},
    }[kind]
    return {"text": value, "source": "bad"}


@st.composite
def datasets(draw, every_kind: bool):
    """(seed, math styles, corpus format, number of valid documents, bad rows as (kind, position)):
    the rows themselves are derived from the seed.

    every_kind: each kind of bad row at least once (plus up to 3 more math ones), at drawn positions;
    otherwise a drawn prefix of a drawn order of the kinds (at least one bad row): the first bad row of
    the files can be of any kind.
    """
    seed = draw(st.integers(0, 2**20))
    n_math = draw(st.integers(30, 40))
    styles = draw(st.lists(st.integers(0, 3), min_size=n_math, max_size=n_math))
    corpus_format = draw(st.sampled_from(["jsonl", "parquet"]))
    n_text = draw(st.integers(6, 10))
    text_kinds = _PARQUET_BAD_TEXT_KINDS if corpus_format == "parquet" else _BAD_TEXT_KINDS
    math_kinds = draw(st.permutations(_BAD_MATH_KINDS))
    text_kinds = draw(st.permutations(text_kinds))
    if every_kind:
        math_kinds += draw(st.lists(st.sampled_from(_BAD_MATH_KINDS), max_size=3))
    else:
        math_kinds = math_kinds[: draw(st.integers(0, len(math_kinds)))]
        text_kinds = text_kinds[: draw(st.integers(0 if math_kinds else 1, len(text_kinds)))]
    return {
        "seed": seed,
        "styles": styles,
        "corpus_format": corpus_format,
        "n_text": n_text,
        "bad_math": [(kind, draw(st.integers(0, n_math))) for kind in math_kinds],
        "bad_text": [(kind, draw(st.integers(0, n_text))) for kind in text_kinds],
    }


def _write_sources(tmp: Path, spec: dict) -> dict[str, Any]:
    """Writes math.jsonl and corpus.jsonl/.parquet; returns the valid rows and the bad rows' locations."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    seed, styles = spec["seed"], spec["styles"]
    pool = _pool(seed)
    assert len(pool) >= len(styles) + len(spec["bad_math"]), len(pool)
    valid, spare = pool[: len(styles)], pool[len(styles) :]
    lines: list[tuple[str, str | None]] = [
        (json.dumps(_valid_math_row(p, style)), None) for p, style in zip(valid, styles)
    ]
    for j, (kind, at) in enumerate(spec["bad_math"]):  # a bad row's question is no valid row's question
        lines.insert(min(at, len(lines)), (_bad_math_line(kind, spare[j]), kind))
    math_file = tmp / "math.jsonl"
    math_file.write_text("".join(line + "\n" for line, _ in lines))
    bad = [(f"{math_file}:{n}", kind) for n, (_, kind) in enumerate(lines, 1) if kind]

    rng = random.Random(seed)
    texts = [_valid_text(rng, i) for i in range(spec["n_text"])]
    docs: list[tuple[dict[str, Any], str | None]] = [({"text": t, "source": "wiki"}, None) for t in texts]
    for i, (kind, at) in enumerate(spec["bad_text"]):
        docs.insert(min(at, len(docs)), (_bad_text_row(kind, i), kind))
    if spec["corpus_format"] == "parquet":
        corpus_file = tmp / "corpus.parquet"
        pq.write_table(pa.Table.from_pylist([d for d, _ in docs]), corpus_file)
        bad += [(f"{corpus_file}:row {n}", kind) for n, (_, kind) in enumerate(docs, 1) if kind]
    else:
        corpus_file = tmp / "corpus.jsonl"
        corpus_file.write_text("".join(json.dumps(d) + "\n" for d, _ in docs))
        bad += [(f"{corpus_file}:{n}", kind) for n, (_, kind) in enumerate(docs, 1) if kind]
    bad_questions = {
        spare[j].question for j, (kind, _) in enumerate(spec["bad_math"]) if kind != "question_number"
    }
    return {
        "files": [math_file, corpus_file],
        "valid_questions": [p.question for p in valid],
        "valid_texts": texts,
        "bad": bad,  # (file:line, kind) in file order
        "bad_questions": bad_questions,
    }


def _params(tmp: Path, files: list[Path], n_math: int, mode: str):
    return load_params(
        REPO / "params.yaml",
        {
            **{f"paths.{k}_dir": str(tmp / k) for k in ("data", "metrics", "plots", "reports")},
            "data.sources": [str(f) for f in files],
            "data.embedded": "never",
            "data.math_levels": LEVELS,
            "data.num_eval": NUM_EVAL,
            "data.num_rl": NUM_RL,
            "data.num_sft": n_math - NUM_EVAL - NUM_RL - NUM_SELECT,  # every valid problem has a place
            "data.num_select": NUM_SELECT,
            # what reads a fixed number of select rows (rl's selection, compress's healing) fits in them
            "rl.select_prompts": 0,
            "compress.solution_rows": 1,
            "data.select_corpus_chars": 1,  # one document
            "data.val_fraction": 0.2,
            "data.max_corpus_docs": 300,
            "validate_data.on_violation": mode,
            "validate_data.max_quarantine_fraction": 0.5,
        },
    )


def _fresh(tmp_path_factory, name: str) -> Path:
    return tmp_path_factory.mktemp(name)  # a new directory per example


@PROPERTY_SETTINGS
@given(spec=datasets(every_kind=True))
def test_quarantine_publishes_every_valid_row_and_no_bad_one(tmp_path_factory, spec):
    tmp = _fresh(tmp_path_factory, "quarantine")
    src = _write_sources(tmp, spec)
    params = _params(tmp, src["files"], len(spec["styles"]), "quarantine")
    metrics = prepare(params)
    assert metrics["user_rows_quarantined"] == len(src["bad"])
    checked = validate(params)
    assert checked["source_rows_quarantined"] == len(src["bad"])  # n/n bad rows caught
    assert checked["rows_quarantined"] == len(src["bad"])  # and no valid row set aside by the contracts

    validated = tmp / "data" / "validated"
    splits = {
        "sft": [r["prompt"] for r in read_jsonl(validated / "sft.jsonl")],
        "rl": [r["question"] for r in read_jsonl(validated / "rl.jsonl")],
        "eval": [r["question"] for r in read_jsonl(validated / "eval.jsonl")],
        "select": [r["prompt"] for r in read_jsonl(validated / "select.jsonl")],
    }
    # corpus_val's math documents (question, then solution): held-out problems of their own groups
    splits["corpus_val"] = [
        r["text"].split("\n")[0] for r in read_jsonl(validated / "corpus_val.jsonl") if r["source"] == "math"
    ]
    published = [q for rows in splits.values() for q in rows]
    for question in src["valid_questions"]:  # 0 valid rows lost, each in exactly one split
        assert published.count(question) == 1, question
    assert sorted(published) == sorted(src["valid_questions"])
    assert not set(published) & src["bad_questions"]
    corpus = read_jsonl(validated / "corpus_train.jsonl") + read_jsonl(validated / "corpus_val.jsonl")
    select_corpus = read_jsonl(validated / "select_corpus.jsonl")
    general = [r["text"] for r in corpus if r["source"] != "math"]
    assert len(select_corpus) == 1 and len(splits["select"]) == NUM_SELECT
    assert sorted(general + [r["text"] for r in select_corpus]) == sorted(src["valid_texts"])
    assert not {r["source"] for r in corpus} & {"bad"}
    math_text = " ".join(r["text"] for r in corpus if r["source"] == "math")
    assert not any(q in math_text for q in src["bad_questions"])

    quarantined = read_jsonl(tmp / "data" / "quarantine" / "sources.jsonl") if src["bad"] else []
    assert sorted(r["where"] for r in quarantined) == sorted(where for where, _ in src["bad"])


@settings(PROPERTY_SETTINGS, max_examples=40)
@given(spec=datasets(every_kind=False))
def test_fail_mode_names_the_first_bad_row_and_publishes_nothing(tmp_path_factory, spec):
    tmp = _fresh(tmp_path_factory, "fail")
    src = _write_sources(tmp, spec)
    params = _params(tmp, src["files"], len(spec["styles"]), "fail")
    first, kind = src["bad"][0]
    with pytest.raises(StageError) as caught:
        prepare(params)
    assert str(caught.value).startswith(f"{first}: "), (kind, str(caught.value))
    assert not (tmp / "data" / "raw").exists()
    with pytest.raises(StageError, match="run the prepare_data stage first"):
        validate(params)
    assert not (tmp / "data" / "validated").exists()
