"""Chat messages and tools for the chat template, and tool calls parsed out of generated text.

Tools reach the model the way its chat template supports: a template that renders ``tools`` itself (Qwen2.5,
Qwen3, Llama 3.1, ...) gets them through ``apply_chat_template(tools=...)``; any other template gets a system prompt
describing the Hermes / Qwen format. Either way the model is asked to answer with
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, which :func:`parse_tool_calls` (whole text) and
:class:`ToolCallSplitter` (streaming) turn into OpenAI ``tool_calls``. Under ``tool_choice="required"`` or a named
function, :func:`tool_call_tag` gives the xgrammar structural tag that makes the call's JSON valid by construction.

Example:
    >>> text = 'Let me look. <tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>'
    >>> content, calls = parse_tool_calls(text)
    >>> content, calls[0]["function"]["name"], calls[0]["function"]["arguments"]
    ('Let me look.', 'get_weather', '{"city": "Paris"}')
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from .protocol import ChatMessage

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def native_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders ``tools`` itself."""
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def render_tool_call(name: str, args: dict) -> str:
    """A call as the model writes it: ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``."""
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"{TOOL_OPEN}\n{body}\n{TOOL_CLOSE}"


def tools_system_prompt(tools: Sequence[dict]) -> str:
    """Tool instructions for chat templates without native tool support (the Hermes / Qwen format)."""
    lines = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return (
        "You are a helpful assistant that can call tools. To call a tool, reply with\n"
        f'{TOOL_OPEN}\n{{"name": <tool name>, "arguments": <arguments as a JSON object>}}\n{TOOL_CLOSE}\n'
        "and nothing else. Otherwise reply normally.\n\n"
        f"Tools:\n<tools>\n{lines}\n</tools>"
    )


def _arguments(raw: str | dict, where: str) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        args = json.loads(raw or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: function.arguments {raw[:80]!r} is not valid JSON ({e})") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where}: function.arguments must be a JSON object, got {raw[:80]!r}")
    return args


def template_messages(messages: Sequence[ChatMessage], *, native: bool) -> list[dict[str, Any]]:
    """Chat-template dicts of OpenAI messages.

    ``developer`` becomes ``system``. With a ``native`` template an assistant's ``tool_calls`` and ``tool`` results
    are passed as such (arguments as objects, as transformers' templates expect); otherwise calls become
    ``<tool_call>`` text in the assistant turn and results a user turn holding a ``<tool_response>`` block.

    Example:
        >>> m = [ChatMessage(role="developer", content="Be brief."), ChatMessage(role="user", content="Hi")]
        >>> template_messages(m, native=False)
        [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
    """
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        text = m.text()
        if m.role in ("system", "developer"):
            out.append({"role": "system", "content": text})
        elif m.role == "user":
            out.append({"role": "user", "content": text})
        elif m.role == "assistant":
            calls = [(c.function.name, _arguments(c.function.arguments, f"{where}.tool_calls[{j}]"))
                     for j, c in enumerate(m.tool_calls or [])]
            if native and calls:
                out.append({"role": "assistant", "content": text,
                            "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}}
                                           for n, a in calls]})
            else:
                rendered = "\n".join(render_tool_call(n, a) for n, a in calls)
                out.append({"role": "assistant", "content": (text + "\n" + rendered).strip() if rendered else text})
        else:  # tool / function results
            if native:
                out.append({"role": "tool", "content": text, **({"name": m.name} if m.name else {})})
            else:
                head = f'<tool_response name="{m.name}">' if m.name else "<tool_response>"
                out.append({"role": "user", "content": f"{head}\n{text}\n</tool_response>"})
    return out


def add_system(chat: list[dict], text: str) -> None:
    """Prepend ``text`` to the system message (one is inserted when there is none)."""
    if chat and chat[0]["role"] == "system":
        chat[0] = {**chat[0], "content": f"{text}\n\n{chat[0]['content']}"}
    else:
        chat.insert(0, {"role": "system", "content": text})


def _call(body: str, names: set[str] | None) -> dict | None:
    """An OpenAI tool call from the JSON of one call, or ``None`` when it is not one."""
    try:
        obj, end = json.JSONDecoder().raw_decode(body.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def parse_tool_calls(text: str, names: Sequence[str] | None = None) -> tuple[str, list[dict]]:
    """Split generated ``text`` into its content and OpenAI tool calls.

    Every ``<tool_call>...</tool_call>`` block (the last one may lack its closing tag: the model stopped after the
    JSON) whose JSON is ``{"name": <str>, "arguments": {...}}`` becomes a call (``arguments`` a JSON string, as in
    OpenAI's API); a block that does not parse stays in the content. Without tags, a text that is one such JSON object
    naming one of ``names`` is a call too (small models often drop the tags).

    Example:
        >>> parse_tool_calls('{"name": "f", "arguments": {}}', names=["f"])[1][0]["function"]
        {'name': 'f', 'arguments': '{}'}
        >>> parse_tool_calls("plain answer")
        ('plain answer', [])
    """
    known = set(names) if names is not None else None
    calls, kept, rest = [], [], text
    while True:
        k = rest.find(TOOL_OPEN)
        if k < 0:
            kept.append(rest)
            break
        kept.append(rest[:k])
        body = rest[k + len(TOOL_OPEN):]
        e = body.find(TOOL_CLOSE)
        inner, rest = (body, "") if e < 0 else (body[:e], body[e + len(TOOL_CLOSE):])
        call = _call(inner, None)
        if call is None:
            kept.append(TOOL_OPEN + inner + ("" if e < 0 else TOOL_CLOSE))
        else:
            calls.append(call)
    content = "".join(kept).strip() if calls else "".join(kept)
    if not calls and known:
        stripped = text.strip()
        for fence in ("```json", "```"):
            if stripped.startswith(fence) and stripped.endswith("```") and len(stripped) > 2 * len(fence):
                stripped = stripped[len(fence):-3].strip()
                break
        if stripped.startswith("{"):
            try:
                _, end = json.JSONDecoder().raw_decode(stripped)
            except ValueError:
                end = -1
            if end == len(stripped):
                call = _call(stripped, known)
                if call is not None:
                    return "", [call]
    return content, calls


class ToolCallSplitter:
    """Streaming counterpart of :func:`parse_tool_calls`: ``feed(delta)`` returns the content safe to show now
    (text before a ``<tool_call>`` tag; a possible partial tag is held back), everything from the first tag on is
    kept; ``finish()`` returns ``(content_left, tool_calls)``.

    Example:
        >>> s = ToolCallSplitter()
        >>> s.feed("Sure <tool"), s.feed('_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
        ('Sure ', '')
        >>> rest, calls = s.finish(); rest, calls[0]["function"]["arguments"]
        ('', '{"x": 1}')
    """

    def __init__(self, names: Sequence[str] | None = None) -> None:
        self.names = list(names) if names is not None else None
        self.shown = ""  # content released so far
        self.buf = ""  # held back: a partial tag, or everything from the first tag on
        self.in_call = False

    def feed(self, delta: str) -> str:
        self.buf += delta
        if self.in_call:
            return ""
        k = self.buf.find(TOOL_OPEN)
        if k >= 0:
            out, self.buf, self.in_call = self.buf[:k], self.buf[k:], True
        else:
            keep = max((j for j in range(1, len(TOOL_OPEN)) if self.buf.endswith(TOOL_OPEN[:j])), default=0)
            out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        self.shown += out
        return out

    def finish(self) -> tuple[str, list[dict]]:
        full = self.shown + self.buf
        content, calls = parse_tool_calls(full, self.names)
        if not calls:
            return self.buf, []
        # what was shown stays shown; the rest of the content (text between or after calls) comes now
        rest = content[len(self.shown.strip()):] if content.startswith(self.shown.strip()) else ""
        return rest.strip(), calls


def split_reasoning(text: str, *, started: bool) -> tuple[str | None, str]:
    """``(reasoning, answer)`` of a text in the ``<think>...</think>`` format (``started``: the prompt or a forced
    cue opened the block, so the text may begin inside it). ``(None, text)`` when there is no block.

    Example:
        >>> split_reasoning("<think>\\nhmm\\n</think>\\n\\n42", started=False)
        ('hmm', '42')
    """
    body = text
    if body.lstrip().startswith(THINK_OPEN):
        body = body.lstrip()[len(THINK_OPEN):]
    elif not started:
        return None, text
    k = body.find(THINK_CLOSE)
    if k < 0:
        return body.strip(), ""
    return body[:k].strip(), body[k + len(THINK_CLOSE):].lstrip()


class ReasoningSplitter:
    """Streaming counterpart of :func:`split_reasoning`: ``feed(delta)`` returns ``(reasoning, content)`` deltas,
    holding back a possible partial ``</think>``.

    Example:
        >>> s = ReasoningSplitter(started=True)
        >>> s.feed("<think>\\nhm"), s.feed("m</thi"), s.feed("nk>\\n\\n42")
        (('hm', ''), ('m', ''), ('', '42'))
    """

    def __init__(self, *, started: bool) -> None:
        self.state = "open" if started else "start"  # start: a block may open; open: inside it; done: answer
        self.buf = ""
        self.begun = False  # reasoning text was released (leading newlines are dropped until then)

    def feed(self, delta: str) -> tuple[str, str]:
        self.buf += delta
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(THINK_OPEN):
                self.buf, self.state = head[len(THINK_OPEN):], "open"
            elif head and not THINK_OPEN.startswith(head):
                self.state = "done"
            else:
                return "", ""
        if self.state == "open":
            if self.buf.startswith(THINK_OPEN):
                self.buf = self.buf[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(self.buf):
                return "", ""
            if not self.begun:
                self.buf = self.buf.lstrip("\n")
            k = self.buf.find(THINK_CLOSE)
            if k >= 0:
                reasoning, self.buf, self.state = self.buf[:k], self.buf[k + len(THINK_CLOSE):].lstrip("\n"), "done"
                self.begun = True
                return reasoning.rstrip("\n"), self._answer()
            keep = max((j for j in range(1, len(THINK_CLOSE)) if self.buf.endswith(THINK_CLOSE[:j])), default=0)
            out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
            if out:
                self.begun = True
            return out, ""
        return "", self._answer()

    def _answer(self) -> str:
        out, self.buf = self.buf, ""
        return out

    def finish(self) -> tuple[str, str]:
        out, self.buf = self.buf, ""
        return (out, "") if self.state == "open" else ("", out)


def tool_call_tag(tools: Sequence[dict], *, required: bool, parallel: bool) -> dict:
    """The xgrammar structural tag for ``<tool_call>\\n{"name": ..., "arguments": <schema>}\\n</tool_call>``.

    ``required``: at least one call (``tool_choice="required"`` or a named function, whose single tool is passed);
    otherwise free text until a ``<tool_call>`` trigger, then the tool's schema. ``parallel=False``: one call at
    most. Strings get no length bound: pass schemas with ``maxLength`` / ``enum`` where a budget matters.
    """
    tags = []
    for t in tools:
        fn = t["function"]
        params = dict(fn.get("parameters") or {})
        params.setdefault("type", "object")
        params.setdefault("properties", {})
        tags.append({
            "type": "tag",
            "begin": f'{TOOL_OPEN}\n{{"name": {json.dumps(fn["name"])}, "arguments": ',
            "content": {"type": "json_schema", "json_schema": params, "max_whitespace_cnt": 1},
            "end": f"}}\n{TOOL_CLOSE}",
        })
    return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": [TOOL_OPEN], "tags": tags,
                                                 "at_least_one": required, "stop_after_first": not parallel}}
