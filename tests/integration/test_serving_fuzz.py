"""API fuzzing of the serving app (tasks/release/serving.py) with Schemathesis, over its own OpenAPI schema.

The app is the real one (`create_app` over a `CompletionService` on a tiny real export), driven in-process
through ASGI, and once more (fewer examples, slow) as the real server: Ray Serve on 127.0.0.1 over HTTP.
Every operation of FastAPI's /openapi.json gets schema-valid (positive) and, where it has a body,
schema-invalid (negative) requests, and each response (a streamed one event by event) must pass:

- `not_a_server_error`: no 5xx, whatever the request;
- `status_code_conformance`, `content_type_conformance`, `response_schema_conformance`: the status is
  documented and the body matches the documented schema (the completion, chat, model-list and health
  bodies; every error status is `ErrorResponse`);
- `negative_data_rejection`: a schema-invalid request gets a 4xx;
- `error_names_the_field` (below): every 4xx is the app's error shape and names the offending parameter.

Schemathesis' `positive_data_acceptance` is left out: a schema-valid request may still be refused with a
400 naming the parameter for rules a JSON schema cannot state (this server's max_tokens limit, `n`
unsupported, sampling on the greedy dynamic tier, prompt + max_tokens beyond the context).

Bounded and deterministic: a fixed number of examples per operation and mode, `derandomize=True`, no example
database; the server's `max_tokens_limit` is 4, so no request decodes more than 4 tokens.
Hypothesis drives the cases directly (`APIOperation.as_strategy`): Schemathesis 4.32's lazy pytest loader
(`schemathesis.pytest.from_fixture`) fails under pytest 9 (it sets `Node._nodeid`, which pytest 9 removed),
and a schema loaded at import time would build a release during test collection.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.testclient import TestClient
from tiny_export import build_tiny_export, private_tmpdir

from tasks.release.serving import CompletionService, create_app

#: Examples per operation and generation mode (the whole module runs in well under a minute on 2 cores).
MAX_EXAMPLES = 50
SEED = 20261203
#: Every operation of the app (the test checks that the OpenAPI schema lists exactly these).
OPERATIONS = [
    ("GET", "/healthz"),
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
]
RUNS = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if method == "POST" or mode is GenerationMode.POSITIVE  # the GETs take no parameters to negate
]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def error_names_the_field(ctx, response, case) -> None:
    """Schemathesis check: a 4xx is `{"error": {message, type, param, code}}` whose `param` names the
    offending parameter (`body` for the body as a whole) and whose message names it too."""
    if not 400 <= response.status_code < 500:
        return None
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"{response.status_code} with no JSON body: {response.text[:300]!r}") from None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        raise AssertionError(f"{response.status_code} without the error shape: {response.text[:300]!r}")
    message, param = error.get("message"), error.get("param")
    if not isinstance(message, str) or not message:
        raise AssertionError(f"{response.status_code} with no error message: {error!r}")
    if error.get("type") != "invalid_request_error" or not error.get("code"):
        raise AssertionError(f"{response.status_code} with a wrong error type or no code: {error!r}")
    if not isinstance(param, str) or not param:
        raise AssertionError(f"{response.status_code} names no parameter (error.param): {error!r}")
    field = param.split(".")[0]
    if field not in message:
        raise AssertionError(f"{response.status_code}: the message does not name {field!r}: {message!r}")
    return None


@pytest.fixture(scope="module")
def fuzz_service():
    with private_tmpdir("ruyi-fuzz-export-") as tmp:
        yield CompletionService(
            build_tiny_export(tmp / "export"),
            model_name="tiny",
            max_tokens_limit=4,
            max_prompts_per_request=4,
            max_total_new_tokens=12,
        )


@pytest.fixture(scope="module")
def api_schema(fuzz_service):
    config = SchemathesisConfig.from_dict({"seed": SEED})
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(fuzz_service), config=config)


def _fuzz(
    schema,
    method: str,
    path: str,
    mode: GenerationMode,
    models: list[str],
    checks: list,
    examples: int = MAX_EXAMPLES,
) -> dict:
    """Runs `examples` generated requests against `method path`; returns {status: count}. A failing check
    raises (Hypothesis shrinks it and reports the request as a curl command)."""
    operation = schema[path][method]
    statuses: dict[int, int] = {}

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case, data):
        # Random model names all get 404: half the time use a real tier, so requests reach the decoder.
        if models and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = data.draw(st.sampled_from([*models, case.body["model"]]), label="model")
        response = case.call_and_validate(checks=checks, additional_checks=[error_names_the_field])
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    run()
    return statuses


def test_schema_lists_every_operation(api_schema):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), RUNS, ids=lambda v: getattr(v, "value", v))
def test_fuzz_operation(api_schema, fuzz_service, method, path, mode):
    models = [*fuzz_service.tier_names(), *fuzz_service.aliases]
    statuses = _fuzz(api_schema, method, path, mode, models, CHECKS)
    assert sum(statuses.values()) >= (1 if method == "GET" else MAX_EXAMPLES // 2), statuses
    assert all(s < 500 for s in statuses), statuses
    if method == "POST":
        # Not vacuous: requests reached the decoder (200) and got rejected (4xx) in positive mode; every
        # negative one was rejected.
        if mode is GenerationMode.POSITIVE:
            assert statuses.get(200) and any(400 <= s < 500 for s in statuses), statuses
        else:
            assert all(400 <= s < 500 for s in statuses), statuses


@pytest.mark.slow
def test_fuzz_the_real_server_on_loopback():
    """The same checks against the real server: the Ray Serve app on 127.0.0.1 (HTTP through Serve's
    proxy, the schema read from its /openapi.json), fewer examples per run; the server is healthy after."""
    import socket

    from tasks.release.serving import http_json, start_serving

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with private_tmpdir("ruyi-fuzz-real-") as tmp:
        release = build_tiny_export(tmp / "export")
        with start_serving(
            release,
            host="127.0.0.1",
            port=port,
            model_name="tiny",
            max_tokens_limit=4,
            max_prompts_per_request=4,
            max_total_new_tokens=12,
        ) as session:
            config = SchemathesisConfig.from_dict({"seed": SEED})
            schema = schemathesis.openapi.from_url(f"{session.url}/openapi.json", config=config)
            status, listing = http_json(f"{session.url}/v1/models")
            assert status == 200, listing
            models = [m["id"] for m in listing["data"]]
            seen: dict[int, int] = {}
            for method, path, mode in RUNS:
                for code, n in _fuzz(schema, method, path, mode, models, CHECKS, examples=10).items():
                    seen[code] = seen.get(code, 0) + n
            assert seen.get(200) and all(code < 500 for code in seen), seen
            status, health = http_json(f"{session.url}/healthz")
            assert status == 200, health


class _CountBody(BaseModel):
    count: int


def test_the_field_check_catches_a_bare_error():
    """The custom check fails on FastAPI's stock 422 body (`{"detail": [...]}`, no `error.param`)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/count")
    def count(body: _CountBody) -> dict:
        return {"count": body.count}

    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_dict({}))
    with pytest.raises(FailureGroup, match="without the error shape"):
        _fuzz(schema, "POST", "/count", GenerationMode.NEGATIVE, [], [not_a_server_error])


# --- regressions found by the fuzzer ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(fuzz_service) -> TestClient:
    return TestClient(create_app(fuzz_service))


def test_omitted_max_tokens_never_exceeds_the_server_limit(client):
    # It was a 400 "max_tokens=16 exceeds this server's limit of 4" for a request that set no max_tokens.
    r = client.post("/v1/completions", json={"model": "exit_2", "prompt": "Tom has"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 4
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    # An explicit value above the limit is still refused, naming the field.
    r = client.post("/v1/completions", json={"model": "exit_2", "prompt": "Tom has", "max_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"\x15\xff\xfe{", 400, "invalid_body"),  # not UTF-8: was FastAPI's bare {"detail": ...}
        (b"{not json", 422, "invalid_request"),
        (b'["a list"]', 422, "invalid_request"),
        (b"", 422, "invalid_request"),
    ],
)
def test_bad_bodies_name_the_body(client, raw, status, code):
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert (error["param"], error["code"], error["type"]) == ("body", code, "invalid_request_error")
        assert error["message"].startswith("body")


def test_fastapi_errors_use_the_error_shape(client):
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert r.headers["allow"] == "POST"


def test_statuses_and_bodies_are_documented(client):
    """Each status an operation answers has a schema (which the fuzzing checks real responses against)."""
    paths = client.get("/openapi.json").json()["paths"]

    def schema(path, method, status):
        return paths[path][method]["responses"][status]["content"]["application/json"]["schema"]["$ref"]

    for path, body in (("/v1/completions", "CompletionResponse"), ("/v1/chat/completions", "ChatCompletion")):
        assert set(paths[path]["post"]["responses"]) == {"200", "400", "404", "413", "422"}
        assert schema(path, "post", "200").startswith(f"#/components/schemas/{body}")
        for status in ("400", "404", "413", "422"):
            assert schema(path, "post", status) == "#/components/schemas/ErrorResponse"
    assert schema("/healthz", "get", "200") == "#/components/schemas/Health"
    assert schema("/v1/models", "get", "200") == "#/components/schemas/ModelList"


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", True), ("max_tokens", "3"), ("max_tokens", 2.0), ("n", True), ("stream", 1), ("top_p", "1")],
)
def test_numbers_and_flags_are_not_coerced(client, field, value):
    # `"seed": true` was read as seed 1 and answered 200 (found by negative_data_rejection).
    r = client.post("/v1/completions", json={"model": "exit_2", "prompt": "hi", field: value})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == field and r.json()["error"]["message"].startswith(f"{field}:")
    assert (
        client.post("/v1/completions", json={"model": "exit_2", "prompt": "hi", "seed": 3}).status_code == 200
    )
