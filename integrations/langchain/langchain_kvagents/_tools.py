"""Tool calls and structured output under a grammar: the schemas, instructions and structural tags ChatKV builds
from LangChain's tools and ``response_format``, with string lengths bounded so an answer fits its token budget."""

from __future__ import annotations

import json
from collections.abc import Sequence

from langchain_core.messages import BaseMessage, HumanMessage

from ._messages import BARE_OPEN, BARE_OPEN_PRETTY, TOOL_OPEN


def _add_system(chat: list[dict], text: str) -> None:
    if chat and chat[0]["role"] == "system":
        chat[0] = {**chat[0], "content": f"{text}\n\n{chat[0]['content']}"}
    else:
        chat.insert(0, {"role": "system", "content": text})


def _response_schema(response_format: dict) -> dict:
    """The JSON schema of ``response_format``: ``{"type": "json_schema", "schema": ...}``, OpenAI's
    ``{"type": "json_schema", "json_schema": {"schema": ...}}``, or ``{"type": "json_object"}`` (any object)."""
    if not isinstance(response_format, dict) or response_format.get("type") not in ("json_schema", "json_object"):
        raise ValueError(
            f"response_format {response_format!r} is not supported; use {{'type': 'json_schema', 'schema': {{...}}}} "
            "or {'type': 'json_object'}"
        )
    schema = response_format.get("schema") or (response_format.get("json_schema") or {}).get("schema")
    return schema or {"type": "object"}


def _json_instruction(response_format: dict, with_tools: bool = False) -> str:
    schema = _response_schema(response_format)
    head = "When you answer (instead of calling a tool), reply" if with_tools else "Reply"
    if schema != {"type": "object"}:
        return f"{head} with one JSON object that follows this JSON schema:\n" + json.dumps(schema, ensure_ascii=False)
    return f"{head} with one JSON object."


def _normalize_tool_choice(choice, names: list[str]):
    if choice is None or choice == "auto":
        return "auto" if choice else None
    if choice is True or choice in ("any", "required"):
        return "required"
    if choice == "none" or choice is False:
        return "none"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
    else:
        name = choice
    if name not in names:
        raise ValueError(f"tool_choice {choice!r} names no bound tool; bound tools: {names}")
    return {"name": name}


def bound_strings(schema: dict, budget: int, overhead: int = 0, tokens_per_char: float = 1.0) -> dict:
    """A copy of ``schema`` whose string fields without a tighter ``maxLength`` get one, so that a complete
    object fits in ``budget`` generated tokens (small models repeat themselves inside a string until the token
    budget runs out, leaving truncated JSON). Each of the ``k`` string fields gets
    ``(budget - overhead - 4 * properties - 8) // k`` tokens, i.e. that many characters divided by
    ``tokens_per_char`` (1 for ASCII text; more for scripts a byte-level tokenizer splits, measured on the
    prompt), at least 4."""
    schema = json.loads(json.dumps(schema))
    strings, props = [], 0

    def walk(node):
        nonlocal props
        if isinstance(node, dict):
            if node.get("type") == "string" or (isinstance(node.get("type"), list) and "string" in node["type"]):
                if "enum" not in node and "const" not in node and "pattern" not in node and "format" not in node:
                    strings.append(node)
            props += len(node.get("properties") or {})
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    if strings:
        per = max(4, int((budget - overhead - 4 * props - 8) // len(strings) / max(tokens_per_char, 1.0)))
        for node in strings:
            node["maxLength"] = min(node.get("maxLength", per), per)
    return schema


def _tokens_per_char(tok, messages: Sequence[BaseMessage]) -> float:
    """Tokens per character of the non-ASCII text of the last user message (1.0 when it has none)."""
    text = next((m.text for m in reversed(messages) if isinstance(m, HumanMessage)), "")
    wide = "".join(ch for ch in text if ord(ch) > 127)
    if not wide:
        return 1.0
    return max(1.0, len(tok(wide, add_special_tokens=False)["input_ids"]) / len(wide))


def _tool_tag(tools: list[dict], required: bool, parallel: bool, budget: int = 256, tpc: float = 1.0,
              answer_schema: dict | None = None) -> dict:
    """xgrammar structural tag for Hermes-style ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

    When the call is optional (``auto``) a bare ``{"name": ..., "arguments": ...}`` object (compact, or
    pretty-printed with two-space indent as in a ```json block) also triggers the tool's schema: small models (qwen2.5-coder-0.5b) that decide to call a tool often write the JSON without the
    tags their template asks for.

    ``answer_schema`` (tools together with a ``response_format``): the output is either tool calls or one JSON
    object valid for that schema, nothing else.
    """
    tags, bare = [], []
    for t in tools:
        fn = t["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not params.get("properties"):
            params = {**params, "type": "object", "properties": {}}
        params = bound_strings(params, budget, overhead=24, tokens_per_char=tpc)
        tags.append({
            "type": "tag",
            "begin": f'{TOOL_OPEN}\n{{"name": {json.dumps(fn["name"])}, "arguments": ',
            "content": {"type": "json_schema", "json_schema": params, "max_whitespace_cnt": 1},
            "end": "}\n</tool_call>",
        })
        for begin, end, ws in ((f'{BARE_OPEN}{json.dumps(fn["name"])}, "arguments": ', "}", 1),
                               (f'{BARE_OPEN_PRETTY}{json.dumps(fn["name"])},\n  "arguments": ', "\n}", 8)):
            bare.append({
                "type": "tag",
                "begin": begin,
                "content": {"type": "json_schema", "json_schema": params, "max_whitespace_cnt": ws},
                "end": end,
            })
    triggers = [TOOL_OPEN]
    if not required:
        tags, triggers = tags + bare, [TOOL_OPEN, BARE_OPEN, BARE_OPEN_PRETTY]
    if answer_schema is not None and not required:
        calls = {"type": "triggered_tags", "triggers": triggers, "tags": tags, "at_least_one": True,
                 "stop_after_first": not parallel}
        answer = {"type": "json_schema", "json_schema": answer_schema, "max_whitespace_cnt": 1}
        return {"type": "structural_tag", "format": {"type": "or", "elements": [calls, answer]}}
    return {
        "type": "structural_tag",
        "format": {
            "type": "triggered_tags",
            "triggers": triggers,
            "tags": tags,
            "at_least_one": required,
            "stop_after_first": not parallel,
        },
    }

