"""prepare_data: builds the datasets of the pipeline into `data/raw/` (no network needed).

    python -m tasks.prepare_data [--params params.yaml] [--set data.num_sft=500 ...]
    ruyi stage prepare_data ...

Writes (atomically: the whole `data/raw/` directory is replaced only when everything succeeded):
    corpus_train.jsonl, corpus_val.jsonl   {"id", "text", "source"}: CPT text
    sft.jsonl    {"id", "prompt", "response", "answer", "level"}: math chat pairs
    rl.jsonl     {"id", "question", "answer", "level"}: RL prompts (no solution)
    eval.jsonl   {"id", "question", "solution", "answer", "level"}: held-out evaluation problems
    manifest.json  row counts and sha256 of every file, sources, seed, filter counts
plus `metrics/prepare_data.json` and `plots/prepare_data/` (document lengths, math levels per split).

Embedded default (`data.sources: []`), deterministic given `seed` and the Python version:
1. English corpus from text that ships with Python itself: the docstrings of the standard library
   (parsed with `ast` from the .py sources, never imported, so no module side effects; files in
   sorted relative-path order; tests, idlelib, lib2to3, turtledemo, ensurepip, encodings and
   site-packages skipped) and the language-reference topics of `pydoc_data.topics` (the text of
   `help("topic")`). Only the Python version matters, not the installed packages, so the corpus is
   identical on every machine with the same Python (recorded in the manifest). Package README/licence
   texts were not used: they depend on what is installed in the environment.
2. Cleaning, in order (each drop is counted in the manifest):
   - non-printable characters removed (`\\t` becomes a space), reST roles (":class:`X`" -> "X") and
     double backquotes unwrapped;
   - split into paragraphs at blank lines; paragraphs with personal data or secrets (the data
     contract's `data_contracts.suites.SENSITIVE_PATTERNS`: e-mail addresses of stdlib authors,
     phone numbers, API keys) are removed;
   - a paragraph is CODE when under 60% of its whitespace
     tokens are plain words (doctests, signatures, tables, underlines), and is removed;
   - a document that lost more than half its characters that way is dropped as code-heavy;
   - remaining paragraphs are reflowed (whitespace collapsed to single spaces), joined by "\\n\\n";
   - non-English-ish documents are dropped: more than 1% non-ASCII characters, or fewer than 8% of
     the words among common English function words;
   - deviation from "drop too long documents": a document longer than `data.max_doc_chars` is cut
     at paragraph boundaries into pieces (a single paragraph over the limit is dropped), because
     the longest texts (reference topics) are the best prose; pieces under `data.min_doc_chars` go.
3. De-duplication: exact (sha1 of the lower-cased, whitespace-normalized text), then near-duplicate:
   MinHash over word 5-shingles (64 universal hash functions over a fixed crc32+adler32 64-bit
   shingle hash, so independent of PYTHONHASHSEED)
   with LSH banding (16 bands x 4 rows) to find candidate pairs, confirmed by the exact Jaccard
   similarity of the shingle sets >= 0.8. The first document in source order is kept.
4. Up to `data.max_corpus_docs` documents are sampled with `random.Random(seed)`.
5. Math: GSM8K-style generated problems (`tasks.mathgen`: six templates, levels `data.math_levels`).
   A pool of distinct problems is split into eval / rl / sft by NUMBER-PATTERN GROUP: problems whose
   questions differ only in their numbers share a group, and a group never straddles two splits.
   Then the split is checked (StageError if violated): no eval question's normalized text or number
   pattern occurs in sft or rl, no rl question is an sft question, and no eval question occurs in
   the CPT corpus (contamination).
6. The `####` format must be learnt somewhere before SFT, so the SFT problems' question + worked
   solution are ALSO added to the CPT corpus as documents with `source: "math"` (split between
   corpus_train and corpus_val like the rest). Only SFT problems are: RL and eval answers never
   appear in any training text. Stages that need general text only (DaE replay) filter on
   `source != "math"`.
7. corpus_val gets `data.val_fraction` of the general documents and of the math documents.

User data (`data.sources`: local paths or s3:// URIs of JSONL/Parquet, read by `tasks.sources`,
where the row mapping is documented): rows with `text` become corpus documents (cleaned: printable
characters, whitespace, length pieces, de-duplication; the code/English filters are NOT applied to
user text), rows with `question` + `answer` join the math pool that is split as above.
`data.embedded` decides what the embedded data adds: `auto` (default) fills a kind (corpus or math)
that the user files do not provide, logged and recorded in the manifest; `always` adds both;
`never` uses only the user files (a missing kind is then an error).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import random
import re
import sys
import sysconfig
import time
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tasks.common import (
    StageError,
    atomic_dir,
    log,
    plots_dir,
    save_figure,
    sha256_file,
    stage_main,
    write_json,
    write_jsonl,
    write_metrics,
)
from tasks.mathgen import Problem, generate_problems, normalize_question, number_pattern
from tasks.params import DataParams, Params
from tasks.sources import Document, load_source, map_rows

FILES = ("corpus_train.jsonl", "corpus_val.jsonl", "sft.jsonl", "rl.jsonl", "eval.jsonl")
MATH_SOURCE = "math"

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "encodings", "site-packages",
              "__pycache__", "dist-packages"}
_WORDY_MIN = 0.6          # a paragraph is prose when >= 60% of its tokens are plain words
_MAX_CODE_LOSS = 0.5      # a document that lost more than half its characters to code is dropped
_MAX_NON_ASCII = 0.01
_MIN_FUNCTION_WORDS = 0.08
_FUNCTION_WORDS = frozenset(
    "the a an of to and or is are was be been in on at for with as by from that this it its if not "
    "no can will when which than then there these those but into each all any may must should".split())
_SHINGLE = 5
_NUM_PERM, _BANDS = 64, 16
_NEAR_DUP_JACCARD = 0.8

_WORD_RE = re.compile(r"^[(\"']?[A-Za-z][A-Za-z'-]*[)\"']?[.,;:!?)\"']*$")
_ROLE_RE = re.compile(r":[\w-]+(?::[\w-]+)?:`~?([^`]+)`")
_LITERAL_RE = re.compile(r"``([^`]+)``")


# --- the embedded English corpus -------------------------------------------------------------


def stdlib_texts() -> Iterator[tuple[str, str]]:
    """Yields `(source, raw text)` from the standard library, in a machine-independent order.

    Sources: "python_docstrings" (module/class/function docstrings of the stdlib .py files, files
    sorted by their path relative to the stdlib root) then "python_reference" (pydoc topics, sorted).
    """
    from tqdm.auto import tqdm

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])),
                   key=lambda p: p.relative_to(root).as_posix())
    for path in tqdm(files, desc="prepare_data: stdlib docstrings", unit="file", leave=False):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # a few stdlib files are deliberately invalid (bad-syntax test data)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    yield "python_docstrings", doc
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield "python_reference", topics[name]


def _printable(text: str) -> str:
    """Drops control/format/private-use/unassigned characters (Unicode category C), keeps newlines."""
    text = text.replace("\t", " ").replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line if line.isprintable() else  # fast path; isprintable() is also False for
                     "".join(ch for ch in line if not unicodedata.category(ch).startswith("C"))  # Zs != " "
                     for line in text.split("\n"))


def _is_prose(paragraph: str) -> bool:
    tokens = paragraph.split()
    if len(tokens) < 3:
        return False
    return sum(1 for t in tokens if _WORD_RE.match(t)) / len(tokens) >= _WORDY_MIN


def _is_english(text: str) -> bool:
    if sum(1 for ch in text if ord(ch) > 127) > _MAX_NON_ASCII * len(text):
        return False
    words = re.findall(r"[a-z]+", text.lower())
    return bool(words) and sum(1 for w in words if w in _FUNCTION_WORDS) >= _MIN_FUNCTION_WORDS * len(words)


def clean_document(text: str, *, prose_only: bool, sensitive: re.Pattern[str] | None = None,
                   stats: Counter[str] | None = None) -> tuple[list[str], str | None]:
    """Cleans one raw text into paragraphs.

    Args:
        text: the raw text.
        prose_only: also remove code paragraphs and reject code-heavy / non-English text
            (the embedded corpus); False keeps every paragraph (user text).
        sensitive: paragraphs matching it (personal data, secrets) are removed.
        stats: if given, counts the removed paragraphs ("paragraphs_sensitive").

    Returns:
        (paragraphs, reason): the cleaned, reflowed paragraphs, and None or the reason the whole
        document is dropped ("code_heavy", "not_english", "empty").
    """
    text = _LITERAL_RE.sub(r"\1", _ROLE_RE.sub(r"\1", _printable(text)))
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    if sensitive is not None:
        clean = [p for p in paragraphs if not sensitive.search(p)]
        if stats is not None:
            stats["paragraphs_sensitive"] += len(paragraphs) - len(clean)
        paragraphs = clean
    if not paragraphs:
        return [], "empty"
    if prose_only:
        kept = [p for p in paragraphs if _is_prose(p)]
        if sum(map(len, kept)) < (1 - _MAX_CODE_LOSS) * sum(map(len, paragraphs)):
            return [], "code_heavy"
        paragraphs = kept
    paragraphs = [" ".join(p.split()) for p in paragraphs]
    if not paragraphs:
        return [], "empty"
    if prose_only and not _is_english("\n\n".join(paragraphs)):
        return [], "not_english"
    return paragraphs, None


def pieces(paragraphs: list[str], min_chars: int, max_chars: int) -> tuple[list[str], int]:
    """Packs paragraphs greedily into pieces of at most `max_chars`; keeps pieces >= `min_chars`.

    Returns:
        (pieces, dropped): the pieces, and how many pieces/paragraphs were dropped for length.
    """
    out: list[str] = []
    dropped = 0
    current: list[str] = []

    def flush() -> None:
        nonlocal dropped
        if current:
            piece = "\n\n".join(current)
            if len(piece) >= min_chars:
                out.append(piece)
            else:
                dropped += 1
            current.clear()

    for para in paragraphs:
        if len(para) > max_chars:
            flush()
            dropped += 1
            continue
        if current and len("\n\n".join(current)) + 2 + len(para) > max_chars:
            flush()
        current.append(para)
    flush()
    return out, dropped


def _doc_key(text: str) -> str:
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


def _shingles(text: str) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < _SHINGLE:
        return {" ".join(words)}
    return {" ".join(words[i:i + _SHINGLE]) for i in range(len(words) - _SHINGLE + 1)}


def _hash64(data: bytes) -> int:
    """A fixed 64-bit hash (crc32 and adler32 side by side): fast, and unlike hash() not salted."""
    return zlib.crc32(data) << 32 | zlib.adler32(data)


def deduplicate(docs: list[Document]) -> tuple[list[Document], dict[str, int]]:
    """Removes exact and near duplicates (see the module docstring); keeps the first occurrence."""
    import numpy as np
    from tqdm.auto import tqdm

    seen: set[str] = set()
    unique: list[Document] = []
    for doc in docs:
        key = _doc_key(doc.text)
        if key not in seen:
            seen.add(key)
            unique.append(doc)
    exact = len(docs) - len(unique)

    # Deterministic universal hashing: h_i(x) = (a_i * x + b_i) mod 2^64 over 64-bit blake2b values.
    param_rng = np.random.default_rng(0x5EED)
    mult = param_rng.integers(1, 2**63, size=_NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    add = param_rng.integers(0, 2**63, size=_NUM_PERM, dtype=np.uint64)
    rows = _NUM_PERM // _BANDS
    buckets: dict[tuple[int, bytes], list[int]] = {}
    shingle_sets: list[set[str]] = []
    kept: list[Document] = []
    near = 0
    for doc in tqdm(unique, desc="prepare_data: near-duplicates", unit="doc", leave=False):
        shingles = _shingles(doc.text)
        hashes = np.fromiter((_hash64(s.encode()) for s in shingles), dtype=np.uint64, count=len(shingles))
        with np.errstate(over="ignore"):
            signature = (hashes[None, :] * mult[:, None] + add[:, None]).min(axis=1)
        band_keys = [(b, signature[b * rows:(b + 1) * rows].tobytes()) for b in range(_BANDS)]
        candidates = {i for key in band_keys for i in buckets.get(key, ())}
        if any(len(shingles & shingle_sets[i]) / len(shingles | shingle_sets[i]) >= _NEAR_DUP_JACCARD
               for i in sorted(candidates)):
            near += 1
            continue
        index = len(kept)
        kept.append(doc)
        shingle_sets.append(shingles)
        for key in band_keys:
            buckets.setdefault(key, []).append(index)
    return kept, {"exact_duplicates": exact, "near_duplicates": near}


def build_corpus(raw: Iterable[tuple[str, str]], data: DataParams, *, prose_only: bool,
                 sensitive: re.Pattern[str] | None = None) -> tuple[list[Document], dict[str, Any]]:
    """Cleans, cuts and de-duplicates raw `(source, text)` pairs into corpus documents (in order)."""
    stats: Counter[str] = Counter()
    per_source: Counter[str] = Counter()
    docs: list[Document] = []
    for source, text in raw:
        stats["raw_texts"] += 1
        paragraphs, reason = clean_document(text, prose_only=prose_only, sensitive=sensitive, stats=stats)
        if reason:
            stats[f"dropped_{reason}"] += 1
            continue
        cut, dropped = pieces(paragraphs, data.min_doc_chars, data.max_doc_chars)
        stats["dropped_length"] += dropped
        docs.extend(Document(text=p, source=source) for p in cut)
    kept, dup = deduplicate(docs)
    stats.update(dup)
    for doc in kept:
        per_source[doc.source] += 1
    return kept, {**dict(sorted(stats.items())), "documents": len(kept), "per_source": dict(sorted(per_source.items()))}


@functools.lru_cache(maxsize=2)
def _embedded_corpus_cached(min_doc_chars: int, max_doc_chars: int) -> tuple[tuple[Document, ...], str]:
    # The data contract's own patterns (one home): its checks would reject these paragraphs later.
    from data_contracts.suites import SENSITIVE_PATTERNS

    sensitive = re.compile("|".join(f"(?:{regex})" for _, regex, _ in SENSITIVE_PATTERNS))
    limits = DataParams(min_doc_chars=min_doc_chars, max_doc_chars=max_doc_chars)
    docs, stats = build_corpus(stdlib_texts(), limits, prose_only=True, sensitive=sensitive)
    return tuple(docs), json.dumps(stats)


def embedded_corpus(min_doc_chars: int, max_doc_chars: int) -> tuple[list[Document], dict[str, Any]]:
    """The cleaned, de-duplicated stdlib corpus (in source order) and its statistics.

    Cached per process: the standard library does not change while Python runs, and tests and
    notebooks that call `run` repeatedly would otherwise re-parse ~450 files each time (~5 s).
    """
    docs, stats = _embedded_corpus_cached(min_doc_chars, max_doc_chars)
    return list(docs), json.loads(stats)


# --- math splits --------------------------------------------------------------------------------


def split_math(pool: list[Problem], num_eval: int, num_rl: int, num_sft: int, seed: int) -> dict[str, list[Problem]]:
    """Splits problems into eval / rl / sft by number-pattern group (a group never straddles splits).

    Groups are shuffled with `seed`; each group goes whole to the first split (eval, rl, sft) that
    still has room, and a split that overflows is truncated (the dropped rows' group lives in that
    split only, so truncation cannot create overlap).

    Raises:
        StageError: when the pool cannot fill the requested counts.
    """
    groups: dict[str, list[Problem]] = {}
    for problem in pool:
        groups.setdefault(number_pattern(problem.question), []).append(problem)
    order = sorted(groups)
    random.Random(f"split:{seed}").shuffle(order)
    targets = {"eval": num_eval, "rl": num_rl, "sft": num_sft}
    splits: dict[str, list[Problem]] = {name: [] for name in targets}
    for key in order:
        room = next((name for name in targets if len(splits[name]) < targets[name]), None)
        if room is None:
            break
        splits[room].extend(groups[key])
    for name, target in targets.items():
        if len(splits[name]) < target:
            raise StageError(f"the math pool has {len(pool)} problems in {len(groups)} number-pattern groups: "
                             f"too few for data.num_eval={num_eval}, data.num_rl={num_rl}, data.num_sft={num_sft} "
                             f"({name} got {len(splits[name])}); lower them or add problems")
        del splits[name][target:]
    return splits


def check_no_overlap(splits: dict[str, list[Problem]], corpus: list[Document]) -> dict[str, int]:
    """Verifies the held-out guarantees (see the module docstring); raises StageError on a violation."""
    train = splits["sft"] + splits["rl"]
    train_text = {normalize_question(p.question) for p in train}
    train_pattern = {number_pattern(p.question) for p in train}
    errors = []
    same_text = [p.question for p in splits["eval"] if normalize_question(p.question) in train_text]
    same_pattern = [p.question for p in splits["eval"] if number_pattern(p.question) in train_pattern]
    sft_text = {normalize_question(p.question) for p in splits["sft"]}
    rl_in_sft = [p.question for p in splits["rl"] if normalize_question(p.question) in sft_text]
    corpus_text = "\n".join(" ".join(d.text.lower().split()) for d in corpus)
    contaminated = [p.question for p in splits["eval"] if normalize_question(p.question) in corpus_text]
    for what, bad in (("eval questions also in sft/rl", same_text),
                      ("eval questions whose number pattern is in sft/rl", same_pattern),
                      ("rl questions also in sft", rl_in_sft),
                      ("eval questions found in the CPT corpus", contaminated)):
        if bad:
            errors.append(f"{len(bad)} {what}, e.g. {bad[0][:120]!r}")
    if errors:
        raise StageError("train/eval overlap: " + "; ".join(errors))
    return {"eval_checked": len(splits["eval"]), "train_checked": len(train), "corpus_docs_checked": len(corpus)}


# --- rows ---------------------------------------------------------------------------------------


def _id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def math_document(problem: Problem) -> Document:
    """The CPT text of a problem: the question, then the worked solution ending in `#### answer`."""
    return Document(text=f"{problem.question}\n{problem.solution}", source=MATH_SOURCE)


def _rows(splits: dict[str, list[Problem]]) -> dict[str, list[dict[str, Any]]]:
    return {
        "sft.jsonl": [{"id": _id("sft", normalize_question(p.question)), "prompt": p.question, "response": p.solution,
                       "answer": p.answer, "level": p.level} for p in splits["sft"]],
        "rl.jsonl": [{"id": _id("rl", normalize_question(p.question)), "question": p.question, "answer": p.answer,
                      "level": p.level} for p in splits["rl"]],
        "eval.jsonl": [{"id": _id("eval", normalize_question(p.question)), "question": p.question,
                        "solution": p.solution, "answer": p.answer, "level": p.level} for p in splits["eval"]],
    }


def _split_corpus(docs: list[Document], val_fraction: float, seed: int, tag: str) -> tuple[list[Document], list[Document]]:
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = plots_dir(params, "prepare_data")
    lengths = sorted(len(d.text) for d in train)
    edges = list(range(0, params.data.max_doc_chars + 250, 250))
    counts = [sum(1 for n in lengths if lo <= n < lo + 250) for lo in edges[:-1]]
    _write_csv(out / "doc_lengths.csv", ["chars", "documents"], list(zip(edges[:-1], counts)))
    levels = sorted({p.level for s in splits.values() for p in s})
    level_rows = [(lvl, *(sum(1 for p in splits[s] if p.level == lvl) for s in ("sft", "rl", "eval"))) for lvl in levels]
    _write_csv(out / "math_levels.csv", ["level", "sft", "rl", "eval"], level_rows)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar(edges[:-1], counts, width=240, align="edge")
    ax1.set(xlabel="characters", ylabel="documents", title="corpus_train document lengths")
    width = 0.27
    for i, split in enumerate(("sft", "rl", "eval")):
        ax2.bar([lvl + (i - 1) * width for lvl in levels], [row[i + 1] for row in level_rows], width=width, label=split)
    ax2.set(xlabel="level", ylabel="problems", title="math problems per level", xticks=levels)
    ax2.legend()
    fig.tight_layout()
    save_figure(fig, out / "prepare_data.png", dpi=80)


def _write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    """A small CSV for `dvc plots` (plain numbers, no quoting needed)."""
    from tasks.common import atomic_file

    with atomic_file(path) as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join(str(v) for v in row) + "\n")


# --- the stage ----------------------------------------------------------------------------------


def run(params: Params) -> dict[str, Any]:
    data = params.data
    t0 = time.perf_counter()
    user_docs: list[Document] = []
    user_problems: list[Problem] = []
    user_stats: dict[str, Any] = {}
    if data.sources:
        sources = [load_source(uri) for uri in data.sources]
        user_docs, user_problems, user_stats = map_rows(sources, data.math_levels)
    embed_corpus = data.embedded == "always" or (data.embedded == "auto" and not user_docs)
    embed_math = data.embedded == "always" or (data.embedded == "auto" and not user_problems)
    if not embed_corpus and not user_docs:
        raise StageError("data.embedded is 'never' but no file in data.sources has corpus rows ('text')")
    if not embed_math and not user_problems:
        raise StageError("data.embedded is 'never' but no file in data.sources has math rows ('question'+'answer')")
    if data.sources and (embed_corpus or embed_math):
        log.info("adding embedded %s to the user data (data.embedded=%s)",
                 " and ".join(k for k, on in (("corpus", embed_corpus), ("math", embed_math)) if on), data.embedded)

    # Corpus: user text first (it wins de-duplication ties), then the embedded text.
    corpus_stats: dict[str, Any] = {}
    docs: list[Document] = []
    if user_docs:
        kept, corpus_stats["user"] = build_corpus(((d.source, d.text) for d in user_docs), data, prose_only=False)
        docs.extend(kept)
    if embed_corpus:
        kept, corpus_stats["embedded"] = embedded_corpus(data.min_doc_chars, data.max_doc_chars)
        known = {_doc_key(d.text) for d in docs}  # user vs embedded: exact duplicates only
        docs.extend(d for d in kept if _doc_key(d.text) not in known)
    if not docs:
        raise StageError("the corpus is empty after cleaning: check data.min_doc_chars / data.max_doc_chars and the sources")
    order = list(range(len(docs)))
    random.Random(f"corpus:{params.seed}").shuffle(order)
    docs = [docs[i] for i in sorted(order[: data.max_corpus_docs])]
    log.info("corpus: %d documents after cleaning and de-duplication (%.1f s)", len(docs), time.perf_counter() - t0)

    # Math pool: user problems (exact duplicates dropped) and/or generated ones.
    pool: list[Problem] = []
    seen: set[str] = set()
    for problem in user_problems:
        key = normalize_question(problem.question)
        if key not in seen:
            seen.add(key)
            pool.append(problem)
    user_math_duplicates = len(user_problems) - len(pool)
    if embed_math:
        wanted = data.num_sft + data.num_rl + data.num_eval
        # ~10% headroom: whole groups go to one split, and a split's overflow is dropped.
        generated = generate_problems(math.ceil(wanted * 1.1) + 20, data.math_levels, params.seed)
        pool.extend(p for p in generated if normalize_question(p.question) not in seen)
    splits = split_math(pool, data.num_eval, data.num_rl, data.num_sft, params.seed)

    math_docs = [math_document(p) for p in splits["sft"]]
    general_train, general_val = _split_corpus(docs, data.val_fraction, params.seed, "general")
    math_train, math_val = _split_corpus(math_docs, data.val_fraction, params.seed, "math")
    overlap = check_no_overlap(splits, docs)

    corpus_rows = {  # general and math text interleaved (deterministically), not in blocks
        "corpus_train.jsonl": _shuffled(general_train + math_train, f"train:{params.seed}"),
        "corpus_val.jsonl": _shuffled(general_val + math_val, f"val:{params.seed}"),
    }
    rows: dict[str, list[dict[str, Any]]] = {
        name: [{"id": _id("doc", d.text), "text": d.text, "source": d.source} for d in ds] for name, ds in corpus_rows.items()
    }
    rows.update(_rows(splits))
    raw_dir = Path(params.paths.data_dir) / "raw"
    with atomic_dir(raw_dir) as tmp:
        for name in FILES:
            write_jsonl(tmp / name, rows[name])
        files = {name: {"rows": len(rows[name]), "sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                 for name in FILES}
        manifest = {
            "seed": params.seed,
            "python": sys.version.split()[0],
            "embedded": {"mode": data.embedded, "corpus": embed_corpus, "math": embed_math},
            "files": files,
            "sources": {"user": user_stats, "corpus": corpus_stats,
                        "corpus_per_source": dict(sorted(Counter(d.source for ds in corpus_rows.values() for d in ds).items())),
                        "math_per_origin": dict(sorted(Counter(p.origin for s in splits.values() for p in s).items())),
                        "user_math_duplicates": user_math_duplicates},
            "levels": {name: dict(sorted(Counter(p.level for p in s).items())) for name, s in splits.items()},
            "overlap_check": overlap,
        }
        write_json(tmp / "manifest.json", manifest)
    _plot(params, corpus_rows["corpus_train.jsonl"], splits)
    metrics = {
        "corpus_train_docs": files["corpus_train.jsonl"]["rows"],
        "corpus_val_docs": files["corpus_val.jsonl"]["rows"],
        "corpus_train_chars": sum(len(d.text) for d in corpus_rows["corpus_train.jsonl"]),
        "math_docs_in_corpus": len(math_docs),
        "sft": len(splits["sft"]),
        "rl": len(splits["rl"]),
        "eval": len(splits["eval"]),
        "near_duplicates_removed": sum(s.get("near_duplicates", 0) for s in corpus_stats.values()),
        "exact_duplicates_removed": sum(s.get("exact_duplicates", 0) for s in corpus_stats.values()),
    }
    write_metrics(params, "prepare_data", metrics)
    log.info("prepare_data: %s (%.1f s)", metrics, time.perf_counter() - t0)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("prepare_data", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
