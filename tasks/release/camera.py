"""Serving the camera release (artifacts/privacy/ of the privacy stage): `edge` and `cloud` on Ray Serve.

    with start_camera("artifacts/privacy", port=8130) as session:
        result = send_clip(session.url, frames)   # uint8 [N, T, S, S, 3] -> edge -> cloud
        result.answers, result.sent_to_cloud      # the cloud's JSON; the exact bytes the cloud received

Wire format: safetensors bytes (`application/octet-stream`), never pickles.
- POST /edge: one uint8 tensor `frames` [N, T, S, S, 3] (the release's T and S) -> one float tensor
  `features` [N, k]: a sample of the mapping's release, and nothing else (no tower output, no mu).
- POST /cloud: exactly one tensor `features` that satisfies the release's `FeatureContract` ([N, k],
  dtype, finite), optionally header metadata `questions` (a JSON list of strings; default: the clips'
  standard questions) -> JSON {"behaviours": [...], "answers": [[[question, answer], ...], ...],
  "answered_by": "member" | "head"}. The answers are the deep member's (text, greedy) when the release
  has one, else they follow from the head's behaviour. A body that is not safetensors is refused with
  400, other or extra tensors, other metadata, raw pixels, a wrong shape or dtype with 422, a body over
  `MAX_BODY_BYTES` with 413.
The cloud replica loads only the release's cloud/ part (behaviour head, contract, deep member): it
holds no tower and no mapping. `GET /edge` and `GET /cloud` answer health. Why: docs/choices.md#privacy.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.stage import StageError
from tasks.release.serving import (
    ServingSession,
    _check_port_free,
    _start_serve,
    control_tokens,
    first_control_token,
)

log = logging.getLogger("ruyi.camera")

#: Largest request body either deployment reads.
MAX_BODY_BYTES = 64 << 20
#: Most questions one cloud request may ask, and the longest question.
MAX_QUESTIONS, MAX_QUESTION_CHARS = 16, 200
#: clips one edge request may send (the cloud's feature contract takes at most 4096 rows)
MAX_CLIPS = 4096
#: (clip, question) pairs one cloud request may have its deep member answer; they are decoded in chunks
MAX_ANSWER_ROWS, ANSWER_CHUNK = 1024, 64
EDGE_APP, CLOUD_APP = "camera-edge", "camera-cloud"


class WireError(ValueError):
    """A request body the deployment refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def encode_tensors(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes of `{name: tensor}` (with string `metadata` in the header, if given)."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def body_metadata(body: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors body that `decode_tensors` accepted ({} when it has none)."""
    size = int.from_bytes(body[:8], "little")
    return json.loads(body[8 : 8 + size]).get("__metadata__") or {}


def cloud_questions(body: bytes, control: tuple[str, ...] = ()) -> list[str] | None:
    """The questions a cloud request asks (header metadata `questions`: a JSON list of strings), None
    when it asks none (the standard questions are answered). WireError 422 on anything else, and on a
    question holding one of `control` (the member tokenizer's control tokens, `serving.control_tokens`:
    chat turns, image placeholders)."""
    meta = body_metadata(body)
    if set(meta) - {"questions"}:
        raise WireError(422, f"unexpected metadata {sorted(set(meta) - {'questions'})}: only 'questions'")
    if "questions" not in meta:
        return None
    try:
        questions = json.loads(meta["questions"])
    except ValueError:
        questions = None
    if (
        not isinstance(questions, list)
        or not 0 < len(questions) <= MAX_QUESTIONS
        or not all(isinstance(q, str) and q.strip() and len(q) <= MAX_QUESTION_CHARS for q in questions)
    ):
        raise WireError(
            422,
            f"metadata 'questions' must be a JSON list of 1-{MAX_QUESTIONS} non-empty strings of at most "
            f"{MAX_QUESTION_CHARS} characters",
        )
    for i, q in enumerate(questions):
        token = first_control_token(control, q)
        if token is not None:
            raise WireError(
                422, f"question {i} contains the control token {token!r}, which only the prompt may write"
            )
    return questions


def decode_tensors(body: bytes) -> dict:
    """The tensors of a safetensors body (WireError 400 if it is not one, 413 if too large)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if len(body) > MAX_BODY_BYTES:
        raise WireError(413, f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        return load(body)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise WireError(400, f"body is not a safetensors file: {e}") from None


def cloud_features(body: bytes, contract) -> Any:
    """The released features in a cloud request, checked against `contract` (WireError otherwise)."""
    from ruyi_model.privacy import FeatureContractError

    tensors = decode_tensors(body)
    if set(tensors) != {"features"}:
        raise WireError(422, f"expected exactly one tensor named 'features', got {sorted(tensors)}")
    try:
        return contract.check(tensors["features"], "features")
    except FeatureContractError as e:
        raise WireError(422, str(e)) from None


def _deployments(art_dir: str):
    import torch
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    async def read(request: Request) -> bytes:
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_BODY_BYTES:
            raise WireError(413, f"body of {size} bytes exceeds {MAX_BODY_BYTES}")
        body = bytearray()
        async for chunk in request.stream():  # a chunked upload states no length: stop at the limit
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise WireError(413, f"body exceeds {MAX_BODY_BYTES} bytes")
        return bytes(body)

    @serve.deployment(name="edge", max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.5})
    class Edge:
        """Frames in, mapped features out: the only place that sees pixels."""

        def __init__(self, art_dir: str) -> None:
            from ruyi_model.camera import load_edge

            torch.set_num_threads(1)
            self.encoder, self.mapping = load_edge(art_dir)
            self.generator = torch.Generator().manual_seed(int(time.time_ns() % (1 << 62)))

        async def __call__(self, request: Request):
            if request.method == "GET":
                return JSONResponse({"status": "ok", "role": "edge", "released_dim": self.mapping.out_dim})
            try:
                tensors = decode_tensors(await read(request))
                if set(tensors) != {"frames"}:
                    raise WireError(422, f"expected exactly one tensor named 'frames', got {sorted(tensors)}")
                try:
                    frames = self.encoder.check_frames(tensors["frames"])
                except ValueError as e:
                    raise WireError(422, str(e)) from None
                if len(frames) > MAX_CLIPS:
                    raise WireError(413, f"{len(frames)} clips exceed {MAX_CLIPS} per request")
                with torch.no_grad():
                    z = self.mapping.release(self.encoder(frames), generator=self.generator)
            except WireError as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            return Response(encode_tensors({"features": z}), media_type="application/octet-stream")

    @serve.deployment(name="cloud", max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.5})
    class Cloud:
        """Mapped features in, behaviours and answers out; never accepts anything else."""

        def __init__(self, art_dir: str) -> None:
            from ruyi_model.camera import load_cloud, load_cloud_member

            torch.set_num_threads(1)
            self.head, self.contract, self.behaviours = load_cloud(art_dir)
            self.member = load_cloud_member(Path(art_dir) / "cloud")
            # a head-only cloud answers only the standard questions (cloud_answers refuses any other)
            self.control = control_tokens(self.member.tokenizer) if self.member is not None else ()

        async def __call__(self, request: Request):
            if request.method == "GET":
                return JSONResponse(
                    {
                        "status": "ok",
                        "role": "cloud",
                        "contract": self.contract.to_dict(),
                        "answered_by": "member" if self.member is not None else "head",
                    }
                )
            try:
                body = await read(request)
                z = cloud_features(body, self.contract)
                questions = cloud_questions(body, self.control)
                with torch.no_grad():
                    pred = [self.behaviours[i] for i in self.head(z).argmax(-1).tolist()]
                answers = cloud_answers(self.member, z, pred, questions)
            except WireError as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            return JSONResponse(
                {
                    "behaviours": pred,
                    "answers": answers,
                    "answered_by": "member" if self.member is not None else "head",
                }
            )

    return Edge.bind(art_dir), Cloud.bind(art_dir)


def cloud_answers(member, z, behaviours: list[str], questions: list[str] | None) -> list[list[list[str]]]:
    """Per clip, `[question, answer]` pairs: the deep member's greedy answers from `z` when the release
    has one (any question), else the answers that follow from the head's predicted behaviour (the
    standard questions only: WireError 422 for another)."""
    from tasks.data.camgen import QUESTIONS, answers_for

    asked = list(questions or QUESTIONS)
    if member is None:
        unknown = [q for q in asked if q not in QUESTIONS]
        if unknown:
            raise WireError(422, f"this release's cloud (a behaviour head) answers only {list(QUESTIONS)}")
        return [[[q, dict(answers_for(b))[q]] for q in asked] for b in behaviours]
    rows = len(z) * len(asked)
    if rows > MAX_ANSWER_ROWS:
        raise WireError(
            413,
            f"{len(z)} clips x {len(asked)} questions = {rows} answers exceed {MAX_ANSWER_ROWS} per request: "
            "send fewer clips or questions at once",
        )
    features, prompts = z.repeat_interleave(len(asked), 0), asked * len(z)
    flat: list[str] = []
    for i in range(0, rows, ANSWER_CHUNK):  # bounded memory: the member decodes without a KV cache
        flat += member.answer(features[i : i + ANSWER_CHUNK], prompts[i : i + ANSWER_CHUNK])
    return [[[q, flat[i * len(asked) + j]] for j, q in enumerate(asked)] for i in range(len(z))]


def post_bytes(url: str, body: bytes, timeout: float = 60.0) -> tuple[int, bytes]:
    """POST `body` as application/octet-stream; `(status, response body)`, never raises on HTTP errors."""
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/octet-stream"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@dataclass
class CameraResult:
    answers: dict  # the cloud's JSON
    sent_to_cloud: bytes  # exactly what crossed from the edge to the cloud


def send_clip(url: str, frames, timeout: float = 60.0, questions: list[str] | None = None) -> CameraResult:
    """Sends clips (uint8 [N, T, S, S, 3]) to the edge and forwards the edge's bytes unchanged to the
    cloud; with `questions`, the edge's `features` tensor is re-sent unchanged with them in its header."""
    import torch

    status, released = post_bytes(f"{url}/edge", encode_tensors({"frames": torch.as_tensor(frames)}), timeout)
    if status != 200:
        raise StageError(f"edge refused the clip: HTTP {status}: {released[:300].decode(errors='replace')}")
    if questions is not None:
        released = encode_tensors(decode_tensors(released), {"questions": json.dumps(questions)})
    status, body = post_bytes(f"{url}/cloud", released, timeout)
    if status != 200:
        raise StageError(
            f"cloud refused the edge's features: HTTP {status}: {body[:300].decode(errors='replace')}"
        )
    return CameraResult(json.loads(body), released)


def _wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for role in ("edge", "cloud"):
        while True:
            try:
                with urllib.request.urlopen(f"{url}/{role}", timeout=5) as r:
                    if r.status == 200 and json.loads(r.read()).get("status") == "ok":
                        break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise StageError(f"camera {role} did not become ready at {url}/{role} in {timeout_s:.0f} s")
            time.sleep(0.3)


def start_camera(
    art_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8130,
    ray_num_cpus: int = 2,
    ready_timeout_s: float = 180.0,
) -> ServingSession:
    """Starts Ray (unless one runs), Serve on host:port, and both deployments (`/edge`, `/cloud`)."""
    from tasks.core.ray_runtime import RayRuntime

    art = _camera_dir(art_dir)
    _check_port_free(host, port)
    runtime = RayRuntime(num_cpus=ray_num_cpus, log_to_driver=False).start()
    client_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    session = ServingSession(f"http://{client_host}:{port}", runtime)
    try:
        _start_serve(host, port)
        add_camera(art, session.url, ready_timeout_s)
    except BaseException:
        session.stop()
        raise
    return session


def _camera_dir(art_dir: str | Path) -> Path:
    art = Path(art_dir).resolve()
    for part in ("edge/mapping.safetensors", "cloud/contract.json"):
        if not (art / part).is_file():
            raise StageError(f"{art}: not a camera release (missing {part}; the privacy stage writes it)")
    return art


def add_camera(art_dir: str | Path, url: str, ready_timeout_s: float = 180.0) -> None:
    """Deploys the camera's `/edge` and `/cloud` applications into the Serve instance already running at
    `url` (`start_camera`'s, or a `tasks.release.serving` session's: its app keeps `/`, Serve routes by
    the longest prefix), and waits until both answer."""
    from ray import serve

    art = _camera_dir(art_dir)
    edge, cloud = _deployments(str(art))
    # both applications deployed together (one wait, not two)
    serve.run_many(
        [
            serve.RunTarget(edge, name=EDGE_APP, route_prefix="/edge"),
            serve.RunTarget(cloud, name=CLOUD_APP, route_prefix="/cloud"),
        ]
    )
    _wait_ready(url, ready_timeout_s)
    log.info("camera edge and cloud serving %s at %s", art, url)
