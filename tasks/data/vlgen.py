"""Generated vision-language data with exact answers: rendered scenes, charts, arithmetic and geometry.

Library module (the VL profile's data, via tasks.data.vldata): `generate_vqa(count, seed, split)` draws
image-question-answer items, every one rendered with Pillow from a small *spec* (what is drawn) whose
answer is computed, not read back. Task types (`TASKS`): scene counting, colour, position and relation
questions and captions (alignment), bar / line / pie charts with their values, rendered arithmetic, and
simple geometry (rectangle and right-triangle areas, a triangle's third angle). The split of an item is
a hash of its spec, so train and held-out images are disjoint by construction (`part=` cuts the held-out
images again into select and eval); `check_disjoint` verifies it (spec keys and pixel hashes);
`to_record` / `from_record` are the JSON form (image as base64 PNG). The data contract of these records:
`data_contracts.vl`; the split files: `tasks.data.vldata`.
Nothing is downloaded: shapes are drawn, text uses Pillow's built-in font.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from PIL import Image, ImageDraw, ImageFont

from tasks.data.mathgen import format_number

SPLITS = ("train", "heldout")
# The held-out images are cut again, by a second hash of the spec, into the selection set (decisions
# such as healing) and the reported evaluation set: three disjoint sets of images.
HELDOUT_PARTS = ("select", "eval")
# int: "42"; float: a decimal number ("7.5", also "12"); choice: one of the item's `choices`;
# text: free text (captions).
ANSWER_TYPES = ("int", "float", "choice", "text")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("square", "circle", "triangle")
BACKGROUND = (255, 255, 255)
YES_NO = ("yes", "no")


@dataclass(frozen=True)
class VQAItem:
    """One generated image-question-answer item.

    Attributes:
        image: the rendered RGB image (width and height multiples of `block`).
        question / answer: the prompt and its exact answer (numbers in `format_number` form, words
            lower case, "yes"/"no", or a caption for task "caption").
        answer_type: one of ANSWER_TYPES, one of the task's `TASK_ANSWER_TYPES`.
        task: the task type (a key of TASKS).
        spec: what was drawn (JSON-serialisable); its canonical JSON decides the split.
        split: "train" or "heldout".
        choices: the possible answers of a "choice" item (sorted), () otherwise.
    """

    image: Image.Image = field(compare=False)
    question: str
    answer: str
    answer_type: str
    task: str
    spec: dict = field(compare=False)
    split: str
    choices: tuple[str, ...] = ()

    @property
    def spec_key(self) -> str:
        return spec_key(self.spec)

    def png_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", optimize=False)
        return buf.getvalue()

    def pixel_hash(self) -> str:
        return hashlib.sha256(self.image.tobytes()).hexdigest()


def spec_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def split_of(spec: dict, heldout_fraction: float) -> str:
    """The split of a spec: a hash of its canonical JSON, so an image is in exactly one split."""
    digest = int.from_bytes(hashlib.sha256(spec_key(spec).encode()).digest()[:8], "big")
    return "heldout" if digest % 10_000 < round(heldout_fraction * 10_000) else "train"


def heldout_part(spec: dict) -> str:
    """ "select" or "eval" (half each): a second hash of the spec, independent of `split_of`'s."""
    digest = hashlib.sha256(b"heldout-part:" + spec_key(spec).encode()).digest()
    return HELDOUT_PARTS[digest[0] % 2]


# --- scenes ---------------------------------------------------------------------------------------
_CELLS = {(0, 0): "top left", (1, 0): "top right", (0, 1): "bottom left", (1, 1): "bottom right"}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, box: tuple[int, int, int, int]) -> None:
    fill = COLOURS[colour]
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _scene_spec(rng: random.Random) -> dict:
    """1-4 objects in the cells of a 2x2 grid (no overlap, unambiguous positions)."""
    n = rng.randint(1, 4)
    cells = rng.sample(sorted(_CELLS), n)
    objects = [
        {"shape": rng.choice(SHAPES), "colour": rng.choice(sorted(COLOURS)), "cell": list(c)} for c in cells
    ]
    return {"kind": "scene", "objects": sorted(objects, key=lambda o: o["cell"])}


def _render_scene(spec: dict, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    half, pad = size // 2, max(2, size // 16)
    for obj in spec["objects"]:
        cx, cy = obj["cell"]
        box = (cx * half + pad, cy * half + pad, (cx + 1) * half - pad - 1, (cy + 1) * half - pad - 1)
        _draw_shape(draw, obj["shape"], obj["colour"], box)
    return img


def _plural(shape: str) -> str:
    return shape + "s"


def _name(obj: dict) -> str:
    return f"{obj['colour']} {obj['shape']}"


def _scene_questions(spec: dict, rng: random.Random, task: str) -> tuple[str, str, str] | None:
    objs = spec["objects"]
    if task == "scene_count":
        shape = rng.choice(SHAPES)
        count = sum(o["shape"] == shape for o in objs)
        return f"How many {_plural(shape)} are in the image?", format_number(count), "int"
    if task == "scene_colour":
        shapes = [o["shape"] for o in objs]
        unique = [o for o in objs if shapes.count(o["shape"]) == 1]
        if not unique:
            return None
        obj = rng.choice(unique)
        return f"What colour is the {obj['shape']}?", obj["colour"], "choice"
    names = [_name(o) for o in objs]
    unique = [o for o in objs if names.count(_name(o)) == 1]
    if task == "scene_position":
        if not unique:
            return None
        obj = rng.choice(unique)
        return f"Where is the {_name(obj)}?", _CELLS[tuple(obj["cell"])], "choice"
    if task == "scene_relation":
        pairs = [(a, b) for a in unique for b in unique if a is not b and a["cell"][1] == b["cell"][1]]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        answer = "yes" if a["cell"][0] < b["cell"][0] else "no"
        return f"Is the {_name(a)} to the left of the {_name(b)}?", answer, "choice"
    if task == "caption":
        parts = [f"a {_name(o)} at the {_CELLS[tuple(o['cell'])]}" for o in objs]
        return "Describe the image.", ", ".join(parts) + ".", "text"
    raise ValueError(f"not a scene task: {task}")


# --- charts ---------------------------------------------------------------------------------------
def _chart_spec(rng: random.Random, kind: str) -> dict:
    n = rng.randint(3, 4)
    colours = rng.sample(sorted(COLOURS), n)
    if kind == "pie":
        while True:  # a unique largest share
            values = [rng.randint(1, 9) for _ in range(n)]
            if values.count(max(values)) == 1:
                break
    else:
        values = [rng.randint(1, 9) for _ in range(n)]
    return {"kind": kind, "colours": colours, "values": values}


def _render_chart(spec: dict, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    values, colours = spec["values"], spec["colours"]
    unit = (size - 4) // 9  # one value step in pixels: heights are exact multiples
    base = 2 + 9 * unit
    for v in range(1, 10):  # light grid lines at every value
        draw.line([(0, base - v * unit), (size - 1, base - v * unit)], fill=(225, 225, 225))
    width = size // len(values)
    if spec["kind"] == "bar":
        for i, (v, c) in enumerate(zip(values, colours)):
            draw.rectangle((i * width + 2, base - v * unit, (i + 1) * width - 3, base), fill=COLOURS[c])
    elif spec["kind"] == "line":
        points = [(i * width + width // 2, base - v * unit) for i, v in enumerate(values)]
        draw.line(points, fill=(0, 0, 0), width=1)
        for (x, y), c in zip(points, colours):
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=COLOURS[c])
    else:  # pie: sectors in order, clockwise from 12 o'clock
        img = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(img)
        total, start = sum(values), -90.0
        for v, c in zip(values, colours):
            end = start + 360.0 * v / total
            draw.pieslice((2, 2, size - 3, size - 3), start, end, fill=COLOURS[c])
            start = end
    return img


def _chart_question(spec: dict, rng: random.Random) -> tuple[str, str, str]:
    values, colours = spec["values"], spec["colours"]
    if spec["kind"] == "pie":
        return "Which colour has the largest share of the pie?", colours[values.index(max(values))], "choice"
    i = rng.randrange(len(values))
    if spec["kind"] == "bar":
        if values.count(max(values)) == 1 and rng.random() < 0.3:
            return "Which colour is the tallest bar?", colours[values.index(max(values))], "choice"
        return f"What is the value of the {colours[i]} bar?", format_number(values[i]), "int"
    return f"What is the value of the {colours[i]} point?", format_number(values[i]), "int"


# --- rendered text: arithmetic and geometry -------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(8, size // 5))


def _text_image(lines: Sequence[str], size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font(size)
    y = 2
    for line in lines:
        draw.text((2, y), line, fill=(0, 0, 0), font=font)
        y += font.size + 2
    return img


def _arith_spec(rng: random.Random) -> dict:
    op = rng.choice("+-x")
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if op == "-" and b > a:
        a, b = b, a
    return {"kind": "arith", "a": a, "b": b, "op": op}


def _arith(spec: dict) -> tuple[str, str, str]:
    a, b, op = spec["a"], spec["b"], spec["op"]
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return "What is the result of the calculation in the image?", format_number(value), "int"


def _geometry_spec(rng: random.Random) -> dict:
    kind = rng.choice(("rectangle_area", "triangle_area", "third_angle"))
    if kind == "third_angle":
        a = rng.randint(20, 100)
        b = rng.randint(20, 160 - a)
        return {"kind": kind, "a": a, "b": b}
    return {"kind": kind, "a": rng.randint(2, 12), "b": rng.randint(2, 12)}


def _render_geometry(spec: dict, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font(size)
    m = size // 4
    if spec["kind"] == "rectangle_area":
        draw.rectangle((m, m, size - m, size - m), outline=(0, 0, 0))
        draw.text((size // 2 - 4, 1), str(spec["a"]), fill=(0, 0, 0), font=font)
        draw.text((size - m + 2, size // 2 - 4), str(spec["b"]), fill=(0, 0, 0), font=font)
    elif spec["kind"] == "triangle_area":  # right triangle with legs a (bottom) and b (left)
        draw.polygon([(m, m), (m, size - m), (size - m, size - m)], outline=(0, 0, 0))
        draw.text((size // 2 - 4, size - m + 1), str(spec["a"]), fill=(0, 0, 0), font=font)
        draw.text((1, size // 2 - 4), str(spec["b"]), fill=(0, 0, 0), font=font)
    else:
        draw.polygon([(m // 2, size - m), (size - m // 2, size - m), (size // 2, m)], outline=(0, 0, 0))
        draw.text((1, size - m + 1), f"{spec['a']}°", fill=(0, 0, 0), font=font)
        draw.text((size // 2 + 2, size - m + 1), f"{spec['b']}°", fill=(0, 0, 0), font=font)
    return img


def _geometry(spec: dict) -> tuple[str, str, str]:
    a, b = spec["a"], spec["b"]
    if spec["kind"] == "rectangle_area":
        return "What is the area of the rectangle?", format_number(a * b), "float"
    if spec["kind"] == "triangle_area":
        return "What is the area of the right triangle?", format_number(Fraction(a * b, 2)), "float"
    return "What is the third angle of the triangle, in degrees?", format_number(180 - a - b), "float"


# --- drawing one item -----------------------------------------------------------------------------
def _scene_task(task: str) -> Callable[[random.Random, int], tuple[dict, Image.Image, tuple | None]]:
    def draw(rng: random.Random, size: int):
        spec = _scene_spec(rng)
        return spec, _render_scene(spec, size), _scene_questions(spec, rng, task)

    return draw


def _chart_task(kind: str):
    def draw(rng: random.Random, size: int):
        spec = _chart_spec(rng, kind)
        return spec, _render_chart(spec, size), _chart_question(spec, rng)

    return draw


def _arith_task(rng: random.Random, size: int):
    spec = _arith_spec(rng)
    sym = {"+": "+", "-": "-", "x": "x"}[spec["op"]]
    return spec, _text_image([f"{spec['a']} {sym} {spec['b']}", "= ?"], size), _arith(spec)


def _geometry_task(rng: random.Random, size: int):
    spec = _geometry_spec(rng)
    return spec, _render_geometry(spec, size), _geometry(spec)


_COLOUR_NAMES = tuple(sorted(COLOURS))
_POSITIONS = tuple(sorted(_CELLS.values()))
# The answer types of each task, and the possible answers of its "choice" questions. Geometry answers
# are "float" (a triangle's area may be a half); the other numbers are whole.
TASK_ANSWER_TYPES: dict[str, tuple[str, ...]] = {
    "scene_count": ("int",),
    "scene_colour": ("choice",),
    "scene_position": ("choice",),
    "scene_relation": ("choice",),
    "caption": ("text",),
    "chart_bar": ("int", "choice"),
    "chart_line": ("int",),
    "chart_pie": ("choice",),
    "arithmetic": ("int",),
    "geometry": ("float",),
}
TASK_CHOICES: dict[str, tuple[str, ...]] = {
    "scene_colour": _COLOUR_NAMES,
    "scene_position": _POSITIONS,
    "scene_relation": YES_NO,
    "chart_bar": _COLOUR_NAMES,
    "chart_pie": _COLOUR_NAMES,
}

TASKS: dict[str, Callable] = {
    "scene_count": _scene_task("scene_count"),
    "scene_colour": _scene_task("scene_colour"),
    "scene_position": _scene_task("scene_position"),
    "scene_relation": _scene_task("scene_relation"),
    "caption": _scene_task("caption"),
    "chart_bar": _chart_task("bar"),
    "chart_line": _chart_task("line"),
    "chart_pie": _chart_task("pie"),
    "arithmetic": _arith_task,
    "geometry": _geometry_task,
}


def generate_vqa(
    count: int,
    seed: int,
    split: str,
    tasks: Sequence[str] | None = None,
    size: int = 64,
    block: int = 16,
    heldout_fraction: float = 0.2,
    part: str | None = None,
) -> list[VQAItem]:
    """`count` distinct items of `split`, tasks cycling through `tasks`, deterministic in `seed`.

    An item is kept only if its spec hashes to `split` (`split_of`), so the same call with the other
    split never draws the same image; questions are distinct per (spec, question). With `part`
    ("select" or "eval", split "heldout" only) the spec must also hash to that part (`heldout_part`).

    Raises:
        ValueError: a bad split, part, task, size (not a positive multiple of `block`) or fraction, or
            when `count` distinct items cannot be drawn.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {SPLITS}")
    if part is not None and (split != "heldout" or part not in HELDOUT_PARTS):
        raise ValueError(f"part={part!r}: must be one of {HELDOUT_PARTS}, with split='heldout'")
    tasks = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise ValueError(f"tasks={tasks}: unknown {unknown}; known: {sorted(TASKS)}")
    if block < 1 or size < block or size % block:
        raise ValueError(f"size={size}: must be a positive multiple of the patch grid block {block}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={heldout_fraction}: must be in (0, 1)")
    rng = random.Random(f"vlgen:{seed}:{split}" + (f":{part}" if part else ""))
    items: list[VQAItem] = []
    seen: set[tuple[str, str]] = set()
    misses = 0
    while len(items) < count:
        task = tasks[len(items) % len(tasks)]
        spec, image, qa = TASKS[task](rng, size)
        key = (spec_key(spec), qa[0] if qa else "")
        wrong_part = part is not None and heldout_part(spec) != part
        if qa is None or split_of(spec, heldout_fraction) != split or wrong_part or key in seen:
            misses += 1
            if misses > 200 * count + 1000:
                raise ValueError(f"could draw only {len(items)} distinct {split} items of tasks {tasks}")
            continue
        seen.add(key)
        question, answer, answer_type = qa
        choices = TASK_CHOICES[task] if answer_type == "choice" else ()
        items.append(VQAItem(image, question, answer, answer_type, task, spec, split, choices))
    return items


def to_record(item: VQAItem) -> dict:
    """A JSON-serialisable record: the image as base64 PNG bytes plus every text field and the spec."""
    return {
        "image_png_b64": base64.b64encode(item.png_bytes()).decode("ascii"),
        "question": item.question,
        "answer": item.answer,
        "answer_type": item.answer_type,
        "task": item.task,
        "split": item.split,
        "spec": item.spec,
        "choices": list(item.choices),
    }


def from_record(record: dict, where: str = "record") -> VQAItem:
    """The item of `to_record` (the image decoded and converted to RGB).

    Raises:
        ValueError: naming `where` and the field, for a missing field, an unknown task, split or answer
            type, or an image that does not decode.
    """
    fields = ("image_png_b64", "question", "answer", "answer_type", "task", "split", "spec")
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    for name, allowed in (("task", TASKS), ("split", SPLITS), ("answer_type", ANSWER_TYPES)):
        if record[name] not in allowed:
            raise ValueError(f"{where}: {name}={record[name]!r} is not one of {sorted(allowed)}")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(record["image_png_b64"], validate=True)))
        image.load()
    except Exception as e:  # binascii.Error, PIL.UnidentifiedImageError, OSError, ...
        raise ValueError(f"{where}: image_png_b64 does not decode to an image ({e})") from None
    return VQAItem(
        image.convert("RGB"),
        record["question"],
        record["answer"],
        record["answer_type"],
        record["task"],
        record["spec"],
        record["split"],
        tuple(record.get("choices") or ()),
    )


def check_disjoint(train: Sequence[VQAItem], heldout: Sequence[VQAItem]) -> None:
    """Raises ValueError naming the first shared image (same spec or same pixels) of the two splits."""
    specs = {item.spec_key: i for i, item in enumerate(train)}
    pixels = {item.pixel_hash(): i for i, item in enumerate(train)}
    for j, item in enumerate(heldout):
        if item.spec_key in specs:
            raise ValueError(
                f"held-out item {j} has the spec of train item {specs[item.spec_key]}: {item.spec_key}"
            )
        if item.pixel_hash() in pixels:
            raise ValueError(f"held-out item {j} has the pixels of train item {pixels[item.pixel_hash()]}")


__all__ = [
    "VQAItem",
    "TASKS",
    "generate_vqa",
    "check_disjoint",
    "split_of",
    "spec_key",
    "to_record",
    "from_record",
    "ANSWER_TYPES",
    "TASK_ANSWER_TYPES",
    "TASK_CHOICES",
    "HELDOUT_PARTS",
    "heldout_part",
]
