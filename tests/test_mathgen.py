"""Answer extraction/matching and the math problem generator (tasks/mathgen.py)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from tasks.mathgen import answers_match, extract_answer, format_number, parse_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("He pays 3*4=12 dollars.\n#### 12", "12"),
        ("#### 1,000", "1000"),
        ("#### $5.00", "5"),
        ("#### -3", "-3"),
        ("#### 2.50", "2.5"),
        ("#### 3/4", "0.75"),
        ("#### 1/3", "1/3"),
        ("first #### 4\nthen #### 7 apples.", "7"),
        ("#### \u22125", "-5"),
        ("#### .5", "0.5"),
        ("no answer line 42", None),
        ("#### no number", None),
        ("####\n5", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("pred", "gold", "ok"),
    [
        ("5", "5", True),
        ("5.0", "5", True),
        ("$5", "5", True),
        ("1,000", "1000", True),
        ("2.50", "2.5", True),
        ("-3", "-3", True),
        ("3", "-3", False),
        ("5 apples", "5", True),
        ("6", "5", False),
        (None, "5", False),
        ("banana", "5", False),
        ("0.75", "3/4", True),
        ("0.3333", "1/3", False),
    ],
)
def test_answers_match(pred, gold, ok):
    assert answers_match(pred, gold) is ok


def test_answers_match_rejects_non_numeric_gold():
    with pytest.raises(ValueError, match="gold answer 'abc'"):
        answers_match("5", "abc")


def test_format_and_parse_roundtrip():
    for value in [Fraction(0), Fraction(42), Fraction(-3), Fraction(5, 2), Fraction(-1, 8), Fraction(1, 3),
                  Fraction(123456789, 1000)]:
        assert parse_number(format_number(value)) == value
    assert format_number(Fraction(-1, 8)) == "-0.125"
    assert format_number(Fraction(7, 20)) == "0.35"
    assert parse_number("5 apples") is None
