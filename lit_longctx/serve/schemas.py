"""Request bodies of ``lit-longctx serve`` and how a bad one becomes a 4xx JSON error naming the field.

Every schema forbids unknown fields and is strict about types (``"5"`` is not an integer, ``true`` is not a
number). Limits that depend on the server (prompt length, ``max_new_tokens``, samples) are checked in the app.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ApiError(Exception):
    """An HTTP error answered as ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's error shape)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Sampling(Strict):
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0)


class CompletionRequest(Sampling):
    """``POST /completions`` (ALLaMo's endpoint): ``num_samples`` independent continuations of ``prompt``."""

    prompt: str
    max_new_tokens: int = Field(50, ge=0)
    num_samples: int = Field(1, ge=1)


class EmbeddingRequest(Strict):
    """``POST /embeddings``: one vector for ``prompt``."""

    prompt: str


class TokensRequest(Strict):
    """``POST /tokens``: ``text`` -> ids and pieces (``bos`` prepends BOS), or ``ids`` -> text and pieces."""

    text: str | None = None
    ids: list[int] | None = None
    bos: bool = False

    @field_validator("ids")
    @classmethod
    def _non_negative(cls, ids: list[int] | None) -> list[int] | None:
        if ids is not None and any(i < 0 for i in ids):
            raise ValueError("token ids must be >= 0")
        return ids


class OpenAIBase(Strict):
    """Fields shared by the OpenAI-compatible endpoints (OpenAI's defaults: temperature 1, top_p 1)."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, description="extension: not an OpenAI field")
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    stop: None = Field(None, description="stop strings are not supported (generation stops at EOS)")
    frequency_penalty: Literal[0] = 0
    presence_penalty: Literal[0] = 0
    logprobs: None = None


class OpenAICompletionRequest(OpenAIBase):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)
    echo: Literal[False] = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("give one prompt (a string or a list of one string); send several requests instead")
        return prompt


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(OpenAIBase):
    """``POST /v1/chat/completions`` (needs a checkpoint with a chat template)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)


def _field_name(loc: tuple) -> str:
    """``('messages', 0, 'role')`` -> ``messages[0].role``; pydantic's union branch names are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "int", "float", "bool", "none") or "[" in str(part) or "-" in str(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def parse_body(raw: bytes, schema: type[Strict]) -> Any:
    """Decode JSON ``raw`` into ``schema``; raise :class:`ApiError` (400 malformed, 422 invalid) naming the field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}; send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = next((err for err in errors if err["type"] == "extra_forbidden"), errors[0])  # a typo explains most
        field = _field_name(tuple(first["loc"]))
        message = first["msg"] if first["type"] != "extra_forbidden" else "unknown field"
        allowed = ", ".join(schema.model_fields)
        hint = f" (accepted fields: {allowed})" if first["type"] == "extra_forbidden" else ""
        raise ApiError(422, f"{field}: {message}{hint}", param=field) from None
