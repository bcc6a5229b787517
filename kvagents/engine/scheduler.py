"""Continuous batching for the eager engine: requests join and leave one running batch between decode steps.

A :class:`Scheduler` owns a background decode loop over a :class:`~kvagents.engine.decode.DecodeEngine`. Callers
:meth:`~Scheduler.submit` one prompt at a time (with its own :class:`SamplingParams`, components and logits
processors) and get a :class:`RequestHandle` back at once. Each iteration of the loop, like vLLM's v1 scheduler:

1. drops cancelled requests (their rows leave the batch);
2. admits waiting requests, first come first served, while the batch has ``n`` free rows for them;
3. prefills admitted prompts, at most ``prefill_chunk`` prompt tokens per iteration while other rows decode (a long
   prompt is prefilled over several iterations, so running rows wait one chunk, not one prompt); a finished prefill
   runs the request's ``on_prefill``, is repeated ``n`` times (the samples share it) and joins the batch;
4. runs one decode step for every running row: each request samples its own rows with its own parameters and
   generator, its components see only its rows, then **one** host transfer per step tells which rows finished;
   finished rows are freed at once, finished requests resolve their handle, and the rest is fed to the model.

How rows of different lengths share one batch: the batch is one ``DynamicCache`` whose rows are **left-padded** to
the longest row, with a ``[B, T]`` attention mask (zeros on the padding) and per-row position ids (a row's own
token count, so padding never shifts positions, as in ``DecodeEngine``'s padded prefill). A joining request's
cache is left-padded to the batch length, or the batch to the newcomer's, and concatenated along the batch axis;
leaving rows are removed with ``batch_select_indices`` and columns that have become padding in every row are cut
from the left. Every row thus computes what it computes alone; the only difference is floating-point rounding of
batched and padded products (float32 CPU logits agree within 2e-5 on the tiny test models, whose tokens are identical).

Each request keeps the per-sequence state of ``DecodeEngine.run`` for its own ``n`` samples (tokens, finish
reasons, counts, forced-token queues, a ``torch.Generator`` seeded with ``params.seed``), so greedy tokens and
seeded samples equal the request run alone with ``KVModel.generate``. Components get views of ``n`` rows (sample
indices ``0 .. n-1``, as alone); a sample that finished is no longer in the batch and shows as not alive
(``fed_valid`` False, zero logits and KV rows). A request's components stop being called the step after its last
sample finishes (``DecodeEngine`` may call them up to ``sync_every - 1`` more times with nothing alive).

The fast path's continuous batching has this interface too: :class:`~kvagents.engine.fast_scheduler.FastScheduler`
(slots of static KV buffers, one CUDA-graph step for all of them; ``KVModel.scheduler(fast=True)``).

Example:
    >>> from kvagents.engine.scheduler import Scheduler, SchedulerConfig
    >>> SchedulerConfig(max_rows=8, max_queue=32).prefill_chunk
    256
    >>> # sched = Scheduler(engine, lock=threading.RLock(), config=SchedulerConfig(max_rows=8))
    >>> # handle = sched.submit([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0))
    >>> # handle.result(timeout=30).samples[0][0].token_ids
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .components import (
    FinishView,
    PrefillView,
    StepView,
    apply_step_actions,
    check_components,
    queue_prefill_forces,
)
from .decode import (
    COMPONENT,
    EOS,
    LENGTH,
    RUNNING,
    STOP,
    DecodeEngine,
    LogitsProcessor,
    NonFiniteLogitsError,
    PromptError,
    _TextTracker,
    check_prompts,
    layer_info,
    token_id,
)
from .devices import gather_layer_rows, shared_seed
from .params import SamplingParams
from .results import GenerationResult, GenerationStats, SampleResult, StreamEvent
from .sampling import sample_checked

#: Finish reason of a sample that was still running when its request was cancelled (or the scheduler shut down
#: with ``cancel=True``).
CANCELLED = "cancelled"


@dataclass
class TokenEvent(StreamEvent):
    """A :class:`StreamEvent` for one generated token of one sample: ``token_id`` the token, ``text`` the text it
    makes safe to show (often ``""``: an incomplete character or a possible stop-string prefix is held back, the
    token completing a stop string shows nothing). Joined, a sample's ``text`` fields give its final text; its last
    event carries ``finish_reason`` (``token_id`` ``None`` on the closing event of a cancelled sample)."""

    token_id: int | None = None


class QueueFullError(RuntimeError):
    """The scheduler's bounded queue of waiting requests is full (``SchedulerConfig.max_queue``)."""


class SchedulerClosedError(RuntimeError):
    """``submit`` after :meth:`Scheduler.shutdown`, or after the decode loop stopped on an error."""


class SchedulerConfig(BaseModel):
    """Limits of a :class:`Scheduler`.

    Example:
        >>> SchedulerConfig(max_rows=4).max_rows
        4
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_rows: int = Field(16, description="Rows (sequences) decoded together; a request with n samples needs n rows.")
    max_queue: int = Field(64, description="Requests that may wait for rows; submit raises QueueFullError beyond it.")
    prefill_chunk: int = Field(256, description="Prompt tokens prefilled between two decode steps while rows run.")
    fast: bool = Field(False, description="KVModel.scheduler: decode on the fast path (a FastScheduler: static "
                                          "buffers, CUDA graphs) instead of the eager engine.")
    max_seq_len: int | None = Field(None, description="Fast path only: prompt + max_new_tokens of one request at "
                                                      "most (its slots' columns); default min(context, 2048).")

    @field_validator("max_rows", "max_queue", "prefill_chunk")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {v}")
        return v

    @field_validator("max_seq_len")
    @classmethod
    def _seq_len(cls, v: int | None) -> int | None:
        if v is not None and v < 2:
            raise ValueError(f"max_seq_len must be >= 2 (a prompt token and a new one), got {v}")
        return v


class RequestHandle:
    """A submitted request: a future of its :class:`GenerationResult` and, when submitted with ``stream=True``, an
    iterator of its :class:`TokenEvent` s, one per generated token of each sample (``prompt_index`` 0,
    ``sample_index`` the sample, ``text`` the delta it releases).

    ``result(timeout)`` waits for the result (``TimeoutError`` after ``timeout`` seconds; the request's own error,
    e.g. :class:`~kvagents.engine.decode.NonFiniteLogitsError`, is raised if it failed). ``cancel()`` asks the loop
    to free the request's rows before its next step; the result then holds what was generated so far, samples that
    were still running finish with reason ``"cancelled"`` (a request that finished in the step the cancellation
    arrived keeps its full result).

    Example:
        >>> # h = sched.submit("Hi", SamplingParams(max_new_tokens=8), stream=True)
        >>> # text = "".join(ev.text for ev in h); h.result().samples[0][0].text == text
    """

    _ids = itertools.count()

    def __init__(self, stream: bool) -> None:
        self.id = next(self._ids)
        self._future: concurrent.futures.Future = concurrent.futures.Future()
        self._events: queue.SimpleQueue | None = queue.SimpleQueue() if stream else None
        self._cancel = threading.Event()
        self._iterated = False

    def result(self, timeout: float | None = None) -> GenerationResult:
        """The request's :class:`GenerationResult`, waiting at most ``timeout`` seconds (``None``: no limit)."""
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"request {self.id} did not finish within timeout={timeout} s") from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error the request failed with, or ``None`` (waits like :meth:`result`)."""
        try:
            return self._future.exception(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"request {self.id} did not finish within timeout={timeout} s") from None

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, fn) -> None:
        """Call ``fn(handle)`` once the request finishes, fails or is cancelled (at once if it already has), from
        the scheduler's thread: e.g. ``loop.call_soon_threadsafe`` to wake an event loop.

        Example:
            >>> # h.add_done_callback(lambda h: print(h.result().samples[0][0].text))
        """
        self._future.add_done_callback(lambda _f: fn(self))

    def as_asyncio(self):
        """An :class:`asyncio.Future` of :meth:`result` in the running event loop (no thread waits for it)."""
        import asyncio

        return asyncio.wrap_future(self._future)

    def cancel(self) -> bool:
        """Ask for cancellation; False when the request already finished (nothing to cancel)."""
        if self._future.done():
            return False
        self._cancel.set()
        return True

    def cancelled(self) -> bool:
        """True once ``cancel()`` was asked for before the request finished."""
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[TokenEvent]:
        """Token events as the loop produces them; ends when the request ends (raising its error if it failed)."""
        if self._events is None:
            raise RuntimeError(f"request {self.id} was submitted without stream=True: it has no events to iterate")
        if self._iterated:
            raise RuntimeError(f"request {self.id}'s events were already iterated (they are delivered once)")
        self._iterated = True
        return self._iter_events()

    def _iter_events(self) -> Iterator[TokenEvent]:
        while True:
            ev = self._events.get()
            if ev is None:
                break
            yield ev
        err = self._future.exception()
        if err is not None:
            raise err

    def __repr__(self) -> str:
        state = "done" if self.done() else ("cancelling" if self.cancelled() else "pending")
        return f"RequestHandle(id={self.id}, {state})"


class _Request:
    """One request's host and device state in the loop: the per-sequence state of ``DecodeEngine.run`` for its
    ``n`` samples, plus where its rows sit in the batch."""

    def __init__(self, ids: list[int], params: SamplingParams, max_new: int, components: list,
                 procs: list, on_text: Callable | None, handle: RequestHandle) -> None:
        self.ids, self.params, self.n, self.max_new = ids, params, params.n, max_new
        self.components, self.procs, self.on_text, self.handle = components, procs, on_text, handle
        self.stats = GenerationStats(prompts=1, sequences=params.n, prefill_tokens=len(ids))
        self.calls = 0
        self.prefilled = 0  # prompt tokens in the prefill cache
        self.cache: DynamicCache | None = None
        self.t = 0  # next step
        self.present: list[int] = []  # samples with a row in the batch, in row order
        self.present_t: torch.Tensor | None = None
        self.t_join = 0.0

    @property
    def streaming(self) -> bool:
        return self.handle._events is not None or self.on_text is not None


def _left_pad(x: torch.Tensor, cols: int) -> torch.Tensor:
    return x if cols == 0 else torch.cat([x.new_zeros((*x.shape[:2], cols, x.shape[3])), x], dim=2)


class _RequestStepView(StepView):
    """A :class:`StepView` over one request's ``n`` rows; ``kv_rows`` reads them out of the shared batch cache
    (``cache`` is ``None``: the batch cache holds other requests' rows)."""

    def __init__(self, *, rows: Callable[[list[int], str, str], torch.Tensor], **fields) -> None:
        super().__init__(**fields)
        self._rows = rows

    def kv_rows(self, layers: list[int], part: str = "kv", heads: str = "keep") -> torch.Tensor:
        if self.fed_ids is None:
            raise RuntimeError("step 0 has no fed token: its logits come from prefill (see on_prefill)")
        return self._rows(list(layers), part, heads)


class Scheduler:
    """Continuous batching over a :class:`DecodeEngine`: a background loop admits, steps and frees requests.

    ``lock`` is held for each iteration of the loop (one decode step and its admissions), so other users of the
    model (``KVModel.generate`` holds the same lock) run between steps. ``encode`` turns a prompt (text, token ids,
    chat messages) into token ids; by default token ids are checked and text is tokenized with the engine's
    tokenizer. :class:`~kvagents.model.KVModel` builds one with :meth:`~kvagents.model.KVModel.scheduler`.

    Example:
        >>> # sched = llm.scheduler(max_rows=8)
        >>> # handles = [sched.submit(p, SamplingParams(max_new_tokens=16, temperature=0)) for p in prompts]
        >>> # texts = [h.result().samples[0][0].text for h in handles]
        >>> # sched.shutdown()
    """

    def __init__(self, engine: DecodeEngine, *, lock: threading.RLock | None = None,
                 config: SchedulerConfig | None = None, encode: Callable[[Any], list[int]] | None = None) -> None:
        if config is not None and config.fast:
            raise ValueError("SchedulerConfig(fast=True) asks for the fast path: build a "
                             "kvagents.engine.fast_scheduler.FastScheduler over a FastDecodeEngine (KVModel.scheduler "
                             "does), not a Scheduler over a DecodeEngine")
        bad = {type(layer).__name__ for layer in DynamicCache(config=engine.model.config).layers
               if type(layer) is not DynamicLayer}
        if bad:
            raise NotImplementedError(f"the scheduler batches plain full-attention caches (DynamicLayer); this model's "
                                      f"cache has {sorted(bad)} layers: use KVModel.generate")
        self._setup(engine, lock, config, encode)
        # the batch
        self._cache: DynamicCache | None = None
        self._lengths: torch.Tensor | None = None  # [B] real tokens per row (= the next token's position)
        self._host_len: list[int] = []
        self._start_loop()

    def _setup(self, engine, lock: threading.RLock | None, config: SchedulerConfig | None,
               encode: Callable[[Any], list[int]] | None) -> None:
        """The state every scheduler shares: queues, counters, lock (a subclass sets its batch, then starts the
        loop with :meth:`_start_loop`)."""
        self.engine = engine
        self.config = config or SchedulerConfig()
        self._lock = lock if lock is not None else threading.RLock()
        self._encode = encode
        self._cv = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._prefilling: list[_Request] = []
        self._running: list[_Request] = []  # batch order: each request's rows are one block
        self._reserved = 0  # rows held by prefilling and running requests
        self._closing = False
        self._cancel_all = False
        self._error: BaseException | None = None
        self._in_use: set[int] = set()  # ids of components of live requests
        #: Decode steps run, and the most rows one step fed (host counters, for monitoring and tests).
        self.steps = 0
        self.peak_rows = 0

    def _start_loop(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kvagents-scheduler", daemon=True)
        self._thread.start()

    # -- public ---------------------------------------------------------------------------------------------------
    def submit(
        self,
        prompt,
        params: SamplingParams | None = None,
        *,
        components: Sequence = (),
        logits_processors: Sequence[LogitsProcessor] = (),
        stream: bool = False,
        on_text: Callable[[TokenEvent], None] | None = None,
    ) -> RequestHandle:
        """Queue one prompt; returns its :class:`RequestHandle` at once.

        ``components``: instances for this request alone (one set per request; an instance already used by a
        request in flight is refused). ``logits_processors``: as in :meth:`DecodeEngine.run`, over this request's
        ``n`` rows (a stateful one, e.g. ``GrammarMask``, needs its own instance per request, as per call).
        ``stream=True`` makes the handle iterable over :class:`TokenEvent` (one per token); ``on_text`` is called
        with each event from the loop's thread (it must not block). Raises :class:`QueueFullError` when
        ``max_queue`` requests wait already, :class:`SchedulerClosedError` after shutdown, ``ValueError`` for
        ``params.n`` above ``max_rows`` or a bad prompt.
        """
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            params = SamplingParams.model_validate(params)
        if params.n > self.config.max_rows:
            raise ValueError(f"n={params.n} samples need {params.n} rows; this scheduler runs max_rows="
                             f"{self.config.max_rows}: lower n or raise max_rows")
        components = check_components(components)
        forks = [getattr(c, "name", type(c).__name__) for c in components
                 if callable(getattr(c, "on_lookahead", None))]
        if forks:
            raise ValueError(f"component {forks[0]!r} asks for look-ahead forks (on_lookahead), which the scheduler "
                             "does not run: use KVModel.generate for it")
        procs = list(logits_processors)
        for p in procs:
            if not callable(p):
                raise TypeError(f"logits processors must be callables proc(logits, prev_tokens, prev_valid), "
                                f"got {p!r}")
        if on_text is not None and not callable(on_text):
            raise TypeError(f"on_text must be a callable taking a StreamEvent, got {on_text!r}")
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (list, tuple, str, torch.Tensor)):
            raise PromptError(f"submit takes one prompt (text, token ids or chat messages), got a list of "
                              f"{len(prompt)} prompts: submit each one (every request gets its own handle)")
        ids = self._encode_prompt(prompt)
        vocab = self.engine.model.get_input_embeddings().num_embeddings
        bad = [x for x in ids if not 0 <= x < vocab]
        if bad:
            raise ValueError(f"the prompt holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        _, max_new = check_prompts([ids], self.engine.model.config, params.max_new_tokens, params.n)
        handle = RequestHandle(stream)
        req = _Request(ids, params, max_new, components, procs, on_text, handle)
        self._accept(req)
        with self._cv:
            if self._closing or self._error is not None:
                raise SchedulerClosedError("the scheduler is shut down" if self._error is None else
                                           f"the scheduler's loop stopped on an error: {self._error!r}")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests wait already (max_queue="
                                     f"{self.config.max_queue}); retry later or raise max_queue")
            mine = [id(c) for c in components]
            if len(set(mine)) != len(mine) or self._in_use.intersection(mine):
                raise ValueError("a component instance may serve one request at a time (it holds that request's "
                                 "state): pass new instances to each submit")
            self._in_use.update(mine)
            self._waiting.append(req)
            self._cv.notify_all()
        return handle

    def shutdown(self, *, cancel: bool = False, timeout: float | None = None) -> bool:
        """Stop accepting requests; finish the outstanding ones (``cancel=True``: cancel them, each handle then
        holds its partial result) and stop the loop. Returns True once the loop has stopped (False: still running
        after ``timeout`` seconds; call again to wait more). Every outstanding handle is resolved before the loop
        stops: none is left pending."""
        with self._cv:
            self._closing = True
            self._cancel_all = self._cancel_all or cancel
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    close = shutdown

    def _accept(self, req: _Request) -> None:
        """Refuse a request this scheduler cannot run (before it is queued); the eager one runs any."""

    @property
    def closed(self) -> bool:
        return self._closing or self._error is not None

    def pending(self) -> int:
        """Requests not finished yet (waiting, prefilling or running)."""
        with self._cv:
            return len(self._waiting) + len(self._prefilling) + len(self._running)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- the loop -------------------------------------------------------------------------------------------------
    def _encode_prompt(self, prompt) -> list[int]:
        if self._encode is not None:
            return list(self._encode(prompt))
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise ValueError("a text prompt needs the engine's tokenizer; this engine has none")
            prompt = self.engine.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.flatten().tolist()
        return [token_id(x) for x in prompt]

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._has_work() and not self._closing:
                        self._cv.wait()
                    if not self._has_work():
                        return
                with self._lock:
                    self._iteration()
        except BaseException as err:  # a failure of the shared batch (forward pass): every request learns of it
            with self._cv:
                self._error = err
                reqs = list(self._waiting) + self._prefilling + self._running
                self._waiting.clear()
                self._prefilling, self._running = [], []
            self._cache = None
            for r in reqs:
                self._fail(r, err)

    @torch.inference_mode()
    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._prefill_some()
        if self._running:
            self._decode_step()

    def _admit(self) -> None:
        with self._cv:
            while self._waiting and self._reserved + self._waiting[0].n <= self.config.max_rows:
                req = self._waiting.popleft()
                self._reserved += req.n
                self._prefilling.append(req)

    def _drop_cancelled(self) -> None:
        with self._cv:
            cancel_all = self._cancel_all
            gone = [r for r in self._waiting if cancel_all or r.handle._cancel.is_set()]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            self._finish(r, cancelled=True)
        for r in [r for r in self._prefilling if cancel_all or r.handle._cancel.is_set()]:
            self._prefilling.remove(r)
            self._release(r)
            self._finish(r, cancelled=True)
        stop = [r for r in self._running if cancel_all or r.handle._cancel.is_set()]
        if stop:
            self._drop_rows({r: [] for r in stop})
            for r in stop:
                self._finish(r, cancelled=True)

    # -- prefill --------------------------------------------------------------------------------------------------
    def _prefill_some(self) -> None:
        """Prefill admitted prompts, ``prefill_chunk`` prompt tokens in all (a longer prompt goes on next iteration)."""
        budget = self.config.prefill_chunk
        for req in list(self._prefilling):
            if budget <= 0:
                break
            try:
                take = min(len(req.ids) - req.prefilled, budget)
                done = self._prefill_chunk(req, take)
                budget -= take
                if done:
                    self._prefilling.remove(req)
                    self._start(req)
            except Exception as err:  # this request's prompt or components failed: only it ends
                if req in self._prefilling:
                    self._prefilling.remove(req)
                if req in self._running:
                    self._drop_rows({req: []})
                else:
                    self._release(req)
                self._fail(req, err)

    def _prefill_chunk(self, req: _Request, take: int) -> bool:
        eng, dev = self.engine, self.engine.model.device
        t0 = time.perf_counter()
        if req.cache is None:
            req.cache = DynamicCache(config=eng.model.config)
        a, b = req.prefilled, req.prefilled + take
        ids = torch.as_tensor(req.ids[a:b], dtype=torch.long, device=dev)[None]
        mask = torch.ones((1, b), dtype=torch.long, device=dev)
        pos = torch.arange(a, b, device=dev)[None]
        req.logits = self._prefill_forward(ids, mask, pos, req.cache)
        req.calls += 1
        req.prefilled = b
        req.stats.prefill_s += time.perf_counter() - t0
        return b == len(req.ids)

    def _prefill_forward(self, ids, mask, pos, cache) -> torch.Tensor:
        """One prefill forward of the engine (last position's logits)."""
        return self.engine.prefill(ids, mask, pos, cache)

    def _start(self, req: _Request) -> None:
        """A prompt is prefilled: on_prefill, the request's decode state, and its n rows join the batch."""
        eng, model, dev, n = self.engine, self.engine.model, self.engine.model.device, req.n
        cache = req.cache
        info = layer_info(cache, model)
        req.info = info
        L = len(req.ids)
        ids = torch.as_tensor(req.ids, dtype=torch.long, device=dev)[None]
        pview = PrefillView(cache=cache, input_ids=ids, attention_mask=torch.ones_like(ids), n=n, layers=info)
        prefill_actions = []
        for c in req.components:
            prefill_actions.extend((c, a) for a in (c.on_prefill(pview) or ()))
        req.force_queues: dict[int, deque[int]] = {}
        queue_prefill_forces(prefill_actions, n, req.logits.shape[-1], req.force_queues)
        if req.max_new == 0:
            self._release(req)
            self._finish(req)
            return
        if n > 1:
            cache.batch_repeat_interleave(n)
            req.logits = req.logits.repeat_interleave(n, dim=0)
        p = req.params
        req.reason = torch.zeros(n, dtype=torch.long, device=dev)
        req.n_gen = torch.zeros(n, dtype=torch.long, device=dev)
        req.n_forced = torch.zeros(n, dtype=torch.long, device=dev)
        req.nan_step = torch.full((n,), -1, dtype=torch.long, device=dev)
        req.out_tokens = torch.full((n, req.max_new), eng.pad_token_id, dtype=torch.long, device=dev)
        stop_ids = sorted(set([] if p.ignore_eos else eng.eos_token_ids) | set(p.stop_token_ids))
        req.stop_ids_t = torch.as_tensor(stop_ids, dtype=torch.long, device=dev) if stop_ids else None
        req.eos_t = torch.as_tensor(eng.eos_token_ids if not p.ignore_eos else [], dtype=torch.long, device=dev)
        req.gen = None
        if not p.greedy:
            req.gen = torch.Generator(device=dev)
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            req.gen.manual_seed(shared_seed(seed, info.tp))
        req.trackers = [_TextTracker(eng.tokenizer, p.stop) for _ in range(n)] if (p.stop or req.streaming) else None
        req.custom_reason: dict[int, str] = {}
        req.host_reason = [RUNNING] * n
        req.fed_ids = req.fed_valid = req.fed_pos = None
        req.cache = None
        req.t_join = time.perf_counter()
        self._join(req, cache, L)

    def _join(self, req: _Request, cache: DynamicCache, L: int) -> None:
        """Append the request's ``n`` rows (prompt length ``L``) to the batch, left-padding whichever is shorter."""
        n, dev = req.n, self.engine.model.device
        if self._cache is None:
            self._cache, self._host_len = cache, [L] * n
            self._lengths = torch.full((n,), L, dtype=torch.long, device=dev)
        else:
            T = max(self._host_len)
            W = max(T, L)
            for mine, new in zip(self._cache.layers, cache.layers):
                mine.keys = torch.cat([_left_pad(mine.keys, W - T), _left_pad(new.keys, W - L)], dim=0)
                mine.values = torch.cat([_left_pad(mine.values, W - T), _left_pad(new.values, W - L)], dim=0)
            self._host_len += [L] * n
            self._lengths = torch.cat([self._lengths, torch.full((n,), L, dtype=torch.long, device=dev)])
        self._set_present(req, list(range(n)))
        self._running.append(req)

    def _set_present(self, req: _Request, present: list[int]) -> None:
        req.present = present
        req.present_t = torch.as_tensor(present, dtype=torch.long, device=self.engine.model.device)

    def _release(self, req: _Request) -> None:
        with self._cv:
            self._reserved -= req.n

    # -- one decode step ------------------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        eng = self.engine
        memo: dict[tuple, torch.Tensor] = {}
        offsets, off = {}, 0
        for r in self._running:
            offsets[r] = off
            off += len(r.present)

        def rows_of(r):
            def rows(layers, part, heads):
                key = (tuple(layers), part, heads)
                if key not in memo:
                    memo[key] = gather_layer_rows(self._cache, layers, part, rows=-1, device=eng.model.device,
                                                  heads=heads, tp=r.info.tp)
                o = offsets[r]
                return self._widen(r, memo[key][o : o + len(r.present)], 0)
            return rows

        failed: dict[_Request, BaseException] = {}
        for r in self._running:
            try:
                self._sample(r, rows_of(r))
            except Exception as err:  # a component or logits processor of this request failed
                failed[r] = err
        live = [r for r in self._running if r not in failed]
        # the step's one host transfer: every live request's tokens, finish reasons and NaN steps
        host = [[], [], []]
        if live:
            host = torch.cat([torch.stack([r.tok, r.reason, r.nan_step]) for r in live], dim=1).tolist()
        keep: dict[_Request, list[int]] = {r: [] for r in failed}
        done: list[_Request] = []
        o = 0
        for r in live:
            toks, reasons, nans = (row[o : o + r.n] for row in host)
            o += r.n
            try:
                still = self._host_work(r, toks, reasons, nans)
            except Exception as err:  # NaN logits, a stop-string or stream callback error: this request fails
                failed[r] = err
                keep[r] = []
                continue
            keep[r] = still
            if not still:
                done.append(r)
        self._drop_rows(keep)
        for r in done:
            self._finish(r)
        for r, err in failed.items():
            self._fail(r, err)
        if self._running:
            try:
                self._feed()
            except Exception as err:  # the shared forward failed (e.g. out of memory): every running request ends
                running = list(self._running)
                self._drop_rows({r: [] for r in running})
                for r in running:
                    self._fail(r, err)

    def _widen(self, r: _Request, x: torch.Tensor, fill) -> torch.Tensor:
        """Rows of ``r``'s present samples ``[k, ...]`` as ``[n, ...]`` (``fill`` where a sample left the batch)."""
        if len(r.present) == r.n:
            return x
        out = x.new_full((r.n, *x.shape[1:]), fill)
        out[r.present_t] = x
        return out

    def _sample(self, r: _Request, rows) -> None:
        """Step ``r.t`` of request ``r``: ``DecodeEngine.run``'s steps 1-3 over its ``n`` rows (no host sync)."""
        p, t, n, dev, pad = r.params, r.t, r.n, self.engine.model.device, self.engine.pad_token_id
        logits = r.logits
        scores = logits
        for proc in r.procs:
            scores = proc(scores, r.fed_ids, r.fed_valid)
        tok, bad_now = sample_checked(scores, p, r.gen)
        forced = torch.zeros(n, dtype=torch.bool, device=dev)
        if r.force_queues:
            idx = [i for i, q in r.force_queues.items() if q]
            vals = [r.force_queues[i].popleft() for i in idx]
            r.force_queues = {i: q for i, q in r.force_queues.items() if q}
            if idx:
                idx_t = torch.as_tensor(idx, device=dev)
                forced[idx_t] = True
                tok = tok.index_put((idx_t,), torch.as_tensor(vals, device=dev))
        alive = r.reason == RUNNING
        forced &= alive
        nan_now = (torch.isnan(logits.sum(dim=-1)) | bad_now) & alive & (r.nan_step < 0)
        r.nan_step = torch.where(nan_now, t, r.nan_step)
        tok = torch.where(alive, tok, pad)
        r.out_tokens[:, t] = tok
        r.n_gen += alive.long()
        r.n_forced += forced.long()
        if r.stop_ids_t is not None:
            hit = torch.isin(tok, r.stop_ids_t) & alive
            code = torch.where(torch.isin(tok, r.eos_t), EOS, STOP) if len(r.eos_t) else STOP
            r.reason = torch.where(hit, code, r.reason)
        if t == r.max_new - 1:
            r.reason = torch.where(r.reason == RUNNING, LENGTH, r.reason)
        view = _RequestStepView(step=t, token_ids=tok, _logprobs=None, logits=logits, forced=forced, alive=alive,
                                finished=r.reason != RUNNING, fed_ids=r.fed_ids, fed_valid=r.fed_valid,
                                positions=r.fed_pos, cache=None, layers=r.info, rows=rows)

        def stop(i: int) -> None:
            r.reason[i] = torch.where(r.reason[i] == RUNNING, COMPONENT, r.reason[i])

        apply_step_actions(r.components, view, n, logits.shape[-1], r.force_queues, r.custom_reason, stop)
        r.tok = tok

    def _host_work(self, r: _Request, toks: list[int], reasons: list[int], nans: list[int]) -> list[int]:
        """Step ``r.t``'s host side (stop strings, stream events); returns the samples still running."""
        t = r.t
        r.t += 1
        bad = [i for i, s in enumerate(nans) if s >= 0]
        if bad:
            raise NonFiniteLogitsError(
                f"NaN logits at step {min(nans[i] for i in bad)} for samples {bad} (or logits that are not finite "
                "after temperature scaling or logits processors); try dtype=float32 or check the weights")
        alive = [h == RUNNING for h in r.host_reason]
        if r.trackers is not None:
            for i, tr in enumerate(r.trackers):
                if not alive[i]:
                    continue
                if tr.add([toks[i]]) and reasons[i] in (RUNNING, LENGTH):
                    reasons[i] = STOP
                    r.reason[i] = STOP
                if r.streaming:
                    fin = reasons[i] != RUNNING
                    fr = DecodeEngine._reason_name(reasons[i], r.custom_reason.get(i)) if fin else None
                    self._emit(r, TokenEvent(0, i, tr.delta(final=fin), fr, token_id=toks[i]))
        r.host_reason = reasons
        r.stats.decode_steps = t + 1
        return [i for i in r.present if reasons[i] == RUNNING]

    def _emit(self, r: _Request, ev: StreamEvent) -> None:
        if r.handle._events is not None:
            r.handle._events.put(ev)
        if r.on_text is not None:
            r.on_text(ev)

    def _drop_rows(self, keep: dict[_Request, list[int]]) -> None:
        """Keep only samples ``keep[r]`` of the listed running requests (others unchanged); a request left with no
        rows leaves the batch. Columns that became padding in every row are cut."""
        if not keep:
            return
        rows, o, running = [], 0, []
        changed = False
        for r in self._running:
            k = len(r.present)
            if r in keep and keep[r] != r.present:
                changed = True
                pos = {j: i for i, j in enumerate(r.present)}
                rows += [o + pos[j] for j in keep[r]]
                if keep[r]:
                    self._set_present(r, keep[r])
            else:
                rows += range(o, o + k)
            o += k
            if not (r in keep and not keep[r]):
                running.append(r)
            else:
                self._release(r)
        self._running = running
        if not changed:
            return
        if not rows:
            self._cache, self._lengths, self._host_len = None, None, []
            return
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.engine.model.device)
        self._cache.batch_select_indices(idx)
        self._lengths = self._lengths[idx]
        T = max(self._host_len)
        self._host_len = [self._host_len[i] for i in rows]
        cut = T - max(self._host_len)
        if cut:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]

    def _feed(self) -> None:
        """Feed every running row its step's token (``DecodeEngine.run``'s step 5) and hand each request its logits."""
        eng = self.engine
        toks = torch.cat([r.tok if len(r.present) == r.n else r.tok[r.present_t] for r in self._running])
        T = max(self._host_len)
        lengths = self._lengths
        mask = (torch.arange(T + 1, device=lengths.device)[None] >= (T - lengths)[:, None]).long()
        logits = eng.decode_one_token(toks, mask, lengths, self._cache)
        self.steps += 1
        self.peak_rows = max(self.peak_rows, len(self._host_len))
        self._lengths = lengths + 1
        self._host_len = [x + 1 for x in self._host_len]
        o = 0
        for r in self._running:
            k = len(r.present)
            r.fed_ids, r.fed_valid = r.tok, r.reason == RUNNING
            r.fed_pos = torch.full((r.n,), len(r.ids) + r.t - 1, dtype=torch.long, device=lengths.device)
            r.logits = self._widen(r, logits[o : o + k], 0.0)
            r.calls += 1
            o += k

    # -- results --------------------------------------------------------------------------------------------------
    def _finish(self, r: _Request, cancelled: bool = False) -> None:
        """Resolve ``r``'s handle with its (possibly partial) result; never raises (a failure resolves it too)."""
        try:
            res = self._result(r, cancelled)
        except Exception as err:
            self._fail(r, err)
            return
        self._forget(r)
        if r.streaming and r.t > 0 and r.trackers is not None:
            for i, tr in enumerate(r.trackers):  # samples still running when cancelled: their last event
                if r.host_reason[i] == RUNNING:
                    try:
                        self._emit(r, TokenEvent(0, i, tr.delta(final=True), CANCELLED))
                    except Exception:  # noqa: BLE001 - the callback's failure must not lose the result
                        pass
        if not r.handle._future.done():
            r.handle._future.set_result(res)
        self._close_events(r)

    def _result(self, r: _Request, cancelled: bool) -> GenerationResult:
        n, eng = r.n, self.engine
        started = r.t > 0
        if started:
            counts, codes = r.n_gen.tolist(), r.reason.tolist()
            forced_counts, all_tokens = r.n_forced.tolist(), r.out_tokens.tolist()
            tokens = [all_tokens[i][: counts[i]] for i in range(n)]
        else:
            counts, forced_counts, tokens = [0] * n, [0] * n, [[] for _ in range(n)]
            codes = [LENGTH if r.max_new == 0 and not cancelled else RUNNING] * n
        custom = r.custom_reason if started else {}
        names = [CANCELLED if c == RUNNING else DecodeEngine._reason_name(c, custom.get(i))
                 for i, c in enumerate(codes)]
        outputs = {}
        if r.prefilled == len(r.ids) and hasattr(r, "info"):  # on_prefill ran: the components have state to finish
            fview = FinishView(token_ids=tokens, finish_reasons=names, prompt_index=[0] * n)
            outputs = {c.name: c.on_finish(fview) for c in r.components}
        samples = []
        for i in range(n):
            trackers = getattr(r, "trackers", None)
            if trackers is not None:
                text = trackers[i].final_text
            else:
                text = eng.tokenizer.decode(tokens[i], skip_special_tokens=True) if eng.tokenizer else ""
            samples.append(SampleResult(
                prompt_index=0, sample_index=i, text=text, token_ids=tokens[i], finish_reason=names[i],
                prompt_tokens=len(r.ids), generated_tokens=counts[i], forced_tokens=forced_counts[i],
                outputs={k: v[i] for k, v in outputs.items() if v is not None}))
        st = r.stats
        st.forward_calls, st.generated_tokens = r.calls, sum(counts)
        st.decode_s = time.perf_counter() - r.t_join if started else 0.0
        return GenerationResult(samples=[samples], stats=st)

    def _fail(self, r: _Request, err: BaseException) -> None:
        self._forget(r)
        if not r.handle._future.done():
            r.handle._future.set_exception(err)
        self._close_events(r)

    def _forget(self, r: _Request) -> None:
        with self._cv:
            self._in_use.difference_update(id(c) for c in r.components)

    @staticmethod
    def _close_events(r: _Request) -> None:
        if r.handle._events is not None:
            r.handle._events.put(None)
