"""The embedded English corpus (standard-library docstrings and language reference) and corpus cleaning.

Library module used by prepare_data: `embedded_corpus`, `clean_document`, `pieces` (length limits),
`deduplicate` (exact, then MinHash/LSH near-duplicates) and `build_corpus`. Deterministic given the Python
version. Choices and thresholds: docs/choices.md#prepare_data.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import re
import sysconfig
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tasks.core.params import DataParams
from tasks.data.sources import Document

_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "encodings",
    "site-packages",
    "__pycache__",
    "dist-packages",
}
_WORDY_MIN = 0.6  # a paragraph is prose when >= 60% of its tokens are plain words
_MAX_CODE_LOSS = 0.5  # a document that lost more than half its characters to code is dropped
_MAX_NON_ASCII = 0.01
_MIN_FUNCTION_WORDS = 0.08
_FUNCTION_WORDS = frozenset(
    "the a an of to and or is are was be been in on at for with as by from that this it its if not "
    "no can will when which than then there these those but into each all any may must should".split()
)
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
    files = sorted(
        (p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix(),
    )
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
    return "\n".join(
        line
        if line.isprintable()
        # fast path; isprintable() is also False for
        else "".join(ch for ch in line if not unicodedata.category(ch).startswith("C"))  # Zs != " "
        for line in text.split("\n")
    )


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


def clean_document(
    text: str,
    *,
    prose_only: bool,
    sensitive: re.Pattern[str] | None = None,
    stats: Counter[str] | None = None,
) -> tuple[list[str], str | None]:
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
    return {" ".join(words[i : i + _SHINGLE]) for i in range(len(words) - _SHINGLE + 1)}


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
        band_keys = [(b, signature[b * rows : (b + 1) * rows].tobytes()) for b in range(_BANDS)]
        candidates = {i for key in band_keys for i in buckets.get(key, ())}
        if any(
            len(shingles & shingle_sets[i]) / len(shingles | shingle_sets[i]) >= _NEAR_DUP_JACCARD
            for i in sorted(candidates)
        ):
            near += 1
            continue
        index = len(kept)
        kept.append(doc)
        shingle_sets.append(shingles)
        for key in band_keys:
            buckets.setdefault(key, []).append(index)
    return kept, {"exact_duplicates": exact, "near_duplicates": near}


def build_corpus(
    raw: Iterable[tuple[str, str]],
    data: DataParams,
    *,
    prose_only: bool,
    sensitive: re.Pattern[str] | None = None,
) -> tuple[list[Document], dict[str, Any]]:
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
    return kept, {
        **dict(sorted(stats.items())),
        "documents": len(kept),
        "per_source": dict(sorted(per_source.items())),
    }


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
