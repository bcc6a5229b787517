"""What ChatKV adds to kvagents' decode loop for agents and for LangChain's sampling options: which tool calls of
the current turn were already answered, the grammar of a plain-text answer, per-token log-probabilities (a
component) and repetition / presence / frequency penalties (a logits processor)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from kvagents import Component

#: A plain-text answer: no JSON object, tag or code fence (what a small model writes instead of an answer after a
#: tool result is the call again), with something visible on its first line (after the cue's spaces / colon).
ANSWER_TEXT_REGEX = r"[ :]*[^{<`\s:][^{<`]*"


def answered_calls(messages: Sequence[BaseMessage]) -> list[tuple[str, dict, str]]:
    """``(name, args, result)`` of the tool calls made since the last user message that a ``ToolMessage``
    answered (``result``: its text)."""
    start = max((i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=-1) + 1
    turn = messages[start:]
    results = {m.tool_call_id: m.text for m in turn if isinstance(m, ToolMessage)}
    out = []
    for m in turn:
        if isinstance(m, AIMessage):
            for c in m.tool_calls:
                if c.get("id") in results or (not c.get("id") and results):
                    out.append((c["name"], c.get("args") or {}, results.get(c.get("id"), "")))
    return out


def _norm(v: Any) -> Any:
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


def _as_value(text: str) -> Any:
    try:
        return _norm(json.loads(text))
    except (ValueError, TypeError):
        return text.strip()


def _feeds_back(args: dict, old: dict, result: str) -> bool:
    """Whether ``args`` are ``old`` with one or more values replaced by ``result`` (the same argument names,
    every changed value equal to the result): the loop a small model falls into after a tool result,
    ``add(3170, 109) -> 3279``, then ``add(3279, 109)``, ``add(3388, 109)`` ..."""
    if not result or set(args) != set(old) or not args:
        return False
    value = _as_value(result)
    changed = [k for k in args if args[k] != old[k]]
    return bool(changed) and all(args[k] == value for k in changed)


def is_repeat(call: dict, answered: Sequence[tuple]) -> bool:
    """Whether ``call`` asks again what an answered call of this turn asked (same tool, same arguments; ``3``
    equals ``3.0`` and surrounding spaces of strings do not count), or feeds an answered call's result back into
    that call's arguments (see ``_feeds_back``)."""
    args = _norm(call.get("args") or {})
    for name, a, *result in answered:
        old = _norm(a)
        if call.get("name") == name and args == old:
            return True
        if result and isinstance(args, dict) and isinstance(old, dict) and _feeds_back(args, old, result[0]):
            return True
    return False


def reuses_answered(call: dict, answered: Sequence[tuple]) -> bool:
    """Whether ``call`` only reworks numbers an answered call of this turn already used: exactly that call's
    argument values (under any tool and argument names: ``multiply(a, b)`` after ``add(a, b)``), or that call's
    result together with one of its own arguments (``multiply(a * b, a)``). A small model that has its results,
    instead of answering, wanders through such calls until its tool budget is spent. Only calls whose values are
    all numbers count: looking up another property of the same name (``get_weather(x)`` after
    ``get_population(x)``) is a new step."""
    vals = [v for v in _leaves(_norm(call.get("args") or {})) if v is not None]
    if not vals or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return False
    key = sorted(map(repr, vals))
    for _name, a, *result in answered:
        old = [v for v in _leaves(_norm(a or {})) if v is not None]
        if sorted(map(repr, old)) == key:
            return True
        res = _as_value(result[0]) if result and result[0] else None
        if res is not None and res in vals and any(v in old for v in vals if v != res):
            return True
    return False


class TokenLogprobs(Component):
    """Log-probability of every generated token under the model's distribution (``view.logits``: before
    temperature, top-k / top-p and grammar masks), with the ``top`` most likely alternatives. Output per sequence,
    OpenAI's shape: ``[{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}]``."""

    name = "logprobs"

    def __init__(self, tokenizer, top: int = 0, skip_ids: Sequence[int] = ()) -> None:
        self.tokenizer, self.top, self.skip = tokenizer, int(top), set(skip_ids)
        self._steps: list[tuple[torch.Tensor, ...]] = []

    def on_prefill(self, view) -> None:
        self._steps = []

    def on_step(self, view) -> None:
        logp = torch.log_softmax(view.logits.float(), dim=-1)
        chosen = logp.gather(-1, view.token_ids[:, None]).squeeze(-1)
        top = logp.topk(self.top, dim=-1) if self.top > 0 else None
        self._steps.append((view.token_ids.clone(), chosen, view.alive.clone(),
                            None if top is None else top.values, None if top is None else top.indices))

    def _entry(self, tid: int, lp: float) -> dict:
        tok = self.tokenizer.decode([tid])
        return {"token": tok, "logprob": lp if math.isfinite(lp) else -9999.0, "bytes": list(tok.encode("utf-8"))}

    def on_finish(self, view) -> list:
        if not self._steps:
            return [[] for _ in view.token_ids]
        ids = torch.stack([s[0] for s in self._steps], 1).tolist()
        lps = torch.stack([s[1] for s in self._steps], 1).tolist()
        alive = torch.stack([s[2] for s in self._steps], 1).tolist()
        tv = torch.stack([s[3] for s in self._steps], 1).tolist() if self.top > 0 else None
        ti = torch.stack([s[4] for s in self._steps], 1).tolist() if self.top > 0 else None
        out = []
        for b in range(len(ids)):
            rows = []
            for t in range(len(ids[b])):
                if not alive[b][t] or ids[b][t] in self.skip:
                    continue
                e = self._entry(ids[b][t], lps[b][t])
                e["top_logprobs"] = ([self._entry(i, v) for i, v in zip(ti[b][t], tv[b][t])] if tv is not None else [])
                rows.append(e)
            out.append(rows)
        self._steps = []
        return out


class Penalties:
    """Logits processor: ``repetition`` (Hugging Face's: a seen token's positive logit divided by it, a negative one
    multiplied; the prompt's tokens count as seen), ``presence`` (subtracted once from every token generated so
    far) and ``frequency`` (subtracted per occurrence), OpenAI's meaning for the last two. Rows are the engine's
    ``P * n`` sequences, prompt-major."""

    def __init__(self, prompt_ids: Sequence[Sequence[int]], n: int, *, repetition: float | None = None,
                 presence: float | None = None, frequency: float | None = None) -> None:
        self.prompt_ids = [list(p) for p in prompt_ids for _ in range(n)]
        self.repetition, self.presence, self.frequency = repetition, presence, frequency
        self.counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, prev_tokens: torch.Tensor | None, prev_valid: torch.Tensor | None):
        B, V = logits.shape
        if self.counts is None:
            self.counts = torch.zeros(B, V, device=logits.device)
            self.seen = torch.zeros(B, V, dtype=torch.bool, device=logits.device)
            for b, ids in enumerate(self.prompt_ids[:B]):
                ids = [i for i in ids if 0 <= i < V]
                if ids:
                    self.seen[b, torch.as_tensor(ids, device=logits.device)] = True
        if prev_tokens is not None:
            ok = prev_valid.to(logits.device).float() if prev_valid is not None else torch.ones(B, device=logits.device)
            self.counts.scatter_add_(1, prev_tokens.view(B, 1).to(logits.device), ok.view(B, 1))
        out = logits
        if self.repetition is not None and self.repetition != 1.0:
            seen = self.seen | (self.counts > 0)
            pen = torch.where(out > 0, out / self.repetition, out * self.repetition)
            out = torch.where(seen, pen, out)
        if self.presence:
            out = out - self.presence * (self.counts > 0).to(out.dtype)
        if self.frequency:
            out = out - self.frequency * self.counts.to(out.dtype)
        return out


def tool_rounds(messages: Sequence[BaseMessage]) -> int:
    """How many assistant turns with tool calls the current turn (since the last user message) has."""
    start = max((i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=-1) + 1
    return sum(1 for m in messages[start:] if isinstance(m, AIMessage) and m.tool_calls)


_NUMBER = re.compile(r"-?\d[\d,_]*(?:\.\d+)?")
_WORD = re.compile(r"[^\W_]{3,}")


def _is_error(m: BaseMessage) -> bool:
    return isinstance(m, ToolMessage) and (getattr(m, "status", "success") == "error"
                                           or m.text.strip().lower().startswith("error"))


def conversation_text(messages: Sequence[BaseMessage]) -> str:
    """The text a call's arguments may come from: every message's content (the user's words, tool results,
    system text), not the calls themselves, nor a tool's error message (``get_population("unknown city")``
    after ``error: unknown city`` is no value from the conversation)."""
    return "\n".join(m.text for m in messages if isinstance(m.text, str) and not _is_error(m))


def _numbers(text: str) -> set[float]:
    out = set()
    for m in _NUMBER.finditer(text):
        try:
            out.add(float(m.group().replace(",", "").replace("_", "")))
        except ValueError:
            pass
    return out


def _leaves(v: Any) -> list:
    if isinstance(v, dict):
        return [x for y in v.values() for x in _leaves(y)]
    if isinstance(v, (list, tuple)):
        return [x for y in v for x in _leaves(y)]
    return [v]


def is_grounded(call: dict, text: str, every: bool = False) -> bool:
    """Whether one of ``call``'s argument values occurs in ``text`` (the conversation): a number by value, a
    string (case-insensitive) whole or by one of its words of three or more letters. A call without argument
    values counts as grounded. A small model shown tools calls one for a question that needs none, with values
    it made up (``add(1, 2)`` for a translation, the weather in a city nobody named). ``every``: each value must
    occur (after a tool result, where a made-up step such as ``multiply(3279, 1)`` reuses the result)."""
    leaves = [v for v in _leaves(call.get("args") or {}) if v is not None and not isinstance(v, bool)]
    if not leaves:
        return True
    low = text.lower()
    nums = _numbers(text)

    def within(s: str) -> bool:  # as a whole word or phrase: "c" is not in "cloudy"
        return re.search(r"(?<!\w)" + re.escape(s) + r"(?!\w)", low) is not None

    def occurs(v) -> bool:
        if isinstance(v, (int, float)):
            return float(v) in nums
        s = str(v).strip().lower()
        if not s:
            return True
        if within(s) or any(within(w) for w in _WORD.findall(s)):
            return True
        try:
            return float(s.replace(",", "")) in nums
        except ValueError:
            return False

    return all(map(occurs, leaves)) if every else any(map(occurs, leaves))


#: A name-like span of the conversation: capitalised words in a row ("New York"), or a quoted phrase.
_NAME_SPAN = re.compile(r"\b[A-Z][^\W_]*(?:[ -][A-Z][^\W_]*)*\b")
_QUOTED = re.compile(r"['\"\u2018\u201c]([^'\"\u2019\u201d\n]{1,40})['\"\u2019\u201d]")


def _opens_sentence(text: str, i: int) -> bool:
    before = text[:i].rstrip(" \t\"'(\u2018\u201c")
    return not before or before[-1] in ".?!:;\n"


def conversation_values(messages: Sequence[BaseMessage]) -> tuple[list[str], list[float]]:
    """The values a call's arguments may take from the conversation of the current turn: ``(strings, numbers)``.
    Strings: each short tool result (at most four words, no digits) whole, the name-like spans (capitalised
    words in a row) and quoted phrases of the user's and the tools' messages, in order of appearance. Numbers:
    every number in those messages (thousands separators ignored). Tool errors give nothing."""
    start = max((i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=-1)
    texts = [m.text for m in messages[max(start, 0):] if isinstance(m, (HumanMessage, ToolMessage))
             and isinstance(m.text, str) and not _is_error(m)]
    strings: list[str] = []
    for m in messages[max(start, 0):]:
        r = m.text.strip() if isinstance(m, ToolMessage) and not _is_error(m) else ""
        if r and len(r) <= 60 and len(r.split()) <= 4 and not any(ch.isdigit() or ch == "\n" for ch in r):
            strings.append(r)
    for t in texts:
        strings += [s.group(1).strip() for s in _QUOTED.finditer(t)]
        spans = list(_NAME_SPAN.finditer(t))
        inner = {s.group() for s in spans if not _opens_sentence(t, s.start())}
        # a capitalised word that opens a sentence ("What", "It") is a name only if it occurs inside one too
        strings += [s.group() for s in spans if (s.group() in inner or " " in s.group()) and len(s.group()) >= 3]
    numbers = sorted(set().union(*[_numbers(t) for t in texts])) if texts else []
    return list(dict.fromkeys(s for s in strings if s)), numbers


def _json_number(v: float):
    return int(v) if float(v).is_integer() else v


def grounded_tools(tools: Sequence[dict], values: tuple[list[str], list[float]],
                   answered: Sequence[tuple] = ()) -> list[dict]:
    """Copies of ``tools`` (OpenAI format) whose string and number arguments are restricted, by ``enum``, to
    ``values`` (see ``conversation_values``); string values an answered call of this turn took are left out (a
    new call takes new values). A tool with a required argument no value fits is left out; an optional one
    drops that argument. Arguments of other types (objects, lists, booleans) and those with an ``enum`` or
    ``const`` of their own keep their schema."""
    strings, numbers = values
    used = {str(v).strip().lower() for _n, a, *_r in answered for v in _leaves(_norm(a or {})) if isinstance(v, str)}
    fresh = [s for s in strings if s.strip().lower() not in used]
    out = []
    for t in tools:
        fn = t["function"]
        params = json.loads(json.dumps(fn.get("parameters") or {"type": "object", "properties": {}}))
        props = params.get("properties") or {}
        required = set(params.get("required") or [])
        ok = True
        for name in list(props):
            node = props[name]
            kind = node.get("type") if isinstance(node, dict) else None
            if kind not in ("string", "number", "integer") or "enum" in node or "const" in node:
                continue
            if kind == "string":
                enum = fresh
            else:
                enum = [_json_number(v) for v in numbers if kind == "number" or float(v).is_integer()]
            if enum:
                props[name] = {**node, "enum": enum}
            elif name in required:
                ok = False
                break
            else:
                del props[name]
        if ok:
            out.append({**t, "function": {**fn, "parameters": params}})
    return out
