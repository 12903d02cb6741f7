"""Answer extraction/matching and the math problem generator (tasks/data/mathgen.py)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from data_contracts.answer_format import FINAL_LINE_REGEX, final_answer
from tasks.data.mathgen import (
    answer_line,
    answers_match,
    extract_answer,
    format_number,
    is_well_formed,
    parse_number,
    with_answer_line,
    worked_steps,
)


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


def test_one_answer_format_for_generator_contract_and_reward():
    """mathgen formats, the data contract checks and the RL reward parses the same `#### <answer>` line."""
    import re

    assert answer_line("42") == "#### 42"
    assert with_answer_line("a = 2\nso #### $1,000.", "1000") == "a = 2\nso\n#### 1000"
    assert with_answer_line("a = 2\nb = 3", "3") == "a = 2\nb = 3\n#### 3"
    assert with_answer_line("#### 5 apples", "5") == "#### 5"
    assert worked_steps("a\nb\n#### 2") == "a\nb\n" and worked_steps("no line") == "no line"
    for problem in generate_problems(12, [1, 2, 3], seed=3):
        assert re.search(FINAL_LINE_REGEX, problem.solution)
        assert final_answer(problem.solution) == problem.answer == extract_answer(problem.solution)
        assert is_well_formed(problem.solution)
    assert is_well_formed("so #### 42") and not is_well_formed("#### 42 apples")
    assert not is_well_formed("#### 42\nmore") and not is_well_formed("42")


def test_format_and_parse_roundtrip():
    for value in [
        Fraction(0),
        Fraction(42),
        Fraction(-3),
        Fraction(5, 2),
        Fraction(-1, 8),
        Fraction(1, 3),
        Fraction(123456789, 1000),
    ]:
        assert parse_number(format_number(value)) == value
    assert format_number(Fraction(-1, 8)) == "-0.125"
    assert format_number(Fraction(7, 20)) == "0.35"
    assert parse_number("5 apples") is None


# --- the generator ---------------------------------------------------------------------------

import ast  # noqa: E402
import operator  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402

from tasks.data.mathgen import (  # noqa: E402
    LEVELS,
    TEMPLATES,
    equation_key,
    generate_problem,
    generate_problems,
    problem_key,
)

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
_WORD_NUMBERS = {"three": 3}
_COLUMN = re.compile(r"Ones: (\d+[+-]\d+) = (\d+)\. Tens: (\d+[+-]\d+[+-]\d+) = (\d+)\.")


def _evaluate(expr: str) -> tuple[Fraction, list[Fraction]]:
    """Evaluates `3*4+2.5` exactly, independently of tasks.data.mathgen; returns (value, operands)."""
    operands: list[Fraction] = []

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            value = Fraction(ast.get_source_segment(expr, node))  # exact: from the literal's text
            operands.append(value)
            return value
        raise AssertionError(f"unexpected syntax in solution expression {expr!r}: {ast.dump(node)}")

    return walk(ast.parse(expr, mode="eval")), operands


def _question_numbers(question: str) -> set[Fraction]:
    numbers = {Fraction(m.replace(",", "")) for m in re.findall(r"\d[\d,]*(?:\.\d+)?", question)}
    numbers |= {Fraction(v) for w, v in _WORD_NUMBERS.items() if w in question.lower()}
    return numbers


def _check_problem(problem) -> None:
    """Recomputes every step of the worked solution and checks it is grounded in the question."""
    lines = problem.solution.splitlines()
    assert lines[-1] == f"#### {problem.answer}", problem.solution
    known = _question_numbers(problem.question) | {Fraction(60), Fraction(100)}  # minutes/hour, percent
    last = None
    column = None  # the "Ones: ... Tens: ..." work of the next step: (ones, tens, op)
    for line in lines[:-1]:
        work = _COLUMN.fullmatch(line)
        if work:
            ones_expr, ones, tens_expr, tens = work.groups()
            assert _evaluate(ones_expr)[0] == int(ones) and _evaluate(tens_expr)[0] == int(tens), line
            column = (int(ones), int(tens), "+" if "+" in ones_expr else "-")
            continue
        found = _ANNOTATION.findall(line)
        assert len(found) == 1, f"one <<expr=value>> per line expected: {line!r}"
        expr, shown = found[0]
        value, operands = _evaluate(expr)
        assert value == Fraction(shown), f"wrong arithmetic in {line!r}: {expr} = {value}"
        if column:  # the columns make the step's result: tens, then the ones digit
            ones, tens, op = column
            assert op in expr and value == 10 * tens + (ones % 10 if op == "+" else ones), (line, column)
            column = None
        assert line.count(f">>{shown}") == 1
        unknown = [o for o in operands if o not in known]
        assert not unknown, (
            f"operands {unknown} of {expr!r} come from neither the question nor earlier steps:\n{problem}"
        )
        known.add(value)
        last = value
    if last is None:  # zero-step problems do not exist: every template computes something
        raise AssertionError(f"no solution steps: {problem}")
    assert parse_number(problem.answer) == last, f"answer {problem.answer} is not the last result {last}"
    assert "/" not in problem.answer and last >= 0
    assert extract_answer(problem.solution) == problem.answer


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_template_and_level_is_correct(template):
    rng = random.Random(f"test:{template}")
    prev_mean = 0.0
    for level in LEVELS:
        steps = []
        for _ in range(25):
            problem = generate_problem(rng, level, template)
            assert problem.level == level and problem.origin == f"mathgen:{template}"
            _check_problem(problem)
            steps.append(len(_ANNOTATION.findall(problem.solution)))
        # Difficulty grows with the level: more steps on average than the level below.
        if level > 1:
            assert sum(steps) / len(steps) >= prev_mean, (template, level)
        prev_mean = sum(steps) / len(steps)


def test_generate_problems_is_deterministic_distinct_and_balanced():
    a = generate_problems(300, [1, 2, 3, 4, 5], seed=7)
    b = generate_problems(300, [1, 2, 3, 4, 5], seed=7)
    c = generate_problems(300, [1, 2, 3, 4, 5], seed=8)
    assert a == b
    assert a != c
    assert len({p.question for p in a}) == 300
    assert {p.level: sum(1 for q in a if q.level == p.level) for p in a} == {lvl: 60 for lvl in LEVELS}
    assert {p.origin for p in a} == {f"mathgen:{t}" for t in TEMPLATES}
    for p in a:
        _check_problem(p)


def test_checker_catches_a_wrong_solution():
    problem = generate_problem(random.Random(0), 2, "shopping")
    broken = problem.solution.replace("<<", "<<1+", 1)
    with pytest.raises(AssertionError):
        _check_problem(type(problem)(problem.question, broken, problem.answer, problem.level, problem.origin))


def test_problem_key_and_bad_arguments():
    # other names, pronouns, goods, vehicles: the same problem (the same numbers, the same answer)
    assert problem_key("Ava buys 12 pens for $2.50 each. She pays.") == problem_key(
        "ben  buys 12 rolls of tape for $2.50 each. He pays."
    )
    assert problem_key("A train travels 60 km in 2 hours.") == problem_key(
        "A cyclist travels 60 miles in 2 hours."
    )
    # other numbers or another template: another problem
    assert problem_key("Ava buys 12 pens.") != problem_key("Ava buys 13 pens.")
    assert problem_key("Ava buys 12 pens.") != problem_key("Ava sells 12 pens.")
    assert problem_key("Avalon buys 12 pens.") != problem_key("Ben buys 12 pens.")  # whole words only
    with pytest.raises(ValueError, match="unknown template"):
        generate_problem(random.Random(0), 1, "geometry")
    with pytest.raises(ValueError, match="level"):
        generate_problem(random.Random(0), 6, "ages")


def test_level_one_is_one_sum_or_difference_worked_in_columns():
    """Level 1: one addition or subtraction on numbers of up to two digits, worked ones then tens, over
    thousands of distinct problems (a held-out split needs problems a model cannot have seen)."""
    problems = generate_problems(3000, [1], seed=11)
    assert len({problem_key(p.question) for p in problems}) > 2000
    assert len({equation_key(p.solution) for p in problems}) > 1000
    for p in problems:
        lines = p.solution.splitlines()
        assert len(lines) == 3 and _COLUMN.fullmatch(lines[0]), p.solution
        ((expr, _),) = _ANNOTATION.findall(lines[1])
        value, operands = _evaluate(expr)
        assert len(operands) == 2 and all(0 < o < 100 for o in operands) and ("+" in expr or "-" in expr)
        _check_problem(p)
    # a column line that does not make the step's result is caught
    p = problems[0]
    wrong = p.solution.replace("Tens: ", "Tens: 1+", 1).replace(" = ", " = 1", 1)
    with pytest.raises(AssertionError):
        _check_problem(type(p)(p.question, wrong, p.answer, p.level, p.origin))


def test_equation_key_is_the_arithmetic_whatever_the_story():
    assert equation_key("a 38+9 = <<38+9=47>>47 b") == equation_key("x <<9+38=47>>47") == {"9+38"}
    assert equation_key("<< 3 * 12 =36>>") == {"3*12"}
    assert equation_key("<<38-9=29>>") != equation_key("<<9-38=-29>>")  # a difference keeps its order
    assert equation_key("<<12*3/4=9>>\n<<9+1=10>>") == {"12*3/4", "1+9"}
    assert equation_key("no calculator marks") == frozenset()
