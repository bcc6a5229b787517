"""Pydantic models of the OpenAI-compatible HTTP API that ``kvagents serve`` speaks.

Requests follow OpenAI's Chat Completions, Completions and Embeddings APIs; fields the OpenAI API defines but this
server cannot honour are accepted only at their neutral value (e.g. ``logprobs=false``) and refused otherwise with a
400 naming the field. Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.

Example:
    >>> req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    >>> req.token_limit(default=256), req.messages[0].text()
    (8, 'Hi')
    >>> ErrorResponse.of("bad temperature", param="temperature").model_dump()["error"]["type"]
    'invalid_request_error'
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# -- errors -------------------------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorBody

    @classmethod
    def of(cls, message: str, *, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> ErrorResponse:
        return cls(error=ErrorBody(message=message, type=type, param=param, code=code))


# -- shared request parts -----------------------------------------------------------------------------------------


class _Lenient(BaseModel):
    """Unknown fields are ignored (newer clients send fields this server does not know)."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(_Lenient):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    """One message; ``content`` is text or a list of ``{"type": "text", "text": ...}`` parts (text only)."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text; a non-text part (image, audio, file) raises ``ValueError`` naming its type."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        out = []
        for i, part in enumerate(self.content):
            if part.type not in ("text", "input_text"):
                raise ValueError(f"content part {i} of a {self.role!r} message has type {part.type!r}; this server "
                                 "serves a text model: send text parts only")
            out.append(part.text or "")
        return "".join(out)


def _check_stop(v):
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list) and len(v) > 4:
        raise ValueError(f"stop takes at most 4 sequences, got {len(v)}")
    return v


class _Sampling(_Lenient):
    """Sampling fields shared by chat and text completions (OpenAI names; ``top_k`` is an extension)."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="kvagents extension: keep the k most likely tokens (0: off).")
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = Field(False, description="kvagents extension (as vLLM's): keep going past EOS (benchmarks).")
    return_token_ids: bool = Field(False, description="kvagents extension (as vLLM's): each choice's kvagents object "
                                                      "lists the generated token ids (streamed: those of the chunk).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, v):
        return _check_stop(v)

    def unsupported(self) -> tuple[str, Any] | None:
        """The first field set to a value this server cannot honour, as ``(name, value)``."""
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v not in (None, 0, 0.0):
                return name, v
        if self.logprobs not in (None, False, 0):
            return "logprobs", self.logprobs
        if self.logit_bias:
            return "logit_bias", self.logit_bias
        return None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``.

    kvagents extensions: ``top_k``, ``max_thinking_tokens`` (a hard thinking budget, like ``reasoning_effort``).
    """

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    max_thinking_tokens: int | None = None
    top_logprobs: int | None = None

    def token_limit(self, default: int) -> int:
        """``max_completion_tokens``, else ``max_tokens``, else ``default``."""
        for v in (self.max_completion_tokens, self.max_tokens):
            if v is not None:
                return v
        return default


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is a text, a list of texts, token ids, or a list of token-id lists."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class EmbeddingRequest(_Lenient):
    """``POST /v1/embeddings``: ``input`` is a text, a list of texts, token ids, or a list of token-id lists."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


# -- responses ----------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: None = None
    kvagents: dict[str, Any] | None = Field(None, description="kvagents' per-sample signals (probability scores, "
                                                              "token counts, the raw finish reason).")


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str] | None = None


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    reasoning_content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    finish_reason: str | None = None
    logprobs: None = None
    kvagents: dict[str, Any] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None
    kvagents: dict[str, Any] | None = None


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "kvagents"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
