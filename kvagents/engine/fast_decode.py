"""The fast decode path: static KV cache, one CUDA graph per length bucket, components inside the graph.

:class:`FastDecodeEngine` has :class:`~kvagents.engine.decode.DecodeEngine`'s interface (``generate``, ``run``) and its
results: greedy tokens equal the eager engine's and Hugging Face ``generate``'s, finish reasons, stop strings,
forced tokens and component outputs are the same. What differs is how a step runs:

* **prefill** stays eager (the Hugging Face model with a ``DynamicCache``, exactly as the eager engine); its rows
  are copied, repeated ``n`` times, into static buffers ``[L, B, H_kv, capacity, d]`` (:mod:`.static_cache`);
* **a decode step** (feed the previous token, logits, sample, finish checks, the components' tensor work) is one
  function of static device tensors. On CUDA it is captured once per attention-length bucket into a CUDA graph
  and replayed (the per-layer pieces compiled with ``torch.compile``); on the CPU the same function runs eagerly
  (that is what CI tests);
* **sampling** draws its exponential noise from a counter-based hash of ``(seed, step, row, token)``: no generator
  state, no host synchronisation, graph-safe, and a replayed step draws the same tokens. Seeded samples therefore
  differ from the eager engine's (``torch.Generator``) but are reproducible, and identical on CPU and GPU up to
  the logits' rounding. Greedy decoding is an argmax in both;
* **host checks** (all finished?, NaN logits, stop strings, streaming text) run every ``sync_every`` steps. A stop
  string found at an earlier step of the window rolls the window back (state snapshot at the last check) and
  replays it with the stop applied at the right step, so results equal the per-step check of the eager engine.

Components
----------
A component runs inside the graph when it offers a graph-safe step (:func:`graph_step_for`): a
``step_tensors(view)`` method plus ``graph_state() -> dict[str, Tensor]`` (the attributes it updates, **in place**,
with device ops only: no ``.item()``, no Python branching on tensor values, no re-assignment of state attributes);
``view`` is a :class:`StaticStepView` whose ``step`` is a 0-d device tensor and whose ``kv_rows`` reads the static
cache. Optional: ``graph_key()`` (the plain values its step reads; ``repr`` otherwise) and ``graph_reserve(capacity)``
(allocate per-token state for the buffers' whole capacity). The built-in scorers of :mod:`kvagents.signals` and
:class:`~kvagents.signals.embedding.KVEmbedding` implement this protocol; the engine knows none of them by name.

A graph component that also needs the host now and then (a decision, an action) adds ``host_check_at(t) -> bool``
(host state only) and ``on_host_check(view) -> actions``: the engine calls the latter after the replayed step ``t``
whenever the former says so, and applies its actions as the eager engine does; the other steps cost no host work
(:class:`~kvagents.control.thinking.ReasoningController` works this way).

Any other component keeps the plain API: its ``on_step`` runs after each replayed step, outside the graph, with a
view of the static buffers (actions work as in the eager engine; it costs host time per step).

A :class:`~kvagents.engine.components.LookAhead` (from ``on_step`` or ``on_host_check``) runs between two steps,
outside the graphs: the rows are copied out of the static buffers into a small ``DynamicCache`` fork (the prefix is
not re-processed), the step's token (not yet in the buffers: the next step feeds it) is fed on the fork with the
forced ids, and the eager model decodes the greedy tokens (:meth:`DecodeEngine.lookahead
<kvagents.engine.decode.DecodeEngine.lookahead>`); the static buffers are never written.

Logits processors
-----------------
``logits_processors`` (e.g. a :class:`~kvagents.grammar.GrammarMask`) are host callables, as in the eager engine:
with them a step is two graphs, the forward (raw logits into ``st.logits``) and the head (sampling from the
processed ``st.scores``), with the processors called on the host in between. Components still see the raw logits.
With stop strings the host checks every step then, as for plain components: a processor's own state (a grammar
matcher) cannot be rolled back.

Layout: the sampling lives in :mod:`.fast_sampling`, the components' view and graph protocol in :mod:`.static_view`,
the static buffers and the compiled per-layer step in :mod:`.static_cache`. What remains here is the engine itself,
and :meth:`FastDecodeEngine.run` is kept as one function on purpose (hence the module's length): prefill, buffer
set-up, the captured step and the host checks share the state of one call, and reading the loop top to bottom is
how one checks that it matches the eager engine step for step.

Example:
    >>> fast = FastDecodeEngine(model, tokenizer)  # doctest: +SKIP
    >>> res = fast.generate([[1, 2, 3]], SamplingParams(max_new_tokens=64, temperature=0))  # doctest: +SKIP
    >>> # or: KVModel.generate(prompts, params, fast=True)
"""

from __future__ import annotations

import copy
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .components import (
    Component,
    FinishView,
    ForceTokens,
    LookAhead,
    PrefillView,
    StopSequence,
    check_action,
    queue_prefill_forces,
)
from .decode import (
    COMPONENT,
    EOS,
    LENGTH,
    RUNNING,
    STOP,
    DecodeEngine,
    NonFiniteLogitsError,
    _TextTracker,
    check_lookahead,
    check_prompts,
    deliver_lookaheads,
    layer_info,
    left_pad,
)
from .fast_sampling import _M32, _compile_search_pass, hash_exponential, process_logits_search, top_p_keep
from .params import SamplingParams
from .results import GenerationResult, GenerationStats, SampleResult, StreamEvent
from .sampling import non_finite_rows, process_logits
from .static_cache import StaticBatch as _Static
from .static_cache import StaticLM, UnsupportedModelError
from .static_view import StaticStepView, _get_attr, _graph_key, _set_attr, _StaticCacheView, graph_step_for

__all__ = ["FastDecodeEngine", "StaticStepView", "UnsupportedComponentError", "UnsupportedModelError", "graph_step_for", "hash_exponential", "top_p_keep"]

# top-p's cumsum over the vocabulary hit an Inductor codegen error (torch 2.11, split scan): keep it eager
_process_logits_eager = torch.compiler.disable(process_logits)


def _warm_compile_pool() -> None:
    """Start Inductor's Triton-compile worker processes now, in the background. Inductor starts them only at the
    first compile and compiles in the main process, one kernel after another, until they are up (several seconds
    of a cold first call); started here they come up while the caller prefills. Env ``KVAGENTS_WARM_POOL=0``:
    leave it to Inductor."""
    try:
        from torch._inductor.async_compile import maybe_warm_pool
    except ImportError:  # another torch: Inductor warms its pool itself
        return
    maybe_warm_pool()


class UnsupportedComponentError(TypeError, ValueError):
    """A component the fast path cannot run (look-ahead forks on a sliding-window model); the eager engine runs
    it."""


@dataclass(frozen=True)
class _Samp:
    """The sampling settings the step reads (plain values: cheap guards when the head is compiled)."""

    greedy: bool
    temperature: float
    top_k: int
    top_p: float


class FastDecodeEngine:
    """:class:`~kvagents.engine.decode.DecodeEngine`'s interface over a static cache and CUDA-graph decode steps.

    * ``compile``: ``torch.compile`` the per-layer pieces (default: on CUDA);
    * ``cuda_graphs``: capture each step in a CUDA graph (default: on CUDA); off, the same step function runs
      eagerly (CPU);
    * ``bucket``: attention reads the cache columns up to the current length rounded up to this many (one graph
      per bucket, captured when first needed);
    * ``sync_every``: host checks every this many steps;
    * ``compile_head``: also compile the step's tail (sampling, finish checks, the graph-safe components' tensor
      work), fusing the components' small ops (default: with ``compile``; env ``KVAGENTS_COMPILE_HEAD=0`` off);
    * ``precompile``: before the first capture of a call shape, one recording pass of the step: kvagents' Triton
      kernels not compiled yet are compiled in worker processes while Inductor compiles the head here
      (:mod:`kvagents.kernels.kernel_precompile`; the pass's state changes are undone). Default: env
      ``KVAGENTS_PRECOMPILE=1`` with CUDA graphs; off by default because it measured slower on an H100 (numbers
      in :mod:`kvagents.kernels.kernel_precompile`).

    Buffers and graphs are kept for the last batch size and capacity (capacity = longest prompt + max_new_tokens,
    rounded up to ``bucket``), so repeated calls of the same shape capture nothing.

    Example:
        >>> fast = FastDecodeEngine(model, tokenizer)  # doctest: +SKIP
        >>> fast.generate([[1, 2, 3]], SamplingParams(max_new_tokens=16, temperature=0))  # doctest: +SKIP
    """

    def __init__(self, model, tokenizer, *, sync_every: int = 8, eos_token_ids: Sequence[int] | None = None,
                 compile: bool | None = None, cuda_graphs: bool | None = None, bucket: int = 128,
                 compile_head: bool | None = None, precompile: bool | None = None) -> None:
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        self.base = DecodeEngine(model, tokenizer, sync_every=sync_every, eos_token_ids=eos_token_ids)
        self.model, self.tokenizer = model, tokenizer
        cuda = model.device.type == "cuda"
        self.graphs = cuda if cuda_graphs is None else bool(cuda_graphs)
        if self.graphs and not cuda:
            raise ValueError("cuda_graphs=True needs a CUDA model; on the CPU leave cuda_graphs=None or False")
        self.lm = StaticLM(model, compile=cuda if compile is None else bool(compile))
        self.bucket = bucket
        self.sync_every = sync_every
        # "auto": the Triton kernels of kvagents.kernels.top_p_search on a CUDA model when Triton imports (measured side by
        # side on an H100, 2026-12-06: 1x8 top-p 6.85 vs 7.17 ms/step, B=1 unchanged), else "search", the nucleus
        # search as compiled torch passes (the CPU's path); "kernel" asks for the kernels (TRITON_INTERPRET=1 runs
        # them on the CPU); "sort": eager sort-and-cumsum in the graph
        self.top_p_impl = os.environ.get("KVAGENTS_TOPP", "auto")
        if self.top_p_impl not in ("auto", "kernel", "search", "sort"):
            raise ValueError(f"KVAGENTS_TOPP must be 'auto', 'kernel', 'search' or 'sort', got {self.top_p_impl!r}")
        from ..kernels import top_p_search

        if self.top_p_impl == "kernel" and not top_p_search.available():
            raise RuntimeError("KVAGENTS_TOPP=kernel needs triton and a CUDA device (or TRITON_INTERPRET=1)")
        self._topp_kernel = self.top_p_impl == "kernel" or (
            self.top_p_impl == "auto" and cuda and top_p_search.available())
        if compile_head is None:
            compile_head = self.lm.compiled and os.environ.get("KVAGENTS_COMPILE_HEAD", "1") != "0"
        self.compile_head = bool(compile_head)
        if self.lm.compiled or self.compile_head:  # one compile per (batch, sampling mode, component set)
            import torch._dynamo.config as dcfg

            for name in ("cache_size_limit", "recompile_limit"):
                if hasattr(dcfg, name):
                    setattr(dcfg, name, max(getattr(dcfg, name), 64))
        self._head_graph = torch.compile(self._head, dynamic=False) if self.compile_head else self._head
        if self.compile_head:
            _compile_search_pass()
        if (self.lm.compiled or self.compile_head) and os.environ.get("KVAGENTS_WARM_POOL", "1") != "0":
            _warm_compile_pool()
        self.eos_token_ids = self.base.eos_token_ids
        self.pad_token_id = self.base.pad_token_id
        self._sets: list[_Static] = []  # buffer sets; ``in_use``: a live generation owns it
        self._sets_lock = threading.Lock()
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self._stream = torch.cuda.Stream(model.device) if self.graphs else None
        self.captures = 0
        self.capture_s = 0.0
        self.forward_calls = 0
        if precompile is None:
            precompile = self.graphs and os.environ.get("KVAGENTS_PRECOMPILE", "0") == "1"
        self.precompile = bool(precompile)
        self.precompile_stats: list[dict] = []  # one entry per recording pass (kernel_precompile's counts)

    # -- public ------------------------------------------------------------------------------------------------
    def generate(self, prompt_ids, params: SamplingParams, components: Sequence[Component] = (),
                 on_text: Callable[[StreamEvent], None] | None = None, logits_processors=()) -> GenerationResult:
        """Decode every prompt; ``on_text`` receives text deltas (every ``sync_every`` steps);
        ``logits_processors`` as in :meth:`DecodeEngine.run <kvagents.engine.decode.DecodeEngine.run>`."""
        gen = self.run(prompt_ids, params, components, stream=on_text is not None, logits_processors=logits_processors)
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            on_text(event)

    # -- internals ---------------------------------------------------------------------------------------------
    def _static(self, B: int, cap: int) -> _Static:
        """A buffer set of batch ``B`` and capacity >= ``cap`` that no live generation owns, marked as owned:
        the kept one when it fits, else a new one. Sets other generations own are never shared (a suspended
        stream keeps its own); free sets that do not fit are dropped, so at most one free set stays allocated
        once the generations that overlapped have finished."""
        with self._sets_lock:
            pick = next((s for s in self._sets if not s.in_use and s.B == B and s.cap >= cap), None)
            self._sets = [s for s in self._sets if s.in_use or s is pick]
            if pick is None:
                pick = _Static(self.lm, B, cap)
                self._sets.append(pick)
            pick.in_use = True
            return pick

    @staticmethod
    def _release(st: _Static) -> None:
        """Give a buffer set back (the generation finished, failed, or was closed / garbage-collected). Only a
        flag: safe from a finaliser in any thread."""
        st.in_use = False

    def _head(self, st: _Static, params: _Samp, stop_t, eos_t, gcomps, has_kv: bool, processed: bool = False) -> None:
        """Choose token ``step`` for every row, finish checks, graph components, ``step += 1`` (device only).
        ``processed``: sample from ``st.scores`` (the logits processors' output) instead of the raw ``st.logits``."""
        logits = st.logits
        scores = st.scores if processed else logits
        if params.greedy:
            tok = scores.argmax(dim=-1)
            bad = torch.isnan(scores.sum(dim=-1))
        else:
            if self.top_p_impl == "sort":
                probs = _process_logits_eager(scores, params).softmax(dim=-1)
            else:
                probs = process_logits_search(scores, params, self._topp_kernel).softmax(dim=-1)
            tok = (probs / hash_exponential(st.seed_key, st.step, st.rows, st.vocab)).argmax(dim=-1)
            bad = non_finite_rows(probs, scores)
        alive = st.reason == RUNNING
        tok = torch.where(st.force_mask, st.force_tok, tok)
        forced = st.force_mask & alive
        nan_now = (torch.isnan(logits.sum(dim=-1)) | bad) & alive & (st.nan_step < 0)
        st.nan_step.copy_(torch.where(nan_now, st.step, st.nan_step))
        tok = torch.where(alive, tok, self.pad_token_id)
        st.out_tokens.index_copy_(1, st.step.view(1), tok[:, None])
        st.n_gen += alive.long()
        st.n_forced += forced.long()
        reason = st.reason
        if stop_t is not None:
            hit = torch.isin(tok, stop_t) & alive
            code = torch.where(torch.isin(tok, eos_t), EOS, STOP) if eos_t is not None else STOP
            reason = torch.where(hit, code, reason)
        reason = torch.where((st.step == st.max_new - 1) & (reason == RUNNING), LENGTH, reason)
        st.reason.copy_(reason)
        st.tok.copy_(tok)
        st.alive.copy_(alive)
        st.forced.copy_(forced)
        st.finished.copy_(reason != RUNNING)
        if gcomps:
            view = self._view(st, st.step, has_kv)
            for c, step_fn in gcomps:
                step_fn(c, view)
        st.step += 1

    def _view(self, st: _Static, step, has_kv: bool) -> StaticStepView:
        return StaticStepView(step, st.tok, None, st.logits, st.forced, st.alive, st.finished,
                              st.fed_ids if has_kv else None, st.fed_valid if has_kv else None,
                              st.fed_pos if has_kv else None, None, st.info, K=st.K, V=st.V, col=st.col)

    def _forward(self, st: _Static, Lb: int) -> None:
        """Feed token ``step - 1`` (``st.tok``) of every row; logits into ``st.logits``."""
        st.fed_ids.copy_(st.tok)
        st.fed_valid.copy_(st.reason == RUNNING)
        st.fed_pos.copy_(st.lengths + st.step - 1)
        st.col.copy_((st.T0 + st.step - 1).view(1))
        st.logits.copy_(self.lm.step(st.tok, st.fed_pos, st.col, st.start, st.K, st.V, Lb, st.cols, st.fed_valid))

    def _snapshot(self, st: _Static, comp_tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.clone() for t in st.engine_state() + comp_tensors]

    @staticmethod
    def _restore(st: _Static, comp_tensors: list[torch.Tensor], snap: list[torch.Tensor]) -> None:
        for t, s in zip(st.engine_state() + comp_tensors, snap):
            t.copy_(s)

    def _step(self, st, Lb, key, fn, comp_tensors) -> None:
        """Run one decode step: replay its bucket's graph (capture it first if new), or call ``fn`` (no graphs)."""
        if not self.graphs:
            fn()
            return
        g = st.graphs.get(key)
        if g is None:
            t0 = time.perf_counter()
            s = self._stream
            s.wait_stream(torch.cuda.current_stream())
            snap = self._snapshot(st, comp_tensors)
            with torch.cuda.stream(s):
                for _ in range(2):  # warm up on the capture stream (compilation, cuBLAS workspaces)
                    fn()
                    self._restore(st, comp_tensors, snap)
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool, stream=s):
                fn()
            torch.cuda.synchronize()
            st.graphs[key] = g
            self.captures += 1
            self.capture_s += time.perf_counter() - t0
        g.replay()

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, components: Sequence[Component] = (),
            stream: bool = False, logits_processors: Sequence[Callable] = ()) -> Generator[StreamEvent, None, GenerationResult]:
        """The loop, as a generator of :class:`StreamEvent` (only when ``stream``) returning the result.
        ``logits_processors``: see :meth:`DecodeEngine.run <kvagents.engine.decode.DecodeEngine.run>` (called on the host
        between the step's forward and sampling graphs).

        Re-entrant: the generation owns its static buffers until it finishes, so another ``run`` started while
        this one is suspended (an interleaved stream, a ``generate`` between two events) decodes in a buffer set
        of its own; closing the generator (or dropping it) gives the buffers back."""
        held: list[_Static] = []
        try:
            return (yield from self._run(held, prompt_ids, params, components, stream, logits_processors))
        finally:
            for st in held:
                self._release(st)

    @torch.inference_mode()
    def _run(self, held: list[_Static], prompt_ids, params: SamplingParams, components, stream: bool,
             logits_processors) -> Generator[StreamEvent, None, GenerationResult]:
        model, dev = self.model, self.model.device
        procs = list(logits_processors)
        la_comps = [c for c in components if callable(getattr(c, "on_lookahead", None))]
        if la_comps and getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window",
                                                                                  True):
            raise UnsupportedComponentError(
                f"component {la_comps[0].name!r} asks for look-ahead forks, which the fast path does not run on a "
                "sliding-window model; use the eager engine: generate(..., fast=False) / DecodeEngine")
        clash = [c.name for c in la_comps if c.name in ("lookahead_tokens", "total_tokens")]
        if clash:
            raise ValueError(f"component name {clash[0]!r} is reserved for the look-ahead token counts; rename it")
        n, P = params.n, len(prompt_ids)
        lengths, max_new = check_prompts(prompt_ids, model.config, params.max_new_tokens, params.n)
        B, T = P * n, max(lengths)
        stats = GenerationStats(prompts=P, sequences=B)
        calls = 0  # this generation's forward calls (the engine's counter also counts interleaved ones)

        # ---- prefill (eager, as the eager engine) ----------------------------------------------------------
        t0 = time.perf_counter()
        ids, mask, pos = left_pad(prompt_ids, self.pad_token_id, dev)
        cache = DynamicCache(config=model.config)
        logits0 = self.base.prefill(ids, mask, pos, cache)
        self.forward_calls += 1
        calls += 1
        stats.prefill_tokens = int(sum(lengths))
        info = layer_info(cache, model)
        if info.tp.size > 1:
            raise UnsupportedModelError("the fast path runs on one device: no tensor parallelism")
        if len(info.attention_layers) != self.lm.num_layers:
            raise UnsupportedModelError("every layer must hold keys for the fast path")
        pview = PrefillView(cache=cache, input_ids=ids, attention_mask=mask, n=n, layers=info)
        prefill_actions = []  # ForceTokens from on_prefill: forced from step 0, as in the eager engine
        for c in components:
            prefill_actions.extend((c, a) for a in (c.on_prefill(pview) or ()))
        cap = max(1, -(-(T + max_new) // self.bucket)) * self.bucket
        st = self._static(B, cap)
        held.append(st)
        st.info = info
        for i in range(self.lm.num_layers):
            k, v = cache.layers[i].keys, cache.layers[i].values
            if n > 1:
                k, v = k.repeat_interleave(n, dim=0), v.repeat_interleave(n, dim=0)
            st.K[i, :, :, :T].copy_(k)
            st.V[i, :, :, :T].copy_(v)
        del cache
        if self.lm.rope_table(T + max_new + 1):
            for s_ in list(self._sets):
                s_.graphs.clear()  # graphs read the old table
        L_t = torch.as_tensor(lengths, device=dev).repeat_interleave(n)
        st.lengths.copy_(L_t)
        st.start.copy_(T - L_t)
        st.T0.fill_(T)
        st.max_new.fill_(max_new)
        st.step.zero_()
        for t in (st.reason, st.n_gen, st.n_forced, st.force_tok):
            t.zero_()
        st.nan_step.fill_(-1)
        st.force_mask.zero_()
        st.out_tokens.fill_(self.pad_token_id)
        st.logits.copy_(logits0.repeat_interleave(n, dim=0) if n > 1 else logits0)
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**31, (1,)).item())
            st.seed_key.fill_(int(seed) & _M32)

        # components: graph-safe ones get persistent state buffers (graphs read fixed addresses)
        gcomps, plain, hosted, comp_tensors, comp_attrs, state_keys = [], [], [], [], [], []
        for j, c in enumerate(components):
            adapter = graph_step_for(c)
            if adapter is None:
                plain.append(c)
                continue
            state_fn, step_fn = adapter
            if callable(getattr(c, "graph_reserve", None)):
                c.graph_reserve(st.cap)  # per-token state for the buffers' whole capacity (stable shapes)
            for name, t in state_fn(c).items():
                skey = (j, repr(c), name, tuple(t.shape), t.dtype)
                state_keys.append(skey[2:])
                buf = st.comp_state.get(skey)
                if buf is None:
                    buf = st.comp_state[skey] = t
                else:
                    buf.copy_(t)
                _set_attr(c, name, buf)
                comp_tensors.append(buf)
                comp_attrs.append((c, name))
            gcomps.append((c, step_fn))
            if callable(getattr(c, "host_check_at", None)) and callable(getattr(c, "on_host_check", None)):
                hosted.append(c)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        stats.prefill_s = time.perf_counter() - t0

        # ---- decode ------------------------------------------------------------------------------------------
        t1 = time.perf_counter()
        stop_ids = sorted(set([] if params.ignore_eos else self.eos_token_ids) | set(params.stop_token_ids))
        eos_ids = [] if params.ignore_eos else list(self.eos_token_ids)
        samp_key = ("greedy",) if params.greedy else ("sample", params.temperature, params.top_k, params.top_p)
        # a captured step reads fixed buffers: the components' state shapes are part of its key
        gkey = (samp_key, tuple(stop_ids), tuple(eos_ids), tuple((j, _graph_key(c)) for j, (c, _) in enumerate(gcomps)),
                tuple(state_keys))

        samp = _Samp(params.greedy, params.temperature, params.top_k, params.top_p)
        stop_t = st.const(stop_ids) if stop_ids else None
        eos_t = st.const(eos_ids) if eos_ids else None

        def head(has_kv):
            (self._head_graph if has_kv else self._head)(st, samp, stop_t, eos_t, gcomps, has_kv, bool(procs))

        def step_fn_for(Lb):
            def fn():
                self._forward(st, Lb)
                head(True)
            return fn

        if procs and st.scores is None:
            st.scores = torch.zeros_like(st.logits)  # sampling reads it: allocated once per buffers (graphs)

        def process(t: int) -> None:
            """The logits processors on the host: raw ``st.logits`` in, ``st.scores`` out (as the eager engine)."""
            prev = (st.fed_ids.clone(), st.fed_valid.clone()) if t > 0 else (None, None)
            scores = st.logits
            for proc in procs:
                scores = proc(scores, *prev)
                if not isinstance(scores, torch.Tensor) or scores.shape != st.logits.shape:
                    got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                    raise ValueError(f"logits processor {proc!r} returned {got}; it must return logits of shape "
                                     f"{tuple(st.logits.shape)}")
            st.scores.copy_(scores)

        def forward_fn_for(Lb):
            return lambda: self._forward(st, Lb)

        def head_fn():
            head(True)

        host_stops = bool(params.stop)
        trackers = [_TextTracker(self.tokenizer, params.stop) for _ in range(B)] if (stream or host_stops) else None
        check_every = 1 if ((plain or hosted or procs) and host_stops) else self.sync_every
        force_queues: dict[int, deque[int]] = {}
        queue_prefill_forces(prefill_actions, B, st.logits.shape[-1], force_queues)
        custom_reason: dict[int, str] = {}
        host_reason = [RUNNING] * B
        applied_stop: dict[int, int] = {}  # row -> step at which a stop string completed
        final_sent: set[int] = set()
        last_check = 0
        snap = None  # state at the last host check (for stop-string rollback)
        snap_host = None
        steps = 0
        fns: dict[int, Callable] = {}

        def set_force(t: int) -> None:
            nonlocal force_queues
            idx = [i for i, q in force_queues.items() if q]
            if not idx:
                return
            vals = [force_queues[i].popleft() for i in idx]
            force_queues = {i: q for i, q in force_queues.items() if q}
            idx_t = torch.as_tensor(idx, device=dev)
            st.force_mask[idx_t] = True
            st.force_tok[idx_t] = torch.as_tensor(vals, device=dev)

        def one_step(t: int) -> None:
            nonlocal calls
            forcing = bool(force_queues)
            if forcing:
                set_force(t)
            if t == 0:
                if procs:
                    process(0)
                head(False)
            else:
                Lb = StaticLM.bucket_for(T + t - 1, self.bucket, cap)
                if not procs:
                    if Lb not in fns:
                        fns[Lb] = step_fn_for(Lb)
                    self._step(st, Lb, (Lb, *gkey), fns[Lb], comp_tensors)
                else:  # two graphs with the processors between them
                    if Lb not in fns:
                        fns[Lb] = forward_fn_for(Lb)
                    self._step(st, Lb, ("forward", Lb), fns[Lb], comp_tensors)
                    process(t)
                    self._step(st, Lb, ("head", *gkey), head_fn, comp_tensors)
                self.forward_calls += 1
                calls += 1
            if forcing:
                st.force_mask.zero_()

        def apply_stop(i: int) -> None:
            r = st.reason[i : i + 1]
            r.copy_(torch.where((r == RUNNING) | (r == LENGTH), STOP, r))

        Lb1 = StaticLM.bucket_for(T, self.bucket, cap)  # the bucket of step 1, the first captured step
        if self.precompile and max_new > 1 and (Lb1, *gkey) not in st.graphs and ("head", *gkey) not in st.graphs:
            def first_step():
                st.step.fill_(1)  # as step 1: the K/V column it may fill with garbage is the one step 1 writes first
                step_fn_for(Lb1)()
            self._precompile_pass(st, first_step, comp_tensors)

        la_tokens = [0] * B  # look-ahead tokens (forced + decoded) run on forks of each sequence
        lookaheads: list[tuple[Component, LookAhead]] = []

        t = 0
        while t < max_new:
            if trackers is not None and host_stops and snap is None and t == last_check:
                snap = self._snapshot(st, comp_tensors)
                snap_host = (copy.deepcopy(trackers), copy.deepcopy(force_queues), dict(custom_reason))
            one_step(t)
            if plain:
                self._plain_step(st, t, plain, force_queues, custom_reason, lookaheads)
            for c in hosted:
                if c.host_check_at(t):
                    self._host_check(st, t, c, force_queues, custom_reason, lookaheads)
            if lookaheads:  # forks of the rows (token t fed on them), dropped after; the buffers are not written
                done, lookaheads = lookaheads, []
                calls += self._lookaheads(st, t, T, done, la_comps, la_tokens, force_queues, custom_reason)
            for i, k in applied_stop.items():  # replaying a window: stops found at its check, at their step
                if k == t:
                    apply_stop(i)
            steps = t + 1
            t += 1
            if not (steps % check_every == 0 or steps == max_new):
                continue
            # ---- host check ---------------------------------------------------------------------------------
            if bool((st.nan_step >= 0).any()):
                bad = (st.nan_step >= 0).nonzero().flatten().tolist()
                raise NonFiniteLogitsError(
                    f"NaN logits at step {int(st.nan_step[bad].min())} for sequences {bad} (or logits that are "
                    "not finite after temperature scaling or logits processors); try dtype=float32 or check the "
                    "weights")
            if trackers is not None:
                counts, host_reason = st.n_gen.tolist(), st.reason.tolist()
                window = st.out_tokens[:, last_check:steps].tolist()
                new_stops: dict[int, int] = {}
                for i, tr in enumerate(trackers):
                    for k in range(last_check, min(steps, counts[i])):
                        if tr.cut is not None:
                            break
                        if tr.add([window[i][k - last_check]]):
                            if applied_stop.get(i) != k:
                                new_stops[i] = k
                            break
                rollback = {i: k for i, k in new_stops.items() if k < steps - 1}
                if rollback:  # a stop string completed inside the window: replay it with the stops in place
                    self._restore(st, comp_tensors, snap)
                    trackers, force_queues, custom_reason = (copy.deepcopy(snap_host[0]), copy.deepcopy(snap_host[1]),
                                                             dict(snap_host[2]))
                    applied_stop.update(new_stops)
                    t = last_check
                    continue
                for i, k in new_stops.items():  # found at the last step: as the eager engine does
                    apply_stop(i)
                    applied_stop[i] = k
                host_reason = st.reason.tolist()
                if stream:
                    for i, tr in enumerate(trackers):
                        if i in final_sent:
                            continue
                        done = host_reason[i] != RUNNING
                        d = tr.delta(final=done)
                        fr = DecodeEngine._reason_name(host_reason[i], custom_reason.get(i)) if done else None
                        if d or done:
                            yield StreamEvent(i // n, i % n, d, fr)
                        if done:
                            final_sent.add(i)
                last_check = steps
                snap = None
                if all(r != RUNNING for r in host_reason):
                    break
            else:
                last_check = steps
                if not bool((st.reason == RUNNING).any()):
                    break
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        stats.decode_s = time.perf_counter() - t1
        stats.decode_steps = steps

        # ---- results --------------------------------------------------------------------------------------------
        for c, name in comp_attrs:  # components keep their own copy of the final state
            _set_attr(c, name, _get_attr(c, name).clone())
        counts = st.n_gen.tolist()
        reasons = st.reason.tolist() if max_new > 0 else [LENGTH] * B
        for i in applied_stop:
            if reasons[i] in (RUNNING, LENGTH):
                reasons[i] = STOP
        forced_counts = st.n_forced.tolist()
        all_tokens = st.out_tokens.tolist()
        token_lists = [all_tokens[i][: counts[i]] for i in range(B)]
        names = [DecodeEngine._reason_name(r, custom_reason.get(i)) for i, r in enumerate(reasons)]
        fview = FinishView(token_ids=token_lists, finish_reasons=names, prompt_index=[i // n for i in range(B)])
        outputs = {c.name: c.on_finish(fview) for c in components}
        if la_comps:  # as the eager engine: look-ahead tokens per sample, and with the generated ones
            outputs["lookahead_tokens"] = la_tokens
            outputs["total_tokens"] = [counts[i] + la_tokens[i] for i in range(B)]
        samples: list[list[SampleResult]] = [[] for _ in range(P)]
        for i in range(B):
            if trackers is not None:
                text = trackers[i].final_text
            else:
                text = self.tokenizer.decode(token_lists[i], skip_special_tokens=True) if self.tokenizer else ""
            samples[i // n].append(SampleResult(
                prompt_index=i // n, sample_index=i % n, text=text, token_ids=token_lists[i],
                finish_reason=names[i], prompt_tokens=lengths[i // n], generated_tokens=counts[i],
                forced_tokens=forced_counts[i], outputs={k: v[i] for k, v in outputs.items() if v is not None}))
        if stream and trackers is not None:
            for i, tr in enumerate(trackers):
                if i not in final_sent or tr.emitted < len(tr.final_text):
                    yield StreamEvent(i // n, i % n, tr.delta(final=True), names[i])
        stats.forward_calls = calls
        stats.generated_tokens = sum(counts)
        return GenerationResult(samples=samples, stats=stats)

    def _precompiler(self):
        from ..kernels.kernel_precompile import KernelPrecompiler

        return KernelPrecompiler()

    def _precompile_pass(self, st: _Static, fn: Callable[[], None], comp_tensors: list[torch.Tensor]) -> None:
        """Run ``fn`` (a decode step) once with kvagents' kernels' compiles recorded and sent to worker processes,
        while Inductor compiles what ``fn`` compiles here; their launches do nothing in this pass, so its results
        are garbage: the engine and component state is restored after, and ``fn`` runs as step 1, so the only K/V
        column it may fill with garbage (where no kernel of ours writes it) is the one step 1 writes before reading
        it."""
        pre = self._precompiler()
        snap = self._snapshot(st, comp_tensors)
        t0 = time.perf_counter()
        error = None
        try:
            with pre.recording():
                fn()
        except Exception as e:  # noqa: BLE001 - the real step raises it again if it is not the pass's own
            error = f"{type(e).__name__}: {e}"
            warnings.warn(f"the kernels' recording pass failed ({error}); they compile at their first launch",
                          RuntimeWarning, stacklevel=3)
        finally:
            stats = pre.wait()
            self._restore(st, comp_tensors, snap)
        stats.update(pass_s=round(time.perf_counter() - t0, 2), error=error)
        self.precompile_stats.append(stats)

    def _plain_step(self, st: _Static, t: int, plain, force_queues, custom_reason, lookaheads=None) -> None:
        """Components without a graph-safe step: their ``on_step`` after the step, outside the graph."""
        has_kv = t > 0
        view = StaticStepView(t, st.tok.clone(), None, st.logits.clone(), st.forced.clone(), st.alive.clone(),
                              st.finished.clone(), st.fed_ids.clone() if has_kv else None,
                              st.fed_valid.clone() if has_kv else None, st.fed_pos.clone() if has_kv else None,
                              _StaticCacheView(st.K, st.V, int(st.T0) + t) if has_kv else None, st.info,
                              K=st.K, V=st.V, col=st.col.clone())
        for c in plain:
            self._apply(st, c, c.on_step(view), force_queues, custom_reason, lookaheads)

    def _host_check(self, st: _Static, t: int, c, force_queues, custom_reason, lookaheads=None) -> None:
        """A graph component's host work at step ``t`` (``on_host_check``), after the replayed step: a view of the
        live buffers (valid during the call only), its actions applied as a plain component's."""
        self._apply(st, c, c.on_host_check(self._view(st, t, t > 0)), force_queues, custom_reason, lookaheads)

    def _lookaheads(self, st: _Static, t: int, T: int, done, la_comps, la_tokens, force_queues,
                    custom_reason) -> int:
        """Run the look-aheads asked for at step ``t`` on forks of the static rows; hand the results to their
        components (their actions apply from step ``t + 1``); return the forward calls used."""
        S = T + t  # columns holding the prompt and tokens 0 .. t-1; token t is fed on the fork
        src = DynamicCache(config=self.model.config)
        if len(src.layers) != self.lm.num_layers or any(layer.is_sliding for layer in src.layers):
            raise UnsupportedComponentError("look-ahead forks on the fast path need one full-attention cache layer per "
                                            "decoder layer; use the eager engine: generate(..., fast=False)")
        for i, layer in enumerate(src.layers):
            k, v = st.K[i, :, :, :S], st.V[i, :, :, :S]
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        mask = (torch.arange(S, device=st.start.device)[None, :] >= st.start[:, None]).long()
        results, calls = self.base.lookahead(src, mask, st.lengths + t, [a for _, a in done], t, st.info,
                                             prefix_tokens=st.tok)
        self.forward_calls += calls
        deliver_lookaheads(done, results, la_comps, la_tokens,
                           lambda c, actions: self._apply(st, c, actions, force_queues, custom_reason))
        return calls

    @staticmethod
    def _apply(st: _Static, c, actions, force_queues, custom_reason, lookaheads=None) -> None:
        for action in actions or ():
            if isinstance(action, (StopSequence, ForceTokens, LookAhead)):
                check_action(c, action, st.B, st.logits.shape[-1])
            if isinstance(action, LookAhead):
                if lookaheads is None:
                    raise TypeError(f"component {c.name!r} returned a LookAhead from on_lookahead; ask for look-aheads "
                                    "from on_step / on_host_check")
                check_lookahead(c, action, st.info)
                lookaheads.append((c, action))
                continue
            if isinstance(action, StopSequence):
                r = st.reason[action.index]
                st.reason[action.index] = torch.where(r == RUNNING, COMPONENT, r)
                custom_reason.setdefault(action.index, action.reason)
            elif isinstance(action, ForceTokens):
                force_queues.setdefault(action.index, deque()).extend(int(x) for x in action.token_ids)
            else:
                raise TypeError(f"component {c.name!r} returned an unknown action {action!r}")
