"""Streaming (server-sent events) and the `speculative` tier of the serving app (tasks/release/serving.py),
driven by the official OpenAI client.

The app is the real one over a tiny real export whose shallow member is DaE-expanded and factored (so
tier `exit_2` runs low-rank weights): in-process through the client over Starlette's test transport for
the chunk format and the stream == non-stream equality on every tier, over a real HTTP server (uvicorn
on 127.0.0.1) for a client that disconnects mid-stream, and once on Ray Serve (slow).
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from local_http import free_port, serve_app
from starlette.testclient import TestClient
from tiny_export import build_tiny_export, private_tmpdir

from tasks.release.serving import CompletionService, _Decoding, create_app

PROMPT = "Tom has 3 apples and buys 4 more."
MESSAGES = [{"role": "user", "content": "What is 3 + 4?"}]
#: The live server's max_tokens limit: a decode that long takes far longer than noticing a disconnect.
LONG = 230


@pytest.fixture(scope="module")
def export_dir():
    with private_tmpdir("ruyi-streaming-export-") as tmp:
        yield build_tiny_export(tmp / "export", dae_blocks=1)


@pytest.fixture(scope="module")
def service(export_dir) -> CompletionService:
    return CompletionService(export_dir, model_name="tiny", max_tokens_limit=LONG)


@pytest.fixture(scope="module")
def client(service) -> openai.OpenAI:
    """The official client, its HTTP requests answered in-process by the app."""
    transport = TestClient(create_app(service))
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="none", http_client=transport, max_retries=0
    )


def _tiers(service) -> list[str]:
    return [*service.tier_names(), *service.aliases]


def test_speculative_tier_is_listed(client, service):
    models = {m.id: m.model_extra for m in client.models.list().data}
    assert "speculative" in models and models["speculative"]["draft_exit"] == 2
    assert models["speculative"]["draft_tokens"] == 16 and models["speculative"]["exit_layers"] == [2, 4]
    assert models["speculative"]["draft_threshold"] == 0.95 and models["speculative"]["draft_blocks"] is False
    assert models["exit_2"]["weights"] == "factored"  # the DaE member runs its low-rank copy


@pytest.mark.parametrize("tier", ["exit_2", "exit_4", "dynamic", "speculative", "tiny"])
def test_streamed_completion_equals_the_plain_one(client, tier):
    full = client.completions.create(model=tier, prompt=PROMPT, max_tokens=24)
    chunks = list(
        client.completions.create(
            model=tier, prompt=PROMPT, max_tokens=24, stream=True, stream_options={"include_usage": True}
        )
    )
    *content, last = chunks
    assert {c.id for c in chunks} == {chunks[0].id} and {c.object for c in chunks} == {"text_completion"}
    assert all(c.model == full.model for c in chunks)
    assert "".join(c.choices[0].text for c in content) == full.choices[0].text
    assert len(content) > 3  # text as it is decoded, not all at the end
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + [
        full.choices[0].finish_reason
    ]
    assert last.choices == [] and last.usage == full.usage
    assert all("usage" in c.to_dict() and c.usage is None for c in content)  # `"usage": null`, as OpenAI's
    assert last.model_extra["ruyi"]["tier"] == full.model
    # Without include_usage no usage chunk: the stats ride on the last content chunk.
    plain = list(client.completions.create(model=tier, prompt=PROMPT, max_tokens=24, stream=True))
    assert all(c.choices for c in plain) and plain[-1].choices[0].finish_reason
    assert "".join(c.choices[0].text for c in plain) == full.choices[0].text
    assert plain[-1].model_extra["ruyi"]["tier"] == full.model


@pytest.mark.parametrize("tier", ["exit_2", "exit_4", "dynamic", "speculative"])
def test_streamed_chat_equals_the_plain_one(client, tier):
    full = client.chat.completions.create(model=tier, messages=MESSAGES, max_tokens=20)
    chunks = list(
        client.chat.completions.create(
            model=tier, messages=MESSAGES, max_tokens=20, stream=True, stream_options={"include_usage": True}
        )
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    first, *content, last = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content for c in content) == full.choices[0].message.content
    assert content[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert last.choices == [] and last.usage == full.usage


def test_stop_strings_and_several_prompts_stream_like_the_plain_response(client):
    text = client.completions.create(model="exit_4", prompt=PROMPT, max_tokens=30).choices[0].text
    stop = text[12:14]
    prompts = [PROMPT, "A train travels"]
    full = client.completions.create(model="speculative", prompt=prompts, max_tokens=30, stop=stop)
    assert full.choices[0].text == text[: text.find(stop)] and full.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model="speculative",
            prompt=prompts,
            max_tokens=30,
            stop=stop,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for index, choice in enumerate(full.choices):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.text for c in mine) == choice.text
        assert mine[-1].finish_reason == choice.finish_reason
    assert chunks[-1].usage == full.usage


def test_speculative_tier_equals_the_deepest_member(client):
    deep = client.completions.create(model="exit_4", prompt=PROMPT, max_tokens=40)
    proposed = {}
    for extra in (
        {},
        {"draft_tokens": 1},
        {"draft_tokens": 7, "draft_threshold": 0},
        {"draft_exit": 2, "draft_tokens": 16},
        {"draft_tokens": 16, "draft_threshold": 0},
        {"draft_tokens": 16, "draft_threshold": 1},
        {"draft_blocks": True},
        {"draft_blocks": True, "draft_tokens": 16, "draft_threshold": 0},
        {"draft_blocks": False, "draft_tokens": 16, "draft_threshold": 0},
    ):
        spec = client.completions.create(model="speculative", prompt=PROMPT, max_tokens=40, extra_body=extra)
        assert spec.choices[0].text == deep.choices[0].text, extra
        assert spec.usage == deep.usage
        ruyi = spec.model_extra["ruyi"]
        assert ruyi["draft_exit"] == 2 and ruyi["draft_tokens"] == extra.get("draft_tokens", 16)
        assert ruyi["draft_threshold"] == extra.get("draft_threshold", 0.95)
        assert ruyi["draft_blocks"] is extra.get("draft_blocks", False)
        stats = ruyi["choices"][0]
        proposed[tuple(extra.items())] = (stats["proposed"], stats["target_forwards"])
        assert 0 <= stats["accepted"] <= stats["proposed"] and stats["target_forwards"] >= 1
        assert stats["acceptance_rate"] == pytest.approx(stats["accepted"] / stats["proposed"])
        assert stats["tokens_per_target_forward"] >= 1.0
    # The gate: threshold 1 drafts one token per round (the last round none), 0 the most each round.
    drafts, rounds = proposed[(("draft_tokens", 16), ("draft_threshold", 1))]
    assert drafts == rounds - 1
    drafts, rounds = proposed[(("draft_tokens", 16), ("draft_threshold", 0))]
    assert drafts > rounds
    # Sampling is speculative sampling: seeded, it repeats.
    a, b = (
        client.completions.create(model="speculative", prompt=PROMPT, max_tokens=12, temperature=0.8, seed=3)
        for _ in range(2)
    )
    assert a.choices[0].text == b.choices[0].text


@pytest.mark.parametrize(
    ("extra", "status", "param"),
    [
        ({"model": "speculative", "draft_exit": 4}, 400, "draft_exit"),
        ({"model": "speculative", "draft_exit": 3}, 400, "draft_exit"),
        ({"model": "speculative", "draft_tokens": 0}, 422, "draft_tokens"),
        ({"model": "speculative", "draft_tokens": 17}, 422, "draft_tokens"),
        ({"model": "speculative", "draft_tokens": "4"}, 422, "draft_tokens"),
        ({"model": "speculative", "draft_threshold": 1.5}, 422, "draft_threshold"),
        ({"model": "exit_4", "draft_threshold": 0.5}, 400, "draft_threshold"),
        ({"model": "exit_4", "draft_tokens": 2}, 400, "draft_tokens"),
        ({"model": "speculative", "draft_blocks": "no"}, 422, "draft_blocks"),
        ({"model": "exit_2", "draft_blocks": True}, 400, "draft_blocks"),
        ({"model": "dynamic", "draft_exit": 2}, 400, "draft_exit"),
        ({"model": "speculative", "threshold": 0.5}, 400, "threshold"),
        ({"model": "exit_4", "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"model": "exit_4", "stream": True, "stream_options": {"usage": True}}, 422, "stream_options.usage"),
        ({"model": "nope", "stream": True}, 404, "model"),
        ({"model": "exit_4", "stream": True, "max_tokens": LONG + 1}, 400, "max_tokens"),
    ],
)
def test_bad_requests_fail_before_any_stream(service, extra, status, param):
    """Validation errors are plain 4xx JSON errors naming the field, streamed request or not."""
    http = TestClient(create_app(service))
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, **extra})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["param"] == param and param.split(".")[0] in error["message"]


def test_official_client_raises_on_a_refused_stream(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="exit_9", prompt=PROMPT, stream=True)
    with pytest.raises(openai.BadRequestError, match="draft_exit"):
        client.chat.completions.create(
            model="speculative", messages=MESSAGES, stream=True, extra_body={"draft_exit": 4}
        )


def test_incremental_detokenization_of_multibyte_text_and_stop_strings(service):
    """The decoding hands out text only once no later token can change it: a character whose UTF-8 bytes
    span several byte-level tokens comes out whole, and nothing that may begin a stop string leaks."""
    tokenizer = service.tiers["exit_4"].tokenizer
    text = "Tom 苹果 éh 🍎 has 7 apples"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2  # the tiny BPE spells the non-ASCII characters byte by byte
    for stops, want in (([], text), (["has 7"], "Tom 苹果 éh 🍎 "), (["🍎"], "Tom 苹果 éh ")):
        decoding = _Decoding(tokenizer, [tokenizer.eos_token_id], stops, 100, threading.Event())
        deltas = []
        for token in ids:
            done = decoding.push([token])
            while not decoding._events.empty():
                deltas.append(decoding._events.get()[1])
            if done:
                break
        decoding.close()
        deltas += [value for kind, value in iter(decoding._events.get, ("end", None)) if kind == "text"]
        assert "".join(deltas) == want and decoding.text == want
        assert not any("\ufffd" in d for d in deltas)
        assert decoding.finish == ("stop" if stops else "length")


def test_openapi_documents_the_event_streams(service):
    """Both completion endpoints document text/event-stream events whose data is their chunk (or an error
    body, or [DONE]); Schemathesis validates real streams against it, event by event."""
    import schemathesis
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

    app = create_app(service)
    schemas = TestClient(app).get("/openapi.json").json()["components"]["schemas"]
    assert {"CompletionChunk", "ChatCompletionChunk", "ChatDelta"} <= set(schemas)
    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    for path, body in (
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", {"messages": MESSAGES}),
    ):
        content = api.raw_schema["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
        for tier in ("exit_2", "speculative"):
            stream = {
                "model": tier,
                "max_tokens": 6,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            case = api[path]["POST"].Case(body={**body, **stream})
            response = case.call_and_validate(checks=[response_schema_conformance, content_type_conformance])
            assert response.text.count("data: ") >= 4 and response.text.endswith("data: [DONE]\n\n")


# --- a real HTTP server ------------------------------------------------------------------------


def test_a_client_that_disconnects_mid_stream_frees_the_server(service):
    """A client reads one chunk and closes the connection: the decode stops (long before its max_tokens)
    and releases the decode lock, so the next request is answered at once."""
    with serve_app(create_app(service)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        t0 = time.perf_counter()
        whole = client.completions.create(model="exit_4", prompt="Tom", max_tokens=LONG)
        whole_s = time.perf_counter() - t0
        assert whole.usage.completion_tokens == LONG  # a random model runs to the limit
        before = len(service.cancelled_streams)
        stream = client.completions.create(model="exit_4", prompt="Tom", max_tokens=LONG, stream=True)
        first = next(iter(stream))
        assert first.choices[0].finish_reason is None
        stream.close()
        deadline = time.monotonic() + 30
        while len(service.cancelled_streams) == before:
            assert time.monotonic() < deadline, "the abandoned decode never stopped"
            time.sleep(0.01)
        assert service.cancelled_streams[-1] < LONG
        t0 = time.perf_counter()
        nxt = client.completions.create(model="exit_2", prompt=PROMPT, max_tokens=4)
        assert nxt.usage.completion_tokens == 4
        assert time.perf_counter() - t0 < max(5.0, 2 * whole_s)
        # The same over raw HTTP for a chat stream, a byte read and the socket dropped.
        before = len(service.cancelled_streams)
        with httpx.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json={"model": "speculative", "messages": MESSAGES, "max_tokens": LONG - 40, "stream": True},
            timeout=60,
        ) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            next(r.iter_raw())
        deadline = time.monotonic() + 30
        while len(service.cancelled_streams) == before:
            assert time.monotonic() < deadline, "the abandoned speculative decode never stopped"
            time.sleep(0.01)
        assert client.chat.completions.create(model="dynamic", messages=MESSAGES, max_tokens=3).choices


@pytest.mark.slow
def test_streaming_through_ray_serve(export_dir, client):
    """The real server: Ray Serve on 127.0.0.1 (`start_serving`), the official client streaming through
    Serve's HTTP proxy; the chunks add up to the in-process answers, and a client that disconnects leaves
    the server answering."""
    from tasks.release.serving import start_serving

    with start_serving(
        export_dir, host="127.0.0.1", port=free_port(), model_name="tiny", max_tokens_limit=64
    ) as session:
        real = openai.OpenAI(base_url=f"{session.url}/v1", api_key="none", max_retries=0, timeout=120)
        assert "speculative" in {m.id for m in real.models.list().data}
        for tier in ("speculative", "exit_2"):
            local = client.completions.create(model=tier, prompt=PROMPT, max_tokens=24)
            chunks = list(
                real.completions.create(
                    model=tier,
                    prompt=PROMPT,
                    max_tokens=24,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            assert len(chunks) > 3 and chunks[-1].usage == local.usage
            assert "".join(c.choices[0].text for c in chunks if c.choices) == local.choices[0].text
        local = client.chat.completions.create(model="dynamic", messages=MESSAGES, max_tokens=12)
        chunks = list(
            real.chat.completions.create(model="dynamic", messages=MESSAGES, max_tokens=12, stream=True)
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == local.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="draft_exit"):
            real.completions.create(
                model="speculative", prompt=PROMPT, stream=True, extra_body={"draft_exit": 4}
            )
        stream = real.completions.create(model="exit_4", prompt="Tom", max_tokens=64, stream=True)
        next(iter(stream))
        stream.close()
        t0 = time.perf_counter()
        after = real.completions.create(model="exit_2", prompt=PROMPT, max_tokens=4)
        assert after.usage.completion_tokens == 4 and time.perf_counter() - t0 < 30
