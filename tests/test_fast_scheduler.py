"""Continuous batching on the fast path (engine/fast_scheduler.py): every request gives exactly what it gives alone
on the fast path (``FastDecodeEngine.generate([prompt], params)``), whenever it joins the slots.

The engines use small buckets, a short check window and a short ``max_seq_len``, so one run crosses several
attention buckets and compacts its buffers. Requests are admitted mid-run deterministically: a running request's
``on_text`` callback (called on the loop's thread at a host check) submits them; tests that need the loop to stand
still hold the model lock.
"""

from __future__ import annotations

import threading

import pytest
import torch
from concurrent_submissions import submit_from_threads
from test_scheduler import ForceText, StopAt, embedding_and_coe
from test_scheduler import assert_same as assert_same_with_outputs
from tiny import ByteTokenizer, tiny_model

from kvagents import Component, KVModel, SamplingParams
from kvagents.control.thinking import PLAIN_FORMAT, ControllerConfig, HardBudget, ReasoningController
from kvagents.engine.decode import DecodeEngine
from kvagents.engine.fast_decode import FastDecodeEngine
from kvagents.engine.fast_scheduler import FastScheduler
from kvagents.engine.scheduler import CANCELLED, QueueFullError, Scheduler, SchedulerConfig
from kvagents.signals.kv_classifier import KVClassifierConfig

LONG = SamplingParams(max_new_tokens=36, temperature=0, ignore_eos=True)


def prompt(k: int, length: int) -> list[int]:
    return [3 + (7 * k + 3 * i) % 250 for i in range(length)]


class Rig:
    """A fast engine, its lock, and a FastScheduler over them; ``alone`` runs one request on the engine."""

    def __init__(self, arch: str = "qwen3", **config) -> None:
        self.engine = FastDecodeEngine(tiny_model(arch), ByteTokenizer(), bucket=4, sync_every=3)
        self.lock = threading.RLock()
        config.setdefault("max_seq_len", 48)
        self.sched = FastScheduler(self.engine, lock=self.lock, config=SchedulerConfig(**config))

    def alone(self, p, q, components=(), logits_processors=()):
        if isinstance(p, str):  # as the scheduler encodes text: the engine's tokenizer
            p = ByteTokenizer()(p)["input_ids"]
        with self.lock:
            return self.engine.generate([p], q, components, logits_processors=logits_processors)


@pytest.fixture
def rig():
    rigs = []

    def make(*args, **kw) -> Rig:
        rigs.append(Rig(*args, **kw))
        return rigs[-1]

    yield make
    for r in rigs:
        assert r.sched.shutdown(cancel=True, timeout=60)


def assert_same(got, want) -> None:
    """``got`` (scheduler) equals ``want`` (alone): tokens, text, finish reasons and counts exactly."""
    assert len(got.samples) == len(want.samples) == 1
    assert len(got.samples[0]) == len(want.samples[0])
    for a, b in zip(got.samples[0], want.samples[0]):
        assert a.token_ids == b.token_ids
        assert (a.text, a.finish_reason, a.generated_tokens, a.prompt_tokens) == (
            b.text, b.finish_reason, b.generated_tokens, b.prompt_tokens)


def stop_inside(r: Rig, p, q, at: int = 5) -> list[str]:
    """A stop string that the free run of ``(p, q)`` completes at token ``at`` (so the stop really fires)."""
    text = r.alone(p, q.model_copy(update={"stop": []})).samples[0][0].text
    assert len(text) > at + 1, text
    return [text[at - 1 : at + 1]]


def cases(r: Rig) -> list[tuple[list[int], SamplingParams]]:
    base = [
        (prompt(1, 3), SamplingParams(max_new_tokens=12, temperature=0)),
        (prompt(2, 30), SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=11, n=2)),
        (prompt(3, 9), SamplingParams(max_new_tokens=14, temperature=1.2, top_k=20, seed=5, n=3, ignore_eos=True)),
        (prompt(6, 2), SamplingParams(max_new_tokens=9, temperature=0.7, seed=2, stop=["a", "b", "c"])),
        (prompt(7, 20), SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[57, 94, 213])),
        (prompt(8, 5), SamplingParams(max_new_tokens=0)),
        ("Hi there, tiny model", SamplingParams(max_new_tokens=7, temperature=0.5, seed=8, top_k=5, top_p=0.8)),
        (prompt(9, 14), SamplingParams(max_new_tokens=34, temperature=0.6, seed=9, ignore_eos=True)),  # compacted
    ]
    greedy = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=30, temperature=0.8, seed=3, ignore_eos=True, n=2)
    base.append((prompt(4, 5), greedy.model_copy(update={"stop": stop_inside(r, prompt(4, 5), greedy, 7)})))
    base.append((prompt(5, 11), sampled.model_copy(update={"stop": stop_inside(r, prompt(5, 11), sampled, 4)})))
    return base


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_requests_admitted_mid_run_equal_alone(rig, arch):
    r = rig(arch, max_rows=16, prefill_chunk=16)
    jobs = cases(r)
    handles, events = [], [0]

    def submit_mid_run(ev):  # on the loop's thread: the jobs join while the host request decodes
        events[0] += 1
        if events[0] == 4:
            handles.extend(r.sched.submit(p, q) for p, q in jobs[:5])
        elif events[0] == 30:
            handles.extend(r.sched.submit(p, q) for p, q in jobs[5:])

    host = r.sched.submit(prompt(0, 12), LONG, on_text=submit_mid_run)
    assert_same(host.result(timeout=120), r.alone(prompt(0, 12), LONG))
    assert len(handles) == len(jobs)
    for h, (p, q) in zip(handles, jobs):
        assert_same(h.result(timeout=120), r.alone(p, q))
    assert r.sched.peak_rows >= 1 + 1 + 2 + 3 + 1  # the host and the first jobs decoded together
    assert r.sched.compactions >= 1  # 30 + 30 steps over 96 columns from column 47: the buffers were compacted
    assert sorted(r.sched._free) == list(range(16)) and r.sched.pending() == 0
    stopped = [h.result().samples[0] for h in handles[-2:]]
    assert all(s.finish_reason == "stop" for ss in stopped for s in ss[:1])  # the stop strings did fire


class Alternate:
    """A stateful logits processor (a tiny grammar): after an even token only odd ones, after an odd token only
    even ones; its state is each row's last token, advanced from the previous tokens it is given."""

    def __init__(self) -> None:
        self.last, self.calls = None, 0

    def __call__(self, logits, prev, valid):
        self.calls += 1
        if prev is not None:
            self.last = prev if self.last is None else torch.where(valid, prev, self.last)
        if self.last is None:
            return logits
        ids = torch.arange(logits.shape[-1], device=logits.device)
        allowed = (ids[None] % 2) != (self.last[:, None] % 2)
        return logits.masked_fill(~allowed, float("-inf"))


def controller_with_kv():
    """A reasoning controller that reads the KV ring every step and captures window features every 7 tokens."""
    cfg = KVClassifierConfig(layers=2, window=6, positions="sum", heads="flatten", layer_agg="mean")
    return [ReasoningController(PLAIN_FORMAT, ByteTokenizer(), ControllerConfig(start="slow", capture=True, every=7),
                                kv_config=cfg)]


def hosted_cases():
    """(prompt, params, components factory, logits processors factory): components that read logits and KV rows,
    force tokens, stop samples; a reasoning controller; stateful processors with sampling, forcing and stops."""
    none = lambda: []  # noqa: E731
    return [
        (prompt(3, 9), SamplingParams(max_new_tokens=14, temperature=1.2, top_k=20, seed=5, n=3, ignore_eos=True),
         lambda: [StopAt(4, index=1), *embedding_and_coe()], none),
        (prompt(4, 5), SamplingParams(max_new_tokens=30, temperature=0, stop=["END"]),
         lambda: [ForceText("hello END world", at=2)], none),
        (prompt(5, 14), SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True),
         lambda: [HardBudget(PLAIN_FORMAT, ByteTokenizer(), 7, max_answer_tokens=5)], none),
        (prompt(7, 20), SamplingParams(max_new_tokens=8, temperature=0, n=2), embedding_and_coe, none),
        (prompt(2, 12), SamplingParams(max_new_tokens=12, temperature=0.8, seed=4, n=2, ignore_eos=True), none,
         lambda: [Alternate()]),
        (prompt(6, 7), SamplingParams(max_new_tokens=20, temperature=0, stop=["ok"]),
         lambda: [ForceText("x ok", at=3)], lambda: [Alternate()]),
        (prompt(9, 10), SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True), controller_with_kv, none),
        (prompt(8, 5), SamplingParams(max_new_tokens=0), embedding_and_coe, none),
    ]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_requests_with_components_and_processors_admitted_mid_run_equal_alone(rig, arch):
    """Components see only their own rows and act on them; processors process only their rows; forced tokens,
    component stops, stop strings, component outputs and the plain requests around them equal each alone run."""
    r = rig(arch, max_rows=16, prefill_chunk=16, max_seq_len=56)
    jobs = hosted_cases()
    plain = [(prompt(1, 3), SamplingParams(max_new_tokens=20, temperature=0)),
             (prompt(10, 6), SamplingParams(max_new_tokens=25, temperature=0.9, seed=3, stop=["a"]))]
    handles, plain_handles, events = [], [], [0]

    def submit_mid_run(ev):  # on the loop's thread: the jobs join while the host request decodes
        events[0] += 1
        if events[0] == 3:
            handles.extend(r.sched.submit(p, q, components=f(), logits_processors=g()) for p, q, f, g in jobs[:4])
            plain_handles.append(r.sched.submit(*plain[0]))
        elif events[0] == 20:
            handles.extend(r.sched.submit(p, q, components=f(), logits_processors=g()) for p, q, f, g in jobs[4:])
            plain_handles.append(r.sched.submit(*plain[1]))

    host = r.sched.submit(prompt(0, 12), LONG, on_text=submit_mid_run)
    assert_same(host.result(timeout=120), r.alone(prompt(0, 12), LONG))
    assert len(handles) == len(jobs)
    for h, (p, q, f, g) in zip(handles, jobs):
        assert_same_with_outputs(h.result(timeout=120), r.alone(p, q, f(), g()))
    for h, (p, q) in zip(plain_handles, plain):
        assert_same(h.result(timeout=120), r.alone(p, q))
    got = [h.result().samples[0] for h in handles]
    assert got[0][1].finish_reason == "enough" and got[0][1].generated_tokens == 5  # stopped by its component
    assert got[1][0].finish_reason == "stop" and got[1][0].forced_tokens > 0  # forced text holding the stop
    assert got[2][0].outputs["reasoning"]["thinking_tokens"] == 7  # the budget forced the end of thinking
    assert len(got[6][0].outputs["reasoning"]["features"]["windows"]) >= 3  # KV windows read from its slots
    assert all(t % 2 != u % 2 for s in got[4] for t, u in zip(s.token_ids, s.token_ids[1:]))
    assert r.sched.compactions >= 1, r.sched.steps  # KV rows were read from compacted buffers too
    assert sorted(r.sched._free) == list(range(16)) and r.sched.pending() == 0


def test_a_failing_component_or_processor_fails_only_its_request(rig):
    r = rig(max_rows=4)
    q = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)

    class Boom(Component):
        name = "boom"

        def on_step(self, view):
            if view.step == 3:
                raise RuntimeError("boom at step 3")

    def bad_processor(logits, prev, valid):
        return logits[:, :5]

    with r.lock:
        ok = r.sched.submit(prompt(1, 5), q)
        boom = r.sched.submit(prompt(2, 5), q, components=[Boom()])
        bad = r.sched.submit(prompt(3, 5), q, logits_processors=[bad_processor])
    assert_same(ok.result(timeout=60), r.alone(prompt(1, 5), q))
    with pytest.raises(RuntimeError, match="boom at step 3"):
        boom.result(timeout=60)
    with pytest.raises(ValueError, match="must return logits of shape"):
        bad.result(timeout=60)
    assert sorted(r.sched._free) == list(range(4))


def test_a_different_seed_gives_different_samples(rig):
    """The comparisons above can fail: the same request with another seed (alone) differs from the scheduler's."""
    r = rig()
    q = SamplingParams(max_new_tokens=20, temperature=1.0, seed=1, ignore_eos=True)
    got = r.sched.submit(prompt(2, 8), q).result(timeout=60)
    assert_same(got, r.alone(prompt(2, 8), q))
    other = r.alone(prompt(2, 8), q.model_copy(update={"seed": 2}))
    assert got.samples[0][0].token_ids != other.samples[0][0].token_ids


def test_slots_are_freed_and_reused(rig):
    r = rig("qwen2", max_rows=3, prefill_chunk=64, max_seq_len=64)
    jobs = [(prompt(k, 2 + 5 * k), SamplingParams(max_new_tokens=4 + 3 * (k % 4), temperature=0.8 if k % 3 else 0,
                                                  seed=k, n=1 + k % 2, ignore_eos=True)) for k in range(8)]
    with r.lock:  # all queued before the loop runs once: 3 slots for 12 sequences
        handles = [r.sched.submit(p, q) for p, q in jobs]
    for h, (p, q) in zip(handles, jobs):
        assert_same(h.result(timeout=120), r.alone(p, q))
    assert r.sched.peak_rows == 3
    assert sorted(r.sched._free) == [0, 1, 2] and r.sched.pending() == 0


def test_stream_gives_one_event_per_token_and_the_samples_text(rig):
    r = rig(max_rows=4)
    q = SamplingParams(max_new_tokens=30, temperature=0.9, seed=4, n=2)
    q = q.model_copy(update={"stop": stop_inside(r, prompt(1, 7), q, 6)})
    seen = []
    h = r.sched.submit(prompt(1, 7), q, stream=True, on_text=seen.append)
    events = list(h)
    assert events == seen
    res = h.result(timeout=60)
    assert_same(res, r.alone(prompt(1, 7), q))
    for s in res.samples[0]:
        mine = [e for e in events if e.sample_index == s.sample_index]
        assert [e.token_id for e in mine] == s.token_ids
        assert "".join(e.text for e in mine) == s.text
        assert [e.finish_reason for e in mine if e.finish_reason] == [s.finish_reason]
        assert all(q.stop[0] not in "".join(e.text for e in mine[:k]) for k in range(len(mine) + 1))
    assert res.samples[0][0].finish_reason == "stop"


def test_cancel_frees_the_slot_at_the_next_step(rig):
    r = rig(max_rows=2)
    q = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    box = {"count": 0}

    def cancel_at_token_5(ev):
        box["count"] += 1
        if box["count"] == 5:
            box["handle"].cancel()

    with r.lock:
        box["handle"] = h = r.sched.submit(prompt(3, 8), q, stream=True, on_text=cancel_at_token_5)
        waiting = r.sched.submit(prompt(4, 8), q)
        assert waiting.cancel() and waiting.cancelled()
    res = h.result(timeout=60)
    s = res.samples[0][0]
    assert s.finish_reason == CANCELLED and 5 <= s.generated_tokens < 40
    assert s.token_ids == r.alone(prompt(3, 8), q).samples[0][0].token_ids[: s.generated_tokens]
    events = list(h)
    assert [e.token_id for e in events] == [*s.token_ids, None]  # one per token, then the closing event
    assert events[-1].finish_reason == CANCELLED and "".join(e.text for e in events) == s.text
    w = waiting.result(timeout=60).samples[0][0]
    assert w.finish_reason == CANCELLED and w.token_ids == [] and w.text == ""
    assert not h.cancel()
    assert sorted(r.sched._free) == [0, 1]
    q2 = SamplingParams(max_new_tokens=6, temperature=0.6, seed=3)
    assert_same(r.sched.submit(prompt(5, 4), q2).result(timeout=60), r.alone(prompt(5, 4), q2))


def test_queue_full_and_refused_requests(rig):
    r = rig("llama", max_rows=2, max_queue=3)
    q = SamplingParams(max_new_tokens=3, temperature=0)
    with r.lock:
        handles = [r.sched.submit(prompt(k, 4), q) for k in range(3)]
        with pytest.raises(QueueFullError, match="max_queue=3"):
            r.sched.submit(prompt(9, 4), q)
    for h, k in zip(handles, range(3)):
        assert_same(h.result(timeout=60), r.alone(prompt(k, 4), q))

    class Fork(Component):
        name = "fork"

        def on_lookahead(self, view, results):
            return None

    with pytest.raises(ValueError, match="look-ahead forks"):
        r.sched.submit(prompt(1, 4), q, components=[Fork()])
    with pytest.raises(TypeError, match="logits processors must be callables"):
        r.sched.submit(prompt(1, 4), q, logits_processors=[42])
    with pytest.raises(ValueError, match="max_seq_len=48"):
        r.sched.submit(prompt(1, 40), q.model_copy(update={"max_new_tokens": 9}))
    with pytest.raises(ValueError, match="max_rows=2"):
        r.sched.submit(prompt(1, 4), q.model_copy(update={"n": 3}))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        r.sched.submit([5, 999], q)
    with pytest.raises(TypeError, match="FastDecodeEngine"):
        FastScheduler(DecodeEngine(tiny_model("llama"), ByteTokenizer()))
    with pytest.raises(ValueError, match="FastScheduler"):
        Scheduler(DecodeEngine(tiny_model("llama"), ByteTokenizer()), config=SchedulerConfig(fast=True))
    with pytest.raises(ValueError, match=r"max_seq_len must be >= 2 \(a prompt token and a new one\), got 1"):
        SchedulerConfig(max_seq_len=1)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        FastScheduler(r.engine, config=SchedulerConfig(max_seq_len=4096))


def test_200_random_submissions_from_8_threads_none_lost_or_duplicated(rig):
    r = rig(max_rows=6, max_queue=16, prefill_chunk=8)
    kinds = [(prompt(k, 2 + 3 * k), SamplingParams(max_new_tokens=1 + k % 4 + 2 * (k % 3), temperature=0.0 if k % 2
                                                    else 0.8, seed=k, n=1 + k % 3, top_k=4 * (k % 2)))
             for k in range(10)]
    want = [r.alone(p, q) for p, q in kinds]
    submit_from_threads(r.sched, kinds, want, assert_same)
    assert sorted(r.sched._free) == list(range(6))


def test_kvmodel_submit_runs_on_the_fast_scheduler():
    llm = KVModel(tiny_model("qwen3"), ByteTokenizer())
    sched = llm.scheduler(fast=True, max_rows=4, max_seq_len=64)
    try:
        assert isinstance(sched, FastScheduler) and llm.scheduler() is sched
        q = SamplingParams(max_new_tokens=12, temperature=0.7, seed=5, n=2)
        handles = [llm.submit(prompt(k, 5 + k), q) for k in range(3)] + [llm.submit("abc", max_new_tokens=5,
                                                                                     temperature=0)]
        for h, k in zip(handles, range(3)):
            assert_same(h.result(timeout=60), llm.generate([prompt(k, 5 + k)], q, fast=True))
        assert_same(handles[-1].result(timeout=60), llm.generate("abc", max_new_tokens=5, temperature=0, fast=True))
        with pytest.raises(ValueError, match="shut it down"):
            llm.scheduler(max_rows=4)
    finally:
        assert sched.shutdown(cancel=True, timeout=60)
    assert all(s is not sched._st for s in llm.fast_engine._sets)  # its buffers went with the loop
    assert not isinstance(llm.scheduler(), FastScheduler)  # a new one: eager by default
    llm.scheduler().shutdown(timeout=60)



def test_prompts_waiting_together_are_prefilled_in_one_padded_forward(rig):
    """Whole prompts that fit in ``prefill_chunk`` together are prefilled in one left-padded forward; each result
    still equals the request alone (its KV is cut out of the padded batch)."""
    r = rig("qwen2", max_rows=8, prefill_chunk=64, max_seq_len=64)
    groups = []
    real = r.sched._prefill_batch
    r.sched._prefill_batch = lambda g: (groups.append([len(x.ids) for x in g]), real(g))[1]
    jobs = [(prompt(k, 3 + 4 * k), SamplingParams(max_new_tokens=6 + k, temperature=0.7 if k % 2 else 0,
                                                  seed=k, ignore_eos=True)) for k in range(6)]
    with r.lock:
        handles = [r.sched.submit(p, q) for p, q in jobs]
    for h, (p, q) in zip(handles, jobs):
        assert_same(h.result(timeout=120), r.alone(p, q))
    assert groups and max(len(g) for g in groups) >= 3  # several prompts in one forward
    assert all(sum(g) <= 64 for g in groups)
