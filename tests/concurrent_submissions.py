"""Submissions from several threads at random times, for the scheduler tests (eager and fast)."""

from __future__ import annotations

import random
import threading

from kvagents.engine.scheduler import CANCELLED, QueueFullError


def submit_from_threads(sched, kinds, want, assert_same, *, threads: int = 8, per_thread: int = 25) -> int:
    """``threads`` threads each submit ``per_thread`` requests drawn from ``kinds`` (``(prompt, params)`` pairs) to
    ``sched`` at random times, streaming some, cancelling about 10 %, retrying on a full queue. Checks that every
    submission got one handle of its own, that every uncancelled result equals ``want[k]`` (the request alone) and
    that a cancelled one is a prefix of it. Returns the number of cancelled requests."""
    done: list[tuple[int, int, int, object]] = []  # (thread, i, kind, handle)
    lock = threading.Lock()

    def worker(w: int) -> None:
        rng = random.Random(w)
        for i in range(per_thread):
            k = rng.randrange(len(kinds))
            threading.Event().wait(rng.random() * 0.004)
            while True:
                try:
                    h = sched.submit(*kinds[k], stream=rng.random() < 0.3)
                    break
                except QueueFullError:
                    threading.Event().wait(0.002)
            if rng.random() < 0.1:
                h.cancel()
            with lock:
                done.append((w, i, k, h))

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    total = threads * per_thread
    assert len(done) == total and len({(w, i) for w, i, _, _ in done}) == total
    assert len({h.id for *_, h in done}) == total
    cancelled = 0
    for _, _, k, h in done:
        res = h.result(timeout=120)
        if any(s.finish_reason == CANCELLED for s in res.samples[0]):
            cancelled += 1
            for a, b in zip(res.samples[0], want[k].samples[0]):  # cut short: a prefix of the alone run
                assert a.token_ids == b.token_ids[: len(a.token_ids)]
                assert a.finish_reason in (CANCELLED, b.finish_reason)
        else:
            assert_same(res, want[k])
    assert sched.pending() == 0
    return cancelled
