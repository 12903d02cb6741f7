"""GSM8K-style math word problems with exact answers, and the answer checker RL and evaluation use.

Library module: prepare_data calls `generate_problems` and `problem_key`; the RL reward, evaluation and
deploy call `extract_answer` / `answers_match`. A worked solution ends with a line `#### <answer>`, an
answer is a plain number written as a string. Generator design and matching rules:
docs/choices.md#prepare_data.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from data_contracts.answer_format import ANSWER_MARKER

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
    idx = text.rfind(ANSWER_MARKER)
    if idx < 0:
        return None
    line = text[idx + len(ANSWER_MARKER) :].split("\n", 1)[0]
    match = _NUMBER_RE.search(line)
    if match is None:
        return None
    value = _to_fraction(match)
    return None if value is None else format_number(value)


def answer_line(answer: str) -> str:
    """The final-answer line of a solution: `#### <answer>`."""
    return f"{ANSWER_MARKER} {answer}"


def has_answer_line(text: str) -> bool:
    """Whether `text` contains the final-answer marker `####` at all."""
    return ANSWER_MARKER in text


def worked_steps(solution: str) -> str:
    """The worked part of a solution: everything before its last `####` (the whole text without one)."""
    idx = solution.rfind(ANSWER_MARKER)
    return solution if idx < 0 else solution[:idx]


def with_answer_line(solution: str, answer: str) -> str:
    """`solution` ending in exactly the line `#### <answer>`: the text after its last `####` is replaced
    ("... #### $1,000." -> "...\\n#### 1000"); a solution without one gets the line appended."""
    head = worked_steps(solution).rstrip()
    return f"{head}\n{answer_line(answer)}" if head else answer_line(answer)


def is_well_formed(text: str) -> bool:
    """True when `text` ends with a final-answer line: `#### <number>` and nothing after the number.

    ("Step 1 ...\\n#### 42" and "so #### 42" are well formed; "#### 42 apples", "#### 42\\nmore" are not.)
    """
    text = text.rstrip()
    idx = text.rfind(ANSWER_MARKER)
    if idx < 0 or "\n" in text[idx:]:
        return False
    return parse_number(text[idx + len(ANSWER_MARKER) :]) is not None


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


# --- the generator ---------------------------------------------------------------------------
# Six templates, each with five difficulty levels; level L takes about L arithmetic steps and draws
# larger numbers. Every value is a `Fraction`, so answers are exact; a draw whose answer or any
# intermediate result is not a clean integer/terminating decimal (or is otherwise implausible:
# negative money, change from a too-small bill) is rejected and redrawn.

LEVELS = (1, 2, 3, 4, 5)


class _Reject(Exception):
    """The current random draw gives an unclean or implausible problem; draw again."""


@dataclass(frozen=True)
class Problem:
    """One math word problem.

    Attributes:
        question: the word problem.
        solution: worked solution; its last line is `#### <answer>`.
        answer: the exact answer as a canonical number string (`format_number`).
        level: difficulty 1..5 (generated: number of steps / magnitude).
        origin: "mathgen:<template>" or "user:<file name>".
    """

    question: str
    solution: str
    answer: str
    level: int
    origin: str


_NAMES = [
    ("Ava", "she"),
    ("Liam", "he"),
    ("Maya", "she"),
    ("Noah", "he"),
    ("Zoe", "she"),
    ("Ethan", "he"),
    ("Lucy", "she"),
    ("Omar", "he"),
    ("Nina", "she"),
    ("Ravi", "he"),
    ("Sara", "she"),
    ("Diego", "he"),
    ("Hana", "she"),
    ("Felix", "he"),
    ("Iris", "she"),
    ("Jonas", "he"),
    ("Keiko", "she"),
    ("Mateo", "he"),
    ("Priya", "she"),
    ("Tariq", "he"),
    ("Elena", "she"),
    ("Kofi", "he"),
    ("Mei", "she"),
    ("Lars", "he"),
    ("Amara", "she"),
    ("Pablo", "he"),
    ("Greta", "she"),
    ("Yusuf", "he"),
    ("Chloe", "she"),
    ("Ben", "he"),
    ("Fatima", "she"),
    ("Hugo", "he"),
    ("Ines", "she"),
    ("Kai", "he"),
    ("Leah", "she"),
    ("Marco", "he"),
]
_GOODS = [
    "apples",
    "notebooks",
    "pencils",
    "oranges",
    "stickers",
    "candles",
    "mugs",
    "books",
    "pens",
    "cookies",
    "socks",
    "plates",
    "batteries",
    "markers",
    "lemons",
    "rolls of tape",
    "postcards",
    "bags of rice",
    "jars of honey",
    "packs of cards",
]
_SHARED = [
    "marbles",
    "candies",
    "stickers",
    "cards",
    "strawberries",
    "crayons",
    "beads",
    "stamps",
    "cookies",
    "seashells",
    "buttons",
    "grapes",
]
_VEHICLES = ["train", "car", "bus", "cyclist", "truck", "boat", "van", "runner"]
_UNITS = ["km", "miles"]
_GAMES = ["chess", "football", "tennis", "basketball", "the piano", "the violin", "volleyball", "badminton"]
_PURCHASES = ["groceries", "books", "a birthday gift", "bus fares", "lunches", "art supplies", "a phone bill"]


def _quantity(rng: random.Random, level: int) -> int:
    return rng.randint(2, (9, 15, 25, 60, 120)[level - 1])


def _price(rng: random.Random, level: int) -> Fraction:
    """Dollar prices: whole dollars at levels 1-2, then quarters and more magnitude."""
    if level <= 2:
        return Fraction(rng.randint(1, 9 if level == 1 else 20))
    return Fraction(rng.randint(2, (40, 80, 200)[level - 3]), 4)


def _money(value: Fraction) -> str:
    """$5 or $2.50, as a problem would print a price."""
    if value.denominator == 1:
        return f"${value.numerator}"
    cents = value * 100
    if cents.denominator != 1:
        raise _Reject
    return f"${value.numerator / value.denominator:.2f}"


class _Solution:
    """Collects GSM8K-style solution lines: `text 3*4 = <<3*4=12>>12 more text`."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def step(self, before: str, expr: str, value: Fraction, after: str = "") -> Fraction:
        shown = format_number(value)
        if "/" in shown or value < 0:
            raise _Reject
        self.lines.append(f"{before}{expr} = <<{expr}={shown}>>{shown}{after}")
        return value

    def column_step(self, before: str, a: int, op: str, b: int, after: str = "") -> Fraction:
        """`a+b` or `a-b` (whole numbers below 100) worked in columns, ones then tens, then the step:
        "Ones: 8+9 = 17. Tens: 3+0+1 = 4." / "Ones: 12-5 = 7. Tens: 4-0-1 = 3." (a borrowed ten)."""
        if not (0 <= a < 100 and 0 <= b < 100) or op not in "+-":
            raise ValueError(f"column_step: {a}{op}{b} is not a sum/difference of numbers below 100")
        (at, au), (bt, bu) = divmod(a, 10), divmod(b, 10)
        if op == "+":
            ones = au + bu
            work = f"Ones: {au}+{bu} = {ones}. Tens: {at}+{bt}+{ones // 10} = {at + bt + ones // 10}."
            value = a + b
        else:
            borrow = int(au < bu)
            top = 10 * borrow + au  # the ones digit, with a borrowed ten when it is the smaller
            work = f"Ones: {top}-{bu} = {top - bu}. Tens: {at}-{bt}-{borrow} = {at - bt - borrow}."
            value = a - b
        self.lines.append(work)
        return self.step(before, f"{a}{op}{b}", Fraction(value), after)

    def finish(self, answer: Fraction) -> tuple[str, str]:
        shown = format_number(answer)
        return "\n".join(self.lines + [answer_line(shown)]), shown


def _n(value: Fraction | int) -> str:
    return format_number(Fraction(value))


def _two_digit_pair(rng: random.Random, low: int, high: int) -> tuple[int, int]:
    """A two-digit number in [low, high] and a one-digit number in [2, 9], in random order."""
    pair = (rng.randint(low, high), rng.randint(2, 9))
    return pair if rng.random() < 0.5 else (pair[1], pair[0])


def _shopping(rng: random.Random, level: int) -> tuple[str, _Solution, Fraction]:
    name, pron = rng.choice(_NAMES)
    if level == 1:  # two prices added
        first, second = rng.sample(_GOODS, 2)
        a, b = _two_digit_pair(rng, 10, 60)
        sol = _Solution()
        question = (
            f"{name} spends ${a} on {first} and ${b} on {second}. "
            f"How much does {pron} spend in total, in dollars?"
        )
        return question, sol, sol.column_step("In total that is ", a, "+", b, " dollars.")
    kinds = 1 if level == 1 else 2 if level <= 3 else 3
    goods = rng.sample(_GOODS, kinds)
    counts = [_quantity(rng, min(level, 3)) for _ in goods]
    prices = [_price(rng, level) for _ in goods]
    parts = [f"{c} {g} for {_money(p)} each" for c, g, p in zip(counts, goods, prices)]
    listed = parts[0] if kinds == 1 else ", ".join(parts[:-1]) + f" and {parts[-1]}"
    sentences = [f"{name} buys {listed}."]
    sol = _Solution()
    costs = [
        sol.step(f"The {g} cost ", f"{c}*{_n(p)}", c * p, " dollars.")
        for c, g, p in zip(counts, goods, prices)
    ]
    total = costs[0]
    if kinds > 1:
        total = sol.step(
            "In total that is ", "+".join(_n(c) for c in costs), sum(costs, Fraction(0)), " dollars."
        )
    if level == 5:
        discount = rng.choice([10, 20, 25, 50])
        sentences.append(f"The shop takes {discount}% off the whole bill.")
        total = sol.step(
            "After the discount the bill is ",
            f"{_n(total)}*(100-{discount})/100",
            total * (100 - discount) / 100,
            " dollars.",
        )
        _money(total)  # whole cents only
    if level >= 3:
        bill = next((b for b in (20, 50, 100, 200, 500, 1000, 2000) if b >= total + 1), None)
        if bill is None:
            raise _Reject
        sentences.append(f"{pron.capitalize()} pays with a ${bill} bill.")
        sentences.append(f"How much change does {pron} get, in dollars?")
        answer = sol.step(
            f"{pron.capitalize()} gets ", f"{bill}-{_n(total)}", bill - total, " dollars in change."
        )
    else:
        sentences.append(f"How much does {pron} spend in total, in dollars?")
        answer = total
    return " ".join(sentences), sol, answer


def _travel(rng: random.Random, level: int) -> tuple[str, _Solution, Fraction]:
    vehicle, unit = rng.choice(_VEHICLES), rng.choice(_UNITS)
    if level == 1:  # two distances added
        a, b = _two_digit_pair(rng, 10, 95)
        sol = _Solution()
        question = (
            f"A {vehicle} travels {a} {unit} in the morning and {b} {unit} in the afternoon. "
            f"How many {unit} does it travel in total?"
        )
        return question, sol, sol.column_step("It travels ", a, "+", b, f" {unit}.")
    legs = 2 if level <= 4 else 3
    speeds = [rng.randint(3, (20, 40, 60, 90, 120)[level - 1]) for _ in range(legs)]
    sol = _Solution()
    sentences, distances, hours = [], [], []
    for i, speed in enumerate(speeds):
        first = i == 0
        if level >= 4 and i == legs - 1:
            minutes = rng.choice([6, 12, 15, 30, 45, 75, 90])
            sentences.append(f"Then it goes at {speed} {unit} per hour for {minutes} minutes.")
            h = sol.step(f"{minutes} minutes is ", f"{minutes}/60", Fraction(minutes, 60), " hours.")
            hours.append(h)
            which = ("first", "second", "third")[i]
            distances.append(sol.step(f"The {which} part is ", f"{speed}*{_n(h)}", speed * h, f" {unit}."))
            continue
        h = Fraction(rng.randint(1, 2 + level))
        hours.append(h)
        span = f"{h} hour" if h == 1 else f"{h} hours"
        if first:
            sentences.append(f"A {vehicle} travels at {speed} {unit} per hour for {span}.")
        else:
            sentences.append(f"Then it travels at {speed} {unit} per hour for {span} more.")
        which = "It travels " if legs == 1 else f"The {('first', 'second', 'third')[i]} part is "
        distances.append(sol.step(which, f"{speed}*{_n(h)}", speed * h, f" {unit}."))
    total = distances[0]
    if legs > 1:
        total = sol.step(
            "Altogether it covers ",
            "+".join(_n(d) for d in distances),
            sum(distances, Fraction(0)),
            f" {unit}.",
        )
    if level in (3, 5):
        trip = int(total) + rng.randint(5, 40 * level)
        sentences.append(f"The whole trip is {trip} {unit} long.")
        sentences.append(f"How many {unit} are left to go?")
        answer = sol.step("The distance left is ", f"{trip}-{_n(total)}", trip - total, f" {unit}.")
    elif level == 4:
        sentences.append(f"What is its average speed over the whole journey, in {unit} per hour?")
        time_total = sol.step(
            "The journey takes ", "+".join(_n(h) for h in hours), sum(hours, Fraction(0)), " hours."
        )
        answer = sol.step(
            "The average speed is ", f"{_n(total)}/{_n(time_total)}", total / time_total, f" {unit} per hour."
        )
    else:
        sentences.append(f"How many {unit} does it travel in total?")
        answer = total
    return " ".join(sentences), sol, answer


def _ages(rng: random.Random, level: int) -> tuple[str, _Solution, Fraction]:
    (a, _), (b, _), (c, _) = rng.sample(_NAMES, 3)
    sol = _Solution()
    if level == 1:  # an age added
        age_b, older = rng.randint(10, 60), rng.randint(2, 9)
        q = f"{a} is {older} years older than {b}. {b} is {age_b} years old. How old is {a}?"
        return q, sol, sol.column_step(f"{a} is ", age_b, "+", older, " years old.")
    older = rng.randint(2, 6 + 3 * level)
    times = rng.randint(2, 4)
    age_c = rng.randint(2, 6 + 2 * level)
    sentences = [
        f"{a} is {older} years older than {b}.",
        f"{b} is {times} times as old as {c}.",
        f"{c} is {age_c} years old.",
    ]
    age_b = sol.step(f"{b} is ", f"{times}*{age_c}", Fraction(times * age_c), " years old.")
    age_a = sol.step(f"{a} is ", f"{_n(age_b)}+{older}", age_b + older, " years old.")
    if level == 2:
        sentences.append(f"How old is {a}?")
        return " ".join(sentences), sol, age_a
    if level == 3:
        years = rng.randint(2, 15)
        sentences.append(f"How old will {a} be in {years} years?")
        return (
            " ".join(sentences),
            sol,
            sol.step(f"In {years} years {a} will be ", f"{_n(age_a)}+{years}", age_a + years, " years old."),
        )
    total = sol.step(
        "Together they are ", f"{_n(age_a)}+{_n(age_b)}+{age_c}", age_a + age_b + age_c, " years old."
    )
    if level == 4:
        sentences.append("What is the sum of their three ages?")
        return " ".join(sentences), sol, total
    years = rng.randint(2, 12)
    sentences.append(f"What will the sum of their three ages be in {years} years?")
    gain = sol.step(
        "Each of the three gains the same years, so the sum grows by ", f"3*{years}", Fraction(3 * years), "."
    )
    return (
        " ".join(sentences),
        sol,
        sol.step("The sum will be ", f"{_n(total)}+{_n(gain)}", total + gain, " years."),
    )


def _sharing(rng: random.Random, level: int) -> tuple[str, _Solution, Fraction]:
    name, pron = rng.choice(_NAMES)
    thing = rng.choice(_SHARED)
    if level == 1:  # some given away
        total, given = rng.randint(12, 99), rng.randint(2, 9)
        sol = _Solution()
        question = (
            f"{name} has {total} {thing} and gives {given} of them to a friend. "
            f"How many {thing} does {pron} have left?"
        )
        return (
            question,
            sol,
            sol.column_step(f"{name} has ", total, "-", given, f" {thing} left."),
        )
    friends = rng.randint(2, 3 + 2 * level)
    each = rng.randint(2, (6, 10, 15, 25, 40)[level - 1])
    keep = rng.randint(1, 5 * level) if level >= 2 else 0
    sol = _Solution()
    shared = Fraction(friends * each)
    if level == 5:
        # Gives away a fraction first: total = shared + keep + given, given = total / k.
        k = rng.choice([3, 4, 5])
        rest = shared + keep
        total = rest * k / (k - 1)
        if total.denominator != 1:
            raise _Reject
        packs_sentence = (
            f"{name} has {_n(total)} {thing}. {pron.capitalize()} gives 1/{k} of them to a neighbour"
        )
        given = sol.step(f"{name} gives away ", f"{_n(total)}/{k}", total / k, f" {thing}.")
        rest = sol.step("That leaves ", f"{_n(total)}-{_n(given)}", total - given, f" {thing}.")
        sentences = [
            packs_sentence + f", keeps {keep} for {'herself' if pron == 'she' else 'himself'}"
            f" and shares the rest equally among {friends} friends."
        ]
        left = sol.step("The friends share ", f"{_n(rest)}-{keep}", rest - keep, f" {thing}.")
    elif level >= 3:
        size = rng.choice([d for d in range(3, 13) if (shared + keep) % d == 0] or [0])
        if not size:
            raise _Reject
        packs = (shared + keep) / size
        sentences = [
            f"{name} buys {_n(packs)} packs of {thing} with {size} in each pack.",
            f"{pron.capitalize()} keeps {keep} and shares the rest equally among {friends} friends.",
        ]
        total = sol.step(f"{name} has ", f"{_n(packs)}*{size}", packs * size, f" {thing}.")
        left = sol.step("The friends share ", f"{_n(total)}-{keep}", total - keep, f" {thing}.")
    else:
        total = shared + keep
        keeps = (
            f" {pron.capitalize()} keeps {keep} and shares the rest"
            if keep
            else f" {pron.capitalize()} shares them"
        )
        sentences = [f"{name} has {_n(total)} {thing}.{keeps} equally among {friends} friends."]
        left = total
        if keep:
            left = sol.step("The friends share ", f"{_n(total)}-{keep}", total - keep, f" {thing}.")
    per_friend = sol.step("Each friend gets ", f"{_n(left)}/{friends}", left / friends, f" {thing}.")
    if level >= 4:
        eaten = rng.randint(1, int(per_friend) - 1) if per_friend > 1 else 0
        if not eaten:
            raise _Reject
        verb = "uses" if thing in ("stickers", "cards", "beads", "stamps", "buttons", "crayons") else "loses"
        sentences.append(
            f"Each friend then {verb} {eaten} of them. How many {thing} do the friends have left altogether?"
        )
        remaining = sol.step("Each friend has ", f"{_n(per_friend)}-{eaten}", per_friend - eaten, " left.")
        return (
            " ".join(sentences),
            sol,
            sol.step(
                "Altogether they have ", f"{_n(remaining)}*{friends}", remaining * friends, f" {thing}."
            ),
        )
    sentences.append(f"How many {thing} does each friend get?")
    return " ".join(sentences), sol, per_friend


def _wages(rng: random.Random, level: int) -> tuple[str, _Solution, Fraction]:
    name, pron = rng.choice(_NAMES)
    if level == 1:  # spent out of savings
        saved, spent = rng.randint(12, 99), rng.randint(2, 9)
        sol = _Solution()
        question = (
            f"{name} has saved ${saved} and spends ${spent} on {rng.choice(_PURCHASES)}. "
            f"How much money does {pron} have left, in dollars?"
        )
        return (
            question,
            sol,
            sol.column_step(f"{pron.capitalize()} has ", saved, "-", spent, " dollars left."),
        )
    rate = _price(rng, level) if level >= 3 else Fraction(rng.randint(5, 25))
    hours = rng.randint(2, 8)
    sol = _Solution()
    sentences = [f"{name} earns {_money(rate)} per hour."]
    days = rng.randint(2, 6 + level)
    sentences.append(f"{pron.capitalize()} works {hours} hours a day, {days} days a week.")
    worked = sol.step(f"{name} works ", f"{hours}*{days}", Fraction(hours * days), " hours.")
    earned = sol.step(f"{pron.capitalize()} earns ", f"{_n(worked)}*{_n(rate)}", worked * rate, " dollars.")
    if level == 2:
        sentences.append(f"How much does {pron} earn in a week, in dollars?")
        return " ".join(sentences), sol, earned
    spent = Fraction(rng.randint(1, max(1, int(earned) - 1)))
    sentences.append(f"That week {pron} spends ${_n(spent)} on {rng.choice(_PURCHASES)}.")
    left = sol.step(
        f"{pron.capitalize()} has ", f"{_n(earned)}-{_n(spent)}", earned - spent, " dollars left."
    )
    if level == 3:
        sentences.append(f"How much money does {pron} have left, in dollars?")
        return " ".join(sentences), sol, left
    pct = rng.choice([10, 20, 25, 40, 50, 75])
    sentences.append(f"{pron.capitalize()} puts {pct}% of what is left into savings.")
    saved = sol.step(f"{pron.capitalize()} saves ", f"{_n(left)}*{pct}/100", left * pct / 100, " dollars.")
    _money(saved)
    if level == 4:
        sentences.append(f"How many dollars does {pron} save?")
        return " ".join(sentences), sol, saved
    weeks = rng.randint(2, 8)
    sentences.append(f"If every week goes the same way, how many dollars does {pron} save in {weeks} weeks?")
    return (
        " ".join(sentences),
        sol,
        sol.step(f"In {weeks} weeks {pron} saves ", f"{_n(saved)}*{weeks}", saved * weeks, " dollars."),
    )


def _classroom(rng: random.Random, level: int) -> tuple[str, _Solution, Fraction]:
    if level == 1:  # the boys are the rest
        members, girls = rng.randint(12, 99), rng.randint(2, 9)
        sol = _Solution()
        question = (
            f"A school club has {members} members, and {girls} of them are girls. "
            "How many boys are in the club?"
        )
        return (
            question,
            sol,
            sol.column_step("There are ", members, "-", girls, " boys."),
        )
    pct = rng.choice([10, 20, 25, 30, 40, 50, 60, 75, 80])
    students = rng.choice([n for n in range(10, 20 + 40 * level) if n * pct % 100 == 0])
    club = rng.choice(_GAMES)
    sol = _Solution()
    sentences = [f"A school club has {students} members, and {pct}% of them are girls."]
    girls = sol.step("There are ", f"{students}*{pct}/100", Fraction(students * pct, 100), " girls.")
    boys = sol.step("There are ", f"{students}-{_n(girls)}", students - girls, " boys.")
    if level == 2:
        sentences.append("How many boys are in the club?")
        return " ".join(sentences), sol, boys
    k = rng.choice([d for d in (2, 3, 4, 5) if girls % d == 0] or [0])
    if not k:
        raise _Reject
    sentences.append(f"One in {k} of the girls also plays {club}.")
    girls_club = sol.step(f"Girls who play {club}: ", f"{_n(girls)}/{k}", girls / k, ".")
    if level == 3:
        sentences.append(f"How many girls play {club}?")
        return " ".join(sentences), sol, girls_club
    boys_club = rng.randint(1, max(1, int(boys)))
    sentences.append(f"{boys_club} of the boys play {club} too.")
    players = sol.step(
        "In all, ", f"{_n(girls_club)}+{boys_club}", girls_club + boys_club, f" members play {club}."
    )
    if level == 4:
        sentences.append(f"How many members play {club}?")
        return " ".join(sentences), sol, players
    sentences.append(f"What percent of the members play {club}?")
    return (
        " ".join(sentences),
        sol,
        sol.step("That is ", f"{_n(players)}*100/{students}", players * 100 / students, " percent."),
    )


TEMPLATES = {
    "shopping": _shopping,
    "travel": _travel,
    "ages": _ages,
    "sharing": _sharing,
    "wages": _wages,
    "classroom": _classroom,
}


def generate_problem(rng: random.Random, level: int, template: str, max_tries: int = 1000) -> Problem:
    """Draws one problem of `template` at difficulty `level` (1..5) from `rng`.

    Raises:
        ValueError: unknown template/level, or no clean draw in `max_tries` attempts.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; templates: {sorted(TEMPLATES)}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    for _ in range(max_tries):
        try:
            question, sol, answer = TEMPLATES[template](rng, level)
            solution, shown = sol.finish(answer)
        except _Reject:
            continue
        if "/" in shown or answer < 0:
            continue
        return Problem(
            question=question, solution=solution, answer=shown, level=level, origin=f"mathgen:{template}"
        )
    raise ValueError(f"template {template!r} level {level}: no clean problem in {max_tries} draws")


def normalize_question(text: str) -> str:
    """Lower case, single spaces: the key for exact-duplicate and overlap checks."""
    return " ".join(text.lower().split())


# The generator's interchangeable words: names and their pronouns, goods, vehicles, units, pastimes.
_SURFACE_WORDS = sorted(
    {
        *(name for name, _ in _NAMES),
        "he",
        "she",
        "his",
        "her",
        "him",
        *_GOODS,
        *_SHARED,
        *_VEHICLES,
        *_UNITS,
        *_GAMES,
        *_PURCHASES,
    },
    key=lambda w: (-len(w), w),  # longest first: "rolls of tape" before "tape"
)
_SURFACE_RE = re.compile(r"\b(?:" + "|".join(re.escape(w.lower()) for w in _SURFACE_WORDS) + r")\b")


def problem_key(text: str) -> str:
    """The problem a question poses: its normalized text with the generator's interchangeable words
    (names, pronouns, goods, vehicles, units, pastimes) replaced by `<w>` and its numbers kept.

    "Mei is 8 years older than Yusuf. Yusuf is 11 ..." and "Maya is 8 years older than Noah. Noah is
    11 ..." share it: the same template with the same numbers has the same answer, so a model that
    trained on one has seen the other. The same template with other numbers is another problem (another
    answer). prepare_data keeps problems of one key in one split and the contracts refuse an eval or
    select question whose key is in a training split (docs/choices.md#prepare_data)."""
    return _SURFACE_RE.sub("<w>", normalize_question(text))


_EQUATION_RE = re.compile(r"<<([^=<>]+)=[^<>]*>>")


def equation_key(solution: str) -> frozenset[str]:
    """The arithmetic a worked solution does: the set of its `<<expr=value>>` expressions, spaces removed,
    the operands of a pure sum or product sorted ("<<9+38=47>>" and "<<38+9=47>>" are one sum). Empty
    for a solution without GSM8K calculator marks.

    prepare_data keeps an eval problem's arithmetic out of every training split: "A van travels 38 km and
    then 9 km" (eval) and "Kai spends $38 and then $9" (sft) are two problems with one sum, and a model
    that memorised 38+9=47 from the second would look as if it could add (docs/choices.md#prepare_data)."""
    keys = set()
    for expr in _EQUATION_RE.findall(solution):
        expr = "".join(expr.split())
        for op in "+*":
            parts = expr.split(op)
            if len(parts) > 1 and all(part.isdigit() for part in parts):
                expr = op.join(sorted(parts, key=int))
                break
        keys.add(expr)
    return frozenset(keys)


def generate_problems(count: int, levels: Sequence[int], seed: int) -> list[Problem]:
    """`count` distinct problems (distinct normalized questions), deterministic in `seed`.

    Levels cycle through `levels` (so they are balanced) and the template is drawn at random.

    Raises:
        ValueError: if `count` distinct problems cannot be drawn (levels too few for the count).
    """
    if not levels:
        raise ValueError("levels must not be empty")
    rng = random.Random(f"mathgen:{seed}")
    names = sorted(TEMPLATES)
    seen: set[str] = set()
    problems: list[Problem] = []
    misses = 0
    while len(problems) < count:
        level = levels[len(problems) % len(levels)]
        problem = generate_problem(rng, level, rng.choice(names))
        key = normalize_question(problem.question)
        if key in seen:
            misses += 1
            if misses > 10 * count + 1000:
                raise ValueError(
                    f"could draw only {len(problems)} distinct problems of levels {list(levels)}"
                )
            continue
        seen.add(key)
        problems.append(problem)
    return problems
