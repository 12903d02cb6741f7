"""The final-answer format of math solutions and responses: a last line `#### <answer>`.

The one definition of the marker and of the contract's final-line pattern; no Great Expectations
import, so `tasks.data.mathgen` (which formats, extracts and matches answers) builds on it too.
"""

from __future__ import annotations

import re
from typing import Any

#: Starts the final-answer line of a worked solution: `#### 42`.
ANSWER_MARKER = "####"
#: The text ends with a line `#### <something>` (trailing whitespace allowed): the contract's check.
FINAL_LINE_REGEX = rf"(?:\A|\n){ANSWER_MARKER} [^\n]*\S[^\n]*\s*\Z"
_LAST_LINE_RE = re.compile(rf"{ANSWER_MARKER} (.*)")


def final_answer(text: Any) -> str | None:
    """What follows "#### " on the last non-empty line of `text`; None if that line is not one."""
    if not isinstance(text, str):
        return None
    lines = [line for line in text.strip().split("\n") if line.strip()]
    if not lines:
        return None
    match = _LAST_LINE_RE.fullmatch(lines[-1].strip())
    return match.group(1).strip() if match else None
