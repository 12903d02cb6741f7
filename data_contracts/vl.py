"""The data contract of image-text (VQA) records, as a Great Expectations suite defined in code.

    vl   {"id": str, "image": str, "question": str, "answer": str, "answer_type": str, "task": str}
         optional: "split" (train/select/eval), "choices" (list of str), "spec" (object), "source" (str)

`image` is a `data:image/<format>;base64,...` URL or a path (relative paths are resolved by the
caller's `read_image`, e.g. against the JSONL file's directory). `build_vl_frame` decodes every image
once and adds derived columns (`_image_error`, `_image_mode`, `_image_width`, `_image_height`,
`_image_off_grid`, `_task_answer_type`, `_answer_in_choices`, `_unknown_fields`); `build_vl_suite`
checks them with the bounds of `ImageBounds` (width and height multiples of the vision tower's patch
grid, patch_size x spatial_merge_size). Runner (quarantine, fail): `tasks.data.vldata.check_vl_rows`.
Why: docs/choices.md#vision-language-family.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe

from data_contracts.suites import CONTROL_CHARS_REGEX, ID_REGEX
from tasks.data.vlgen import ANSWER_TYPES, TASK_ANSWER_TYPES

VL_FIELDS = {
    "id": "str",
    "image": "str",
    "question": "str",
    "answer": "str",
    "answer_type": "str",
    "task": "str",
}
VL_OPTIONAL = ("split", "choices", "spec", "source")
VL_SPLITS = ("train", "select", "eval")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
INT_REGEX = r"^-?\d+\Z"
FLOAT_REGEX = r"^-?\d+(?:\.\d+)?\Z"
# Derived columns whose failing value explains the row's problem (it becomes the quarantine detail).
DETAIL_COLUMNS = (
    "_image_error",
    "_image_mode",
    "_image_width",
    "_image_height",
    "_image_off_grid",
    "_task_answer_type",
    "_unknown_fields",
)
DERIVED = ("_answer_in_choices", *DETAIL_COLUMNS)
_DATA_URL = re.compile(r"data:image/([a-z]+);base64,", re.ASCII)


@dataclass(frozen=True)
class ImageBounds:
    """What an image and its text may be.

    Attributes:
        grid: width and height must be multiples of it: the vision tower's patch_size x
            spatial_merge_size (one merged token covers grid x grid pixels).
        min_side / max_side: bounds of width and height, pixels.
        max_bytes: bound of the encoded image.
        max_question_chars / max_answer_chars: text bounds (an answer of type "text" is a caption).
    """

    grid: int = 16
    min_side: int = 16
    max_side: int = 1024
    max_bytes: int = 8 << 20
    max_question_chars: int = 1000
    max_answer_chars: int = 1000

    def __post_init__(self) -> None:
        if self.grid < 1 or self.min_side < self.grid or self.max_side < self.min_side:
            raise ValueError(f"bad image bounds: {self}")

    @classmethod
    def from_vision_config(cls, vision_config: Any, **kwargs: Any) -> ImageBounds:
        """Bounds whose grid is `vision_config.patch_size * vision_config.spatial_merge_size`."""
        grid = int(vision_config.patch_size) * int(vision_config.spatial_merge_size)
        return cls(grid=grid, min_side=max(kwargs.pop("min_side", grid), grid), **kwargs)


def local_reader(base_dir: str | Path) -> Callable[[str], bytes]:
    """Reads an image path (relative paths from `base_dir`)."""
    base = Path(base_dir)

    def read(path: str) -> bytes:
        return (base / path).read_bytes()

    return read


def inspect_image(
    value: Any, bounds: ImageBounds, read_image: Callable[[str], bytes]
) -> tuple[str, str | None, int | None, int | None]:
    """(error, mode, width, height) of an `image` field; error "" when it decodes.

    Mode and size are read from the header, so a bad size is reported even when the pixels are not
    decoded (an image over the size bounds is not decoded at all).
    """
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str) or not value:
        return "no image (a data:image/...;base64 URL or a path)", None, None, None
    match = _DATA_URL.match(value)
    if match:
        try:
            data = base64.b64decode(value[match.end() :], validate=True)
        except (binascii.Error, ValueError) as e:
            return f"not valid base64 ({e})", None, None, None
    elif value.startswith("data:"):
        return "a data URL must start with data:image/<format>;base64,", None, None, None
    else:
        try:
            data = read_image(value)
        except Exception as e:  # FileNotFoundError, IsADirectoryError, an S3 error...
            return f"cannot read image file {value!r} ({type(e).__name__}: {e})", None, None, None
    if len(data) > bounds.max_bytes:
        return f"{len(data)} bytes, over {bounds.max_bytes}", None, None, None
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        return f"not a {'/'.join(IMAGE_FORMATS)} image ({len(data)} bytes: {data[:8]!r})", None, None, None
    except Exception as e:  # DecompressionBombError, a corrupt header (OSError, SyntaxError)
        return f"cannot open ({type(e).__name__}: {e})", None, None, None
    width, height = image.size
    if max(width, height) > bounds.max_side or min(width, height) < bounds.min_side:
        return "", image.mode, width, height  # the size expectations report it
    try:
        image.load()
    except Exception as e:  # truncated or corrupt data
        return f"does not decode ({type(e).__name__}: {e})", image.mode, width, height
    return "", image.mode, width, height


def _task_answer_type(row: dict[str, Any]) -> str | None:
    task, kind = row.get("task"), row.get("answer_type")
    if not isinstance(task, str) or not isinstance(kind, str):
        return None
    return f"{task}:{kind}" if task in TASK_ANSWER_TYPES else f"*:{kind}"


def allowed_task_answer_types() -> list[str]:
    """`task:answer_type` of the generated tasks, and `*:<type>` for any other task (user data)."""
    pairs = [f"{task}:{kind}" for task, kinds in TASK_ANSWER_TYPES.items() for kind in kinds]
    return pairs + [f"*:{kind}" for kind in ANSWER_TYPES]


def _answer_in_choices(row: dict[str, Any]) -> bool | None:
    if row.get("answer_type") != "choice":
        return None
    choices = row.get("choices")
    ok = isinstance(choices, (list, tuple)) and all(isinstance(c, str) for c in choices)
    return bool(ok and row.get("answer") in choices)


def build_vl_frame(
    rows: Sequence[dict[str, Any]],
    labels: Sequence[str],
    bounds: ImageBounds,
    read_image: Callable[[str], bytes],
):
    """The pandas DataFrame `build_vl_suite` validates: the fields (objects) plus the derived columns.

    Args:
        rows: records (JSON objects; `image` a data URL or a path for `read_image`).
        labels: one per row ("train.jsonl:3"): the frame's index, so failures name rows.
        bounds: image and text bounds.
        read_image: reads an image path (e.g. `local_reader(dir_of_the_jsonl)`).

    Raises:
        ValueError: a row uses a derived column name, or rows and labels differ in length.
    """
    import pandas as pd

    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
    known = (*VL_FIELDS, *VL_OPTIONAL)
    for row, label in zip(rows, labels):
        reserved = [k for k in row if k in DERIVED]
        if reserved:
            raise ValueError(f"{label}: field(s) {reserved} are reserved for derived contract columns")
    frame = pd.DataFrame(
        [{k: row.get(k) for k in known} for row in rows],
        columns=list(known),
        dtype=object,
        index=pd.Index(list(labels), dtype=object),
    )
    images = [inspect_image(row.get("image"), bounds, read_image) for row in rows]
    frame["_image_error"] = [e for e, _, _, _ in images]
    frame["_image_mode"] = [m for _, m, _, _ in images]
    frame["_image_width"] = pd.Series([w for _, _, w, _ in images], index=frame.index, dtype=object)
    frame["_image_height"] = pd.Series([h for _, _, _, h in images], index=frame.index, dtype=object)
    frame["_image_off_grid"] = [
        "" if w is None or (w % bounds.grid == 0 and h % bounds.grid == 0) else f"{w}x{h}"
        for _, _, w, h in images
    ]
    frame["_task_answer_type"] = [_task_answer_type(row) for row in rows]
    frame["_answer_in_choices"] = [_answer_in_choices(row) for row in rows]
    frame["_unknown_fields"] = [",".join(sorted(k for k in row if k not in known)) for row in rows]
    return frame


def build_vl_suite(bounds: ImageBounds, name: str = "vl") -> gx.ExpectationSuite:
    """The expectation suite of image-text records for `bounds` (not yet added to a context)."""
    e: list = []
    e.append(gxe.ExpectTableRowCountToBeBetween(min_value=1, description="at least one row"))
    for field, type_ in VL_FIELDS.items():
        e.append(gxe.ExpectColumnValuesToNotBeNull(column=field, description=f"{field} present and not null"))
        e.append(
            gxe.ExpectColumnValuesToBeOfType(column=field, type_=type_, description=f"{field} is a string")
        )
    e += [
        gxe.ExpectColumnValuesToBeInSet(
            column="_unknown_fields",
            value_set=[""],
            description=f"no fields besides {sorted(VL_FIELDS)} and optional {sorted(VL_OPTIONAL)}",
        ),
        gxe.ExpectColumnValuesToMatchRegex(
            column="id", regex=ID_REGEX, description="id is 1-128 printable ASCII characters without spaces"
        ),
        gxe.ExpectColumnValuesToBeUnique(column="id", description="id unique (no duplicate rows)"),
        gxe.ExpectColumnValuesToBeInSet(
            column="_image_error",
            value_set=[""],
            description=f"image decodes ({'/'.join(IMAGE_FORMATS)}, at most {bounds.max_bytes} bytes)",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="_image_mode", value_set=["RGB"], description="image mode is RGB"
        ),
    ]
    for side in ("width", "height"):
        e.append(
            gxe.ExpectColumnValuesToBeBetween(
                column=f"_image_{side}",
                min_value=bounds.min_side,
                max_value=bounds.max_side,
                description=f"image {side} is {bounds.min_side}-{bounds.max_side} pixels",
            )
        )
    e += [
        gxe.ExpectColumnValuesToBeInSet(
            column="_image_off_grid",
            value_set=[""],
            description=f"image width and height are multiples of the patch grid {bounds.grid} "
            "(patch_size x spatial_merge_size)",
        ),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="question",
            min_value=1,
            max_value=bounds.max_question_chars,
            description=f"question has 1-{bounds.max_question_chars} characters",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="answer_type",
            value_set=list(ANSWER_TYPES),
            description=f"answer_type is one of {ANSWER_TYPES}",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="_task_answer_type",
            value_set=allowed_task_answer_types(),
            description="answer_type is one of its task's (generated tasks: vlgen.TASK_ANSWER_TYPES)",
        ),
        gxe.ExpectColumnValuesToMatchRegex(
            column="answer",
            regex=INT_REGEX,
            row_condition='answer_type=="int"',
            condition_parser="pandas",
            description='an "int" answer is a whole number ("42", "-3")',
        ),
        gxe.ExpectColumnValuesToMatchRegex(
            column="answer",
            regex=FLOAT_REGEX,
            row_condition='answer_type=="float"',
            condition_parser="pandas",
            description='a "float" answer is a decimal number ("7.5", "12")',
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="_answer_in_choices",
            value_set=[True],
            description='a "choice" answer is one of the row\'s choices (a list of strings)',
        ),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="answer",
            min_value=1,
            max_value=bounds.max_answer_chars,
            description=f"answer has 1-{bounds.max_answer_chars} characters",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="split", value_set=list(VL_SPLITS), description=f"split (when given) is one of {VL_SPLITS}"
        ),
    ]
    for field in ("question", "answer"):
        e.append(
            gxe.ExpectColumnValuesToNotMatchRegex(
                column=field,
                regex=CONTROL_CHARS_REGEX,
                description=f"{field} has no control characters (C0/C1, zero-width, bidi, BOM, U+FFFD)",
            )
        )
    return gx.ExpectationSuite(name=name, expectations=e)
