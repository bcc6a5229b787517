"""Choosing one of N sampled answers: argmax of a score, majority vote, score-weighted vote; ``BestOfN``.

The scorer is the pluggable part (like DSPy's ``BestOfN(reward_fn)``): any component whose per-sample output is
a ``dict`` of numbers (the ones in :mod:`kvagents.signals.scoring`, or your own) contributes scores by key.

* :func:`select`: one rule over a list of :class:`Candidate`; returns a :class:`SelectionResult` that says what
  was chosen and why (``note``), and whether a fallback was used.
* :func:`candidates_from_samples`: the candidates of one prompt's samples (answers parsed, scores collected).
* :class:`BestOfN`: one ``generate`` call (one prefill per prompt, ``n`` samples) with the scorers, then
  :func:`select` per prompt; with ``adaptive=AdaptiveConfig(...)`` it samples in waves and stops a prompt once its
  vote is decided (:mod:`kvagents.control.adaptive`).

Rules:

* ``"argmax"``: the candidate with the best score (``direction`` +1: highest; -1: lowest). Ties: first index.
* ``"majority"``: the most frequent parsed answer. Ties between answers: the answer whose best candidate scores
  best when a score is given, else the answer that occurs first. The chosen candidate is the winning answer's
  best-scoring one (with a score) or its first one.
* ``"weighted"``: each candidate votes for its answer with a weight from its score, normalised within the N
  candidates. ``weighting="minmax"`` (default): ``w = (s - min) / (max - min)`` of the direction-oriented score
  ``s`` (scale-free: the worst candidate gets 0, the best 1; all equal -> all 1). ``weighting="softmax"``:
  ``w = exp((s - max) / temperature)`` (depends on the score's scale). ``weighting="score"``: ``w = s``, the
  direction-oriented score itself, which must be >= 0 (a probability such as ``mean_max_prob`` or ``kv_probe``):
  the only weighting where one sample's weight does not depend on the others, as adaptive best-of-N needs.
  Ties as for majority.

Bad values: a NaN (or infinite, or missing) score ranks last and gives weight 0, with a ``warnings.warn``. When
the parser found no answer in any sample, majority / weighted vote fall back to argmax of the score (or the first
sample without a score) and say so (``fallback_used``, ``note``). Samples a component stopped early (output
``{"stopped_early": True}``, e.g. :class:`~kvagents.control.early_stop.EarlyStopWeak`) take no part unless all were.

Example:
    >>> cands = [Candidate("... #### 18", "18", {"mean_logprob": -0.2}, 0),
    ...          Candidate("... #### 20", "20", {"mean_logprob": -0.9}, 1),
    ...          Candidate("... #### 20", "20", {"mean_logprob": -0.8}, 2)]
    >>> select(cands, "argmax", score="mean_logprob").chosen.answer
    '18'
    >>> select(cands, "majority").chosen.answer
    '20'
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..engine.components import Component
from ..engine.params import SamplingParams
from ..engine.results import GenerationResult, SampleResult
from ..signals.scoring import SCORE_DIRECTIONS, LayerCoE, ProbabilityScores, TokenCoE
from .adaptive import AdaptiveConfig, SamplingUsage, sample_in_waves
from .answers import get_parser

__all__ = ["NOT_SCORES", "RULES", "BestOfN", "Candidate", "SelectionResult", "candidates_from_samples", "select"]

RULES = ("argmax", "majority", "weighted")
WEIGHTINGS = ("minmax", "softmax", "score")
Rule = Literal["argmax", "majority", "weighted"]
Parser = Callable[[str], "str | None"]


@dataclass
class Candidate:
    """One sampled answer: its text, parsed answer (``None``: the parser found none), scores and sample index.

    ``stopped_early``: a component stopped the sample (it takes no part in selection); ``sample``: the engine's
    :class:`~kvagents.engine.results.SampleResult`, when the candidate came from one.
    """

    text: str
    answer: str | None
    scores: dict[str, float]
    index: int
    stopped_early: bool = False
    sample: SampleResult | None = field(default=None, repr=False)


@dataclass
class SelectionResult:
    """What :func:`select` chose, among which candidates, by which rule, and why (``note``).

    ``fallback_used``: the rule could not apply (no answer parsed in any sample, or every score NaN) and the
    documented fallback chose instead. ``votes``: answer -> vote count (majority) or weight mass (weighted).
    ``usage``: what sampling cost for this prompt (:class:`~kvagents.control.adaptive.SamplingUsage`), set by
    :class:`BestOfN`.
    """

    chosen: Candidate
    candidates: list[Candidate]
    rule: str
    fallback_used: bool = False
    note: str = ""
    score: str | None = None
    votes: dict[str, float] | None = None
    usage: SamplingUsage | None = None

    @property
    def answer(self) -> str | None:
        return self.chosen.answer

    @property
    def text(self) -> str:
        return self.chosen.text


# ----------------------------------------------------------------------------------------------------------------
# select


def _score_values(cands: list[Candidate], score: str, direction: int) -> list[float | None]:
    """Direction-oriented score per candidate (higher = better); ``None`` where missing or not finite."""
    out: list[float | None] = []
    for c in cands:
        v = c.scores.get(score)
        try:
            v = float(v) if v is not None and not isinstance(v, bool) else None
        except (TypeError, ValueError):
            v = None
        out.append(v * direction if v is not None and math.isfinite(v) else None)
    bad = [c.index for c, v in zip(cands, out) if v is None]
    if bad:
        warnings.warn(
            f"score {score!r} is NaN, missing or infinite for candidates {bad}: ranked last (weight 0)",
            RuntimeWarning,
            stacklevel=3,
        )
    return out


def _best(cands: list[Candidate], vals: list[float | None] | None) -> Candidate:
    """Best-scoring candidate (first index on ties; NaN last); the first one without scores."""
    if vals is None:
        return cands[0]
    best, best_v = cands[0], vals[0]
    for c, v in zip(cands[1:], vals[1:]):
        if v is not None and (best_v is None or v > best_v):
            best, best_v = c, v
    return best


def _weights(vals: list[float | None], weighting: str, temperature: float) -> list[float]:
    ok = [v for v in vals if v is not None]
    if not ok:
        return [0.0] * len(vals)
    lo, hi = min(ok), max(ok)
    if weighting == "minmax":
        return [0.0 if v is None else (1.0 if hi == lo else (v - lo) / (hi - lo)) for v in vals]
    if weighting == "score":
        return [0.0 if v is None else v for v in vals]
    return [0.0 if v is None else math.exp((v - hi) / temperature) for v in vals]


def _check_score_weights(pool: list[Candidate], vals: list[float | None], score: str) -> None:
    neg = [(c.index, v) for c, v in zip(pool, vals) if v is not None and v < 0]
    if neg:
        i, v = neg[0]
        raise ValueError(
            f"weighting='score' uses each score as its vote weight, which must be >= 0; the direction-oriented "
            f"{score!r} of candidate {i} is {v}: use a score in [0, 1] (mean_max_prob, kv_probe) or weighting='minmax'"
        )


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def select(
    candidates: Sequence[Candidate],
    rule: Rule = "argmax",
    score: str | None = None,
    direction: int | None = None,
    *,
    weighting: Literal["minmax", "softmax", "score"] = "minmax",
    temperature: float = 1.0,
) -> SelectionResult:
    """Choose one candidate by ``rule`` (see the module docstring for the exact rules and tie-breaks).

    Args:
        candidates: at least one :class:`Candidate`.
        rule: ``"argmax"`` (needs ``score``), ``"majority"`` (``score`` optional: tie-break and fallback) or
            ``"weighted"`` (needs ``score``).
        score: a key of the candidates' ``scores``; unknown -> ``ValueError`` listing the available keys.
        direction: +1 (higher is better) or -1; default ``SCORE_DIRECTIONS[score]``, +1 for keys not listed there.
        weighting: ``"minmax"`` (default), ``"softmax"`` or ``"score"`` (the score itself, >= 0) weights for
            ``"weighted"``.
        temperature: softmax temperature (> 0), in the score's units.

    Example:
        >>> cands = [Candidate("a", "1", {"s": 0.0}, 0), Candidate("b", "2", {"s": 5.0}, 1)]
        >>> r = select(cands, "weighted", score="s")
        >>> r.answer, r.votes
        ('2', {'1': 0.0, '2': 1.0})
    """
    cands = list(candidates)
    if not cands:
        raise ValueError("select() got no candidates")
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; use one of {', '.join(repr(r) for r in RULES)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be 'minmax', 'softmax' or 'score', got {weighting!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if rule in ("argmax", "weighted") and score is None:
        raise ValueError(f"rule {rule!r} needs a score name (score=...)")
    if score is not None:
        available = sorted({k for c in cands for k in c.scores})
        if score not in available:
            raise ValueError(
                f"unknown score {score!r}; the candidates have: {', '.join(available) if available else 'no scores'}"
            )
        if direction is None:
            direction = SCORE_DIRECTIONS.get(score, 1)
        if direction not in (1, -1):
            raise ValueError(f"direction must be +1 (higher is better) or -1, got {direction!r}")

    pool = [c for c in cands if not c.stopped_early]
    pre = ""
    if len(pool) < len(cands):
        if pool:
            pre = f"{len(cands) - len(pool)} of {len(cands)} samples stopped early and left out; "
        else:
            pool, pre = cands, "every sample was stopped early, all kept; "
    vals = _score_values(pool, score, direction) if score is not None else None
    how = None if score is None else f"{score} ({'higher' if direction > 0 else 'lower'} is better)"

    def result(chosen, note, fallback=False, votes=None):
        return SelectionResult(chosen, cands, rule, fallback, pre + note, score, votes)

    def argmax(note_prefix: str = "", fallback: bool = False):
        if all(v is None for v in vals):
            return result(
                pool[0], f"{note_prefix}every {score} is NaN: chose the first sample (candidate {pool[0].index})", True
            )
        best = _best(pool, vals)
        v = vals[pool.index(best)] * direction
        return result(best, f"{note_prefix}argmax of {how}: candidate {best.index} ({_fmt(v)})", fallback)

    if rule == "argmax":
        return argmax()

    answered = [(c, v) for c, v in zip(pool, vals or [None] * len(pool)) if c.answer is not None]
    if not answered:
        msg = f"no answer parsed from any of {len(pool)} samples: fell back to "
        if score is None:
            return result(pool[0], msg + f"the first sample (candidate {pool[0].index})", True)
        return argmax(msg, fallback=True)

    if rule == "majority":
        w = [1.0] * len(pool)
    else:
        if weighting == "score":
            _check_score_weights(pool, vals, score)
        w = _weights(vals, weighting, temperature)
    weight_of = {id(c): wi for c, wi in zip(pool, w)}
    votes: dict[str, float] = {}
    groups: dict[str, list[tuple[Candidate, float | None]]] = {}
    for c, v in answered:
        votes[c.answer] = votes.get(c.answer, 0.0) + weight_of[id(c)]
        groups.setdefault(c.answer, []).append((c, v))
    top = max(votes.values())
    tied = [a for a in votes if votes[a] == top]  # dict order = first occurrence
    winner, tie_note = tied[0], ""
    if len(tied) > 1:
        if vals is not None:

            def group_best(a):
                vs = [v for _, v in groups[a] if v is not None]
                return max(vs) if vs else -math.inf

            winner = max(tied, key=group_best)  # max() keeps the first of equal keys
            tie_note = f"; tie with {', '.join(repr(a) for a in tied if a != winner)} broken by best {score}"
        else:
            tie_note = f"; tie with {', '.join(repr(a) for a in tied if a != winner)} broken by first occurrence"
    members = [c for c, _ in groups[winner]]
    member_vals = [v for _, v in groups[winner]] if vals is not None else None
    chosen = _best(members, member_vals)
    if rule == "majority":
        note = f"majority: {winner!r} with {int(top)} of {len(answered)} parsed answers ({len(pool)} samples)"
    else:
        note = (
            f"weighted vote ({weighting} weights of {how}): {winner!r} with {_fmt(top)} of "
            f"{_fmt(sum(votes.values()))} vote mass"
        )
    return result(chosen, note + tie_note, votes=votes)


# ----------------------------------------------------------------------------------------------------------------
# From engine samples


#: Numeric bookkeeping keys of component outputs that are not scores (see :mod:`kvagents.control.early_stop`).
NOT_SCORES = frozenset(
    {"stopped_early", "tokens_at_stop", "stop_step", "stop_score", "stop_threshold", "tokens_saved_est"}
)


def candidates_from_samples(samples: Sequence[SampleResult], parser: Parser | str | None = None) -> list[Candidate]:
    """Candidates of one prompt's samples: ``parser(text)`` as the answer (``None`` without a parser), and every
    numeric (int or float, not bool) value of every dict output as a score, except the keys in
    :data:`NOT_SCORES`. On a key clash between components the first one's value is kept. A sample whose outputs
    hold ``"stopped_early": True`` is marked ``stopped_early``.
    """
    parse = get_parser(parser) if parser is not None else None
    out = []
    for s in samples:
        scores: dict[str, float] = {}
        stopped = False
        for value in s.outputs.values():
            if not isinstance(value, dict):
                continue
            stopped = stopped or value.get("stopped_early") is True
            for k, v in value.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_SCORES:
                    scores.setdefault(k, float(v))
        answer = parse(s.text) if parse is not None else None
        out.append(Candidate(s.text, answer, scores, s.sample_index, stopped, s))
    return out


def _declared_keys(c: Component) -> set[str] | None:
    """Score keys a built-in scorer will output (None: unknown, e.g. a user component)."""
    if isinstance(c, ProbabilityScores):
        return {
            "mean_max_prob",
            "mean_log_max_prob",
            "mean_logprob",
            "perplexity",
            "mean_entropy",
            "lowest_group_confidence",
        }
    if isinstance(c, (LayerCoE, TokenCoE)):
        return {f"{c.prefix}_{k}" for k in ("mag", "ang", "r", "c")}
    return None


class BestOfN:
    """Sample ``n`` answers per prompt in ONE ``generate`` call (one prefill per prompt), score them in the
    decode loop with ``scorers``, and choose one per prompt with :func:`select`.

    Args:
        llm: a :class:`~kvagents.KVModel`.
        n: samples per prompt (>= 1; default 8, or ``adaptive.max_n``).
        scorers: components whose dict outputs are the scores (default: ``[ProbabilityScores()]``).
        rule: ``"argmax"``, ``"majority"`` or ``"weighted"``.
        score: the score key that ranks / weights (default ``"lowest_group_confidence"``, DeepConf's; ``None``
            only for ``"majority"``).
        parser: ``"gsm8k"``, ``"math"``, ``"choice"`` or a callable ``text -> str | None``; required by the vote
            rules.
        direction, weighting, temperature: passed to :func:`select`.
        early_stop: an optional component (e.g. :class:`~kvagents.control.early_stop.EarlyStopWeak`) added to the call;
            samples it stops take no part in selection.
        adaptive: an :class:`~kvagents.control.adaptive.AdaptiveConfig` (or a dict of its fields): sample in waves
            of ``wave`` and stop a prompt once its vote is decided (see below). Needs a vote rule: ``"majority"``,
            or ``"weighted"`` with ``weighting="score"`` and a score in ``[0, max_weight]``.

    ``__call__(prompts, params=None, **overrides)``: one prompt -> :class:`SelectionResult`, a list -> a list.
    ``params`` default: ``SamplingParams(temperature=0.7, top_p=0.95)``; its ``n`` is set to this ``n``.
    ``select_from(generation)`` selects from an existing :class:`~kvagents.engine.results.GenerationResult`.
    Every result's ``usage`` (:class:`~kvagents.control.adaptive.SamplingUsage`) counts its samples and tokens.

    Adaptive mode: wave ``k`` is one ``generate`` call over the prompts still undecided, ``n`` = the wave's size
    (:func:`~kvagents.control.adaptive.wave_sizes`) and ``seed = wave_seed(params.seed, k)``; after each wave every
    prompt's vote is checked with :func:`~kvagents.control.adaptive.check_stop`, and a prompt that stops leaves the
    next waves. The engine cannot add samples to a prompt it has already prefilled, so every wave prefills its
    prompts again: ``usage.prompt_tokens`` counts those tokens. The samples of wave ``k`` are exactly those of
    ``llm.generate(undecided_prompts, n=size_k, seed=wave_seed(seed, k))``; with one wave (``wave >= max_n``) the
    run is the fixed ``BestOfN(n=max_n)`` run with the same seed, sample by sample. The candidates are numbered
    in sampling order across waves (``Candidate.index``, ``SampleResult.sample_index``).

    Example:
        >>> from kvagents import KVModel
        >>> bon = BestOfN(KVModel.from_pretrained("qwen2.5-coder-0.5b"), n=8, rule="majority",
        ...               score="lowest_group_confidence", parser="gsm8k")
        >>> # bon("Tom has 3 boxes of 12 apples ...", max_new_tokens=256).answer
        >>> adaptive = BestOfN(bon.llm, rule="majority", score=None, parser="gsm8k",
        ...                    adaptive=AdaptiveConfig(wave=2, max_n=16))
        >>> # r = adaptive("Tom has ...", seed=0); r.usage.samples, r.usage.stopped_by
    """

    def __init__(
        self,
        llm,
        n: int | None = None,
        scorers: Sequence[Component] | None = None,
        rule: Rule = "argmax",
        score: str | None = "lowest_group_confidence",
        parser: Parser | str | None = None,
        *,
        direction: int | None = None,
        weighting: Literal["minmax", "softmax", "score"] = "minmax",
        temperature: float = 1.0,
        early_stop: Component | None = None,
        adaptive: AdaptiveConfig | dict | None = None,
    ) -> None:
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"n (samples per prompt) must be an integer >= 1, got {n!r}")
        if rule not in RULES:
            raise ValueError(f"unknown selection rule {rule!r}; use one of {', '.join(repr(r) for r in RULES)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be 'minmax', 'softmax' or 'score', got {weighting!r}")
        if rule in ("argmax", "weighted") and score is None:
            raise ValueError(f"rule {rule!r} needs a score name (score=...)")
        if rule in ("majority", "weighted") and parser is None:
            raise ValueError(
                f"rule {rule!r} votes over parsed answers: give a parser ('gsm8k', 'math', 'choice' or a callable)"
            )
        if adaptive is not None:
            if isinstance(adaptive, dict):
                adaptive = AdaptiveConfig(**adaptive)
            if not isinstance(adaptive, AdaptiveConfig):
                raise ValueError(f"adaptive must be an AdaptiveConfig (or a dict of its fields), got {adaptive!r}")
            if rule == "argmax":
                raise ValueError(
                    "adaptive sampling stops on a vote: use rule='majority', or rule='weighted' with "
                    "weighting='score' (rule='argmax' has no vote to decide)"
                )
            if rule == "weighted" and weighting != "score":
                raise ValueError(
                    f"adaptive sampling with rule='weighted' needs weighting='score' (each sample's score is its "
                    f"bounded vote weight); weighting={weighting!r} normalises over all samples, so a later sample "
                    f"changes the earlier weights and the stop would not be exact"
                )
            adaptive = adaptive.resolve(8 if n is None and adaptive.max_n is None else n)
            n = adaptive.max_n
        self.llm = llm
        self.n = 8 if n is None else n
        self.adaptive: AdaptiveConfig | None = adaptive
        self.scorers = list(scorers) if scorers is not None else [ProbabilityScores()]
        self.rule = rule
        self.score = score
        self.parser = get_parser(parser) if parser is not None else None
        self.direction = direction
        self.weighting = weighting
        self.temperature = temperature
        self.early_stop = early_stop
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ValueError(f"components need distinct names, got {names}")
        if score is not None:
            declared = [_declared_keys(c) for c in self.scorers]
            if all(d is not None for d in declared):
                known = set().union(*declared)
                if score not in known:
                    raise ValueError(f"unknown score {score!r}; these scorers output: {', '.join(sorted(known))}")

    @property
    def components(self) -> list[Component]:
        return self.scorers + ([self.early_stop] if self.early_stop is not None else [])

    def _params(self, params: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
        if "n" in overrides and overrides["n"] != self.n:
            raise ValueError(f"n={overrides['n']} conflicts with BestOfN(n={self.n})")
        base = params if params is not None else SamplingParams(temperature=0.7, top_p=0.95)
        if params is not None and params.n not in (1, self.n):
            raise ValueError(f"params.n={params.n} conflicts with BestOfN(n={self.n})")
        p = SamplingParams(**{**base.model_dump(), **overrides, "n": self.n})
        if p.greedy and self.n > 1:
            warnings.warn(f"temperature=0 (greedy) makes the n={self.n} samples identical", stacklevel=3)
        return p

    def _select(self, cands: list[Candidate]) -> SelectionResult:
        return select(
            cands, self.rule, self.score, self.direction, weighting=self.weighting, temperature=self.temperature
        )

    def select_from(self, generation: GenerationResult) -> list[SelectionResult]:
        """One :class:`SelectionResult` per prompt of an existing generation (``usage.stopped_by="fixed"``)."""
        out = []
        for group in generation.samples:
            res = self._select(candidates_from_samples(group, self.parser))
            res.usage = SamplingUsage(
                samples=len(group),
                waves=1,
                generated_tokens=sum(s.generated_tokens for s in group),
                prompt_tokens=group[0].prompt_tokens if group else 0,
                max_n=len(group),
                stopped_by="fixed",
            )
            out.append(res)
        return out

    def vote(self, candidates: Sequence[Candidate]) -> tuple[list[str | None], list[float] | None]:
        """The answers and vote weights the adaptive stop rule sees: ``None`` for a sample without an answer or
        stopped early; weights ``None`` (all 1) for majority, else the direction-oriented score of each sample,
        which must lie in ``[0, adaptive.max_weight]`` (NaN / missing: 0, as in :func:`select`)."""
        answers = [None if c.stopped_early else c.answer for c in candidates]
        if self.rule == "majority":
            return answers, None
        direction = self.direction if self.direction is not None else SCORE_DIRECTIONS.get(self.score, 1)
        cap = self.adaptive.max_weight if self.adaptive is not None else math.inf
        weights = []
        for c in candidates:
            v = c.scores.get(self.score)
            v = float(v) * direction if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
            v = v if math.isfinite(v) else 0.0
            if not 0.0 <= v <= cap:
                raise ValueError(
                    f"the vote weight of sample {c.index} (direction-oriented {self.score!r} = {v}) is outside "
                    f"[0, max_weight={cap}]: adaptive stops need bounded weights; use a score in [0, 1] "
                    f"(mean_max_prob, kv_probe) or raise AdaptiveConfig.max_weight"
                )
            weights.append(v)
        return answers, weights

    def _adaptive(self, ids: list[list[int]], params: SamplingParams) -> list[SelectionResult]:
        def sample_wave(active: list[int], n: int, seed: int | None):
            wave_params = SamplingParams(**{**params.model_dump(), "n": n, "seed": seed})
            return self.llm.generate([ids[i] for i in active], wave_params, components=self.components).samples

        def vote(i: int, samples: list[SampleResult]):
            return self.vote(candidates_from_samples(samples, self.parser))

        samples, usage = sample_in_waves(sample_wave, len(ids), self.adaptive, params.seed, vote)
        out = []
        for group, u in zip(samples, usage):
            res = self._select(candidates_from_samples(group, self.parser))
            res.usage = u
            out.append(res)
        return out

    def __call__(self, prompts, params: SamplingParams | None = None, **overrides):
        single = isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and len(prompts) > 0 and isinstance(prompts[0], (int, dict))
        )
        p = self._params(params, overrides)
        if self.adaptive is not None:
            results = self._adaptive(self.llm._batch(prompts), p)
        else:
            results = self.select_from(self.llm.generate(prompts, p, components=self.components))
        return results[0] if single else results
