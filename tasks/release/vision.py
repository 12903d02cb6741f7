"""Images in chat requests to a vision-language release (`tasks.release.serving` uses it).

A release whose manifest says `"modality": "vision-language"` holds stock `Qwen3VLForConditionalGeneration`
members with their image-only processors (`ruyi_model.vl_processor`); `load_vl_member` loads one.
`decode_image_url` turns an OpenAI-style `image_url` part into a PIL image: only base64 data URLs
(`data:image/png;base64,...`) are read, from the request itself; any other URL (http, https, file, ...)
is refused and nothing is ever fetched (no code here opens a URL, and the processor only ever receives
decoded images). `vl_prompt_inputs` renders the chat and runs the processor. `vl_smoke_test` is the deploy
stage's image check: every member tier must answer an image request exactly as the exported stock member
does under plain transformers. Choices: docs/choices.md#serving.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tasks.core.files import LOAD_ERRORS
from tasks.core.stage import StageError

log = logging.getLogger("ruyi.serving")

#: The manifest's `modality` of a vision-language export (`ruyi_model.vl.export_vl_exits`).
VL_MODALITY = "vision-language"
#: The image types a data URL may declare, and the format Pillow must then find in its bytes.
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
#: The processor refuses images more elongated than this (Qwen2-VL's `smart_resize`).
MAX_ASPECT_RATIO = 200
_DATA_URL = re.compile(
    r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL | re.IGNORECASE
)


class ImageRejected(ValueError):
    """An image part the server will not read: HTTP `status`, error `code`, and the offending `param`."""

    def __init__(self, status: int, message: str, code: str, param: str):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


@dataclass(frozen=True)
class ImageLimits:
    """Per-request image limits (params.yaml `deploy.max_image_*`, `deploy.max_images_per_request`)."""

    max_image_bytes: int = 8 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images_per_request: int = 4


def is_vl_release(release_dir: str | Path) -> bool:
    """Whether the export/release at `release_dir` is vision-language (its manifest's `modality`)."""
    path = Path(release_dir) / "manifest.json"
    if not path.is_file():
        return False
    return json.loads(path.read_text()).get("modality") == VL_MODALITY


def load_vl_member(release_dir: str | Path, exit_layer: int, dtype: str = "float32"):
    """`(model, processor)` of member `exit_layer` of a vision-language release: the stock
    `Qwen3VLForConditionalGeneration` of `exit_<d>/` and its image-only processor (offline)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ruyi_model.vl_processor import Qwen3VLImageOnlyProcessor  # registers it with AutoProcessor

    path = Path(release_dir) / f"exit_{int(exit_layer)}"
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=getattr(torch, dtype), local_files_only=True
        )
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except LOAD_ERRORS as e:
        raise StageError(f"cannot load the vision-language member {path}: {e}") from None
    if not isinstance(processor, Qwen3VLImageOnlyProcessor):
        raise StageError(
            f"{path}: no image processor beside the member (got {type(processor).__name__}); "
            "re-export the family with its processor"
        )
    return model.eval(), processor


def decode_image_url(url: str, param: str, limits: ImageLimits):
    """The RGB image of a base64 data URL, checked against `limits`.

    Raises:
        ImageRejected: 400 for a URL that is not a data URL (nothing is fetched), not base64, of another
            type than PNG/JPEG/WebP, empty, undecodable or of zero or extreme size; 413 for an image over
            `max_image_bytes` or `max_image_pixels`. The message starts with `param`.
    """
    from PIL import Image, UnidentifiedImageError

    url = url.strip()
    if not url[:5].lower() == "data:":
        try:
            scheme = urlsplit(url[:64]).scheme
        except ValueError:  # e.g. an unbalanced IPv6 bracket ("http://[x"): still a URL we do not fetch
            scheme = url.split(":", 1)[0][:16] if ":" in url[:64] else ""
        raise ImageRejected(
            400,
            f"{param}: only base64 data URLs (data:image/png;base64,...) are accepted; this "
            f"{scheme + ':' if scheme else 'scheme-less'} URL was not fetched (this server never downloads "
            "images)",
            "image_url_not_allowed",
            param,
        )
    match = _DATA_URL.fullmatch(url)
    if match is None or "base64" not in [p.strip().lower() for p in match["params"].split(";")]:
        raise ImageRejected(
            400, f"{param}: a data URL must be data:<image type>;base64,<data>", "invalid_image_url", param
        )
    mime = match["mime"].strip().lower()
    if mime not in IMAGE_TYPES:
        raise ImageRejected(
            400,
            f"{param}: image type {mime or '(none)'!r} is not accepted; send one of {sorted(IMAGE_TYPES)}",
            "unsupported_image_type",
            param,
        )
    data = re.sub(r"\s+", "", match["data"])
    too_large = (
        f"{param}: the image exceeds this server's limit of {limits.max_image_bytes} bytes "
        "(deploy.max_image_bytes)"
    )
    if len(data) > 4 * (limits.max_image_bytes // 3 + 1):  # before decoding anything
        raise ImageRejected(413, too_large, "image_too_large", param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRejected(400, f"{param}: the data is not valid base64", "invalid_image", param) from None
    if not raw:
        raise ImageRejected(400, f"{param}: the image is empty (0 bytes)", "empty_image", param)
    if len(raw) > limits.max_image_bytes:
        raise ImageRejected(413, too_large, "image_too_large", param)
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR":  # Pillow only says "cannot identify"
        width, height = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
        if not width or not height:
            raise ImageRejected(
                400, f"{param}: the image is {width}x{height} pixels (empty)", "empty_image", param
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageRejected(
            413, f"{param}: the image has too many pixels (deploy.max_image_pixels)", "image_too_large", param
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageRejected(
            400, f"{param}: the data cannot be decoded as an image ({e})", "invalid_image", param
        ) from None
    if image.format != IMAGE_TYPES[mime]:
        raise ImageRejected(
            400,
            f"{param}: the URL declares {mime} but the data is {image.format or 'of an unknown type'}",
            "image_type_mismatch",
            param,
        )
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRejected(
            400, f"{param}: the image is {width}x{height} pixels (empty)", "empty_image", param
        )
    if width * height > limits.max_image_pixels:
        raise ImageRejected(
            413,
            f"{param}: the image is {width}x{height} = {width * height} pixels; this server takes at most "
            f"{limits.max_image_pixels} (deploy.max_image_pixels)",
            "image_too_large",
            param,
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageRejected(
            400,
            f"{param}: the image is {width}x{height} pixels; its aspect ratio must be below "
            f"{MAX_ASPECT_RATIO}",
            "invalid_image",
            param,
        )
    try:
        return image.convert("RGB")  # reads the pixels: a truncated or corrupt body fails here
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageRejected(
            400, f"{param}: the data cannot be decoded as an image ({e})", "invalid_image", param
        ) from None


#: What a Qwen3-VL chat template writes for an image part (the processor expands the pad to the image's
#: tokens).
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def render_vl_chat(tokenizer, messages: list[dict[str, Any]], n_images: int) -> str:
    """The chat as text: the tokenizer's template with the parts as they are when it renders every image
    as `IMAGE_PLACEHOLDER` (Qwen3-VL's templates do); otherwise (a text-only template) each message's
    parts flattened into one string, an image as the placeholder where it stands."""
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if text.count(IMAGE_PLACEHOLDER) == n_images:
            return text
    except Exception:  # a template that only takes string contents
        pass
    flat = [
        {
            **m,
            "content": m["content"]
            if isinstance(m["content"], str)
            else "".join(IMAGE_PLACEHOLDER if p["type"] == "image" else p["text"] for p in m["content"]),
        }
        for m in messages
    ]
    return tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)


def vl_prompt_inputs(processor, messages: list[dict[str, Any]], images: list) -> tuple[list[int], dict]:
    """`(input_ids, extra generate inputs)` of a chat for a Qwen3-VL member.

    Args:
        messages: `{"role", "content"}` with content a string or parts `{"type": "image"}` /
            `{"type": "text", "text": ...}` (one image part per entry of `images`, in order).
        images: decoded PIL images (never URLs: the processor could fetch those).

    Raises:
        ImageRejected: the processor refuses an image (param "messages").
        ValueError: the chat template rejects the conversation.
    """
    text = render_vl_chat(processor.tokenizer, messages, len(images))
    try:
        batch = processor(text=[text], images=images or None, return_tensors="pt")
    except ValueError as e:
        raise ImageRejected(
            400, f"messages: the images cannot be processed: {e}", "invalid_image", "messages"
        ) from None
    ids = batch.pop("input_ids")[0].tolist()
    batch.pop("attention_mask", None)
    return ids, dict(batch)


def image_data_url(png: bytes) -> str:
    """A PNG's bytes as a data URL (what a client sends)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def stock_member_answer(
    member_dir: str | Path, question: str, png: bytes, max_tokens: int
) -> tuple[str, int]:
    """`(text, completion tokens)`: plain transformers' greedy answer of the stock member at `member_dir`
    to a user turn of `png` then `question` (the serving tier's oracle; stop tokens as the server's)."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import ruyi_model.vl_processor  # noqa: F401  (registers the image-only processor)
    from ruyi_model.decoding import stop_token_ids

    model = AutoModelForImageTextToText.from_pretrained(member_dir, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(member_dir, local_files_only=True)
    tok = processor.tokenizer
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = render_vl_chat(tok, messages, 1)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    batch = processor(text=[text], images=[image], return_tensors="pt")
    stops = stop_token_ids(tok)
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )
    new = out[0, batch["input_ids"].shape[1] :].tolist()
    if new and new[-1] in stops:
        new = new[:-1]
    return tok.decode(new, skip_special_tokens=True), len(new)


def vl_smoke_test(url: str, export_root: str | Path, question: str, png: bytes, max_tokens: int) -> dict:
    """The deploy stage's image check: a chat request with `png` and `question` to every member tier of
    the app at `url`, whose answer must equal the exported stock member's (`stock_member_answer`).

    Returns:
        Per tier `{exit_layer, image_requests: 1, image_answer_matches_export: True,
        image_completion_tokens, image_answer}`.

    Raises:
        StageError: a tier answers with an error, or otherwise than its exported member.
    """
    from tasks.release.serving import http_json

    status, models = http_json(f"{url}/v1/models")
    if status != 200:
        raise StageError(f"image smoke test: {url}/v1/models answered {status}: {models}")
    out = {}
    content = [
        {"type": "image_url", "image_url": {"url": image_data_url(png)}},
        {"type": "text", "text": question},
    ]
    for entry in models["data"]:
        d = entry.get("exit_layer")
        if d is None:
            continue
        body = {
            "model": entry["id"],
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        status, answer = http_json(f"{url}/v1/chat/completions", body)
        if status != 200:
            raise StageError(f"image smoke test: tier {entry['id']} answered HTTP {status}: {answer}")
        got = answer["choices"][0]["message"]["content"]
        want, n_tokens = stock_member_answer(Path(export_root) / f"exit_{d}", question, png, max_tokens)
        if got != want or answer["usage"]["completion_tokens"] != n_tokens:
            raise StageError(
                f"image smoke test: tier {entry['id']} answered {got!r}, but the exported stock member "
                f"exit_{d} answers {want!r} (plain transformers, greedy)"
            )
        out[entry["id"]] = {
            "exit_layer": d,
            "image_requests": 1,
            "image_answer_matches_export": True,
            "image_completion_tokens": n_tokens,
            "image_answer": got,
        }
        log.info(
            "image smoke test: tier %s answers as its exported member (%d tokens)", entry["id"], n_tokens
        )
    return out


def vl_smoke_rows(checks: dict[str, dict[str, Any]], question_id: str) -> list[dict[str, Any]]:
    """`vl_smoke_test`'s answers to one eval item as smoke rows, `{tier, exit_layer, id, completion}` per
    tier: what `tasks.release.smoke.compare_with_evaluate` compares with evaluate's completions."""
    return [
        {"tier": tier, "exit_layer": c["exit_layer"], "id": question_id, "completion": c["image_answer"]}
        for tier, c in checks.items()
    ]


__all__ = [
    "VL_MODALITY",
    "IMAGE_PLACEHOLDER",
    "ImageLimits",
    "ImageRejected",
    "decode_image_url",
    "image_data_url",
    "is_vl_release",
    "load_vl_member",
    "render_vl_chat",
    "stock_member_answer",
    "vl_prompt_inputs",
    "vl_smoke_rows",
    "vl_smoke_test",
]
