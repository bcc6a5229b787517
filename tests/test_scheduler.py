"""Continuous batching (engine/scheduler.py): every request gives exactly what it gives alone via KVModel.generate.

Requests are admitted mid-run deterministically: a component of a running request submits them from the loop's
own thread at a given step. Tests that need the loop to stand still hold the model lock (the loop takes it for
each iteration), so no test depends on timing.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from concurrent_submissions import submit_from_threads
from pydantic import ValidationError
from test_engine import ForwardCounter
from tiny import ByteTokenizer, tiny_model

from kvagents import Component, ForceTokens, KVEmbedding, KVModel, KVPooling, SamplingParams, StopSequence
from kvagents.control.thinking import PLAIN_FORMAT, HardBudget
from kvagents.engine.scheduler import (
    CANCELLED,
    QueueFullError,
    Scheduler,
    SchedulerClosedError,
    SchedulerConfig,
)
from kvagents.signals.scoring import ProbabilityScores, TokenCoE

TOK = ByteTokenizer()
LONG = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)


@pytest.fixture
def llm():
    models = []

    def make(arch: str = "qwen3") -> KVModel:
        m = KVModel(tiny_model(arch), ByteTokenizer())
        models.append(m)
        return m

    yield make
    for m in models:
        if m._scheduler is not None:
            assert m._scheduler.shutdown(cancel=True, timeout=60)


def prompt(k: int, length: int) -> list[int]:
    return [3 + (7 * k + 3 * i) % 250 for i in range(length)]


class ForceText(Component):
    """Forces ``text`` into sample ``index`` at step ``at``."""

    name = "force"

    def __init__(self, text: str, at: int = 0, index: int = 0):
        self.ids, self.at, self.index = TOK(text)["input_ids"], at, index

    def on_step(self, view):
        return [ForceTokens(self.index, self.ids)] if view.step == self.at else None


class StopAt(Component):
    """Stops sample ``index`` at step ``at`` (finish reason ``"enough"``)."""

    name = "stopper"

    def __init__(self, at: int, index: int = 0):
        self.at, self.index = at, index

    def on_step(self, view):
        return [StopSequence(self.index, reason="enough")] if view.step == self.at else None


class SubmitAt(Component):
    """At step ``at`` of its own request, submits ``jobs`` (prompt, params, components factory) to ``sched`` from
    the loop's thread: they join while this request runs."""

    name = "submitter"

    def __init__(self, sched: Scheduler, at: int, jobs: list):
        self.sched, self.at, self.jobs, self.handles = sched, at, jobs, []

    def on_step(self, view):
        if view.step == self.at:
            self.handles = [self.sched.submit(p, q, components=f()) for p, q, f in self.jobs]


def close(x, y) -> None:
    if isinstance(x, torch.Tensor):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)  # float32 CPU: batched/padded products round apart
    elif isinstance(x, dict):
        assert x.keys() == y.keys()
        for k in x:
            close(x[k], y[k])
    elif isinstance(x, (list, tuple)) and any(isinstance(v, (torch.Tensor, float, dict, list)) for v in x):
        assert len(x) == len(y)
        for a, b in zip(x, y):
            close(a, b)
    elif isinstance(x, float):
        assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-5), (x, y)
    else:
        assert x == y


def assert_same(got, want) -> None:
    """``got`` (scheduler) equals ``want`` (alone): tokens, text, reasons and counts exactly; outputs closely."""
    assert len(got.samples) == len(want.samples) == 1
    assert len(got.samples[0]) == len(want.samples[0])
    for a, b in zip(got.samples[0], want.samples[0]):
        assert a.token_ids == b.token_ids
        assert (a.text, a.finish_reason, a.generated_tokens, a.forced_tokens, a.prompt_tokens) == (
            b.text, b.finish_reason, b.generated_tokens, b.forced_tokens, b.prompt_tokens)
        assert a.outputs.keys() == b.outputs.keys()
        close(a.outputs, b.outputs)


def alone(llm: KVModel, p, q, factory=lambda: []):
    return llm.generate([p], q, components=factory())


def embedding_and_coe():
    return [KVEmbedding(KVPooling(segment="all", layers=2)), TokenCoE(initial_capacity=4), ProbabilityScores(window=4)]


CASES = [  # (prompt, params, components factory): different lengths, parameters and components
    (prompt(1, 3), SamplingParams(max_new_tokens=12, temperature=0), lambda: []),
    (prompt(2, 30), SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=11, n=2), lambda: []),
    (prompt(3, 9), SamplingParams(max_new_tokens=14, temperature=1.2, top_k=20, seed=5, n=3, ignore_eos=True),
     lambda: [StopAt(4, index=1), *embedding_and_coe()]),
    (prompt(4, 5), SamplingParams(max_new_tokens=30, temperature=0, stop=["END"]),
     lambda: [ForceText("hello END world", at=2)]),
    (prompt(5, 18), SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True),
     lambda: [HardBudget(PLAIN_FORMAT, TOK, 7, max_answer_tokens=5)]),
    (prompt(6, 2), SamplingParams(max_new_tokens=9, temperature=0.7, seed=2, stop=["a", "b", "c"]), lambda: []),
    (prompt(7, 45), SamplingParams(max_new_tokens=8, temperature=0, n=2), embedding_and_coe),
    ("Hi there, tiny model", SamplingParams(max_new_tokens=7, temperature=0.5, seed=8), lambda: []),
    (prompt(8, 5), SamplingParams(max_new_tokens=0), embedding_and_coe),
]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_requests_admitted_mid_run_equal_alone(llm, arch):
    llm = llm(arch)
    sched = llm.scheduler(max_rows=16, prefill_chunk=16)
    first = SubmitAt(sched, 3, CASES[:4])
    second = SubmitAt(sched, 9, CASES[4:])
    host = sched.submit(prompt(0, 12), LONG, components=[first, second])
    got = host.result(timeout=120)
    assert_same(got, alone(llm, prompt(0, 12), LONG))
    handles = first.handles + second.handles
    assert len(handles) == len(CASES)
    for h, (p, q, f) in zip(handles, CASES):
        assert_same(h.result(timeout=120), alone(llm, p, q, f))
    assert sched.peak_rows >= 1 + 1 + 2 + 3 + 1  # the host and the first jobs decoded in one batch
    assert got.samples[0][0].outputs == {}


def test_rows_are_freed_and_reused(llm):
    llm = llm("qwen2")
    sched = llm.scheduler(max_rows=3, prefill_chunk=64)
    jobs = [(prompt(k, 2 + 5 * k), SamplingParams(max_new_tokens=4 + 3 * (k % 4), temperature=0.8, seed=k,
                                                  n=1 + k % 2, ignore_eos=True), lambda: []) for k in range(8)]
    with llm._lock:  # all queued before the loop runs once: only 3 rows for 12 sequences
        handles = [sched.submit(p, q) for p, q, _ in jobs]
    for h, (p, q, _) in zip(handles, jobs):
        assert_same(h.result(timeout=120), alone(llm, p, q))
    assert sched.peak_rows == 3
    assert sched.pending() == 0


def test_n_samples_share_one_prefill_and_long_prompts_are_chunked(llm):
    llm = llm("llama")
    sched = llm.scheduler(max_rows=8, prefill_chunk=5)
    long_p = prompt(9, 23)
    q = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, n=4, ignore_eos=True)
    counter = ForwardCounter(llm.model)
    try:
        res = sched.submit(long_p, q).result(timeout=60)
        calls = list(counter.lengths)
    finally:
        counter.close()
    assert calls == [5, 5, 5, 5, 3] + [1] * 5  # 23 prompt tokens in chunks of 5, once for the 4 samples
    assert res.stats.forward_calls == 10 and res.stats.prefill_tokens == 23
    assert_same(res, alone(llm, long_p, q))


def test_stream_gives_one_event_per_token_and_the_samples_text(llm):
    llm = llm("qwen3")
    sched = llm.scheduler(max_rows=4)
    q = SamplingParams(max_new_tokens=30, temperature=0.9, seed=4, n=2, stop=["STOP"])
    seen = []
    h = sched.submit(prompt(1, 7), q, components=[ForceText("one two STOP three", at=1)], stream=True,
                     on_text=seen.append)
    events = list(h)
    assert events == seen
    res = h.result(timeout=60)
    assert_same(res, alone(llm, prompt(1, 7), q, lambda: [ForceText("one two STOP three", at=1)]))
    for s in res.samples[0]:
        mine = [e for e in events if e.sample_index == s.sample_index]
        assert [e.token_id for e in mine] == s.token_ids
        assert "".join(e.text for e in mine) == s.text
        assert [e.finish_reason for e in mine if e.finish_reason] == [s.finish_reason]
        assert mine[-1].finish_reason == s.finish_reason
        assert all(e.prompt_index == 0 for e in mine)
        assert all("STOP" not in "".join(e.text for e in mine[:k]) for k in range(len(mine) + 1))
    assert res.samples[0][0].text.endswith("one two ") and res.samples[0][0].finish_reason == "stop"


def test_logits_processors_are_per_request(llm):
    llm = llm("qwen2")
    sched = llm.scheduler(max_rows=4)
    free = alone(llm, prompt(2, 6), SamplingParams(max_new_tokens=10, temperature=0)).samples[0][0].token_ids

    def ban(logits, prev, valid):  # never the free run's first two tokens
        return logits.index_fill(-1, torch.tensor(free[:2], device=logits.device), float("-inf"))

    q = SamplingParams(max_new_tokens=10, temperature=0)
    with llm._lock:
        h_ban = sched.submit(prompt(2, 6), q, logits_processors=[ban])
        h_free = sched.submit(prompt(2, 6), q)
    banned = h_ban.result(timeout=60)
    assert_same(banned, llm.generate([prompt(2, 6)], q, logits_processors=[ban]))
    assert not set(free[:2]) & set(banned.samples[0][0].token_ids)
    assert h_free.result(timeout=60).samples[0][0].token_ids == free


def test_cancel_frees_the_row_at_the_next_step(llm):
    llm = llm("qwen3")
    sched = llm.scheduler(max_rows=2)
    q = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
    box = {}

    def cancel_at_step_5(ev):
        box.setdefault("count", 0)
        box["count"] += 1
        if box["count"] == 5:
            box["handle"].cancel()

    with llm._lock:
        box["handle"] = h = sched.submit(prompt(3, 8), q, stream=True, on_text=cancel_at_step_5)
        waiting = sched.submit(prompt(4, 8), q)
        assert waiting.cancel() and waiting.cancelled()
    res = h.result(timeout=60)
    s = res.samples[0][0]
    assert s.finish_reason == CANCELLED and s.generated_tokens == 5
    assert s.token_ids == alone(llm, prompt(3, 8), q.model_copy(update={"max_new_tokens": 5})).samples[0][0].token_ids
    events = list(h)
    assert [e.token_id for e in events] == [*s.token_ids, None]  # one per token, then the closing event
    assert events[-1].finish_reason == CANCELLED and "".join(e.text for e in events) == s.text
    w = waiting.result(timeout=60).samples[0][0]
    assert w.finish_reason == CANCELLED and w.token_ids == [] and w.text == ""
    assert not h.cancel()  # finished: nothing left to cancel
    # its row is free again: a new request runs and equals its alone run
    q2 = SamplingParams(max_new_tokens=6, temperature=0)
    assert_same(sched.submit(prompt(5, 4), q2).result(timeout=60), alone(llm, prompt(5, 4), q2))
    assert sched.pending() == 0


def test_queue_full_and_validation_errors(llm):
    llm = llm("llama")
    sched = llm.scheduler(max_rows=2, max_queue=3)
    q = SamplingParams(max_new_tokens=3, temperature=0)
    with llm._lock:  # the loop cannot admit anything: the queue fills
        handles = [sched.submit(prompt(k, 4), q) for k in range(3)]
        with pytest.raises(QueueFullError, match="max_queue=3"):
            sched.submit(prompt(9, 4), q)
        with pytest.raises(TimeoutError, match="timeout=0.01"):
            handles[0].result(timeout=0.01)
    for h, k in zip(handles, range(3)):
        assert_same(h.result(timeout=60), alone(llm, prompt(k, 4), q))
    with pytest.raises(ValueError, match="max_rows=2"):
        sched.submit(prompt(1, 4), q.model_copy(update={"n": 3}))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sched.submit([5, 999], q)
    with pytest.raises(ValueError, match="empty"):
        sched.submit([], q)
    with pytest.raises(ValueError, match="one prompt"):
        sched.submit([prompt(1, 4), prompt(2, 4)], q)
    with pytest.raises(RuntimeError, match="stream=True"):
        iter(sched.submit(prompt(1, 4), q))
    class Forks(Component):
        def on_lookahead(self, results):
            return None

    with pytest.raises(ValueError, match="look-ahead"):
        sched.submit(prompt(1, 4), q, components=[Forks()])
    shared = StopAt(1)
    with llm._lock:
        sched.submit(prompt(1, 4), q, components=[shared])
        with pytest.raises(ValueError, match="one request at a time"):
            sched.submit(prompt(2, 4), q, components=[shared])
    with pytest.raises(ValidationError, match="max_rows must be >= 1, got 0"):
        SchedulerConfig(max_rows=0)
    with pytest.raises(ValidationError, match="prefill_chunk must be >= 1, got -2"):
        SchedulerConfig(prefill_chunk=-2)
    with pytest.raises(ValueError, match="shut it down"):
        llm.scheduler(max_rows=5)
    assert llm.scheduler() is sched and llm.scheduler(max_rows=2, max_queue=3) is sched


def test_generate_runs_between_the_schedulers_steps(llm):
    model = llm("qwen2")
    sched = model.scheduler(max_rows=4)
    q = SamplingParams(max_new_tokens=60, temperature=0.8, seed=9, ignore_eos=True)
    handles = [sched.submit(prompt(k, 6 + k), q) for k in range(3)]
    direct = [model.generate([prompt(k, 6 + k)], q) for k in range(3)]  # shares the model lock with the loop
    for h, want in zip(handles, direct):
        assert_same(h.result(timeout=120), want)


def test_sliding_window_models_are_refused_up_front():
    from tiny import COMMON
    from transformers import AutoModelForCausalLM, MistralConfig

    model = AutoModelForCausalLM.from_config(MistralConfig(**COMMON, sliding_window=8), dtype=torch.float32).eval()
    with pytest.raises(NotImplementedError, match="DynamicSlidingWindowLayer"):
        KVModel(model, ByteTokenizer()).scheduler()


def test_a_failing_request_fails_alone(llm):
    llm = llm("qwen2")
    sched = llm.scheduler(max_rows=4)

    class Boom(Component):
        name = "boom"

        def on_step(self, view):
            if view.step == 2:
                raise RuntimeError("boom at step 2")

    q = SamplingParams(max_new_tokens=8, temperature=0)
    with llm._lock:
        bad = sched.submit(prompt(1, 5), q, components=[Boom()])
        good = sched.submit(prompt(2, 9), q)
    with pytest.raises(RuntimeError, match="boom at step 2"):
        bad.result(timeout=60)
    assert isinstance(bad.exception(), RuntimeError)
    assert_same(good.result(timeout=60), alone(llm, prompt(2, 9), q))


def test_shutdown_finishes_or_cancels_every_request(llm):
    model = llm("llama")
    sched = model.scheduler(max_rows=2)
    q = SamplingParams(max_new_tokens=5, temperature=0)
    handles = [sched.submit(prompt(k, 3 + k), q) for k in range(4)]
    assert sched.shutdown(timeout=120)  # finishes them all
    for k, h in enumerate(handles):
        assert_same(h.result(timeout=0), alone(model, prompt(k, 3 + k), q))
    with pytest.raises(SchedulerClosedError, match="shut down"):
        sched.submit(prompt(1, 3), q)
    via_model = model.submit("abc", max_new_tokens=4, temperature=0.7, seed=1)  # a new scheduler starts
    assert_same(via_model.result(timeout=60), model.generate("abc", max_new_tokens=4, temperature=0.7, seed=1))
    assert model.scheduler().shutdown(timeout=60)
    sched2 = model.scheduler(max_rows=2)  # a shut-down scheduler is replaced
    assert sched2 is not sched
    long_q = SamplingParams(max_new_tokens=300, temperature=0, ignore_eos=True)
    with model._lock:
        handles = [sched2.submit(prompt(k, 4), long_q, stream=True) for k in range(5)]
        assert not sched2.shutdown(cancel=True, timeout=0)  # the loop waits for the lock: not stopped yet
    assert sched2.shutdown(timeout=120)
    for h in handles:
        s = h.result(timeout=0).samples[0][0]
        assert s.finish_reason == CANCELLED and s.generated_tokens == 0
        assert list(h) == []


def test_200_random_submissions_from_8_threads_none_lost_or_duplicated(llm):
    model = llm("qwen3")
    sched = model.scheduler(max_rows=6, max_queue=16, prefill_chunk=8)
    kinds = [(prompt(k, 2 + 3 * k), SamplingParams(max_new_tokens=1 + k % 4, temperature=0.0 if k % 2 else 0.8,
                                                    seed=k, n=1 + k % 3)) for k in range(10)]
    want = [alone(model, p, q) for p, q in kinds]
    submit_from_threads(sched, kinds, want, assert_same)
    assert sched.shutdown(timeout=60)


def test_submit_does_not_wait_for_the_running_batch():
    """A caller submitting while a long request decodes gets its handle at once: it must not queue on the model
    lock that the decode loop takes around every step (counted in steps, not timed)."""
    from tiny import ByteTokenizer, tiny_model

    from kvagents import KVModel, SamplingParams

    llm = KVModel(tiny_model("qwen3"), ByteTokenizer())
    sched = llm.scheduler(max_rows=8)
    try:
        busy = sched.submit([5, 6, 7], SamplingParams(max_new_tokens=400, temperature=0, ignore_eos=True))
        while sched.steps < 3:
            pass
        for submit in (lambda: llm.submit([8, 9, 10], SamplingParams(max_new_tokens=2, temperature=0)),
                       lambda: sched.submit([8, 9, 10], SamplingParams(max_new_tokens=2, temperature=0)),
                       lambda: llm.encode_prompt([8, 9])):
            s0 = sched.steps
            out = submit()
            assert not busy.done() and sched.steps - s0 < 100, "the submitter waited for the running batch"
            if hasattr(out, "result"):
                assert out.result(timeout=60).samples[0][0].generated_tokens == 2
        busy.result(timeout=120)
    finally:
        sched.shutdown(cancel=True)


def test_handles_wake_callbacks_and_event_loops():
    import asyncio

    llm = KVModel(tiny_model("qwen3"), ByteTokenizer())
    sched = llm.scheduler(max_rows=4)
    try:
        params = SamplingParams(max_new_tokens=5, temperature=0)
        seen = []
        h = llm.submit([5, 6, 7], params)
        h.add_done_callback(lambda hh: seen.append(hh.result().samples[0][0].token_ids))
        alone = llm.generate([[5, 6, 7]], params).samples[0][0].token_ids
        assert h.result(timeout=60).samples[0][0].token_ids == alone

        async def wait():
            return (await llm.submit([5, 6, 7], params).as_asyncio()).samples[0][0].token_ids

        assert asyncio.run(asyncio.wait_for(wait(), 60)) == alone
        for _ in range(1000):  # the callback runs on the scheduler's thread just after the result is set
            if seen:
                break
            threading.Event().wait(0.01)
        assert seen == [alone]
        late = []
        h.add_done_callback(lambda hh: late.append(True))  # already done: called at once
        assert late == [True]
    finally:
        sched.shutdown(cancel=True)
