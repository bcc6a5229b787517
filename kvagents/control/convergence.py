"""Answer-convergence early exit: stop thinking once look-ahead trial answers agree.

:class:`ConvergenceController` is a :class:`~kvagents.control.thinking.ReasoningController` (same formats, budget,
counts and outputs) that also, every ``every`` thinking tokens of a sequence, asks the engine for a look-ahead
(:class:`~kvagents.engine.components.LookAhead`): a fork of the running sequence's cache (the prefix is shared,
never re-processed) on which the format's end-of-thinking marker and the answer cue are forced and
``answer_tokens`` tokens are decoded greedily; then the fork is dropped. The trial answer is the task parser's
reading (:mod:`kvagents.control.answers`) of the forced text plus the decoded tokens; its confidence is their mean
probability (or mean log-probability). When the trial answer has been the same (and not ``None``) for ``patience``
consecutive look-aheads, and the last one clears ``min_confidence`` and the optional probe's ``probe_threshold``,
the main sequence stops thinking: the same marker and cue are forced on it, as the controller's budget switch
does, and it answers (at most ``max_answer_tokens``).

The probe hook: ``probe(features) -> probability that the answer will not change``, called on the look-ahead's
own K/V: the fork's rows of the fed look-ahead tokens, of the ``probe_layers`` layers, averaged over those tokens
and flattened (``[nL * parts * H * d]``, float32; parts = K and V).

Look-ahead tokens (forced + decoded) are tokens the sample cost: the engine reports them per sample in
``SampleResult.outputs["lookahead_tokens"]`` and ``outputs["total_tokens"]`` (generated + look-ahead); this
component's record has its own ``lookahead_tokens`` too.

Runs on both engines: the eager one (:class:`~kvagents.engine.decode.DecodeEngine`) and the fast path, which runs
the forks eagerly between two graph replays (not on sliding-window models). The scheduler (``KVModel.submit``)
refuses it for now.

Example:
    >>> cfg = ConvergenceConfig(every=32, patience=2, answer_tokens=6)
    >>> cfg.patience
    2
    >>> try:
    ...     ConvergenceConfig(every=0)
    ... except ValueError as e:
    ...     print("every must be >= 1 thinking token, got 0" in str(e))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..engine.components import FinishView, ForceTokens, LookAhead, LookAheadResult, PrefillView, StepView
from ..engine.results import GenerationResult
from ..signals.pooling import KVPooling
from .answers import get_parser
from .thinking import ANSWER, THINK, ControllerConfig, ReasoningController, ThinkingFormat, encode_text

__all__ = ["ConvergenceConfig", "ConvergenceController", "convergence_summary", "lookahead_text"]

#: ``probe(features [D] float32) -> probability in [0, 1]`` that the trial answer will not change.
StabilityProbe = Callable[[torch.Tensor], "float | torch.Tensor"]


class ConvergenceConfig(BaseModel):
    """Knobs of the look-ahead early exit.

    Example:
        >>> ConvergenceConfig(min_confidence=0.6).confidence
        'prob'
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    every: int = Field(32, description="Look ahead every k sampled thinking tokens of a sequence.")
    patience: int = Field(2, description="Stop thinking when this many consecutive trial answers are equal.")
    answer_tokens: int = Field(8, description="Greedy tokens decoded on each look-ahead after the forced cue.")
    min_confidence: float | None = Field(None, description="Also require the last look-ahead's confidence >= this.")
    confidence: Literal["prob", "logprob"] = Field("prob", description="Confidence: mean max-probability of the "
                                                   "decoded tokens, or their mean log-probability.")
    probe_threshold: float | None = Field(None, description="With a probe: also require its probability >= this.")
    probe_layers: int | list[int] = Field(4, description="Layers whose look-ahead K/V feed the probe (int: the "
                                          "last n attention layers; list: indices, negative from the end).")
    forced_text: str | None = Field(None, description="Text forced on the look-ahead and, on exit, on the main "
                                    "sequence ({answer_cue} allowed). Default: the format's end_thinking, plus the "
                                    "answer cue when end_thinking does not hold {answer_cue}.")

    @field_validator("every")
    @classmethod
    def _every(cls, v):
        if v < 1:
            raise ValueError(f"every must be >= 1 thinking token, got {v}")
        return v

    @field_validator("patience")
    @classmethod
    def _patience(cls, v):
        if v < 1:
            raise ValueError(f"patience must be >= 1 look-ahead, got {v}")
        return v

    @field_validator("answer_tokens")
    @classmethod
    def _answer_tokens(cls, v):
        if v < 1:
            raise ValueError(f"answer_tokens must be >= 1, got {v}")
        return v

    @field_validator("probe_threshold")
    @classmethod
    def _probe_threshold(cls, v):
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"probe_threshold must be a probability in [0, 1], got {v}")
        return v

    @field_validator("min_confidence")
    @classmethod
    def _min_conf(cls, v):
        if v is not None and math.isnan(v):
            raise ValueError(f"min_confidence must be a number, got {v}")
        return v

    @field_validator("probe_layers")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"probe_layers must be >= 1 layers or a list of indices, got {v}")
        if isinstance(v, list) and not v:
            raise ValueError("probe_layers must name at least one layer, got []")
        return v

    @field_validator("forced_text")
    @classmethod
    def _forced(cls, v):
        if v is not None and not v:
            raise ValueError("forced_text must be a non-empty string (or None for the format's end of thinking)")
        return v

    @model_validator(mode="after")
    def _confidence_range(self):
        if self.min_confidence is not None and self.confidence == "prob" and not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1] with confidence='prob', got {self.min_confidence}")
        if self.min_confidence is not None and self.confidence == "logprob" and self.min_confidence > 0:
            raise ValueError(f"min_confidence must be <= 0 with confidence='logprob', got {self.min_confidence}")
        return self


def lookahead_text(fmt: ThinkingFormat, answer_cue: str | None = None, forced_text: str | None = None) -> str:
    """The text a look-ahead forces (and, on exit, the main sequence): ``forced_text`` or the format's
    ``end_thinking``, with the answer cue filled in, or appended when the template has no ``{answer_cue}``.

    Example:
        >>> from kvagents.control.thinking import PLAIN_FORMAT, QWEN3_FORMAT
        >>> lookahead_text(PLAIN_FORMAT, "Answer:")
        '\\n\\nTime is up, so I stop thinking here. Answer:'
        >>> lookahead_text(QWEN3_FORMAT, "Answer:").endswith("</think>\\n\\nAnswer:")
        True
    """
    cue = fmt.answer_cue if answer_cue is None else answer_cue
    template = forced_text if forced_text is not None else fmt.end_thinking
    if "{answer_cue}" not in template:
        template = template + "{answer_cue}"
    return template.replace("{answer_cue}", cue)


class ConvergenceController(ReasoningController):
    """Stop thinking once look-ahead trial answers converge (see the module docstring).

    ``parser``: a parser name of :mod:`kvagents.control.answers` (``"gsm8k"``, ``"math"``, ``"choice"``) or a
    callable ``text -> answer | None``; ``probe``: optional ``features -> probability`` (a KV probe's "the answer
    will not change"). Every other argument is :class:`ReasoningController`'s (format, budget, answer cues...).

    Output per sequence (``outputs[name]``, default ``"reasoning"``): the controller's record plus ``lookaheads``
    (``{"step", "answer", "confidence", "p_stable", "token_ids"}`` per look-ahead), ``lookahead_tokens``,
    ``converged`` (bool), ``converged_step`` and ``converged_answer``; an exit is a switch with reason
    ``"converged"``.

    Example:
        >>> ctl = ConvergenceController(PLAIN_FORMAT, tok, ConvergenceConfig(every=32, patience=2),  # doctest: +SKIP
        ...                             parser="gsm8k", max_thinking_tokens=512)
        >>> res = llm.generate(prompt, params, components=[ctl])  # doctest: +SKIP
        >>> res.samples[0][0].outputs["reasoning"]["converged"]  # doctest: +SKIP
        True
    """

    def __init__(self, fmt: ThinkingFormat | str, tokenizer, convergence: ConvergenceConfig | None = None,
                 config: ControllerConfig | None = None, *, parser: str | Callable[[str], str | None] = "gsm8k",
                 probe: StabilityProbe | None = None, answer_cue: str | None = None,
                 answer_cues: list[str] | None = None, **kwargs) -> None:
        super().__init__(fmt, tokenizer, config, answer_cue=answer_cue, answer_cues=answer_cues, **kwargs)
        if convergence is not None and not isinstance(convergence, ConvergenceConfig):
            raise TypeError(f"convergence must be a ConvergenceConfig, got {convergence!r}")
        self.convergence = convergence or ConvergenceConfig()
        if probe is not None and not callable(probe):
            raise TypeError(f"probe must be a callable features -> probability, got {probe!r}")
        if self.convergence.probe_threshold is not None and probe is None:
            raise ValueError("probe_threshold needs a probe (a callable features -> probability)")
        self.parser = get_parser(parser)
        self.probe = probe
        self._answer_cue = answer_cue
        self._forced_cache: dict[str, list[int]] = {}

    def _forced_for(self, prompt: int) -> list[int]:
        cue = self.answer_cues[prompt] if self.answer_cues is not None else self._answer_cue
        key = "" if cue is None else cue
        if key not in self._forced_cache:
            text = lookahead_text(self.fmt, cue, self.convergence.forced_text)
            self._forced_cache[key] = encode_text(self.tokenizer, text)
        return self._forced_cache[key]

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def on_prefill(self, view: PrefillView) -> list[ForceTokens]:
        actions = super().on_prefill(view)
        cc, n = self.convergence, view.n
        self._forced = [self._forced_for(i // n) for i in range(self.B)]
        self._kv_layers = None
        if self.probe is not None:
            self._kv_layers = tuple(KVPooling(layers=cc.probe_layers).resolve_layers(
                view.layers.attention_layers, view.layers.num_layers))
        self._next = [cc.every] * self.B  # thinking-token count of each sequence's next look-ahead
        self._la_at: set[int] = set()
        for i in range(self.B):
            if self.phase[i] == THINK:
                self._la_at.add(self.busy_until[i] + cc.every)  # the cue's last step, then k thinking tokens
        self.lookaheads: list[list[dict]] = [[] for _ in range(self.B)]
        self.la_tokens = [0] * self.B
        self._streak = [0] * self.B
        self.converged_step: list[int | None] = [None] * self.B
        return actions

    def host_check_at(self, t: int) -> bool:
        return super().host_check_at(t) or t in self._la_at

    def on_host_check(self, view: StepView):
        t = int(view.step)
        actions = list(super().on_host_check(view) or ())
        if t in self._la_at:
            self._la_at.discard(t)
            actions.extend(self._plan(t, view))
        return actions

    def _plan(self, t: int, view: StepView) -> list[LookAhead]:
        """Look-aheads for the sequences still thinking whose count reached their next multiple of ``every``; the
        next check is scheduled where each count will reach it (one host read)."""
        k = self.convergence.every
        host = torch.stack([self.think_n.float(), self.thinking.float(), view.finished.float()]).tolist()
        self.host_reads += 1
        out = []
        for i in range(self.B):
            if self.phase[i] != THINK or host[1][i] == 0 or host[2][i] > 0:
                continue
            th = int(host[0][i])
            if self.busy_until[i] > t:  # forced tokens are still queued: look after them
                self._la_at.add(self.busy_until[i] + max(1, self._next[i] - th))
                continue
            if th >= self._next[i]:
                out.append(LookAhead(i, self._forced[i], self.convergence.answer_tokens, kv_layers=self._kv_layers))
                self._next[i] = (th // k + 1) * k
            self._la_at.add(t + max(1, self._next[i] - th))
        return out

    def _switch(self, i: int, t: int, to: str, reason: str, score, actions: list, idx: list) -> None:
        super()._switch(i, t, to, reason, score, actions, idx)
        if to == "slow":  # thinking again: look ahead once it has thought k more
            self._la_at.add(self.busy_until[i] + 1)

    def on_lookahead(self, results: list[LookAheadResult]) -> list[ForceTokens]:
        cc = self.convergence
        actions: list = []
        end_idx: list[int] = []
        for r in results:
            i = r.index
            self.la_tokens[i] += r.tokens
            text = self.tokenizer.decode(r.forced_ids + r.token_ids, skip_special_tokens=True)
            answer = self.parser(text)
            conf = (sum(r.probs) if cc.confidence == "prob" else sum(r.logprobs)) / len(r.token_ids)
            p = None
            if self.probe is not None:
                feats = r.kv.float().mean(dim=-2).flatten()  # [nL, parts, H, S, d] -> mean over S -> [D]
                p = self._probability(self.probe(feats))
            self.lookaheads[i].append({"step": r.step, "answer": answer, "confidence": conf, "p_stable": p,
                                       "token_ids": list(r.token_ids)})
            prev = self.lookaheads[i][-2]["answer"] if len(self.lookaheads[i]) > 1 else None
            self._streak[i] = 0 if answer is None else (self._streak[i] + 1 if answer == prev else 1)
            if self.phase[i] != THINK or self._streak[i] < cc.patience:
                continue
            if cc.min_confidence is not None and not conf >= cc.min_confidence:
                continue
            if cc.probe_threshold is not None and not p >= cc.probe_threshold:
                continue
            self._converge(i, r.step, conf, actions, end_idx)
        if end_idx:
            self.thinking[torch.as_tensor(end_idx, device=self.thinking.device)] = False
        return actions

    @staticmethod
    def _probability(value) -> float:
        p = float(value.item() if isinstance(value, torch.Tensor) else value)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"the probe must return a probability in [0, 1], got {p}")
        return p

    def _converge(self, i: int, t: int, score: float, actions: list, idx: list) -> None:
        """Leave thinking as the controller's budget switch does, forcing the look-ahead's marker and cue."""
        cfg = self.config
        ids = self._forced[i]
        actions.append(ForceTokens(i, ids))
        idx.append(i)
        self.busy_until[i] = t + len(ids)
        self.switches[i].append({"step": t, "to": "fast", "reason": "converged", "score": score})
        self.phase[i] = ANSWER
        self.converged_step[i] = t
        self._stop(i, None if cfg.max_answer_tokens is None else t + len(ids) + cfg.max_answer_tokens)

    def on_finish(self, view: FinishView) -> list[dict]:
        out = super().on_finish(view)
        for i, rec in enumerate(out):
            step = self.converged_step[i]
            rec.update(lookaheads=self.lookaheads[i], lookahead_tokens=self.la_tokens[i], converged=step is not None,
                       converged_step=step,
                       converged_answer=self.lookaheads[i][-1]["answer"] if step is not None else None)
        return out


def convergence_summary(result: GenerationResult, name: str = "reasoning") -> dict[str, float]:
    """Totals over a generation run with a :class:`ConvergenceController` (output ``name``): ``samples``,
    ``converged``, ``generated_tokens``, ``lookahead_tokens``, ``total_tokens`` (generated + look-ahead: what the
    samples cost) and ``lookahead_fraction`` = look-ahead / total.

    Example:
        >>> convergence_summary(llm.generate(p, params, components=[ctl]))["total_tokens"]  # doctest: +SKIP
        1234
    """
    samples = result.flat
    outs = [s.outputs.get(name) for s in samples]
    if any(not isinstance(o, dict) or "lookahead_tokens" not in o for o in outs):
        raise ValueError(f"no look-ahead output {name!r} in this result: was ConvergenceController(name={name!r}) a "
                         "component?")
    gen = sum(s.generated_tokens for s in samples)
    la = sum(o["lookahead_tokens"] for o in outs)
    return {"samples": len(samples), "converged": sum(bool(o["converged"]) for o in outs), "generated_tokens": gen,
            "lookahead_tokens": la, "total_tokens": gen + la,
            "lookahead_fraction": la / (gen + la) if gen + la > 0 else 0.0}
