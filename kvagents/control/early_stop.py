"""Early stop of weak samples, DeepConf-style (Fu et al. 2025, "Deep Think with Confidence", online mode).

:class:`EarlyStopWeak` is a :class:`~kvagents.signals.scoring.ProbabilityScores` (same state, same outputs) that also
stops samples whose confidence falls behind their siblings':

* every ``check_every`` steps, once ``warmup`` tokens were generated, a running sample with at least ``warmup``
  tokens is stopped when its *current group confidence* (mean token confidence of its last ``window`` tokens;
  of all its tokens while fewer exist) is below the ``percentile``-th percentile (linear interpolation) of the
  *lowest group confidences* of the reference samples among its siblings (the *other* samples of the same
  prompt). This is DeepConf's online rule (a trace stops when its current window falls below a percentile of
  the warm-up traces' lowest windows), with siblings as the warm-up traces. ``references``:

  - ``"finished"`` (default, DeepConf's reading): siblings that finished on their own (EOS, stop string, length
    or another component; not stopped by this one). Their minima are over complete answers, so nothing stops
    until ``min_refs`` siblings are done; what is stopped is the long tail, which also lets the batch finish
    sooner.
  - ``"running"``: also running siblings with ``warmup`` tokens or more (all of the same length, so their
    running minima are comparable). Stops sooner and more: minima over a prefix are higher than over a whole
    answer (on ``qwen2.5-coder-0.5b`` GSM8K at ``percentile=10``, n = 4, half the samples were stopped).

  Early-stopped samples are never references (their minimum froze at a shorter length). Comparing a sample's
  current window with the others' minima, not its own minimum with theirs: the like-with-like rule stops the
  weakest sample at every check whenever ``percentile > 0``. At least ``min_refs`` references are needed, and
  at least ``min_keep`` samples of each prompt are never stopped (the weakest candidates go first). Both
  scores live on the device (:meth:`EarlyStopWeak.scores`, from ``ProbabilityScores``' state);
* the threshold and the comparison are computed on the device; the host reads the stop decision once per check
  (one synchronisation every ``check_every`` steps, none in between) and returns
  :class:`~kvagents.engine.components.StopSequence` actions (finish reason ``reason``, default ``"weak"``).

Output per sample: the ``ProbabilityScores`` keys plus ``stopped_early`` (bool), ``tokens_at_stop`` (generated
tokens when stopped, else ``None``), ``stop_step``, ``stop_score`` (the current group confidence at the stop) and
``stop_threshold`` (both NaN when not stopped) and ``tokens_saved_est``: the mean length of the prompt's samples that were not stopped minus
``tokens_at_stop`` (at least 0; NaN when all were stopped; 0 when not stopped) — an estimate, since a stopped
sample's full length is unknown. :func:`early_stop_summary` adds these up over a result.

Example:
    >>> stopper = EarlyStopWeak(window=32, warmup=64, check_every=16, percentile=10)
    >>> # res = llm.generate(p, SamplingParams(n=8, temperature=0.7), components=[stopper])
    >>> # early_stop_summary(res)["tokens_saved_est"]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..engine.components import FinishView, PrefillView, StepView, StopSequence
from ..engine.results import GenerationResult
from ..signals.scoring import ProbabilityScores

__all__ = ["EarlyStopWeak", "early_stop_summary"]


@dataclass
class EarlyStopWeak(ProbabilityScores):
    """Stop samples whose current window confidence falls below a percentile of their siblings' lowest window
    confidences (see the module docstring). Direction: higher confidence = stronger sample.

    Example:
        >>> EarlyStopWeak(warmup=64, check_every=16, percentile=10).name
        'early_stop'
    """

    warmup: int = 32
    check_every: int = 8
    percentile: float = 10.0
    references: Literal["finished", "running"] = "finished"
    min_refs: int = 2
    min_keep: int = 1
    reason: str = "weak"
    name: str = "early_stop"
    _n: int = field(default=1, init=False, repr=False)
    _stopped: torch.Tensor | None = field(default=None, init=False, repr=False)
    _info: dict[int, tuple[int, float, float]] = field(default_factory=dict, init=False, repr=False)
    checks: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 token, got {self.warmup}")
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1 step, got {self.check_every}")
        if not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {self.percentile}")
        if self.references not in ("finished", "running"):
            raise ValueError(f"references must be 'finished' or 'running', got {self.references!r}")
        if self.min_refs < 1:
            raise ValueError(f"min_refs must be >= 1, got {self.min_refs}")
        if self.min_keep < 1:
            raise ValueError(f"min_keep must be >= 1, got {self.min_keep}")

    def on_prefill(self, view: PrefillView) -> None:
        super().on_prefill(view)
        self._n = view.n
        self._stopped = torch.zeros(view.input_ids.shape[0] * view.n, dtype=torch.bool, device=view.input_ids.device)
        self._info = {}
        self.checks = 0

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(current, lowest)``, each ``[B]`` on the device: the current group confidence (mean confidence of
        the last ``window`` tokens, of all tokens while fewer exist) and the running lowest group confidence
        (its minimum so far; the mean confidence while fewer than ``window`` tokens exist). NaN before the first
        token. Override to stop on other scores (higher = stronger)."""
        nan = torch.full_like(self._lowest, float("nan"))
        has = self._count > 0
        current = self._ring.sum(-1) / self._count.clamp(min=1, max=self.window)
        mean_conf = self._sums[:, -1] / self._count.clamp(min=1)
        lowest = torch.where(self._count >= self.window, self._lowest, mean_conf)
        return torch.where(has, current, nan), torch.where(has, lowest, nan)

    def thresholds(self, ref_score: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence threshold ``[B]``: the ``percentile``-th percentile of ``ref_score`` over the *other*
        sequences of the same prompt where ``ref`` holds (NaN with none), and the number of them ``[B]``."""
        n = self._n
        s, r = ref_score.float().view(-1, n), ref.view(-1, n)
        others = r[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=s.device)  # [P, n, n]
        vals = torch.where(others, s[:, None, :].expand(-1, n, -1), torch.full_like(s[:, None, :], float("nan")))
        thr = torch.nanquantile(vals, self.percentile / 100.0, dim=-1)  # NaN where no reference
        return thr.flatten(), others.sum(-1).flatten()

    def on_step(self, view: StepView) -> list[StopSequence] | None:
        super().on_step(view)
        steps = view.step + 1
        if self._n < 2 or steps < self.warmup or steps % self.check_every:
            return None
        self.checks += 1
        current, lowest = self.scores()
        running = view.alive & ~view.finished
        ref = view.finished & ~self._stopped & (self._count > 0)
        if self.references == "running":
            ref = ref | (running & (self._count >= self.warmup))
        thr, n_refs = self.thresholds(lowest, ref)
        cand = running & ~self._stopped & (self._count >= self.warmup)
        stop = cand & (n_refs >= self.min_refs) & (current < thr)
        idx = stop.nonzero().flatten().tolist()  # the one host synchronisation of this check
        if not idx:
            return None
        host = torch.stack([current[idx].float(), thr[idx]], dim=-1).tolist()
        kept = {}  # prompt -> samples not stopped so far
        stopped_host = self._stopped.view(-1, self._n).sum(-1).tolist()
        actions = []
        for i, (s, t) in sorted(zip(idx, host), key=lambda x: x[1][0]):  # weakest first
            p = i // self._n
            left = kept.setdefault(p, self._n - stopped_host[p])
            if left - 1 < self.min_keep:
                continue
            kept[p] = left - 1
            self._info[i] = (view.step, s, t)
            actions.append(StopSequence(i, reason=self.reason))
        if actions:
            self._stopped[[a.index for a in actions]] = True
        return actions or None

    def on_finish(self, view: FinishView) -> list[dict[str, Any]]:
        out = super().on_finish(view)
        lengths = [len(t) for t in view.token_ids]
        n = self._n
        for i, d in enumerate(out):
            info = self._info.get(i)
            d["stopped_early"] = info is not None
            d["tokens_at_stop"] = lengths[i] if info is not None else None
            d["stop_step"] = info[0] if info is not None else None
            d["stop_score"] = info[1] if info is not None else float("nan")
            d["stop_threshold"] = info[2] if info is not None else float("nan")
            if info is None:
                d["tokens_saved_est"] = 0.0
                continue
            p = i // n
            full = [lengths[j] for j in range(p * n, p * n + n) if j not in self._info]
            d["tokens_saved_est"] = max(0.0, sum(full) / len(full) - lengths[i]) if full else float("nan")
        return out


def early_stop_summary(result: GenerationResult, name: str = "early_stop") -> dict[str, float]:
    """Totals over a generation: ``samples``, ``stopped``, ``generated_tokens`` and ``tokens_saved_est`` (the
    sum of the per-sample estimates, NaN ones left out) and ``saved_fraction`` = saved / (generated + saved)."""
    samples = result.flat
    outs = [s.outputs.get(name) for s in samples]
    if any(o is None for o in outs):
        raise ValueError(f"no output {name!r} in this result: was EarlyStopWeak(name={name!r}) a component?")
    saved = sum(o["tokens_saved_est"] for o in outs if not math.isnan(o["tokens_saved_est"]))
    gen = sum(s.generated_tokens for s in samples)
    return {
        "samples": len(samples),
        "stopped": sum(bool(o["stopped_early"]) for o in outs),
        "generated_tokens": gen,
        "tokens_saved_est": saved,
        "saved_fraction": saved / (gen + saved) if gen + saved > 0 else 0.0,
    }
