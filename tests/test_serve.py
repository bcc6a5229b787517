"""``kvagents serve``: the OpenAI-compatible server, driven by the real ``openai`` client and ``langchain_openai``.

Tiny random models saved with real tokenizers (smollm2-135m's chat template; qwen2.5-coder-0.5b's, which renders
tools natively) run on CPU behind uvicorn in a background thread. Greedy outputs are compared with
``KVModel.generate`` on the same chat prompt; tool calls are forced (a component forcing the call text, or the
grammar of ``tool_choice="required"``) so the parse is checked deterministically.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from kvagents import KVModel, SamplingParams  # noqa: E402
from kvagents.engine.components import Component, ForceTokens  # noqa: E402
from kvagents.serving.app import create_app  # noqa: E402
from kvagents.serving.tools import (  # noqa: E402
    ReasoningSplitter,
    ToolCallSplitter,
    parse_tool_calls,
    split_reasoning,
)

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}


def _tiny_dir(out, registry_name: str, config_cls, **extra) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvagents.registry import fetch_model

    tok = AutoTokenizer.from_pretrained(fetch_model(registry_name, progress=False))
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                     initializer_range=0.2, tie_word_embeddings=True, **extra)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


class _Server:
    """uvicorn serving ``app`` on a free localhost port, in a daemon thread."""

    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 30, "uvicorn did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from transformers import LlamaConfig

    path = _tiny_dir(tmp_path_factory.mktemp("smol"), "smollm2-135m", LlamaConfig, bos_token_id=1, eos_token_id=2,
                     pad_token_id=2)
    llm = KVModel.from_pretrained(path, dtype="float32", device="cpu", progress=False).load()
    srv = _Server(create_app(llm, served_model_name="tiny", max_rows=8, max_queue=16))
    yield llm, srv
    srv.stop()


class ForceText(Component):
    """Forces ``ids`` at the start of every sample (the 'model' writes exactly that text, then EOS)."""

    name = "force_text"

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def on_prefill(self, view):
        return [ForceTokens(i, self.ids) for i in range(view.n)]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A tiny Qwen2 with Qwen2.5's tokenizer; one app forces a tool call's text, one does not."""
    from transformers import Qwen2Config

    path = _tiny_dir(tmp_path_factory.mktemp("qwen"), "qwen2.5-coder-0.5b", Qwen2Config, bos_token_id=151643,
                     eos_token_id=151645, pad_token_id=151643)
    llm = KVModel.from_pretrained(path, dtype="float32", device="cpu", progress=False).load()
    tok = llm.tokenizer
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    ids = tok(call, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    forced = _Server(create_app(llm, served_model_name="qwen", max_rows=8, components=lambda: [ForceText(ids)]))
    plain = _Server(create_app(llm, served_model_name="qwen", max_rows=8))
    yield llm, forced, plain
    forced.stop()
    plain.stop()


def _greedy(llm, messages, max_tokens, **kw):
    return llm.generate(messages, SamplingParams(max_new_tokens=max_tokens, temperature=0, **kw)).samples[0][0]


# -- chat -----------------------------------------------------------------------------------------------------------


def test_chat_greedy_equals_generate(smol):
    llm, srv = smol
    ref = _greedy(llm, MESSAGES, 12)
    out = srv.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    ch = out.choices[0]
    assert ch.message.content == ref.text and ch.message.role == "assistant"
    assert ch.finish_reason == {"eos": "stop", "length": "length"}[ref.finish_reason]
    assert out.usage.prompt_tokens == ref.prompt_tokens and out.usage.completion_tokens == ref.generated_tokens
    kv = ch.model_extra["kvagents"]
    assert kv["generated_tokens"] == ref.generated_tokens
    assert kv["probability"]["perplexity"] > 1 and kv["probability"]["mean_logprob"] < 0
    # max_completion_tokens is the newer name of the same limit
    out2 = srv.client().chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=12,
                                                temperature=0)
    assert out2.choices[0].message.content == ref.text


def test_chat_stream_joins_to_the_same_text(smol):
    llm, srv = smol
    ref = _greedy(llm, MESSAGES, 12)
    chunks = list(srv.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0,
                                                       stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [{"eos": "stop", "length": "length"}[ref.finish_reason]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.generated_tokens


def test_n_samples_match_generate_with_the_seed(smol):
    llm, srv = smol
    ref = llm.generate(MESSAGES, SamplingParams(max_new_tokens=10, temperature=0.9, n=2, seed=7)).samples[0]
    out = srv.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0.9,
                                               n=2, seed=7)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.message.content for c in out.choices] == [s.text for s in ref]
    assert out.usage.completion_tokens == sum(s.generated_tokens for s in ref)


def test_stop_string_cuts_the_text(smol):
    llm, srv = smol
    full = _greedy(llm, MESSAGES, 24, ignore_eos=True).text
    stop = full[6:9]
    assert stop.strip(), f"pick another stop string from {full!r}"
    expected = full[: full.find(stop)]
    for stream in (False, True):
        res = srv.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0,
                                                   stop=[stop], stream=stream)
        if stream:
            chunks = list(res)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            text, finish = res.choices[0].message.content, [res.choices[0].finish_reason]
        assert text == expected and finish == ["stop"]


def test_concurrent_clients_share_the_batch(smol):
    llm, srv = smol
    prompts = [[{"role": "user", "content": f"Count to {i}."}] for i in range(4)]
    refs = [_greedy(llm, p, 16).text for p in prompts]
    steps0 = llm.scheduler().steps
    out: dict[int, str] = {}

    def ask(i):
        r = srv.client().chat.completions.create(model="tiny", messages=prompts[i], max_tokens=16, temperature=0)
        out[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [out[i] for i in range(4)] == refs
    assert llm.scheduler().steps > steps0


def test_models_and_health(smol):
    _, srv = smol
    assert [m.id for m in srv.client().models.list().data] == ["tiny"]
    h = httpx.get(srv.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny" and h["max_rows"] == 8


def test_embeddings_are_kv_embeddings(smol):
    llm, srv = smol
    texts = ["the cat sat", "a completely different sentence"]
    ref = llm.embed(texts)
    for fmt in (None, "float", "base64"):  # None: the client asks for base64 and decodes it itself
        kw = {} if fmt is None else {"encoding_format": fmt}
        out = srv.client().embeddings.create(model="tiny", input=texts, **kw)
        rows = [np.frombuffer(base64.b64decode(d.embedding), dtype=np.float32) if fmt == "base64" else d.embedding
                for d in out.data]
        got = torch.tensor(np.array(rows, dtype=np.float32))
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5)
    assert out.usage.prompt_tokens == sum(len(llm.encode_prompt(t)) for t in texts)
    one = srv.client().embeddings.create(model="tiny", input="the cat sat")
    assert len(one.data) == 1 and len(one.data[0].embedding) == ref.shape[1]


def test_text_completions(smol):
    llm, srv = smol
    ref = llm.generate("Once upon a time", SamplingParams(max_new_tokens=8, temperature=0)).samples[0][0]
    out = srv.client().completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert out.choices[0].text == ref.text and out.usage.prompt_tokens == ref.prompt_tokens
    two = srv.client().completions.create(model="tiny", prompt=["Once upon a time", "Hello"], max_tokens=8,
                                          temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == ref.text
    streamed = srv.client().completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0,
                                               stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ref.text


def test_response_format_json_schema(smol):
    _, srv = smol
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    out = srv.client().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "yn", "schema": schema}})
    assert json.loads(out.choices[0].message.content)["answer"] in ("yes", "no")
    obj = srv.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                               response_format={"type": "json_object"})
    assert obj.choices[0].message.content.startswith("{")


def test_thinking_budget(smol):
    _, srv = smol
    out = srv.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, temperature=0,
                                               extra_body={"max_thinking_tokens": 4})
    kv = out.choices[0].model_extra["kvagents"]
    assert kv["reasoning"]["thinking_tokens"] <= 4 and kv["forced_tokens"] > 0
    assert out.choices[0].message.content.startswith("Let's think step by step.")
    low = srv.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                               reasoning_effort="low")
    assert low.choices[0].model_extra["kvagents"]["reasoning"]["start"] == "slow"


# -- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, status, words", [
    ({"temperature": -1}, 400, ["temperature", "-1"]),
    ({"top_p": 0}, 400, ["top_p"]),
    ({"seed": -5}, 400, ["seed", "-5"]),
    ({"n": 99}, 400, ["n=99", "max_rows=8"]),
    ({"model": "gpt-4o"}, 404, ["gpt-4o", "tiny"]),
    ({"messages": []}, 400, ["messages"]),
    ({"tool_choice": "required"}, 400, ["tool_choice", "needs tools"]),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, ["nope"]),
    ({"response_format": {"type": "xml"}}, 400, ["xml"]),
    ({"reasoning_effort": "extreme"}, 400, ["extreme"]),
    ({"logprobs": True}, 400, ["logprobs"]),
    ({"presence_penalty": 0.5}, 400, ["presence_penalty"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     ["image_url"]),
])
def test_errors_are_openai_shaped(smol, body, status, words):
    _, srv = smol
    req = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **body}
    r = httpx.post(srv.url + "/v1/chat/completions", json=req, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]


def test_openai_client_raises_the_status(smol):
    _, srv = smol
    with pytest.raises(openai.BadRequestError, match="temperature"):
        srv.client().chat.completions.create(model="tiny", messages=MESSAGES, temperature=-2, max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="not served"):
        srv.client().chat.completions.create(model="other", messages=MESSAGES, max_tokens=4)


# -- tools ----------------------------------------------------------------------------------------------------------


def test_parse_tool_calls_unit():
    content, calls = parse_tool_calls('Sure.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
                                      '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}')
    assert content == "Sure." and [c["function"]["name"] for c in calls] == ["a", "b"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"x": 1}, {"y": 2}]
    assert len({c["id"] for c in calls}) == 2
    assert parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert parse_tool_calls('{"name": "zzz", "arguments": {}}', names=["a"])[1] == []
    s = ToolCallSplitter()
    shown = "".join(s.feed(d) for d in ["Hi <", "tool_c", 'all>{"name": "a", "arguments": {}}', "</tool_call>"])
    rest, calls = s.finish()
    assert shown == "Hi " and rest == "" and calls[0]["function"]["name"] == "a"
    assert split_reasoning("plan\n</think>\n\nanswer", started=True) == ("plan", "answer")
    r = ReasoningSplitter(started=True)
    pieces = [r.feed(d) for d in ["<think>\n", "step one", "</th", "ink>\n\n", "42"]] + [r.finish()]
    assert "".join(p[0] for p in pieces) == "step one" and "".join(p[1] for p in pieces) == "42"


def test_tool_call_parsed_from_forced_output(qwen):
    _, forced, _ = qwen
    out = forced.client().chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER], max_tokens=60,
        temperature=0)
    ch = out.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Rome"}
    chunks = list(forced.client().chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER], max_tokens=60,
        temperature=0, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and json.loads(deltas[0].function.arguments) == {"city": "Rome"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_tool_round_trip_renders_the_result(qwen):
    """The call goes back as an assistant turn, its result as a tool turn: the prompt is Qwen's own rendering."""
    llm, _, plain = qwen
    history = [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    ]
    out = plain.client().chat.completions.create(model="qwen", messages=history, tools=[WEATHER], max_tokens=8,
                                                 temperature=0, tool_choice="none")
    chat = [history[0], {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "sunny, 24 C"}]
    ids = llm.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert "<tool_response>\nsunny, 24 C\n</tool_response>" in llm.tokenizer.decode(ids)
    ref = llm.generate(list(ids), SamplingParams(max_new_tokens=8, temperature=0)).samples[0][0]
    assert out.usage.prompt_tokens == len(ids) and out.choices[0].message.content == ref.text


def test_required_tool_choice_is_grammar_constrained(qwen):
    _, _, plain = qwen
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        out = plain.client().chat.completions.create(
            model="qwen", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], tool_choice=choice,
            max_tokens=60, temperature=0)
        ch = out.choices[0]
        assert ch.finish_reason == "tool_calls", ch
        assert ch.message.tool_calls[0].function.name == "get_weather"
        assert json.loads(ch.message.tool_calls[0].function.arguments)["city"] in ("Paris", "Rome")


# -- concurrency limits ---------------------------------------------------------------------------------------------


class Slow(Component):
    """Sleeps a little at each step: requests stay in flight long enough to fill the queue."""

    name = "slow"

    def on_step(self, view):
        time.sleep(0.05)


def test_full_queue_is_429_and_disconnect_cancels(smol):
    llm0, _ = smol
    llm = KVModel(llm0.model, llm0.tokenizer)  # its own scheduler (max_rows=1, max_queue=1)
    srv = _Server(create_app(llm, served_model_name="slow", max_rows=1, max_queue=1, components=lambda: [Slow()]))
    try:
        body = {"model": "slow", "messages": MESSAGES, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
        results = {}

        def post(key):
            results[key] = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)

        a = threading.Thread(target=post, args=("a",))
        a.start()
        _wait(lambda: llm.scheduler().pending() == 1)
        b = threading.Thread(target=post, args=("b",))
        b.start()
        _wait(lambda: llm.scheduler().pending() == 2)
        for stream in (False, True):  # a streamed request is refused before its stream starts
            with pytest.raises(openai.RateLimitError, match="max_queue=1"):
                srv.client().chat.completions.create(model="slow", messages=MESSAGES, max_tokens=4, stream=stream)
        a.join(120)
        b.join(120)
        assert results["a"].status_code == 200 and results["b"].status_code == 200
        assert results["a"].json()["usage"]["completion_tokens"] == 30
        # a streaming client that goes away cancels its request: its row is free long before 400 slow steps (20 s)
        steps0 = llm.scheduler().steps
        with httpx.stream("POST", srv.url + "/v1/chat/completions",
                          json={**body, "max_tokens": 400, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        _wait(lambda: llm.scheduler().pending() == 0, timeout=5)
        assert llm.scheduler().steps - steps0 < 200
        # ... and so does a non-streaming client that gives up waiting
        steps0 = llm.scheduler().steps
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/chat/completions", json={**body, "max_tokens": 400}, timeout=1.0)
        _wait(lambda: llm.scheduler().pending() == 0, timeout=5)
        assert llm.scheduler().steps - steps0 < 200
    finally:
        srv.stop()


def _wait(cond, timeout: float = 30.0) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "condition not reached in time"
        time.sleep(0.01)


# -- LangChain ------------------------------------------------------------------------------------------------------


def test_langchain_openai_against_the_server(smol):
    lc = pytest.importorskip("langchain_openai")
    llm, srv = smol
    ref = _greedy(llm, MESSAGES, 12)
    chat = lc.ChatOpenAI(base_url=srv.url + "/v1", api_key="none", model="tiny", temperature=0, max_tokens=12,
                         max_retries=0)
    lc_messages = [("system", MESSAGES[0]["content"]), ("human", MESSAGES[1]["content"])]
    msg = chat.invoke(lc_messages)
    assert msg.content == ref.text
    assert "".join(c.content for c in chat.stream(lc_messages)) == ref.text


def test_langchain_openai_tool_calls(qwen):
    lc = pytest.importorskip("langchain_openai")
    _, forced, _ = qwen
    chat = lc.ChatOpenAI(base_url=forced.url + "/v1", api_key="none", model="qwen", temperature=0, max_tokens=60,
                         max_retries=0).bind_tools([WEATHER])
    msg = chat.invoke("Weather in Rome?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert msg.tool_calls[0]["args"] == {"city": "Rome"}


# -- CLI ------------------------------------------------------------------------------------------------------------


def test_cli_serve_help_and_one_line_errors(capsys):
    from kvagents.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--host", "--port", "--max-rows", "--max-queue", "--dtype", "--device"):
        assert flag in out
    assert main(["serve", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-model" in err


def test_tools_on_a_template_without_native_tools(smol):
    """smollm2's template renders no tools: they go into a system prompt, and the required call is still parsed."""
    _, srv = smol
    out = srv.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], tool_choice="required",
        max_tokens=60, temperature=0)
    ch = out.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.tool_calls[0].function.name == "get_weather"
    assert out.usage.prompt_tokens > 60  # the tool instructions are in the prompt


# -- token ids, the fast scheduler -----------------------------------------------------------------------------------


def test_return_token_ids(smol):
    llm, srv = smol
    ref = _greedy(llm, MESSAGES, 12)
    base = {"model": "tiny", "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    out = httpx.post(srv.url + "/v1/chat/completions", json=base, timeout=60).json()
    assert out["choices"][0]["kvagents"]["token_ids"] == ref.token_ids
    ids, text = [], ""
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**base, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    ids += (ch.get("kvagents") or {}).get("token_ids", [])
                    text += ch["delta"].get("content") or ""
    assert ids == ref.token_ids and text == ref.text  # each chunk lists the tokens whose text it carries
    plain = srv.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0)
    assert "token_ids" not in plain.choices[0].model_extra["kvagents"]  # off unless asked


@pytest.fixture(scope="module")
def fast(smol):
    llm0, _ = smol
    llm = KVModel(llm0.model, llm0.tokenizer)  # its own (fast) scheduler
    srv = _Server(create_app(llm, served_model_name="fast", max_rows=4, fast=True, max_seq_len=256))
    yield llm, srv
    srv.stop()


def test_fast_server_serves_the_fast_paths_tokens(fast):
    llm, srv = fast
    assert httpx.get(srv.url + "/health").json()["fast"] is True
    assert llm.scheduler().config.fast and llm.scheduler().max_seq_len == 256
    ref = llm.generate(MESSAGES, SamplingParams(max_new_tokens=12, temperature=0), fast=True).samples[0][0]
    out = srv.client().chat.completions.create(model="fast", messages=MESSAGES, max_tokens=12, temperature=0)
    assert out.choices[0].message.content == ref.text
    assert "probability" not in out.choices[0].model_extra["kvagents"]  # no per-request component: no scores
    chunks = list(srv.client().chat.completions.create(model="fast", messages=MESSAGES, max_tokens=12, temperature=0,
                                                       stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    ref_s = llm.generate("Once upon a time", SamplingParams(max_new_tokens=8, temperature=0.9, seed=3),
                         fast=True).samples[0][0]
    got = srv.client().completions.create(model="fast", prompt="Once upon a time", max_tokens=8, temperature=0.9,
                                          seed=3)
    assert got.choices[0].text == ref_s.text
    # a chat request without a token limit gets what its slot has left (default_max_tokens 1024 > max_seq_len 256)
    long = srv.client().chat.completions.create(model="fast", messages=MESSAGES, temperature=0,
                                                extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens + long.usage.completion_tokens == 256
    # tools with tool_choice auto are parsed, not constrained
    auto = srv.client().chat.completions.create(model="fast", messages=MESSAGES, tools=[WEATHER], max_tokens=8,
                                                temperature=0)
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("body", [
    {"tools": [WEATHER], "tool_choice": "required", "max_tokens": 90},
    {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 90},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "yn", "schema": {
        "type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"], "additionalProperties": False}}}, "max_tokens": 40},
    {"response_format": {"type": "json_object"}, "max_tokens": 6},
    {"max_thinking_tokens": 4, "max_tokens": 30},
    {"reasoning_effort": "low", "max_tokens": 8},
])
def test_fast_server_runs_grammars_and_thinking_budgets_as_the_eager_server(smol, fast, body):
    """Grammar-constrained requests and thinking budgets on the fast scheduler give the eager server's answer."""
    _, eager = smol
    _, srv = fast
    want = httpx.post(eager.url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES,
                                                                "temperature": 0, **body}, timeout=120).json()
    got = httpx.post(srv.url + "/v1/chat/completions", json={"model": "fast", "messages": MESSAGES,
                                                             "temperature": 0, **body}, timeout=120).json()
    assert "choices" in got and "choices" in want, (got, want)
    a, b = got["choices"][0], want["choices"][0]
    assert (a["message"].get("content"), a["finish_reason"]) == (b["message"].get("content"), b["finish_reason"])
    calls = [[c["function"] for c in x["message"].get("tool_calls") or []] for x in (a, b)]
    assert calls[0] == calls[1]  # the same calls (their ids are random)
    if "tool_choice" in body:
        assert a["finish_reason"] == "tool_calls" and a["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    if "max_thinking_tokens" in body:
        assert a["kvagents"]["reasoning"]["thinking_tokens"] <= 4 and a["kvagents"]["forced_tokens"] > 0


def test_grammar_requests_joining_either_scheduler_mid_run_equal_alone(smol):
    """A JSON-schema grammar (xgrammar) on requests that join a running batch, n = 2 with sampling too: the eager
    scheduler gives ``generate``'s tokens, the fast one ``generate(..., fast=True)``'s."""
    from kvagents.grammar import GrammarMask

    llm0, _ = smol
    llm = KVModel(llm0.model, llm0.tokenizer)
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "n": {"type": "integer"}}, "required": ["answer", "n"]}
    jobs = [("A JSON answer:", SamplingParams(max_new_tokens=30, temperature=0)),
            ("Reply in JSON.", SamplingParams(max_new_tokens=24, temperature=0.8, seed=5, n=2))]
    mask = lambda q: GrammarMask.from_json_schema(llm, schema, n=q.n)  # noqa: E731
    host_q = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    for fast in (False, True):
        want = [llm.generate(p, q, logits_processors=[mask(q)], fast=fast) for p, q in jobs]
        sched = llm.scheduler(fast=fast, max_rows=8, **({"max_seq_len": 256} if fast else {}))
        try:
            handles, seen = [], [0]

            def submit_mid_run(ev):  # on the loop's thread, while the host request decodes
                seen[0] += 1
                if seen[0] == 3:
                    handles.extend(sched.submit(p, q, logits_processors=[mask(q)]) for p, q in jobs)

            host = sched.submit("Once upon a time", host_q, on_text=submit_mid_run)
            assert host.result(timeout=120).samples[0][0].token_ids == llm.generate(
                "Once upon a time", host_q, fast=fast).samples[0][0].token_ids
            assert len(handles) == len(jobs)
            for h, w in zip(handles, want):
                got = h.result(timeout=120).samples[0]
                assert [s.token_ids for s in got] == [s.token_ids for s in w.samples[0]]
                assert all(s.text.lstrip().startswith("{") for s in got)
        finally:
            assert sched.shutdown(cancel=True, timeout=60)


def test_fast_server_refuses_a_request_longer_than_its_slots(fast):
    _, srv = fast
    r = httpx.post(srv.url + "/v1/chat/completions",
                   json={"model": "fast", "messages": MESSAGES, "max_tokens": 1000}, timeout=60)
    assert r.status_code == 400, r.text
    assert "max_seq_len=256" in r.json()["error"]["message"]


def test_fast_app_takes_components_and_scores_but_max_seq_len_only_with_fast(smol):
    llm0, _ = smol
    llm = KVModel(llm0.model, llm0.tokenizer)
    with pytest.raises(ValueError, match="max_seq_len"):
        create_app(llm, max_seq_len=128)
    assert llm._scheduler is None  # refused before any scheduler started
    srv = _Server(create_app(llm, served_model_name="f", max_rows=2, fast=True, max_seq_len=128, scores=True,
                             components=lambda: [Slow()]))
    try:
        out = srv.client().chat.completions.create(model="f", messages=MESSAGES, max_tokens=4, temperature=0)
        assert out.choices[0].model_extra["kvagents"]["probability"]["mean_logprob"] < 0
    finally:
        srv.stop()


def test_cli_serve_fast_flags(capsys):
    from kvagents.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--fast" in out and "--max-seq-len" in out
    assert main(["serve", "--model", "no-such-model", "--max-seq-len", "128"]) == 2
    assert "--fast" in capsys.readouterr().err  # refused before the model loads
