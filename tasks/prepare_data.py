"""Stage `prepare_data`: builds every dataset of the pipeline into `data/raw/`, without network.

    python -m tasks.prepare_data [--params params.yaml] [--set data.num_sft=500 ...]

Reads the embedded sources (Python's own docstrings and language reference; generated math problems) and
any `data.sources` (local or s3:// JSONL/Parquet). Writes `data/raw/` as a whole (corpus_train/val.jsonl,
sft.jsonl, rl.jsonl, eval.jsonl, the healing-decision split select_corpus.jsonl and select.jsonl that no
stage trains on (compress decides its healing on them; route calibrates its router on select.jsonl),
manifest.json with row counts, sha256, sources and filter counts),
`metrics/prepare_data.json` and `plots/prepare_data/`. Owns cleaning, de-duplication and the
leakage-free sft/rl/eval/select split: docs/choices.md#prepare_data.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_contracts.overlap import paragraph_keys
from tasks.core.files import (
    atomic_dir,
    pyplot,
    save_figure,
    sha256_file,
    write_json,
    write_jsonl,
    write_metrics,
)
from tasks.core.params import DataParams, Params
from tasks.core.paths import Workspace
from tasks.core.stage import StageError, log, stage_main
from tasks.data.corpus import _doc_key, build_corpus, embedded_corpus
from tasks.data.mathgen import (
    Problem,
    equation_key,
    generate_problems,
    normalize_question,
    problem_key,
    worked_steps,
)
from tasks.data.sources import Document, load_source, map_rows

FILES = (
    "corpus_train.jsonl",
    "corpus_val.jsonl",
    "sft.jsonl",
    "rl.jsonl",
    "eval.jsonl",
    "select_corpus.jsonl",
    "select.jsonl",
)
SOURCE_QUARANTINE = "source_quarantine.jsonl"  # bad user rows set aside (quarantine mode)
MATH_SOURCE = "math"


# --- math splits --------------------------------------------------------------------------------


def split_math(
    pool: list[Problem],
    num_eval: int,
    num_rl: int,
    num_sft: int,
    seed: int,
    num_select: int = 0,
    spare: list[Problem] | tuple[Problem, ...] = (),
    num_val: int = 0,
) -> dict[str, list[Problem]]:
    """Splits problems into eval / rl / sft / select by problem group (`problem_key`: the same template with
    the same numbers, names and goods aside; a group never straddles splits).

    Groups are shuffled with `seed`; each group goes whole to the first split (eval, rl, sft) that
    still has room, and a split that overflows is truncated (the dropped rows' group lives in that
    split only, so truncation cannot create overlap). A group (`problem_groups`) also takes along every
    problem that does the same worked arithmetic (`equation_key`: one sum told in another story), so no
    training split does an eval problem's arithmetic; eval keeps one generated problem of each group
    (its rows are distinct problems; a user's rows are all kept). The select split (compress's healing
    decision, `num_select` rows) then takes the groups left over, round robin in the same order (one
    problem of each group in turn, so that no one template fills it), and after them the `spare`
    problems whose problem key is in no other split. A select candidate that shares a paragraph
    (`problem_texts`: e.g. another question with the same worked steps) with eval / rl / sft is skipped:
    that text would be trained text. `spare` lets the select split grow without changing eval / rl / sft.
    With `num_val`, a "val" split (the problems whose documents validate the corpus: corpus_val's math
    text, which no stage trains on) is chosen the same way from what is left after select; when too few
    are left (a user pool without spare problems), the shortfall is carved off the end of sft as whole
    problem groups, so sft then holds fewer than `num_sft` problems (logged).

    Raises:
        StageError: when the pool cannot fill the requested counts.
    """
    groups = problem_groups(pool)
    order = sorted(groups)
    random.Random(f"split:{seed}").shuffle(order)
    targets = {"eval": num_eval, "rl": num_rl, "sft": num_sft}
    splits: dict[str, list[Problem]] = {name: [] for name in targets}
    left: list[str] = []  # the groups no split took, in order
    for key in order:
        room = next((name for name in targets if len(splits[name]) < targets[name]), None)
        if room is None:
            left.append(key)
        elif room == "eval":
            # One generated problem per group (the others pose the same problem or do the same
            # arithmetic: generated, so dropped); a user's rows are all kept.
            generated = [p for p in groups[key] if p.origin.startswith("mathgen:")]
            splits["eval"].extend(generated[:1] + [p for p in groups[key] if p not in generated])
        else:
            splits[room].extend(groups[key])
    for name, target in targets.items():
        if len(splits[name]) < target:
            raise StageError(
                f"the math pool has {len(pool)} problems in {len(groups)} problem groups: "
                f"too few for data.num_eval={num_eval}, data.num_rl={num_rl}, data.num_sft={num_sft} "
                f"({name} got {len(splits[name])}); lower them or add problems"
            )
        del splits[name][target:]
    if num_select:
        # Round robin over the leftover groups (one problem of each in turn), so that the decision rows
        # spread over many templates instead of filling up with the first leftover group's.
        rounds = itertools.zip_longest(*(groups[key] for key in left))
        leftovers = [p for row in rounds for p in row if p is not None]
        splits["select"] = _select_split(splits, leftovers, spare, num_select)
    if num_val:
        flat = [p for key in left for p in groups[key]]
        val = _select_split(splits, flat, spare, num_val, what=None)
        if len(val) < num_val:
            splits["sft"], carved = _carve_groups(splits["sft"], num_val - len(val))
            log.warning(
                "corpus_val's math documents: %d held-out problems left after the splits, %d more carved "
                "off sft (which now has %d problems, data.num_sft=%d)",
                len(val),
                len(carved),
                len(splits["sft"]),
                num_sft,
            )
            val += carved
        splits["val"] = val
    return splits


def problem_groups(pool: list[Problem]) -> dict[str, list[Problem]]:
    """The pool's problem groups: problems linked by the same `problem_key` (one problem under other
    names or goods) or the same worked arithmetic (`equation_key`, when the solution has calculator
    marks: one sum told in two stories), transitively; keyed by the group's smallest problem key, each
    group's problems in pool order."""
    parent = list(range(len(pool)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, Any], int] = {}
    for i, problem in enumerate(pool):
        arithmetic = equation_key(problem.solution)
        for link in (("q", problem_key(problem.question)), ("e", arithmetic) if arithmetic else None):
            if link is not None:
                j = find(first.setdefault(link, i))
                parent[find(i)] = j
    members: dict[int, list[Problem]] = {}
    for i, problem in enumerate(pool):
        members.setdefault(find(i), []).append(problem)
    return {min(problem_key(p.question) for p in rows): rows for rows in members.values()}


def _carve_groups(problems: list[Problem], count: int) -> tuple[list[Problem], list[Problem]]:
    """(kept, carved): at least `count` problems off the end of `problems`, as whole problem groups."""
    carved_keys = {problem_key(p.question) for p in problems[len(problems) - count :]}
    kept = [p for p in problems if problem_key(p.question) not in carved_keys]
    return kept, [p for p in problems if problem_key(p.question) in carved_keys]


def problem_texts(problem: Problem) -> tuple[str, str]:
    """The texts of a problem the overlap checks compare: its question and its worked solution without
    the final `#### <answer>` line (an answer line alone, as in answer-only rows, is not shared text)."""
    return problem.question, worked_steps(problem.solution)


def _select_split(
    splits: dict[str, list[Problem]],
    left: list[Problem],
    spare: list[Problem] | tuple[Problem, ...],
    wanted: int,
    what: str | None = "data.num_select",
) -> list[Problem]:
    """`wanted` problems from `left` (whole leftover groups) then `spare`, sharing no question, problem
    key or paragraph (`problem_texts`) with `splits`; StageError naming `what` (the parameter) when too
    few remain, or, with `what` None, as many as there are."""
    taken = [p for rows in splits.values() for p in rows]
    patterns = {problem_key(p.question) for p in taken}
    taken_text = set().union(*(paragraph_keys(t) for p in taken for t in problem_texts(p)))
    seen = {normalize_question(p.question) for p in taken}
    chosen: list[Problem] = []
    for problem in (p for p in [*left, *spare] if problem_key(p.question) not in patterns):
        if len(chosen) == wanted:
            break
        question = normalize_question(problem.question)
        if question in seen or any(paragraph_keys(t) & taken_text for t in problem_texts(problem)):
            continue
        seen.add(question)
        chosen.append(problem)
    if len(chosen) < wanted and what is not None:
        raise StageError(
            f"the math pool leaves {len(chosen)} problems for the healing-decision split after eval, rl and "
            f"sft (whole problem groups, no worked solution shared with them): too few for "
            f"data.num_select={wanted}; lower data.num_select or data.num_sft/num_rl/num_eval, "
            "or add problems"
        )
    return chosen


def check_no_overlap(
    splits: dict[str, list[Problem]], corpus: list[Document], val: list[Problem] | tuple[Problem, ...] = ()
) -> dict[str, int]:
    """Verifies the held-out guarantees (see the module docstring); raises StageError on a violation.
    `val`: the problems whose documents are corpus_val's math text (no problem of theirs in another split)."""
    train = splits["sft"] + splits["rl"]
    train_text = {normalize_question(p.question) for p in train}
    train_pattern = {problem_key(p.question) for p in train}
    errors = []
    same_text = [p.question for p in splits["eval"] if normalize_question(p.question) in train_text]
    same_pattern = [p.question for p in splits["eval"] if problem_key(p.question) in train_pattern]
    train_arithmetic = {equation_key(p.solution) for p in train} - {frozenset()}
    same_arithmetic = [p.solution for p in splits["eval"] if equation_key(p.solution) in train_arithmetic]
    sft_text = {normalize_question(p.question) for p in splits["sft"]}
    rl_in_sft = [p.question for p in splits["rl"] if normalize_question(p.question) in sft_text]
    corpus_text = "\n".join(" ".join(d.text.lower().split()) for d in corpus)
    contaminated = [p.question for p in splits["eval"] if normalize_question(p.question) in corpus_text]
    checks = [
        ("eval questions also in sft/rl", same_text),
        ("eval problems also in sft/rl with other names or goods (problem_key)", same_pattern),
        ("eval problems whose worked arithmetic is in sft/rl (equation_key)", same_arithmetic),
        ("rl questions also in sft", rl_in_sft),
        ("eval questions found in the CPT corpus", contaminated),
    ]
    select = splits.get("select", [])
    if select:  # the healing-decision rows: nothing in common with any other split, nor the corpus
        others = splits["sft"] + splits["rl"] + splits["eval"]
        other_text = {normalize_question(p.question) for p in others}
        other_pattern = {problem_key(p.question) for p in others}
        other_paragraphs = set().union(*(paragraph_keys(t) for p in others for t in problem_texts(p)))
        checks += [
            (
                "select questions also in sft/rl/eval",
                [p.question for p in select if normalize_question(p.question) in other_text],
            ),
            (
                "select problems also in sft/rl/eval with other names or goods (problem_key)",
                [p.question for p in select if problem_key(p.question) in other_pattern],
            ),
            (
                "select problems sharing a paragraph (question or worked solution) with sft/rl/eval",
                [
                    p.solution
                    for p in select
                    if any(paragraph_keys(t) & other_paragraphs for t in problem_texts(p))
                ],
            ),
            (
                "select questions found in the CPT corpus",
                [p.question for p in select if normalize_question(p.question) in corpus_text],
            ),
        ]
    if val:
        elsewhere = {problem_key(p.question) for rows in splits.values() for p in rows}
        checks.append(
            (
                "corpus_val math problems also in sft/rl/eval/select (problem_key)",
                [p.question for p in val if problem_key(p.question) in elsewhere],
            )
        )
    for what, bad in checks:
        if bad:
            errors.append(f"{len(bad)} {what}, e.g. {bad[0][:120]!r}")
    if errors:
        raise StageError("train/eval overlap: " + "; ".join(errors))
    return {
        "eval_checked": len(splits["eval"]),
        "train_checked": len(train),
        "corpus_docs_checked": len(corpus),
        "select_checked": len(select),
        "corpus_val_math_checked": len(val),
    }


def carve_select_corpus(
    train: list[Document], others: list[str], chars: int, seed: int
) -> tuple[list[Document], list[Document]]:
    """Moves documents of `train` (seeded order) to the select corpus until it has `chars` characters.

    Only a document none of whose paragraphs (`data_contracts.overlap.paragraph_keys`) occurs in another
    training document or in `others` (every other text of the data set) is eligible, so the select corpus
    shares no paragraph with anything a stage reads. Returns (train without them, the select documents).

    Raises:
        StageError: too few eligible documents (naming data.select_corpus_chars).
    """
    keys = [paragraph_keys(d.text) for d in train]
    blocked: set[str] = set().union(*(paragraph_keys(t) for t in others))
    count = Counter(k for doc_keys in keys for k in doc_keys)
    order = list(range(len(train)))
    random.Random(f"select:{seed}").shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total >= chars:
            break
        if keys[i] and not keys[i] & blocked and all(count[k] == 1 for k in keys[i]):
            chosen.append(i)
            total += len(train[i].text)
    if total < chars or len(chosen) == len(train):
        eligible = sum(
            1 for i in order if keys[i] and not keys[i] & blocked and all(count[k] == 1 for k in keys[i])
        )
        raise StageError(
            f"the corpus has {len(train)} training documents, {eligible} of them sharing no paragraph with "
            f"other text: too little for data.select_corpus_chars={chars} characters of healing-decision "
            f"text (got {total}) with training text left; lower data.select_corpus_chars or add documents"
        )
    picked = set(chosen)
    return [d for i, d in enumerate(train) if i not in picked], [train[i] for i in chosen]


def check_select_text(select: list[str], texts: list[str]) -> int:
    """Raises StageError when a select text (documents, `problem_texts`) shares a paragraph with `texts`
    (every text of the other files); returns the number of select texts checked."""
    other: set[str] = set().union(*(paragraph_keys(t) for t in texts))
    bad = [t for t in select if paragraph_keys(t) & other]
    if bad:
        raise StageError(
            f"select overlap: {len(bad)} healing-decision texts share a paragraph with the training or "
            f"held-out text, e.g. {bad[0][:120]!r}"
        )
    return len(select)


# --- rows ---------------------------------------------------------------------------------------


def _id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def math_document(problem: Problem) -> Document:
    """The CPT text of a problem: the question, then the worked solution ending in `#### answer`."""
    return Document(text=f"{problem.question}\n{problem.solution}", source=MATH_SOURCE)


def _chat_rows(prefix: str, problems: list[Problem]) -> list[dict[str, Any]]:
    """SFT-format rows (sft.jsonl, select.jsonl): the question as prompt, the worked solution as response."""
    return [
        {
            "id": _id(prefix, normalize_question(p.question)),
            "prompt": p.question,
            "response": p.solution,
            "answer": p.answer,
            "level": p.level,
        }
        for p in problems
    ]


def _rows(splits: dict[str, list[Problem]]) -> dict[str, list[dict[str, Any]]]:
    return {
        "sft.jsonl": _chat_rows("sft", splits["sft"]),
        "select.jsonl": _chat_rows("select", splits["select"]),
        "rl.jsonl": [
            {
                "id": _id("rl", normalize_question(p.question)),
                "question": p.question,
                "answer": p.answer,
                "level": p.level,
            }
            for p in splits["rl"]
        ],
        "eval.jsonl": [
            {
                "id": _id("eval", normalize_question(p.question)),
                "question": p.question,
                "solution": p.solution,
                "answer": p.answer,
                "level": p.level,
            }
            for p in splits["eval"]
        ],
    }


def _split_corpus(
    docs: list[Document], val_fraction: float, seed: int, tag: str
) -> tuple[list[Document], list[Document]]:
    docs = list(docs)
    random.Random(f"val:{tag}:{seed}").shuffle(docs)
    if len(docs) < 2:
        return docs, []
    n_val = min(len(docs) - 1, max(1, math.ceil(val_fraction * len(docs))))
    return docs[n_val:], docs[:n_val]


def _shuffled(docs: list[Document], seed: str) -> list[Document]:
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    return docs


def _plot(params: Params, train: list[Document], splits: dict[str, list[Problem]]) -> None:
    plt = pyplot()

    out = Workspace.from_params(params).plots("prepare_data")
    lengths = sorted(len(d.text) for d in train)
    edges = list(range(0, params.data.max_doc_chars + 250, 250))
    counts = [sum(1 for n in lengths if lo <= n < lo + 250) for lo in edges[:-1]]
    _write_csv(out / "doc_lengths.csv", ["chars", "documents"], list(zip(edges[:-1], counts)))
    levels = sorted({p.level for s in splits.values() for p in s})
    level_rows = [
        (lvl, *(sum(1 for p in splits[s] if p.level == lvl) for s in ("sft", "rl", "eval"))) for lvl in levels
    ]
    _write_csv(out / "math_levels.csv", ["level", "sft", "rl", "eval"], level_rows)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar(edges[:-1], counts, width=240, align="edge")
    ax1.set(xlabel="characters", ylabel="documents", title="corpus_train document lengths")
    width = 0.27
    for i, split in enumerate(("sft", "rl", "eval")):
        ax2.bar(
            [lvl + (i - 1) * width for lvl in levels],
            [row[i + 1] for row in level_rows],
            width=width,
            label=split,
        )
    ax2.set(xlabel="level", ylabel="problems", title="math problems per level", xticks=levels)
    ax2.legend()
    fig.tight_layout()
    save_figure(fig, out / "prepare_data.png", dpi=80)


def _write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    """A small CSV for `dvc plots` (plain numbers, no quoting needed)."""
    from tasks.core.files import atomic_file

    with atomic_file(path) as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join(str(v) for v in row) + "\n")


# --- the stage ----------------------------------------------------------------------------------


@dataclass
class _Inputs:
    """The rows of `data.sources` and whether the embedded corpus / generated math are added."""

    docs: list[Document]
    problems: list[Problem]
    stats: dict[str, Any]
    embed_corpus: bool
    embed_math: bool
    bad_rows: list[dict[str, Any]]  # bad user rows set aside (quarantine mode; empty otherwise)


@dataclass
class _Corpus:
    """The cleaned, de-duplicated general documents and the cleaning statistics per origin."""

    docs: list[Document]
    stats: dict[str, Any]


@dataclass
class _MathSplits:
    """The math problems per split (sft / rl / eval / select), the problems whose documents validate the
    corpus (`val`: whole problem groups carved off sft, so corpus_val holds no trained text), and the user
    problems dropped as exact duplicates."""

    splits: dict[str, list[Problem]]
    user_duplicates: int
    val: list[Problem] = field(default_factory=list)


@dataclass
class _Dataset:
    """What goes to `data/raw/`: the corpus documents per file and every file's rows."""

    corpus: dict[str, list[Document]]  # corpus_train.jsonl / corpus_val.jsonl / select_corpus.jsonl
    rows: dict[str, list[dict[str, Any]]]  # every file of FILES
    math_docs: int  # math problems added to the corpus as documents (sft in train, held-out groups in val)
    overlap: dict[str, int]


def _check_quarantine_limit(
    user_stats: dict[str, Any], bad_rows: list[dict[str, Any]], fraction: float
) -> None:
    """Raises StageError when the bad rows of a user file exceed `validate_data.max_quarantine_fraction`."""
    over = []
    for uri, entry in user_stats["files"].items():
        bad, total = entry["quarantined"], entry["rows"]
        if bad > fraction * total:
            first = next(r for r in bad_rows if r["file"] == uri)
            over.append(
                f"{uri}: {bad} of {total} rows ({bad / total:.1%}) are bad, over "
                f"validate_data.max_quarantine_fraction={fraction}; first: {first['where']}: "
                f"{first['reasons'][0]['description']}"
            )
    if over:
        raise StageError("too many bad rows in data.sources to quarantine:\n  " + "\n  ".join(over))
    for row in bad_rows:
        log.warning("quarantined %s: %s", row["where"], row["reasons"][0]["description"])
    log.info("quarantine: %d bad user rows set aside", len(bad_rows))


def run(params: Params) -> dict[str, Any]:
    data = params.data
    t0 = time.perf_counter()
    inputs = _read_inputs(params)
    corpus = _build_corpus(inputs, data, params.seed)
    log.info(
        "corpus: %d documents after cleaning and de-duplication (%.1f s)",
        len(corpus.docs),
        time.perf_counter() - t0,
    )
    maths = _split_math_pool(inputs, data, params.seed)
    dataset = _assemble(corpus, maths, data, params.seed)
    files = _write_raw(params, inputs, corpus, maths, dataset)
    _plot(params, dataset.corpus["corpus_train.jsonl"], maths.splits)
    metrics = {
        "corpus_train_docs": files["corpus_train.jsonl"]["rows"],
        "corpus_val_docs": files["corpus_val.jsonl"]["rows"],
        "corpus_train_chars": sum(len(d.text) for d in dataset.corpus["corpus_train.jsonl"]),
        "math_docs_in_corpus": dataset.math_docs,
        "sft": len(maths.splits["sft"]),
        "rl": len(maths.splits["rl"]),
        "eval": len(maths.splits["eval"]),
        # corpus_val's math documents: problems of their own groups that no split holds
        "corpus_val_math": len(maths.val),
        # The healing-decision split (compress): general documents moved out of corpus_train, and math
        # problems of their own problem groups; no stage trains on them.
        "select_corpus_docs": files["select_corpus.jsonl"]["rows"],
        "select_corpus_chars": sum(len(d.text) for d in dataset.corpus["select_corpus.jsonl"]),
        "select": len(maths.splits["select"]),
        "near_duplicates_removed": sum(s.get("near_duplicates", 0) for s in corpus.stats.values()),
        "exact_duplicates_removed": sum(s.get("exact_duplicates", 0) for s in corpus.stats.values()),
        "user_rows_quarantined": len(inputs.bad_rows),
    }
    write_metrics(params, "prepare_data", metrics)
    log.info("prepare_data: %s (%.1f s)", metrics, time.perf_counter() - t0)
    return metrics


def _read_inputs(params: Params) -> _Inputs:
    """Reads `data.sources` and decides, per `data.embedded`, what embedded data is added."""
    data = params.data
    docs: list[Document] = []
    problems: list[Problem] = []
    stats: dict[str, Any] = {}
    # Bad user rows: the first one stops the stage (validate_data.on_violation=fail), or they are set
    # aside with their reasons (quarantine), within the contracts' max_quarantine_fraction per file.
    bad_rows: list[dict[str, Any]] | None = None if params.validate_data.on_violation == "fail" else []
    if data.sources:
        sources = [load_source(uri) for uri in data.sources]
        docs, problems, stats = map_rows(sources, data.math_levels, quarantine=bad_rows)
        if bad_rows:
            _check_quarantine_limit(stats, bad_rows, params.validate_data.max_quarantine_fraction)
    embed_corpus = data.embedded == "always" or (data.embedded == "auto" and not docs)
    embed_math = data.embedded == "always" or (data.embedded == "auto" and not problems)
    if not embed_corpus and not docs:
        raise StageError("data.embedded is 'never' but no file in data.sources has corpus rows ('text')")
    if not embed_math and not problems:
        raise StageError(
            "data.embedded is 'never' but no file in data.sources has math rows ('question'+'answer')"
        )
    if data.sources and (embed_corpus or embed_math):
        log.info(
            "adding embedded %s to the user data (data.embedded=%s)",
            " and ".join(k for k, on in (("corpus", embed_corpus), ("math", embed_math)) if on),
            data.embedded,
        )
    return _Inputs(docs, problems, stats, embed_corpus, embed_math, bad_rows or [])


def _build_corpus(inputs: _Inputs, data: DataParams, seed: int) -> _Corpus:
    """User text first (it wins de-duplication ties), then the embedded text; at most
    `data.max_corpus_docs` documents, a seeded sample kept in order."""
    stats: dict[str, Any] = {}
    docs: list[Document] = []
    if inputs.docs:
        kept, stats["user"] = build_corpus(((d.source, d.text) for d in inputs.docs), data, prose_only=False)
        docs.extend(kept)
    if inputs.embed_corpus:
        kept, stats["embedded"] = embedded_corpus(data.min_doc_chars, data.max_doc_chars)
        known = {_doc_key(d.text) for d in docs}  # user vs embedded: exact duplicates only
        docs.extend(d for d in kept if _doc_key(d.text) not in known)
    if not docs:
        raise StageError(
            "the corpus is empty after cleaning: "
            "check data.min_doc_chars / data.max_doc_chars and the sources"
        )
    order = list(range(len(docs)))
    random.Random(f"corpus:{seed}").shuffle(order)
    return _Corpus([docs[i] for i in sorted(order[: data.max_corpus_docs])], stats)


def _split_math_pool(inputs: _Inputs, data: DataParams, seed: int) -> _MathSplits:
    """Math pool: user problems (exact duplicates dropped) and/or generated ones, split by `split_math`."""
    pool: list[Problem] = []
    seen: set[str] = set()
    for problem in inputs.problems:
        key = normalize_question(problem.question)
        if key not in seen:
            seen.add(key)
            pool.append(problem)
    user_duplicates = len(inputs.problems) - len(pool)
    spare: list[Problem] = []
    if inputs.embed_math:
        wanted = data.num_sft + data.num_rl + data.num_eval
        # ~30% headroom: whole groups go to one split, a split's overflow is dropped, eval keeps one row
        # per problem and the groups that share an eval problem's arithmetic train nowhere (level 1: about
        # five problems per sum). The select split draws on the leftover groups, then on spare problems
        # generated after the pool (so its size leaves eval/rl/sft unchanged); spares whose problem key or
        # solution is in them are skipped.
        main = math.ceil(wanted * 1.3) + 20
        n_val = math.ceil(data.val_fraction * data.num_sft)
        generated = generate_problems(main + 5 * data.num_select + 100 + 5 * n_val, data.math_levels, seed)
        pool.extend(p for p in generated[:main] if normalize_question(p.question) not in seen)
        spare = [p for p in generated[main:] if normalize_question(p.question) not in seen]
    splits = split_math(
        pool,
        data.num_eval,
        data.num_rl,
        data.num_sft,
        seed,
        num_select=data.num_select,
        spare=spare,
        num_val=math.ceil(data.val_fraction * data.num_sft),
    )
    val = splits.pop("val")
    return _MathSplits(splits, user_duplicates, val)


def _assemble(corpus: _Corpus, maths: _MathSplits, data: DataParams, seed: int) -> _Dataset:
    """The rows of every file: general and SFT-math documents split train/val, general documents for the
    healing decision moved out of train, then the math splits."""
    splits = maths.splits
    # corpus_train's math documents are the SFT problems (trained on anyway); corpus_val's are problems of
    # groups no split trains on (`_MathSplits.val`), so the held-out corpus loss holds no trained text.
    math_train = [math_document(p) for p in splits["sft"]]
    math_val = [math_document(p) for p in maths.val]
    math_docs = math_train + math_val
    general_train, general_val = _split_corpus(corpus.docs, data.val_fraction, seed, "general")
    # Every text of the files a stage reads or results are reported on (sft/rl/eval problems, their
    # corpus documents, corpus_val): the select split shares no paragraph with it.
    others = [d.text for d in general_val + math_docs] + [
        text for name in ("sft", "rl", "eval") for p in splits[name] for text in problem_texts(p)
    ]
    general_train, select_docs = carve_select_corpus(general_train, others, data.select_corpus_chars, seed)
    overlap = check_no_overlap(splits, corpus.docs, maths.val)
    overlap["select_texts_checked"] = check_select_text(
        [d.text for d in select_docs] + [t for p in splits["select"] for t in problem_texts(p)],
        others + [d.text for d in general_train],
    )

    corpus_rows = {  # general and math text interleaved (deterministically), not in blocks
        "corpus_train.jsonl": _shuffled(general_train + math_train, f"train:{seed}"),
        "corpus_val.jsonl": _shuffled(general_val + math_val, f"val:{seed}"),
        "select_corpus.jsonl": select_docs,
    }
    rows: dict[str, list[dict[str, Any]]] = {
        name: [{"id": _id("doc", d.text), "text": d.text, "source": d.source} for d in ds]
        for name, ds in corpus_rows.items()
    }
    rows.update(_rows(splits))
    return _Dataset(corpus_rows, rows, len(math_docs), overlap)


def _write_raw(
    params: Params, inputs: _Inputs, corpus: _Corpus, maths: _MathSplits, dataset: _Dataset
) -> dict[str, dict[str, Any]]:
    """Writes every file and `manifest.json` into `data/raw/` at once; returns the manifest's `files`."""
    data, rows, splits, bad_rows = params.data, dataset.rows, maths.splits, inputs.bad_rows
    raw_dir = Workspace.from_params(params).raw
    with atomic_dir(raw_dir) as tmp:
        for name in FILES:
            write_jsonl(tmp / name, rows[name])
        if bad_rows:
            write_jsonl(tmp / SOURCE_QUARANTINE, bad_rows)
        files = {
            name: {
                "rows": len(rows[name]),
                "sha256": sha256_file(tmp / name),
                "bytes": (tmp / name).stat().st_size,
            }
            for name in FILES
        }
        manifest = {
            "seed": params.seed,
            "python": sys.version.split()[0],
            "embedded": {"mode": data.embedded, "corpus": inputs.embed_corpus, "math": inputs.embed_math},
            "files": files,
            "sources": {
                "user": inputs.stats,
                "corpus": corpus.stats,
                "corpus_per_source": dict(
                    sorted(Counter(d.source for ds in dataset.corpus.values() for d in ds).items())
                ),
                "math_per_origin": dict(
                    sorted(Counter(p.origin for s in splits.values() for p in s).items())
                ),
                "user_math_duplicates": maths.user_duplicates,
            },
            "levels": {name: dict(sorted(Counter(p.level for p in s).items())) for name, s in splits.items()},
            "overlap_check": dataset.overlap,
        }
        if bad_rows:  # set aside in quarantine mode; validate_data publishes them in data/quarantine/
            manifest["source_quarantine"] = {
                "file": SOURCE_QUARANTINE,
                "rows": len(bad_rows),
                "sha256": sha256_file(tmp / SOURCE_QUARANTINE),
            }
        write_json(tmp / "manifest.json", manifest)
    return files


def main(argv: list[str] | None = None) -> int:
    return stage_main("prepare_data", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
