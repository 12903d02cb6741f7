"""The dataset contracts of ruyi-pipeline as Great Expectations 1.x suites, defined in code.

    corpus  corpus_train.jsonl + corpus_val.jsonl   {"id": str, "text": str, "source": str}
    sft     sft.jsonl   {"id": str, "prompt": str, "response": str, "answer": str, "level": int}
    rl      rl.jsonl    {"id": str, "question": str, "answer": str, "level": int}
    eval    eval.jsonl  {"id": str, "question": str, "solution": str, "answer": str, "level": int}
    select_corpus  select_corpus.jsonl   as corpus   (compress's healing-decision text)
    select         select.jsonl          as sft      (compress's healing-decision problems)

Every field required, no others allowed. `build_frame` adds the derived columns the row-level checks need
(`_fields`, `_final_answer`, `_question_key`, `_in_corpus`, `_shared_text`, `_bool_ints`: strict types, a
JSON bool is never an integer; the raw data must not use these names). The held-out datasets (eval, the
select ones) are checked against the rows of the others that passed: `held_out_references`.
What every suite checks, and why: docs/choices.md#validate_data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe

from data_contracts.answer_format import FINAL_LINE_REGEX, final_answer
from data_contracts.overlap import paragraph_keys, paragraphs

FIELDS_COLUMN = "_fields"
FINAL_ANSWER_COLUMN = "_final_answer"
QUESTION_KEY_COLUMN = "_question_key"
IN_CORPUS_COLUMN = "_in_corpus"
BOOL_INTS_COLUMN = "_bool_ints"
SHARED_TEXT_COLUMN = "_shared_text"
SHARED_ARITHMETIC_COLUMN = "_shared_arithmetic"
DERIVED_COLUMNS = (
    FIELDS_COLUMN,
    FINAL_ANSWER_COLUMN,
    QUESTION_KEY_COLUMN,
    IN_CORPUS_COLUMN,
    BOOL_INTS_COLUMN,
    SHARED_TEXT_COLUMN,
    SHARED_ARITHMETIC_COLUMN,
)
# The `source` of the math documents prepare_data adds to the CPT corpus (SFT question + solution):
# shorter than prose documents, so their lower length bound is the question's.
MATH_SOURCE = "math"

ID_REGEX = r"^[\x21-\x7e]{1,128}\Z"
ANSWER_REGEX = r"^-?\d+(?:\.\d+)?\Z"
# C0 controls except \t \n \r, DEL, C1 controls, zero-width and bidi controls, BOM, replacement char.
CONTROL_CHARS_REGEX = (
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff\ufffd]"
)

# (expectation name suffix, regex, description): text that must not appear in any free-text field.
SENSITIVE_PATTERNS: tuple[tuple[str, str, str], ...] = (
    (
        "email",
        r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
        "no e-mail addresses (personal data)",
    ),
    (
        "api_key",
        r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bsk-[A-Za-z0-9_-]{20,}|\bgh[pousr]_[A-Za-z0-9]{36}\b"
        r"|\bxox[abprs]-[A-Za-z0-9-]{10,}",
        "no API keys (AWS AKIA/ASIA, sk-..., GitHub ghp_..., Slack xox.-...)",
    ),
    ("private_key", r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----", "no private key headers"),
    (
        "phone",
        r"(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w.])",
        "no phone numbers (personal data)",
    ),
)


@dataclass(frozen=True)
class DatasetContract:
    """The contract of one dataset.

    Attributes:
        name: suite name ("corpus", "sft", "rl", "eval").
        files: JSONL files (in data/raw and data/validated) validated together as one batch.
        fields: exact field set with GX type names ("str" or "int").
        text_fields: free-text fields: lengths, allowed characters, secrets and personal data.
        unique_fields: fields whose values must be unique over all files of the dataset.
        question_field: the field whose `question_key` (`mathgen.problem_key`) is the train/eval overlap key.
        final_answer_field: the field that must end with `#### <answer>` (None: no such field).
        question_overlap: datasets whose problems this one's must not be (`question_key`), and whose
            corpus (the `corpus` dataset) must not contain them: the held-out check of eval and select.
        paragraph_overlap: datasets none of whose paragraphs (`data_contracts.overlap`) may occur in this
            one's text fields (a solution without its final answer line): the select datasets.
        arithmetic_overlap: datasets whose worked solutions may not do the arithmetic of one of this one's
            (`mathgen.equation_key`: its set of `<<expr=...>>` expressions, a sum's operands in either
            order): eval, against sft (rl rows carry no solution).
    """

    name: str
    files: tuple[str, ...]
    fields: dict[str, str]
    text_fields: tuple[str, ...]
    unique_fields: tuple[str, ...]
    question_field: str | None = None
    final_answer_field: str | None = None
    question_overlap: tuple[str, ...] = ()
    paragraph_overlap: tuple[str, ...] = ()
    arithmetic_overlap: tuple[str, ...] = ()

    @property
    def is_math(self) -> bool:
        return "answer" in self.fields

    @property
    def is_corpus(self) -> bool:
        return "text" in self.fields


_CORPUS_FIELDS = {"id": "str", "text": "str", "source": "str"}
_SFT_FIELDS = {"id": "str", "prompt": "str", "response": "str", "answer": "str", "level": "int"}
# Everything a training stage reads, and the reported held-out sets: the select datasets share no text
# with any of them.
_ALL_BUT_SELECT = ("corpus", "sft", "rl", "eval")


CONTRACTS: dict[str, DatasetContract] = {
    "corpus": DatasetContract(
        name="corpus",
        files=("corpus_train.jsonl", "corpus_val.jsonl"),
        fields=_CORPUS_FIELDS,
        text_fields=("text",),
        unique_fields=("id", "text"),
    ),
    "sft": DatasetContract(
        name="sft",
        files=("sft.jsonl",),
        fields=_SFT_FIELDS,
        text_fields=("prompt", "response"),
        unique_fields=("id", "prompt"),
        question_field="prompt",
        final_answer_field="response",
    ),
    "rl": DatasetContract(
        name="rl",
        files=("rl.jsonl",),
        fields={"id": "str", "question": "str", "answer": "str", "level": "int"},
        text_fields=("question",),
        unique_fields=("id", "question"),
        question_field="question",
    ),
    "eval": DatasetContract(
        name="eval",
        files=("eval.jsonl",),
        fields={"id": "str", "question": "str", "solution": "str", "answer": "str", "level": "int"},
        text_fields=("question", "solution"),
        unique_fields=("id", "question"),
        question_field="question",
        final_answer_field="solution",
        question_overlap=("sft", "rl"),
        arithmetic_overlap=("sft",),
    ),
    "select_corpus": DatasetContract(
        name="select_corpus",
        files=("select_corpus.jsonl",),
        fields=_CORPUS_FIELDS,
        text_fields=("text",),
        unique_fields=("id", "text"),
        paragraph_overlap=_ALL_BUT_SELECT,
    ),
    "select": DatasetContract(
        name="select",
        files=("select.jsonl",),
        fields=_SFT_FIELDS,
        text_fields=("prompt", "response"),
        unique_fields=("id", "prompt"),
        question_field="prompt",
        final_answer_field="response",
        question_overlap=("sft", "rl", "eval"),
        paragraph_overlap=_ALL_BUT_SELECT,
    ),
}
# Validation order: a held-out dataset is checked against the rows of the others that passed, so those
# come first: eval after the training questions (sft, rl) and the corpus; the select datasets last.
ORDER = ("corpus", "sft", "rl", "eval", "select_corpus", "select")
TRAINING = ("sft", "rl")


@dataclass(frozen=True)
class HeldOutReferences:
    """What a held-out dataset is checked against (None: the contract has no such check)."""

    question_keys: list[str] | None = None  # `question_key`s of the `question_overlap` datasets
    corpus: str | None = None  # `normalized_corpus` of the corpus dataset
    paragraphs: frozenset[str] | None = None  # paragraph keys of the `paragraph_overlap` datasets
    arithmetic: frozenset[frozenset[str]] | None = (
        None  # `equation_key`s of the `arithmetic_overlap` datasets
    )


def held_out_references(
    contract: DatasetContract, rows: dict[str, Sequence[dict[str, Any]]]
) -> HeldOutReferences:
    """The references of `contract`'s overlap checks from `rows` (dataset name -> the rows that passed)."""
    keys = corpus = paragraphs = arithmetic = None
    if contract.question_overlap:
        found = (
            question_key(row.get(CONTRACTS[name].question_field))
            for name in contract.question_overlap
            for row in rows[name]
        )
        keys = [k for k in found if k is not None]
        corpus = normalized_corpus(row.get("text") for row in rows["corpus"])
    if contract.paragraph_overlap:
        paragraphs = frozenset(
            key
            for name in contract.paragraph_overlap
            for row in rows[name]
            for text in checked_texts(CONTRACTS[name], row)
            for key in paragraph_keys(text)
        )
    if contract.arithmetic_overlap:
        arithmetic = frozenset(
            worked_arithmetic(CONTRACTS[name], row)
            for name in contract.arithmetic_overlap
            for row in rows[name]
        ) - {frozenset()}
    return HeldOutReferences(keys, corpus, paragraphs, arithmetic)


def worked_arithmetic(contract: DatasetContract, row: dict[str, Any]) -> frozenset[str]:
    """The arithmetic of a row's worked solution (`mathgen.equation_key` of its final-answer field);
    empty without one (or without calculator marks)."""
    from tasks.data.mathgen import equation_key

    value = row.get(contract.final_answer_field) if contract.final_answer_field else None
    return equation_key(value) if isinstance(value, str) else frozenset()


def checked_texts(contract: DatasetContract, row: dict[str, Any]) -> list[str]:
    """The free texts of a row that the paragraph-overlap check compares: every text field, a solution
    without its final `#### <answer>` line (answer lines alone are not shared text)."""
    from tasks.data.mathgen import worked_steps

    texts = []
    for name in contract.text_fields:
        value = row.get(name)
        if isinstance(value, str):
            texts.append(worked_steps(value) if name == contract.final_answer_field else value)
    return texts


def shared_text(contract: DatasetContract, row: dict[str, Any], reference: frozenset[str]) -> str:
    """The first paragraph of `row` (normalized, at most 100 characters) whose key is in `reference`;
    "" when none is."""
    for text in checked_texts(contract, row):
        for key, paragraph in paragraphs(text).items():
            if key in reference:
                return paragraph[:100]
    return ""


def question_key(text: Any) -> str | None:
    """The overlap key of a question: sha1 of `mathgen.problem_key(text)` (its normalized text with the
    generator's names, goods and other interchangeable words masked, numbers kept), 16 hex digits, so an
    eval question that is a training question with other names is refused like an exact copy.

    Returns None for a non-string (that row fails its type expectation instead).
    """
    from tasks.data.mathgen import problem_key

    if not isinstance(text, str):
        return None
    return hashlib.sha1(problem_key(text).encode("utf-8")).hexdigest()[:16]


def normalized_corpus(texts: Iterable[Any]) -> str:
    """The corpus as one normalized string (documents joined by newlines) for contamination checks."""
    from tasks.data.mathgen import normalize_question

    return "\n".join(normalize_question(t) for t in texts if isinstance(t, str))


def build_frame(
    contract: DatasetContract,
    rows: Sequence[dict[str, Any]],
    labels: Sequence[str],
    corpus: str | None = None,
    paragraph_reference: frozenset[str] | None = None,
    arithmetic_reference: frozenset[frozenset[str]] | None = None,
):
    """The pandas DataFrame a suite validates: raw fields (as objects) plus the derived columns.

    Args:
        contract: the dataset's contract.
        rows: raw JSON objects, one per data row.
        labels: one label per row ("sft.jsonl:17"); the frame's index, so failures name rows.
        corpus: for a contract with `question_overlap` (eval, select), `normalized_corpus(...)` of the
            CPT corpus: `_in_corpus` is True when a row's normalized question occurs in it (contamination).
        paragraph_reference: for a contract with `paragraph_overlap` (select_corpus, select), the paragraph
            keys of the other datasets: `_shared_text` is a row's first shared paragraph ("" for none).
        arithmetic_reference: for a contract with `arithmetic_overlap` (eval), the `equation_key`s of those
            datasets' solutions: `_shared_arithmetic` names a row's arithmetic when one of them does it
            ("" otherwise).

    Returns:
        DataFrame of shape (len(rows), fields + extra fields + derived), dtype object. A field a row
        lacks is NaN (null); every contract field exists as a column even if no row has it.

    Raises:
        ValueError: a row uses a reserved derived column name.
    """
    import pandas as pd

    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
    extra: list[str] = []
    for row, label in zip(rows, labels):
        reserved = [k for k in row if k in DERIVED_COLUMNS]
        if reserved:
            raise ValueError(f"{label}: field(s) {reserved} are reserved for derived contract columns")
        extra.extend(k for k in row if k not in contract.fields and k not in extra)
    columns = list(contract.fields) + extra
    frame = pd.DataFrame(
        list(rows), columns=columns, dtype=object, index=pd.Index(list(labels), dtype=object)
    )
    frame[FIELDS_COLUMN] = [",".join(sorted(row)) for row in rows]
    int_fields = [name for name, type_ in contract.fields.items() if type_ == "int"]
    frame[BOOL_INTS_COLUMN] = [
        ",".join(f for f in int_fields if isinstance(row.get(f), bool)) for row in rows
    ]
    if contract.final_answer_field:
        frame[FINAL_ANSWER_COLUMN] = [final_answer(row.get(contract.final_answer_field)) for row in rows]
    if contract.question_field:
        frame[QUESTION_KEY_COLUMN] = [question_key(row.get(contract.question_field)) for row in rows]
    if contract.question_overlap:
        if corpus is None:
            raise ValueError(
                f"the {contract.name} contract needs the normalized corpus (contamination check)"
            )
        from tasks.data.mathgen import normalize_question

        frame[IN_CORPUS_COLUMN] = [
            isinstance(q, str) and normalize_question(q) in corpus
            for q in (row.get(contract.question_field) for row in rows)
        ]
    if contract.paragraph_overlap:
        if paragraph_reference is None:
            raise ValueError(f"the {contract.name} contract needs the paragraphs of the other datasets")
        frame[SHARED_TEXT_COLUMN] = [shared_text(contract, row, paragraph_reference) for row in rows]
    if contract.arithmetic_overlap:
        if arithmetic_reference is None:
            raise ValueError(f"the {contract.name} contract needs the arithmetic of the other datasets")
        keys = [worked_arithmetic(contract, row) for row in rows]
        frame[SHARED_ARITHMETIC_COLUMN] = [
            ", ".join(sorted(k)) if k in arithmetic_reference else "" for k in keys
        ]
    return frame


def text_bounds(contract: DatasetContract, field: str, params) -> tuple[int, int]:
    """Length bounds (characters) of a free-text field, from params.data and params.validate_data."""
    v = params.validate_data
    if contract.is_corpus:  # prose documents; math documents: see build_suite
        return params.data.min_doc_chars, params.data.max_doc_chars
    if field in ("response", "solution"):
        return 1, v.max_solution_chars
    return v.min_question_chars, v.max_question_chars


def build_suite(
    contract: DatasetContract, params, training_keys: Iterable[str] | None = None
) -> gx.ExpectationSuite:
    """The expectation suite of `contract` for the bounds in `params`.

    Args:
        contract: the dataset's contract.
        params: a `tasks.core.params.Params` (uses `data.*` bounds and levels, `validate_data.*` bounds).
        training_keys: `_question_key`s of the `question_overlap` datasets' questions (eval: SFT prompts
            + RL questions; select: also eval questions); required for those contracts (zero overlap).

    Returns:
        A `gx.ExpectationSuite` named `contract.name` (not yet added to a context).
    """
    if contract.question_overlap and training_keys is None:
        raise ValueError(f"the {contract.name} contract needs training_keys (the overlap check)")
    expectations: list = []
    add = expectations.append
    add(gxe.ExpectTableRowCountToBeBetween(min_value=1, description="at least one row"))
    add(
        gxe.ExpectColumnValuesToBeInSet(
            column=FIELDS_COLUMN,
            value_set=[",".join(sorted(contract.fields))],
            description=f"exactly the fields {sorted(contract.fields)} in every row",
        )
    )
    for name, type_ in contract.fields.items():
        add(gxe.ExpectColumnValuesToNotBeNull(column=name, description=f"{name} present and not null"))
        add(
            gxe.ExpectColumnValuesToBeOfType(
                column=name, type_=type_, description=f"{name} is a JSON {_json_type(type_)}"
            )
        )
    int_fields = [name for name, type_ in contract.fields.items() if type_ == "int"]
    if int_fields:
        add(
            gxe.ExpectColumnValuesToBeInSet(
                column=BOOL_INTS_COLUMN,
                value_set=[""],
                description=f"{', '.join(int_fields)}: a JSON integer, never true/false (strict types)",
            )
        )
    add(
        gxe.ExpectColumnValuesToMatchRegex(
            column="id", regex=ID_REGEX, description="id is 1-128 printable ASCII characters without spaces"
        )
    )
    for name in contract.unique_fields:
        add(gxe.ExpectColumnValuesToBeUnique(column=name, description=f"{name} unique (no duplicate rows)"))
    for name in contract.text_fields:
        low, high = text_bounds(contract, name, params)
        if contract.is_corpus:
            add(
                gxe.ExpectColumnValueLengthsToBeBetween(
                    column=name,
                    min_value=low,
                    max_value=high,
                    row_condition=f'source!="{MATH_SOURCE}"',
                    condition_parser="pandas",
                    description=f"{name} has {low}-{high} characters (prose documents)",
                )
            )
            low = params.validate_data.min_question_chars
            add(
                gxe.ExpectColumnValueLengthsToBeBetween(
                    column=name,
                    min_value=low,
                    max_value=high,
                    row_condition=f'source=="{MATH_SOURCE}"',
                    condition_parser="pandas",
                    description=f"{name} has {low}-{high} characters "
                    f"(math documents, source '{MATH_SOURCE}')",
                )
            )
        else:
            add(
                gxe.ExpectColumnValueLengthsToBeBetween(
                    column=name,
                    min_value=low,
                    max_value=high,
                    description=f"{name} has {low}-{high} characters",
                )
            )
        add(
            gxe.ExpectColumnValuesToNotMatchRegex(
                column=name,
                regex=CONTROL_CHARS_REGEX,
                description=f"{name} has no control characters (C0/C1, zero-width, bidi, BOM, U+FFFD)",
            )
        )
        for _, regex, what in SENSITIVE_PATTERNS:
            add(
                gxe.ExpectColumnValuesToNotMatchRegex(column=name, regex=regex, description=f"{name}: {what}")
            )
    if contract.is_corpus:
        add(
            gxe.ExpectColumnValueLengthsToBeBetween(
                column="source", min_value=1, max_value=200, description="source has 1-200 characters"
            )
        )
    if contract.is_math:
        add(
            gxe.ExpectColumnValuesToMatchRegex(
                column="answer",
                regex=ANSWER_REGEX,
                description='answer is a plain number ("42", "-3", "2.5")',
            )
        )
        add(
            gxe.ExpectColumnValuesToBeInSet(
                column="level",
                value_set=list(params.data.math_levels),
                description=f"level is one of data.math_levels {list(params.data.math_levels)}",
            )
        )
    if contract.final_answer_field:
        field = contract.final_answer_field
        add(
            gxe.ExpectColumnValuesToMatchRegex(
                column=field, regex=FINAL_LINE_REGEX, description=f"{field} ends with a line '#### <answer>'"
            )
        )
        add(
            gxe.ExpectColumnPairValuesToBeEqual(
                column_A="answer",
                column_B=FINAL_ANSWER_COLUMN,
                ignore_row_if="both_values_are_missing",
                description=f"the number after '#### ' at the end of {field} equals answer",
            )
        )
    if contract.question_overlap:
        field = contract.question_field
        others = " or ".join(_QUESTION_NAMES[name] for name in contract.question_overlap)
        add(
            gxe.ExpectColumnValuesToNotBeInSet(
                column=QUESTION_KEY_COLUMN,
                value_set=sorted(set(training_keys or [])),
                description=f"{field} does not overlap "
                + ("training" if contract.name == "eval" else "training or eval")
                + f": its problem (normalized text, names and goods aside: `problem_key`) is no {others}",
            )
        )
        add(
            gxe.ExpectColumnValuesToBeInSet(
                column=IN_CORPUS_COLUMN,
                value_set=[False],
                description=f"{field} does not occur in the CPT corpus (normalized substring search)",
            )
        )
    if contract.paragraph_overlap:
        files = ", ".join(f for name in contract.paragraph_overlap for f in CONTRACTS[name].files)
        add(
            gxe.ExpectColumnValuesToBeInSet(
                column=SHARED_TEXT_COLUMN,
                value_set=[""],
                description=f"{', '.join(contract.text_fields)} share no paragraph (normalized text) with "
                f"{files}",
            )
        )
    if contract.arithmetic_overlap:
        files = ", ".join(f for name in contract.arithmetic_overlap for f in CONTRACTS[name].files)
        add(
            gxe.ExpectColumnValuesToBeInSet(
                column=SHARED_ARITHMETIC_COLUMN,
                value_set=[""],
                description=f"{contract.final_answer_field} does not do the arithmetic of a solution in "
                f"{files} (`equation_key`: its <<expr=...>> expressions, a sum's operands in either order)",
            )
        )
    # Built from a list, not with suite.add_expectation: that saves the whole suite to the store on
    # every call once a suite of the same name exists there (quadratic; seconds per suite).
    return gx.ExpectationSuite(name=contract.name, expectations=expectations)


_QUESTION_NAMES = {"sft": "SFT prompt", "rl": "RL question", "eval": "eval question"}


def _json_type(type_: str) -> str:
    return {"str": "string", "int": "integer"}.get(type_, type_)
