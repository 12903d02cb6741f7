"""Serving a release with Ray Serve: an OpenAI-style API in which the `model` field picks the exit tier.

    ruyi serve [--version V] [--host H] [--port P]   # fetch a release, serve until Ctrl-C
    serve deploy infra/serve_config.yaml             # on a running Ray cluster

Endpoints: GET /healthz, GET /v1/models, POST /v1/completions, POST /v1/chat/completions. Tiers: `exit_<d>`
(stock Qwen3; the DaE member's factored copy, which runs its low-rank weights, where the release has one),
the release's model name (the deepest member), and over the family `dynamic` (confidence-based early exit),
`speculative` (a shallow member drafts, the deepest verifies: exactly the deepest member's greedy output)
and, where the release ships the route stage's `router.json`, `auto` (per request the router picks the
member, which then decodes exactly as its own tier would; `tasks.release.router`).
`stream: true` answers with server-sent events in OpenAI's chunk format (text as it is decoded; a client
that disconnects stops its decode). Bad requests get 4xx, before any stream starts (NaN/infinite numbers
422, invalid Unicode 400, too many prompts 413, too many new tokens 422), each an OpenAI-shaped error
body whose `param` names the offending field (`ErrorResponse`, documented in the OpenAPI schema).
A vision-language release (stock Qwen3-VL members) takes OpenAI-style `image_url` content parts in chat
messages: base64 data URLs only, never fetched; bad images get 4xx (`tasks.release.vision`); its tiers are
the members and the release name. A text release refuses image parts with 400.
Design, streaming and request validation: docs/choices.md#serving.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import queue
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.core.params import (
    DYNAMIC_THRESHOLD,
    SPECULATIVE_DRAFT_BLOCKS,
    SPECULATIVE_DRAFT_THRESHOLD,
    SPECULATIVE_DRAFT_TOKENS,
)
from tasks.core.ray_runtime import RayRuntime
from tasks.core.stage import StageError
from tasks.release.store import MANIFEST_NAME, load_member, release_exits
from tasks.release.vision import (
    VL_MODALITY,
    ImageLimits,
    ImageRejected,
    decode_image_url,
    is_vl_release,
    load_vl_member,
    vl_prompt_inputs,
)

if TYPE_CHECKING:
    from tasks.core.params import DeployParams

log = logging.getLogger("ruyi.serving")

DYNAMIC_TIER = "dynamic"
SPECULATIVE_TIER = "speculative"
AUTO_TIER = "auto"
#: The most tokens a speculative request may draft per round (`draft_tokens`).
MAX_DRAFT_TOKENS = 16
APP_NAME = "ruyi"
DEPLOYMENT_NAME = "RuyiFamily"


# --- request and response models ---------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(
        False, strict=True, description="a last chunk with `usage` and no choices before `data: [DONE]`"
    )


class _GenerationFields(BaseModel):
    # NaN/inf are no valid float (a 422 naming the field, not a comparison that lets them through).
    # Numbers and flags are strict: `"seed": true`, `"max_tokens": "5"` or `"stream": 1` are 422s, not
    # silently read as 1, 5 and true (an integer field takes no 2.0 either; a float field takes ints).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        # OpenAI's API reads `null` as "not given" for its optional parameters (clients that serialise
        # every field send them): such a field takes its default, and a required one stays missing.
        if isinstance(data, dict):
            optional = cls._optional_fields()
            return {k: v for k, v in data.items() if v is not None or k not in optional}
        return data

    @classmethod
    @functools.cache
    def _optional_fields(cls) -> frozenset[str]:
        """The fields with a default (per request class, computed once)."""
        return frozenset(name for name, field in cls.model_fields.items() if not field.is_required())

    @property
    def token_budget_param(self) -> str:
        """The name under which the client sent the token budget (errors name what was sent)."""
        return "max_tokens"

    model: str = Field(
        description=(
            "the tier: exit_<d>, the release name (deepest member), 'dynamic', 'speculative' or 'auto'"
        )
    )
    max_tokens: int = Field(
        16,
        ge=1,
        strict=True,
        description="new tokens at most (<= deploy.max_tokens_limit; omitted: 16 or that limit)",
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, strict=True, description="0: greedy; > 0: sampling")
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True)
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the completion")
    seed: int | None = Field(
        None,
        ge=0,
        le=2**64 - 1,
        strict=True,
        description="makes sampling repeatable (0 to 2^64 - 1, torch's range)",
    )
    n: int = Field(1, ge=1, strict=True, description="completions per prompt (only 1 is supported)")
    stream: bool = Field(
        False, strict=True, description="true: server-sent events (OpenAI's chunks), then `data: [DONE]`"
    )
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    threshold: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        strict=True,
        description="dynamic tier: exit confidence threshold; auto tier: router threshold (1: the deepest)",
    )
    draft_exit: int | None = Field(
        None, ge=1, strict=True, description="speculative tier: the drafting member (a shallower exit)"
    )
    draft_tokens: int | None = Field(
        None, ge=1, le=MAX_DRAFT_TOKENS, strict=True, description="speculative tier: tokens drafted per round"
    )
    draft_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        strict=True,
        description="speculative tier: a round stops drafting after a token the draft gives a probability "
        "below this (0: always draft_tokens)",
    )
    draft_blocks: bool | None = Field(
        None,
        strict=True,
        description="speculative tier: false drafts without the drafting member's DaE blocks (its layers "
        "before expansion), true with them",
    )
    user: str | None = None


class CompletionRequest(_GenerationFields):
    """`POST /v1/completions`: raw prompt text (one string or a list)."""

    prompt: str | list[str] = Field(min_length=1)


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="a base64 data URL (data:image/png;base64,...); other URLs are refused")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted and ignored")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    """An image (vision-language releases only; tasks.release.vision)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="developer: OpenAI's newer name of system, rendered as a system turn"
    )
    content: str | list[ContentPart] = Field(
        description="text, or OpenAI-style parts: text and (vision-language releases) image_url"
    )


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatCompletionRequest(_GenerationFields):
    """`POST /v1/chat/completions`: messages rendered with the release's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        None, ge=1, strict=True, description="OpenAI's newer name of max_tokens (either; both must agree)"
    )

    @model_validator(mode="after")
    def _one_token_budget(self) -> ChatCompletionRequest:
        budget = self.max_completion_tokens
        if budget is not None:
            if "max_tokens" in self.model_fields_set and self.max_tokens != budget:
                raise ValueError(
                    f"max_tokens ({self.max_tokens}) and max_completion_tokens ({budget}) differ; send one"
                )
            self.max_tokens = budget
        return self

    @property
    def token_budget_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class ErrorDetail(BaseModel):
    message: str = Field(description="what is wrong; starts with or names the offending parameter")
    type: Literal["invalid_request_error", "server_error"]
    param: str | None = Field(description="the offending parameter ('body': the body as a whole)")
    code: str


class ErrorResponse(BaseModel):
    """The body of every error response (OpenAI's shape); 422s add pydantic's `detail` list."""

    error: ErrorDetail
    detail: list[dict[str, Any]] | None = None


# Response bodies, for the OpenAPI schema only (the routes return plain dicts; the fuzzing test checks
# that real responses match these).
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ServingInfo(BaseModel):
    """`ruyi`: which release and tier answered; the dynamic tier adds its threshold and per-choice stats
    (tokens per member), the speculative tier its draft member, draft length and per-choice acceptance,
    the auto tier its threshold and per choice the member that answered (and the router's scores)."""

    release: str
    tier: str
    exit_layer: int | None
    processing_ms: float
    threshold: float | None = None
    draft_exit: int | None = None
    draft_tokens: int | None = None
    draft_threshold: float | None = None
    draft_blocks: bool | None = None
    choices: list[dict[str, Any]] | None = None


class CompletionChoice(BaseModel):
    text: str
    index: int
    finish_reason: Literal["stop", "length"]
    logprobs: None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str = Field(description="the tier that answered (an alias resolved)")
    choices: list[CompletionChoice]
    usage: Usage
    ruyi: ServingInfo


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str = Field(description="the tier that answered (an alias resolved)")
    choices: list[ChatChoice]
    usage: Usage
    ruyi: ServingInfo


class CompletionChunkChoice(BaseModel):
    text: str
    index: int
    finish_reason: Literal["stop", "length"] | None
    logprobs: None


class CompletionChunk(BaseModel):
    """One `data:` event of a streamed completion (`usage` and `ruyi` on the last one)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None
    ruyi: ServingInfo | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion (the role first; `usage` and `ruyi` last)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    ruyi: ServingInfo | None = None


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _ok_response(model: type[BaseModel], chunk: type[BaseModel]) -> dict[str, Any]:
    """A 200 of a completion endpoint: JSON, or with `stream: true` server-sent `chunk`s. The event-stream
    schema describes one event (OpenAPI 3.1): its data is a chunk as JSON (an error body if decoding
    fails mid-stream), the last one `[DONE]`; `create_app` adds the chunk schemas to the components."""
    data = {
        "type": "string",
        "anyOf": [
            {"const": "[DONE]"},
            {
                "contentMediaType": "application/json",
                "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]},
            },
        ],
    }
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": data, "event": {"type": "string"}},
    }
    return {
        "model": model,
        "description": f"the completion (JSON); with stream: true, server-sent {chunk.__name__} events",
        "content": {"text/event-stream": {"schema": event}},
    }


#: The schemas the event streams refer to (no route returns them, so FastAPI does not list them itself).
_CHUNK_MODELS = (CompletionChunk, ChatCompletionChunk)


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[dict[str, Any]] = Field(description="one entry per tier (layers, parameters), then aliases")


class Health(BaseModel):
    status: Literal["ok"]
    release: str
    tiers: list[str]
    device: str
    modality: Literal["text", "vision-language"]


#: The error statuses of the completion endpoints, documented in the OpenAPI schema.
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "a request this server or tier cannot serve"},
    404: {"model": ErrorResponse, "description": "unknown model (tier)"},
    413: {"model": ErrorResponse, "description": "too many prompts or images, or an image too large"},
    422: {"model": ErrorResponse, "description": "a request that does not match the schema"},
}


class APIError(Exception):
    """An invalid request: HTTP `status` with an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --- the model side ----------------------------------------------------------------------------
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|list|dict|none)$|\[")


def _field_path(loc) -> list[str]:
    """A pydantic error location as the request's field path: the union branches pydantic names
    (`str`, `list[...]`, `tagged-union[...]`) dropped, and a tagged union's tag, which repeats the field it
    selects (`content.0.image_url.image_url.url`), said once."""
    path: list[str] = []
    for part in map(str, loc):
        if _UNION_BRANCH.search(part) or (path and part == path[-1] and not part.isdigit()):
            continue
        path.append(part)
    return path


def control_tokens(tokenizer) -> tuple[str, ...]:
    """The tokenizer's special tokens (`<|im_start|>`, `<|im_end|>`, image placeholders, ...): text that the
    chat template's own markup is made of (also the camera cloud's question check)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = {t.content for t in added.values() if getattr(t, "special", False)}
    specials.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return tuple(sorted(t for t in specials if t))


def first_control_token(tokens: tuple[str, ...], text: str) -> str | None:
    """The first of `tokens` (from `control_tokens`) that `text` holds, or None."""
    return next((t for t in tokens if t in text), None)


def _refuse_control_tokens(tier: Tier, text: str, param: str) -> None:
    """A message whose text holds a control token would forge chat turns (`...<|im_end|>\n<|im_start|>system
    ...`: the rendered prompt is tokenized with special tokens parsed) or break a VL prompt's image count:
    a 400 naming the field and the token."""
    token = first_control_token(tier.control_tokens, text)
    if token is not None:
        raise APIError(
            400,
            f"{param} contains the control token {token!r}, which only the chat template may write",
            "invalid_content",
            param,
        )


@dataclass
class Tier:
    name: str
    exit_layer: int | None  # None: a tier over the whole family (dynamic, speculative, auto)
    model: Any
    tokenizer: Any
    kind: Literal["member", "dynamic", "speculative", "auto"] = "member"
    processor: Any = None  # a vision-language member's processor (tokenizer + image processor)

    @functools.cached_property
    def control_tokens(self) -> tuple[str, ...]:
        """The tier tokenizer's control tokens, found once (every chat message is checked against them)."""
        return control_tokens(self.processor.tokenizer if self.processor is not None else self.tokenizer)

    @property
    def text_config(self):
        """The decoder's config (a vision-language member's `text_config`)."""
        return self.model.config.get_text_config()

    @property
    def num_parameters(self) -> int:
        """The parameters this tier runs (for a factored tier: its low-rank factors, not the dense count)."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def factored(self) -> bool:
        """A member tier served from its factored copy (a one-member familial model), not a stock Qwen3."""
        from ruyi_model import FamilialForCausalLM

        return self.exit_layer is not None and isinstance(self.model, FamilialForCausalLM)

    @property
    def num_layers(self) -> int:
        """Decoder layers the tier runs (for the dynamic tier: the family's backbone depth)."""
        cfg = self.model.config
        return cfg.member_num_layers(self.exit_layer) if self.factored else self.text_config.num_hidden_layers


class CompletionService:
    """Loads every tier of a release directory and answers completion requests (no HTTP, no Ray).

    Args:
        release_dir: a fetched release (or an export directory): `exit_<d>/`, optionally
            `exit_<d>_factored/` (then tier `exit_<d>` serves it: `store.load_member`) and `family/`.
        model_name: the release's name (an alias of the deepest member); default from its MANIFEST.json.
        max_tokens_limit: requests asking for more new tokens get 400.
        max_prompts_per_request: a completion request with more prompts gets 413.
        max_total_new_tokens: a request whose prompts x max_tokens exceed it gets 422.
        dynamic_threshold: the default `threshold` of the dynamic tier.
        torch_threads: intra-op threads for this process (1 on shared CPUs).
        device: "cpu", "cuda", "cuda:1", or "auto" (cuda when available).
        dtype: weights dtype ("float32"; "bfloat16" for large members on GPUs).
        speculative_draft_exit: the speculative tier's default drafting member (default: the shallowest).
        speculative_draft_tokens: the speculative tier's default most tokens drafted per round.
        speculative_draft_threshold: the speculative tier's default draft confidence threshold (a round
            stops drafting after a token the draft gives a probability below it; 0: always the most).
        speculative_draft_blocks: whether the drafting member runs its DaE blocks by default (False: it
            drafts with its layers before expansion, a cheaper draft; no effect on a member without blocks).
        max_image_bytes, max_image_pixels, max_images_per_request: image limits of a vision-language
            release (`tasks.release.vision`; larger images or more of them get 413).

    A release with `family/` and `router.json` also serves `auto` (the router is checked against the
    family first: a router calibrated on other weights is an error). A vision-language release (manifest
    `modality`) serves its stock Qwen3-VL members (`exit_<d>` and the release name) and takes images in
    chat messages; the tiers over the whole family are text-only and not served for it.
    """

    def __init__(
        self,
        release_dir: str | Path,
        *,
        model_name: str | None = None,
        max_tokens_limit: int = 128,
        dynamic_threshold: float = DYNAMIC_THRESHOLD,
        torch_threads: int | None = 1,
        device: str = "cpu",
        dtype: str = "float32",
        max_prompts_per_request: int = 16,
        max_total_new_tokens: int = 4096,
        speculative_draft_exit: int | None = None,
        speculative_draft_tokens: int = SPECULATIVE_DRAFT_TOKENS,
        speculative_draft_threshold: float = SPECULATIVE_DRAFT_THRESHOLD,
        speculative_draft_blocks: bool = SPECULATIVE_DRAFT_BLOCKS,
        max_image_bytes: int = ImageLimits.max_image_bytes,
        max_image_pixels: int = ImageLimits.max_image_pixels,
        max_images_per_request: int = ImageLimits.max_images_per_request,
    ):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.release_dir = Path(release_dir)
        exits = release_exits(self.release_dir)
        if not exits:
            raise StageError(f"{self.release_dir}: no exit_<d>/ member checkpoints to serve")
        manifest_path = self.release_dir / MANIFEST_NAME
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        self.model_name = model_name or manifest.get("model") or self.release_dir.name
        self.version = manifest.get("version")
        self.release = f"{self.model_name}/{self.version}" if self.version else self.model_name
        self.max_tokens_limit = max_tokens_limit
        self.max_prompts_per_request = max_prompts_per_request
        self.max_total_new_tokens = max_total_new_tokens
        self.dynamic_threshold = dynamic_threshold
        self.image_limits = ImageLimits(max_image_bytes, max_image_pixels, max_images_per_request)
        self.vision = is_vl_release(self.release_dir)  # the export's manifest.json (in every release)
        self.tiers: dict[str, Tier] = {}
        for d in exits:
            if self.vision:
                model, processor = load_vl_member(self.release_dir, d, dtype=dtype)
                tier = Tier(f"exit_{d}", d, model.to(self.device), processor.tokenizer, processor=processor)
            else:
                model, tokenizer = load_member(self.release_dir, d, dtype=dtype)
                tier = Tier(f"exit_{d}", d, model.to(self.device), tokenizer)
            self.tiers[f"exit_{d}"] = tier
        self.aliases = {self.model_name: f"exit_{exits[-1]}"}
        # Tiers over the whole family (one model, shared): dynamic early exit; speculative decoding where
        # the family has a member shallower than its deepest to draft with.
        self.family: Tier | None = None
        self.family_tiers: dict[str, Tier] = {}
        self.draft_exit: int | None = None
        self.router = None
        if not 1 <= speculative_draft_tokens <= MAX_DRAFT_TOKENS:
            raise StageError(
                f"speculative_draft_tokens={speculative_draft_tokens}: must be in [1, {MAX_DRAFT_TOKENS}]"
            )
        self.draft_tokens = speculative_draft_tokens
        if not 0.0 <= speculative_draft_threshold <= 1.0:
            raise StageError(f"speculative_draft_threshold={speculative_draft_threshold}: must be in [0, 1]")
        self.draft_threshold = float(speculative_draft_threshold)
        if not isinstance(speculative_draft_blocks, bool):
            raise StageError(f"speculative_draft_blocks={speculative_draft_blocks!r}: must be true or false")
        self.draft_blocks = speculative_draft_blocks
        if (self.release_dir / "family").is_dir() and not self.vision:
            model, tokenizer = load_member(self.release_dir, None, dtype=dtype)
            model = model.to(self.device)
            self.family = Tier(DYNAMIC_TIER, None, model, tokenizer, kind="dynamic")
            self.family_tiers[DYNAMIC_TIER] = self.family
            drafts = list(model.config.exit_layers)[:-1]
            if speculative_draft_exit is not None and speculative_draft_exit not in drafts:
                raise StageError(
                    f"speculative_draft_exit={speculative_draft_exit}: the draft must be a member "
                    f"shallower than the deepest, one of {drafts}"
                )
            if drafts:
                self.draft_exit = speculative_draft_exit or drafts[0]
                self.family_tiers[SPECULATIVE_TIER] = Tier(
                    SPECULATIVE_TIER, None, model, tokenizer, kind="speculative"
                )
            self.router = self._load_router(model)
            if self.router is not None:
                self.family_tiers[AUTO_TIER] = Tier(AUTO_TIER, None, model, tokenizer, kind="auto")
        self._lock = threading.Lock()
        #: Streams whose client went away before the end, and the tokens each had decoded then.
        # tokens decoded by each of the last 64 streams whose client went away (a long-lived replica keeps
        # only these, for the health of the service and its tests)
        self.cancelled_streams: collections.deque[int] = collections.deque(maxlen=64)
        log.info("serving %s: tiers %s", self.release, ", ".join(self.tier_names()))

    def _load_router(self, family):
        """The release's router (`router.json`), checked against `family`; None when it has none."""
        from tasks.release.router import ROUTER_FILE, Router

        path = self.release_dir / ROUTER_FILE
        if not path.is_file():
            return None
        try:
            router = Router.load(path)
            router.check_model(family)
        except ValueError as e:
            raise StageError(f"{path}: cannot serve the auto tier: {e}") from None
        missing = [d for d in router.exit_layers if f"exit_{d}" not in self.tiers]
        if missing:
            raise StageError(f"{path}: the router routes to members {missing} that the release lacks")
        return router

    # catalogue --------------------------------------------------------------------------------
    @property
    def max_body_bytes(self) -> int:
        """The largest request body read: the most images a request may carry, each at the size limit
        as base64 (4/3 of its bytes), plus 1 MiB for text and JSON. A longer body gets 413 before it is
        parsed (a prompt that long exceeds any member's context anyway)."""
        lim = self.image_limits
        return lim.max_images_per_request * math.ceil(lim.max_image_bytes * 4 / 3) + 2**20

    def tier_names(self) -> list[str]:
        return list(self.tiers) + list(self.family_tiers)

    def models(self) -> dict[str, Any]:
        data = []
        for tier in [*self.tiers.values(), *self.family_tiers.values()]:
            cfg = tier.model.config
            entry = {
                "id": tier.name,
                "object": "model",
                "owned_by": "ruyi",
                "root": self.release,
                "exit_layer": tier.exit_layer,
                "num_parameters": tier.num_parameters,
                "num_hidden_layers": tier.num_layers,
                "max_context": tier.text_config.max_position_embeddings,
                "input_modalities": ["text", "image"] if tier.processor is not None else ["text"],
            }
            if tier.exit_layer is not None:
                entry["weights"] = "factored" if tier.factored else "dense"
            else:
                entry["exit_layers"] = list(cfg.exit_layers)
            if tier.kind == "speculative":
                entry.update(
                    draft_exit=self.draft_exit,
                    draft_tokens=self.draft_tokens,
                    draft_threshold=self.draft_threshold,
                    draft_blocks=self.draft_blocks,
                )
            if tier.kind == "auto":
                entry.update(threshold=self.router.threshold, probe_layers=self.router.probe_layers)
            data.append(entry)
        for alias, target in self.aliases.items():
            data.append(
                {"id": alias, "object": "model", "owned_by": "ruyi", "root": self.release, "alias_of": target}
            )
        return {"object": "list", "data": data}

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "release": self.release,
            "tiers": self.tier_names(),
            "device": str(self.device),
            "modality": VL_MODALITY if self.vision else "text",
        }

    def resolve(self, name: str) -> Tier:
        name = self.aliases.get(name, name)
        if name in self.family_tiers:
            return self.family_tiers[name]
        if name in self.tiers:
            return self.tiers[name]
        raise APIError(
            404,
            f"the model {name!r} does not exist; available: {', '.join(self.tier_names())} "
            f"(and {', '.join(self.aliases)})",
            "model_not_found",
            "model",
        )

    # requests ---------------------------------------------------------------------------------
    def _check(self, req: _GenerationFields, tier: Tier) -> list[str]:
        if "max_tokens" not in req.model_fields_set:  # the default never exceeds this server's limit
            req.max_tokens = min(req.max_tokens, self.max_tokens_limit)
        if req.stream_options is not None and not req.stream:
            raise APIError(
                400,
                "stream_options is only allowed with stream: true",
                "invalid_stream_options",
                "stream_options",
            )
        if req.n != 1:
            raise APIError(
                400,
                f"n={req.n} is not supported; only one completion per prompt (n: 1)",
                "unsupported_parameter",
                "n",
            )
        if req.max_tokens > self.max_tokens_limit:
            key = req.token_budget_param
            raise APIError(
                400,
                f"{key}={req.max_tokens} exceeds this server's limit of {self.max_tokens_limit}",
                "max_tokens_too_large",
                key,
            )
        if tier.kind == "dynamic" and req.temperature > 0:
            raise APIError(
                400,
                f"the '{DYNAMIC_TIER}' model decodes greedily (each token is the argmax of the "
                "emitting member); send temperature: 0",
                "unsupported_parameter",
                "temperature",
            )
        if req.threshold is not None and tier.kind not in ("dynamic", "auto"):
            raise APIError(
                400,
                f"threshold only applies to the {DYNAMIC_TIER!r} and {AUTO_TIER!r} models, not {tier.name!r}",
                "unsupported_parameter",
                "threshold",
            )
        for field in ("draft_exit", "draft_tokens", "draft_threshold", "draft_blocks"):
            if getattr(req, field) is not None and tier.kind != "speculative":
                raise APIError(
                    400,
                    f"{field} only applies to the '{SPECULATIVE_TIER}' model, not {tier.name!r}",
                    "unsupported_parameter",
                    field,
                )
        if tier.kind == "speculative" and req.draft_exit is not None:
            drafts = list(tier.model.config.exit_layers)[:-1]
            if req.draft_exit not in drafts:
                raise APIError(
                    400,
                    f"draft_exit={req.draft_exit}: the draft must be a member shallower than the "
                    f"deepest, one of {drafts}",
                    "invalid_draft_exit",
                    "draft_exit",
                )
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop: at most 4 non-empty strings", "invalid_stop", "stop")
        texts = [("stop", s) for s in stops]
        if isinstance(req, CompletionRequest):
            prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
            if len(prompts) > self.max_prompts_per_request:
                raise APIError(
                    413,
                    f"{len(prompts)} prompts in one request; this server takes at most "
                    f"{self.max_prompts_per_request}",
                    "too_many_prompts",
                    "prompt",
                )
            total = len(prompts) * req.max_tokens
            if total > self.max_total_new_tokens:
                raise APIError(
                    422,
                    f"{len(prompts)} prompts x max_tokens={req.max_tokens} = {total} new "
                    f"tokens; this server generates at most {self.max_total_new_tokens} "
                    "per request",
                    "too_many_tokens",
                    "max_tokens",
                )
            texts += [
                ("prompt" if isinstance(req.prompt, str) else f"prompt.{i}", p) for i, p in enumerate(prompts)
            ]
        elif isinstance(req, ChatCompletionRequest):
            for i, m in enumerate(req.messages):
                if isinstance(m.content, str):
                    texts.append((f"messages.{i}.content", m.content))
                else:
                    texts += [
                        (f"messages.{i}.content.{j}.text", part.text)
                        for j, part in enumerate(m.content)
                        if isinstance(part, TextPart)
                    ]
        for param, text in texts:
            bad = next((i for i, ch in enumerate(text) if "\ud800" <= ch <= "\udfff"), None)
            if bad is not None:
                surrogate = text[bad].encode("unicode_escape").decode()
                raise APIError(
                    400,
                    f"{param}: not valid Unicode text (a lone surrogate {surrogate} at "
                    f"character {bad}); send UTF-8 text",
                    "invalid_text",
                    param,
                )
        return stops

    def _encode(self, tier: Tier, text: str, req: _GenerationFields, param: str) -> list[int]:
        """`text`'s token ids, checked against the context and the tier's decoder (errors before any
        stream starts)."""
        return self._check_ids(
            tier, list(tier.tokenizer(text, add_special_tokens=False)["input_ids"]), req, param
        )

    def _check_ids(self, tier: Tier, ids: list[int], req: _GenerationFields, param: str) -> list[int]:
        if not ids:
            raise APIError(400, f"{param}: the prompt encodes to no tokens", "invalid_prompt", param)
        context = tier.text_config.max_position_embeddings
        if len(ids) + req.max_tokens > context:
            raise APIError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the context of "
                f"{context} tokens",
                "context_length_exceeded",
                "max_tokens",
            )
        if tier.kind == "dynamic":  # the library's own argument checks, before any stream starts
            import torch

            from ruyi_model.generation import _check_arguments

            threshold = req.threshold if req.threshold is not None else self.dynamic_threshold
            try:
                _check_arguments(
                    tier.model, torch.tensor([ids]), req.max_tokens, threshold, "max_prob", "recompute"
                )
            except ValueError as e:
                raise APIError(
                    400, f"dynamic decoding rejected the request: {e}", "invalid_request", None
                ) from None
        return ids

    def _completion_prompts(self, req: CompletionRequest, tier: Tier) -> list[list[int]]:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt: every prompt must be a non-empty string", "invalid_prompt", "prompt")
        return [self._encode(tier, p, req, "prompt") for p in prompts]

    def _chat_messages(self, req: ChatCompletionRequest, tier: Tier) -> tuple[list[dict], list]:
        """The messages for the chat template and the decoded images (in order). A text tier takes text
        parts (joined by newlines) and refuses images; a vision-language tier gets `{"type": "image"}`
        parts and each image decoded from its data URL (`tasks.release.vision`; nothing is fetched)."""
        messages, images = [], []
        for i, m in enumerate(req.messages):
            role = "system" if m.role == "developer" else m.role
            if isinstance(m.content, str):
                _refuse_control_tokens(tier, m.content, f"messages.{i}.content")
                messages.append({"role": role, "content": m.content})
                continue
            parts = []
            for j, part in enumerate(m.content):
                param = f"messages.{i}.content.{j}"
                if isinstance(part, TextPart):
                    _refuse_control_tokens(tier, part.text, f"{param}.text")
                    parts.append({"type": "text", "text": part.text})
                    continue
                if tier.processor is None:
                    raise APIError(
                        400,
                        f"{param}: the model {tier.name!r} of {self.release} takes text only, no images",
                        "images_not_supported",
                        param,
                    )
                if len(images) == self.image_limits.max_images_per_request:
                    raise APIError(
                        413,
                        f"{param}: more than {self.image_limits.max_images_per_request} images in one "
                        "request (deploy.max_images_per_request)",
                        "too_many_images",
                        param,
                    )
                try:
                    images.append(
                        decode_image_url(part.image_url.url, f"{param}.image_url.url", self.image_limits)
                    )
                except ImageRejected as e:
                    raise APIError(e.status, e.message, e.code, e.param) from None
                parts.append({"type": "image"})
            if tier.processor is None:
                parts = "\n".join(p["text"] for p in parts)
            messages.append({"role": role, "content": parts})
        return messages, images

    def _chat_prompt(self, req: ChatCompletionRequest, tier: Tier) -> list[int]:
        messages, images = self._chat_messages(req, tier)
        try:
            if tier.processor is not None:
                ids, vision = vl_prompt_inputs(tier.processor, messages, images)
            else:
                text = tier.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
        except ImageRejected as e:
            raise APIError(e.status, e.message, e.code, e.param) from None
        except Exception as e:  # a template that rejects the conversation (e.g. roles out of order)
            raise APIError(
                400,
                f"messages cannot be rendered with the chat template: {e}",
                "invalid_messages",
                "messages",
            ) from None
        if tier.processor is not None:
            return self._check_ids(tier, _Prompt(ids, vision), req, "messages")
        return self._encode(tier, text, req, "messages")

    def complete(self, req: CompletionRequest) -> dict[str, Any]:
        tier = self.resolve(req.model)
        stops = self._check(req, tier)
        prompts = self._completion_prompts(req, tier)
        t0 = time.perf_counter()
        choices, usage, extras = [], {"prompt_tokens": 0, "completion_tokens": 0}, []
        for index, ids in enumerate(prompts):
            text, finish, n_new, extra = self._generate(tier, ids, req, stops)
            choices.append({"text": text, "index": index, "finish_reason": finish, "logprobs": None})
            usage["prompt_tokens"] += len(ids)
            usage["completion_tokens"] += n_new
            extras.append(extra)
        return self._response("text_completion", "cmpl", tier, req, choices, usage, extras, t0)

    def chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        tier = self.resolve(req.model)
        stops = self._check(req, tier)
        ids = self._chat_prompt(req, tier)
        t0 = time.perf_counter()
        content, finish, n_new, extra = self._generate(tier, ids, req, stops)
        choices = [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
        ]
        usage = {"prompt_tokens": len(ids), "completion_tokens": n_new}
        return self._response("chat.completion", "chatcmpl", tier, req, choices, usage, [extra], t0)

    # streaming --------------------------------------------------------------------------------
    def complete_stream(self, req: CompletionRequest) -> EventStream:
        """`stream: true` on /v1/completions: every check runs now (an `APIError` before any event);
        the returned stream then decodes as it is read."""
        tier = self.resolve(req.model)
        stops = self._check(req, tier)
        prompts = self._completion_prompts(req, tier)
        return EventStream(
            lambda cancelled: self._chunks("text_completion", tier, req, stops, prompts, cancelled)
        )

    def chat_stream(self, req: ChatCompletionRequest) -> EventStream:
        """`stream: true` on /v1/chat/completions (see `complete_stream`)."""
        tier = self.resolve(req.model)
        stops = self._check(req, tier)
        ids = self._chat_prompt(req, tier)
        return EventStream(
            lambda cancelled: self._chunks("chat.completion.chunk", tier, req, stops, [ids], cancelled)
        )

    def _chunks(self, obj, tier, req, stops, prompts, cancelled: threading.Event) -> Iterator[dict]:
        """OpenAI's chunk objects for `prompts` decoded one after the other: text as it is decoded (the
        chat's first chunk names the role), `finish_reason` on each choice's last chunk, then (with
        stream_options.include_usage) a chunk with `usage` and no choices. `ruyi` rides on the last chunk."""
        t0 = time.perf_counter()
        chat = obj == "chat.completion.chunk"
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": obj,
            "created": int(time.time()),
            "model": tier.name,
        }

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> dict:
            if not chat:
                choice = {"text": text or "", "index": index, "finish_reason": finish, "logprobs": None}
            else:
                delta = {"role": "assistant", "content": ""} if role else {}
                if text is not None:
                    delta["content"] = text
                choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            # with include_usage, OpenAI's chunks carry `"usage": null` until the last one has it
            return {**head, "choices": [choice], **({"usage": None} if with_usage else {})}

        with_usage = req.stream_options is not None and req.stream_options.include_usage
        usage, extras = {"prompt_tokens": 0, "completion_tokens": 0}, []
        last: dict | None = None
        for index, ids in enumerate(prompts):
            if chat:
                yield chunk(index, None, None, role=True)
            decoding = self._start(tier, ids, req, stops, cancelled)
            held: str | None = None  # one delta behind, so the last one can carry finish_reason
            try:
                for delta in decoding:
                    if held is not None:
                        yield chunk(index, held, None)
                    held = delta
            except APIError as e:
                yield e.body()
                return
            except Exception as e:
                log.exception("streamed decoding failed")
                yield APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error").body()
                return
            if cancelled.is_set():
                return
            last = chunk(index, held, decoding.finish)
            usage["prompt_tokens"] += len(ids)
            usage["completion_tokens"] += len(decoding.tokens)
            extras.append(decoding.extra)
            if index < len(prompts) - 1:
                yield last
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        ruyi = self._info(tier, req, extras, t0)
        if with_usage:
            yield last
            yield {**head, "choices": [], "usage": usage, "ruyi": ruyi}
        else:
            yield {**last, "ruyi": ruyi}

    # decoding ---------------------------------------------------------------------------------
    def _info(self, tier: Tier, req: _GenerationFields, extras: list[dict], t0: float) -> dict[str, Any]:
        ruyi: dict[str, Any] = {
            "release": self.release,
            "tier": tier.name,
            "exit_layer": tier.exit_layer,
            "processing_ms": round(1000 * (time.perf_counter() - t0), 3),
        }
        if tier.kind == "dynamic":
            ruyi["threshold"] = req.threshold if req.threshold is not None else self.dynamic_threshold
            ruyi["choices"] = extras
        elif tier.kind == "speculative":
            ruyi["draft_exit"] = req.draft_exit or self.draft_exit
            ruyi["draft_tokens"] = req.draft_tokens or self.draft_tokens
            ruyi["draft_threshold"] = self._draft_threshold(req)
            ruyi["draft_blocks"] = self._draft_blocks(req)
            ruyi["choices"] = extras
        elif tier.kind == "auto":
            ruyi["threshold"] = req.threshold if req.threshold is not None else self.router.threshold
            ruyi["choices"] = extras
        return ruyi

    def _response(self, obj, id_prefix, tier, req, choices, usage, extras, t0) -> dict[str, Any]:
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {
            "id": f"{id_prefix}-{uuid.uuid4().hex[:24]}",
            "object": obj,
            "created": int(time.time()),
            "model": tier.name,
            "choices": choices,
            "usage": usage,
            "ruyi": self._info(tier, req, extras, t0),
        }

    def _stop_ids(self, tokenizer) -> list[int]:
        from ruyi_model.decoding import stop_token_ids

        return stop_token_ids(tokenizer)

    def _generate(self, tier: Tier, ids: list[int], req: _GenerationFields, stops: list[str]):
        """Decodes one prompt to the end. Returns `(text, finish_reason, completion_tokens, extra)`."""
        decoding = self._start(tier, ids, req, stops, threading.Event())
        for _ in decoding:  # the same path as a stream, so both give the same text
            pass
        return decoding.text, decoding.finish, len(decoding.tokens), decoding.extra

    def _start(self, tier: Tier, ids: list[int], req, stops: list[str], cancelled) -> _Decoding:
        """Starts decoding `ids` on a worker thread (which holds the decode lock while it runs)."""
        decoding = _Decoding(tier.tokenizer, self._stop_ids(tier.tokenizer), stops, req.max_tokens, cancelled)
        worker = threading.Thread(
            target=self._decode, args=(tier, ids, req, decoding), name="ruyi-decode", daemon=True
        )
        worker.start()
        return decoding

    def _decode(self, tier: Tier, ids: list[int], req: _GenerationFields, decoding: _Decoding) -> None:
        import torch

        try:
            with self._lock, torch.no_grad():
                if not decoding.cancelled.is_set():
                    if req.seed is not None:
                        torch.manual_seed(req.seed)
                    input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
                    if isinstance(ids, _Prompt):  # a vision-language member's chat (images, M-RoPE inputs)
                        decoding.extra = self._decode_fixed(tier, input_ids, req, decoding, ids.vision)
                    else:
                        run = {
                            "member": self._decode_fixed,
                            "dynamic": self._decode_dynamic,
                            "speculative": self._decode_speculative,
                            "auto": self._decode_auto,
                        }[tier.kind]
                        decoding.extra = run(tier, input_ids, req, decoding)
            if decoding.cancelled.is_set() and decoding.finish is None:
                self.cancelled_streams.append(len(decoding.tokens))
                log.info("stream cancelled (client gone) after %d tokens", len(decoding.tokens))
            decoding.close()
        except BaseException as e:  # handed to the reader (a 4xx/5xx, or an error event in a stream)
            decoding.fail(e)

    def _decode_fixed(
        self, tier: Tier, input_ids, req: _GenerationFields, decoding: _Decoding, vision=None
    ) -> dict:
        """One member's `generate` (`vision`: a vision-language prompt's pixel values, image grid and
        token types from its processor)."""
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        class Streamer(BaseStreamer):
            """Hands each new token to the decoding (`generate` first puts the prompt: skipped)."""

            prompt_seen = False

            def put(self, value):
                if self.prompt_seen:
                    decoding.push(value.reshape(-1).tolist())
                self.prompt_seen = True

            def end(self):
                pass

        class Until(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full(
                    (input_ids.shape[0],), decoding.done, dtype=torch.bool, device=input_ids.device
                )

        kwargs: dict[str, Any] = {
            "max_new_tokens": req.max_tokens,
            "eos_token_id": sorted(decoding.stop_ids),
            "pad_token_id": tier.tokenizer.pad_token_id,
            "do_sample": req.temperature > 0,
        }
        if req.temperature > 0:
            kwargs.update(temperature=req.temperature, top_p=req.top_p, top_k=0)
        tier.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            **{k: v.to(self.device) for k, v in (vision or {}).items()},
            generation_config=GenerationConfig(**kwargs),
            streamer=Streamer(),
            stopping_criteria=StoppingCriteriaList([Until()]),
        )
        return {}

    def _decode_dynamic(self, tier: Tier, input_ids, req: _GenerationFields, decoding: _Decoding) -> dict:
        """`dynamic_generate`'s loop (max_prob criterion, recomputed KV), a token at a time."""
        import torch

        from ruyi_model.generation import _DynamicDecoder

        threshold = float(req.threshold if req.threshold is not None else self.dynamic_threshold)
        exits, layers = [], []
        with torch.inference_mode():
            decoder = _DynamicDecoder(tier.model, threshold, "max_prob", "recompute", "auto")
            new_ids, t = input_ids, input_ids.shape[1] - 1
            for _ in range(req.max_tokens):
                step = decoder.step(new_ids, t, full_prefill=False)
                exits.append(step.exit_layer)
                layers.append(step.layers_run)
                if decoding.push([step.token]):
                    break
                new_ids = torch.tensor([[step.token]], dtype=torch.long, device=input_ids.device)
                t += 1
        return {
            "tokens_per_member": {str(d): exits.count(d) for d in tier.model.config.exit_layers},
            "mean_exit_layer": sum(exits) / len(exits) if exits else None,
            "mean_layers_run": sum(layers) / len(layers) if layers else None,
        }

    def _decode_auto(self, tier: Tier, input_ids, req: _GenerationFields, decoding: _Decoding) -> dict:
        """The router picks the member from the prompt (one pass of its first `probe_layers` backbone
        layers, skipped at threshold 1), then that member's tier decodes: its own output exactly."""
        from tasks.release.router import probe_cost, prompt_features

        router = self.router
        threshold = float(req.threshold if req.threshold is not None else router.threshold)
        scores: dict[int, float] = {}
        member = router.deepest
        if router.needs_signal(threshold):
            features = prompt_features(tier.model, [input_ids[0].tolist()], router.probe_layers)[0]
            member, scores = router.choose(features, threshold)
        self._decode_fixed(self.tiers[f"exit_{member}"], input_ids, req, decoding)
        return {
            "member": f"exit_{member}",
            "exit_layer": member,
            "scores": {f"exit_{d}": round(p, 6) for d, p in scores.items()},
            "member_layers": router.costs[member],
            "router_layers": probe_cost(router.probe_layers, threshold),
        }

    def _draft_threshold(self, req: _GenerationFields) -> float:
        return req.draft_threshold if req.draft_threshold is not None else self.draft_threshold

    def _draft_blocks(self, req: _GenerationFields) -> bool:
        return req.draft_blocks if req.draft_blocks is not None else self.draft_blocks

    def _decode_speculative(self, tier: Tier, input_ids, req: _GenerationFields, decoding: _Decoding) -> dict:
        """`speculative_generate`'s loop, handing each round's committed tokens on as they come."""
        from ruyi_model.speculative import SpeculativeState

        draft_exit = req.draft_exit or self.draft_exit
        k = req.draft_tokens or self.draft_tokens
        sampling = req.temperature > 0
        state = SpeculativeState(
            tier.model,
            draft_exit,
            do_sample=sampling,
            temperature=req.temperature if sampling else 1.0,
            top_p=req.top_p if sampling else 1.0,
            draft_threshold=self._draft_threshold(req),
            draft_blocks=self._draft_blocks(req),
        )
        state.prefill(input_ids[0].tolist())
        proposed = accepted = rounds = produced = 0
        for new, kept, drafted in state.rounds(req.max_tokens, k):
            proposed, accepted, rounds, produced = (
                proposed + drafted,
                accepted + kept,
                rounds + 1,
                produced + len(new),
            )
            if decoding.push(new):
                break
        return {
            "proposed": proposed,
            "accepted": accepted,
            "acceptance_rate": accepted / proposed if proposed else 0.0,
            "target_forwards": rounds,
            "draft_forwards": proposed,
            "tokens_per_target_forward": produced / rounds if rounds else 0.0,
        }


class _Prompt(list):
    """A vision-language prompt's token ids, with the processor's other inputs (`vision`: pixel values,
    image grid, token types) that its member's `generate` needs."""

    def __init__(self, ids: list[int], vision: dict[str, Any]):
        super().__init__(ids)
        self.vision = vision


class _Decoding:
    """One prompt being decoded on a worker thread: the decoder `push`es token ids as they come; reading
    it (iterating) gives the text they add, detokenized incrementally (text is only handed out once no
    later token can change it: no trailing partial UTF-8 character, nothing that may begin a stop
    string). Decoding stops at a stop token (not counted, not shown), a stop string (the text is cut
    before it), max_tokens, or once `cancelled` is set (a client gone). Each token re-decodes the
    completion so far: exact for any tokenizer (no assumption that decoding concatenates), and cheap at
    this server's max_tokens limits."""

    def __init__(self, tokenizer, stop_ids, stops: list[str], max_tokens: int, cancelled: threading.Event):
        self.tokenizer, self.stop_ids, self.stops = tokenizer, set(stop_ids), stops
        self.max_tokens, self.cancelled = max_tokens, cancelled
        self.tokens: list[int] = []
        self.text = ""  # the completion so far (cut at a stop string)
        self.sent = ""  # the part of it handed to the reader
        self.finish: str | None = None
        self.extra: dict[str, Any] = {}
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._events: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def done(self) -> bool:
        return self.finish is not None or self.cancelled.is_set()

    def push(self, new_ids) -> bool:
        """The decoder's next token(s); returns True once it should stop."""
        for token in new_ids:
            if self.finish is not None:
                break
            token = int(token)
            if token in self.stop_ids:
                self.finish = "stop"
                break
            self.tokens.append(token)
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                text, self.finish = text[:cut], "stop"
            elif len(self.tokens) >= self.max_tokens:
                self.finish = "length"
            self.text = text
        if self.finish is None:
            stable = self.text.rstrip("\ufffd")
            self._send(stable[: max(0, len(stable) - self._hold)])
        else:
            self._send(self.text)
        return self.done

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self._events.put(("text", text[len(self.sent) :]))
            self.sent = text

    def close(self) -> None:
        """The decoder is done: the rest of the text, then the end."""
        if self.finish is None:
            self.finish = "length"
        if not self.text.startswith(self.sent):  # a tokenizer whose decode rewrote earlier text
            log.warning("streamed text %r is no prefix of the completion %r", self.sent, self.text)
        self._send(self.text)
        self._events.put(("end", None))

    def fail(self, error: BaseException) -> None:
        self._events.put(("error", error))

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                kind, value = self._events.get(timeout=0.2)
            except queue.Empty:
                if self.cancelled.is_set():
                    return
                continue
            if kind == "text":
                yield value
            elif kind == "end":
                return
            else:
                raise value


class EventStream:
    """A streamed response's chunks (dicts) as a sync iterator; `cancel()` (the client went away) stops
    its decoding, which then releases the decode lock after the token in progress."""

    def __init__(self, make: Callable[[threading.Event], Iterator[dict]]):
        self.cancelled = threading.Event()
        self._chunks = make(self.cancelled)

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> dict:
        return next(self._chunks)

    def cancel(self) -> None:
        self.cancelled.set()


# --- HTTP -------------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    """`value` as strict JSON: NaN/inf become their names (JSONResponse refuses them, which made a request
    with `"temperature": NaN` a 500), lone surrogates are escaped, anything else unknown is its str()."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {str(_json_safe(k)): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _json_safe(str(value))


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 (the error shape, by the
    app's HTTPException handler) while it is read: a declared `content-length` over the limit before any
    of it is read, a chunked body as soon as the bytes received pass it. Nothing larger is buffered."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException

        limit = self.limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        received = 0

        def too_large(size: str) -> HTTPException:
            return HTTPException(413, f"{size} exceeds this server's limit of {limit} bytes")

        if declared is not None and declared.isdigit() and int(declared) > limit:

            async def refused():  # the app's first read of the body raises, before any of it is read
                raise too_large(f"content-length {int(declared)}")

            return await self.app(scope, refused, send)

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(f"{received} bytes and more")
            return message

        await self.app(scope, limited, send)


def create_app(service: CompletionService):
    """The FastAPI application over a `CompletionService` (used as is by tests and inside Ray Serve)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="ruyi serving", description=f"OpenAI-style completions for {service.release}")
    app.add_middleware(_BodyLimit, limit=service.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(_json_safe(exc.body()), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()

        def where(error: dict) -> str:
            # No field below the body (no JSON: the loc's number is a character offset; not an object;
            # no body at all): the body itself is at fault.
            loc = _field_path(error.get("loc", ())[1:])
            return ".".join(loc) if loc and error.get("type") != "json_invalid" else "body"

        def describe(error: dict) -> str:
            text = f"{where(error)}: {error.get('msg')}"
            if error.get("type") == "json_invalid":
                offset = error.get("loc", ())[-1]
                text += f" ({(error.get('ctx') or {}).get('error', 'invalid JSON')} at character {offset})"
            return text

        # A value that fits no branch of a union gets an error per branch; the deepest one is about the
        # branch the value's JSON type chose (a list of parts, not "should be a valid string").
        param = where(max(errors, key=lambda e: len(_field_path(e.get("loc", ()))))) if errors else "body"
        message = _json_safe("; ".join(describe(e) for e in errors))
        body = APIError(422, message or "body: invalid request", "invalid_request", param).body()
        body["detail"] = _json_safe(errors)
        return JSONResponse(body, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        # FastAPI's own errors, in the error shape: its only 400 is a body that is no UTF-8 JSON; a 413 is
        # a body over the size limit (_BodyLimit).
        param = "body" if exc.status_code in (400, 413) else None
        if exc.status_code == 400:
            message = f"body: {exc.detail}; send a UTF-8 JSON object"
        else:
            message = f"body: {exc.detail}" if param else str(exc.detail)
        code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status_code, "http"
        )
        body = APIError(exc.status_code, message, code, param).body()
        return JSONResponse(_json_safe(body), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("request to %s failed", request.url.path)
        body = APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error").body()
        return JSONResponse(_json_safe(body), status_code=500)

    # response_model=None: the dicts go out as they are; `responses` documents their schema.
    @app.get("/healthz", response_model=None, responses={200: {"model": Health}})
    def healthz() -> dict:
        return service.health()

    @app.get("/v1/models", response_model=None, responses={200: {"model": ModelList}})
    def models() -> dict:
        return service.models()

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            components = default_openapi().setdefault("components", {}).setdefault("schemas", {})
            for model in _CHUNK_MODELS:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, definition in schema.pop("$defs", {}).items():
                    components.setdefault(name, definition)
                components[model.__name__] = schema
        return app.openapi_schema

    app.openapi = openapi

    def sse(stream: EventStream) -> StreamingResponse:
        """Server-sent events: `data: <chunk JSON>` per chunk, then `data: [DONE]`. Each chunk is decoded
        in the thread pool; when the response ends early (the client disconnected, so the task is
        cancelled or the generator closed) the stream is cancelled, which stops its decoding."""

        async def events():
            try:
                while (chunk := await run_in_threadpool(next, stream, None)) is not None:
                    yield f"data: {json.dumps(_json_safe(chunk))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                stream.cancel()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post(
        "/v1/completions",
        response_model=None,
        responses={200: _ok_response(CompletionResponse, CompletionChunk), **_ERROR_RESPONSES},
    )
    def completions(req: CompletionRequest):
        return sse(service.complete_stream(req)) if req.stream else service.complete(req)

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={200: _ok_response(ChatCompletionResponse, ChatCompletionChunk), **_ERROR_RESPONSES},
    )
    def chat_completions(req: ChatCompletionRequest):
        return sse(service.chat_stream(req)) if req.stream else service.chat(req)

    return app


# --- Ray Serve --------------------------------------------------------------------------------
def resolve_release(source: dict[str, Any]) -> Path:
    """The local release directory described by `source` (in the replica that serves it).

    `{"release_dir": path}` (already on this machine) or `{"store": <StoreParams fields>,
    "model_name": name, "version": v or None, "cache_dir": dir or None}` (fetched, verified, here;
    version None: the newest validated release, `ArtifactStore.latest_version(validated=True)`).
    """
    if source.get("release_dir"):
        path = Path(source["release_dir"])
        if not path.is_dir():
            raise StageError(f"release directory not found: {path}")
        return path
    if "store" in source and "model_name" in source:
        from tasks.core.params import StoreParams
        from tasks.release.store import open_store

        store = open_store(StoreParams(**source["store"]), cache_dir=source.get("cache_dir"))
        # version None: the newest release that passed the deploy smoke test, never a failed one
        return store.fetch(source["model_name"], source.get("version"), validated=True)
    raise StageError(
        f"serving source needs 'release_dir' or 'store' + 'model_name', got keys {sorted(source)}"
    )


def _deployment_class():
    from ray import serve

    @serve.deployment(
        name=DEPLOYMENT_NAME, max_constructor_retry_count=1, max_ongoing_requests=16, health_check_period_s=10
    )
    @serve.ingress()
    class RuyiFamily:
        """One replica: every tier of the release (see CompletionService)."""

        def __init__(self, source: dict[str, Any], options: dict[str, Any]):
            self.service = CompletionService(resolve_release(source), **options)

        def __serve_build_asgi_app__(self):
            return create_app(self.service)

    return RuyiFamily


# CompletionService's per-request caps (params.yaml deploy.*) and speculative-tier defaults, accepted in a
# Serve config's args.
_LIMIT_OPTIONS = (
    "max_prompts_per_request",
    "max_total_new_tokens",
    "speculative_draft_exit",
    "speculative_draft_tokens",
    "speculative_draft_threshold",
    "speculative_draft_blocks",
    "max_image_bytes",
    "max_image_pixels",
    "max_images_per_request",
)


def build_app(args: dict[str, Any]):
    """Ray Serve application builder (`import_path: tasks.release.serving:build_app` in a Serve config).

    Args (`args:` in the config): `release_dir` or `store` + `model_name` (+ `version`, `cache_dir`),
    and optionally `max_tokens_limit`, `dynamic_threshold`, `device`, `dtype`, `max_prompts_per_request`,
    `max_total_new_tokens`, `speculative_draft_exit`, `speculative_draft_tokens`,
    `speculative_draft_threshold`, `speculative_draft_blocks`, `max_image_bytes`, `max_image_pixels`,
    `max_images_per_request` (CompletionService), and the replica's `num_cpus` (default 0.5), `num_gpus`
    (default 0) and `num_replicas` (default 1).
    """
    known = {
        "release_dir",
        "store",
        "model_name",
        "version",
        "cache_dir",
        "max_tokens_limit",
        "dynamic_threshold",
        "device",
        "dtype",
        "num_cpus",
        "num_gpus",
        "num_replicas",
        *_LIMIT_OPTIONS,
    }
    unknown = sorted(set(args) - known)
    if unknown:
        raise StageError(f"serving app args: unknown key(s) {unknown}; known: {sorted(known)}")
    source = {k: args[k] for k in ("release_dir", "store", "model_name", "version", "cache_dir") if k in args}
    options = {
        k: args[k]
        for k in ("max_tokens_limit", "dynamic_threshold", "device", "dtype", *_LIMIT_OPTIONS)
        if k in args
    }
    if "model_name" in args:
        options["model_name"] = args["model_name"]
    actor = {"num_cpus": float(args.get("num_cpus", 0.5)), "num_gpus": float(args.get("num_gpus", 0))}
    deployment = _deployment_class().options(
        ray_actor_options=actor, num_replicas=int(args.get("num_replicas", 1))
    )
    return deployment.bind(source, options)


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise StageError(f"cannot serve on {host}:{port}: {e.strerror} (deploy.port / --port)") from None


def http_json(url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, dict]:
    """GET (or POST `body` as JSON) and return `(status, parsed JSON body)`; never raises on HTTP errors."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"{}")
        except json.JSONDecodeError:
            return e.code, {"raw": raw.decode(errors="replace")}


class ServingSession:
    """A running Serve application (and the Ray instance it started); `stop()` ends both."""

    def __init__(self, url: str, runtime: RayRuntime):
        self.url = url
        self.runtime = runtime
        self.stopped = False

    def stop(self) -> None:
        """Deletes the application and Serve; then, if this session started Ray, shuts Ray down and makes
        sure none of its processes survives (`tasks.core.ray_runtime`). Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        try:
            _shutdown_serve(SERVE_SHUTDOWN_TIMEOUT_S)
        finally:
            self.runtime.stop()

    def __enter__(self) -> ServingSession:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


#: Seconds Serve's graceful shutdown may take before Ray itself is shut down (which ends it anyway).
SERVE_SHUTDOWN_TIMEOUT_S = 10.0


def _shutdown_serve(timeout_s: float) -> None:
    """`serve.shutdown()`, bounded: on a loaded machine its graceful shutdown can take far longer than a
    process manager waits between SIGTERM and SIGKILL."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    done = threading.Event()

    def shutdown() -> None:
        try:
            serve.shutdown()
        except Exception as e:  # a Serve that is already half gone: Ray's shutdown ends the rest
            log.warning("serve.shutdown failed: %s: %s", type(e).__name__, e)
        finally:
            done.set()

    threading.Thread(target=shutdown, name="serve-shutdown", daemon=True).start()
    if not done.wait(timeout_s):
        log.warning("Ray Serve did not shut down within %.0f s; stopping Ray", timeout_s)


def _prepare_source(source: dict[str, Any] | str | Path) -> dict[str, Any]:
    """The `resolve_release` source with an absolute release_dir, checked here (a clear error instead of a
    replica crash loop)."""
    if not isinstance(source, dict):
        source = {"release_dir": str(Path(source).resolve())}
    elif source.get("release_dir"):
        source = {**source, "release_dir": str(Path(source["release_dir"]).resolve())}
    if source.get("release_dir"):
        resolve_release(source)
        if not release_exits(source["release_dir"]):
            raise StageError(f"{source['release_dir']}: no exit_<d>/ member checkpoints to serve")
    return source


def _start_serve(host: str, port: int) -> None:
    """Starts Serve's controller and HTTP proxy on host:port (3 attempts, see below)."""
    import ray
    from ray import serve

    for attempt in range(3):
        try:
            serve.start(http_options={"host": host, "port": port})
            return
        except ray.exceptions.RayActorError as e:
            # Seen on a loaded 2-core box right after a previous Serve instance in the same process shut
            # down: its controller's retried graceful shutdown kills the new proxy before it starts.
            if attempt == 2:
                raise StageError(f"Ray Serve could not start its HTTP proxy on {host}:{port}: {e}") from None
            log.warning("Ray Serve proxy died while starting (%s); retrying", type(e).__name__)
            serve.shutdown()
            time.sleep(2.0)


def _wait_healthy(url: str, timeout_s: float) -> dict[str, Any]:
    """Polls `url/healthz` until it answers ok; returns its body (StageError after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status, body = http_json(f"{url}/healthz", timeout=5)
            if status == 200 and body.get("status") == "ok":
                return body
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise StageError(f"the serving application did not become healthy at {url} in {timeout_s:.0f} s")
        time.sleep(0.3)


def serving_kwargs(cfg: DeployParams, host: str | None = None, port: int | None = None) -> dict[str, Any]:
    """`start_serving`'s keyword arguments from the `deploy` params (host/port overridable)."""
    return {
        "host": host or cfg.host,
        "port": port or cfg.port,
        "model_name": cfg.model_name,
        "max_tokens_limit": cfg.max_tokens_limit,
        "dynamic_threshold": cfg.dynamic_threshold,
        "replica_num_cpus": cfg.replica_num_cpus,
        "replica_num_gpus": cfg.replica_num_gpus,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "ray_num_cpus": cfg.ray_num_cpus,
        "object_store_mib": cfg.ray_object_store_mib,
        "ray_address": cfg.ray_address,
        "max_prompts_per_request": cfg.max_prompts_per_request,
        "max_total_new_tokens": cfg.max_total_new_tokens,
        "speculative_draft_exit": cfg.speculative_draft_exit,
        "speculative_draft_tokens": cfg.speculative_draft_tokens,
        "speculative_draft_threshold": cfg.speculative_draft_threshold,
        "speculative_draft_blocks": cfg.speculative_draft_blocks,
        "max_image_bytes": cfg.max_image_bytes,
        "max_image_pixels": cfg.max_image_pixels,
        "max_images_per_request": cfg.max_images_per_request,
    }


def check_served_params(
    url: str, eval_params: dict[int, int], expected: dict[str, dict[str, Any]], where: str
) -> None:
    """The running app's `exit_<d>` tiers run the evaluated parameter counts (`eval_params`, read from
    `where`), with the weights (factored or dense) `expected` names (`GET /v1/models`); StageError
    naming the tier if not."""
    status, models = http_json(f"{url}/v1/models")
    if status != 200:
        raise StageError(f"smoke test: {url}/v1/models answered {status}: {models}")
    served = {m["id"]: m for m in models["data"] if m.get("exit_layer") is not None}
    for tier, want in expected.items():
        entry = served.get(tier)
        if entry is None:
            raise StageError(f"smoke test: tier {tier} is not served (served: {sorted(served)})")
        d = entry["exit_layer"]
        if entry.get("num_parameters") != eval_params[d] or entry.get("weights") != want["weights"]:
            raise StageError(
                f"smoke test: tier {tier} serves {entry.get('num_parameters')} parameters "
                f"({entry.get('weights')}), but the evaluated member runs {eval_params[d]} "
                f"({where}; {want['weights']} weights expected)"
            )


def start_serving(
    source: dict[str, Any] | str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8124,
    model_name: str | None = None,
    max_tokens_limit: int = 128,
    dynamic_threshold: float = DYNAMIC_THRESHOLD,
    replica_num_cpus: float = 0.5,
    replica_num_gpus: float = 0.0,
    device: str = "cpu",
    dtype: str = "float32",
    ray_num_cpus: int = 2,
    object_store_mib: int = 256,
    ray_address: str | None = None,
    ready_timeout_s: float = 180.0,
    max_prompts_per_request: int = 16,
    max_total_new_tokens: int = 4096,
    speculative_draft_exit: int | None = None,
    speculative_draft_tokens: int = SPECULATIVE_DRAFT_TOKENS,
    speculative_draft_threshold: float = SPECULATIVE_DRAFT_THRESHOLD,
    speculative_draft_blocks: bool = SPECULATIVE_DRAFT_BLOCKS,
    max_image_bytes: int = ImageLimits.max_image_bytes,
    max_image_pixels: int = ImageLimits.max_image_pixels,
    max_images_per_request: int = ImageLimits.max_images_per_request,
) -> ServingSession:
    """Starts Ray (unless one runs or `ray_address` is given), Serve on host:port, and the application.

    Args:
        source: a release directory, or a `resolve_release` source dict.

    Returns:
        A `ServingSession` whose `url` answers once every tier is loaded; call `stop()` (or use `with`).
        With host 0.0.0.0 (every interface) the URL names 127.0.0.1.
    """
    from ray import serve

    source = _prepare_source(source)
    _check_port_free(host, port)
    t0 = time.perf_counter()
    runtime = RayRuntime(
        num_cpus=ray_num_cpus, object_store_mib=object_store_mib, address=ray_address, log_to_driver=False
    ).start()
    if runtime.owns_ray:
        log.info("ray started in %.1f s", time.perf_counter() - t0)
    client_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    session = ServingSession(f"http://{client_host}:{port}", runtime)
    try:
        _start_serve(host, port)
        options = {
            "max_tokens_limit": max_tokens_limit,
            "dynamic_threshold": dynamic_threshold,
            "device": device,
            "dtype": dtype,
            "max_prompts_per_request": max_prompts_per_request,
            "max_total_new_tokens": max_total_new_tokens,
            "speculative_draft_tokens": speculative_draft_tokens,
            "speculative_draft_threshold": speculative_draft_threshold,
            "speculative_draft_blocks": speculative_draft_blocks,
            "max_image_bytes": max_image_bytes,
            "max_image_pixels": max_image_pixels,
            "max_images_per_request": max_images_per_request,
        }
        if speculative_draft_exit is not None:
            options["speculative_draft_exit"] = speculative_draft_exit
        args = {**source, **options, "num_cpus": replica_num_cpus, "num_gpus": replica_num_gpus}
        if model_name:
            args["model_name"] = model_name
        t0 = time.perf_counter()
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        body = _wait_healthy(session.url, ready_timeout_s)
        log.info(
            "serving %s at %s (ready in %.1f s)", body.get("release"), session.url, time.perf_counter() - t0
        )
    except BaseException:
        session.stop()
        raise
    return session


__all__ = [
    "CompletionRequest",
    "ChatCompletionRequest",
    "ChatMessage",
    "APIError",
    "CompletionService",
    "create_app",
    "build_app",
    "start_serving",
    "ServingSession",
    "resolve_release",
    "http_json",
    "DYNAMIC_TIER",
    "AUTO_TIER",
    "SPECULATIVE_TIER",
    "EventStream",
]
