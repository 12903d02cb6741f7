"""Text-overlap keys of the held-out checks: normalized paragraphs of documents.

No Great Expectations import, so prepare_data (which builds the held-out splits) and the contracts (which
check them) share one definition. A paragraph is a block of text between blank lines; its key is the
sha1 of its normalized text (lower case, runs of whitespace as one space), 16 hex digits. Two texts share
text when they share a paragraph key; a one-paragraph document is its own key, so identical documents
always share one. Choices: docs/choices.md#prepare_data.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

_BLANK_LINE_RE = re.compile(r"\n[ \t\r\f\v]*\n")


def normalize_text(text: str) -> str:
    """Lower case, single spaces (the normalization of `tasks.data.mathgen.normalize_question`)."""
    return " ".join(text.lower().split())


def paragraphs(text: Any) -> dict[str, str]:
    """Key -> normalized text of each non-empty paragraph of `text` (empty for a non-string), in order."""
    if not isinstance(text, str):
        return {}
    out: dict[str, str] = {}
    for paragraph in _BLANK_LINE_RE.split(text):
        normalized = normalize_text(paragraph)
        if normalized:
            out.setdefault(hashlib.sha1(normalized.encode("utf-8")).hexdigest()[:16], normalized)
    return out


def paragraph_keys(text: Any) -> set[str]:
    """The keys of the non-empty paragraphs of `text` (empty for a non-string)."""
    return set(paragraphs(text))
