"""Adaptive best-of-N: sample in waves and stop once the vote is decided (or confident enough).

Fixed best-of-N samples ``n`` answers and votes. Most prompts are settled long before ``n``: once one answer leads
by more than the remaining samples could ever add to another, sampling further cannot change the winner. Adaptive
best-of-N samples ``wave`` answers at a time, checks the vote after each wave and stops early.

* :class:`AdaptiveConfig`: ``wave`` (samples per wave), ``max_n`` (the most samples), ``stop_rule``,
  ``confidence``, ``max_weight``. :class:`~kvagents.control.selection.BestOfN` takes it as ``adaptive=``.
* :func:`check_stop`: the decision at one point, from the votes so far and the number of samples still possible.
* :func:`adaptive_stop`: where an adaptive run stops on an ordered list of recorded samples, in pure Python, so an
  evaluation can simulate adaptive best-of-N offline on samples it already has.
* :func:`wave_sizes`, :func:`wave_seed`: the waves' sizes and seeds, as :class:`BestOfN` uses them.
* :func:`sample_in_waves`: the wave loop itself, over any ``sample_wave(active_prompts, n, seed)`` callable
  (:class:`BestOfN` and the LangChain ``ChatKV(adaptive=...)`` both run it).
* :class:`SamplingUsage`: what one prompt cost (samples, waves, tokens) and why sampling stopped.

Votes. Sample ``i`` votes for ``answers[i]`` with weight ``weights[i]``; a ``None`` answer (nothing parsed, or a
sample stopped early) does not vote. Majority vote: every weight is 1. A score-weighted vote needs a weight that
does not depend on the other samples and is bounded, ``0 <= w <= max_weight``: a calibrated probability in
``[0, 1]`` (``mean_max_prob``, a KV probe's ``kv_probe``) with ``weighting="score"`` in
:func:`~kvagents.control.selection.select`. (``"minmax"`` and ``"softmax"`` weights are normalised over all the
samples, so a later sample changes the earlier weights and no stop can be exact.)

Stop rules, checked after each wave (``L``: the leading answer's tally, ``R``: the runner-up's, 0 when there is
none, ``r``: samples still possible before ``max_n``):

* ``"decided"`` (exact): stop when ``L > R + r * max_weight``. Then every continuation up to ``max_n`` ends with
  the same winning answer as the fixed ``max_n`` run, tie-breaks included (the leader stays strictly ahead). The
  chosen *sample* within that answer may differ (a later sample of the same answer could score better).
* ``"beta"`` (probabilistic, Adaptive-Consistency, Aggarwal et al. 2023): stop when decided, or when the leader
  is strictly ahead and ``P(p_L > p_R) >= confidence`` under a uniform prior, i.e. ``P(X > 1/2)`` for
  ``X ~ Beta(L / max_weight + 1, R / max_weight + 1)`` (tallies in units of ``max_weight``).

Any rule stops at ``max_n`` (reason ``"max_n"``, whether the vote is then won or tied).

Example:
    >>> adaptive_stop(["7", "7", "7", "7", "9", "9"], wave=2, max_n=6)  # after 4: 4 > 0 + 2 * 1
    4
    >>> adaptive_stop(["7", "9", "7", "7", "7", "7"], wave=2, max_n=6)  # after 4: 3 > 1 + 2 is false; then max_n
    6
    >>> AdaptiveConfig(wave=2, max_n=8, stop_rule="beta", confidence=0.9).stop_after(["a"] * 8)
    4
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "STOP_RULES",
    "AdaptiveConfig",
    "SamplingUsage",
    "StopCheck",
    "adaptive_stop",
    "beta_win_probability",
    "check_stop",
    "sample_in_waves",
    "wave_seed",
    "wave_sizes",
]

STOP_RULES = ("decided", "beta")
StopRule = Literal["decided", "beta"]


def _check_wave(wave) -> int:
    if isinstance(wave, bool) or not isinstance(wave, int) or wave < 1:
        raise ValueError(f"wave (samples per wave) must be an integer >= 1, got {wave!r}")
    return wave


def _check_max_n(max_n, wave: int) -> int:
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"max_n (the most samples per prompt) must be an integer >= 1, got {max_n!r}")
    if max_n < wave:
        raise ValueError(
            f"max_n={max_n} is smaller than wave={wave}: max_n caps the samples, so make it >= wave (or lower wave)"
        )
    return max_n


def _check_confidence(confidence) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be a probability strictly between 0 and 1 (e.g. 0.95), got {confidence!r}")
    return float(confidence)


def _check_max_weight(max_weight) -> float:
    if (
        isinstance(max_weight, bool)
        or not isinstance(max_weight, (int, float))
        or not (max_weight > 0 and math.isfinite(max_weight))
    ):
        raise ValueError(
            f"max_weight (the largest vote weight of one sample) must be a finite number > 0, got {max_weight!r}"
        )
    return float(max_weight)


def _check_rule(rule) -> str:
    if rule not in STOP_RULES:
        raise ValueError(f"unknown stop rule {rule!r}; use one of {', '.join(repr(r) for r in STOP_RULES)}")
    return rule


class AdaptiveConfig(BaseModel):
    """Adaptive best-of-N: ``wave`` samples at a time, at most ``max_n``, stopping by ``stop_rule``.

    ``max_n=None`` takes the caller's ``n`` (``BestOfN(n=8, adaptive=AdaptiveConfig(wave=2))`` samples at most 8).
    ``confidence`` is used by ``stop_rule="beta"`` only; ``max_weight`` bounds one sample's vote weight (1 for a
    majority vote or a probability-weighted vote). See the module docstring for the rules.

    Example:
        >>> cfg = AdaptiveConfig(wave=2, max_n=8)
        >>> cfg.stop_after(["4", "4", "4", "5", "4", "4", "4", "4"])  # after 6: 5 > 1 + 2
        6
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    wave: int = Field(2, description="Samples per wave (>= 1); the vote is checked after each wave.")
    max_n: int | None = Field(None, description="The most samples per prompt (>= wave); None: the caller's n.")
    stop_rule: StopRule = Field("decided", description="'decided' (exact) or 'beta' (posterior >= confidence).")
    confidence: float = Field(
        0.95, description="For stop_rule='beta': the posterior probability to stop at, in (0, 1)."
    )
    max_weight: float = Field(1.0, description="Upper bound of one sample's vote weight (> 0); 1 for majority votes.")

    @field_validator("wave", mode="before")
    @classmethod
    def _v_wave(cls, v):
        return _check_wave(v)

    @field_validator("stop_rule", mode="before")
    @classmethod
    def _v_rule(cls, v):
        return _check_rule(v)

    @field_validator("confidence", mode="before")
    @classmethod
    def _v_confidence(cls, v):
        return _check_confidence(v)

    @field_validator("max_weight", mode="before")
    @classmethod
    def _v_max_weight(cls, v):
        return _check_max_weight(v)

    @model_validator(mode="after")
    def _v_max_n(self) -> AdaptiveConfig:
        if self.max_n is not None:
            _check_max_n(self.max_n, self.wave)
        return self

    def resolve(self, n: int | None) -> AdaptiveConfig:
        """This config with ``max_n`` filled in from the caller's ``n`` (refusing a conflict)."""
        if self.max_n is None:
            if n is None:
                raise ValueError("AdaptiveConfig(max_n=None) takes the caller's n, and none was given: set max_n")
            _check_max_n(n, self.wave)
            return self.model_copy(update={"max_n": n})
        if n is not None and n != self.max_n:
            raise ValueError(f"n={n} conflicts with AdaptiveConfig(max_n={self.max_n}): give one of them (or the same)")
        return self

    def stop_after(self, answers: Sequence[Hashable | None], weights: Sequence[float] | None = None) -> int:
        """:func:`adaptive_stop` with this config (``max_n=None``: all of ``answers``)."""
        return adaptive_stop(
            answers,
            weights,
            self.wave,
            self.max_n,
            self.stop_rule,
            confidence=self.confidence,
            max_weight=self.max_weight,
        )


# ----------------------------------------------------------------------------------------------------------------
# Waves


def wave_sizes(wave: int, max_n: int) -> list[int]:
    """Samples drawn by each wave: ``wave`` each, the last one cut to reach ``max_n`` exactly.

    Example:
        >>> wave_sizes(3, 8)
        [3, 3, 2]
    """
    wave, max_n = _check_wave(wave), _check_max_n(max_n, _check_wave(wave))
    return [min(wave, max_n - k) for k in range(0, max_n, wave)]


def wave_seed(seed: int | None, k: int) -> int | None:
    """The sampling seed of wave ``k`` (0-based) of a run seeded ``seed``: wave 0 uses ``seed`` itself (so a single
    wave is the fixed-n run with that seed, sample by sample), wave ``k > 0`` a 32-bit hash of ``(seed, k)``.
    ``None`` stays ``None`` (every wave draws a fresh random seed).

    Example:
        >>> wave_seed(7, 0), wave_seed(7, 1) == wave_seed(7, 1), wave_seed(7, 1) != wave_seed(7, 2)
        (7, True, True)
    """
    if seed is None:
        return None
    if k == 0:
        return seed
    digest = hashlib.blake2b(f"kvagents-wave:{seed}:{k}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


# ----------------------------------------------------------------------------------------------------------------
# Stop rules


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _regularized_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b)``, the Beta(a, b) distribution function at ``x``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def beta_win_probability(leader: float, runner_up: float) -> float:
    """``P(X > 1/2)`` for ``X ~ Beta(leader + 1, runner_up + 1)``: the posterior probability (uniform prior) that the
    leading answer is the more likely of the two, given ``leader`` and ``runner_up`` votes (real numbers >= 0).

    Example:
        >>> round(beta_win_probability(1, 0), 6), round(beta_win_probability(4, 0), 6)
        (0.75, 0.96875)
    """
    if not (leader >= 0 and runner_up >= 0 and math.isfinite(leader) and math.isfinite(runner_up)):
        raise ValueError(f"vote tallies must be finite and >= 0, got {leader!r} and {runner_up!r}")
    return min(1.0, max(0.0, _regularized_beta(0.5, runner_up + 1.0, leader + 1.0)))


@dataclass(frozen=True)
class StopCheck:
    """The stop decision at one point: ``stop``, ``reason`` (``"decided"``, ``"confident"``, ``"max_n"``: no
    sample left, or ``None``), the leading answer, the vote tallies (answer -> weight, in first-occurrence order), the margin
    ``L - R`` and, for the beta rule, the posterior ``P(p_L > p_R)``."""

    stop: bool
    reason: str | None
    leader: Hashable | None
    tallies: dict = field(default_factory=dict)
    margin: float = 0.0
    posterior: float | None = None


def _tally(answers: Sequence[Hashable | None], weights: Sequence[float] | None, max_weight: float) -> dict:
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"got {len(answers)} answers and {len(weights)} weights: give one weight per answer")
    tallies: dict = {}
    for i, a in enumerate(answers):
        w = 1.0 if weights is None else weights[i]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (0.0 <= w <= max_weight):
            raise ValueError(
                f"weight {w!r} of sample {i} is outside [0, max_weight={max_weight}]: a sample's vote weight must be "
                f"bounded for the stop rule to hold (a probability in [0, 1]; give 0 for a sample that must not "
                f"vote, or raise max_weight)"
            )
        if a is not None:
            tallies[a] = tallies.get(a, 0.0) + float(w)
    return tallies


def check_stop(
    answers: Sequence[Hashable | None],
    weights: Sequence[float] | None,
    remaining: int,
    rule: StopRule = "decided",
    *,
    confidence: float = 0.95,
    max_weight: float = 1.0,
) -> StopCheck:
    """Whether to stop after the samples ``answers`` (with ``weights``; ``None``: all 1) when ``remaining`` more
    could still be drawn (0: ``max_n`` is reached, always a stop). See the module docstring for the rules.

    Example:
        >>> c = check_stop(["a", "b", "a", None], None, remaining=1)
        >>> c.stop, c.leader, c.tallies  # 2 > 1 + 1 is false
        (False, 'a', {'a': 2.0, 'b': 1.0})
        >>> check_stop(["a", "a", "a", "b"], None, remaining=1).reason
        'decided'
    """
    _check_rule(rule)
    confidence, max_weight = _check_confidence(confidence), _check_max_weight(max_weight)
    if isinstance(remaining, bool) or not isinstance(remaining, int) or remaining < 0:
        raise ValueError(f"remaining (samples still possible) must be an integer >= 0, got {remaining!r}")
    tallies = _tally(answers, weights, max_weight)
    ranked = sorted(tallies.values(), reverse=True)
    lead = ranked[0] if ranked else 0.0
    second = ranked[1] if len(ranked) > 1 else 0.0
    leader = next((a for a, v in tallies.items() if v == lead), None)
    margin = lead - second
    posterior = None
    if rule == "beta":
        posterior = beta_win_probability(lead / max_weight, second / max_weight)
    if remaining == 0:
        reason = "max_n"
    elif lead > second + remaining * max_weight:
        reason = "decided"
    elif rule == "beta" and lead > second and posterior >= confidence:
        reason = "confident"
    else:
        reason = None
    return StopCheck(reason is not None, reason, leader, tallies, margin, posterior)


def adaptive_stop(
    answers: Sequence[Hashable | None],
    weights: Sequence[float] | None = None,
    wave: int = 1,
    max_n: int | None = None,
    rule: StopRule = "decided",
    *,
    confidence: float = 0.95,
    max_weight: float = 1.0,
) -> int:
    """How many of the recorded samples an adaptive run would use: the vote over ``answers[:m]`` is checked at
    ``m = wave, 2 * wave, ...`` (the last wave cut at ``max_n``) and the first ``m`` where :func:`check_stop` says
    stop (``remaining = max_n - m``) is returned; ``max_n`` if none does.

    Args:
        answers: the samples' answers in sampling order; ``None``: no vote (nothing parsed, stopped early).
        weights: one vote weight per sample in ``[0, max_weight]``; ``None``: majority vote (all 1).
        wave: samples per wave (>= 1).
        max_n: the most samples (``>= wave``); ``None``: ``len(answers)``. Fewer recorded samples than ``max_n``
            are fine as long as the run stops before it needs more (else ``ValueError``).
        rule: ``"decided"`` or ``"beta"``; ``confidence``, ``max_weight``: as in :class:`AdaptiveConfig`.

    Example:
        >>> adaptive_stop(["a", "b", "a", "a"], [0.9, 0.2, 0.8, 0.1], wave=1, max_n=4)  # 1.7 > 0.2 + 1 after 3
        3
    """
    wave = _check_wave(wave)
    max_n = len(answers) if max_n is None else max_n
    max_n = _check_max_n(max_n, wave)
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"got {len(answers)} answers and {len(weights)} weights: give one weight per answer")
    m = 0
    for size in wave_sizes(wave, max_n):
        m += size
        if m > len(answers):
            raise ValueError(
                f"the run needs {m} samples and got {len(answers)} recorded ones (max_n={max_n}): record "
                f"at least max_n samples per prompt or lower max_n"
            )
        check = check_stop(
            answers[:m],
            None if weights is None else weights[:m],
            max_n - m,
            rule,
            confidence=confidence,
            max_weight=max_weight,
        )
        if check.stop:
            return m
    return max_n  # unreachable: remaining == 0 always stops


def sample_in_waves(
    sample_wave: Callable[[list[int], int, int | None], Sequence[Sequence[Any]]],
    prompts: int,
    config: AdaptiveConfig,
    seed: int | None,
    vote: Callable[[int, list[Any]], tuple[Sequence[Hashable | None], Sequence[float] | None]],
) -> tuple[list[list[Any]], list[SamplingUsage]]:
    """The wave loop: ``sample_wave(active, n, seed)`` samples ``n`` answers for each prompt index in ``active``
    (one engine call; it returns one list of :class:`~kvagents.engine.results.SampleResult` per active prompt);
    after each wave ``vote(i, samples_of_i)`` gives prompt ``i``'s answers and weights so far, and a prompt whose
    :func:`check_stop` says stop leaves the next waves. Wave ``k`` has ``n = wave_sizes(...)[k]`` and
    ``seed = wave_seed(seed, k)``. Returns every prompt's samples (renumbered ``sample_index`` 0, 1, ... in
    sampling order, ``prompt_index`` = its index) and its :class:`SamplingUsage`.

    Example:
        >>> from kvagents.engine.results import SampleResult
        >>> def wave(active, n, seed):
        ...     return [[SampleResult(i, j, "x", [5], "eos", 3, 1, 0) for j in range(n)] for i in active]
        >>> samples, usage = sample_in_waves(wave, 1, AdaptiveConfig(wave=2, max_n=8), 0,
        ...                                  lambda i, ss: ([s.text for s in ss], None))
        >>> len(samples[0]), usage[0].waves, usage[0].stopped_by, usage[0].prompt_tokens
        (6, 3, 'decided', 9)
    """
    if config.max_n is None:
        raise ValueError("sample_in_waves needs AdaptiveConfig.max_n: resolve it first (config.resolve(n))")
    samples: list[list[Any]] = [[] for _ in range(prompts)]
    waves, prompt_tokens = [0] * prompts, [0] * prompts
    checks: list[StopCheck | None] = [None] * prompts
    active = list(range(prompts))
    for k, size in enumerate(wave_sizes(config.wave, config.max_n)):
        if not active:
            break
        rows = sample_wave(list(active), size, wave_seed(seed, k))
        if len(rows) != len(active):
            raise ValueError(f"sample_wave returned {len(rows)} rows for {len(active)} prompts")
        still = []
        for i, row in zip(active, rows):
            off = len(samples[i])
            samples[i].extend(replace(s, prompt_index=i, sample_index=off + j) for j, s in enumerate(row))
            waves[i] += 1
            prompt_tokens[i] += row[0].prompt_tokens if row else 0
            answers, weights = vote(i, samples[i])
            checks[i] = check_stop(
                answers,
                weights,
                config.max_n - len(samples[i]),
                config.stop_rule,
                confidence=config.confidence,
                max_weight=config.max_weight,
            )
            if not checks[i].stop:
                still.append(i)
        active = still
    usage = [
        SamplingUsage(
            samples=len(samples[i]),
            waves=waves[i],
            generated_tokens=sum(s.generated_tokens for s in samples[i]),
            prompt_tokens=prompt_tokens[i],
            max_n=config.max_n,
            stopped_by=checks[i].reason,
            posterior=checks[i].posterior,
        )
        for i in range(prompts)
    ]
    return samples, usage


@dataclass
class SamplingUsage:
    """What best-of-N cost for one prompt and why it stopped.

    ``samples``: answers drawn; ``waves``: ``generate`` calls that sampled this prompt (1 for a fixed-n run);
    ``generated_tokens``: tokens generated over its samples; ``prompt_tokens``: prompt tokens prefilled for it over
    all waves (every wave prefills the prompt again: prompt length x ``waves``); ``max_n``: the most samples it could
    have drawn; ``stopped_by``: ``"decided"``, ``"confident"``, ``"max_n"`` or ``"fixed"`` (a fixed-n run);
    ``posterior``: the beta rule's ``P(p_L > p_R)`` at the stop.
    """

    samples: int
    waves: int
    generated_tokens: int
    prompt_tokens: int
    max_n: int
    stopped_by: str
    posterior: float | None = None

    @property
    def reprefilled_tokens(self) -> int:
        """Prompt tokens prefilled more than once (all waves after the first)."""
        return self.prompt_tokens - self.prompt_tokens // max(self.waves, 1)
