"""prepare_data and tasks.data.sources: the embedded default, user files (local, Parquet, S3), the
held-out checks."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from s3server import s3_server  # noqa: F401  (module-scoped real S3 server fixture)

from tasks.core.files import read_jsonl
from tasks.core.params import load_params
from tasks.core.stage import StageError
from tasks.data.corpus import clean_document, deduplicate, pieces
from tasks.data.mathgen import (
    Problem,
    answers_match,
    equation_key,
    extract_answer,
    generate_problems,
    normalize_question,
    problem_key,
    worked_steps,
)
from tasks.data.sources import Document, load_source, map_rows
from tasks.prepare_data import FILES, check_no_overlap, run, split_math

REPO = Path(__file__).resolve().parents[2]
SMALL = {"data.num_sft": 120, "data.num_rl": 30, "data.num_eval": 20, "data.max_corpus_docs": 300}
#: What reads a fixed number of select.jsonl rows (rl's selection, compress's healing decision) must fit in
#: the few data.num_select rows of these tests (load_params checks it).
FEW_SELECT = {"rl.select_prompts": 0, "compress.solution_rows": 1}


def _overrides(tmp: Path, extra: dict | None = None) -> dict:
    return {
        "paths.data_dir": str(tmp / "data"),
        "paths.metrics_dir": str(tmp / "metrics"),
        "paths.plots_dir": str(tmp / "plots"),
        **SMALL,
        **(extra or {}),
    }


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """The stage's command line, as DVC runs it, on the repo's params.yaml (smaller counts)."""
    tmp = tmp_path_factory.mktemp("prepare_cli")
    cmd = [sys.executable, "-m", "tasks.prepare_data", "--params", str(REPO / "params.yaml")]
    for key, value in _overrides(tmp).items():
        cmd += ["--set", f"{key}={value}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def test_outputs_follow_the_data_contract(cli_run):
    raw = cli_run / "data" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted([*FILES, "manifest.json"])
    train = read_jsonl(raw / "corpus_train.jsonl", required=("id", "text", "source"))
    val = read_jsonl(raw / "corpus_val.jsonl", required=("id", "text", "source"))
    sft = read_jsonl(raw / "sft.jsonl", required=("id", "prompt", "response", "answer", "level"))
    rl = read_jsonl(raw / "rl.jsonl", required=("id", "question", "answer", "level"))
    ev = read_jsonl(raw / "eval.jsonl", required=("id", "question", "solution", "answer", "level"))
    select = read_jsonl(raw / "select.jsonl", required=("id", "prompt", "response", "answer", "level"))
    select_corpus = read_jsonl(raw / "select_corpus.jsonl", required=("id", "text", "source"))
    assert (len(sft), len(rl), len(ev), len(select)) == (120, 30, 20, 200)
    for rows in (train, val, sft, rl, ev, select, select_corpus):
        assert len({r["id"] for r in rows}) == len(rows)
    for row in sft + select:
        assert extract_answer(row["response"]) == row["answer"] and row["level"] in (1, 2, 3)
    for row in ev:
        assert answers_match(extract_answer(row["solution"]), row["answer"])
    assert set(rl[0]) == {"id", "question", "answer", "level"}  # RL prompts carry no solution
    # General documents respect the length limits and are unique; math documents are the SFT problems.
    general = [r for r in train + val if r["source"] != "math"]
    assert 0 < len(general) <= 300 and {r["source"] for r in general} <= {
        "python_docstrings",
        "python_reference",
    }
    assert all(200 <= len(r["text"]) <= 4000 for r in general)
    assert len({normalize_question(r["text"]) for r in general}) == len(general)
    # corpus_train's math documents are the SFT problems; corpus_val's are problems no split holds (its
    # own problem groups), so the held-out corpus loss is measured on no trained text
    sft_docs = sorted(f"{r['prompt']}\n{r['response']}" for r in sft)
    assert sorted(r["text"] for r in train if r["source"] == "math") == sft_docs
    val_math = [r["text"] for r in val if r["source"] == "math"]
    assert len(val_math) >= 6  # ceil(0.05 x 120)
    questions = [r["prompt"] for r in sft + select] + [r["question"] for r in rl + ev]
    assert not {problem_key(t.split("\n")[0]) for t in val_math} & {problem_key(q) for q in questions}
    assert {"math", "python_docstrings"} <= {r["source"] for r in val}  # val holds both kinds of text
    assert not {r["text"] for r in val} & {r["text"] for r in train}
    manifest = json.loads((raw / "manifest.json").read_text())
    for name in FILES:
        data = (raw / name).read_bytes()
        assert manifest["files"][name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert manifest["files"][name]["rows"] == len(data.splitlines())
    assert manifest["seed"] == 1234 and manifest["embedded"] == {"mode": "auto", "corpus": True, "math": True}
    embedded = manifest["sources"]["corpus"]["embedded"]
    assert embedded["raw_texts"] > 1000 and embedded["per_source"]["python_reference"] > 0
    metrics = json.loads((cli_run / "metrics" / "prepare_data.json").read_text())
    assert metrics["sft"] == 120 and metrics["corpus_train_docs"] == len(train)
    # The healing-decision corpus: general documents (just over data.select_corpus_chars), moved out of
    # corpus_train; the documents of both together are those of a corpus without the split.
    chars = sum(len(r["text"]) for r in select_corpus)
    assert metrics["select_corpus_chars"] == chars and 40000 <= chars < 40000 + 4000
    assert metrics["select"] == 200 and metrics["select_corpus_docs"] == len(select_corpus)
    assert {r["source"] for r in select_corpus} <= {"python_docstrings", "python_reference"}
    assert len(general) + len(select_corpus) == 300
    assert (cli_run / "plots" / "prepare_data" / "prepare_data.png").stat().st_size > 1000


def test_no_train_eval_overlap(cli_run):
    raw = cli_run / "data" / "raw"
    sft = read_jsonl(raw / "sft.jsonl")
    rl = read_jsonl(raw / "rl.jsonl")
    ev = read_jsonl(raw / "eval.jsonl")
    train_questions = [r["prompt"] for r in sft] + [r["question"] for r in rl]
    for key in (normalize_question, problem_key):
        assert not {key(r["question"]) for r in ev} & {key(q) for q in train_questions}
    # ... nor the arithmetic of an eval problem (its equations, operands of a sum in either order)
    train_arithmetic = set().union(*(equation_key(r["response"]) for r in sft))
    assert all(equation_key(r["solution"]) for r in ev)
    assert not set().union(*(equation_key(r["solution"]) for r in ev)) & train_arithmetic
    assert len({problem_key(r["question"]) for r in ev}) == len(ev)  # one row per problem
    assert not {normalize_question(r["question"]) for r in rl} & {
        normalize_question(r["prompt"]) for r in sft
    }
    corpus = " ".join(r["text"].lower() for r in read_jsonl(raw / "corpus_train.jsonl"))
    assert not any(normalize_question(r["question"]) in " ".join(corpus.split()) for r in ev)


def _paragraphs(text: str) -> set[str]:
    """Normalized paragraphs, computed here without the pipeline's helpers."""
    return {" ".join(p.lower().split()) for p in re.split(r"\n\s*\n", text)} - {""}


def test_select_split_shares_no_text_with_any_other_file(cli_run):
    """The healing-decision files share no question (normalized text or problem key), no worked
    solution and no paragraph with anything a stage trains on, nor with corpus_val / eval."""
    raw = cli_run / "data" / "raw"
    rows = {name: read_jsonl(raw / name) for name in FILES}
    select, select_corpus = rows["select.jsonl"], rows["select_corpus.jsonl"]
    questions = [r["prompt"] for r in rows["sft.jsonl"]] + [
        r["question"] for f in ("rl.jsonl", "eval.jsonl") for r in rows[f]
    ]
    for key in (normalize_question, problem_key):
        assert not {key(r["prompt"]) for r in select} & {key(q) for q in questions}
    solutions = {normalize_question(worked_steps(r["response"])) for r in rows["sft.jsonl"]}
    solutions |= {normalize_question(worked_steps(r["solution"])) for r in rows["eval.jsonl"]}
    assert not {normalize_question(worked_steps(r["response"])) for r in select} & solutions
    other_texts = (
        [r["text"] for f in ("corpus_train.jsonl", "corpus_val.jsonl") for r in rows[f]]
        + [t for r in rows["sft.jsonl"] for t in (r["prompt"], r["response"])]
        + [
            t
            for f in ("rl.jsonl", "eval.jsonl")
            for r in rows[f]
            for t in (r["question"], r.get("solution", ""))
        ]
    )
    other = set().union(*map(_paragraphs, other_texts))
    assert select_corpus and not any(_paragraphs(r["text"]) & other for r in select_corpus)
    assert not any(_paragraphs(r["prompt"]) & other for r in select)
    corpus = " ".join(
        normalize_question(r["text"]) for f in ("corpus_train.jsonl", "corpus_val.jsonl") for r in rows[f]
    )
    assert not any(normalize_question(r["prompt"]) in corpus for r in select)
    # Not even a shared id or an identical document.
    ids = {r["id"] for f in FILES if not f.startswith("select") for r in rows[f]}
    assert not ids & {r["id"] for r in select + select_corpus}


def test_same_seed_gives_identical_files_in_another_process(cli_run, tmp_path):
    """In-process run (another PYTHONHASHSEED than the CLI's subprocess) -> bitwise identical files."""
    run(load_params(REPO / "params.yaml", _overrides(tmp_path)))
    for name in (*FILES, "manifest.json"):
        assert (tmp_path / "data" / "raw" / name).read_bytes() == (
            cli_run / "data" / "raw" / name
        ).read_bytes(), name
    other = load_params(
        REPO / "params.yaml",
        _overrides(tmp_path / "other", {"seed": 99, "data.embedded": "always", "data.sources": []}),
    )
    run(other)
    assert (tmp_path / "other/data/raw/sft.jsonl").read_bytes() != (
        tmp_path / "data/raw/sft.jsonl"
    ).read_bytes()


def test_check_no_overlap_raises_on_violations():
    problems = generate_problems(12, [1, 2], seed=3)
    splits = {"eval": problems[:2], "rl": problems[2:5], "sft": problems[5:]}
    assert check_no_overlap(splits, [])["eval_checked"] == 2
    named = next(p for p in splits["eval"] + splits["sft"] if _rename(p.question) != p.question)
    splits = {**splits, "eval": [named], "sft": [p for p in splits["sft"] if p is not named]}
    twin = Problem(_rename(named.question), "#### 1", "1", 1, "test")  # eval's problem, other names
    with pytest.raises(StageError, match=r"eval problems also in sft/rl with other names or goods"):
        check_no_overlap({**splits, "sft": splits["sft"] + [twin]}, [])
    # the same template with other numbers is another problem (another answer): allowed
    renumbered = Problem(_renumber(named.question), "#### 1", "1", 1, "test")
    check_no_overlap({**splits, "sft": splits["sft"] + [renumbered]}, [])
    with pytest.raises(StageError, match="eval questions also in sft/rl"):
        check_no_overlap({**splits, "rl": splits["rl"] + [named]}, [])
    with pytest.raises(StageError, match="rl questions also in sft"):
        check_no_overlap({**splits, "sft": splits["sft"] + [problems[2]]}, [])
    with pytest.raises(StageError, match="found in the CPT corpus"):
        check_no_overlap(splits, [Document(f"Some text. {named.question.upper()} More.", "user:x")])


def _renumber(question: str) -> str:
    return re.sub(r"\d+", lambda m: str(int(m.group()) + 1), question)


def _rename(question: str) -> str:
    """The question with other generator names and goods: the same problem, the same answer."""
    from tasks.data.mathgen import _NAMES

    names = [n for n, _ in _NAMES]
    swap = {a: names[(i + 7) % len(names)] for i, a in enumerate(names)}
    return re.sub(r"\b(" + "|".join(names) + r")\b", lambda m: swap[m.group()], question)


def test_split_math_keeps_problem_groups_together():
    base = generate_problems(40, [1, 2, 3], seed=5)
    twins = [
        Problem(_rename(p.question), p.solution, p.answer, p.level, p.origin)
        for p in base
        if _rename(p.question) != p.question
    ][:20]
    assert len(twins) >= 10
    splits = split_math(base + twins, num_eval=10, num_rl=10, num_sft=15, seed=1, num_select=8)
    where = {}
    for name, rows in splits.items():
        for p in rows:
            where.setdefault(problem_key(p.question), set()).add(name)
    assert all(len(s) == 1 for s in where.values())
    assert [len(splits[k]) for k in ("eval", "rl", "sft", "select")] == [10, 10, 15, 8]
    # Without a select split, eval/rl/sft are the same; spare problems only ever go to select.
    plain = split_math(base + twins, num_eval=10, num_rl=10, num_sft=15, seed=1)
    assert set(plain) == {"eval", "rl", "sft"} and all(plain[k] == splits[k] for k in plain)
    spare = generate_problems(80, [1, 2, 3], seed=6)
    more = split_math(base + twins, num_eval=10, num_rl=10, num_sft=15, seed=1, num_select=20, spare=spare)
    assert all(more[k] == splits[k] for k in plain) and len(more["select"]) == 20
    taken = {problem_key(p.question) for k in plain for p in more[k]}
    assert not {problem_key(p.question) for p in more["select"]} & taken
    with pytest.raises(StageError, match="data.num_sft=100"):
        split_math(base, num_eval=10, num_rl=10, num_sft=100, seed=1)
    with pytest.raises(StageError, match="too few for data.num_select=500"):
        split_math(base + twins, num_eval=10, num_rl=10, num_sft=15, seed=1, num_select=500, spare=spare)


def test_split_math_keeps_eval_arithmetic_out_of_training():
    """An eval problem's sum is in no training split, told in another story or with its operands
    swapped; the eval keeps one row per problem; and check_no_overlap names a violation."""

    def sum_problem(story: str, a: int, b: int, origin: str = "mathgen:test") -> Problem:
        solution = f"That is {a}+{b} = <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}"
        return Problem(story.format(a=a, b=b), solution, str(a + b), 1, origin)

    stories = ["A van goes {a} km, then {b} km. How far?", "Kai pays ${a} and ${b}. How much?"]
    pool = [sum_problem(s, a, b) for a in range(10, 40) for b in (3, 4) for s in stories]
    pool += [sum_problem(stories[0], b, a) for a in range(10, 40) for b in (3, 4)]  # operands swapped
    twins = [Problem(p.question.replace("Kai", "Mei"), p.solution, p.answer, 1, p.origin) for p in pool]
    splits = split_math(pool + twins, num_eval=8, num_rl=10, num_sft=60, seed=3)
    held = set().union(*(equation_key(p.solution) for p in splits["eval"]))
    assert len(held) == 8 and len({problem_key(p.question) for p in splits["eval"]}) == 8
    for name in ("rl", "sft"):
        assert not held & set().union(*(equation_key(p.solution) for p in splits[name])), name
    check_no_overlap(splits, [])
    leaked = dict(
        splits,
        sft=[
            *splits["sft"],
            sum_problem("{a} and {b} make?", *sorted(int(x) for x in next(iter(held)).split("+"))),
        ],
    )
    with pytest.raises(StageError, match=r"eval problems whose worked arithmetic is in sft/rl"):
        check_no_overlap(leaked, [])
    # A user's problems are never dropped: an eval group keeps all of its user rows.
    users = [sum_problem(s, a, b, "user:mine.jsonl") for a in range(10, 40) for b in (3, 4) for s in stories]
    splits = split_math(users, num_eval=8, num_rl=10, num_sft=60, seed=3)
    assert len(splits["eval"]) >= 8 and len({equation_key(p.solution) for p in splits["eval"]}) < 8
    check_no_overlap(splits, [])


def test_cleaning_and_near_duplicate_removal():
    prose = (
        "The parser reads the configuration file and returns a mapping of section names to "
        "dictionaries of options. Each value is a string unless a converter is given."
    )
    code = ">>> parser = ConfigParser()\n>>> parser.read('example.ini')\n['example.ini']"
    paragraphs, reason = clean_document(
        f"{prose}\n\n{code}\n\n:class:`Foo` is used\tby ``bar``.\x07", prose_only=True
    )
    assert reason is None and paragraphs == [prose, "Foo is used by bar."]
    assert clean_document(f"{code}\n\n{code}\n\n{code}\n\n{prose}", prose_only=True)[1] == "code_heavy"
    assert (
        clean_document(
            "Ceci n'est pas une phrase anglaise, mais une phrase française très longue " * 3, prose_only=True
        )[1]
        == "not_english"
    )
    assert clean_document(code, prose_only=False)[0] == [" ".join(code.split())]  # user text: kept
    from collections import Counter

    from data_contracts.suites import SENSITIVE_PATTERNS

    sensitive = re.compile("|".join(f"(?:{regex})" for _, regex, _ in SENSITIVE_PATTERNS))
    counts: Counter[str] = Counter()
    author = "Written by Jane Doe <jane.doe@example.org>; call 555-123-4567 with questions about it."
    paragraphs, reason = clean_document(
        f"{prose}\n\n{author}", prose_only=True, sensitive=sensitive, stats=counts
    )
    assert reason is None and paragraphs == [prose] and counts["paragraphs_sensitive"] == 1
    assert clean_document(author, prose_only=True, sensitive=sensitive)[1] == "empty"
    out, dropped = pieces(["a" * 150, "b" * 150, "c" * 500, "d" * 50], min_chars=100, max_chars=400)
    assert out == ["a" * 150 + "\n\n" + "b" * 150] and dropped == 2  # "c" too long, "d" too short
    long_doc = " ".join(f"word{i} is followed by another word in this sentence" for i in range(40))
    near = long_doc.replace("word7 ", "wordseven ", 1)
    different = " ".join(f"token{i} appears in a different sentence entirely here" for i in range(40))
    kept, stats = deduplicate(
        [
            Document(long_doc, "a"),
            Document(long_doc.upper(), "b"),
            Document(near, "c"),
            Document(different, "d"),
        ]
    )
    assert [d.source for d in kept] == ["a", "d"]
    assert stats == {"exact_duplicates": 1, "near_duplicates": 1}


# --- user data ---------------------------------------------------------------------------------


def _user_math(count: int, seed: int) -> list[dict]:
    """GSM8K-format rows: the answer field is the worked solution ending in '#### n'."""
    return [
        {"question": p.question, "answer": p.solution.replace("#### ", "#### $", 1)}
        for p in generate_problems(count, [2, 4], seed=seed)
    ]


def _user_text(count: int) -> list[dict]:
    return [
        {
            "text": f"Document {i}: "
            + " ".join(f"user sentence {i}-{j} talks about topic {j * i}." for j in range(30)),
            "source": "wiki" if i % 2 else None,
        }
        for i in range(count)
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_user_sources_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text_file = _write_jsonl(tmp_path / "corpus.jsonl", _user_text(12))
    math_rows = _user_math(40, seed=11)
    pq.write_table(pa.Table.from_pylist(math_rows), tmp_path / "math.parquet")
    params = load_params(
        REPO / "params.yaml",
        _overrides(
            tmp_path,
            {
                "data.sources": [str(text_file), str(tmp_path / "math.parquet")],
                "data.embedded": "never",
                "data.math_levels": [1, 2, 3],
                "data.num_sft": 20,
                "data.num_rl": 8,
                "data.num_eval": 6,
                "data.num_select": 3,
                **FEW_SELECT,
                "data.select_corpus_chars": 300,
                "data.val_fraction": 0.2,
            },
        ),
    )
    metrics = run(params)
    raw = tmp_path / "data" / "raw"
    sft = read_jsonl(raw / "sft.jsonl")
    ev = read_jsonl(raw / "eval.jsonl")
    # corpus_val's math documents (0.2 x 20 = 4): the 3 problems the splits left and one carved off sft
    assert (metrics["sft"], metrics["rl"], metrics["eval"], metrics["corpus_val_math"]) == (19, 8, 6, 4)
    user_questions = {r["question"]: r for r in math_rows}
    for row in sft:
        original = user_questions[row["prompt"]]
        assert row["response"] == original["answer"].replace("#### $", "#### ")  # canonical final line
        assert answers_match(extract_answer(original["answer"]), row["answer"])
        steps = len(row["response"].splitlines()) - 1  # no level given: the math level nearest the step count
        assert row["level"] == min(3, max(1, steps))
    assert {r["question"] for r in ev} <= set(user_questions)
    corpus = read_jsonl(raw / "corpus_train.jsonl") + read_jsonl(raw / "corpus_val.jsonl")
    select_corpus = read_jsonl(raw / "select_corpus.jsonl")
    general = [r for r in corpus if r["source"] != "math"] + select_corpus
    assert len(general) == 12 and {r["source"] for r in general} == {"wiki", "user:corpus.jsonl"}
    assert len(select_corpus) == 1 and metrics["select"] == 3  # a document has >= 300 characters
    manifest = json.loads((raw / "manifest.json").read_text())
    files = manifest["sources"]["user"]["files"]
    assert files[str(text_file)]["corpus"] == 12 and files[str(tmp_path / "math.parquet")]["math"] == 40
    assert files[str(text_file)]["sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()
    assert manifest["embedded"] == {"mode": "never", "corpus": False, "math": False}

    # auto: the math-only user file gets the embedded corpus, and nothing is generated.
    auto = load_params(
        REPO / "params.yaml",
        _overrides(
            tmp_path / "auto",
            {
                "data.sources": [str(tmp_path / "math.parquet")],
                "data.num_sft": 20,
                "data.num_rl": 8,
                "data.num_eval": 6,
                "data.num_select": 3,
                **FEW_SELECT,
            },
        ),
    )
    run(auto)
    auto_manifest = json.loads((tmp_path / "auto/data/raw/manifest.json").read_text())
    assert auto_manifest["embedded"] == {"mode": "auto", "corpus": True, "math": False}
    assert set(auto_manifest["sources"]["math_per_origin"]) == {"user:math.parquet"}


def test_malformed_rows_name_file_and_row(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n\n{"text": broken}\n')
    with pytest.raises(StageError, match=r"bad\.jsonl:3: not valid JSON"):
        map_rows([load_source(str(bad_json))], [1, 2, 3])
    no_kind = _write_jsonl(tmp_path / "nokind.jsonl", [{"text": "ok"}, {"title": "what is this"}])
    with pytest.raises(StageError, match=r"nokind\.jsonl:2: a row needs 'text'"):
        map_rows([load_source(str(no_kind))], [1, 2, 3])
    not_number = _write_jsonl(tmp_path / "answer.jsonl", [{"question": "How many?", "answer": "many"}])
    with pytest.raises(StageError, match=r"answer\.jsonl:1: answer 'many' is not a number"):
        map_rows([load_source(str(not_number))], [1, 2, 3])
    disagree = _write_jsonl(
        tmp_path / "disagree.jsonl", [{"question": "2+2?", "answer": "4", "solution": "2+2 = 5\n#### 5"}]
    )
    with pytest.raises(StageError, match=r"disagree\.jsonl:1: the solution's final answer 5 differs"):
        map_rows([load_source(str(disagree))], [1, 2, 3])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist(
            [{"question": "q1", "answer": "3", "level": 2}, {"question": "q2", "answer": "4", "level": 9}]
        ),
        tmp_path / "lv.parquet",
    )
    with pytest.raises(
        StageError, match=r"lv\.parquet:row 2: field 'level' must be one of data.math_levels \[1, 2, 3\]"
    ):
        map_rows([load_source(str(tmp_path / "lv.parquet"))], [1, 2, 3])
    (tmp_path / "notparquet.parquet").write_text("hello")
    with pytest.raises(StageError, match=r"notparquet\.parquet: not a readable Parquet file"):
        load_source(str(tmp_path / "notparquet.parquet"))


def test_parquet_reader_leaves_arrow_no_python_object(tmp_path):
    """Arrow must not own the file's Python bytes once a read returns. When it did (a BufferReader over
    them, read by pq.read_table's scanner), the last reference was sometimes dropped later on an Arrow
    IO thread, which takes the GIL; at interpreter shutdown that aborted prepare_data (SIGABRT) after
    it had reported a bad row. The old reader left the reference behind in about 2 of 5 reads here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.data.sources import _parquet_records

    pq.write_table(pa.Table.from_pylist([{"text": f"doc {i}"} for i in range(50)]), tmp_path / "c.parquet")
    data = (tmp_path / "c.parquet").read_bytes()
    before = sys.getrefcount(data)
    for _ in range(20):
        rows = list(_parquet_records("c.parquet", data))
        assert sys.getrefcount(data) == before
    assert [r.row["text"] for r in rows] == [f"doc {i}" for i in range(50)]
    assert rows[-1].where == "c.parquet:row 50"


def test_empty_missing_and_unsupported_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(StageError, match=r"empty\.jsonl: no rows \(empty file\)"):
        load_source(str(tmp_path / "empty.jsonl"))
    with pytest.raises(StageError, match="file not found"):
        load_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(StageError, match="unsupported file type"):
        load_source(str(tmp_path / "data.csv"))
    # The stage's command line reports it as an error naming the file, exit code 2, no output.
    cmd = [
        sys.executable,
        "-m",
        "tasks.prepare_data",
        "--params",
        str(REPO / "params.yaml"),
        "--set",
        f"paths.data_dir={tmp_path / 'data'}",
        "--set",
        f"data.sources=[{tmp_path / 'empty.jsonl'}]",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "empty.jsonl: no rows" in proc.stderr
    assert not (tmp_path / "data" / "raw").exists()


def test_s3_source(s3_server, monkeypatch, tmp_path):  # noqa: F811 (the imported fixture)
    bucket = s3_server.create_bucket("user-data")
    body = "".join(json.dumps(r) + "\n" for r in _user_text(3) + _user_math(2, seed=4))
    s3_server.client().put_object(Bucket=bucket, Key="in/mixed.jsonl", Body=body.encode())
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    source = load_source("s3://user-data/in/mixed.jsonl")
    assert source.sha256 == hashlib.sha256(body.encode()).hexdigest()
    docs, problems, stats = map_rows([source], [1, 2, 3])
    assert len(docs) == 3 and len(problems) == 2 and problems[0].origin == "user:mixed.jsonl"
    assert source.records[4].where == "s3://user-data/in/mixed.jsonl:5"
    with pytest.raises(
        StageError,
        match=r"cannot read s3://user-data/in/missing\.jsonl: "
        r"s3://user-data/in/missing\.jsonl does not exist at http://127\.0\.0\.1:\d+ \(NoSuchKey\)",
    ):
        load_source("s3://user-data/in/missing.jsonl")
    with pytest.raises(StageError, match=r"the bucket 'no-bucket' does not exist at http://127\.0\.0\.1:\d+"):
        load_source("s3://no-bucket/in/mixed.jsonl")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(
        StageError,
        match=r"cannot read s3://user-data/in/mixed\.jsonl: the S3 credentials were "
        r"rejected by http://127\.0\.0\.1:\d+ for bucket 'user-data' \(SignatureDoesNotMatch",
    ):
        load_source("s3://user-data/in/mixed.jsonl")


def test_gzipped_jsonl_and_gsm8k_rows_without_solution(tmp_path):
    import gzip

    rows = [
        {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "7"},
        {"question": "A pen costs $1.50. How much do 2 pens cost?", "answer": 3.0, "level": 2},
        {"text": "A plain corpus line that is long enough to be a document of its own, hopefully."},
    ]
    path = tmp_path / "mixed.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    docs, problems, stats = map_rows([load_source(str(path))], [1, 2, 3])
    assert [p.solution for p in problems] == ["#### 7", "#### 3"]  # answer-only rows: one-line solution
    assert [p.level for p in problems] == [1, 2] and stats["math_without_solution"] == 2
    assert docs == [Document(rows[2]["text"], "user:mixed.jsonl.gz")]
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(StageError, match=r"broken\.jsonl\.gz: not a valid gzip file"):
        load_source(str(tmp_path / "broken.jsonl.gz"))


# --- bad rows in the user's own files: quarantine (validate_data.on_violation) -------------------


def _distinct_patterns(count: int, seed: int) -> list[Problem]:
    """Generated problems with pairwise different problem keys (each its own split group)."""
    out, seen = [], set()
    for p in generate_problems(3 * count, [1, 2, 3], seed=seed):
        if problem_key(p.question) not in seen:
            seen.add(problem_key(p.question))
            out.append(p)
    assert len(out) >= count
    return out[:count]


# (raw JSONL line, expected reason) for 12 different kinds of bad row.
_BAD_LINES = [
    (
        '{"question": "Sam has 3 cats and gets 4 more. How many cats?", "answer": "seven"}',
        "answer 'seven' is not a number",
    ),
    ('{"question": "How many legs do 2 ducks have?", "answer": ', "not valid JSON"),
    ("[1, 2, 3]", "expected a JSON object, got list"),
    ('{"title": "what is this row"}', "a row needs 'text' (corpus) or 'question' + 'answer'"),
    ('{"question": "", "answer": "3"}', "field 'question' must be a non-empty string"),
    (
        '{"question": "Mia reads 5 pages a day. Pages in 9 days?", "answer": "45", "level": 9}',
        "field 'level' must be one of",
    ),
    (
        '{"question": "Leo buys 6 eggs and eats 2. Eggs left?", "answer": "4", "level": true}',
        "field 'level' must be one of",
    ),
    (
        '{"question": "Ana has 2 bags of 7 apples. Apples?", '
        '"answer": "2*7\\n#### 14", "solution": "#### 14"}',
        "both 'solution' and a worked solution",
    ),
    (
        '{"question": "Ben runs 8 km a day for 3 days. Km?", "answer": "8*3 = 24\\n#### "}',
        "no number after '####'",
    ),
    (
        '{"question": "Zoe has 9 pens and loses 5. Pens left?", '
        '"answer": "5", "solution": "9-5 = 4\\n#### 4"}',
        "the solution's final answer 4 differs from answer 5",
    ),
    (
        '{"question": "Tim has 12 marbles and gives 5 away. Marbles left?", "answer": null}',
        "field 'answer' must be",
    ),
    ('{"question": "Split 1 cake among 3 kids. Cake each?", "answer": "1/3"}', "no finite decimal form"),
]


def _dirty_sources(tmp_path: Path) -> tuple[Path, Path, list[Problem], list[dict], dict[str, str]]:
    """math.jsonl: 240 valid problems with the 12 bad lines spread among them; corpus.parquet: 20 valid
    documents and one with a null text (row 21). Returns the files, the valid rows and where -> reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    problems = _distinct_patterns(240, seed=21)
    lines = [json.dumps({"question": p.question, "answer": p.solution}) for p in problems]
    expected = {}
    for i, (line, _) in enumerate(_BAD_LINES):
        at = 5 + i * 20  # 0-based position in the file
        lines.insert(at, line)
    math_file = tmp_path / "math.jsonl"
    math_file.write_text("\n".join(lines) + "\n")
    for lineno, line in enumerate(lines, 1):
        for bad, reason in _BAD_LINES:
            if line == bad:
                expected[f"{math_file}:{lineno}"] = reason
    docs = [{"text": r["text"], "source": "wiki"} for r in _user_text(20)]
    docs.append({"text": None, "source": "wiki"})
    corpus_file = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(docs), corpus_file)
    expected[f"{corpus_file}:row 21"] = "field 'text' must be a non-empty string"
    return math_file, corpus_file, problems, docs[:20], expected


def _source_params(tmp_path: Path, math_file: Path, corpus_file: Path, mode: str, extra: dict | None = None):
    return load_params(
        REPO / "params.yaml",
        _overrides(
            tmp_path,
            {
                "paths.reports_dir": str(tmp_path / "reports"),
                "data.sources": [str(math_file), str(corpus_file)],
                "data.embedded": "never",
                "data.num_sft": 140,
                "data.num_rl": 50,
                "data.num_eval": 40,
                "data.num_select": 5,
                **FEW_SELECT,
                "data.select_corpus_chars": 300,
                "data.val_fraction": 0.2,
                "validate_data.on_violation": mode,
                **(extra or {}),
            },
        ),
    )


def test_bad_user_rows_are_quarantined_and_every_valid_row_published(tmp_path):
    from tasks.validate_data import run as validate

    math_file, corpus_file, problems, docs, expected = _dirty_sources(tmp_path)
    params = _source_params(tmp_path, math_file, corpus_file, "quarantine")
    metrics = run(params)
    assert metrics["user_rows_quarantined"] == 13
    # 240 valid problems: rl, eval and select as asked; corpus_val's math documents (0.2 x 140 = 28) take
    # the 5 problems the splits left and 23 whole problem groups carved off sft (no spare problems here)
    assert (metrics["rl"], metrics["eval"], metrics["select"], metrics["corpus_val_math"]) == (50, 40, 5, 28)
    assert metrics["sft"] == 240 - 50 - 40 - 5 - 28
    checked = validate(params)
    assert checked["source_rows_quarantined"] == 13 and checked["rows_quarantined"] == 13

    validated = tmp_path / "data" / "validated"
    published = (
        {r["prompt"] for r in read_jsonl(validated / "sft.jsonl")}
        | {r["question"] for r in read_jsonl(validated / "rl.jsonl")}
        | {r["question"] for r in read_jsonl(validated / "eval.jsonl")}
        | {r["prompt"] for r in read_jsonl(validated / "select.jsonl")}
    )
    val_math = {
        r["text"].split("\n")[0] for r in read_jsonl(validated / "corpus_val.jsonl") if r["source"] == "math"
    }
    # Valid problems only, every one of them: in a split or as a corpus_val document, never both.
    assert not published & val_math and (published | val_math) == {p.question for p in problems}
    corpus = [
        r
        for f in ("corpus_train", "corpus_val", "select_corpus")
        for r in read_jsonl(validated / f"{f}.jsonl")
    ]
    assert sorted(r["text"] for r in corpus if r["source"] == "wiki") == sorted(d["text"] for d in docs)

    quarantined = read_jsonl(tmp_path / "data" / "quarantine" / "sources.jsonl")
    assert {r["where"]: r["reasons"][0]["description"] for r in quarantined}.keys() == expected.keys()
    for row in quarantined:
        assert expected[row["where"]] in row["reasons"][0]["description"], row
        assert row["file"] in (str(math_file), str(corpus_file)) and row["line"] > 0
    seven = next(r for r in quarantined if "seven" in r["reasons"][0]["description"])
    assert seven["row"]["answer"] == "seven" and seven["line"] == 6
    summary = json.loads((tmp_path / "data" / "quarantine" / "summary.json").read_text())
    assert summary["sources"] == {str(math_file): 12, str(corpus_file): 1}
    manifest = json.loads((tmp_path / "data" / "raw" / "manifest.json").read_text())
    assert manifest["sources"]["user"]["files"][str(math_file)]["quarantined"] == 12


def test_bad_user_rows_fail_mode_and_quarantine_limit(tmp_path):
    math_file, corpus_file, _, _, expected = _dirty_sources(tmp_path)
    # fail (the default): the first bad row stops the stage, naming file:line; nothing is published.
    cmd = [
        sys.executable,
        "-m",
        "tasks.prepare_data",
        "--params",
        str(REPO / "params.yaml"),
        "--set",
        f"paths.data_dir={tmp_path / 'data'}",
        "--set",
        "data.embedded=never",
        "--set",
        f"data.sources=[{math_file}, {corpus_file}]",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    first = next(iter(expected))
    assert f"error: {first}: answer 'seven' is not a number" in proc.stderr
    assert not (tmp_path / "data" / "raw").exists()
    # quarantine, but more bad rows than validate_data.max_quarantine_fraction allows in a file.
    params = _source_params(
        tmp_path, math_file, corpus_file, "quarantine", {"validate_data.max_quarantine_fraction": 0.04}
    )
    limit = (
        rf"{re.escape(str(math_file))}: 12 of 252 rows \(4\.8%\) are bad, over "
        r"validate_data\.max_quarantine_fraction=0\.04; first: .*math\.jsonl:6"
    )
    with pytest.raises(StageError, match=limit):
        run(params)
    assert not (tmp_path / "data" / "raw").exists()


def test_invalid_utf8_is_named_by_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(StageError, match=r"latin1\.jsonl:3: not UTF-8 text \(byte 0xe9 at column 14"):
        load_source(str(path))
    with pytest.raises(StageError, match=r"latin1\.jsonl:3: not UTF-8 text"):
        read_jsonl(path)


def test_user_files_as_spreadsheets_and_pandas_write_them(tmp_path, monkeypatch):
    """A byte order mark before line 1 (Excel, PowerShell), a Parquet file holding corpus and math rows
    (every row has every column: a document's question is None), a damaged gzip and an S3 client the
    environment cannot configure: rows read, or one clear error."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"question": "What is 2+3?", "answer": "5"}).encode() + b"\n"
    )
    docs, problems, _ = map_rows([load_source(str(bom))], [1, 2, 3])
    assert [p.question for p in problems] == ["What is 2+3?"]
    doc = "A corpus document in a mixed Parquet file, long enough to be kept as one." * 3
    table = pa.table(
        {
            "text": [doc, None, None],
            "question": [None, "What is 4+4?", "What is 6+1?"],
            "answer": [None, "8", "7"],
            "level": pa.array([None, 2, None], type=pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "mixed.parquet")
    docs, problems, _ = map_rows([load_source(str(tmp_path / "mixed.parquet"))], [1, 2, 3])
    assert [d.text for d in docs] == [doc] and [(p.question, p.level) for p in problems][0] == (
        "What is 4+4?",
        2,
    )
    data = bytearray(gzip.compress(b'{"text": "' + b"x" * 4000 + b'"}\n'))
    broken = 0
    for i in range(10, len(data) - 8):  # every damaged byte of the deflate stream: an error naming the file
        damaged = bytearray(data)
        damaged[i] ^= 0xFF
        (tmp_path / "damaged.jsonl.gz").write_bytes(bytes(damaged))
        try:
            load_source(str(tmp_path / "damaged.jsonl.gz"))
        except StageError as e:
            assert "damaged.jsonl.gz: not a valid gzip file" in str(e)
            broken += 1
    assert broken > 0
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    with pytest.raises(
        StageError, match=r"s3://bucket/k.jsonl: the S3 client cannot be configured .*no-such-profile"
    ):
        load_source("s3://bucket/k.jsonl")
