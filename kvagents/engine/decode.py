"""The decode loop: prefill each prompt once, share its cache among n samples, hand every step to components.

Read it like gpt-fast's ``generate.py``: :func:`prefill` and :func:`decode_one_token` are the only model calls;
:meth:`DecodeEngine.run` is the loop. Device state (tokens, finish reasons, counts) never syncs with the host
inside a step; host work (stop strings, streaming text, "all finished?") happens every ``sync_every`` steps, or
every step when stop strings or streaming need it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import operator
import os
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .components import (
    Component,
    FinishView,
    ForceTokens,
    InvalidActionError,
    LayerInfo,
    LookAhead,
    LookAheadResult,
    PrefillView,
    StepView,
    StopSequence,
    check_action,
    queue_prefill_forces,
)
from .devices import TensorParallel, gather_layer_rows, shared_seed
from .params import SamplingParams
from .results import GenerationResult, GenerationStats, SampleResult, StreamEvent
from .sampling import sample_checked

RUNNING, EOS, STOP, LENGTH, COMPONENT = 0, 1, 2, 3, 4

#: ``proc(logits [B, V], prev_tokens [B] | None, prev_valid [B] | None) -> logits``: see :meth:`DecodeEngine.run`.
LogitsProcessor = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]
_REASONS = {EOS: "eos", STOP: "stop", LENGTH: "length"}


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN logits (overflow in low precision, broken weights), or the logits to sample from
    were not finite after temperature scaling / logits processors (NaN or +inf)."""


class PromptError(ValueError, TypeError):
    """A prompt that is not text, token ids or chat messages (``None``, a float token id, a bare number...)."""


#: The most sequences (prompts x ``n``) one ``generate`` call decodes; more is refused up front (split the batch).
MAX_SEQUENCES = 4096


def token_id(x, prompt: int = 0) -> int:
    """``x`` as a Python int token id: ints and integer scalars (numpy, 0-d tensors) pass; bools, floats and other
    values raise :class:`PromptError` (no silent truncation of 5.7 to 5)."""
    if type(x) is int:
        return x
    if isinstance(x, bool) or (isinstance(x, torch.Tensor) and (x.is_floating_point() or x.dtype == torch.bool)):
        raise PromptError(f"prompt {prompt}: token ids must be integers, got {x!r}")
    try:
        return operator.index(x)
    except TypeError:
        raise PromptError(f"prompt {prompt}: token ids must be integers, got {x!r}") from None


def _cache_kwarg(model) -> str:
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def layer_info(cache, model=None) -> LayerInfo:
    """Which cache layers hold keys, and their (KV heads, head dim); ``model`` tells tensor parallelism apart."""
    tp = TensorParallel.of(model) if model is not None else TensorParallel()
    attn = [
        i
        for i, layer in enumerate(cache.layers)
        if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4 and layer.keys.numel() > 0
    ]
    if not attn:
        return LayerInfo(len(cache.layers), [], 0, 0, tp)
    k = cache.layers[attn[0]].keys
    return LayerInfo(len(cache.layers), attn, k.shape[1] * tp.size, k.shape[3], tp)


def fork_rows(cache, rows: Sequence[int]):
    """A new cache holding rows ``rows`` of ``cache`` (transformers 5.x ``DynamicCache``): each layer's ``keys`` /
    ``values`` ``[B, H, S, d]`` are row-selected (a view for consecutive rows, else a copy), layers without keys
    are copied as they are. The source is never written: feeding the fork grows its own tensors
    (``DynamicLayer.update`` concatenates), so dropping it leaves the running cache exactly as it was. Nothing is
    re-computed: the fork shares the prefix's K/V.

    Example:
        >>> from transformers import DynamicCache
        >>> c = DynamicCache()
        >>> _ = c.update(torch.zeros(3, 2, 5, 4), torch.ones(3, 2, 5, 4), 0)
        >>> fork_rows(c, [2]).layers[0].keys.shape
        torch.Size([1, 2, 5, 4])
    """
    rows = [int(r) for r in rows]
    run = rows == list(range(rows[0], rows[0] + len(rows)))
    if getattr(cache, "offloading", False):
        raise NotImplementedError("look-ahead forks need a cache that is not offloaded (DynamicCache(offloading=False))")
    fork = copy.copy(cache)
    fork.layers = []
    for j, layer in enumerate(cache.layers):
        if hasattr(layer, "update_recurrent_state") or hasattr(layer, "update_conv_state"):
            raise NotImplementedError(f"cache layer {j} ({type(layer).__name__}) keeps a recurrent state: look-ahead "
                                      "forks support attention K/V layers only")
        new = copy.copy(layer)
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel() > 0:
            if run and type(layer) in (DynamicLayer, DynamicSlidingWindowLayer):  # update() never writes in place
                new.keys, new.values = keys[rows[0] : rows[-1] + 1], layer.values[rows[0] : rows[-1] + 1]
            else:
                idx = torch.as_tensor(rows, device=keys.device)
                new.keys, new.values = keys.index_select(0, idx), layer.values.index_select(0, idx)
        fork.layers.append(new)
    return fork


def check_lookahead(component, action: LookAhead, info: LayerInfo) -> None:
    """Refuse a :class:`LookAhead` from a component without an ``on_lookahead`` hook, or asking for the K/V rows
    of a layer that holds none (:class:`InvalidActionError`, naming the component and the value)."""
    name = getattr(component, "name", type(component).__name__)
    if not callable(getattr(component, "on_lookahead", None)):
        raise TypeError(f"component {name!r} returned a LookAhead but has no on_lookahead(results) hook to receive it")
    if action.kv_layers is not None:
        bad = [x for x in action.kv_layers if x not in info.attention_layers]
        if bad:
            raise InvalidActionError(f"component {name!r} asked for the look-ahead K/V of layers {bad}, which hold no "
                                     f"keys; attention layers: {info.attention_layers}")


def deliver_lookaheads(done, results, components, counts: list[int], apply) -> None:
    """Add each result's tokens to its sequence's ``counts``, hand every component in ``components`` its own results
    (``done`` holds the ``(component, request)`` pairs, in ``results``' order) through ``on_lookahead``, and
    ``apply(component, actions)`` what it returns."""
    for r in results:
        counts[r.index] += r.tokens
    for c in components:
        mine = [r for (owner, _), r in zip(done, results) if owner is c]
        if mine:
            apply(c, c.on_lookahead(mine))


class TooManySequencesError(ValueError):
    """More sequences (prompts x ``n``) in one call than :data:`MAX_SEQUENCES`."""


def check_prompts(prompt_ids: Sequence[Sequence[int]], config, max_new_tokens: int,
                  n: int = 1) -> tuple[list[int], int]:
    """Refuse no prompts / an empty prompt / a non-integer token id / more than :data:`MAX_SEQUENCES` sequences
    (``len(prompt_ids) * n``); return the prompt lengths and the new-token count that fits the
    model's context (``max_position_embeddings``) after the longest prompt."""
    if len(prompt_ids) == 0:
        raise ValueError("no prompts given")
    if len(prompt_ids) * n > MAX_SEQUENCES:
        raise TooManySequencesError(
            f"{len(prompt_ids)} prompts x n={n} = {len(prompt_ids) * n} sequences; one call decodes at most "
            f"{MAX_SEQUENCES}: split the prompts over several calls or lower n")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (0 tokens)")
        if not all(type(x) is int for x in p):
            for x in p:
                token_id(x, i)
    lengths = [len(p) for p in prompt_ids]
    ctx = getattr(config, "max_position_embeddings", None)
    return lengths, max_new_tokens if ctx is None else min(max_new_tokens, max(ctx - max(lengths), 0))


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_token_id: int, device) -> tuple[torch.Tensor, ...]:
    """Left-padded ``ids``, ``mask`` and ``position_ids`` ``[P, T]`` (pads at position 0, as HF ``generate``)."""
    T = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), T), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, T - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


class _TextTracker:
    """Host-side text of one sequence: incremental decode, stop-string search, stream deltas."""

    def __init__(self, tokenizer, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.max_stop = max((len(s) for s in stops), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.searched = 0  # text[:searched] holds no stop string start
        self.emitted = 0
        self.cut: int | None = None  # text length after a stop string match

    def add(self, ids: list[int]) -> bool:
        """Append ids; return True when a stop string completed."""
        self.ids.extend(ids)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not self.stops:
            return False
        best = None
        for s in self.stops:
            k = self.text.find(s, self.searched)
            if k >= 0 and (best is None or k < best):
                best = k
        if best is not None:
            self.cut = best
            return True
        self.searched = max(0, len(self.text) - self.max_stop + 1)
        return False

    @property
    def final_text(self) -> str:
        return self.text if self.cut is None else self.text[: self.cut]

    def delta(self, final: bool) -> str:
        """New text safe to show: holds back an incomplete UTF-8 tail and a possible stop-string prefix."""
        end = len(self.final_text)
        if not final:
            t = self.final_text
            while end > self.emitted and t[end - 1] == "\ufffd":
                end -= 1
            for s in self.stops:
                for j in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if t[end - j : end] == s[:j]:
                        end = min(end, end - j)
                        break
        out = self.final_text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out


def eager_attention_backends(device) -> list | None:
    """The SDPA backends the eager model calls may use on ``device``: on CUDA every backend but cuDNN attention,
    ``None`` (torch's choice) elsewhere or when ``KVAGENTS_CUDNN_SDP=1``.

    Why: torch's cuDNN attention builds an execution plan for every attention shape it has not seen, and a decode
    loop meets a new KV length every step. On an H100 (torch 2.11, Qwen2.5-0.5B shape) that made an eager decode step
    28-57 ms instead of 14.5-14.8 ms with the flash / memory-efficient kernels, so the eager engine (and the fast
    path's eager prefill) run without it.

    Example:
        >>> eager_attention_backends("cpu") is None
        True
    """
    if torch.device(device).type != "cuda" or os.environ.get("KVAGENTS_CUDNN_SDP") == "1":
        return None
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _attention_context(backends: list | None):
    if backends is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backends)


class DecodeEngine:
    """Runs a Hugging Face causal LM with kvagents' own decode loop.

    Example:
        >>> engine = DecodeEngine(model, tokenizer)  # doctest: +SKIP
        >>> result = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=8, temperature=0))  # doctest: +SKIP
    """

    def __init__(self, model, tokenizer, *, sync_every: int = 8, eos_token_ids: Sequence[int] | None = None) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.model = model
        self.tokenizer = tokenizer
        self.sync_every = sync_every
        self._cache_kw = _cache_kwarg(model)
        if eos_token_ids is None:
            eos = getattr(model.generation_config, "eos_token_id", None)
            if eos is None:
                eos = tokenizer.eos_token_id
            eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.eos_token_ids = list(eos_token_ids)
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        self.forward_calls = 0
        try:
            dev = next(model.parameters()).device
        except (StopIteration, AttributeError):
            dev = torch.device("cpu")
        self.attention_backends = eager_attention_backends(dev)

    # -- model calls -------------------------------------------------------------------------------------------
    def prefill(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """Forward the whole (left-padded) prompts once; return float32 logits of the last position ``[P, V]``."""
        self.forward_calls += 1
        with _attention_context(self.attention_backends):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: cache},
            )
        return out.logits[:, -1].float().to(input_ids.device)  # lm_head may sit on another GPU (device_map)

    def decode_one_token(self, token_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """Feed one token per sequence; return float32 logits ``[B, V]``. The cache gains one row per layer."""
        self.forward_calls += 1
        with _attention_context(self.attention_backends):
            out = self.model(
                input_ids=token_ids[:, None],
                attention_mask=attention_mask,
                position_ids=position_ids[:, None],
                use_cache=True,
                **{self._cache_kw: cache},
            )
        return out.logits[:, -1].float().to(token_ids.device)

    def lookahead(self, cache, attention_mask, positions, requests: Sequence[LookAhead], step: int,
                  layers: LayerInfo, prefix_tokens: torch.Tensor | None = None) -> tuple[list[LookAheadResult], int]:
        """Run ``requests`` on forks of the running ``cache`` and drop the forks; return the results (request order)
        and the forward calls used. ``attention_mask`` ``[B, S]`` is the running mask (every fed token),
        ``positions`` ``[B]`` the next position of each row. ``prefix_tokens`` ``[B]`` (optional): each row's
        chosen token not yet in ``cache`` (the fast path's), fed on the fork before the forced ids. Requests of the
        same shape share one small batch: one forward over the forced ids, then one per greedy token (the last
        decoded token is not fed). One host read per batch."""
        dev = attention_mask.device
        S = attention_mask.shape[1]
        groups: dict[tuple, list[int]] = {}
        for j, r in enumerate(requests):
            groups.setdefault((len(r.token_ids), r.max_tokens, r.kv_layers, r.kv_part), []).append(j)
        results: list[LookAheadResult | None] = [None] * len(requests)
        calls = 0
        for (f, m, kv_layers, kv_part), js in groups.items():
            host_rows = [requests[j].index for j in js]
            rows = torch.as_tensor(host_rows, device=dev)
            fork = fork_rows(cache, host_rows)
            pos = positions.index_select(0, rows)
            forced = torch.as_tensor([requests[j].token_ids for j in js], dtype=torch.long, device=dev)
            if prefix_tokens is not None:
                forced = torch.cat([prefix_tokens.index_select(0, rows)[:, None], forced], dim=1)
            F = forced.shape[1]
            mask = torch.cat([attention_mask.index_select(0, rows),
                              attention_mask.new_ones((len(js), F + m - 1))], dim=1)
            logits = self.prefill(forced, mask[:, : S + F], pos[:, None] + torch.arange(F, device=dev), fork)
            calls += 1
            toks, lps = [], []
            for s_ in range(m):
                best, tok = torch.log_softmax(logits, dim=-1).max(dim=-1)
                toks.append(tok)
                lps.append(best)
                if s_ < m - 1:
                    logits = self.decode_one_token(tok, mask[:, : S + F + s_ + 1], pos + F + s_, fork)
                    calls += 1
            kv = None
            if kv_layers is not None:
                kv = gather_layer_rows(fork, list(kv_layers), kv_part, rows=slice(-(f + m - 1), None), device=dev,
                                       tp=layers.tp)
            del fork
            host_toks, host_lps = torch.stack(toks, 1).tolist(), torch.stack(lps, 1).tolist()
            for a, j in enumerate(js):
                r = requests[j]
                results[j] = LookAheadResult(
                    index=r.index, step=step, forced_ids=list(r.token_ids), token_ids=host_toks[a],
                    probs=[math.exp(x) for x in host_lps[a]], logprobs=host_lps[a],
                    kv=None if kv is None else kv[a], tag=r.tag)
        return results, calls

    # -- public ------------------------------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        components: Sequence[Component] = (),
        on_text: Callable[[StreamEvent], None] | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
    ) -> GenerationResult:
        """Decode every prompt; ``on_text`` (optional) receives per-sequence text deltas as they appear."""
        gen = self.run(prompt_ids, params, components, stream=on_text is not None, logits_processors=logits_processors)
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            on_text(event)

    @torch.inference_mode()
    def run(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        components: Sequence[Component] = (),
        stream: bool = False,
        logits_processors: Sequence[LogitsProcessor] = (),
    ) -> Generator[StreamEvent, None, GenerationResult]:
        """The loop, as a generator of :class:`StreamEvent` (only when ``stream``) returning the result.

        ``logits_processors``: callables ``proc(logits, prev_tokens, prev_valid) -> logits`` applied in order to
        the float32 logits ``[B, V]`` before sampling (e.g. a grammar mask). ``prev_tokens`` ``[B]`` are the
        tokens chosen at the previous step (after forcing; ``None`` at step 0) and ``prev_valid`` ``[B]`` marks
        the sequences still running after them. They change only what is sampled: components still see the
        model's raw logits. A processor must not modify its input in place.
        """
        model, dev = self.model, self.model.device
        n, P = params.n, len(prompt_ids)
        lengths, max_new = check_prompts(prompt_ids, model.config, params.max_new_tokens, n)
        B, T = P * n, max(lengths)
        stats = GenerationStats(prompts=P, sequences=B)
        calls = 1  # this generation's forward calls: the prefill, then one per fed token

        # ---- prefill (left-padded) -----------------------------------------------------------------------
        t0 = time.perf_counter()
        ids, mask, pos = left_pad(prompt_ids, self.pad_token_id, dev)
        cache = DynamicCache(config=model.config)
        logits = self.prefill(ids, mask, pos, cache)
        stats.prefill_tokens = int(sum(lengths))
        info = layer_info(cache, model)
        pview = PrefillView(cache=cache, input_ids=ids, attention_mask=mask, n=n, layers=info)
        prefill_actions = []  # ForceTokens returned by on_prefill: forced from step 0 (e.g. a thinking-mode cue)
        for c in components:
            prefill_actions.extend((c, a) for a in (c.on_prefill(pview) or ()))
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        stats.prefill_s = time.perf_counter() - t0

        # ---- decode state (device) -------------------------------------------------------------------------
        t1 = time.perf_counter()
        attn = torch.zeros((B, T + max_new), dtype=torch.long, device=dev)
        attn[:, :T] = mask.repeat_interleave(n, dim=0)
        next_pos = torch.as_tensor(lengths, device=dev).repeat_interleave(n)
        reason = torch.zeros(B, dtype=torch.long, device=dev)
        n_gen = torch.zeros(B, dtype=torch.long, device=dev)
        n_forced = torch.zeros(B, dtype=torch.long, device=dev)
        nan_step = torch.full((B,), -1, dtype=torch.long, device=dev)  # first step with NaN logits
        out_tokens = torch.full((B, max(max_new, 1)), self.pad_token_id, dtype=torch.long, device=dev)
        stop_ids = sorted(set([] if params.ignore_eos else self.eos_token_ids) | set(params.stop_token_ids))
        stop_ids_t = torch.as_tensor(stop_ids, dtype=torch.long, device=dev)
        eos_t = torch.as_tensor(self.eos_token_ids if not params.ignore_eos else [], dtype=torch.long, device=dev)
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=dev)
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            gen.manual_seed(shared_seed(seed, info.tp))  # tensor-parallel ranks must sample the same tokens

        # ---- host state ---------------------------------------------------------------------------------------
        host_every_step = stream or bool(params.stop)
        trackers = [_TextTracker(self.tokenizer, params.stop) for _ in range(B)] if host_every_step else None
        force_queues: dict[int, deque[int]] = {}
        queue_prefill_forces(prefill_actions, B, logits.shape[-1], force_queues)
        custom_reason: dict[int, str] = {}
        host_reason = [RUNNING] * B
        fed_ids = fed_valid = fed_pos = None
        steps = 0
        la_comps = [c for c in components if callable(getattr(c, "on_lookahead", None))]
        clash = [c.name for c in la_comps if c.name in ("lookahead_tokens", "total_tokens")]
        if clash:
            raise ValueError(f"component name {clash[0]!r} is reserved for the look-ahead token counts; rename it")
        la_tokens = [0] * B  # look-ahead tokens (forced + decoded) run on forks of each sequence
        lookaheads: list[tuple[Component, LookAhead]] = []

        def apply_actions(c, actions, from_lookahead: bool = False) -> None:
            for action in actions or ():
                if isinstance(action, (StopSequence, ForceTokens, LookAhead)):
                    check_action(c, action, B, logits.shape[-1])
                if isinstance(action, StopSequence):
                    reason[action.index] = torch.where(reason[action.index] == RUNNING, COMPONENT, reason[action.index])
                    custom_reason.setdefault(action.index, action.reason)
                elif isinstance(action, ForceTokens):
                    force_queues.setdefault(action.index, deque()).extend(int(x) for x in action.token_ids)
                elif isinstance(action, LookAhead):
                    if from_lookahead:
                        raise TypeError(f"component {c.name!r} returned a LookAhead from on_lookahead; ask for "
                                        "look-aheads from on_step")
                    check_lookahead(c, action, info)
                    lookaheads.append((c, action))
                else:
                    raise TypeError(f"component {c.name!r} returned an unknown action {action!r}")

        for t in range(max_new):
            # 1. choose token t for every sequence (logits processors, e.g. a grammar mask, shape the choice)
            scores = logits
            for proc in logits_processors:
                scores = proc(scores, fed_ids, fed_valid)
            tok, bad_now = sample_checked(scores, params, gen)
            forced = torch.zeros(B, dtype=torch.bool, device=dev)
            if force_queues:
                idx = [i for i, q in force_queues.items() if q]
                vals = [force_queues[i].popleft() for i in idx]
                force_queues = {i: q for i, q in force_queues.items() if q}
                if idx:
                    idx_t = torch.as_tensor(idx, device=dev)
                    forced[idx_t] = True
                    tok = tok.index_put((idx_t,), torch.as_tensor(vals, device=dev))
            alive = reason == RUNNING
            forced &= alive
            nan_now = (torch.isnan(logits.sum(dim=-1)) | bad_now) & alive & (nan_step < 0)  # NaN propagates
            nan_step = torch.where(nan_now, t, nan_step)
            tok = torch.where(alive, tok, self.pad_token_id)
            out_tokens[:, t] = tok
            n_gen += alive.long()
            n_forced += forced.long()
            # 2. finish checks, on device
            if stop_ids:
                hit = torch.isin(tok, stop_ids_t) & alive
                code = torch.where(torch.isin(tok, eos_t), EOS, STOP) if len(eos_t) else STOP
                reason = torch.where(hit, code, reason)
            if t == max_new - 1:
                reason = torch.where(reason == RUNNING, LENGTH, reason)
            # 3. components (one line per step)
            view = StepView(t, tok, None, logits, forced, alive, reason != RUNNING, fed_ids, fed_valid, fed_pos, cache, info)
            for c in components:
                apply_actions(c, c.on_step(view))
            steps = t + 1
            # 4. host work, batched
            if host_every_step or steps % self.sync_every == 0 or t == max_new - 1:
                if bool((nan_step >= 0).any()):
                    bad = (nan_step >= 0).nonzero().flatten().tolist()
                    raise NonFiniteLogitsError(
                        f"NaN logits at step {int(nan_step[bad].min())} for sequences {bad} (or logits that are "
                        "not finite after temperature scaling or logits processors); try dtype=float32 or check "
                        "the weights"
                    )
                if trackers is not None:
                    counts, toks, host_reason = n_gen.tolist(), out_tokens[:, steps - 1].tolist(), reason.tolist()
                    for i, tr in enumerate(trackers):
                        if len(tr.ids) < counts[i]:  # token t counts for sequence i
                            if tr.add([toks[i]]) and host_reason[i] in (RUNNING, LENGTH):
                                reason[i] = STOP
                                host_reason[i] = STOP
                            if stream:
                                done = host_reason[i] != RUNNING
                                d = tr.delta(final=done)
                                fr = self._reason_name(host_reason[i], custom_reason.get(i)) if done else None
                                if d or done:
                                    yield StreamEvent(i // n, i % n, d, fr)
                    if all(r != RUNNING for r in host_reason):
                        break
                elif not bool((reason == RUNNING).any()):
                    break
            # 5. feed token t (its K/V rows are what the next step's components read)
            attn[:, T + t] = 1
            fed_ids, fed_valid, fed_pos = tok, reason == RUNNING, next_pos + t
            logits = self.decode_one_token(tok, attn[:, : T + t + 1], fed_pos, cache)
            calls += 1
            # 6. look-ahead forks asked for at this step: they share the prefix (token t included), then are dropped
            if lookaheads:
                done, lookaheads = lookaheads, []
                results, la_calls = self.lookahead(cache, attn[:, : T + t + 1], fed_pos + 1, [a for _, a in done], t,
                                                   info)
                calls += la_calls
                deliver_lookaheads(done, results, la_comps, la_tokens, lambda c, a: apply_actions(c, a, True))

        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        stats.decode_s = time.perf_counter() - t1
        stats.decode_steps = steps

        # ---- results -------------------------------------------------------------------------------------------
        counts = n_gen.tolist()
        reasons = reason.tolist() if max_new > 0 else [LENGTH] * B
        forced_counts = n_forced.tolist()
        all_tokens = out_tokens.tolist()
        token_lists = [all_tokens[i][: counts[i]] for i in range(B)]
        names = [self._reason_name(r, custom_reason.get(i)) for i, r in enumerate(reasons)]
        fview = FinishView(token_ids=token_lists, finish_reasons=names, prompt_index=[i // n for i in range(B)])
        outputs = {c.name: c.on_finish(fview) for c in components}
        if la_comps:  # look-ahead tokens are tokens this sample cost: per sample, and with the generated ones
            outputs["lookahead_tokens"] = la_tokens
            outputs["total_tokens"] = [counts[i] + la_tokens[i] for i in range(B)]
        samples: list[list[SampleResult]] = [[] for _ in range(P)]
        for i in range(B):
            if trackers is not None:
                text = trackers[i].final_text
            else:
                text = self.tokenizer.decode(token_lists[i], skip_special_tokens=True) if self.tokenizer else ""
            res = SampleResult(
                prompt_index=i // n,
                sample_index=i % n,
                text=text,
                token_ids=token_lists[i],
                finish_reason=names[i],
                prompt_tokens=lengths[i // n],
                generated_tokens=counts[i],
                forced_tokens=forced_counts[i],
                outputs={k: v[i] for k, v in outputs.items() if v is not None},
            )
            samples[i // n].append(res)
        if stream and trackers is not None:
            for i, tr in enumerate(trackers):  # sequences whose last event was not sent yet (length, early break)
                if host_reason[i] == RUNNING or (tr.emitted < len(tr.final_text)):
                    yield StreamEvent(i // n, i % n, tr.delta(final=True), names[i])
        stats.forward_calls = calls
        stats.generated_tokens = sum(counts)
        return GenerationResult(samples=samples, stats=stats)

    @staticmethod
    def _reason_name(code: int, custom: str | None) -> str:
        if code == COMPONENT:
            return custom or "component"
        return _REASONS.get(code, "length")
