"""Concurrent ChatKV calls on one model join its running batch (the eager engine's scheduler) and get exactly what
they get one at a time with the model lock (``continuous_batching=False``)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from langchain_kvagents import ChatKV
from langchain_kvagents._shared import get_model
from lc_tiny import tiny_dir  # noqa: F401 - fixture

from kvagents import Component, SamplingParams, StopSequence

PROMPTS = ["Hello there", "What is 2 + 2?", "Name a colour.", "Count to three.", "Say something kind.", "Why?"]


def _kw(tiny_dir, **extra):
    return dict(model=tiny_dir, dtype="float32", device="cpu", max_tokens=12, **extra)


def _alone(tiny_dir, **extra):
    chat = ChatKV(**_kw(tiny_dir, continuous_batching=False, **extra))
    return [chat.invoke(p) for p in PROMPTS]


class _Until(Component):
    """Keeps a long request decoding until ``event`` is set, so that calls made meanwhile join its batch."""

    name = "until"

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_step(self, view):
        if self.event.is_set():
            return [StopSequence(i, "stop") for i in range(view.token_ids.shape[0])]
        return None


def _invoke_beside_a_long_request(chat, llm, max_new_tokens: int) -> dict:
    """Every prompt invoked from its own thread while a long request decodes (ended once they all returned)."""
    done = threading.Event()
    host = llm.submit([1, 2, 3], SamplingParams(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True),
                      components=[_Until(done)])
    got: dict[int, object] = {}

    def call(i):
        got[i] = chat.invoke(PROMPTS[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    host.result(timeout=120)
    return got


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, seed=3)])
def test_concurrent_invokes_share_the_batch_and_equal_the_calls_alone(tiny_dir, sampling):
    want = _alone(tiny_dir, **sampling)
    chat = ChatKV(**_kw(tiny_dir, **sampling))
    llm = get_model(tiny_dir, "float32", "cpu")
    got = _invoke_beside_a_long_request(chat, llm, 1900)
    for i, w in enumerate(want):
        assert got[i].content == w.content
        assert got[i].usage_metadata["output_tokens"] == w.usage_metadata["output_tokens"]
    assert llm.scheduler().peak_rows >= 2  # the calls decoded beside the long request


def test_concurrent_async_calls_and_streams_join_the_batch(tiny_dir):
    want = _alone(tiny_dir, temperature=0)
    chat = ChatKV(**_kw(tiny_dir, temperature=0))

    async def streamed(p):
        return "".join([c.content async for c in chat.astream(p)])

    async def main():
        inv = [chat.ainvoke(p) for p in PROMPTS[:3]]
        st = [streamed(p) for p in PROMPTS[3:]]
        return await asyncio.gather(*inv, *st)

    out = asyncio.run(main())
    assert [m.content for m in out[:3]] == [w.content for w in want[:3]]
    assert out[3:] == [w.content for w in want[3:]]
    assert "".join(c.content for c in chat.stream(PROMPTS[0])) == want[0].content


def test_batch_and_fast_calls_keep_their_own_path(tiny_dir):
    chat = ChatKV(**_kw(tiny_dir, temperature=0))
    from langchain_kvagents.chat_models import _Request

    llm = get_model(tiny_dir, "float32", "cpu")
    one = _Request(llm, [[1, 2, 3]], None, [None], [], False, False, "m")
    two = _Request(llm, [[1, 2, 3], [4, 5]], None, [None, None], [], False, False, "m")
    assert chat._joins_batch(one) and not chat._joins_batch(two)
    assert not chat.model_copy(update={"fast": True})._joins_batch(one)
    assert not chat.model_copy(update={"continuous_batching": False})._joins_batch(one)


# -- the router shipped for the embedded model -----------------------------------------------------------------
def test_auto_thinking_without_a_shipped_router_names_the_fix(tiny_dir):
    chat = ChatKV(**_kw(tiny_dir), thinking="auto")
    with pytest.raises(ValueError, match="kvagents train router"):
        chat.invoke("Hi")


@pytest.mark.real_model
def test_auto_thinking_on_qwen_routes_with_the_shipped_router():
    import torch

    from kvagents.control.thinking import ReasoningController
    from kvagents.signals.kv_classifier import KVRouter

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, before)))
    try:
        chat = ChatKV(model="qwen2.5-coder-0.5b", dtype="float32", device="cpu", temperature=0, max_tokens=400,
                      thinking="auto")
        llm = get_model("qwen2.5-coder-0.5b", "float32", "cpu")
        router = chat._kv_router(llm, "auto")
        assert isinstance(router, KVRouter) and chat._kv_router(llm, "auto") is router  # loaded once
        out = chat.invoke("What is 12 + 30? Answer with the number.")
    finally:
        torch.set_num_threads(before)
    r = out.response_metadata["reasoning"]
    assert r["start"] in ("fast", "slow") and "start_score" in r
    # the same decision as the controller built directly from the shipped router on the same prompt
    ctl = ReasoningController("plain", llm.tokenizer, classifier="qwen2.5-coder-0.5b")
    assert ctl.classifier is not None


def test_fast_chat_calls_join_the_fast_scheduler(tiny_dir):
    """``fast=True`` calls made together join the fast path's scheduler and equal the fast calls alone."""
    from kvagents.engine.fast_scheduler import FastScheduler

    want = _alone(tiny_dir, temperature=0, fast=True)
    llm = get_model(tiny_dir, "float32", "cpu")
    if llm._scheduler is not None:
        assert llm._scheduler.shutdown(cancel=True, timeout=60)
    sched = llm.scheduler(fast=True, max_rows=8, max_seq_len=512)
    try:
        chat = ChatKV(**_kw(tiny_dir, temperature=0, fast=True))
        got = _invoke_beside_a_long_request(chat, llm, 400)
        for i, w in enumerate(want):
            assert got[i].content == w.content
        assert isinstance(llm.scheduler(), FastScheduler) and sched.peak_rows >= 2
        streamed = "".join(c.content for c in chat.stream(PROMPTS[0]))
        assert streamed == want[0].content
    finally:
        assert sched.shutdown(cancel=True, timeout=60)
