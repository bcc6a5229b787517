"""Streams on both engines: a generation's state belongs to the generation. Interleaved, nested and suspended
streams give the tokens of the same calls alone; a suspended stream blocks no other thread; an abandoned
(closed, garbage-collected) or failed stream releases what it holds. Tiny random models, no downloads."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from tiny import ByteTokenizer, tiny_model

from kvagents import Component, KVEmbedding, KVModel, KVPooling, SamplingParams

_P, _Q = [5, 6, 7, 8, 9], [40, 41, 42, 43, 44]  # same shape: the fast path would pick the same buffers
_STREAM_PARAMS = [SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True),
                  SamplingParams(max_new_tokens=12, temperature=0.9, seed=4, n=2, ignore_eos=True)]


@pytest.fixture(scope="module")
def sllm():
    return KVModel(tiny_model("qwen2"), ByteTokenizer(), sync_every=3)


def _tokens(res):
    return [s.token_ids for row in res.samples for s in row]


def _alone(llm, prompt, params, fast, components=()):
    res = llm.generate([prompt], params, fast=fast, components=list(components))
    return _tokens(res), res


def _free(llm):
    """No buffer set of the fast engine is owned by a generation."""
    return llm._fast_engine is None or not any(s.in_use for s in llm._fast_engine._sets)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("params", _STREAM_PARAMS, ids=["greedy", "sampled"])
def test_generate_inside_a_suspended_stream_equals_the_calls_alone(sllm, fast, params):
    want_p, res_p = _alone(sllm, _P, params, fast)
    want_q, _ = _alone(sllm, _Q, params, fast)
    assert want_p != want_q
    stream = sllm.stream([_P], params, fast=fast)
    it = iter(stream)
    first = next(it)
    assert _tokens(sllm.generate([_Q], params, fast=fast)) == want_q
    events = [first, *it]
    assert _tokens(stream.result) == want_p
    assert stream.result.stats.forward_calls == res_p.stats.forward_calls
    text = {(s.prompt_index, s.sample_index): s.text for row in res_p.samples for s in row}
    for key in text:
        assert "".join(e.text for e in events if (e.prompt_index, e.sample_index) == key) == text[key]
    assert _free(sllm)


@pytest.mark.parametrize("fast", [False, True])
def test_two_streams_interleaved_event_by_event(sllm, fast):
    params = _STREAM_PARAMS[1]
    want = [_alone(sllm, p, params, fast)[0] for p in (_P, _Q)]
    streams = [sllm.stream([p], params, fast=fast) for p in (_P, _Q)]
    live = [iter(s) for s in streams]
    while live:  # round robin: one event of each in turn
        for it in list(live):
            if next(it, None) is None:
                live.remove(it)
    assert [_tokens(s.result) for s in streams] == want
    assert _free(sllm)


@pytest.mark.parametrize("fast", [False, True])
def test_generate_from_an_on_text_callback(sllm, fast):
    """Same thread, nested: the outer generation is suspended inside its own callback."""
    params = _STREAM_PARAMS[1]
    want_p, want_q = (_alone(sllm, p, params, fast)[0] for p in (_P, _Q))
    inner = []

    def on_text(event):
        if not inner:
            inner.append(_tokens(sllm.generate([_Q], params, fast=fast)))

    outer = sllm.generate([_P], params, fast=fast, on_text=on_text)
    assert (_tokens(outer), inner) == (want_p, [want_q])


@pytest.mark.parametrize("fast", [False, True])
def test_interleaved_graph_components_keep_their_own_state(sllm, fast):
    params = _STREAM_PARAMS[0]

    def comps():
        return [KVEmbedding(KVPooling(segment="generated"), name="emb")]

    _, ra = _alone(sllm, _P, params, fast, comps())
    _, rb = _alone(sllm, _Q, params, fast, comps())
    stream = sllm.stream([_P], params, fast=fast, components=comps())
    it = iter(stream)
    next(it)
    mid = sllm.generate([_Q], params, fast=fast, components=comps())
    list(it)
    for got, want in ((stream.result, ra), (mid, rb)):
        assert _tokens(got) == _tokens(want)
        torch.testing.assert_close(got.samples[0][0].outputs["emb"], want.samples[0][0].outputs["emb"])


@pytest.mark.parametrize("fast", [False, True])
def test_a_suspended_stream_does_not_block_another_thread(sllm, fast):
    params = _STREAM_PARAMS[1]
    want_p, want_q = (_alone(sllm, p, params, fast)[0] for p in (_P, _Q))
    stream = sllm.stream([_P], params, fast=fast)
    it = iter(stream)
    next(it)
    got = []
    worker = threading.Thread(target=lambda: got.append(_tokens(sllm.generate([_Q], params, fast=fast))), daemon=True)
    try:
        worker.start()
        worker.join(timeout=60)  # generous: the call itself takes milliseconds
        assert not worker.is_alive(), "another thread's generate is blocked by a suspended stream"
    finally:
        list(it)  # unblocks the worker if the lock was held
        worker.join(timeout=60)
    assert got == [want_q] and _tokens(stream.result) == want_p


def test_a_stream_shares_the_model_with_other_threads_step_by_step(sllm):
    """A stream consumed in one thread while another thread generates: both give their tokens alone."""
    params = _STREAM_PARAMS[1]
    want_p, want_q = (_alone(sllm, p, params, True)[0] for p in (_P, _Q))
    results, errors = [], []

    def generate_many():
        try:
            results.extend(_tokens(sllm.generate([_Q], params, fast=True)) for _ in range(4))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    worker = threading.Thread(target=generate_many, daemon=True)
    stream = sllm.stream([_P], params, fast=True)
    worker.start()
    for _ in stream:
        pass
    worker.join(timeout=120)
    assert not worker.is_alive() and not errors
    assert results == [want_q] * 4 and _tokens(stream.result) == want_p


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("how", ["close", "with", "gc", "break"])
def test_an_abandoned_stream_releases_what_it_holds(sllm, fast, how):
    params = _STREAM_PARAMS[1]
    want_q = _alone(sllm, _Q, params, fast)[0]
    stream = sllm.stream([_P], params, fast=fast)
    if how == "with":
        with stream as s:
            next(iter(s))
    elif how == "break":
        for _ in stream:
            break
        stream.close()
    else:
        next(iter(stream))
        if fast:
            assert not _free(sllm)  # it owns its buffers while suspended
        if how == "close":
            stream.close()
        else:
            del stream
            gc.collect()
    assert _free(sllm)
    if how in ("close", "with", "break"):
        assert list(stream) == [] and stream.result is None  # closed: nothing more
        stream.close()  # idempotent
    acquired = sllm._lock.acquire(timeout=5)  # nothing holds the model lock
    assert acquired
    sllm._lock.release()
    assert _alone(sllm, _Q, params, fast)[0] == want_q
    if fast:
        assert len(sllm._fast_engine._sets) == 1  # the overlapped sets were dropped again


class _FailsAt(Component):
    name = "fails"

    def __init__(self, step):
        self.step = step

    def on_step(self, view):
        if view.step == self.step:
            raise RuntimeError("component failure")


@pytest.mark.parametrize("fast", [False, True])
def test_a_failed_stream_releases_its_buffers(sllm, fast):
    stream = sllm.stream([_P], _STREAM_PARAMS[0], fast=fast, components=[_FailsAt(5)])
    with pytest.raises(RuntimeError, match="component failure"):
        list(stream)
    assert _free(sllm) and list(stream) == []
    with pytest.raises(RuntimeError, match="component failure"):
        sllm.generate([_P], _STREAM_PARAMS[0], fast=fast, components=[_FailsAt(2)])
    assert _free(sllm)
