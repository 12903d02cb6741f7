"""GSM8K-style math word problems with exact answers, and the answer checker RL and evaluation use.

Answer format (the data contract): a worked solution ends with a line `#### <answer>`; answers are
plain numbers written as strings ("42", "-3", "2.5").

- `extract_answer(text)` returns the number after the LAST `####` in `text`, canonicalised
  ("1,000" -> "1000", "$5.00" -> "5", "3/4" -> "0.75"), or None when there is none.
- `answers_match(pred, gold)` compares two answers numerically and exactly (as fractions), so
  "5", "5.0", "$5" and "5.00" all match "5"; a prediction that is not a number never matches.
"""

from __future__ import annotations

import re
from fractions import Fraction

# A number as people and models write it: optional sign and dollar sign, thousands separators,
# a decimal part or a simple fraction ("3/4"). Unicode minus is accepted as a sign.
_NUMBER_RE = re.compile(
    r"(?P<sign>[-+\u2212]?)\s*\$?\s*(?P<body>(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:\s*/\s*\d+)?)"
)


def parse_number(text: str) -> Fraction | None:
    """Parses one number ("1,000", "$5.50", "-3", "3/4", "5.") exactly; None if `text` is not one.

    Leading/trailing whitespace, a trailing period and a trailing "%" or unit word are not allowed:
    the whole string must be the number, so "5 apples" is None (use `extract_answer` on free text).
    """
    match = _NUMBER_RE.fullmatch(text.strip().rstrip("."))
    if match is None:
        return None
    return _to_fraction(match)


def _to_fraction(match: re.Match[str]) -> Fraction | None:
    body = match.group("body").replace(",", "").replace(" ", "")
    try:
        if "/" in body:
            num, den = body.split("/")
            if int(den) == 0:
                return None
            value = Fraction(num) / int(den)
        else:
            value = Fraction(body.rstrip(".") or "0")
    except (ValueError, ZeroDivisionError):
        return None
    return -value if match.group("sign") in ("-", "\u2212") else value


def format_number(value: Fraction | int) -> str:
    """Canonical string of an exact number: "42", "-3", "2.5"; "p/q" if it has no finite decimal."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    twos = fives = 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    digits = max(twos, fives)
    scaled = abs(value) * 10**digits  # an integer by construction
    text = str(scaled.numerator).rjust(digits + 1, "0")
    text = f"{text[:-digits]}.{text[-digits:]}".rstrip("0").rstrip(".")
    return ("-" if value < 0 else "") + text


def extract_answer(text: str | None) -> str | None:
    """Returns the canonical number after the last `####` in `text`, or None.

    Only the rest of the line after the last `####` is searched, and the first number in it is
    taken ("#### $1,200." -> "1200", "#### -3" -> "-3", "#### 2.50" -> "2.5"). No `####`, or no
    number on that line, gives None: a response without the final-answer line earns no credit.
    """
    if not text:
        return None
    idx = text.rfind("####")
    if idx < 0:
        return None
    line = text[idx + 4:].split("\n", 1)[0]
    match = _NUMBER_RE.search(line)
    if match is None:
        return None
    value = _to_fraction(match)
    return None if value is None else format_number(value)


def answers_match(pred: str | None, gold: str) -> bool:
    """True when `pred` equals the gold answer as a number (exact, via fractions).

    Args:
        pred: a predicted answer ("1,000", "$5", "5.0"), typically `extract_answer(response)`;
            None or a non-number never matches.
        gold: the reference answer from the dataset; must be a number.

    Raises:
        ValueError: when `gold` is not a number (a data error, not a wrong prediction).
    """
    gold_value = parse_number(str(gold))
    if gold_value is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    if pred is None:
        return False
    pred_value = parse_number(str(pred))
    if pred_value is None:
        # Tolerate a predicted answer written with a unit or sentence ("5 apples", "$5 each").
        match = _NUMBER_RE.search(str(pred))
        pred_value = None if match is None else _to_fraction(match)
    return pred_value is not None and pred_value == gold_value
