"""Continuous batching on the fast path: requests take and give back *slots* (rows of one set of static buffers)
between decode steps, and every step is one CUDA-graph replay over all slots.

A :class:`FastScheduler` has :class:`~kvagents.engine.scheduler.Scheduler`'s interface (``submit`` ->
:class:`~kvagents.engine.scheduler.RequestHandle`, ``result`` / stream / ``cancel``, ``QueueFullError``,
:class:`~kvagents.engine.scheduler.SchedulerConfig`) over a :class:`~kvagents.engine.fast_decode.FastDecodeEngine`.
Each iteration of its loop (under the model lock):

1. cancelled requests: a host check collects their tokens so far, their slots are freed;
2. admission: waiting requests, first come first served, while ``max_rows`` has room for their ``n`` samples;
   their prompts are prefilled eagerly (a ``DynamicCache``, ``prefill_chunk`` prompt tokens per iteration, as the
   eager scheduler); a finished prefill is copied, ``n`` times, into free slots and the slots' per-row state (start
   column, prompt length, own step, sampling parameters, stop and EOS ids, token limit) is set with device ops;
3. one decode step for every slot: sample each row's token from its logits with its own parameters, finish checks,
   then feed the tokens (the model forward writes one column); a row that is not running reads nothing (the
   ``"triton"`` attention skips it) and its token is never used. The step is a function of fixed buffers, captured
   once per (attention bucket, sampling mode) on CUDA: rows come and go without a new capture;
4. every ``sync_every`` steps, **one** host transfer (the window's tokens, finish reasons, counts, NaN steps):
   stop strings and stream events run on the host, finished samples free their slots (a slot is dead on the device
   the step its sequence finishes; the host reuses it after that check), finished requests resolve their handle.

Columns. All slots share one write column ``c`` (the ``col`` the step writes, +1 a step). A request admitted when
the write column is ``c`` gets its prompt in columns ``c - L .. c - 1`` of its slots (``start = c - L``) and its
tokens in ``c, c + 1, ...``: rows that joined at different times simply have different start columns, and
attention reads ``start[b] .. c`` per row. Positions are per row (prompt length + the row's own step), so a row's
columns never shift its RoPE. The first write column is ``R = max_seq_len - 1`` (a *reserved prompt region*: any
admissible prompt fits left of it), and the buffers hold ``capacity = 2 * max_seq_len`` columns (rounded up to the
engine's ``bucket``). When ``c`` reaches the capacity the buffers are *compacted*: every row's columns slide left
by ``c - R`` (one copy a layer; a running row never holds more than ``max_seq_len - 1`` columns, so none of its
columns is lost) and ``c`` becomes ``R`` again: a compaction at most every ``max_seq_len + 1`` steps. Graphs stay
valid (the buffers are written in place).

Equality with the request run alone (``FastDecodeEngine.generate([prompt], params)``). The step computes what the
alone run computes, reordered (sample then feed, where the alone loop feeds then samples), and the counter-based
noise is hashed from the request's own seed, its own step and the sample index (not the slot, not a global step),
with the same :func:`~kvagents.engine.fast_sampling.hash_exponential` as the alone run. Temperature, top-k and
top-p are per-row tensors here (Python values baked into the alone run's graph): on the CPU (eager steps) greedy
tokens and seeded samples equal the alone run's; on CUDA the logits of a batch of slots round like any batched
product (cuBLAS / fused kernels per batch size), and the alone run's compiled head may round the temperature
division differently, so rare near-ties can break apart there. A stop string completing inside a check window
ends its sample at that token on the host (the alone run rolls the window back and replays it; with no components
the result is the same: tokens up to the stop, reason ``"stop"``).

Requests with components or logits processors. While one runs, a step is two graphs, the head (sampling, finish
checks) and the forward, with host work around the head, as the alone run does with processors: before it, each
such request's logits processors get its ``n`` rows of raw logits and previous tokens (their output goes into those
rows of ``st.scores``, which the head then samples from) and its queued forced tokens go into the force buffers;
after it, its components' ``on_step`` get a :class:`~kvagents.engine.components.StepView` of its own ``n`` rows
(a finished sample shows as not alive, with zero logits and KV rows, as in the eager scheduler; ``kv_rows`` reads
the fed tokens' column of its slots), and their ``StopSequence`` / ``ForceTokens`` act on its rows only.
``on_prefill`` sees its prompt's own cache (such a request is prefilled alone, not in a padded group), and
``on_finish`` its tokens. Graph-safe components run through their plain ``on_step`` here (host work per step,
the same results). While such a request has stop strings the host checks every step (as its alone run), so that
a stop ends the sample before its components see another step. Requests without them decode unchanged beside
it; when none runs, the step is the one graph above again. Look-ahead forks are refused (as by the eager
scheduler); a request longer than ``max_seq_len`` is refused with ``ValueError``.

Example:
    >>> from kvagents.engine.scheduler import SchedulerConfig
    >>> SchedulerConfig(fast=True, max_rows=8, max_seq_len=1024).max_seq_len
    1024
    >>> # sched = FastScheduler(fast_engine, lock=llm._lock, config=SchedulerConfig(max_rows=8))
    >>> # or: sched = llm.scheduler(fast=True, max_rows=8)
    >>> # sched.submit([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0)).result(timeout=30)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from .components import FinishView, PrefillView, apply_step_actions, queue_prefill_forces
from .decode import COMPONENT, EOS, LENGTH, RUNNING, STOP, DecodeEngine, NonFiniteLogitsError, _TextTracker, layer_info
from .fast_decode import FastDecodeEngine
from .fast_sampling import _M32, hash_exponential, top_p_keep_rows
from .results import GenerationResult, SampleResult
from .sampling import non_finite_rows, scale_logits
from .scheduler import CANCELLED, Scheduler, SchedulerConfig, TokenEvent, _Request
from .static_cache import StaticBatch, StaticLM
from .static_view import StaticStepView

__all__ = ["FastScheduler"]

#: Finish code of a slot no request holds (any code but RUNNING makes a row dead on the device).
_FREE = 99
#: Context length when the model's config names none.
_DEFAULT_SEQ = 2048


class _SlotBatch(StaticBatch):
    """:class:`StaticBatch` plus the per-row state of slots that joined at different times: each row's own step,
    token limit, seed, sample index, sampling parameters, stop / EOS ids, and the window of tokens since the last
    host check (``win[:, g]`` is written at window step ``g``)."""

    def __init__(self, lm: StaticLM, B: int, cap: int, window: int, stop_width: int, eos_width: int) -> None:
        super().__init__(lm, B, cap)
        dev = lm.device
        z = lambda *s, dt=torch.long: torch.zeros(s, dtype=dt, device=dev)  # noqa: E731
        self.step_r, self.max_new_r, self.seed_r, self.sample_r, self.top_k_r = (z(B) for _ in range(5))
        self.greedy_r = torch.ones(B, dtype=torch.bool, device=dev)
        self.temp_r = torch.ones(B, dtype=torch.float32, device=dev)
        self.top_p_r = torch.ones(B, dtype=torch.float32, device=dev)
        self.stop_tab = torch.full((B, stop_width), -1, dtype=torch.long, device=dev)
        self.eos_tab = torch.full((B, eos_width), -1, dtype=torch.long, device=dev)
        self.win = z(B, window)
        self.g = z()
        self.reason.fill_(_FREE)

    def engine_state(self) -> list[torch.Tensor]:
        return super().engine_state() + [self.step_r, self.win, self.g]


def slot_head(st: _SlotBatch, mode: tuple[bool, int, bool], pad_token_id: int, processed: bool = False,
              force: bool = False, views: bool = False) -> None:
    """Choose every row's token from ``st.logits`` (its own step ``st.step_r``), count it, finish checks (device
    only). ``mode`` = (any row samples, the largest top-k of a row, any row has top-p < 1): plain values, part of
    the graph's key. Greedy rows take the argmax, as the alone run; sampled rows follow
    :func:`~kvagents.engine.fast_sampling.process_logits_search` with their own parameters.

    For requests with components or logits processors (plain values too): ``processed`` samples from
    ``st.scores`` (the processors' output; the NaN check still reads the raw logits), ``force`` puts
    ``st.force_tok`` into the rows of ``st.force_mask`` (counted in ``st.n_forced``), ``views`` keeps the step's
    ``alive`` / ``forced`` / ``finished`` rows for the components' views."""
    sample, kmax, top_p = mode
    logits = st.logits
    src = st.scores if processed else logits
    tok = src.argmax(dim=-1)
    bad = torch.isnan(src.sum(dim=-1))
    if sample:
        scores = scale_logits(src, st.temp_r[:, None])
        if kmax:
            kth = torch.topk(scores, kmax, dim=-1).values.gather(1, (st.top_k_r.clamp(1, kmax) - 1)[:, None])
            scores = scores.masked_fill((st.top_k_r > 0)[:, None] & (scores < kth), float("-inf"))
        if top_p:
            keep = top_p_keep_rows(scores.softmax(dim=-1), st.top_p_r)
            scores = scores.masked_fill((st.top_p_r < 1.0)[:, None] & ~keep, float("-inf"))
        probs = scores.softmax(dim=-1)
        drawn = (probs / hash_exponential(st.seed_r, st.step_r, st.sample_r, st.vocab)).argmax(dim=-1)
        tok = torch.where(st.greedy_r, tok, drawn)
        bad = torch.where(st.greedy_r, bad, non_finite_rows(probs, src))
    alive = st.reason == RUNNING
    if force:
        tok = torch.where(st.force_mask, st.force_tok, tok)
        forced = st.force_mask & alive
        st.n_forced += forced.long()
    nan_now = (torch.isnan(logits.sum(dim=-1)) | bad) & alive & (st.nan_step < 0)
    st.nan_step.copy_(torch.where(nan_now, st.step_r, st.nan_step))
    tok = torch.where(alive, tok, pad_token_id)
    st.win.index_copy_(1, st.g.view(1), tok[:, None])
    st.n_gen += alive.long()
    hit = (st.stop_tab == tok[:, None]).any(dim=-1) & alive
    eos = (st.eos_tab == tok[:, None]).any(dim=-1)
    reason = torch.where(hit, torch.where(eos, EOS, STOP), st.reason)
    reason = torch.where((st.step_r == st.max_new_r - 1) & (reason == RUNNING), LENGTH, reason)
    st.reason.copy_(reason)
    st.tok.copy_(tok)
    if views:
        st.alive.copy_(alive)
        st.forced.copy_(forced if force else torch.zeros_like(alive))
        st.finished.copy_(reason != RUNNING)


def slot_forward(lm: StaticLM, st: _SlotBatch, Lb: int) -> None:
    """Feed every running row its token at its own position into the shared write column ``st.col`` (rows attend
    to ``start[b] .. col``); logits into ``st.logits``; each row's step, the window step and the column advance."""
    live = st.reason == RUNNING
    st.fed_valid.copy_(live)
    st.fed_pos.copy_(torch.where(live, st.lengths + st.step_r, 0))  # a dead row's position stays in the table
    st.logits.copy_(lm.step(st.tok, st.fed_pos, st.col, st.start, st.K, st.V, Lb, st.cols, st.fed_valid))
    st.step_r += 1
    st.g += 1
    st.col += 1


class _SlotStepView(StaticStepView):
    """The step view of one request's ``n`` samples (its slots ``slots``; ``present`` marks samples still holding
    one: a finished sample shows as not alive, with zero logits and KV rows, as in the eager scheduler). The fed
    tokens' KV rows are gathered from column ``col`` of the request's slots on first use."""

    def __init__(self, *args, src, **kw) -> None:
        super().__init__(*args, **kw)
        self._src = src

    def kv_rows(self, layers: list[int], part: str = "kv", heads: str = "keep") -> torch.Tensor:
        if self.K is None and self.fed_ids is not None:
            K, V, slots, col, present = self._src
            m = present[None, :, None, None, None]
            self.K = torch.where(m, K[:, slots, :, col : col + 1], 0)  # [layers, n, H_kv, 1, d]
            self.V = torch.where(m, V[:, slots, :, col : col + 1], 0)
            self.col = torch.zeros(1, dtype=torch.long, device=K.device)
        return super().kv_rows(layers, part, heads)


class FastScheduler(Scheduler):
    """Continuous batching over a :class:`~kvagents.engine.fast_decode.FastDecodeEngine`: ``config.max_rows``
    slots of static buffers shared by every request, one CUDA graph per attention bucket and sampling mode (see
    the module docstring for the column layout and what equals the alone run).

    ``lock``, ``config`` and ``encode`` as :class:`~kvagents.engine.scheduler.Scheduler`; ``config.max_seq_len``
    bounds prompt + ``max_new_tokens`` of one request (default min(context, 2048)); the buffers hold twice that
    many columns per slot.

    Example:
        >>> # sched = FastScheduler(FastDecodeEngine(model, tokenizer), config=SchedulerConfig(max_rows=8))
        >>> # h = sched.submit([5, 6, 7], SamplingParams(max_new_tokens=16, temperature=0.7, seed=1))
        >>> # h.result(timeout=60).samples[0][0].token_ids  # == the same request alone on the fast path
        >>> # sched.shutdown()
    """

    def __init__(self, engine: FastDecodeEngine, *, lock: threading.RLock | None = None,
                 config: SchedulerConfig | None = None, encode: Callable[[Any], list[int]] | None = None) -> None:
        if not isinstance(engine, FastDecodeEngine):
            raise TypeError(f"FastScheduler runs a FastDecodeEngine, got {type(engine).__name__}: use Scheduler for "
                            "the eager engine")
        config = config or SchedulerConfig(fast=True)
        ctx = getattr(engine.model.config, "max_position_embeddings", None)
        seq = config.max_seq_len if config.max_seq_len is not None else min(ctx or _DEFAULT_SEQ, _DEFAULT_SEQ)
        if ctx is not None and seq > ctx:
            raise ValueError(f"max_seq_len={seq} exceeds the model's context ({ctx}): lower max_seq_len")
        self.max_seq_len = seq
        self.window = engine.sync_every
        self._reserve = seq - 1  # the prompt region left of the first write column
        cap = -(-2 * seq // engine.bucket) * engine.bucket
        B = config.max_rows
        eos = list(engine.eos_token_ids)
        st = _SlotBatch(engine.lm, B, cap, self.window, 4, max(1, len(eos)))
        st.in_use = True
        st.col.fill_(self._reserve)
        st.start.fill_(self._reserve)
        with engine._sets_lock:
            engine._sets.append(st)  # so that a new RoPE table clears these graphs too
        if engine.lm.rope_table(seq + 1):
            for s_ in list(engine._sets):
                s_.graphs.clear()
        self._st = st
        self._cap = cap
        self._c = self._reserve  # the next write column (host mirror of st.col)
        self._g = 0  # steps since the last host check (host mirror of st.g)
        self._owner: list[tuple[_Request, int] | None] = [None] * B  # slot -> (request, sample)
        self._free = list(range(B))
        self._mode = (False, 0, False)
        self._fns: dict[tuple, Callable[[], None]] = {}
        #: Buffer compactions run (host counter, for monitoring and tests).
        self.compactions = 0
        self._setup(engine, lock, config, encode)
        self._start_loop()

    # -- public ---------------------------------------------------------------------------------------------------
    def submit(self, prompt, params=None, *, components: Sequence = (), logits_processors: Sequence = (),
               stream: bool = False, on_text=None):
        """:meth:`Scheduler.submit <kvagents.engine.scheduler.Scheduler.submit>`: sampling parameters, stop strings
        and token ids, ``n`` samples, streaming, per-request ``components`` and ``logits_processors`` (see the
        module docstring for how they run); prompt + ``max_new_tokens`` above ``max_seq_len`` raises
        ``ValueError``."""
        return super().submit(prompt, params, components=components, logits_processors=logits_processors,
                              stream=stream, on_text=on_text)

    def _accept(self, req: _Request) -> None:
        need = len(req.ids) + req.max_new
        if need > self.max_seq_len:
            raise ValueError(f"the prompt's {len(req.ids)} tokens + max_new_tokens={req.max_new} = {need} exceed this "
                             f"fast scheduler's max_seq_len={self.max_seq_len}: raise SchedulerConfig.max_seq_len or "
                             "shorten the request")

    def precapture(self) -> int:
        """Capture the greedy step of every attention bucket now (CUDA graphs; nothing to do on the CPU), so that
        no capture happens while requests decode. Only while no slot is held; returns the graphs captured."""
        eng, st = self.engine, self._st
        if not eng.graphs:
            return 0
        with self._lock, torch.inference_mode():
            if any(o is not None for o in self._owner):
                raise RuntimeError("precapture runs while no request holds a slot")
            before = eng.captures
            c, mode = self._c, (False, 0, False)
            for Lb in range(StaticLM.bucket_for(self._reserve, eng.bucket, self._cap), self._cap + 1, eng.bucket):
                key = ("slots", Lb, mode)
                if key in st.graphs:
                    continue
                snap = [t.clone() for t in st.engine_state()]
                st.col.fill_(Lb - 1)
                eng._step(st, Lb, key, self._fn(Lb, mode), [])
                for t, s in zip(st.engine_state(), snap):
                    t.copy_(s)
            st.col.fill_(c)
            return eng.captures - before

    # -- the loop -------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            super()._loop()
        finally:
            with self.engine._sets_lock:  # the buffers go with the loop
                self.engine._sets = [s for s in self.engine._sets if s is not self._st]

    def _drop_cancelled(self) -> None:
        if self._running and (self._cancel_all or any(r.handle._cancel.is_set() for r in self._running)):
            self._sync()  # the cancelled requests' tokens so far (a request that finished here keeps its result)
        super()._drop_cancelled()

    def _prefill_some(self) -> None:
        """Prefill admitted prompts. Whole prompts that fit in ``prefill_chunk`` tokens together (at least the
        first one) are prefilled in **one** left-padded forward, as a static batch's prefill is; a longer prompt
        goes through :meth:`_prefill_chunk`, ``prefill_chunk`` tokens per iteration. If the batched forward fails,
        its prompts are prefilled one by one so that only a failing prompt's request fails."""
        budget, group = self.config.prefill_chunk, []
        for req in self._prefilling:
            if req.prefilled or req.components or (group and sum(len(r.ids) for r in group) + len(req.ids) > budget):
                break  # a request with components prefills alone: their on_prefill reads its own cache
            group.append(req)
        if len(group) < 2:
            return super()._prefill_some()
        try:
            caches, logits = self._prefill_batch(group)
        except Exception:
            return super()._prefill_some()
        for req, kv, lg in zip(group, caches, logits):
            self._prefilling.remove(req)
            req.cache, req.logits = kv, lg[None]
            try:
                self._start(req)
            except Exception as err:
                if req in self._running:
                    self._drop_rows({req: []})
                else:
                    self._release(req)
                self._fail(req, err)

    def _prefill_batch(self, group: list[_Request]):
        """One forward over the whole prompts of ``group``, left-padded; per request: its prompt's KV ``(K, V)``
        (``[layers, H_kv, L, d]``, padding cut off) and its last position's logits."""
        eng, dev = self.engine, self.engine.model.device
        t0 = time.perf_counter()
        T = max(len(r.ids) for r in group)
        pad = eng.tokenizer.pad_token_id if getattr(eng.tokenizer, "pad_token_id", None) is not None else 0
        ids = torch.full((len(group), T), int(pad), dtype=torch.long)
        mask = torch.zeros((len(group), T), dtype=torch.long)
        for i, r in enumerate(group):
            ids[i, T - len(r.ids):] = torch.as_tensor(r.ids, dtype=torch.long)
            mask[i, T - len(r.ids):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=eng.model.config)
        logits = self._prefill_forward(ids, mask, pos, cache)
        layers = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
        out = []
        dt = (time.perf_counter() - t0) / len(group)
        for i, r in enumerate(group):
            a = T - len(r.ids)
            out.append((torch.stack([layer.keys[i, :, a:] for layer in layers]),
                        torch.stack([layer.values[i, :, a:] for layer in layers])))
            r.calls += 1
            r.prefilled = len(r.ids)
            r.stats.prefill_s += dt
        return out, logits

    def _prefill_forward(self, ids, mask, pos, cache) -> torch.Tensor:
        """The fast engine's prefill runs on its eager base engine (counted as one forward of the fast engine)."""
        self.engine.forward_calls += 1
        return self.engine.base.prefill(ids, mask, pos, cache)

    def _start(self, req: _Request) -> None:
        """A prompt is prefilled: its KV and state go into ``n`` free slots, left of the write column."""
        eng, n, p = self.engine, req.n, req.params
        cache, req.cache = req.cache, None
        req.force_queues, req.custom_reason, req.forced = {}, {}, [0] * n
        req.hstep, req.info = 0, None
        if req.components:
            self._on_prefill(req, cache)
        req.trackers = [_TextTracker(eng.tokenizer, p.stop) for _ in range(n)] if (p.stop or req.streaming) else None
        req.tokens = [[] for _ in range(n)]
        req.host_reason = [RUNNING] * n
        req.t_join = time.perf_counter()
        if req.max_new == 0:
            self._release(req)
            req.host_reason = [LENGTH] * n
            self._finish(req)
            return
        c = self._c
        stop_ids = sorted(set([] if p.ignore_eos else eng.eos_token_ids) | set(p.stop_token_ids))
        eos_ids = [] if p.ignore_eos else list(eng.eos_token_ids)
        self._fit_stop_table(len(stop_ids))
        slots, self._free = self._free[:n], self._free[n:]
        try:
            self._fill_slots(req, cache, slots, c, stop_ids, eos_ids)
        except BaseException:
            self._free = sorted(self._free + slots)
            raise
        req.logits = None
        req.slots = slots
        req.slots_t = torch.as_tensor(slots, dtype=torch.long, device=eng.model.device)
        req.present = list(range(n))
        req.g0 = self._g  # its tokens start at this window step
        for i, b in enumerate(slots):
            self._owner[b] = (req, i)
        self._running.append(req)
        self._set_mode()

    def _on_prefill(self, req: _Request, cache: DynamicCache) -> None:
        """The request's components see its prompt's cache; ``ForceTokens`` they return are forced from step 0."""
        eng, dev, n = self.engine, self.engine.model.device, req.n
        req.info = layer_info(cache, eng.model)
        ids = torch.as_tensor(req.ids, dtype=torch.long, device=dev)[None]
        pview = PrefillView(cache=cache, input_ids=ids, attention_mask=torch.ones_like(ids), n=n, layers=req.info)
        actions = [(c, a) for c in req.components for a in (c.on_prefill(pview) or ())]
        req.prefill_ran = True
        queue_prefill_forces(actions, n, req.logits.shape[-1], req.force_queues)

    def _fill_slots(self, req: _Request, cache: DynamicCache, slots: list[int], c: int, stop_ids: list[int],
                    eos_ids: list[int]) -> None:
        """Device writes of an admission: the prompt's KV into columns ``c - L .. c - 1`` of ``slots``, each row's
        state and the prefill logits."""
        st, dev, n, p, L = self._st, self.engine.model.device, req.n, req.params, len(req.ids)
        if isinstance(cache, tuple):  # (K, V) of a batched prefill, [layers, H_kv, L, d]
            kv = list(cache)
        else:
            kv = [torch.stack([layer.keys[0] for layer in cache.layers]),  # [layers, H_kv, L, d]
                  torch.stack([layer.values[0] for layer in cache.layers])]
        for b in slots:
            st.K[:, b, :, c - L : c].copy_(kv[0])
            st.V[:, b, :, c - L : c].copy_(kv[1])
        del cache, kv
        seed = 0
        if not p.greedy:
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**31, (1,)).item())
        top_k = p.top_k if (not p.greedy and p.top_k and p.top_k < st.logits.shape[-1]) else 0
        W, E = st.stop_tab.shape[1], st.eos_tab.shape[1]
        rows = [[c - L, L, 0, RUNNING, 0, -1, req.max_new, int(seed) & _M32, i, top_k, int(p.greedy)]
                + stop_ids + [-1] * (W - len(stop_ids)) + eos_ids + [-1] * (E - len(eos_ids)) for i in range(n)]
        vals = torch.as_tensor(rows, dtype=torch.long, device=dev)
        idx = torch.as_tensor(slots, dtype=torch.long, device=dev)
        for j, t in enumerate((st.start, st.lengths, st.step_r, st.reason, st.n_gen, st.nan_step, st.max_new_r,
                               st.seed_r, st.sample_r, st.top_k_r)):
            t[idx] = vals[:, j]
        st.greedy_r[idx] = vals[:, 10].bool()
        st.n_forced.index_fill_(0, idx, 0)
        st.force_mask.index_fill_(0, idx, False)
        st.stop_tab[idx] = vals[:, 11 : 11 + W]
        st.eos_tab[idx] = vals[:, 11 + W :]
        floats = torch.as_tensor([[1.0 if p.greedy else p.temperature, p.top_p if not p.greedy else 1.0]] * n,
                                 dtype=torch.float32, device=dev)
        st.temp_r[idx], st.top_p_r[idx] = floats[:, 0], floats[:, 1]
        st.logits[idx] = req.logits.expand(n, -1)

    def _fit_stop_table(self, width: int) -> None:
        """Widen the per-row stop-id table to ``width`` (a new buffer: the captured graphs read the old one)."""
        st = self._st
        if width <= st.stop_tab.shape[1]:
            return
        wide = torch.full((st.B, 1 << (width - 1).bit_length()), -1, dtype=torch.long, device=st.tok.device)
        wide[:, : st.stop_tab.shape[1]] = st.stop_tab
        st.stop_tab = wide
        st.graphs.clear()
        self._fns.clear()

    def _set_mode(self) -> None:
        """The sampling mode of the held slots (a graph key): any sampled row, largest top-k, any top-p < 1."""
        reqs = {id(o[0]): o[0].params for o in self._owner if o is not None}.values()
        sampled = [p for p in reqs if not p.greedy]
        vocab = self._st.logits.shape[-1]
        kmax = max((p.top_k for p in sampled if p.top_k and p.top_k < vocab), default=0)
        self._mode = (bool(sampled), kmax, any(p.top_p < 1.0 for p in sampled))

    def _free_slots(self, slots: list[int]) -> None:
        if not slots:
            return
        for b in slots:
            self._owner[b] = None
        self._free = sorted(self._free + slots)
        self._st.reason.index_fill_(0, torch.as_tensor(slots, dtype=torch.long, device=self._st.tok.device), _FREE)
        self._set_mode()

    def _drop_rows(self, keep: dict[_Request, list[int]]) -> None:
        """Keep only samples ``keep[r]`` of the listed requests; the others' slots are freed at once, and a request
        left with none leaves the batch."""
        for r, samples in keep.items():
            present = r.present if hasattr(r, "slots") else []
            self._free_slots([r.slots[i] for i in present if i not in samples])
            r.present = [i for i in present if i in samples]
            if not r.present and r in self._running:
                self._running.remove(r)
                self._release(r)

    # -- one decode step ------------------------------------------------------------------------------------------
    def _fn(self, Lb: int, mode: tuple) -> Callable[[], None]:
        key = (Lb, mode)
        if key not in self._fns:
            st, eng = self._st, self.engine

            def fn():
                slot_head(st, mode, eng.pad_token_id)
                slot_forward(eng.lm, st, Lb)

            self._fns[key] = fn
        return self._fns[key]

    def _decode_step(self) -> None:
        eng, st = self.engine, self._st
        if self._c >= self._cap:
            self._compact()
        Lb = StaticLM.bucket_for(self._c, eng.bucket, self._cap)
        hosted = [r for r in self._running if r.components or r.procs]
        try:
            if hosted:
                self._hosted_step(Lb, hosted)
            else:
                eng._step(st, Lb, ("slots", Lb, self._mode), self._fn(Lb, self._mode), [])
        except Exception as err:  # the shared step failed (e.g. out of memory): every running request ends
            running = list(self._running)
            self._drop_rows({r: [] for r in running})
            st.g.zero_()
            self._g = 0
            for r in running:
                self._fail(r, err)
            return
        eng.forward_calls += 1
        self._c += 1
        self._g += 1
        self.steps += 1
        self.peak_rows = max(self.peak_rows, sum(o is not None for o in self._owner))
        for r in self._running:
            r.calls += 1
            r.hstep += 1
        if self._g >= self._check_every():
            self._sync()

    def _check_every(self) -> int:
        """Steps between host checks: every step while a request with components or logits processors has stop
        strings (as its alone run: a stop must end the sample before its components see another step)."""
        if any((r.components or r.procs) and r.params.stop for r in self._running):
            return 1
        return self.window

    # -- requests with components or logits processors ---------------------------------------------------------
    def _hosted_step(self, Lb: int, hosted: list[_Request]) -> None:
        """One step while requests with components or logits processors run: the step's two halves (head, then the
        forward) as two graphs, with their host work around the head: before it the logits processors (raw
        ``st.logits`` rows in, ``st.scores`` rows out) and forced tokens, after it the components' ``on_step`` on
        views of their own rows (``StopSequence`` ends a sample before the forward feeds it)."""
        eng, st = self.engine, self._st
        processed = any(r.procs for r in hosted)
        if processed:
            if st.scores is None:
                st.scores = torch.zeros_like(st.logits)  # the head reads it: one buffer for the graphs
            st.scores.copy_(st.logits)
        force, failed, rows = False, {}, {}
        for r in hosted:
            try:
                rows[r] = self._request_rows(r)
                force |= self._before_head(r, rows[r])
            except Exception as err:  # a logits processor of this request failed: only it ends
                failed[r] = err
        self._fail_hosted(failed)
        key = ("slots-head", self._mode, processed, force)
        if key not in self._fns:
            mode = self._mode
            self._fns[key] = lambda: slot_head(st, mode, eng.pad_token_id, processed, force, True)
        eng._step(st, Lb, key, self._fns[key], [])
        if force:
            st.force_mask.zero_()
        for r in hosted:
            if r in failed or not r.components:
                continue
            try:
                self._components_step(r, rows[r])
            except Exception as err:  # a component of this request failed: only it ends
                failed[r] = err
        self._fail_hosted({r: e for r, e in failed.items() if r in self._running})
        key = ("slots-forward", Lb)
        if key not in self._fns:
            self._fns[key] = lambda: slot_forward(eng.lm, st, Lb)
        eng._step(st, Lb, key, self._fns[key], [])

    def _fail_hosted(self, failed: dict) -> None:
        for r, err in failed.items():
            self._drop_rows({r: []})
            self._fail(r, err)

    def _request_rows(self, r: _Request) -> dict:
        """Request ``r``'s rows before the head: its slots, the samples still holding one, the raw logits and the
        fed tokens (``None`` at its step 0) as ``[n, ...]``, as its alone run sees them."""
        st, pad = self._st, self.engine.pad_token_id
        if getattr(r, "present_key", None) != r.present:  # device copies only when samples leave (no host sync a step)
            r.present_key = list(r.present)
            mask = torch.zeros(r.n, dtype=torch.bool)
            mask[r.present] = True
            dev = st.tok.device
            r.present_mask = mask.to(dev)
            r.present_idx = torch.as_tensor(r.present, dtype=torch.long).to(dev)
            r.live_slots = torch.as_tensor([r.slots[i] for i in r.present], dtype=torch.long).to(dev)
        sl, pm = r.slots_t, r.present_mask
        out = {"slots": sl, "present": pm, "logits": torch.where(pm[:, None], st.logits[sl], 0.0),
               "fed_ids": None, "fed_valid": None, "positions": None}
        if r.hstep > 0:
            out.update(fed_ids=torch.where(pm, st.tok[sl], pad), fed_valid=st.fed_valid[sl] & pm,
                       positions=torch.where(pm, st.fed_pos[sl], 0))
        return out

    def _before_head(self, r: _Request, rows: dict) -> bool:
        """Request ``r``'s logits processors (into ``st.scores``) and this step's forced tokens (into
        ``st.force_tok`` / ``st.force_mask``); True when a token is forced."""
        st, dev = self._st, self._st.tok.device
        if r.procs:
            scores = rows["logits"]
            for proc in r.procs:
                scores = proc(scores, rows["fed_ids"], rows["fed_valid"])
                if not isinstance(scores, torch.Tensor) or scores.shape != rows["logits"].shape:
                    got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                    raise ValueError(f"logits processor {proc!r} returned {got}; it must return logits of shape "
                                     f"{tuple(rows['logits'].shape)}")
            st.scores[r.live_slots] = scores[r.present_idx].to(st.scores.dtype)
        if not r.force_queues:
            return False
        idx = [i for i, q in r.force_queues.items() if q]
        vals = [r.force_queues[i].popleft() for i in idx]
        r.force_queues = {i: q for i, q in r.force_queues.items() if q}
        mine = [(r.slots[i], v) for i, v in zip(idx, vals) if i in r.present]
        if not mine:
            return False
        b = torch.as_tensor([m[0] for m in mine], dtype=torch.long).to(dev, non_blocking=True)
        st.force_mask[b] = True
        st.force_tok[b] = torch.as_tensor([m[1] for m in mine], dtype=torch.long).to(dev, non_blocking=True)
        return True

    def _components_step(self, r: _Request, rows: dict) -> None:
        """Request ``r``'s components see its step (``StepView`` of its ``n`` rows) and act on its rows only."""
        st, pad, sl, pm = self._st, self.engine.pad_token_id, rows["slots"], rows["present"]
        view = _SlotStepView(r.hstep, torch.where(pm, st.tok[sl], pad), None, rows["logits"], st.forced[sl] & pm,
                             st.alive[sl] & pm, st.finished[sl] | ~pm, rows["fed_ids"], rows["fed_valid"],
                             rows["positions"], None, r.info, src=(st.K, st.V, sl, self._c - 1, pm))

        def stop(i: int) -> None:
            if i in r.present:
                b = r.slots[i]
                st.reason[b] = torch.where(st.reason[b] == RUNNING, COMPONENT, st.reason[b])

        apply_step_actions(r.components, view, r.n, st.logits.shape[-1], r.force_queues, r.custom_reason, stop)

    def _compact(self) -> None:
        """Slide every row's columns left so that the write column is ``R`` again (see the module docstring)."""
        st, c, R = self._st, self._c, self._reserve
        delta = c - R
        for i in range(st.K.shape[0]):
            st.K[i, :, :, :R] = st.K[i, :, :, delta:c].clone()
            st.V[i, :, :, :R] = st.V[i, :, :, delta:c].clone()
        st.start.sub_(delta).clamp_(min=0)  # only a dead row (finished, not yet checked) can start before delta
        st.col.fill_(R)
        self._c = R
        self.compactions += 1

    # -- host checks ----------------------------------------------------------------------------------------------
    def _sync(self) -> None:
        """The host check: one transfer of the window's tokens, reasons, counts and NaN steps; stop strings,
        stream events, finished samples free their slots, finished requests resolve."""
        D = self._g
        if D == 0 or not self._running:
            return
        st = self._st
        host = torch.cat([st.win[:, :D], st.reason[:, None], st.n_gen[:, None], st.nan_step[:, None],
                          st.n_forced[:, None]], dim=1).tolist()
        st.g.zero_()
        self._g = 0
        done, failed = [], {}
        for r in list(self._running):
            try:
                self._collect(r, host, D)
            except Exception as err:  # NaN logits, a stream callback error: this request fails
                failed[r] = err
                continue
            if not r.present:
                done.append(r)
        for r in done:
            self._finish(r)
        for r, err in failed.items():
            self._drop_rows({r: []})
            self._fail(r, err)

    def _collect(self, r: _Request, host: list[list[int]], D: int) -> None:
        """Request ``r``'s part of a host check: its new tokens per sample (from its own window step ``r.g0``),
        stop strings, stream events; finished samples leave (their slots are freed)."""
        bad = [i for i in r.present if host[r.slots[i]][D + 2] >= 0]
        if bad:
            raise NonFiniteLogitsError(
                f"NaN logits at step {min(host[r.slots[i]][D + 2] for i in bad)} for samples {bad} (or logits that "
                "are not finite after temperature scaling); try dtype=float32 or check the weights")
        for i in list(r.present):
            b = r.slots[i]
            row = host[b]
            reason, count = row[D], row[D + 1]
            r.forced[i] = row[D + 3]
            new = row[r.g0 : r.g0 + count - len(r.tokens[i])]
            code = reason if not new else RUNNING
            for k, tok in enumerate(new):
                r.tokens[i].append(tok)
                code = reason if k == len(new) - 1 else RUNNING
                if r.trackers is not None:
                    tr = r.trackers[i]
                    if tr.add([tok]) and code in (RUNNING, LENGTH):
                        code = STOP  # the device row may go on: freeing its slot stops it
                    if r.streaming:
                        fin = code != RUNNING
                        fr = DecodeEngine._reason_name(code, r.custom_reason.get(i)) if fin else None
                        self._emit(r, TokenEvent(0, i, tr.delta(final=fin), fr, token_id=tok))
                if code != RUNNING:
                    break
            r.host_reason[i] = code
        r.g0 = 0
        r.t += D
        r.stats.decode_steps = r.t
        gone = [i for i in r.present if r.host_reason[i] != RUNNING]
        r.present = [i for i in r.present if r.host_reason[i] == RUNNING]
        self._free_slots([r.slots[i] for i in gone])
        if not r.present and r in self._running:
            self._running.remove(r)
            self._release(r)

    # -- results --------------------------------------------------------------------------------------------------
    def _result(self, r: _Request, cancelled: bool) -> GenerationResult:
        n, eng = r.n, self.engine
        tokens = getattr(r, "tokens", None) or [[] for _ in range(n)]
        codes = getattr(r, "host_reason", None) or [RUNNING] * n
        custom = getattr(r, "custom_reason", None) or {}
        names = [CANCELLED if c == RUNNING else DecodeEngine._reason_name(c, custom.get(i)) for i, c in enumerate(codes)]
        forced = getattr(r, "forced", None) or [0] * n
        outputs = {}
        if getattr(r, "prefill_ran", False):  # on_prefill ran: the components have state to finish
            fview = FinishView(token_ids=[list(t) for t in tokens], finish_reasons=names, prompt_index=[0] * n)
            outputs = {c.name: c.on_finish(fview) for c in r.components}
        trackers = getattr(r, "trackers", None)
        samples = []
        for i in range(n):
            if trackers is not None:
                text = trackers[i].final_text
            else:
                text = eng.tokenizer.decode(tokens[i], skip_special_tokens=True) if eng.tokenizer else ""
            samples.append(SampleResult(
                prompt_index=0, sample_index=i, text=text, token_ids=list(tokens[i]), finish_reason=names[i],
                prompt_tokens=len(r.ids), generated_tokens=len(tokens[i]), forced_tokens=forced[i],
                outputs={k: v[i] for k, v in outputs.items() if v is not None}))
        st = r.stats
        st.forward_calls, st.generated_tokens = r.calls, sum(len(t) for t in tokens)
        st.decode_s = time.perf_counter() - r.t_join if r.t > 0 else 0.0
        return GenerationResult(samples=[samples], stats=st)
