"""The dataset contracts (data_contracts/suites.py) run through real Great Expectations.

One valid dataset per contract must pass; one "dirty" dataset per contract, where each bad row
carries one planted violation, must fail exactly the expectations planted, on exactly those rows
(so the tests catch both missed violations and false alarms).

`valid_datasets()` / `params_for_tests()` are also used by tests/test_validate_data.py.
"""

from __future__ import annotations

import copy

import pytest

from tasks.core.params import load_params

PARAMS_OVERRIDES = {"data.min_doc_chars": 40, "data.max_doc_chars": 600, "data.math_levels": [1, 2, 3]}


def params_for_tests(tmp_path=None, **overrides):
    """The repo's params with short corpus bounds; paths under `tmp_path` when given."""
    values = dict(PARAMS_OVERRIDES)
    if tmp_path is not None:
        for key in ("data_dir", "metrics_dir", "plots_dir", "reports_dir"):
            values[f"paths.{key}"] = str(tmp_path / key.removesuffix("_dir"))
    values.update(overrides)
    return load_params("params.yaml", values)


_PROSE = [
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "A module is a file containing Python definitions and statements for reuse.",
    "Lists are mutable sequences, typically used to store collections of items.",
    "The garden behind the old library was full of roses and tall sunflowers.",
    "Exceptions are raised when an error is detected during program execution.",
    "Dictionaries map hashable keys to arbitrary values and keep insertion order.",
    "Every morning the baker opened the shop before the first train arrived.",
    "Strings are immutable sequences of Unicode code points in the language.",
]


def _sft(i: int) -> dict:
    n = 3 + i
    return {
        "id": f"sft-{i:03d}",
        "prompt": f"Ava buys {n} pens for $2 each. How much does she spend in total?",
        "response": f"Ava spends {n}*2={2 * n} dollars.\n#### {2 * n}",
        "answer": str(2 * n),
        "level": 1 + i % 3,
    }


def _rl(i: int) -> dict:
    n = 10 + i
    return {
        "id": f"rl-{i:03d}",
        "question": f"Liam has {n} apples and eats 2 of them. How many apples are left?",
        "answer": str(n - 2),
        "level": 1 + i % 3,
    }


def _eval(i: int) -> dict:
    n = 4 + i
    return {
        "id": f"eval-{i:03d}",
        "question": f"Maya reads {n} pages a day for 3 days. How many pages does she read?",
        "solution": f"She reads {n}*3={3 * n} pages.\n#### {3 * n}",
        "answer": str(3 * n),
        "level": 1 + i % 3,
    }


_SELECT_PROSE = [
    "Tuples are immutable sequences, often used to hold records of different kinds.",
    "The lighthouse keeper wrote a letter every evening while the storm passed by.",
]


def _select(i: int) -> dict:
    n = 2 + i
    return {
        "id": f"select-{i:03d}",
        "prompt": f"Noah packs {n} boxes with 4 books each. How many books does he pack?",
        "response": f"He packs {n}*4={4 * n} books.\n#### {4 * n}",
        "answer": str(4 * n),
        "level": 1 + i % 3,
    }


def valid_datasets(n_math: int = 10) -> dict[str, list[dict]]:
    """Small datasets that satisfy every contract (file name -> rows)."""
    corpus = [
        {"id": f"doc-{i:03d}", "text": f"{text} Paragraph {i} ends here.", "source": "python_docstrings"}
        for i, text in enumerate(_PROSE)
    ]
    # A math document as prepare_data adds them: shorter than prose (its own length bound).
    corpus.append({"id": "doc-math-0", "text": "Ava buys 3 pens for $2 each.\n#### 6", "source": "math"})
    return {
        "corpus_train.jsonl": corpus[:6] + corpus[8:],
        "corpus_val.jsonl": corpus[6:8],
        "sft.jsonl": [_sft(i) for i in range(n_math)],
        "rl.jsonl": [_rl(i) for i in range(n_math)],
        "eval.jsonl": [_eval(i) for i in range(n_math)],
        "select_corpus.jsonl": [
            {"id": f"sel-doc-{i:03d}", "text": text, "source": "python_docstrings"}
            for i, text in enumerate(_SELECT_PROSE)
        ],
        "select.jsonl": [_select(i) for i in range(n_math)],
    }


# --- running the suites ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def contracts(tmp_path_factory):
    from data_contracts import suites
    from data_contracts.context import ContractContext

    ctx = ContractContext(tmp_path_factory.mktemp("contracts"))
    params = params_for_tests()

    def validate(name: str, files: dict[str, list[dict]], training: dict[str, list[dict]] | None = None):
        contract = suites.CONTRACTS[name]
        rows, labels = [], []
        for file in contract.files:
            for line, row in enumerate(files[file], 1):
                rows.append(row)
                labels.append(f"{file}:{line}")
        training = training or files  # the other datasets' rows, by contract
        refs = suites.held_out_references(
            contract,
            {c.name: [r for f in c.files for r in training[f]] for c in suites.CONTRACTS.values()},
        )
        frame = suites.build_frame(contract, rows, labels, refs.corpus, refs.paragraphs, refs.arithmetic)
        suite = suites.build_suite(contract, params, refs.question_keys)
        return ctx.validate(name, frame, suite, run_name="test")

    return validate


def _flagged(result) -> dict[str, set[str]]:
    """expectation name -> failing row labels (table-level failures map to {"<table>"})."""
    out: dict[str, set[str]] = {}
    for f in result.failures:
        out.setdefault(f.name, set()).update(map(str, f.rows) if f.rows else {"<table>"})
    return out


@pytest.mark.parametrize("name", ["corpus", "sft", "rl", "eval", "select_corpus", "select"])
def test_valid_data_passes(contracts, name):
    result = contracts(name, valid_datasets())
    assert result.success, result.describe()
    assert result.evaluated >= 15
    assert not result.failures


def _dirty_sft():
    files = valid_datasets()
    rows = files["sft.jsonl"]
    rows[1]["answer"] = None  # null
    rows[2]["level"] = "2"  # wrong type (string for int)
    rows[3]["id"] = rows[0]["id"]  # duplicate id
    rows[4]["prompt"] = rows[0]["prompt"]  # duplicate prompt
    rows[5]["prompt"] = "Ava buys 3 pens\x07 for $2 each. How much?"  # control character
    rows[6]["prompt"] += " Write to ava.smith@example.com for hints."  # e-mail
    rows[7]["response"] = rows[7]["response"].replace("\n#### ", "\n#### 1")  # final answer != answer
    rows[8]["answer"] = "1,000"  # not a plain number
    rows[8]["response"] = "Total 1000.\n#### 1,000"
    del rows[9]["level"]  # missing field
    rows.append({**_sft(10), "extra": 1})  # extra field
    rows.append({**_sft(11), "response": "It is 28 dollars."})  # no final answer line
    rows.append({**_sft(12), "level": 5})  # level outside data.math_levels
    files["sft.jsonl"] = rows
    return files


def test_sft_violations_name_expectation_and_rows(contracts):
    result = contracts("sft", _dirty_sft())
    assert not result.success
    assert _flagged(result) == {
        "expect_column_values_to_not_be_null(answer)": {"sft.jsonl:2"},
        "expect_column_values_to_not_be_null(level)": {"sft.jsonl:10"},
        "expect_column_values_to_be_of_type(level)": {"sft.jsonl:3"},
        "expect_column_values_to_be_in_set(level)": {"sft.jsonl:3", "sft.jsonl:13"},
        "expect_column_values_to_be_unique(id)": {"sft.jsonl:1", "sft.jsonl:4"},
        "expect_column_values_to_be_unique(prompt)": {"sft.jsonl:1", "sft.jsonl:5"},
        "expect_column_values_to_not_match_regex(prompt)": {"sft.jsonl:6", "sft.jsonl:7"},
        "expect_column_pair_values_to_be_equal(answer, _final_answer)": {
            "sft.jsonl:2",
            "sft.jsonl:8",
            "sft.jsonl:12",
        },
        "expect_column_values_to_match_regex(answer)": {"sft.jsonl:9"},
        "expect_column_values_to_match_regex(response)": {"sft.jsonl:12"},
        "expect_column_values_to_be_in_set(_fields)": {"sft.jsonl:10", "sft.jsonl:11"},
    }
    by_description = {f.description: {str(r) for r in f.rows} for f in result.failures}
    assert by_description["prompt has no control characters (C0/C1, zero-width, bidi, BOM, U+FFFD)"] == {
        "sft.jsonl:6"
    }
    assert by_description["prompt: no e-mail addresses (personal data)"] == {"sft.jsonl:7"}
    text = result.describe()
    assert "sft.jsonl:7: 'ava.smith@example.com' in" in text  # the match itself is quoted
    assert "sft.jsonl:3: '2'" in text


@pytest.mark.parametrize(
    ("secret", "description"),
    [
        ("key AKIAIOSFODNN7EXAMPLE here", "no API keys"),
        ("token sk-proj-abcdefghijklmnopqrstuvwx", "no API keys"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA", "no private key headers"),
        ("call me at (555) 123-4567 tonight", "no phone numbers"),
        ("or +1 555.123.4567 instead", "no phone numbers"),
    ],
)
def test_secrets_and_personal_data_are_flagged(contracts, secret, description):
    files = valid_datasets()
    files["corpus_val.jsonl"][1]["text"] += " " + secret
    result = contracts("corpus", files)
    flagged = {f.description: {str(r) for r in f.rows} for f in result.failures}
    assert flagged == {
        f"text: {next(d for _, _, d in _patterns() if d.startswith(description))}": {"corpus_val.jsonl:2"}
    }


def _patterns():
    from data_contracts.suites import SENSITIVE_PATTERNS

    return SENSITIVE_PATTERNS


def test_numbers_in_math_text_are_not_phone_numbers(contracts):
    files = valid_datasets()
    files["corpus_train.jsonl"][0]["text"] += " It costs 1234567890 cents, or 12.50 dollars, in 2024-2025."
    assert contracts("corpus", files).success


def test_corpus_duplicates_across_train_and_val_and_length_bounds(contracts):
    files = valid_datasets()
    files["corpus_val.jsonl"][0]["text"] = files["corpus_train.jsonl"][0]["text"]  # train/val duplicate
    files["corpus_train.jsonl"][1]["text"] = "Too short."  # prose under 40 chars
    files["corpus_train.jsonl"][2]["text"] = "x " * 400  # over 600 chars
    files["corpus_train.jsonl"][3]["text"] = "\ufeffBOM at the start of a long enough document text."
    result = contracts("corpus", files)
    flagged = _flagged(result)
    assert flagged["expect_column_values_to_be_unique(text)"] == {
        "corpus_train.jsonl:1",
        "corpus_val.jsonl:1",
    }
    assert flagged["expect_column_value_lengths_to_be_between(text)"] == {
        "corpus_train.jsonl:2",
        "corpus_train.jsonl:3",
    }
    assert flagged["expect_column_values_to_not_match_regex(text)"] == {"corpus_train.jsonl:4"}
    # The short math document (source "math", line 7) passes under its own lower bound.
    assert all("corpus_train.jsonl:7" not in rows for rows in flagged.values())


def test_eval_overlap_with_training_is_caught(contracts):
    files = valid_datasets()
    training = copy.deepcopy(files)
    # Same question as an SFT prompt up to case and whitespace -> overlap.
    files["eval.jsonl"][2]["question"] = "  AVA buys 5 pens for $2 each.   How much does she spend in total?"
    files["eval.jsonl"][2]["solution"], files["eval.jsonl"][2]["answer"] = "5*2=10\n#### 10", "10"
    # An eval question that appears inside a corpus document (contamination).
    training["corpus_train.jsonl"][0]["text"] += (
        " Maya reads 9 pages a day for 3 days. How many pages does she read?"
    )
    # A solution whose final answer is not the answer.
    files["eval.jsonl"][3]["solution"] = "She reads 7*3=21 pages.\n#### 22"
    # The arithmetic of an SFT solution (the sum's operands swapped) in another story.
    training["sft.jsonl"][0]["response"] = "Ava spends 3+38 = <<3+38=41>>41 dollars.\n#### 41"
    training["sft.jsonl"][0]["answer"] = "41"
    files["eval.jsonl"][6]["solution"] = "She reads 38+3 = <<38+3=41>>41 pages.\n#### 41"
    files["eval.jsonl"][6]["answer"] = "41"
    files["eval.jsonl"][7]["solution"] = "She reads 38-3 = <<38-3=35>>35 pages.\n#### 35"  # another sum
    files["eval.jsonl"][7]["answer"] = "35"
    result = contracts("eval", files, training)
    assert _flagged(result) == {
        "expect_column_values_to_not_be_in_set(_question_key)": {"eval.jsonl:3"},
        "expect_column_values_to_be_in_set(_in_corpus)": {"eval.jsonl:6"},
        "expect_column_pair_values_to_be_equal(answer, _final_answer)": {"eval.jsonl:4"},
        "expect_column_values_to_be_in_set(_shared_arithmetic)": {"eval.jsonl:7"},
    }


def test_select_overlap_with_any_other_file_is_caught(contracts):
    """The healing-decision files share no question and no paragraph with corpus_train, corpus_val, sft,
    rl or eval (normalized text); everything else about them is checked as for corpus / sft."""
    files = valid_datasets()
    training = copy.deepcopy(files)
    select, docs = files["select.jsonl"], files["select_corpus.jsonl"]
    select[1]["prompt"] = training["sft.jsonl"][4]["prompt"].upper()  # an SFT prompt (also a paragraph)
    select[3]["prompt"] = training["eval.jsonl"][0]["question"]  # an eval question
    select[5]["prompt"] = training["rl.jsonl"][2]["question"]  # an RL question
    # Another question whose worked solution is an SFT response's (its final line aside).
    select[7]["response"] = training["sft.jsonl"][0]["response"].replace("#### 6", "####  6")
    select[7]["answer"] = "6"
    # A question inside a corpus document (contamination, as for eval).
    training["corpus_val.jsonl"][0]["text"] += " " + select[8]["prompt"]
    docs[0]["text"] = (
        training["corpus_val.jsonl"][1]["text"] + "\n\n" + docs[0]["text"]
    )  # a corpus_val paragraph
    docs.append({"id": "sel-doc-002", "text": training["corpus_train.jsonl"][2]["text"], "source": "x"})
    question = "expect_column_values_to_not_be_in_set(_question_key)"
    shared = "expect_column_values_to_be_in_set(_shared_text)"
    result = contracts("select", files, training)
    assert _flagged(result) == {
        question: {"select.jsonl:2", "select.jsonl:4", "select.jsonl:6"},
        shared: {"select.jsonl:2", "select.jsonl:4", "select.jsonl:6", "select.jsonl:8"},
        "expect_column_values_to_be_in_set(_in_corpus)": {"select.jsonl:9"},
    }
    failure = next(f for f in result.failures if f.name == shared)
    assert "sft.jsonl" in failure.description and "corpus_val.jsonl" in failure.description
    result = contracts("select_corpus", files, training)
    assert _flagged(result) == {shared: {"select_corpus.jsonl:1", "select_corpus.jsonl:3"}}
    assert contracts("select_corpus", valid_datasets(), valid_datasets()).success


def test_rl_duplicates_and_answers(contracts):
    files = valid_datasets()
    files["rl.jsonl"][4]["question"] = files["rl.jsonl"][2][
        "question"
    ].upper()  # unique is exact, not normalized
    files["rl.jsonl"][5]["answer"] = "12 apples"
    files["rl.jsonl"][6]["question"] = "Short?"  # under min_question_chars
    files["rl.jsonl"][7]["id"] = "rl 007"  # space in id
    result = contracts("rl", files)
    assert _flagged(result) == {
        "expect_column_values_to_match_regex(answer)": {"rl.jsonl:6"},
        "expect_column_value_lengths_to_be_between(question)": {"rl.jsonl:7"},
        "expect_column_values_to_match_regex(id)": {"rl.jsonl:8"},
    }


def test_reserved_column_names_are_rejected():
    from data_contracts.suites import CONTRACTS, build_frame

    with pytest.raises(ValueError, match="rl.jsonl:1: field\\(s\\) \\['_fields'\\] are reserved"):
        build_frame(CONTRACTS["rl"], [{**_rl(0), "_fields": "x"}], ["rl.jsonl:1"])


def test_final_answer_and_question_key():
    from data_contracts.suites import final_answer, question_key

    assert final_answer("a\nb = 3\n#### 42\n\n") == "42"
    assert final_answer("#### 4\nthen more text") is None
    assert final_answer(None) is None
    assert question_key("How  many\nApples?") == question_key("how many apples?")
    assert question_key("how many pears?") != question_key("how many apples?")
    assert question_key(3) is None


def test_strict_types_a_bool_or_a_numeric_string_is_no_integer(contracts):
    files = valid_datasets()
    files["rl.jsonl"][1]["level"] = True  # Python (and GX's type check) count True as the int 1
    files["rl.jsonl"][2]["level"] = False
    files["rl.jsonl"][3]["level"] = "2"  # a numeric string
    files["rl.jsonl"][4]["level"] = 2.0  # a float
    result = contracts("rl", files)
    flagged = _flagged(result)
    assert flagged["expect_column_values_to_be_in_set(_bool_ints)"] == {"rl.jsonl:2", "rl.jsonl:3"}
    assert flagged["expect_column_values_to_be_of_type(level)"] == {"rl.jsonl:4", "rl.jsonl:5"}
    assert "level: a JSON integer, never true/false (strict types)" in result.describe()
    assert contracts("corpus", valid_datasets()).success  # no integer fields: nothing to flag
