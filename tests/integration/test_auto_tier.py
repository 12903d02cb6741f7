"""The `auto` tier of the serving app (tasks/release/serving.py): the route stage's router picks the
member per request, and that member answers exactly as its own tier does.

The app is the real one over a tiny real export (its shallow member DaE-expanded and factored) with a
router fitted on it, driven by the official OpenAI client in-process (Starlette's test transport): the
member choice against the router applied independently, thresholds 1 and ~0, streaming, chat, 4xx on bad
input, and a router of another family refused at start.
"""

from __future__ import annotations

import json

import openai
import pytest
from starlette.testclient import TestClient
from tiny_export import add_router, build_tiny_export, build_tiny_family, private_tmpdir, tiny_tokenizer

from tasks.core.stage import StageError
from tasks.release.router import ROUTER_FILE, Router, build_router, prompt_features
from tasks.release.serving import CompletionService, create_app

EASY, HARD = "Tom has 3 apples and buys 4 more.", "A train travels 60 km in 2 hours; how fast"
OTHERS = ["Mia reads 5 pages a day.", "What is 12 + 30?", "The river is long and"]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def export_dir():
    """A tiny export plus router.json: a probe fitted so that EASY scores high, HARD low."""
    with private_tmpdir("ruyi-auto-export-") as tmp:
        out = build_tiny_export(tmp / "export", dae_blocks=1)
        add_router(out, [EASY, HARD, *OTHERS], [1, 0, 1, 0, 1], threshold=0.5)
        yield out


@pytest.fixture(scope="module")
def service(export_dir) -> CompletionService:
    return CompletionService(export_dir, model_name="tiny", max_tokens_limit=64)


@pytest.fixture(scope="module")
def client(service) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1",
        api_key="none",
        http_client=TestClient(create_app(service)),
        max_retries=0,
    )


@pytest.fixture(scope="module")
def http(service) -> TestClient:
    return TestClient(create_app(service))


def _expected_member(service, text: str, threshold: float | None = None) -> int:
    """The router applied outside the app, to the prompt as the app encodes it."""
    router = service.router
    ids = _ids(service.family.tokenizer, text)
    return router.choose(prompt_features(service.family.model, [ids], router.probe_layers)[0], threshold)[0]


def test_auto_is_listed_with_its_threshold(client):
    models = {m.id: m.model_extra for m in client.models.list().data}
    assert models["auto"]["threshold"] == 0.5 and models["auto"]["probe_layers"] == 1
    assert models["auto"]["exit_layers"] == [2, 4]


def test_the_chosen_member_answers_exactly_as_its_own_tier(client, service):
    seen = set()
    for text in (EASY, HARD, *OTHERS):
        auto = client.completions.create(model="auto", prompt=text, max_tokens=24)
        choice = auto.model_extra["ruyi"]["choices"][0]
        member = _expected_member(service, text)
        assert choice["member"] == f"exit_{member}" and choice["exit_layer"] == member
        own = client.completions.create(model=f"exit_{member}", prompt=text, max_tokens=24)
        assert auto.choices[0].text == own.choices[0].text and auto.usage == own.usage
        assert choice["member_layers"] == service.router.costs[member] and choice["router_layers"] == 1
        assert set(choice["scores"]) == {"exit_2"} and 0.0 <= choice["scores"]["exit_2"] <= 1.0
        assert auto.model == "auto" and auto.model_extra["ruyi"]["threshold"] == 0.5
        seen.add(member)
    assert seen == {2, 4}  # the probe sends some prompts to each member


def test_threshold_extremes(client, service):
    deep = client.completions.create(model="auto", prompt=EASY, max_tokens=16, extra_body={"threshold": 1.0})
    choice = deep.model_extra["ruyi"]["choices"][0]
    assert choice["member"] == "exit_4" and choice["router_layers"] == 0 and choice["scores"] == {}
    assert (
        deep.choices[0].text
        == client.completions.create(model="exit_4", prompt=EASY, max_tokens=16).choices[0].text
    )
    cheap = client.completions.create(
        model="auto", prompt=HARD, max_tokens=16, extra_body={"threshold": 1e-12}
    )
    assert cheap.model_extra["ruyi"]["choices"][0]["member"] == "exit_2"
    assert cheap.model_extra["ruyi"]["threshold"] == 1e-12


def test_several_prompts_each_routed(client, service):
    r = client.completions.create(model="auto", prompt=[EASY, HARD], max_tokens=12)
    members = [c["member"] for c in r.model_extra["ruyi"]["choices"]]
    assert members == [f"exit_{_expected_member(service, t)}" for t in (EASY, HARD)]


def test_streamed_completion_and_chat_equal_the_plain_ones(client):
    full = client.completions.create(model="auto", prompt=HARD, max_tokens=24)
    chunks = list(
        client.completions.create(
            model="auto", prompt=HARD, max_tokens=24, stream=True, stream_options={"include_usage": True}
        )
    )
    *content, last = chunks
    assert "".join(c.choices[0].text for c in content) == full.choices[0].text
    assert last.choices == [] and last.usage == full.usage
    assert last.model_extra["ruyi"]["choices"] == full.model_extra["ruyi"]["choices"]
    messages = [{"role": "user", "content": EASY}]
    plain = client.chat.completions.create(model="auto", messages=messages, max_tokens=20)
    member = plain.model_extra["ruyi"]["choices"][0]["member"]
    own = client.chat.completions.create(model=member, messages=messages, max_tokens=20)
    assert plain.choices[0].message.content == own.choices[0].message.content
    streamed = list(
        client.chat.completions.create(model="auto", messages=messages, max_tokens=20, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == plain.choices[0].message.content
    assert streamed[-1].model_extra["ruyi"]["choices"][0]["member"] == member


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"model": "auto", "prompt": "hi", "threshold": 0}, 422, "invalid_request", "threshold"),
        ({"model": "auto", "prompt": "hi", "threshold": 1.5}, 422, "invalid_request", "threshold"),
        ({"model": "auto", "prompt": "hi", "threshold": "high"}, 422, "invalid_request", "threshold"),
        ({"model": "auto", "prompt": "hi", "draft_exit": 2}, 400, "unsupported_parameter", "draft_exit"),
        ({"model": "auto", "prompt": "hi", "max_tokens": 65}, 400, "max_tokens_too_large", "max_tokens"),
        ({"model": "auto", "prompt": ["ok", ""]}, 400, "invalid_prompt", None),
        ({"model": "auto", "prompt": "hi " * 250, "max_tokens": 64}, 400, "context_length_exceeded", None),
        ({"model": "exit_2", "prompt": "hi", "threshold": 0.5}, 400, "unsupported_parameter", "threshold"),
        ({"model": "auto", "prompt": "hi", "stream": True, "n": 2}, 400, "unsupported_parameter", "n"),
    ],
)
def test_bad_requests_are_4xx(http, body, status, code, param):
    r = http.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    if param is not None:
        assert param in (error.get("param") or "")


def test_no_router_no_auto_tier_and_a_foreign_router_is_refused(export_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(export_dir, bare)
    (bare / ROUTER_FILE).unlink()
    service = CompletionService(bare, model_name="tiny")
    assert "auto" not in service.tier_names()
    r = TestClient(create_app(service)).post("/v1/completions", json={"model": "auto", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

    # a router fitted on another family (other weights): the server does not start
    other, _ = build_tiny_family(tiny_tokenizer(), seed=5, exit_layers=(2, 4), dae_blocks=1)
    router = Router.load(export_dir / ROUTER_FILE)
    foreign = build_router(other, router.probes, 1, 0.5, list(router.check_ids))
    foreign.save(bare / ROUTER_FILE)
    with pytest.raises(StageError, match="cannot serve the auto tier.*other weights"):
        CompletionService(bare, model_name="tiny")
    raw = json.loads((bare / ROUTER_FILE).read_text())
    raw["threshold"] = 2.0
    (bare / ROUTER_FILE).write_text(json.dumps(raw))
    with pytest.raises(StageError, match="threshold 2.0 is not in"):
        CompletionService(bare, model_name="tiny")
