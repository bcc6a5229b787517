"""Runnables on top of :class:`ChatKV`: best-of-N selection, per-step KV events, budgeted reasoning.

* :class:`KVBestOfN`: N samples in one engine call (one prefill), scored in the decode loop, one chosen; the
  returned ``AIMessage`` carries every candidate with its scores in ``response_metadata["candidates"]``.
* :class:`KVStepEvents`: runs the chat model and dispatches ``kv_step`` custom events (pooled KV embedding of each
  sequence so far, every ``every`` tokens and at most every ``min_interval_s`` seconds) to callbacks and
  ``astream_events``.
* :func:`budgeted_reasoning`: the chat model with its thinking controls (mode, effort, budget) exposed as
  ``configurable_fields``.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Literal

import torch
from langchain_core.callbacks import adispatch_custom_event, dispatch_custom_event
from langchain_core.messages import AIMessage
from langchain_core.runnables import ConfigurableField, RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import ensure_config
from pydantic import ConfigDict, Field

from kvagents import KVEmbedding, KVPooling
from kvagents.control.selection import BestOfN

from ._shared import run_on_worker
from .chat_models import ChatKV

__all__ = ["KVBestOfN", "KVStepEvents", "budgeted_reasoning"]


class KVBestOfN(RunnableSerializable[Any, AIMessage]):
    """Sample ``n`` answers in one engine call, score them in the decode loop and return the chosen one.

    Args:
        llm: the :class:`ChatKV` (its model, template and sampling settings; ``temperature`` > 0 makes the
            samples differ).
        n: samples per input.
        rule: ``"argmax"`` of ``score``, ``"majority"`` vote over parsed answers, or ``"weighted"`` vote.
        score: a score key of the scorers (default DeepConf's ``lowest_group_confidence``; the KV
            chain-of-embedding scores come from ``scorers=[LayerCoE()]`` etc.).
        parser: ``"gsm8k"``, ``"math"``, ``"choice"`` or a callable (required by the vote rules).
        scorers: kvagents components whose dict outputs are scores (default ``ProbabilityScores``).
        probe: with ``score="kv_probe"``: the trained KV probe (folder or shipped name; default the probe shipped
            for the model) whose probability that a sample is right scores it; ``rule="weighted"`` then weighs the
            vote by that probability (the best-measured rule; ``weighting`` is ``"score"`` for it).
        adaptive: an :class:`~kvagents.control.adaptive.AdaptiveConfig`: sample in waves and stop once the vote
            is decided (``rule`` ``"majority"`` or ``"weighted"``).

    The result's ``response_metadata``: ``candidates`` (``text``, ``answer``, ``scores``, ``index``),
    ``chosen_index``, ``rule``, ``score``, ``note`` (why this one) and ``fallback_used``.

    Example:
        .. code-block:: python

            bon = KVBestOfN(llm=ChatKV(model="smollm2-135m", temperature=0.8, max_tokens=128), n=4,
                            rule="majority", parser="gsm8k")
            msg = bon.invoke("Tom has 3 boxes of 12 apples. How many apples? End with #### N")
            msg.content, msg.response_metadata["candidates"]
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    llm: ChatKV
    n: int = Field(4, ge=1)
    rule: Literal["argmax", "majority", "weighted"] = "argmax"
    score: str | None = "lowest_group_confidence"
    parser: Any = None
    scorers: list[Any] | None = None
    probe: str | None = None
    adaptive: Any = None

    def _scorers(self, llm) -> list[Any] | None:
        if self.score != "kv_probe":
            return self.scorers
        from kvagents.signals.probe import KVProbeScore
        from kvagents.signals.scoring import ProbabilityScores

        if any(isinstance(c, KVProbeScore) for c in self.scorers or []):
            return self.scorers
        probe = self.llm.model_copy(update={"probe": self.probe, "select_by": "kv_probe"})._kv_probe(llm)
        return [*(self.scorers or [ProbabilityScores()]), KVProbeScore(probe)]

    def _select(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any):
        messages = self.llm._convert_input(input).to_messages()
        req = self.llm._prepare([messages], kwargs.pop("stop", None), kwargs)
        extra = {"weighting": "score"} if self.score == "kv_probe" and self.rule == "weighted" else {}
        bon = BestOfN(req.llm, n=self.n, scorers=self._scorers(req.llm), rule=self.rule, score=self.score,
                      parser=self.parser, adaptive=self.adaptive, **extra)
        params = req.params.model_copy(update={"n": 1})
        with self.llm._lock(req.llm):
            return bon(list(req.prompt_ids[0]), params), req

    def _message(self, sel, req) -> AIMessage:
        s = sel.chosen.sample
        candidates = [
            {"index": c.index, "text": c.text, "answer": c.answer, "scores": dict(c.scores),
             "stopped_early": c.stopped_early}
            for c in sel.candidates
        ]
        return AIMessage(
            content=sel.text,
            usage_metadata={
                "input_tokens": s.prompt_tokens,
                "output_tokens": sum(c.sample.generated_tokens for c in sel.candidates),
                "total_tokens": s.prompt_tokens + sum(c.sample.generated_tokens for c in sel.candidates),
            },
            response_metadata={
                "model_name": req.model_name, "finish_reason": s.finish_reason, "candidates": candidates,
                "chosen_index": sel.chosen.index, "rule": sel.rule, "score": sel.score, "note": sel.note,
                "fallback_used": sel.fallback_used,
            },
        )

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        def run(inp):
            sel, req = self._select(inp, **kwargs)
            return self._message(sel, req)

        return self._call_with_config(run, input, config, run_type="llm")

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        async def run(inp):
            sel, req = await run_on_worker(self.llm.llm, self._select, inp, **kwargs)
            return self._message(sel, req)

        return await self._acall_with_config(run, input, config, run_type="llm")


class _KVEventEmitter(KVEmbedding):
    """A running KV embedding that hands ``{"step", "sequence", "norm", "cosine_to_previous", "embedding"}`` to
    ``emit`` every ``every``
    decode steps (and at most every ``min_interval_s`` seconds); host reads happen only then."""

    def __init__(self, emit, every: int, min_interval_s: float, pooling: KVPooling, include_vectors: bool):
        super().__init__(pooling=pooling, name="kv_events")
        self.emit, self.every, self.min_interval_s = emit, every, min_interval_s
        self.include_vectors = include_vectors
        self._last = -math.inf  # the first event always goes out (time.monotonic() may start near 0 at boot)
        self.sent = 0

    def on_step(self, view):
        super().on_step(view)
        if view.step == 0 or view.step % self.every:
            return None
        now = time.monotonic()
        if now - self._last < self.min_interval_s:
            return None
        self._last = now
        emb = self.embeddings().float()
        norms = emb.norm(dim=-1).tolist()
        prev, self._prev = getattr(self, "_prev", None), emb.clone()
        drift = None if prev is None else torch.nn.functional.cosine_similarity(emb, prev, dim=-1).tolist()
        alive = view.alive.tolist()
        vecs = emb.cpu().tolist() if self.include_vectors else None
        for i, a in enumerate(alive):
            if a:
                data = {"step": int(view.step), "sequence": i, "norm": norms[i],
                        "cosine_to_previous": None if drift is None else drift[i]}
                if vecs is not None:
                    data["embedding"] = vecs[i]
                self.emit(data)
                self.sent += 1
        return None


class KVStepEvents(RunnableSerializable[Any, AIMessage]):
    """The chat model, plus ``kv_step`` custom events while it decodes (for observers: probes, dashboards).

    Each event's data: ``step``, ``sequence``, ``norm``, ``cosine_to_previous`` (how far the representation moved
    since the last event) and (``include_vectors``) ``embedding``: the pooled KV embedding of the sequence so far (``pooling``; default segment ``all``: prompt and generated tokens). Events go
    through ``dispatch_custom_event`` (callbacks' ``on_custom_event``) and show in ``astream_events`` as
    ``on_custom_event`` with name ``kv_step``. Rate limit: every ``every`` tokens and ``min_interval_s`` seconds.

    Example:
        .. code-block:: python

            chain = KVStepEvents(llm=ChatKV(model="smollm2-135m", max_tokens=64), every=8)
            async for ev in chain.astream_events("Hello", version="v2"):
                if ev["event"] == "on_custom_event":
                    print(ev["name"], ev["data"]["step"], ev["data"]["norm"])
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    llm: ChatKV
    every: int = Field(8, ge=1)
    min_interval_s: float = Field(0.0, ge=0.0)
    pooling: KVPooling = Field(default_factory=lambda: KVPooling(segment="all"))
    include_vectors: bool = True
    event_name: str = "kv_step"

    def _emitter(self, emit) -> _KVEventEmitter:
        return _KVEventEmitter(emit, self.every, self.min_interval_s, self.pooling, self.include_vectors)

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        def run(inp, config: RunnableConfig):
            emitter = self._emitter(lambda d: dispatch_custom_event(self.event_name, d, config=config))
            return self.llm.invoke(inp, config=config, components=[emitter], **kwargs)

        return self._call_with_config(run, input, config)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        async def run(inp, config: RunnableConfig):
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            emitter = self._emitter(lambda d: loop.call_soon_threadsafe(queue.put_nowait, d))
            task = asyncio.ensure_future(self.llm.ainvoke(inp, config=config, components=[emitter], **kwargs))
            while not (task.done() and queue.empty()):
                try:
                    data = await asyncio.wait_for(queue.get(), timeout=0.05)
                except asyncio.TimeoutError:
                    continue
                await adispatch_custom_event(self.event_name, data, config=config)
            return task.result()

        return await self._acall_with_config(run, input, ensure_config(config))


def budgeted_reasoning(llm: ChatKV, *, thinking: str = "slow", reasoning_effort: str | None = "low",
                       max_thinking_tokens: int | None = None):
    """``llm`` with reasoning on and its controls as configurable fields: ``thinking`` (``slow`` / ``fast`` /
    ``auto`` / ``off``), ``reasoning_effort`` (``low`` / ``medium`` / ``high``), ``max_thinking_tokens`` and
    ``kv_classifier`` (the saved classifier that decides and switches fast / slow with ``thinking="auto"``).

    Example:
        .. code-block:: python

            r = budgeted_reasoning(ChatKV(model="smollm2-135m", temperature=0))
            r.invoke("What is 17 * 3?", config={"configurable": {"reasoning_effort": "high"}})
            r.invoke("Hi", config={"configurable": {"thinking": "fast"}})
    """
    base = llm.model_copy(update={"thinking": thinking, "reasoning_effort": reasoning_effort,
                                  "max_thinking_tokens": max_thinking_tokens})
    return base.configurable_fields(
        thinking=ConfigurableField(id="thinking", name="Thinking mode", description="slow, fast, auto or off"),
        reasoning_effort=ConfigurableField(id="reasoning_effort", name="Reasoning effort",
                                           description="low, medium or high thinking budget"),
        max_thinking_tokens=ConfigurableField(id="max_thinking_tokens", name="Thinking budget",
                                              description="hard budget of thinking tokens (overrides effort)"),
        kv_classifier=ConfigurableField(id="kv_classifier", name="KV classifier",
                                        description="saved KVClassifier folder deciding fast/slow (thinking='auto')"),
    )
