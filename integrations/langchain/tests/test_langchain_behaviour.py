"""ChatKV behaviour beyond the standard suites: concurrency, batching, errors, recovery, grammar guarantees.

Runs on a tiny random Llama saved with smollm2-135m's tokenizer (chat template included), so it is fast and the
grammar, not the model, is what makes tool calls / JSON valid.
"""
# ruff: noqa: F811  (pytest fixtures imported from lc_tiny are parameters of the tests)

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_kvagents import ChatKV, UnsupportedMessageError
from langchain_kvagents._messages import OutputSplitter
from lc_tiny import tiny_dir  # noqa: F401 - fixture
from pydantic import BaseModel, Field

from kvagents.grammar import GrammarError
from kvagents.registry import UnknownModelError


@pytest.fixture
def chat(tiny_dir):
    return ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0, max_tokens=12)


PROMPTS = ["Hello", "What is 2+2?", "Name a colour.", "Tell me a joke.", "Hi there", "Count to three.",
           "Why is the sky blue?", "Say yes."]


def test_eight_threads_equal_serial_calls(chat):
    serial = [chat.invoke(p).content for p in PROMPTS]
    with ThreadPoolExecutor(8) as ex:
        threaded = list(ex.map(lambda p: chat.invoke(p).content, PROMPTS))
    assert threaded == serial
    assert len(set(serial)) > 1  # the prompts do lead to different outputs


def test_async_concurrent_calls_equal_serial(chat):
    serial = [chat.invoke(p).content for p in PROMPTS[:4]]

    async def main():
        return await asyncio.gather(*(chat.ainvoke(p) for p in PROMPTS[:4]))

    assert [m.content for m in asyncio.run(main())] == serial


def test_batch_runs_one_engine_call_and_matches_serial(chat):
    serial = [chat.invoke(p).content for p in PROMPTS[:3]]
    calls = chat.llm.engine.forward_calls
    out = chat.batch(PROMPTS[:3])
    used = chat.llm.engine.forward_calls - calls
    assert [m.content for m in out] == serial
    assert used <= 12 + 1  # one prefill + at most max_tokens - 1 decode steps for all three together
    assert all(isinstance(m, AIMessage) and m.usage_metadata["output_tokens"] > 0 for m in out)

    async def main():
        return await chat.abatch(PROMPTS[:3])

    assert [m.content for m in asyncio.run(main())] == serial


def test_stream_aggregates_to_invoke(chat):
    full = None
    chunks = list(chat.stream("Hello"))
    for c in chunks:
        full = c if full is None else full + c
    assert full.content == chat.invoke("Hello").content
    assert chunks[-1].chunk_position == "last"
    assert sum(1 for c in chunks if c.usage_metadata and c.usage_metadata["input_tokens"]) == 1
    assert full.response_metadata["model_name"]


def test_usage_counts_tokens(chat):
    msg = chat.invoke("Hello")
    prompt = chat.llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}],
                                                    add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert msg.usage_metadata["input_tokens"] == len(prompt)
    assert msg.usage_metadata["output_tokens"] == 12 or msg.response_metadata["finish_reason"] == "stop"


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="smollm2-135mm") as err:
        ChatKV(model="smollm2-135mm")
    assert isinstance(err.value.__cause__ or err.value, (UnknownModelError, Exception))
    assert "Did you mean 'smollm2-135m'" in str(err.value)


def test_unsupported_inputs_are_clear_errors_and_the_model_stays_usable(chat):
    before = chat.invoke("Hello").content
    image = HumanMessage(content=[{"type": "text", "text": "What is this?"},
                                  {"type": "image", "base64": "AAAA", "mime_type": "image/png"}])
    with pytest.raises(UnsupportedMessageError, match="'image'"):
        chat.invoke([image])

    class OddMessage(BaseMessage):
        type: str = "odd"

    with pytest.raises(UnsupportedMessageError, match="OddMessage"):
        chat.invoke([OddMessage(content="hi")])
    assert chat.invoke("Hello").content == before


def test_rejected_tool_schema_is_a_clear_error_and_the_model_stays_usable(chat):
    before = chat.invoke("Hello").content
    bad = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(?<=a)b"}}, "required": ["x"]}}}
    with pytest.raises(GrammarError, match="rejected"):
        chat.bind_tools([bad], tool_choice="any").invoke("call f")
    with pytest.raises(ValueError, match="names no bound tool"):
        chat.bind_tools([bad], tool_choice="g")
    assert chat.invoke("Hello").content == before


def test_failed_stream_leaves_the_model_usable(chat):
    before = chat.invoke("Hello").content
    it = chat.stream("Tell me a story")
    next(it)
    it.close()  # abandoned mid-stream: the lock must be released
    done = threading.Event()
    threading.Thread(target=lambda: (chat.invoke("Hello"), done.set()), daemon=True).start()
    assert done.wait(60), "model lock still held after an abandoned stream"
    assert chat.invoke("Hello").content == before


class Pick(BaseModel):
    colour: str = Field(description="a colour")
    count: int = Field(description="how many")


def test_random_model_still_emits_schema_valid_output(tiny_dir):
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0, max_tokens=60)
    res = chat.with_structured_output(Pick).invoke("Pick a colour")
    assert isinstance(res, Pick)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"]}}}
    msg = chat.bind_tools([tool], tool_choice="get_weather").invoke("Weather in Paris?")
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0]["name"] == "get_weather"
    assert msg.tool_calls[0]["args"]["unit"] in ("C", "F") and isinstance(msg.tool_calls[0]["args"]["city"], str)
    full = None
    for c in chat.bind_tools([tool], tool_choice="any").stream("Weather in Paris?"):
        full = c if full is None else full + c
    assert full.tool_calls[0]["name"] == "get_weather"


def test_history_with_tool_calls_renders(chat):
    msgs = [SystemMessage("be brief"), HumanMessage("What is 1 + 2"),
            AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1", "type": "tool_call"}]),
            ToolMessage(json.dumps({"result": 3}), tool_call_id="c1", name="add")]
    assert isinstance(chat.invoke(msgs), AIMessage)


def test_output_splitter_streams_text_reasoning_and_calls():
    s = OutputSplitter(reasoning=True, tools=True)
    pieces = ["<thi", "nk>let me", " see</th", "ink>Sure. <tool", '_call>\n{"name": "f", "arguments": {"a": 1}}',
              "\n</tool_call>"]
    texts, reasons = [], []
    for p in pieces:
        t, r = s.feed(p)
        texts.append(t)
        reasons.append(r)
    t, r = s.finish()
    assert "".join(texts) + t == "Sure. "
    assert "".join(reasons) + r == "let me see"
    assert s.tool_calls[0]["name"] == "f" and s.tool_calls[0]["args"] == {"a": 1}


def test_n_samples_and_scores(tiny_dir):
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=1.0, seed=0, n=3, max_tokens=8,
                  return_scores=True)
    res = chat.generate([[HumanMessage("Hello")]])
    gens = res.generations[0]
    assert len(gens) == 3
    assert all("mean_logprob" in g.message.response_metadata["scores"] for g in gens)


def test_timeout_stops_decoding(tiny_dir):
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0, max_tokens=500, timeout=0.0)
    msg = chat.invoke("Hello")
    assert msg.response_metadata["finish_reason"] == "timeout"
    assert msg.usage_metadata["output_tokens"] < 500


def test_streaming_field_streams_through_callbacks(tiny_dir):
    from langchain_core.callbacks import BaseCallbackHandler

    class Tokens(BaseCallbackHandler):
        def __init__(self):
            self.tokens = []

        def on_llm_new_token(self, token, **kwargs):
            self.tokens.append(token)

    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0, max_tokens=10, streaming=True)
    h = Tokens()
    msg = chat.invoke("Hello", config={"callbacks": [h]})
    assert len(h.tokens) > 1 and "".join(h.tokens) == msg.content


def test_reasoning_tags_become_reasoning_content_blocks():
    s = OutputSplitter(reasoning=True, tools=False)
    s.feed("<think>two plus two</think>It is 4.", final=True)
    msg = AIMessage(content=s.text, additional_kwargs={"reasoning_content": s.reasoning_text})
    assert [b["type"] for b in msg.content_blocks] == ["reasoning", "text"]
    assert msg.content_blocks[0]["reasoning"] == "two plus two"


def test_select_by_puts_the_best_sample_first(tiny_dir):
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=1.0, seed=0, n=4, max_tokens=8,
                  select_by="mean_logprob")
    gens = chat.generate([[HumanMessage("Hello")]]).generations[0]
    scores = [g.message.response_metadata["scores"]["mean_logprob"] for g in gens]
    assert scores[0] == max(scores) and scores[1:] == sorted(scores[1:], reverse=True)
    assert gens[0].message.response_metadata["chosen"] and "argmax" in gens[0].message.response_metadata[
        "selection_note"]
    assert chat.invoke("Hello").content == gens[0].message.content


def test_bare_json_tool_calls_are_parsed_and_constrained_in_auto_mode(tiny_dir):
    s = OutputSplitter(reasoning=False, tools=True)
    out = [s.feed(p)[0] for p in ["Sure: {\"na", 'me": "f", "arguments": {"a": {"b": 1}}', "}\nDone."]]
    assert "".join(out) + s.finish()[0] == "Sure: Done."
    assert s.tool_calls[0]["name"] == "f" and s.tool_calls[0]["args"] == {"a": {"b": 1}}

    import xgrammar as xgr
    from langchain_kvagents.chat_models import _tool_tag

    from kvagents.grammar import compile_grammar

    llm = ChatKV(model=tiny_dir, dtype="float32", device="cpu").llm
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
    auto = compile_grammar(llm, "structural_tag", _tool_tag([tool], required=False, parallel=False))
    m = xgr.GrammarMatcher(auto)
    assert m.accept_string('Sure. {"name": "f", "arguments": {"a": 1}}')
    m = xgr.GrammarMatcher(auto)
    assert not m.accept_string('Sure. {"name": "g"')  # the trigger constrains the name to a bound tool
    m = xgr.GrammarMatcher(auto)
    assert m.accept_string('```json\n{\n  "name": "f",\n  "arguments": {"a": 2}\n}')  # then only EOS (one call)
    s = OutputSplitter(reasoning=False, tools=True)
    s.feed('```json\n{\n  "name": "f",\n  "arguments": {"a": 2}\n}\n```', final=True)
    assert s.tool_calls[0]["args"] == {"a": 2}
    req = compile_grammar(llm, "structural_tag", _tool_tag([tool], required=True, parallel=False))
    assert not xgr.GrammarMatcher(req).accept_string('{"name": "f"')  # required: the tagged form only
