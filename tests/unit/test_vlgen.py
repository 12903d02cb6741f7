"""Generated vision-language items: deterministic, exact answers checked against the pixels, held-out
images disjoint from train by construction."""

from __future__ import annotations

import collections
from fractions import Fraction

import numpy as np
import pytest

from tasks.data.vlgen import (
    ANSWER_TYPES,
    COLOURS,
    TASK_ANSWER_TYPES,
    TASKS,
    check_disjoint,
    from_record,
    generate_vqa,
    heldout_part,
    split_of,
    to_record,
)


@pytest.fixture(scope="module")
def train():
    return generate_vqa(200, seed=3, split="train")


@pytest.fixture(scope="module")
def heldout():
    return generate_vqa(60, seed=3, split="heldout")


def test_deterministic_in_seed():
    a, b = generate_vqa(30, seed=7, split="train"), generate_vqa(30, seed=7, split="train")
    assert a == b and [x.png_bytes() for x in a] == [x.png_bytes() for x in b]
    assert a != generate_vqa(30, seed=8, split="train")


def test_items_are_well_formed(train):
    assert collections.Counter(x.task for x in train) == {t: 20 for t in TASKS}
    for x in train:
        assert x.answer_type in TASK_ANSWER_TYPES[x.task] and x.answer and x.question.endswith(("?", "."))
        assert x.answer_type in ANSWER_TYPES
        assert x.image.mode == "RGB" and x.image.size == (64, 64)
        assert x.split == "train" == split_of(x.spec, 0.2)
        if x.answer_type in ("int", "float"):
            assert Fraction(x.answer) >= 0
        if x.answer_type == "int":
            assert x.answer.isdigit()
        assert (x.answer in x.choices) if x.answer_type == "choice" else not x.choices
        if x.task == "scene_relation":
            assert x.answer in ("yes", "no")
    assert len({(x.spec_key, x.question) for x in train}) == len(train)


def test_heldout_parts_are_disjoint_and_balanced():
    select = generate_vqa(20, seed=3, split="heldout", part="select")
    evals = generate_vqa(20, seed=3, split="heldout", part="eval")
    assert {heldout_part(x.spec) for x in select} == {"select"} and {x.split for x in select} == {"heldout"}
    assert {heldout_part(x.spec) for x in evals} == {"eval"}
    check_disjoint(select, evals)
    assert collections.Counter(x.task for x in evals) == {t: 2 for t in TASKS}
    with pytest.raises(ValueError, match="part='eval'"):
        generate_vqa(2, seed=3, split="train", part="eval")


def test_heldout_is_disjoint_by_construction(train, heldout):
    assert all(x.split == "heldout" == split_of(x.spec, 0.2) for x in heldout)
    check_disjoint(train, heldout)
    with pytest.raises(ValueError, match="held-out item 1 has the spec of train item 4"):
        check_disjoint(train, [heldout[0], train[4]])


def _colour_at(img, x, y) -> str | None:
    rgb = tuple(int(v) for v in np.asarray(img)[y, x])
    return next((name for name, c in COLOURS.items() if c == rgb), None)


def test_bar_values_are_the_drawn_heights(train):
    bars = [x for x in train if x.task == "chart_bar"]
    checked = 0
    for x in bars:
        pixels = np.asarray(x.image)
        width = 64 // len(x.spec["values"])
        unit, base = (64 - 4) // 9, 2 + 9 * ((64 - 4) // 9)
        for i, colour in enumerate(x.spec["colours"]):
            column = pixels[:, i * width + width // 2]
            rows = [y for y in range(64) if tuple(int(v) for v in column[y]) == COLOURS[colour]]
            height = (base - min(rows)) // unit
            if x.question == f"What is the value of the {colour} bar?":
                assert x.answer == str(height)
                checked += 1
            if x.question == "Which colour is the tallest bar?" and colour == x.answer:
                assert height == max(x.spec["values"])
                checked += 1
    assert checked == len(bars)


def test_pie_answer_has_the_most_pixels(train):
    for x in (x for x in train if x.task == "chart_pie"):
        pixels = np.asarray(x.image).reshape(-1, 3)
        counts = {name: int((pixels == np.array(c)).all(1).sum()) for name, c in COLOURS.items()}
        assert max(counts, key=counts.get) == x.answer


def test_scene_answers_match_the_pixels(train):
    cells = {"top left": (16, 16), "top right": (48, 16), "bottom left": (16, 48), "bottom right": (48, 48)}
    for x in (x for x in train if x.task.startswith("scene_") or x.task == "caption"):
        for obj in x.spec["objects"]:  # every object's colour is at its cell's centre (triangles too)
            cx, cy = obj["cell"]
            assert _colour_at(x.image, 16 + 32 * cx, 20 + 32 * cy) == obj["colour"]
        if x.task == "scene_position":
            colour, shape = x.question.removeprefix("Where is the ").removesuffix("?").split()
            assert _colour_at(x.image, *cells[x.answer]) == colour
        if x.task == "scene_count":
            shape = x.question.split()[2][:-1]
            assert x.answer == str(sum(o["shape"] == shape for o in x.spec["objects"]))


def test_text_answers_are_exact(train):
    for x in train:
        if x.task == "arithmetic":
            a, b, op = x.spec["a"], x.spec["b"], x.spec["op"]
            assert int(x.answer) == {"+": a + b, "-": a - b, "x": a * b}[op] >= 0
        if x.task == "geometry":
            a, b, kind = x.spec["a"], x.spec["b"], x.spec["kind"]
            want = {"rectangle_area": a * b, "triangle_area": Fraction(a * b, 2), "third_angle": 180 - a - b}
            assert Fraction(x.answer) == want[kind] and Fraction(x.answer) > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"split": "test"}, "split='test'"),
        ({"tasks": ["scene_count", "ocr"]}, r"unknown \['ocr'\]"),
        ({"size": 60}, "size=60"),
        ({"heldout_fraction": 1.0}, "heldout_fraction"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_vqa(4, seed=0, **{"split": "train", **kwargs})


def test_record_round_trip_and_bad_records(train):
    import json

    for x in train[:12]:
        back = from_record(json.loads(json.dumps(to_record(x))))
        assert back == x and back.spec == x.spec and back.pixel_hash() == x.pixel_hash()
    rec = to_record(train[0])
    with pytest.raises(ValueError, match=r"row 3: missing field\(s\) \['answer'\]"):
        from_record({k: v for k, v in rec.items() if k != "answer"}, where="row 3")
    with pytest.raises(ValueError, match="task='ocr'"):
        from_record({**rec, "task": "ocr"})
    with pytest.raises(ValueError, match="does not decode"):
        from_record({**rec, "image_png_b64": "aGVsbG8="})
