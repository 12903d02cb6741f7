"""Serving a vision-language release on real Ray Serve: images in `/v1/chat/completions`.

A tiny random `FamilialVLForConditionalGeneration` (exits 2 and 4) is exported with the real
`export_exits` and served by `start_serving` (Ray Serve, HTTP on 127.0.0.1). The oracle of every answer
is plain transformers: the exported stock `Qwen3VLForConditionalGeneration` member with its processor,
greedy `generate`. Bad images get 4xx naming the problem; a remote URL is refused and a local HTTP server
standing in for the remote host sees no request; an image sent to a text release (in-process app) is 400.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import urllib.request
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_export import build_tiny_export, private_tmpdir
from tiny_vl import tiny_qwen3_vl, tiny_vl_processor

from ruyi_model import FamilialVLForConditionalGeneration, export_exits
from tasks.release.serving import http_json, start_serving
from tasks.release.vision import vl_smoke_rows, vl_smoke_test

EXITS = [2, 4]
QUESTION = "how many triangles are there?"
IMAGE_URL = "messages.0.content.0.image_url.url"


def _png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _chat(model: str, *parts, max_tokens: int = 8, **extra) -> dict:
    """A chat request with one user message: a string alone, or parts (strings become text parts)."""
    if len(parts) == 1 and isinstance(parts[0], str):
        content = parts[0]
    else:
        content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        **extra,
    }


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _oracle(member_dir, png: bytes | None, text: str, max_tokens: int) -> str:
    """Greedy answer of the stock member (AutoModelForImageTextToText + AutoProcessor, the processor's
    own chat templating with the PIL image)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(member_dir).eval()
    processor = AutoProcessor.from_pretrained(member_dir)
    content = [{"type": "text", "text": text}]
    if png is not None:
        content.insert(0, {"type": "image", "image": Image.open(io.BytesIO(png)).convert("RGB")})
    batch = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    stops = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, eos_token_id=stops)
    new = out[0, batch["input_ids"].shape[1] :].tolist()
    return processor.tokenizer.decode([t for t in new if t not in stops], skip_special_tokens=True)


@pytest.fixture(scope="module")
def vl_release():
    with private_tmpdir("ruyi-vl-serving-") as tmp:
        family = FamilialVLForConditionalGeneration.from_qwen3_vl(tiny_qwen3_vl(seed=0), EXITS).eval()
        torch.manual_seed(1)
        with torch.no_grad():  # members differ from the truncated trunk
            for p in family.exits.parameters():
                p.add_(0.05 * torch.randn_like(p))
        export_exits(family, tmp / "export", tiny_vl_processor(family.config))
        yield tmp / "export"


@pytest.fixture(scope="module")
def url(vl_release):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    limits = dict(max_image_bytes=20_000, max_image_pixels=128 * 128, max_images_per_request=2)
    with start_serving(vl_release, port=port, model_name="tiny-vl", max_tokens_limit=16, **limits) as session:
        yield session.url


def test_an_image_per_tier_answers_as_the_stock_member(url, vl_release):
    status, health = http_json(f"{url}/healthz")
    assert status == 200 and health["modality"] == "vision-language"
    assert health["tiers"] == ["exit_2", "exit_4"]  # the family tiers are text-only: not served
    png = _png(64, 48)
    for d in EXITS:
        want = _oracle(vl_release / f"exit_{d}", png, QUESTION, 8)
        status, body = http_json(
            f"{url}/v1/chat/completions", _chat(f"exit_{d}", _image(_url(png)), QUESTION)
        )
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == want and body["ruyi"]["exit_layer"] == d
        assert body["usage"]["prompt_tokens"] > 12  # the image's 12 tokens are in the prompt
    # The release name is the deepest member; text-only messages (string or parts) work too.
    status, body = http_json(f"{url}/v1/chat/completions", _chat("tiny-vl", QUESTION))
    assert status == 200 and body["model"] == "exit_4", body
    assert body["choices"][0]["message"]["content"] == _oracle(vl_release / "exit_4", None, QUESTION, 8)
    # Streaming: the deltas add up to the same answer.
    request = json.dumps(_chat("exit_2", _image(_url(png)), QUESTION, stream=True)).encode()
    req = urllib.request.Request(
        f"{url}/v1/chat/completions", data=request, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert streamed == _oracle(vl_release / "exit_2", png, QUESTION, 8)
    # The deploy stage's image check (one generated-style image per tier) passes on this release.
    checks = vl_smoke_test(url, vl_release, QUESTION, _png(32, 32, seed=3), 6)
    assert sorted(checks) == ["exit_2", "exit_4"]
    assert all(c["image_answer_matches_export"] for c in checks.values())


def _zero_width_png() -> bytes:
    png = bytearray(_png(16, 16))
    png[16:20] = (0).to_bytes(4, "big")  # IHDR width, and the chunk's CRC to match
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
    return bytes(png)


@pytest.mark.parametrize(
    "image_url, status, code",
    [
        ("data:image/png;base64,!!not-base64!!", 400, "invalid_image"),
        (_url(b"this is not an image at all"), 400, "invalid_image"),
        (_url(_png(32, 32)[:200]), 400, "invalid_image"),  # truncated
        (_url(_zero_width_png()), 400, "empty_image"),  # 0 x 16 pixels
        ("data:image/png;base64,", 400, "empty_image"),
        (_url(_png(32, 32), "image/jpeg"), 400, "image_type_mismatch"),
        (_url(b"GIF89a", "text/plain"), 400, "unsupported_image_type"),
        ("data:image/png," + "x" * 10, 400, "invalid_image_url"),  # not base64
        (_url(_png(200, 100)), 413, "image_too_large"),  # 20000 pixels > 128 x 128
        (_url(_png(120, 120)), 413, "image_too_large"),  # 43 kB of noise > 20000 bytes
    ],
)
def test_bad_images_are_4xx_naming_the_problem(url, image_url, status, code):
    r_status, body = http_json(f"{url}/v1/chat/completions", _chat("exit_2", _image(image_url), QUESTION))
    assert r_status == status, body
    assert body["error"]["param"] == IMAGE_URL and body["error"]["message"].startswith(IMAGE_URL)
    assert body["error"]["code"] == code, body


def test_too_many_images_is_413(url):
    part = _image(_url(_png(16, 16)))
    status, body = http_json(f"{url}/v1/chat/completions", _chat("exit_2", part, part, part, QUESTION))
    assert status == 413 and body["error"]["code"] == "too_many_images", body
    assert body["error"]["param"] == "messages.0.content.2"


def test_remote_urls_are_refused_and_never_fetched(url, tmp_path):
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(_png(16, 16))

        def log_message(self, *args):
            pass

    remote = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=remote.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{remote.server_address[1]}"
    local_file = tmp_path / "cat.png"
    local_file.write_bytes(_png(16, 16))
    try:
        for image_url in (
            f"http://{host}/cat.png",
            f"  HTTPS://{host}/cat.png",
            f"//{host}/cat.png",
            local_file.as_uri(),
            f"ftp://{host}/cat.png",
            "http://[x",  # urlsplit raises on this: was a 500
        ):
            status, body = http_json(
                f"{url}/v1/chat/completions", _chat("exit_2", _image(image_url), QUESTION)
            )
            assert status == 400 and body["error"]["code"] == "image_url_not_allowed", (image_url, body)
            assert body["error"]["param"] == IMAGE_URL and "not fetched" in body["error"]["message"]
        assert hits == []  # the server never contacted the remote host
        with urllib.request.urlopen(f"http://{host}/probe.png", timeout=10) as r:  # the counter works
            assert r.status == 200
        assert hits == ["/probe.png"]
    finally:
        remote.shutdown()
        remote.server_close()


def test_an_image_to_a_text_release_is_400(tmp_path):
    from fastapi.testclient import TestClient

    from tasks.release.serving import CompletionService, create_app

    client = TestClient(
        create_app(CompletionService(build_tiny_export(tmp_path / "export"), model_name="tiny"))
    )
    assert client.get("/healthz").json()["modality"] == "text"
    r = client.post(
        "/v1/chat/completions",
        json=_chat("exit_2", {"type": "text", "text": "hi"}, _image(_url(_png(16, 16)))),
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "images_not_supported"
    assert r.json()["error"]["param"] == "messages.0.content.1"
    # Text parts alone are fine: the same answer as the message as a string.
    parts = client.post(
        "/v1/chat/completions", json=_chat("exit_2", {"type": "text", "text": "What is 3 + 4?"})
    )
    plain = client.post("/v1/chat/completions", json=_chat("exit_2", "What is 3 + 4?"))
    assert parts.status_code == plain.status_code == 200, parts.text
    assert parts.json()["choices"] == plain.json()["choices"]


def test_a_text_only_chat_template_gets_the_image_placeholders_inline():
    """The project's text chat template cannot render content parts: images become the placeholder where
    they stand, exactly what Qwen3-VL's template writes."""
    from tiny_vl import tiny_tokenizer

    from ruyi_model.tokenizer import CHAT_TEMPLATE
    from tasks.release.vision import render_vl_chat

    tok = tiny_tokenizer()  # its template renders parts
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many?"}]}]
    want = render_vl_chat(tok, messages, 1)
    assert "<|vision_start|><|image_pad|><|vision_end|>how many?" in want
    tok.chat_template = CHAT_TEMPLATE
    assert render_vl_chat(tok, messages, 1) == want


def test_a_drifted_chat_template_matches_its_export_but_not_evaluate(vl_release, tmp_path):
    """Why the VL deploy compares served answers with evaluate's too: a release whose members ship another
    chat template answers as its own exported stock member (the server and the oracle load the same
    drifted processor), so `vl_smoke_test` passes; evaluate's answers (the processor the family was
    trained with, here: the untouched export's) differ, and in float32 that stops the deploy."""
    import shutil

    from local_http import serve_app

    from tasks.core.stage import StageError
    from tasks.release.serving import CompletionService, create_app
    from tasks.release.smoke import check_same_as_evaluate, compare_with_evaluate

    pngs = {f"q{i}": _png(32, 32, seed=10 + i) for i in range(3)}
    evaluated = {
        (d, q): _oracle(vl_release / f"exit_{d}", png, QUESTION, 6) for d in EXITS for q, png in pngs.items()
    }
    drifted = tmp_path / "release"
    shutil.copytree(vl_release, drifted)
    templates = sorted(drifted.glob("exit_*/chat_template.jinja"))
    assert len(templates) == len(EXITS)
    for template in templates:
        template.write_text("<|im_start|>system\nAnswer in French.<|im_end|>\n" + template.read_text())
    rows = []
    with serve_app(create_app(CompletionService(drifted, model_name="tiny-vl"))) as url:
        for q, png in pngs.items():
            checks = vl_smoke_test(url, drifted, QUESTION, png, 6)  # passes: served = drifted export
            assert {t: c["exit_layer"] for t, c in checks.items()} == {"exit_2": 2, "exit_4": 4}
            rows += vl_smoke_rows(checks, q)
    compared = compare_with_evaluate(rows, evaluated, same_budget=True)
    assert {t: c["compared"] for t, c in compared.items()} == {"exit_2": 3, "exit_4": 3}
    differs = [t for t, c in compared.items() if c["same_as_evaluate"] < 1.0]
    assert differs, compared
    with pytest.raises(StageError, match=rf"tier {differs[0]} answered question q\d .*not marked validated"):
        check_same_as_evaluate(differs[0], compared[differs[0]], tmp_path / "generations.jsonl", strict=True)
    # the untouched release, through the same path, is evaluate's answer for answer
    rows = []
    with serve_app(create_app(CompletionService(vl_release, model_name="tiny-vl"))) as url:
        for q, png in pngs.items():
            rows += vl_smoke_rows(vl_smoke_test(url, vl_release, QUESTION, png, 6), q)
    assert {t: c["same_as_evaluate"] for t, c in compare_with_evaluate(rows, evaluated, True).items()} == {
        "exit_2": 1.0,
        "exit_4": 1.0,
    }
