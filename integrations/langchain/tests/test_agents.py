"""ChatKV in agents and the LangChain conventions agents rely on.

Most tests run on the tiny random Llama (``lc_tiny``): a scripted component forces what a small model does after a
tool result (it writes the same call again), so the tests check ChatKV's decisions, not a model's skill. One test
runs ``create_agent`` on the real qwen2.5-coder-0.5b (``real_model``).
"""
# ruff: noqa: F811  (pytest fixtures imported from lc_tiny are parameters of the tests)

from __future__ import annotations

import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_kvagents import ChatKV, UnsupportedArgumentError
from langchain_kvagents._decoding import Penalties, answered_calls, conversation_text, is_grounded, is_repeat
from langchain_kvagents._messages import OutputSplitter
from lc_tiny import tiny_dir  # noqa: F401 - fixture
from pydantic import BaseModel, Field

from kvagents import Component, ForceTokens

CALL = '{"name": "add", "arguments": {"a": 2, "b": 3}}'


@tool
def add(a: float, b: float) -> float:
    """Add two numbers: a + b."""
    return a + b


@tool
def multiply(a: float, b: float) -> float:
    """Multiply two numbers: a * b."""
    return a * b


class Scripted(Component):
    """Forces ``text`` then EOS as every sequence's output (a model that always writes the same thing)."""

    name = "scripted"

    def __init__(self, tokenizer, text: str, eos: int) -> None:
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]

    def on_prefill(self, view):
        return [ForceTokens(i, self.ids) for i in range(view.input_ids.shape[0] * view.n)]


def scripted_chat(tiny_dir, text: str, **kw) -> ChatKV:
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0, **{"max_tokens": 40, **kw})
    tok = chat.llm.tokenizer
    eos = chat.llm.engine.eos_token_ids[0]
    chat.components = [lambda: Scripted(tok, text, eos)]  # a fresh script per request
    return chat


def _agent_messages(agent, prompt: str, limit: int = 12) -> list:
    states = list(agent.stream({"messages": [{"role": "user", "content": prompt}]}, {"recursion_limit": limit},
                               stream_mode="values"))
    return states[-1]["messages"]


# -- the agent loop ends ---------------------------------------------------------------------------------------
def test_create_agent_stops_after_the_tool_result(tiny_dir):
    from langchain.agents import create_agent

    chat = scripted_chat(tiny_dir, CALL)  # writes the call again after its result, as qwen2.5-coder-0.5b does
    msgs = _agent_messages(create_agent(model=chat, tools=[add]), "Add 2 and 3.")
    tools = [m for m in msgs if isinstance(m, ToolMessage)]
    assert len(tools) == 1 and tools[0].content == "5.0"
    final = msgs[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls and not final.invalid_tool_calls
    assert final.content.startswith("The answer is") and len(final.content) > len("The answer is")
    assert final.response_metadata["dropped_tool_calls"] == [{"name": "add", "args": {"a": 2, "b": 3}}]
    assert final.usage_metadata["output_tokens"] > 0


def test_repeated_calls_allowed_loop_until_the_recursion_limit(tiny_dir):
    from langchain.agents import create_agent
    from langgraph.errors import GraphRecursionError

    chat = scripted_chat(tiny_dir, CALL, repeated_tool_calls="allow", max_tool_rounds=None)
    with pytest.raises(GraphRecursionError):  # the loop the default settings end
        _agent_messages(create_agent(model=chat, tools=[add]), "Add 2 and 3.")


def test_tool_round_budget_ends_a_loop_of_new_calls(tiny_dir):
    from langchain.agents import create_agent

    chat = scripted_chat(tiny_dir, CALL, repeated_tool_calls="allow", max_tool_rounds=2)
    msgs = _agent_messages(create_agent(model=chat, tools=[add]), "Add 2 and 3.")
    assert sum(isinstance(m, ToolMessage) for m in msgs) == 2
    assert not msgs[-1].tool_calls and msgs[-1].content.startswith("The answer is")


def test_a_different_call_after_a_tool_result_goes_through(tiny_dir):
    chat = scripted_chat(tiny_dir, '{"name": "add", "arguments": {"a": 5, "b": 1}}')
    msgs = [HumanMessage("Add 2 and 3, then add 1."),
            AIMessage("", tool_calls=[{"name": "add", "args": {"a": 2, "b": 3}, "id": "c1", "type": "tool_call"}]),
            ToolMessage("5", tool_call_id="c1", name="add")]
    out = chat.bind_tools([add]).invoke(msgs)
    assert [c["args"] for c in out.tool_calls] == [{"a": 5, "b": 1}]


def test_streaming_after_a_tool_result_drops_the_repeat_and_streams_the_answer(tiny_dir):
    msgs = [HumanMessage("Add 2 and 3."),
            AIMessage("", tool_calls=[{"name": "add", "args": {"a": 2, "b": 3}, "id": "c1", "type": "tool_call"}]),
            ToolMessage("5", tool_call_id="c1", name="add")]
    repeat = scripted_chat(tiny_dir, CALL).bind_tools([add])
    chunks = list(repeat.stream(msgs))
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    invoked = repeat.invoke(msgs)
    assert not full.tool_calls and not invoked.tool_calls
    assert full.content == invoked.content and full.content.startswith("The answer is")
    assert full.response_metadata["answer_turn"] and full.usage_metadata == invoked.usage_metadata
    new = scripted_chat(tiny_dir, '{"name": "add", "arguments": {"a": 5, "b": 1}}').bind_tools([add])
    full = None
    msgs = [HumanMessage("Add 2 and 3, then add 1."), *msgs[1:]]  # the new operand comes from the user
    for c in new.stream(msgs):
        full = c if full is None else full + c
    assert [c["args"] for c in full.tool_calls] == [{"a": 5, "b": 1}]


def test_answered_calls_and_repeats():
    msgs = [HumanMessage("old"), AIMessage("", tool_calls=[{"name": "f", "args": {"x": 1}, "id": "a"}]),
            ToolMessage("1", tool_call_id="a"), HumanMessage("new"),
            AIMessage("", tool_calls=[{"name": "f", "args": {"x": 2}, "id": "b"},
                                      {"name": "g", "args": {}, "id": "c"}]),
            ToolMessage("2", tool_call_id="b")]
    answered = answered_calls(msgs)
    assert answered == [("f", {"x": 2}, "2")]  # this turn only, and only calls with a result
    assert is_repeat({"name": "f", "args": {"x": 2.0}}, answered)
    assert not is_repeat({"name": "f", "args": {"x": 3}}, answered)
    assert not is_repeat({"name": "g", "args": {}}, answered)
    # the result fed back into the same arguments: add(3170, 109) = 3279, then add(3279, 109)
    done = [("add", {"a": 3170, "b": 109}, "3279")]
    assert is_repeat({"name": "add", "args": {"a": 3279, "b": 109}}, done)
    assert is_repeat({"name": "subtract", "args": {"a": 3279, "b": 109}}, done)
    assert not is_repeat({"name": "add", "args": {"a": 3279, "b": 1}}, done)  # a new operand: a new step
    chain = [("get_capital", {"country": "Denmark"}, "Copenhagen")]
    assert not is_repeat({"name": "get_weather", "args": {"city": "Copenhagen"}}, chain)


@pytest.mark.real_model
def test_create_agent_on_qwen_finishes_an_arithmetic_task():
    from langchain.agents import create_agent

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, before)))
    try:
        chat = ChatKV(model="qwen2.5-coder-0.5b", dtype="float32", device="cpu", temperature=0)
        msgs = _agent_messages(create_agent(model=chat, tools=[add, multiply]), "Add 3170 and 109.")
    finally:
        torch.set_num_threads(before)
    calls = [c for m in msgs if isinstance(m, AIMessage) for c in m.tool_calls]
    assert calls and calls[0]["name"] == "add"
    assert not msgs[-1].tool_calls and "3279" in msgs[-1].content


# -- tools together with structured output ------------------------------------------------------------------------
class Answer(BaseModel):
    result: float = Field(description="the result")
    note: str = Field(description="a short note")


def test_create_agent_with_provider_strategy_calls_the_tool_then_answers_in_the_schema(tiny_dir):
    from langchain.agents import create_agent
    from langchain.agents.structured_output import ProviderStrategy

    chat = scripted_chat(tiny_dir, CALL, max_tokens=60)
    agent = create_agent(model=chat, tools=[add], response_format=ProviderStrategy(Answer))
    state = agent.invoke({"messages": [{"role": "user", "content": "Add 2 and 3."}]}, {"recursion_limit": 12})
    assert sum(isinstance(m, ToolMessage) for m in state["messages"]) == 1  # the tool was called, not dropped
    assert isinstance(state["structured_response"], Answer)


def test_profile_structured_output_makes_create_agent_choose_the_provider_strategy(tiny_dir):
    from langchain.agents import create_agent

    chat = scripted_chat(tiny_dir, CALL, max_tokens=60)
    assert chat.profile["structured_output"]
    state = create_agent(model=chat, tools=[add], response_format=Answer).invoke(
        {"messages": [{"role": "user", "content": "Add 2 and 3."}]}, {"recursion_limit": 12})
    assert sum(isinstance(m, ToolMessage) for m in state["messages"]) == 1
    assert isinstance(state["structured_response"], Answer)


def test_tools_with_response_format_give_a_call_or_a_schema_object(tiny_dir):
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0, max_tokens=60)
    fmt = {"type": "json_schema", "json_schema": {"name": "Answer", "schema": Answer.model_json_schema()}}
    for prompt in ("Add 2 and 3.", "Hello", "Say something"):
        msg = chat.bind_tools([add], response_format=fmt).invoke(prompt)
        if msg.tool_calls:
            assert msg.tool_calls[0]["name"] == "add"
        else:
            Answer.model_validate_json(msg.content)  # never text that is neither
    forced = chat.bind_tools([add], tool_choice="any", response_format=fmt).invoke("Add 2 and 3.")
    assert forced.tool_calls and forced.tool_calls[0]["name"] == "add"  # the tools are not dropped


# -- tool_choice, fences, streaming, parallel calls --------------------------------------------------------------
def test_tool_choice_none_gives_text_without_call_text(tiny_dir):
    chat = scripted_chat(tiny_dir, CALL)
    msg = chat.bind_tools([add], tool_choice="none").invoke("Add 2 and 3.")
    assert msg.tool_calls == [] and msg.invalid_tool_calls == []
    assert '"name"' not in msg.content and "<tool_call>" not in msg.content
    assert msg.content.startswith("The answer is")
    plain = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0, max_tokens=20)
    msg = plain.bind_tools([add], tool_choice="none").invoke("Add 2 and 3.")
    assert msg.tool_calls == [] and "<tool_call>" not in msg.content


def test_auto_mode_drops_the_code_fence_around_a_call(tiny_dir):
    chat = scripted_chat(tiny_dir, "```json\n" + CALL + "\n```")
    msg = chat.bind_tools([add]).invoke("Add 2 and 3.")
    assert msg.content == "" and [c["args"] for c in msg.tool_calls] == [{"a": 2, "b": 3}]
    s = OutputSplitter(reasoning=False, tools=True)
    pieces = ["Sure.\n``", "`json\n{\n  \"name\": \"add\",\n  \"arguments\": {\"a\": 1}\n}", "\n``", "`\nDone."]
    text = "".join(s.feed(p)[0] for p in pieces) + s.finish()[0]
    assert text == "Sure.\nDone." and s.tool_calls[0]["args"] == {"a": 1}
    s = OutputSplitter(reasoning=False, tools=True)
    assert s.feed("```python\nprint(1)\n```", final=True)[0] == "```python\nprint(1)\n```"


def test_bare_json_answer_naming_no_tool_stays_text():
    s = OutputSplitter(reasoning=False, tools=True, names=["add"])
    s.feed('{"name": "Bob", "age": 3}', final=True)
    assert s.text == '{"name": "Bob", "age": 3}' and s.tool_calls == []


def test_streamed_tool_call_chunks_aggregate_to_the_invoked_calls(tiny_dir):
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0, max_tokens=60)
    tool_ = {"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"]}}}
    bound = chat.bind_tools([tool_], tool_choice="any")
    chunks = list(bound.stream("Weather in Paris?"))
    with_calls = [c for c in chunks if c.tool_call_chunks]
    assert len(with_calls) > 2  # incremental: the name, then the arguments as they are decoded
    assert with_calls[0].tool_call_chunks[0]["name"] == "get_weather" and with_calls[0].tool_call_chunks[0]["id"]
    assert all(tc["name"] is None for c in with_calls[1:] for tc in c.tool_call_chunks)
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    invoked = bound.invoke("Weather in Paris?")
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [(c["name"], c["args"]) for c in invoked.tool_calls]
    assert full.response_metadata["finish_reason"] == "tool_calls"


def test_parallel_tool_calls(tiny_dir):
    two = CALL + "\n" + '{"name": "multiply", "arguments": {"a": 4, "b": 5}}'
    chat = scripted_chat(tiny_dir, two, max_tokens=80)
    msg = chat.bind_tools([add, multiply], parallel_tool_calls=True).invoke("Add 2 and 3, multiply 4 by 5.")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("add", {"a": 2, "b": 3}),
                                                                  ("multiply", {"a": 4, "b": 5})]
    full = None
    for c in chat.bind_tools([add, multiply], parallel_tool_calls=True).stream("Add 2 and 3, multiply 4 by 5."):
        full = c if full is None else full + c
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [(c["name"], c["args"]) for c in msg.tool_calls]
    assert len({c["id"] for c in full.tool_calls}) == 2


# -- conventions: profile, ls params, token counts, logprobs, arguments ------------------------------------------
def test_profile_is_filled_without_loading_the_model(tiny_dir):
    chat = ChatKV(model=tiny_dir, dtype="float16", device="cpu")  # a (model, dtype, device) no test has loaded
    prof = chat.profile
    assert prof["max_input_tokens"] == 2048  # the tiny model's config
    assert prof["tool_calling"] and prof["tool_choice"] and prof["tool_call_streaming"] and prof["structured_output"]
    assert prof["text_inputs"] and not prof["image_inputs"] and not prof["audio_inputs"]
    assert prof["reasoning_output"] is False  # no <think> in the template, thinking off
    assert ChatKV(model=tiny_dir, thinking="slow").profile["reasoning_output"]
    assert not chat.llm.loaded


def test_ls_provider_matches_model_provider(tiny_dir):
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0, max_tokens=4)
    ls = chat._get_ls_params()
    msg = chat.invoke("Hello")
    assert ls["ls_provider"] == "kvagents" == msg.response_metadata["model_provider"]
    assert ls["ls_model_name"] == tiny_dir and ls["ls_max_tokens"] == 4 and ls["ls_temperature"] == 0


def test_token_count_goes_through_the_chat_template(tiny_dir):
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0, max_tokens=4)
    msgs = [HumanMessage("What is 2 + 3?")]
    assert chat.get_num_tokens_from_messages(msgs) == chat.invoke(msgs).usage_metadata["input_tokens"]
    with_tools = chat.get_num_tokens_from_messages(msgs, tools=[add])
    assert with_tools == chat.bind_tools([add]).invoke(msgs).usage_metadata["input_tokens"]
    assert with_tools > chat.get_num_tokens_from_messages(msgs) > chat.get_num_tokens("What is 2 + 3?")


def test_logprobs(tiny_dir):
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0, max_tokens=10)
    msg = chat.invoke("Hello", logprobs=True, top_logprobs=3)
    lp = msg.response_metadata["logprobs"]["content"]
    eos = msg.response_metadata["finish_reason"] == "stop"
    assert len(lp) == msg.usage_metadata["output_tokens"] - (1 if eos else 0)
    for e in lp:
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 3 and isinstance(e["bytes"], list)
        assert e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"], abs=1e-5)  # greedy: the argmax
    assert "logprobs" not in chat.invoke("Hello").response_metadata
    streamed = list(chat.stream("Hello", logprobs=True))
    assert streamed[-1].response_metadata["logprobs"]["content"] == [
        {**e, "top_logprobs": []} for e in lp]
    with pytest.raises(ValueError, match="top_logprobs"):
        chat.invoke("Hello", top_logprobs=2)
    with pytest.raises(ValueError, match="top_logprobs"):
        ChatKV(model=tiny_dir, logprobs=True, top_logprobs=50)


def test_unknown_arguments_are_refused_naming_them(tiny_dir):
    with pytest.raises(ValueError, match=r"'num_predict' \(use max_tokens\)"):
        ChatKV(model=tiny_dir, num_predict=5)
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0, max_tokens=4)
    with pytest.raises(UnsupportedArgumentError, match=r"'num_predict' \(use max_tokens\)"):
        chat.invoke("Hello", num_predict=5)
    with pytest.raises(UnsupportedArgumentError, match="'foo'"):
        chat.bind(foo=1).invoke("Hello")
    with pytest.raises(UnsupportedArgumentError, match="'repeat_penalty' \\(use repetition_penalty\\)"):
        chat.bind_tools([add], repeat_penalty=1.1)
    with pytest.raises(UnsupportedArgumentError):
        list(chat.stream("Hello", min_p=0.1))


def test_penalties_are_applied(tiny_dir):
    p = Penalties([[1]], 1, repetition=2.0, presence=0.5, frequency=0.25)
    logits = torch.tensor([[1.0, 2.0, -2.0, 4.0]])
    first = p(logits, None, None)  # token 1 seen in the prompt
    assert first.tolist() == [[1.0, 1.0, -2.0, 4.0]]
    second = p(logits, torch.tensor([3]), torch.tensor([True]))  # token 3 generated once
    assert second.tolist() == [[1.0, 1.0, -2.0, 4.0 / 2 - 0.5 - 0.25]]
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0, max_tokens=16)
    plain = chat.invoke("Tell me a story")
    pen = chat.invoke("Tell me a story", presence_penalty=-2.0)  # rewards repeating: the random model's output changes
    assert pen.content != plain.content
    with pytest.raises(ValueError, match="repetition_penalty"):
        chat.invoke("Hello", repetition_penalty=0)
    with pytest.raises(ValueError, match="presence_penalty"):
        ChatKV(model=tiny_dir, presence_penalty=3)



# -- made-up calls, and the next call of a chain ------------------------------------------------------------------
class Sequenced(Component):
    """Forces the next of ``scripts`` (then EOS) in each request that builds one: a model that writes one thing,
    then, asked again, another."""

    name = "sequenced"

    def __init__(self, tokenizer, text: str, eos: int) -> None:
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]

    def on_prefill(self, view):
        return [ForceTokens(i, self.ids) for i in range(view.input_ids.shape[0] * view.n)]


def sequenced_chat(tiny_dir, scripts: list[str], **kw) -> ChatKV:
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0, **{"max_tokens": 40, **kw})
    tok = chat.llm.tokenizer
    eos = chat.llm.engine.eos_token_ids[0]
    left = list(scripts)
    chat.components = [lambda: Sequenced(tok, left.pop(0) if len(left) > 1 else left[0], eos)]
    return chat


def test_is_grounded():
    text = "Translate 'thank you' into French.\n1,480,641\nCopenhagen"
    assert not is_grounded({"name": "add", "args": {"a": 1, "b": 2}}, text)
    assert not is_grounded({"name": "get_weather", "args": {"city": "London"}}, text)
    assert is_grounded({"name": "get_weather", "args": {"city": " copenhagen "}}, text)
    assert is_grounded({"name": "f", "args": {"x": 1480641.0}}, text)  # by value, separators ignored
    assert is_grounded({"name": "f", "args": {"q": "french words"}}, text)  # one of its words
    assert is_grounded({"name": "f", "args": {}}, text)  # nothing to make up
    assert is_grounded({"name": "add", "args": {"a": 1480641, "b": 1}}, text)
    assert not is_grounded({"name": "add", "args": {"a": 1480641, "b": 1}}, text, every=True)
    err = [HumanMessage("Weather in the capital of Atlantis?"), ToolMessage("error: unknown country", tool_call_id="x")]
    assert not is_grounded({"name": "get_capital", "args": {"country": "unknown country"}}, conversation_text(err))
    assert is_grounded({"name": "get_capital", "args": {"country": "Atlantis"}}, conversation_text(err))


def test_made_up_call_is_dropped_and_the_model_answers_without_the_tools(tiny_dir):
    from langchain.agents import create_agent

    made_up = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    chat = scripted_chat(tiny_dir, made_up)
    prompt = "Translate 'thank you' into French."
    msgs = _agent_messages(create_agent(model=chat, tools=[add, multiply]), prompt)
    assert not any(isinstance(m, ToolMessage) for m in msgs)
    final = msgs[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls and final.content.strip()
    assert final.response_metadata["dropped_tool_calls"] == [{"name": "add", "args": {"a": 1, "b": 2}}]
    assert final.response_metadata["answer_turn"] and not final.content.startswith("The answer is")  # no cue
    # the answer turn's prompt is the conversation without the tools
    with_tools = chat.get_num_tokens_from_messages([HumanMessage(prompt)], tools=[add, multiply])
    plain = chat.get_num_tokens_from_messages([HumanMessage(prompt)])
    assert final.usage_metadata["input_tokens"] == with_tools + plain
    streamed = None
    for c in chat.bind_tools([add, multiply]).stream(prompt):
        streamed = c if streamed is None else streamed + c
        assert not c.tool_call_chunks
    assert streamed.content == final.content and not streamed.tool_calls
    allowed = scripted_chat(tiny_dir, made_up, ungrounded_tool_calls="allow")
    assert allowed.bind_tools([add, multiply]).invoke(prompt).tool_calls[0]["args"] == {"a": 1, "b": 2}
    grounded = scripted_chat(tiny_dir, CALL).bind_tools([add, multiply]).invoke("Add 2 and 3.")
    assert grounded.tool_calls[0]["args"] == {"a": 2, "b": 3}


_AFTER_ADD = [HumanMessage("Add 2 and 3, then multiply by 4."),
              AIMessage("", tool_calls=[{"name": "add", "args": {"a": 2, "b": 3}, "id": "c1", "type": "tool_call"}]),
              ToolMessage("5", tool_call_id="c1", name="add")]


def test_a_repeated_call_gets_one_more_decode_without_that_tool(tiny_dir):
    nxt = '{"name": "multiply", "arguments": {"a": 5, "b": 4}}'
    # repeats add(2, 3), then, asked again, makes the next step (scripted: not the tiny model's probabilities)
    chat = sequenced_chat(tiny_dir, [CALL, nxt], retry_min_logprob=None)
    out = chat.bind_tools([add, multiply]).invoke(_AFTER_ADD)
    assert [(c["name"], c["args"]) for c in out.tool_calls] == [("multiply", {"a": 5, "b": 4})]
    assert out.response_metadata["retry_turn"] and out.response_metadata["dropped_tool_calls"] == [
        {"name": "add", "args": {"a": 2, "b": 3}}]
    full = None
    for c in sequenced_chat(tiny_dir, [CALL, nxt], retry_min_logprob=None).bind_tools([add, multiply]).stream(
            _AFTER_ADD):
        full = c if full is None else full + c
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [("multiply", {"a": 5, "b": 4})]
    assert full.usage_metadata == out.usage_metadata
    off = sequenced_chat(tiny_dir, [CALL, nxt], retry_other_tools=False).bind_tools([add, multiply])
    msg = off.invoke(_AFTER_ADD)
    assert not msg.tool_calls and msg.content.startswith("The answer is")


def test_a_made_up_step_after_a_tool_result_ends_in_the_answer(tiny_dir):
    from langchain.agents import create_agent

    # the result fed into a new call with an invented operand, and the answered arguments passed to another tool
    for step in ('{"name": "multiply", "arguments": {"a": 5, "b": 1}}',
                 '{"name": "multiply", "arguments": {"a": 2, "b": 3}}',
                 '{"name": "multiply", "arguments": {"b": 2, "a": 3}}'):  # the same values under other names
        chat = sequenced_chat(tiny_dir, [CALL, CALL, step])
        msgs = _agent_messages(create_agent(model=chat, tools=[add, multiply]), "Add 2 and 3.")
        assert sum(isinstance(m, ToolMessage) for m in msgs) == 1
        final = msgs[-1]
        assert not final.tool_calls and final.content.startswith("The answer is")
        assert final.response_metadata["retry_turn"] and final.response_metadata["answer_turn"]


# -- chains: values of the conversation, reworked values, greedy turns after a result --------------------------
_POPULATION = {"porto": 1480641, "lyon": 2242833}


@tool
def get_population(city: str) -> int | str:
    """The number of people who live in a city."""
    return _POPULATION.get(city.strip().lower(), "error: unknown city")


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return "sunny, 20 C"


_LOOKUPS = [HumanMessage("What is the combined population of Porto and Lyon?"),
            AIMessage("", tool_calls=[{"name": "get_population", "args": {"city": "Porto"}, "id": "p1",
                                       "type": "tool_call"}]),
            ToolMessage("1480641", tool_call_id="p1", name="get_population"),
            AIMessage("", tool_calls=[{"name": "get_population", "args": {"city": "Lyon"}, "id": "p2",
                                       "type": "tool_call"}]),
            ToolMessage("2242833", tool_call_id="p2", name="get_population")]


def test_conversation_values_and_grounded_tools():
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from langchain_kvagents._decoding import conversation_values, grounded_tools

    strings, numbers = conversation_values(_LOOKUPS)
    assert strings == ["Porto", "Lyon"]  # "What" opens the sentence: no name; numeric results are numbers
    assert numbers == [1480641.0, 2242833.0]
    chain = [HumanMessage("How is the weather in the capital of New Zealand? (It may rain.)"),
             AIMessage("", tool_calls=[{"name": "get_capital", "args": {"country": "New Zealand"}, "id": "c",
                                        "type": "tool_call"}]),
             ToolMessage("Wellington", tool_call_id="c"), ToolMessage("error: unknown city", tool_call_id="d")]
    assert conversation_values(chain) == (["Wellington", "New Zealand"], [])
    tools = [convert_to_openai_tool(t) for t in (add, get_weather, get_population)]
    out = grounded_tools(tools, (strings, numbers), answered_calls(_LOOKUPS))
    # every string value was taken by an answered call: the look-ups are left out, add takes the results
    assert [t["function"]["name"] for t in out] == ["add"]
    props = out[0]["function"]["parameters"]["properties"]
    assert props["a"]["enum"] == props["b"]["enum"] == [1480641, 2242833]
    out = grounded_tools(tools, conversation_values(chain), answered_calls(chain))
    assert [t["function"]["name"] for t in out] == ["get_weather", "get_population"]  # no number for add
    assert out[0]["function"]["parameters"]["properties"]["city"]["enum"] == ["Wellington"]
    assert tools[0]["function"]["parameters"]["properties"]["a"] == {"type": "number"}  # the input is unchanged


def test_reuses_answered():
    from langchain_kvagents._decoding import reuses_answered

    done = [("add", {"a": 1480641, "b": 2242833}, "3723474")]
    assert reuses_answered({"name": "multiply", "args": {"x": 2242833, "y": 1480641}}, done)
    assert reuses_answered({"name": "multiply", "args": {"a": 3723474, "b": 1480641}}, done)  # result + its input
    assert not reuses_answered({"name": "multiply", "args": {"a": 3723474, "b": 2}}, done)  # a new operand
    assert not reuses_answered({"name": "add", "args": {"a": 1480641, "b": 7}}, done)
    # another property of the same name is a new step (only reworked numbers count)
    assert not reuses_answered({"name": "get_weather", "args": {"city": "Lyon"}},
                               [("get_population", {"city": "Lyon"}, "5")])
    assert not reuses_answered({"name": "get_weather", "args": {"city": "Lyon"}},
                               [("get_population", {"city": "Porto"}, "5")])
    assert not reuses_answered({"name": "f", "args": {}}, done)


def test_is_grounded_matches_whole_words_only():
    text = "What is the weather in Lisbon?\nwindy, -5 C"
    assert is_grounded({"name": "get_weather", "args": {"city": "Lisbon"}}, text, every=True)
    assert is_grounded({"name": "get_weather", "args": {"city": "C"}}, text, every=True)  # the word "C" is there
    assert not is_grounded({"name": "get_weather", "args": {"city": "in L"}}, text.replace("in Lisbon", "inLisbon"),
                           every=True)
    assert not is_grounded({"name": "get_weather", "args": {"city": "ind"}}, text, every=True)  # inside "windy"


def test_the_retry_grammar_takes_the_values_of_the_conversation(tiny_dir, monkeypatch):
    import langchain_kvagents.chat_models as cm

    seen = []
    real = cm._tool_tag

    def spy(tools, *a, **kw):
        seen.append(tools)
        return real(tools, *a, **kw)

    monkeypatch.setattr(cm, "_tool_tag", spy)
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0, max_tokens=40)
    from langchain_core.utils.function_calling import convert_to_openai_tool

    req = chat._prepare([_LOOKUPS], None, {"tools": [convert_to_openai_tool(t) for t in (add, get_population)],
                                           "tool_choice": None})
    seen.clear()
    chat._retry_request(req, [0], [[{"name": "get_population", "args": {"city": "Lyon"}}]])
    (retry_tools,) = seen
    assert [t["function"]["name"] for t in retry_tools] == ["add"]
    assert retry_tools[0]["function"]["parameters"]["properties"]["a"]["enum"] == [1480641, 2242833]
    off = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0, max_tokens=40,
                 ungrounded_tool_calls="allow")
    req = off._prepare([_LOOKUPS], None, {"tools": [convert_to_openai_tool(t) for t in (add, get_population)],
                                          "tool_choice": None})
    seen.clear()
    off._retry_request(req, [0], [[{"name": "get_population", "args": {"city": "Lyon"}}]])
    assert seen[0][0]["function"]["parameters"]["properties"]["a"] == {"type": "number"}


def test_turns_after_a_tool_result_are_greedy(tiny_dir):
    from langchain_core.utils.function_calling import convert_to_openai_tool

    kw = {"tools": [convert_to_openai_tool(add)], "tool_choice": None}
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0.7, max_tokens=40)
    assert chat._prepare([_AFTER_ADD], None, dict(kw)).params.temperature == 0.0
    assert chat._prepare([_AFTER_ADD[:1]], None, dict(kw)).params.temperature == 0.7  # before any result
    assert chat._prepare([_AFTER_ADD], None, {**kw, "temperature": 0.5}).params.temperature == 0.5  # per call
    assert chat._prepare([_AFTER_ADD], None, {}).params.temperature == 0.7  # no tools bound
    keep = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0.7, after_tool_temperature=None)
    assert keep._prepare([_AFTER_ADD], None, dict(kw)).params.temperature == 0.7
    n2 = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=0.7, n=2)
    assert n2._prepare([_AFTER_ADD], None, dict(kw)).params.temperature == 0.7  # samples stay samples


def test_create_agent_runs_a_chain_of_two_look_ups_and_the_sum_then_answers(tiny_dir):
    from langchain.agents import create_agent

    look = '{"name": "get_population", "arguments": {"city": "%s"}}'
    total = '{"name": "add", "arguments": {"a": 1480641, "b": 2242833}}'
    # Porto, Lyon, the sum; asked again, the sum once more: a repeat, so tool use ends
    chat = sequenced_chat(tiny_dir, [look % "Porto", look % "Lyon", total, total], retry_other_tools=False)
    msgs = _agent_messages(create_agent(model=chat, tools=[add, get_population]),
                           "What is the combined population of Porto and Lyon?")
    assert [m.content for m in msgs if isinstance(m, ToolMessage)] == ["1480641", "2242833", "3723474.0"]
    final = msgs[-1]
    assert not final.tool_calls and final.content.startswith("The answer is")
    assert final.response_metadata["dropped_tool_calls"] == [{"name": "add", "args": {"a": 1480641, "b": 2242833}}]


def test_a_call_reworking_answered_values_ends_tool_use(tiny_dir):
    from langchain.agents import create_agent

    # after add(2, 3) = 5 the model calls multiply(2, 3), then multiply(5, 2): nothing the results did not have
    for step in ('{"name": "multiply", "arguments": {"a": 3, "b": 2}}',
                 '{"name": "multiply", "arguments": {"a": 5, "b": 2}}'):
        chat = sequenced_chat(tiny_dir, [CALL, step], retry_other_tools=False)
        msgs = _agent_messages(create_agent(model=chat, tools=[add, multiply]), "Add 2 and 3.")
        assert sum(isinstance(m, ToolMessage) for m in msgs) == 1
        assert not msgs[-1].tool_calls and msgs[-1].content.startswith("The answer is")
        assert msgs[-1].response_metadata["dropped_tool_calls"][0]["name"] == "multiply"
    # a new operand from the user is a new step
    chat = sequenced_chat(tiny_dir, [CALL, '{"name": "multiply", "arguments": {"a": 5, "b": 4}}', CALL],
                          retry_other_tools=False)
    msgs = _agent_messages(create_agent(model=chat, tools=[add, multiply]), "Add 2 and 3, then multiply by 4.")
    assert sum(isinstance(m, ToolMessage) for m in msgs) == 2


def test_a_retry_call_the_model_gave_no_probability_is_dropped(tiny_dir):
    nxt = '{"name": "multiply", "arguments": {"a": 5, "b": 4}}'
    # the tiny random model spreads its probability over the whole vocabulary: every forced token is below -8
    chat = sequenced_chat(tiny_dir, [CALL, nxt], retry_min_logprob=-8.0)
    out = chat.bind_tools([add, multiply]).invoke(_AFTER_ADD)
    assert not out.tool_calls and out.content.startswith("The answer is")
    assert {"name": "multiply", "args": {"a": 5, "b": 4}} in out.response_metadata["dropped_tool_calls"]
    lenient = sequenced_chat(tiny_dir, [CALL, nxt], retry_min_logprob=-1e9)
    assert [c["name"] for c in lenient.bind_tools([add, multiply]).invoke(_AFTER_ADD).tool_calls] == ["multiply"]
