"""ChatKV's adaptive best-of-N (waves of samples until the vote is decided), and streams that share the model:
a suspended stream blocks no other caller, an abandoned one releases everything, interleaved streams give the text
of each alone. Threads are joined with timeouts, so a regression fails instead of hanging."""
# ruff: noqa: F811  (pytest fixtures imported from lc_tiny are parameters of the tests)

from __future__ import annotations

import gc
import threading

import pytest
from langchain_core.messages import HumanMessage
from langchain_kvagents import ChatKV
from lc_tiny import tiny_dir  # noqa: F401 - fixture

from kvagents.control.adaptive import AdaptiveConfig, adaptive_stop, wave_seed

WAIT_S = 30  # generous: each call here takes well under a second. Also the chats' lock timeout: a call that
# waits for a lock a regression left held raises TimeoutError instead of hanging the session


def _kw(tiny_dir, **extra):
    return dict(model=tiny_dir, dtype="float32", device="cpu", **extra)


# ----------------------------------------------------------------------------------------------------------------
# Adaptive best-of-N


def test_adaptive_stops_when_the_vote_is_decided_and_reports_its_waves(tiny_dir):
    base = _kw(tiny_dir, temperature=1.0, seed=0, max_tokens=8)
    chat = ChatKV(**base, n=6, adaptive=AdaptiveConfig(wave=2), vote_parser=lambda t: "same", select_by="mean_logprob")
    gens = chat.generate([[HumanMessage("Hello")]]).generations[0]
    # one answer only: 2 > 0 + 4 is false, 4 > 0 + 2 stops after the second wave
    assert len(gens) == 4
    mds = [g.message.response_metadata for g in gens]
    info = mds[0]["adaptive"]
    assert (info["samples"], info["waves"], info["stopped_by"], info["max_n"]) == (4, 2, "decided", 6)
    assert info["generated_tokens"] == sum(g.message.usage_metadata["output_tokens"] for g in gens)
    assert info["prompt_tokens"] == 2 * gens[0].message.usage_metadata["input_tokens"]  # each wave prefills again
    assert mds[0]["chosen"] and not any(md["chosen"] for md in mds[1:]) and mds[0]["votes"] == {"same": 4.0}
    scores = [md["scores"]["mean_logprob"] for md in mds]
    assert scores[0] == max(scores)  # select_by picks within the winning answer
    # the waves are the n=2 calls seeded wave_seed(seed, k), in sampling order
    by_index = sorted(gens, key=lambda g: g.message.response_metadata["sample_index"])
    waves = [
        ChatKV(**{**base, "seed": wave_seed(0, k)}, n=2).generate([[HumanMessage("Hello")]]).generations[0]
        for k in range(2)
    ]
    assert [g.message.content for g in by_index] == [g.message.content for w in waves for g in w]
    assert chat.invoke("Hello").content == gens[0].message.content


def test_adaptive_votes_over_the_reply_text_by_default(tiny_dir):
    chat = ChatKV(**_kw(tiny_dir, temperature=1.5, seed=1, max_tokens=3), adaptive=AdaptiveConfig(wave=2, max_n=6))
    gens = chat.generate([[HumanMessage("Hi")]]).generations[0]
    ordered = sorted(gens, key=lambda g: g.message.response_metadata["sample_index"])
    answers = [g.message.content.strip() or None for g in ordered]
    assert len(gens) == adaptive_stop(answers, wave=2, max_n=6)  # the stop an offline simulation computes
    counts = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    md = gens[0].message.response_metadata
    assert md["votes"] == {a: float(c) for a, c in counts.items()}
    if counts:
        assert counts[md["answer"]] == max(counts.values())


def test_adaptive_bad_settings_are_clear_errors(tiny_dir):
    with pytest.raises(ValueError, match="n=3 conflicts with AdaptiveConfig"):
        ChatKV(**_kw(tiny_dir), n=3, adaptive=AdaptiveConfig(wave=2, max_n=8))
    with pytest.raises(ValueError, match="max_n=1 is smaller than wave=2"):
        ChatKV(**_kw(tiny_dir), adaptive={"wave": 2})
    with pytest.raises(ValueError, match="'nope'"):
        ChatKV(**_kw(tiny_dir), n=4, adaptive={"wave": 2}, vote_parser="nope")


# ----------------------------------------------------------------------------------------------------------------
# Streams


def _text(chunks) -> str:
    return "".join(c.content for c in chunks if isinstance(c.content, str))


def _invoke_in_thread(chat, prompt):
    """Run chat.invoke(prompt) in a daemon thread; return (thread, result list)."""
    got: list = []
    t = threading.Thread(target=lambda: got.append(chat.invoke(prompt).content), daemon=True)
    t.start()
    return t, got


def _run_in_thread(fn, what: str) -> None:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout=WAIT_S)
    assert not t.is_alive(), f"{what} is blocked"


def _free(llm) -> bool:
    return llm._fast_engine is None or not any(s.in_use for s in llm._fast_engine._sets)


@pytest.mark.parametrize("fast", [False, True])
def test_another_threads_invoke_completes_while_a_stream_is_suspended(tiny_dir, fast):
    chat = ChatKV(**_kw(tiny_dir, temperature=0, max_tokens=16, fast=fast, timeout=WAIT_S))
    want_stream, want_other = chat.invoke("Tell me a story").content, chat.invoke("Hello").content
    assert len(want_stream) > 0 and want_stream != want_other
    it = chat.stream("Tell me a story")
    first = next(it)
    t, got = _invoke_in_thread(chat, "Hello")
    try:
        t.join(timeout=WAIT_S)
        assert not t.is_alive(), "another thread's invoke is blocked by a suspended ChatKV stream"
    finally:
        rest = list(it)  # unblocks the thread if the lock was held
        t.join(timeout=WAIT_S)
    assert got == [want_other]
    assert _text([first, *rest]) == want_stream


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("how", ["close", "gc", "gc_in_another_thread"])
def test_an_abandoned_stream_releases_everything(tiny_dir, fast, how):
    chat = ChatKV(**_kw(tiny_dir, temperature=0, max_tokens=16, fast=fast, timeout=WAIT_S))
    want = chat.invoke("Hello").content
    box: list = []
    if how == "gc_in_another_thread":  # suspended in one thread (kept alive meanwhile), dropped in another
        opened, release = threading.Event(), threading.Event()

        def open_stream():
            it = chat.stream("Tell me a story")
            next(it)
            box.append(it)
            del it
            opened.set()
            release.wait(3 * WAIT_S)

        threading.Thread(target=open_stream, daemon=True).start()
        try:
            assert opened.wait(WAIT_S), "the stream did not start"
            _run_in_thread(lambda: (box.clear(), gc.collect()), "dropping the suspended stream")
        finally:
            release.set()
    else:
        it = chat.stream("Tell me a story")
        next(it)
        if how == "close":
            _run_in_thread(it.close, "closing the stream")
        else:  # the last reference goes in a helper thread, so a finalizer that blocks fails the test
            box.append(it)
            del it
            _run_in_thread(lambda: (box.clear(), gc.collect()), "dropping the suspended stream")
    assert _free(chat.llm)
    t, got = _invoke_in_thread(chat, "Hello")
    t.join(timeout=WAIT_S)
    assert not t.is_alive(), f"the model stays locked after a stream was abandoned ({how})"
    assert got == [want]

    def take_lock():
        ok = chat.llm._lock.acquire(timeout=5)
        if ok:
            chat.llm._lock.release()
        box.append(ok)

    holder = threading.Thread(target=take_lock, daemon=True)
    holder.start()
    holder.join(timeout=WAIT_S)
    assert box == [True]  # another thread can take the model lock


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_interleaved_streams_give_the_text_of_each_alone(tiny_dir, fast, temperature):
    chat = ChatKV(**_kw(tiny_dir, temperature=temperature, seed=3, max_tokens=16, fast=fast, timeout=WAIT_S))
    prompts = ["Tell me a story", "Why is the sky blue?"]
    want = [_text(list(chat.stream(p))) for p in prompts]
    assert want == [chat.invoke(p).content for p in prompts] and want[0] != want[1]
    live = {i: chat.stream(p) for i, p in enumerate(prompts)}
    got: dict[int, list] = {0: [], 1: []}
    while live:  # round robin: one chunk of each in turn
        for i in list(live):
            chunk = next(live[i], None)
            if chunk is None:
                del live[i]
            else:
                got[i].append(chunk)
    assert [_text(got[0]), _text(got[1])] == want
    assert _free(chat.llm)
