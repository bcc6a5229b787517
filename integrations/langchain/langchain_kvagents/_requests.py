"""One ChatKV call as the engine runs it: the prepared request, its wall-clock deadline, the model lock."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from langchain_core.messages import BaseMessage

from kvagents import Component, KVModel, StopSequence
from kvagents.grammar import GrammarMask, closing_tokens


class _Deadline(Component):
    """Stops every sequence once ``seconds`` of wall time have passed (finish reason ``"timeout"``)."""

    name = "deadline"

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def on_step(self, view):
        if view.step % 4 == 0 and time.monotonic() > self.end:
            return [StopSequence(i, "timeout") for i in range(view.token_ids.shape[0])]
        return None


class _Request:
    """One prepared engine call: prompts, params, grammar, components, and how to read the output.

    Per prompt: ``modes[p]`` (``"off"``: no tools bound; ``"none"``: bound but not to be called, call text is
    dropped; ``"auto"``; ``"required"``) and ``answered[p]``, the calls of the current turn a tool result answered
    (a repeat of one of them ends tool use). ``names``: the bound tools; ``answer_schema``: the bounded
    ``response_format`` schema (``None`` for a text answer); ``penalties``: keyword arguments of
    :class:`~langchain_kvagents._decoding.Penalties` (empty: none)."""

    def __init__(self, llm: KVModel, prompt_ids, params, grammars, components, tools_active, json_output, name):
        self.llm, self.prompt_ids, self.params = llm, prompt_ids, params
        self.grammars, self.components = grammars, components
        self.tools_active, self.json_output, self.model_name = tools_active, json_output, name
        self.controller = None
        self.modes: list[str] = ["off"] * len(prompt_ids)
        self.answered: list[list[tuple[str, dict]]] = [[] for _ in prompt_ids]
        self.names: list[str] = []
        self.answer_schema: dict | None = None
        self.penalties: dict = {}
        self.logprobs: tuple[bool, int] = (False, 0)
        self.deadline: Component | None = None
        self.cues: list[str] = [""] * len(prompt_ids)  # text already forced at the start of the answer
        self.plain_prompts: list[list[int] | None] = [None] * len(prompt_ids)  # the prompt without the tools
        self.contexts: list[str] = [""] * len(prompt_ids)  # the conversation's text (where arguments come from)
        self.values: list[tuple[list[str], list[float]]] = [([], []) for _ in prompt_ids]  # its strings, numbers
        self.tools: list[dict] = []  # the bound tools (OpenAI format)
        self.parallel: bool = False
        self.tpc: list[float] = [1.0] * len(prompt_ids)  # tokens per character of each prompt's user text

    def processors(self) -> list:
        out = []
        if self.penalties:
            from ._decoding import Penalties

            out.append(Penalties(self.prompt_ids, self.params.n, **self.penalties))
        if all(g is None for g in self.grammars):
            return out
        # the last `reserve` tokens of the budget steer the grammar to completion (see GrammarMask._close)
        reserve = min(24, self.params.max_new_tokens // 3)
        return out + [GrammarMask(self.grammars, n=self.params.n, budget=self.params.max_new_tokens, reserve=reserve,
                                  closing_tokens=closing_tokens(self.llm), stop_token_ids=self.llm.engine.eos_token_ids)]


class _Acquired:
    """``with``: hold the model lock, waiting at most ``timeout`` seconds."""

    def __init__(self, llm: KVModel, timeout: float | None) -> None:
        self.llm, self.timeout = llm, timeout

    def __enter__(self):
        ok = self.llm._lock.acquire(timeout=-1 if self.timeout is None else self.timeout)
        if not ok:
            raise TimeoutError(
                f"model {self.llm.name!r} stayed busy for more than timeout={self.timeout}s; "
                "raise the timeout or use fewer concurrent callers"
            )
        return self

    def __exit__(self, *exc) -> None:
        self.llm._lock.release()


def _key(messages: Sequence[BaseMessage], stop, kwargs: dict) -> str:
    body = [(type(m).__name__, m.content, getattr(m, "tool_calls", None)) for m in messages]
    kw = {k: v for k, v in kwargs.items() if k not in ("run_manager", "components") and not k.startswith("ls_")}
    return json.dumps([body, stop, kw], sort_keys=True, default=str)
