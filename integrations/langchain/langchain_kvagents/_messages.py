"""LangChain messages -> chat-template dicts, tool prompts, and parsing model output into text / reasoning /
tool calls (incrementally, for streaming)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from kvagents.serving.tools import TOOL_CLOSE, TOOL_OPEN  # one tool-prompt format for both

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
BARE_OPEN = '{"name": '  # a tool call written as a bare JSON object (no tags)
BARE_OPEN_PRETTY = '{\n  "name": '  # ... pretty-printed (as in a ```json block)
BARE_OPENS = (BARE_OPEN, BARE_OPEN_PRETTY)
FENCES = ("```json\n", "```\n")  # small models wrap a bare call in a code fence

#: Content block types that are only bookkeeping for other providers and carry nothing for a text model.
_SKIPPED_BLOCKS = {"tool_use", "tool_call", "thinking", "reasoning", "redacted_thinking", "server_tool_call"}


class UnsupportedMessageError(TypeError):
    """A message or content block the local text model cannot take (image, audio, file, unknown type)."""


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content or []):
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append(block.get("text", ""))
        elif kind in _SKIPPED_BLOCKS:
            continue
        else:
            raise UnsupportedMessageError(
                f"{where}: content block {i} has type {kind!r}; kvagents chat models take text only "
                "(no image, audio or file inputs). Pass the content as text."
            )
    return "".join(parts)


def render_tool_call(name: str, args: dict) -> str:
    return f'{TOOL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": {json.dumps(args, ensure_ascii=False)}}}\n{TOOL_CLOSE}'




def to_chat_messages(messages: Sequence[BaseMessage], *, native_tools: bool) -> list[dict[str, Any]]:
    """Chat-template dicts of LangChain messages.

    ``native_tools``: the template renders ``tools`` / ``tool_calls`` / the ``tool`` role itself (Qwen-style);
    otherwise tool calls become ``<tool_call>`` text in the assistant turn and tool results a user turn with a
    ``<tool_response>`` block.
    """
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"message {i} ({type(m).__name__})"
        if isinstance(m, SystemMessage):
            out.append({"role": "system", "content": _text_of(m.content, where)})
        elif isinstance(m, HumanMessage):
            out.append({"role": "user", "content": _text_of(m.content, where)})
        elif isinstance(m, AIMessage):
            text = _text_of(m.content, where)
            calls = [(c["name"], c.get("args") or {}) for c in m.tool_calls]
            if native_tools and calls:
                out.append({
                    "role": "assistant",
                    "content": text,
                    "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls],
                })
            else:
                rendered = "\n".join(render_tool_call(n, a) for n, a in calls)
                out.append({"role": "assistant", "content": (text + "\n" + rendered).strip() if rendered else text})
        elif isinstance(m, (ToolMessage, FunctionMessage)):
            text = _text_of(m.content, where)
            if isinstance(m, ToolMessage) and getattr(m, "status", "success") == "error":
                text = f"Error: {text}" if not text.lower().startswith("error") else text
            if native_tools:
                out.append({"role": "tool", "content": text})
            else:
                name = getattr(m, "name", None)
                head = f'<tool_response name="{name}">' if name else "<tool_response>"
                out.append({"role": "user", "content": f"{head}\n{text}\n</tool_response>"})
        elif isinstance(m, ChatMessage):
            out.append({"role": m.role, "content": _text_of(m.content, where)})
        else:
            raise UnsupportedMessageError(
                f"{where}: unsupported message type {type(m).__name__!r}; use SystemMessage, HumanMessage, "
                "AIMessage, ToolMessage or ChatMessage"
            )
    return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_call(body: str, call_id: str | None = None) -> tuple[dict | None, dict | None]:
    """``(tool_call, None)`` or ``(None, invalid_tool_call)`` from the JSON between the tool-call tags."""
    call_id = call_id or new_call_id()
    try:
        obj, end = json.JSONDecoder().raw_decode(body)  # a complete object counts even if the closing tag was cut
        if body[end:].strip() and not TOOL_CLOSE.startswith(body[end:].strip()):
            raise ValueError(f"unexpected text after the call: {body[end:].strip()[:40]!r}")
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise ValueError("not an object with a string 'name'")
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            args = json.loads(args)
        if not isinstance(args, dict):
            raise ValueError("'arguments' is not an object")
        return {"name": obj["name"], "args": args, "id": call_id, "type": "tool_call"}, None
    except (ValueError, TypeError) as e:
        return None, {"name": None, "args": body, "id": call_id, "error": f"invalid tool call: {e}",
                      "type": "invalid_tool_call"}


def _is_bare_call(body: str, names: set[str] | None) -> bool:
    """Whether a bare JSON object is a tool call: ``{"name": <a bound tool>, "arguments": {...}}`` (any object
    with a ``name`` when ``names`` is None). A schema-shaped answer whose first key is ``name`` is not one."""
    try:
        obj, _ = json.JSONDecoder().raw_decode(body)
    except ValueError:
        return False
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return False
    if names is None:
        return True
    return obj["name"] in names and ("arguments" in obj or "parameters" in obj)


#: The head of a call object up to its arguments value: ``{"name": "f", "arguments": `` (group 1: the name).
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')


def _object_end(text: str) -> int | None:
    """Index just past the JSON object ``text`` starts with (``None`` while it is incomplete)."""
    depth, in_str, esc = 0, False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class OutputSplitter:
    """Splits generated text, as it grows, into answer text, reasoning (``<think>...</think>``, or a plain
    format's forced cue ... end-of-thinking sequence: ``think_tags``) and tool calls (``<tool_call>...</tool_call>``,
    or a bare ``{"name": ..., "arguments": ...}`` object, also inside a ```json fence, which is dropped with it).
    ``feed(delta)`` returns the new ``(text, reasoning)`` safe to show; tags and partial tags are held back;
    tool-call bodies are collected in ``tool_calls`` / ``invalid_tool_calls``.

    While a call is decoded its pieces land in ``call_deltas`` (``{"index", "id", "name", "args"}``: the name
    first, then the arguments' JSON text as it grows), and each finished call in ``finished`` (``(index, call)``;
    ``call`` is ``None`` for an invalid one), for streaming ``tool_call_chunks``. ``names``: the bound tools; a
    bare object naming none of them (e.g. a JSON answer whose first key is ``name``) stays text.
    ``finish()`` flushes (an unterminated tool call becomes an invalid one)."""

    def __init__(self, *, reasoning: bool, tools: bool, think_tags: tuple[str, str] = (THINK_OPEN, THINK_CLOSE),
                 keep_open: bool = False, names: Sequence[str] | None = None) -> None:
        self.reasoning, self.tools = reasoning, tools
        self.think_open, self.think_close = think_tags
        self.keep_open = keep_open  # the opening tag is reasoning text (plain formats' forced cue)
        self.names = set(names) if names is not None else None
        self.buf = ""
        self.state = "text"
        self.tool_calls: list[dict] = []
        self.invalid_tool_calls: list[dict] = []
        self.call_deltas: list[dict] = []
        self.finished: list[tuple[int, dict | None]] = []
        self.text = ""
        self.reasoning_text = ""
        self._cur: dict | None = None  # the call being decoded
        self._fence = ""  # the ```json fence that opened it
        self._indices = 0

    def _opens(self) -> list[str]:
        if not self.tools:
            return [self.think_open] if self.reasoning else []
        calls = [TOOL_OPEN, *BARE_OPENS]
        return ([self.think_open] if self.reasoning else []) + calls + [f + c for f in FENCES for c in calls]

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.buf += delta
        text_out, reason_out = "", ""
        while True:
            if self.state == "text":
                opens = self._opens()
                hits = [(self.buf.find(t), -len(t), t) for t in opens if self.buf.find(t) >= 0]
                if hits:
                    k, _, tag = min(hits)
                    text_out += self.buf[:k]
                    self.buf = self.buf[k + len(tag):]
                    fence = next((f for f in FENCES if tag.startswith(f) and len(tag) > len(f)), "")
                    core = tag[len(fence):]
                    self.state = "think" if core == self.think_open and self.reasoning else (
                        "bare" if core in BARE_OPENS else "tool")
                    if self.state == "think" and self.keep_open:
                        reason_out += tag
                    if self.state in ("bare", "tool"):
                        self._fence = fence
                        self._cur = {"id": new_call_id(), "index": None, "head": None, "sent": 0, "text": False,
                                     "bare": self.state == "bare"}
                    if self.state == "bare":
                        self.buf = core + self.buf
                    continue
                keep = 0 if final else max((j for t in opens for j in range(1, len(t)) if self.buf.endswith(t[:j])),
                                           default=0)
                text_out += self.buf[: len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                break
            if self.state == "fence":  # drop the ``` that closes a fenced call
                rest = self.buf.lstrip(" \n")
                if rest.startswith("```"):
                    self.buf = rest[3:].lstrip("\n")
                elif rest and "```".startswith(rest) and not final:
                    break
                elif not rest and not final:
                    break
                self.state = "text"
                continue
            if self.state == "bare":  # complete when the buffer starts with one whole JSON object
                try:
                    _, end = json.JSONDecoder().raw_decode(self.buf)
                except ValueError:
                    self._progress(self.buf)
                    if final:
                        if self._cur["index"] is None:
                            text_out += self._fence + self.buf
                        else:
                            self._add_call(self.buf)
                        self.buf = ""
                        self.state = "text"
                    break
                body = self.buf[:end]
                self.buf = self.buf[end:]
                if not _is_bare_call(body, self.names):
                    text_out += self._fence + body
                    self.state = "text"
                    continue
                self._add_call(body)
                self.buf = self.buf.lstrip("\n")
                self.state = "fence" if self._fence else "text"
                continue
            close = self.think_close if self.state == "think" else TOOL_CLOSE
            k = self.buf.find(close)
            if k >= 0:
                if self.state == "think":
                    reason_out += self.buf[:k]
                    self.buf = self.buf[k + len(close):]
                    self.state = "text"
                else:
                    self._add_call(self.buf[:k])
                    self.buf = self.buf[k + len(close):].lstrip("\n")
                    self.state = "fence" if self._fence else "text"
                continue
            if final:
                if self.state == "think":
                    reason_out += self.buf
                else:
                    self._add_call(self.buf)
                self.buf = ""
                self.state = "text"
                break
            if self.state == "think":
                keep = max((j for j in range(1, len(close)) if self.buf.endswith(close[:j])), default=0)
                reason_out += self.buf[: len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
            else:
                self._progress(self.buf)
            break
        self.text += text_out
        self.reasoning_text += reason_out
        return text_out, reason_out

    def _progress(self, body: str) -> None:
        """Record the new pieces of the call being decoded (its name once complete, then its arguments' text)."""
        cur = self._cur
        if cur is None or cur["text"]:
            return
        body = body.lstrip()
        if cur["head"] is None:
            m = _CALL_HEAD.match(body)
            if not m:
                return
            try:
                name = json.loads(f'"{m.group(1)}"')
            except ValueError:
                return
            if cur["bare"] and self.names is not None and name not in self.names:
                cur["text"] = True
                return
            cur["head"], cur["index"] = m.end(), self._indices
            self._indices += 1
            self.call_deltas.append({"index": cur["index"], "id": cur["id"], "name": name, "args": ""})
        args = body[cur["head"]:]
        if not args.startswith("{"):
            return  # a string or other value: sent whole when the call completes
        end = _object_end(args)
        upto = len(args) if end is None else end
        if upto > cur["sent"]:
            self.call_deltas.append({"index": cur["index"], "id": None, "name": None, "args": args[cur["sent"]:upto]})
            cur["sent"] = upto

    def _add_call(self, body: str) -> None:
        cur = self._cur or {"id": new_call_id(), "index": None, "head": None, "sent": 0, "text": False, "bare": False}
        self._cur = cur
        body = body.strip()
        call, bad = parse_tool_call(body, cur["id"])
        if call is not None:
            self._progress(body)
            if cur["index"] is None:  # a form the head pattern does not match: the whole call at once
                cur["index"] = self._indices
                self._indices += 1
                self.call_deltas.append({"index": cur["index"], "id": cur["id"], "name": call["name"],
                                         "args": json.dumps(call["args"], ensure_ascii=False)})
            elif not body[cur["head"]:].startswith("{"):  # arguments given as a JSON string
                self.call_deltas.append({"index": cur["index"], "id": None, "name": None,
                                         "args": json.dumps(call["args"], ensure_ascii=False)})
            self.tool_calls.append(call)
        else:
            self.invalid_tool_calls.append(bad)
        self.finished.append((cur["index"], call))
        self._cur = None

    def finish(self) -> tuple[str, str]:
        return self.feed("", final=True)
