"""The OpenAI-compatible FastAPI app of ``kvagents serve``, on the model's continuous-batching scheduler.

Every request is submitted to the one :class:`~kvagents.engine.scheduler.Scheduler` of the model
(``llm.scheduler(max_rows=..., max_queue=...)``), so concurrent HTTP clients share one running batch; a full queue
answers HTTP 429, and a streaming client that disconnects cancels its request (its rows leave the batch before the
next step). ``fast=True`` (``kvagents serve --fast``) serves on the fast scheduler instead
(``llm.scheduler(fast=True)``: slots of static KV buffers, one CUDA-graph step for all of them). It runs every
request this app builds; one with a grammar (``tool_choice='required'``, ``response_format`` json, ``tools`` in
``auto`` mode) or a per-request component (a thinking budget, the probability scores) has that work done on the
host at each step, between the step's two graphs, so plain requests are the fastest there; the probability scores
are off by default with ``fast``. Prompt + ``max_tokens`` must fit its ``max_seq_len`` (a chat request that sets
no limit gets what is left of it, at most ``default_max_tokens``). Endpoints:

* ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``;
* ``POST /v1/chat/completions``: the model's chat template; ``temperature``, ``top_p``, ``top_k`` (extension),
  ``max_tokens`` / ``max_completion_tokens``, ``n``, ``seed``, ``stop``, ``stream`` (+ ``stream_options.include_usage``),
  ``ignore_eos`` (extension), ``tools`` + ``tool_choice`` (``auto`` / ``none`` / ``required`` / a named function) + ``parallel_tool_calls``,
  ``response_format`` (``text``, ``json_object``, ``json_schema``: grammar-constrained with xgrammar),
  ``reasoning_effort`` / ``max_thinking_tokens`` (extension): a hard thinking budget
  (:class:`~kvagents.control.thinking.HardBudget`);
* ``POST /v1/completions``: a text prompt (or several, or token ids), the same sampling fields;
* ``POST /v1/embeddings``: pooled KV embeddings of the prompts (``KVModel.embed``), float or base64.

Each choice carries an extra ``kvagents`` object: the raw finish reason, token counts and kvagents' probability
scores of the sample (:class:`~kvagents.signals.scoring.ProbabilityScores`: mean log-probability, perplexity,
entropy, DeepConf's lowest group confidence). With ``return_token_ids: true`` (extension, as vLLM's) it also holds
the sample's generated ``token_ids``; streamed, each chunk's ``kvagents.token_ids`` are the tokens whose text that
chunk carries (a token whose text is held back, e.g. half a UTF-8 character, comes with the next chunk; tokens that
show no text, e.g. EOS, with the final one).

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad value (the message
names it), 404 for an unknown model, 429 when the queue is full, 503 once the scheduler stopped.

Example:
    >>> from kvagents import KVModel  # doctest: +SKIP
    >>> app = create_app(KVModel.from_pretrained("qwen2.5-coder-0.5b"), max_rows=8)  # doctest: +SKIP
    >>> # uvicorn.run(app, port=8000); then, with the openai client:
    >>> # OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").chat.completions.create(
    >>> #     model="qwen2.5-coder-0.5b", messages=[{"role": "user", "content": "Hi"}], max_tokens=16)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from ..engine.decode import NonFiniteLogitsError
from ..engine.params import SamplingParams
from ..engine.scheduler import QueueFullError, RequestHandle, SchedulerClosedError
from ..model import KVModel
from . import tools as T
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ResponseMessage,
    ToolCall,
    ToolCallDelta,
    Usage,
    new_id,
    now,
)

#: kvagents finish reasons -> OpenAI's (a component's own reason, e.g. a thinking budget's, reads "stop").
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high"}
#: SamplingParams fields -> the request fields they come from (for error messages).
PARAM_NAMES = {"max_new_tokens": "max_tokens"}


class APIError(Exception):
    """An error answered as OpenAI's error JSON with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def response(self) -> JSONResponse:
        body = ErrorResponse.of(self.message, type=self.type, param=self.param, code=self.code)
        return JSONResponse(body.model_dump(), status_code=self.status)


def _validation_message(err: ValidationError | RequestValidationError, names: dict[str, str] | None = None):
    """``(message, param)`` of the first error: the field, what is wrong and the value sent."""
    first = err.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if param and names:
        param = names.get(param, param)
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if got is None or first.get("type") == "missing" else f" (got {got!r:.120})"
    return (f"{param}: {msg}{shown}" if param else f"{msg}{shown}"), param


def _as_api_error(err: BaseException) -> APIError:
    """Map a failure of building or running a request to its HTTP status."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, QueueFullError):
        return APIError(429, f"the server is busy: {err}", type="rate_limit_exceeded", code="queue_full")
    if isinstance(err, SchedulerClosedError):
        return APIError(503, f"the server is shutting down: {err}", type="server_error")
    if isinstance(err, ValidationError):
        msg, param = _validation_message(err, PARAM_NAMES)
        return APIError(400, msg, param=param)
    if isinstance(err, NonFiniteLogitsError):
        return APIError(500, str(err), type="server_error")
    if isinstance(err, (ValueError, TypeError)):
        return APIError(400, " ".join(str(err).split()) or type(err).__name__)
    return APIError(500, f"{type(err).__name__}: {err}", type="server_error")


def _jsonable(x: Any) -> Any:
    """Component outputs as JSON: NaN / inf -> None, tensors and arrays -> lists (large ones dropped)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist") and getattr(x, "size", None) is not None:
        n = x.numel() if hasattr(x, "numel") else x.size
        return _jsonable(x.tolist()) if n <= 64 else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


@dataclass
class _Plan:
    """How one request runs: its prompts, sampling, components and grammar, and how to read its output."""

    prompts: list[list[int]]
    params: SamplingParams
    components: Callable[[], list] = list
    processors: Callable[[], list] = list
    tools: list[dict] = field(default_factory=list)  # tools whose calls are parsed (empty: none)
    names: list[str] | None = None
    reasoning: bool = False  # split <think>...</think> into reasoning_content
    think_started: bool = False  # a forced cue opens the block
    token_ids: bool = False  # return_token_ids: the kvagents object lists the generated token ids


class KVServer:
    """The request handling behind :func:`create_app` (one per app; the model's scheduler is shared)."""

    def __init__(self, llm: KVModel, *, served_model_name: str | None = None, max_rows: int = 16,
                 max_queue: int = 64, prefill_chunk: int = 256, default_max_tokens: int = 1024,
                 scores: bool | None = None, components: Callable[[], Sequence] | None = None, fast: bool = False,
                 max_seq_len: int | None = None) -> None:
        if scores is None:
            scores = not fast
        if max_seq_len is not None and not fast:
            raise ValueError("max_seq_len bounds the fast scheduler's slots: pass it with fast=True")
        self.llm = llm
        self.name = served_model_name or llm.name
        self.fast = fast
        extra = {"fast": True, "max_seq_len": max_seq_len} if fast else {}
        self.scheduler = llm.scheduler(max_rows=max_rows, max_queue=max_queue, prefill_chunk=prefill_chunk, **extra)
        self.default_max_tokens = default_max_tokens
        self.scores = scores
        self.extra_components = components

    # -- shared ---------------------------------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(404, f"model {model!r} is not served here; this server serves {self.name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    @staticmethod
    def check_supported(req) -> None:
        bad = req.unsupported()
        if bad is not None:
            raise APIError(400, f"{bad[0]}={bad[1]!r} is not supported by this server (kvagents serve); leave it "
                                "unset", param=bad[0])

    def fit_limit(self, params: SamplingParams, n_prompt: int) -> SamplingParams:
        """On the fast scheduler, a request that set no token limit gets at most what its slot has left."""
        room = getattr(self.scheduler, "max_seq_len", None)
        if not self.fast or room is None or n_prompt + params.max_new_tokens <= room:
            return params
        return params.model_copy(update={"max_new_tokens": max(1, room - n_prompt)})

    def _params(self, req, max_tokens: int | None) -> SamplingParams:
        fields = {"max_new_tokens": self.default_max_tokens if max_tokens is None else max_tokens, "n": req.n}
        for k in ("temperature", "top_p", "top_k", "seed"):
            if getattr(req, k) is not None:
                fields[k] = getattr(req, k)
        if req.stop is not None:
            fields["stop"] = req.stop
        if req.ignore_eos:
            fields["ignore_eos"] = True
        return SamplingParams(**fields)

    def _base_components(self) -> list:
        comps = []
        if self.scores:
            from ..signals.scoring import ProbabilityScores

            comps.append(ProbabilityScores())
        if self.extra_components is not None:
            comps.extend(self.extra_components())
        return comps

    def _grammar_mask(self, grammar, params: SamplingParams):
        from ..grammar import GrammarMask, closing_tokens

        reserve = min(24, params.max_new_tokens // 3)
        return GrammarMask([grammar], n=params.n, budget=params.max_new_tokens, reserve=reserve,
                           closing_tokens=closing_tokens(self.llm), stop_token_ids=self.llm.engine.eos_token_ids)

    def _compile(self, kind: str, spec: Any, param: str):
        try:
            from ..grammar import compile_grammar

            return compile_grammar(self.llm, kind, spec)
        except ImportError:
            raise APIError(400, f"{param} needs grammar-constrained decoding, and xgrammar is not installed on the "
                                "server (pip install 'kvagents[grammar]')", param=param) from None

    # -- chat -----------------------------------------------------------------------------------------------------
    def chat_plan(self, req: ChatCompletionRequest) -> _Plan:
        llm, tok = self.llm, self.llm.tokenizer
        template = getattr(tok, "chat_template", None)
        if not template:
            raise APIError(400, f"the tokenizer of {self.name!r} has no chat template: use /v1/completions with a "
                                "text prompt", param="messages")
        params = self._params(req, req.token_limit(self.default_max_tokens))
        limit_set = req.max_completion_tokens is not None or req.max_tokens is not None
        native = T.native_tools(tok)
        try:
            chat = T.template_messages(req.messages, native=native)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        names = [t["function"]["name"] for t in tools]
        mode, use = self._tool_mode(req.tool_choice, tools, names)
        grammar, gparam = None, None
        if use and not native:
            T.add_system(chat, T.tools_system_prompt(use))
        if use and mode != "auto":
            grammar, gparam = self._compile("structural_tag", T.tool_call_tag(use, required=True, parallel=bool(
                req.parallel_tool_calls)), "tool_choice"), "tool_choice"
        elif use:
            with contextlib.suppress(APIError):  # without xgrammar, auto calls are parsed, not constrained
                grammar = self._compile("structural_tag", T.tool_call_tag(use, required=False, parallel=(
                    req.parallel_tool_calls is not False)), "tools")
        schema = self._response_schema(req.response_format)
        if schema is not None:
            if mode == "required":
                raise APIError(400, "response_format together with tool_choice='required' (or a named function) "
                                    "leaves nothing to format: drop one of them", param="response_format")
            if use:
                raise APIError(400, "response_format together with tools is not supported by this server yet: "
                                    "send tool_choice='none' or drop response_format", param="response_format")
            grammar, gparam = self._compile("json_schema", schema, "response_format"), "response_format"
        budget = self._thinking(req, tok, template, constrained=gparam is not None)
        template_kw = {}
        comps_extra: list[Callable[[], Any]] = []
        reasoning = started = False
        if budget is not None:
            from ..control.thinking import HardBudget, get_format

            fmt_name, effort, max_think = budget
            fmt = get_format(fmt_name)
            template_kw = dict(fmt.chat_template_kwargs)
            reasoning, started = fmt.native, fmt.native
            comps_extra.append(lambda: HardBudget(fmt, tok, max_think, effort=effort, max_answer_tokens=None))
        try:
            ids = tok.apply_chat_template(chat, tools=use if (native and use) else None, add_generation_prompt=True,
                                          tokenize=True, **template_kw)
        except Exception as e:  # jinja errors of the template (e.g. roles out of order)
            raise APIError(400, f"the chat template of {self.name!r} rejected these messages: {e}",
                           param="messages") from None
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = llm.encode_prompt(list(ids))
        if not limit_set:
            params = self.fit_limit(params, len(ids))

        def components():
            return self._base_components() + [make() for make in comps_extra]

        def processors():
            return [] if grammar is None else [self._grammar_mask(grammar, params)]

        return _Plan([ids], params, components, processors, tools=use, names=names or None, reasoning=reasoning,
                     think_started=started, token_ids=req.return_token_ids)

    @staticmethod
    def _tool_mode(choice, tools: list[dict], names: list[str]) -> tuple[str, list[dict]]:
        """``(mode, tools to offer)``: mode ``auto`` / ``none`` / ``required``; a named function is ``required``
        with that tool alone."""
        if choice is not None and not tools:
            if choice == "none":
                return "none", []
            raise APIError(400, f"tool_choice={choice!r} needs tools; the request has none", param="tool_choice")
        if not tools:
            return "none", []
        if choice is None or choice == "auto":
            return "auto", tools
        if choice == "none":
            return "none", []
        if choice == "required":
            return "required", tools
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if name in names:
                return "required", [t for t in tools if t["function"]["name"] == name]
            raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools {names}",
                           param="tool_choice")
        raise APIError(400, f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', 'function': "
                            f"{{'name': ...}}}}, got {choice!r}", param="tool_choice")

    @staticmethod
    def _response_schema(fmt: dict | None) -> dict | None:
        if fmt is None or fmt.get("type") == "text":
            return None
        kind = fmt.get("type")
        if kind == "json_object":
            return {"type": "object"}
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise APIError(400, "response_format of type 'json_schema' needs json_schema.schema (a JSON schema "
                                    f"object), got {spec!r:.200}", param="response_format.json_schema")
            return schema
        raise APIError(400, f"response_format type {kind!r} is not supported; use 'text', 'json_object' or "
                            "'json_schema'", param="response_format.type")

    @staticmethod
    def _thinking(req: ChatCompletionRequest, tok, template: str, constrained: bool):
        """``(format, effort, max_thinking_tokens)`` of the request's thinking budget, or ``None``."""
        effort = req.reasoning_effort
        if effort is not None and effort not in EFFORTS and effort != "none":
            raise APIError(400, f"reasoning_effort must be one of none, minimal, low, medium, high; got {effort!r}",
                           param="reasoning_effort")
        if req.max_thinking_tokens is not None and req.max_thinking_tokens < 1:
            raise APIError(400, f"max_thinking_tokens must be >= 1, got {req.max_thinking_tokens}",
                           param="max_thinking_tokens")
        if (effort in (None, "none")) and req.max_thinking_tokens is None:
            return None
        if constrained:
            raise APIError(400, "a thinking budget (reasoning_effort / max_thinking_tokens) cannot be combined with "
                                "response_format or a required tool call: the grammar leaves no room for thinking",
                           param="reasoning_effort")
        fmt = "qwen3" if ("<think>" in template or "enable_thinking" in template) else "plain"
        if req.max_thinking_tokens is not None:
            return fmt, None, req.max_thinking_tokens
        return fmt, EFFORTS[effort], None

    def chat_choice(self, plan: _Plan, s, index: int) -> ChatChoice:
        text, reasoning = s.text, None
        if plan.reasoning:
            reasoning, text = T.split_reasoning(text, started=plan.think_started)
        calls: list[dict] = []
        if plan.tools:
            text, calls = T.parse_tool_calls(text, plan.names)
        finish = "tool_calls" if calls else FINISH.get(s.finish_reason, "stop")
        msg = ResponseMessage(content=text if (text or not calls) else None, reasoning_content=reasoning,
                              tool_calls=[ToolCall.model_validate(c) for c in calls] or None)
        return ChatChoice(index=index, message=msg, finish_reason=finish, kvagents=_signals(s, plan.token_ids))

    # -- text completions -----------------------------------------------------------------------------------------
    def completion_plan(self, req: CompletionRequest) -> _Plan:
        if req.echo:
            raise APIError(400, "echo=true is not supported by this server; leave it unset", param="echo")
        if req.suffix:
            raise APIError(400, "suffix (insertion) is not supported by this server; leave it unset", param="suffix")
        if req.best_of not in (None, req.n):
            raise APIError(400, f"best_of={req.best_of} is not supported (only best_of == n)", param="best_of")
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise APIError(400, "prompt is an empty list", param="prompt")
        ids = []
        for i, x in enumerate(prompts):
            try:
                ids.append(self.llm.encode_prompt(x, i))
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
        return _Plan(ids, self._params(req, req.max_tokens), self._base_components, token_ids=req.return_token_ids)

    # -- running --------------------------------------------------------------------------------------------------
    async def submit(self, plan: _Plan, on_event: Callable | None) -> list[RequestHandle]:
        """Submit every prompt of ``plan`` (one handle each); a refusal cancels those already submitted."""
        handles: list[RequestHandle] = []
        try:
            for p, ids in enumerate(plan.prompts):
                cb = None if on_event is None else (lambda ev, p=p: on_event(p, ev))
                h = await asyncio.to_thread(self.scheduler.submit, ids, plan.params, components=plan.components(),
                                            logits_processors=plan.processors(), on_text=cb)
                handles.append(h)
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return handles

    @staticmethod
    def future(h: RequestHandle) -> asyncio.Future:
        """An asyncio future of a handle's result (no thread blocks per waiting request)."""
        return h.as_asyncio()

    async def results(self, handles: list[RequestHandle], request: Request):
        """Every handle's result; a client that disconnects meanwhile cancels them."""
        futs = [self.future(h) for h in handles]
        try:
            while True:
                done, _ = await asyncio.wait(futs, timeout=0.5)
                if len(done) == len(futs):
                    return [f.result() for f in futs]
                if await request.is_disconnected():
                    raise asyncio.CancelledError
        except BaseException:
            for h in handles:
                h.cancel()
            raise

    async def stream(self, plan: _Plan, kind: str, include_usage: bool) -> AsyncIterator[str]:
        """SSE lines of a streamed request (chat or text completion), ending with ``data: [DONE]``."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        handles = await self.submit(plan, lambda p, ev: loop.call_soon_threadsafe(q.put_nowait, (p, ev)))
        n = plan.params.n
        for h in handles:
            self.future(h).add_done_callback(lambda f: q.put_nowait(None))
        rid, created = new_id("chatcmpl" if kind == "chat" else "cmpl"), now()
        split = [T.ToolCallSplitter(plan.names) if plan.tools else None for _ in range(len(handles) * n)]
        think = [T.ReasoningSplitter(started=plan.think_started) if plan.reasoning else None
                 for _ in range(len(handles) * n)]
        pending: list[list[int]] = [[] for _ in range(len(handles) * n)]  # token ids not sent yet (token_ids)

        def ids_of(index: int) -> dict | None:
            if not plan.token_ids:
                return None
            out, pending[index] = pending[index], []
            return {"token_ids": out}

        def sse(obj) -> str:
            return f"data: {obj.model_dump_json(exclude_none=False)}\n\n"

        def chunk(index: int, *, content: str | None = None, reasoning: str | None = None, role: bool = False,
                  calls=None, finish: str | None = None, extra=None):
            if kind == "chat":
                delta = ChoiceDelta(role="assistant" if role else None, content=content, tool_calls=calls,
                                    reasoning_content=reasoning)
                return ChatCompletionChunk(id=rid, created=created, model=self.name, choices=[ChatChunkChoice(
                    index=index, delta=delta, finish_reason=finish, kvagents=extra)])
            return Completion(id=rid, created=created, model=self.name, choices=[CompletionChoice(
                index=index, text=content or "", finish_reason=finish, kvagents=extra)])

        def text_chunks(index: int, text: str, final: bool = False):
            out = []
            reasoning = ""
            if think[index] is not None:
                r, text = think[index].finish() if final else think[index].feed(text)
                reasoning = r
            if split[index] is not None:
                text = split[index].feed(text)
            if reasoning:
                out.append(chunk(index, reasoning=reasoning, extra=None if text else ids_of(index)))
            if text:
                out.append(chunk(index, content=text, extra=ids_of(index)))
            return out

        try:
            if kind == "chat":
                for i in range(len(handles) * n):
                    yield sse(chunk(i, role=True, content=""))
            finished = 0
            while finished < len(handles):
                item = await q.get()
                if item is None:
                    finished += 1
                    continue
                p, ev = item
                i = p * n + ev.sample_index
                if plan.token_ids and ev.token_id is not None:
                    pending[i].append(ev.token_id)
                if ev.text:
                    for c in text_chunks(i, ev.text):
                        yield sse(c)
            usage = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
            for p, h in enumerate(handles):
                err = h.exception(timeout=0)
                if err is not None:
                    raise err
                res = h.result(timeout=0)
                for s in res.samples[0]:
                    i = p * n + s.sample_index
                    for c in text_chunks(i, "", final=True):
                        yield sse(c)
                    finish = FINISH.get(s.finish_reason, "stop")
                    if split[i] is not None:
                        rest, calls = split[i].finish()
                        if rest:
                            yield sse(chunk(i, content=rest))
                        if calls:
                            finish = "tool_calls"
                            deltas = [ToolCallDelta(index=k, id=c["id"], type="function", function=c["function"])
                                      for k, c in enumerate(calls)]
                            yield sse(chunk(i, calls=deltas))
                    yield sse(chunk(i, finish=finish, extra={**_signals(s), **(ids_of(i) or {})}))
                    usage.completion_tokens += s.generated_tokens
                usage.prompt_tokens += len(plan.prompts[p])
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            if include_usage:
                cls = ChatCompletionChunk if kind == "chat" else Completion
                yield sse(cls(id=rid, created=created, model=self.name, choices=[], usage=usage))
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as err:  # noqa: BLE001 - the stream has started: the error goes in the stream
            e = _as_api_error(err)
            yield f"data: {ErrorResponse.of(e.message, type=e.type, param=e.param, code=e.code).model_dump_json()}\n\n"
        finally:
            for h in handles:  # a client that went away (or an error) frees its rows before the next step
                h.cancel()
        yield "data: [DONE]\n\n"


def _signals(s, token_ids: bool = False) -> dict:
    """The ``kvagents`` object of a choice: raw finish reason, token counts, component outputs (scores), and with
    ``token_ids`` the generated token ids."""
    out = {"finish_reason": s.finish_reason, "prompt_tokens": s.prompt_tokens,
           "generated_tokens": s.generated_tokens, "forced_tokens": s.forced_tokens}
    out.update({k: _jsonable(v) for k, v in s.outputs.items()})
    if token_ids:
        out["token_ids"] = [int(t) for t in s.token_ids]
    return out


def _usage(plan: _Plan, results) -> Usage:
    prompt = sum(len(p) for p in plan.prompts)
    done = sum(s.generated_tokens for r in results for s in r.samples[0])
    return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)


def create_app(llm: KVModel, *, served_model_name: str | None = None, max_rows: int = 16, max_queue: int = 64,
               prefill_chunk: int = 256, default_max_tokens: int = 1024, scores: bool | None = None,
               components: Callable[[], Sequence] | None = None, fast: bool = False,
               max_seq_len: int | None = None) -> FastAPI:
    """The FastAPI app serving ``llm`` (see the module docstring for the endpoints).

    ``served_model_name``: the ``model`` clients send (default ``llm.name``). ``max_rows`` / ``max_queue`` /
    ``prefill_chunk``: the scheduler's limits (a full queue answers 429). ``default_max_tokens``: the token limit of a
    chat request that sets none (capped by the model's context). ``scores``: add the probability scores to each
    choice's ``kvagents`` object (default: on, off with ``fast``). ``components``: a factory of extra components
    given to every request (new instances per call), e.g. an observer. ``fast``: serve on the fast scheduler
    (``llm.scheduler(fast=True, ...)``, see the module docstring); ``max_seq_len``: its prompt + ``max_tokens`` bound per request (default
    min(context, 2048)).

    Example:
        >>> app = create_app(llm, served_model_name="local", max_rows=8)  # doctest: +SKIP
        >>> # httpx.post("http://127.0.0.1:8000/v1/chat/completions", json={"model": "local", "messages": [...]})
    """
    server = KVServer(llm, served_model_name=served_model_name, max_rows=max_rows, max_queue=max_queue,
                      prefill_chunk=prefill_chunk, default_max_tokens=default_max_tokens, scores=scores,
                      components=components, fast=fast, max_seq_len=max_seq_len)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(server.scheduler.shutdown, cancel=True, timeout=30)

    app = FastAPI(title="kvagents", description="OpenAI-compatible API over kvagents' continuous batching",
                  lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, err: RequestValidationError):
        msg, param = _validation_message(err)
        return APIError(400, msg, param=param).response()

    @app.exception_handler(Exception)
    async def _other(request: Request, err: Exception):
        return _as_api_error(err).response()

    @app.get("/health")
    async def health():
        sched = server.scheduler
        body = {"status": "ok" if not sched.closed else "stopped", "model": server.name, "pending": sched.pending(),
                "max_rows": sched.config.max_rows, "max_queue": sched.config.max_queue, "fast": server.fast}
        return JSONResponse(body, status_code=200 if not sched.closed else 503)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=server.name)])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        server.check_model(model_id)
        return ModelCard(id=server.name)

    async def run(plan_of, req, kind: str, request: Request):
        server.check_model(req.model)
        server.check_supported(req)
        try:
            plan = plan_of(req)
        except Exception as e:  # noqa: BLE001 - mapped to its HTTP status
            raise _as_api_error(e) from None
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            try:  # refusals (a full queue) answer with their status, before the stream starts
                agen = server.stream(plan, kind, include)
                first = await agen.__anext__()
            except StopAsyncIteration:
                first = ""
            except Exception as e:  # noqa: BLE001
                raise _as_api_error(e) from None

            async def body():
                try:
                    yield first
                    async for line in agen:
                        yield line
                finally:  # a client that went away: the generator's own finally cancels the request
                    await agen.aclose()

            return StreamingResponse(body(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            handles = await server.submit(plan, None)
            results = await server.results(handles, request)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _as_api_error(e) from None
        n = plan.params.n
        if kind == "chat":
            choices = [server.chat_choice(plan, s, s.sample_index) for s in results[0].samples[0]]
            return ChatCompletion(model=server.name, choices=choices, usage=_usage(plan, results))
        choices = [CompletionChoice(index=p * n + s.sample_index, text=s.text,
                                    finish_reason=FINISH.get(s.finish_reason, "stop"),
                                    kvagents=_signals(s, plan.token_ids))
                   for p, r in enumerate(results) for s in r.samples[0]]
        return Completion(model=server.name, choices=choices, usage=_usage(plan, results))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await run(server.chat_plan, req, "chat", request)

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request):
        return await run(server.completion_plan, req, "text", request)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> EmbeddingResponse:
        server.check_model(req.model)
        x = req.input
        items = [x] if isinstance(x, str) or (x and isinstance(x[0], int)) else list(x)
        if not items:
            raise APIError(400, "input is an empty list", param="input")
        try:
            counts = [len(server.llm.encode_prompt(t, i)) for i, t in enumerate(items)]
            vecs = await asyncio.to_thread(server.llm.embed, items)
        except Exception as e:  # noqa: BLE001
            raise _as_api_error(e) from None
        vecs = vecs.reshape(len(items), -1).numpy().astype(np.float32)
        if req.dimensions is not None and req.dimensions != vecs.shape[1]:
            raise APIError(400, f"dimensions={req.dimensions} is not available: this model's KV embeddings have "
                                f"{vecs.shape[1]} dimensions", param="dimensions")
        data = [EmbeddingData(index=i, embedding=base64.b64encode(v.tobytes()).decode() if
                              req.encoding_format == "base64" else v.tolist()) for i, v in enumerate(vecs)]
        return EmbeddingResponse(data=data, model=server.name,
                                 usage=Usage(prompt_tokens=sum(counts), total_tokens=sum(counts)))

    return app


def serve(llm: KVModel, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **app_options) -> None:
    """Run :func:`create_app` ``(llm, **app_options)`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(llm, **app_options), host=host, port=port, log_level=log_level)


__all__ = ["APIError", "KVServer", "create_app", "serve"]
