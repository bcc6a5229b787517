"""Runnables (best-of-N, KV events, budgeted reasoning) and the grammar's closing mode, on a tiny random model."""
# ruff: noqa: F811  (pytest fixtures imported from lc_tiny are parameters of the tests)

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_kvagents import ChatKV, KVBestOfN, KVStepEvents, budgeted_reasoning
from lc_tiny import tiny_dir  # noqa: F401 - fixture
from pydantic import BaseModel

from kvagents import KVPooling
from kvagents.grammar import GrammarMask, closing_tokens, compile_grammar


def chat_for(tiny_dir, **kw):
    base = dict(model=tiny_dir, dtype="float32", device="cpu", temperature=0, max_tokens=16)
    return ChatKV(**{**base, **kw})


def test_best_of_n_returns_the_argmax_candidate_with_all_scores(tiny_dir):
    bon = KVBestOfN(llm=chat_for(tiny_dir, temperature=1.0, seed=1), n=4, score="mean_logprob")
    msg = bon.invoke("Hello")
    cands = msg.response_metadata["candidates"]
    assert len(cands) == 4
    best = max(cands, key=lambda c: c["scores"]["mean_logprob"])
    assert msg.response_metadata["chosen_index"] == best["index"]
    assert msg.content == best["text"]
    assert len({c["text"] for c in cands}) > 1  # sampled, not four copies

    async def main():
        return await bon.ainvoke("Hello")

    assert asyncio.run(main()).response_metadata["candidates"] == cands  # seeded: same samples


class Collect(BaseCallbackHandler):
    def __init__(self):
        self.events = []

    def on_custom_event(self, name, data, **kwargs):
        self.events.append((name, data))


def test_kv_events_carry_the_pooled_kv_of_the_prefix(tiny_dir):
    chat = chat_for(tiny_dir, max_tokens=20)
    pooling = KVPooling(segment="all", layers=2)  # the tiny model has 2 layers
    ev = KVStepEvents(llm=chat, every=5, pooling=pooling)
    h = Collect()
    msg = ev.invoke("Hello there", config={"callbacks": [h]})
    steps = [d["step"] for _, d in h.events]
    assert steps == [s for s in range(5, msg.usage_metadata["output_tokens"], 5)]
    # independent check: one prefill of prompt + the first `step` generated tokens, pooled as a prompt
    llm = chat.llm
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                               add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    gen = llm.generate([prompt], max_new_tokens=20, temperature=0).samples[0][0].token_ids
    name, data = h.events[-1]
    want = llm.embed([prompt + gen[: data["step"]]], KVPooling(segment="prompt", layers=2))[0]
    np.testing.assert_allclose(np.asarray(data["embedding"]), want.numpy(), atol=1e-4)
    assert name == "kv_step"


def test_kv_events_rate_limit_and_astream_events(tiny_dir):
    chat = chat_for(tiny_dir, max_tokens=20)
    h = Collect()
    KVStepEvents(llm=chat, every=1, min_interval_s=3600, include_vectors=False,
                 pooling=KVPooling(segment="all", layers=2)).invoke("Hi", config={"callbacks": [h]})
    assert len(h.events) == 1 and "embedding" not in h.events[0][1]

    async def main():
        out = []
        async for e in KVStepEvents(llm=chat, every=4, pooling=KVPooling(layers=2)).astream_events("Hi", version="v2"):
            if e["event"] == "on_custom_event":
                out.append(e["data"]["step"])
        return out

    assert asyncio.run(main()) == [4, 8, 12, 16]


def test_budgeted_reasoning_is_configurable(tiny_dir):
    r = budgeted_reasoning(chat_for(tiny_dir, max_tokens=40), max_thinking_tokens=6, reasoning_effort=None)
    slow = r.invoke("What is 2+2?")
    info = slow.response_metadata["reasoning"]
    assert info["start"] == "slow" and info["thinking_tokens"] <= 6
    assert slow.usage_metadata["output_token_details"]["reasoning"] == info["thinking_tokens"]
    fast = r.invoke("What is 2+2?", config={"configurable": {"thinking": "fast"}})
    assert fast.response_metadata["reasoning"]["start"] == "fast"
    assert fast.usage_metadata["output_token_details"]["reasoning"] == 0
    big = r.invoke("What is 2+2?", config={"configurable": {"max_thinking_tokens": 12}})
    assert big.response_metadata["reasoning"]["thinking_tokens"] > info["thinking_tokens"]


class Pick(BaseModel):
    colour: str
    note: str
    count: int


@pytest.mark.parametrize("budget", [24, 40, 64])
def test_closing_mode_completes_json_within_a_tight_budget(tiny_dir, budget):
    llm = chat_for(tiny_dir).llm
    g = compile_grammar(llm, "json_schema", Pick.model_json_schema())  # no maxLength: only closing mode helps
    prompt = llm.tokenizer("Pick:")["input_ids"]

    def run(reserve):
        mask = GrammarMask([g], budget=budget, reserve=reserve, closing_tokens=closing_tokens(llm),
                           stop_token_ids=llm.engine.eos_token_ids)
        return llm.generate([prompt], max_new_tokens=budget, temperature=0, logits_processors=[mask]).samples[0][0]

    free = run(0)  # a random model never closes its string on its own
    with pytest.raises(ValueError):
        json.loads(free.text)
    done = run(20)
    Pick.model_validate_json(done.text)
    assert done.generated_tokens <= budget
    if budget == 40:  # the fast path runs the grammar mask between its forward and sampling steps: same answer
        mask = GrammarMask([g], budget=budget, reserve=20, closing_tokens=closing_tokens(llm),
                           stop_token_ids=llm.engine.eos_token_ids)
        fast = llm.generate([prompt], max_new_tokens=budget, temperature=0, logits_processors=[mask], fast=True)
        assert fast.samples[0][0].token_ids == done.token_ids


def test_plain_thinking_streams_reasoning_like_invoke(tiny_dir):
    chat = chat_for(tiny_dir, max_tokens=40, thinking="slow", max_thinking_tokens=6)
    msg = chat.invoke("What is 2+2?")
    assert msg.additional_kwargs["reasoning_content"].startswith("Let's think step by step.")
    assert msg.content.startswith("The final answer is")
    full = None
    for c in chat.stream("What is 2+2?"):
        full = c if full is None else full + c
    assert full.content == msg.content
    assert full.additional_kwargs["reasoning_content"] == msg.additional_kwargs["reasoning_content"]
    assert [b["type"] for b in full.content_blocks][:1] == ["reasoning"]


def test_fast_chat_model_answers_streams_and_structures_like_the_eager_one(tiny_dir):
    def weather(city: str) -> str:
        """Weather in a city."""
        return "sunny"

    eager, fast = chat_for(tiny_dir, max_tokens=24), chat_for(tiny_dir, max_tokens=24, fast=True)
    assert fast.invoke("Hello there").content == eager.invoke("Hello there").content
    streamed = "".join(c.content for c in fast.stream("Hello there"))
    assert streamed == eager.invoke("Hello there").content
    # grammar-constrained decoding (structured output, tool calls) runs on the fast path too
    eager, fast = chat_for(tiny_dir, max_tokens=64), chat_for(tiny_dir, max_tokens=64, fast=True)
    want = eager.with_structured_output(Pick, include_raw=True).invoke("Pick one")
    got = fast.with_structured_output(Pick, include_raw=True).invoke("Pick one")
    assert got["raw"].content == want["raw"].content and got["parsed"] == want["parsed"]
    json.loads(got["raw"].content)  # the grammar held on the fast path
    calls = fast.bind_tools([weather], tool_choice="any").invoke("Weather in Paris?").tool_calls
    ref = eager.bind_tools([weather], tool_choice="any").invoke("Weather in Paris?").tool_calls
    assert [(c["name"], c["args"]) for c in calls] == [(c["name"], c["args"]) for c in ref]  # ids are random
    assert calls and calls[0]["name"] == "weather"
    assert fast.llm.fast_engine.forward_calls > 0  # the fast engine did the work
