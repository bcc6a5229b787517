"""Adaptive best-of-N: the stop rules (exact and probabilistic) on hand-made votes, the wave loop on a scripted model
(which prompts each wave samples, with which seed), and end-to-end runs on a tiny model compared with fixed-n runs."""

from __future__ import annotations

import doctest
import itertools
import math
from math import comb

import pytest
from tiny import ByteTokenizer, tiny_model

import kvagents.control.adaptive as adaptive_mod
from kvagents import Component, KVModel, SamplingParams
from kvagents.control.adaptive import (
    AdaptiveConfig,
    adaptive_stop,
    beta_win_probability,
    check_stop,
    wave_seed,
    wave_sizes,
)
from kvagents.control.selection import BestOfN, Candidate, candidates_from_samples, select
from kvagents.engine.results import GenerationResult, GenerationStats, SampleResult
from kvagents.signals.scoring import ProbabilityScores


def test_module_examples():
    assert doctest.testmod(adaptive_mod).failed == 0


# ----------------------------------------------------------------------------------------------------------------
# The exact rule on hand-computed votes


@pytest.mark.parametrize(
    "answers, wave, max_n, want",
    [
        (["a"] * 5, 1, 5, 3),  # after 3: 3 > 0 + 2; after 2: 2 > 3 is false
        (["a"] * 6, 1, 6, 4),  # after 3: 3 > 3 is false (equal is not enough: the rest could tie)
        (["a", "a", "b", "b"], 1, 4, 4),  # 2 > 1 + 1 false after 3, then max_n
        (["a", "a", "a"], 1, 4, 3),  # fewer recorded samples than max_n: fine when the run stops before
        (["a", "b", "a", "b"], 2, 4, 4),  # a tie at max_n: stops there, undecided
        ([None, None, "a", "a", "a"], 1, 5, 4),  # None does not vote: 2 > 0 + 1 after 4
        ([None] * 4, 2, 4, 4),  # nothing to vote for
        (["7", "7", "7", "7", "9", "9"], 2, 6, 4),  # 4 > 0 + 2
        (["4", "4", "4", "5", "4", "4", "4", "4"], 2, 8, 6),  # after 4: 3 > 1 + 4 false; after 6: 5 > 1 + 2
        (["a", "a", "a", "b", "b", "b", "b", "b"], 3, 8, 8),  # waves 3, 3, 2: after 6: 3 > 3 + 2 false
        (["a", "a", "a", "a", "a", "b", "b", "b"], 3, 8, 6),  # after 6: 5 > 1 + 2
    ],
)
def test_decided_rule_hand_computed(answers, wave, max_n, want):
    assert adaptive_stop(answers, wave=wave, max_n=max_n) == want


def test_weighted_votes_hand_computed():
    # after 3: a = 0.9 + 0.6 = 1.5 > b 0.3 + 1 remaining x 1.0 = 1.3
    assert adaptive_stop(["a", "b", "a", "a"], [0.9, 0.3, 0.6, 0.1], wave=1, max_n=4) == 3
    # after 3 with a = 1.2: 1.2 > 1.3 is false -> max_n
    assert adaptive_stop(["a", "b", "a", "a"], [0.9, 0.3, 0.3, 0.1], wave=1, max_n=4) == 4
    # a larger bound on the weights makes the rule wait longer: 1.5 > 0.3 + 2.0 is false
    assert adaptive_stop(["a", "b", "a", "a"], [0.9, 0.3, 0.6, 0.1], wave=1, max_n=4, max_weight=2.0) == 4
    c = check_stop(["a", "b", "a"], [0.9, 0.3, 0.6], remaining=1)
    assert (c.stop, c.reason, c.leader) == (True, "decided", "a")
    assert c.tallies == pytest.approx({"a": 1.5, "b": 0.3}) and c.margin == pytest.approx(1.2)
    # zero weights vote for nothing
    assert check_stop(["a", "b"], [0.0, 0.0], remaining=0).reason == "max_n"


def _final_tallies(answers):
    t = {}
    for a in answers:
        if a is not None:
            t[a] = t.get(a, 0) + 1
    return t


@pytest.mark.parametrize("max_n", [3, 4, 5])
def test_decided_means_no_continuation_changes_the_winner(max_n):
    """Exhaustive over prefixes and continuations: 'decided' exactly when every way of drawing the remaining samples
    leaves the leader strictly ahead (so select() chooses it), tie-breaks included."""
    prefix_alphabet, continuation_alphabet = ["a", "b", None], ["a", "b", "new", None]
    for m in range(1, max_n + 1):
        for prefix in itertools.product(prefix_alphabet, repeat=m):
            check = check_stop(list(prefix), None, max_n - m)
            leader = check.leader
            always = True
            for rest in itertools.product(continuation_alphabet, repeat=max_n - m):
                full = list(prefix) + list(rest)
                t = _final_tallies(full)
                if leader is None or any(v >= t[leader] for a, v in t.items() if a != leader):
                    always = False
                    break
            if m < max_n:
                assert (check.reason == "decided") == always, (prefix, max_n)
            else:  # no sample left: a stop either way; the winner is fixed exactly when the leader is strictly ahead
                assert check.reason == "max_n" and (check.margin > 0) == always, prefix
            if always:  # the final selection over any continuation is the leader; check one with select()
                full = list(prefix) + ["b" if leader != "b" else "a"] * (max_n - m)
                cands = [Candidate("", a, {}, i) for i, a in enumerate(full)]
                assert select(cands, "majority").answer == leader


# ----------------------------------------------------------------------------------------------------------------
# The beta rule


def _binomial_tail(a: int, b: int) -> float:
    """P(X > 1/2), X ~ Beta(a + 1, b + 1), for integers: P(Binomial(a + b + 1, 1/2) <= a)."""
    n = a + b + 1
    return sum(comb(n, j) for j in range(a + 1)) / 2**n


def test_beta_win_probability_matches_the_binomial_identity():
    for a in range(0, 25):
        for b in range(0, a + 3):
            assert beta_win_probability(a, b) == pytest.approx(_binomial_tail(a, b), abs=1e-12)


def test_beta_win_probability_matches_scipy_for_real_tallies():
    stats = pytest.importorskip("scipy.stats")
    for a, b in [(0.3, 0.0), (2.5, 0.7), (7.25, 3.5), (40.0, 31.2), (0.0, 5.0)]:
        assert beta_win_probability(a, b) == pytest.approx(stats.beta.sf(0.5, a + 1, b + 1), abs=1e-12)


def test_beta_rule_hand_computed():
    # unanimous votes: P = 1 - 2^-(k+1): 0.75, 0.875, 0.9375, 0.96875 after 1..4
    assert adaptive_stop(["a"] * 8, wave=1, max_n=8, rule="beta", confidence=0.95) == 4
    assert adaptive_stop(["a"] * 8, wave=1, max_n=8, rule="beta", confidence=0.9) == 3
    assert adaptive_stop(["a"] * 8, wave=2, max_n=8, rule="beta", confidence=0.9) == 4  # checked after waves only
    # 3 vs 1: P = P(Bin(5, 1/2) <= 3) = 26/32 = 0.8125
    c = check_stop(["a", "b", "a", "a"], None, remaining=10, rule="beta", confidence=0.8)
    assert (c.reason, c.posterior) == ("confident", pytest.approx(0.8125))
    assert not check_stop(["a", "b", "a", "a"], None, remaining=10, rule="beta", confidence=0.82).stop
    # a tie never stops early, whatever the confidence (P = 0.5)
    assert adaptive_stop(["a", "b", "a", "b"], wave=2, max_n=4, rule="beta", confidence=0.4) == 4
    # decided stops the beta rule too
    assert check_stop(["a", "a", "a"], None, remaining=1, rule="beta", confidence=0.99).reason == "decided"


# ----------------------------------------------------------------------------------------------------------------
# Waves, seeds, configs


def test_wave_sizes_and_seeds():
    assert wave_sizes(2, 8) == [2, 2, 2, 2]
    assert wave_sizes(3, 8) == [3, 3, 2]
    assert wave_sizes(8, 8) == [8]
    assert wave_seed(None, 3) is None
    assert wave_seed(11, 0) == 11
    seeds = [wave_seed(11, k) for k in range(1, 50)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**32 for s in seeds)
    assert seeds == [wave_seed(11, k) for k in range(1, 50)]  # a pure function of (seed, k)
    assert wave_seed(12, 1) != wave_seed(11, 1)


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="wave .* >= 1, got 0"):
        AdaptiveConfig(wave=0, max_n=8)
    with pytest.raises(ValueError, match="max_n=2 is smaller than wave=4"):
        AdaptiveConfig(wave=4, max_n=2)
    for bad in (0, 0.0, 1, 1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="confidence must be a probability strictly between 0 and 1"):
            AdaptiveConfig(wave=2, max_n=8, confidence=bad)
    with pytest.raises(ValueError, match="unknown stop rule 'sprt'"):
        AdaptiveConfig(wave=2, stop_rule="sprt")
    with pytest.raises(ValueError, match="max_weight"):
        AdaptiveConfig(wave=2, max_weight=0)
    with pytest.raises(ValueError, match="wave .* got 0"):
        adaptive_stop(["a"], wave=0)
    with pytest.raises(ValueError, match="max_n=1 is smaller than wave=2"):
        adaptive_stop(["a", "a"], wave=2, max_n=1)
    with pytest.raises(ValueError, match=r"needs 3 samples and got 2 recorded ones \(max_n=4\)"):
        adaptive_stop(["a", "b"], wave=1, max_n=4)
    with pytest.raises(ValueError, match=r"weight 1.5 of sample 1 is outside \[0, max_weight=1.0\]"):
        adaptive_stop(["a", "b"], [0.5, 1.5], wave=1)
    with pytest.raises(ValueError, match="one weight per answer"):
        adaptive_stop(["a", "b"], [0.5], wave=1)
    with pytest.raises(ValueError, match="confidence"):
        adaptive_stop(["a", "b"], wave=1, rule="beta", confidence=1.0)
    with pytest.raises(ValueError, match="n=4 conflicts with AdaptiveConfig"):
        AdaptiveConfig(wave=2, max_n=8).resolve(4)
    with pytest.raises(ValueError, match="max_n=3 is smaller than wave=4"):
        AdaptiveConfig(wave=4).resolve(3)
    assert AdaptiveConfig(wave=2).resolve(6).max_n == 6


# ----------------------------------------------------------------------------------------------------------------
# The wave loop, on a scripted model


class ScriptedLLM:
    """Stands in for a KVModel: prompt p's k-th sample (over all calls) answers ``scripts[p][k]`` (text
    ``#### <answer>``, or ``none``) with score ``w``, and generates k + 1 tokens. Records every generate call."""

    def __init__(self, scripts):
        self.scripts = {tuple(p): s for p, s in scripts.items()}
        self.used = {p: 0 for p in self.scripts}
        self.calls = []

    def _batch(self, prompts):
        return [list(prompts)] if isinstance(prompts[0], int) else [list(p) for p in prompts]

    def generate(self, prompts, params, components=()):
        self.calls.append(([tuple(p) for p in prompts], params.n, params.seed))
        rows = []
        for pi, p in enumerate(prompts):
            key, k0 = tuple(p), self.used[tuple(p)]
            row = []
            for j in range(params.n):
                answer, w = self.scripts[key][k0 + j]
                text = "none" if answer is None else f"#### {answer}"
                row.append(
                    SampleResult(pi, j, text, [3] * (k0 + j + 1), "eos", len(p), k0 + j + 1, 0, {"stub": {"w": w}})
                )
            self.used[key] = k0 + params.n
            rows.append(row)
        return GenerationResult(rows, GenerationStats())


class StubScore(Component):
    name = "stub"


def parse(text):
    return text[5:] if text.startswith("#### ") else None


A, B = (1, 10, 11), (1, 20)


def test_waves_stop_each_prompt_when_decided_and_leave_the_batch():
    scripts = {
        A: [("7", 1.0)] * 8,
        B: [("1", 1.0), ("2", 1.0), ("1", 1.0), ("2", 1.0)] + [(str(k), 1.0) for k in range(3, 7)],
    }
    llm = ScriptedLLM(scripts)
    bon = BestOfN(
        llm, rule="majority", score=None, parser=parse, scorers=[StubScore()], adaptive=AdaptiveConfig(wave=2, max_n=8)
    )
    ra, rb = bon([list(A), list(B)], SamplingParams(seed=5))
    s1, s2, s3 = (wave_seed(5, k) for k in (1, 2, 3))
    # A is decided after 6 samples (6 > 0 + 2), B never: it samples alone in the last wave
    assert llm.calls == [([A, B], 2, 5), ([A, B], 2, s1), ([A, B], 2, s2), ([B], 2, s3)]
    ua, ub = ra.usage, rb.usage
    assert (ua.samples, ua.waves, ua.stopped_by, ua.max_n) == (6, 3, "decided", 8)
    assert ua.generated_tokens == sum(range(1, 7)) and ua.prompt_tokens == 3 * len(A) and ua.reprefilled_tokens == 6
    assert (ub.samples, ub.waves, ub.stopped_by) == (8, 4, "max_n")
    assert ub.generated_tokens == sum(range(1, 9)) and ub.prompt_tokens == 4 * len(B)
    assert [c.index for c in ra.candidates] == list(range(6))  # numbered in sampling order across waves
    assert [c.sample.sample_index for c in rb.candidates] == list(range(8))
    assert ra.answer == "7" and ra.votes == {"7": 6.0}
    assert rb.answer == "1" and rb.votes["1"] == rb.votes["2"] == 2.0  # a tie, broken by first occurrence


def test_waves_with_a_short_last_wave_none_answers_and_no_seed():
    scripts = {A: [(None, 1.0), (None, 1.0), ("3", 1.0), ("3", 1.0), ("3", 1.0), ("3", 1.0), ("3", 1.0), ("3", 1.0)]}
    llm = ScriptedLLM(scripts)
    bon = BestOfN(
        llm, n=8, rule="majority", score=None, parser=parse, scorers=[StubScore()], adaptive=AdaptiveConfig(wave=3)
    )
    r = bon(list(A), SamplingParams())
    # after 3: 1 > 5 no; after 6: 4 > 2 yes
    assert [(n, seed) for _, n, seed in llm.calls] == [(3, None), (3, None)]
    assert (r.usage.samples, r.usage.stopped_by, r.answer) == (6, "decided", "3")
    llm = ScriptedLLM({A: [("3", 1.0), ("4", 1.0)] * 4})
    BestOfN(
        llm, n=8, rule="majority", score=None, parser=parse, scorers=[StubScore()], adaptive=AdaptiveConfig(wave=3)
    )(list(A))
    assert [n for _, n, _ in llm.calls] == [3, 3, 2]  # undecided: waves 3, 3, 2 reach max_n exactly


def test_weighted_waves_use_the_scores_as_bounded_weights():
    scripts = {A: [("a", 0.9), ("b", 0.3), ("a", 0.6), ("a", 0.1)]}
    llm = ScriptedLLM(scripts)
    bon = BestOfN(
        llm,
        rule="weighted",
        score="w",
        weighting="score",
        parser=parse,
        scorers=[StubScore()],
        adaptive=AdaptiveConfig(wave=1, max_n=4),
    )
    r = bon(list(A))
    assert (r.usage.samples, r.usage.stopped_by) == (3, "decided")  # 1.5 > 0.3 + 1
    assert r.votes == pytest.approx({"a": 1.5, "b": 0.3}) and r.chosen.index == 0  # a's best-scoring sample
    llm = ScriptedLLM({A: [("a", 0.9), ("b", 1.7)]})
    bon = BestOfN(
        llm,
        rule="weighted",
        score="w",
        weighting="score",
        parser=parse,
        scorers=[StubScore()],
        adaptive=AdaptiveConfig(wave=2, max_n=2),
    )
    with pytest.raises(ValueError, match=r"sample 1 .*'w' = 1.7.* outside \[0, max_weight=1.0\]"):
        bon(list(A))


def test_best_of_n_refuses_bad_adaptive_settings():
    llm = ScriptedLLM({A: []})
    with pytest.raises(ValueError, match="stops on a vote"):
        BestOfN(llm, rule="argmax", score="w", scorers=[StubScore()], adaptive=AdaptiveConfig(wave=2, max_n=4))
    with pytest.raises(ValueError, match="weighting='score'"):
        BestOfN(
            llm,
            rule="weighted",
            score="w",
            parser=parse,
            scorers=[StubScore()],
            adaptive=AdaptiveConfig(wave=2, max_n=4),
        )
    with pytest.raises(ValueError, match="n=4 conflicts with AdaptiveConfig"):
        BestOfN(llm, n=4, rule="majority", score=None, parser=parse, adaptive={"wave": 2, "max_n": 8})
    with pytest.raises(ValueError, match="max_n=2 is smaller than wave=3"):
        BestOfN(llm, n=2, rule="majority", score=None, parser=parse, adaptive={"wave": 3})
    with pytest.raises(ValueError, match="wave"):
        BestOfN(llm, n=8, rule="majority", score=None, parser=parse, adaptive={"wave": 0})
    with pytest.raises(ValueError, match="AdaptiveConfig"):
        BestOfN(llm, n=8, rule="majority", score=None, parser=parse, adaptive=3)
    assert BestOfN(llm, rule="majority", score=None, parser=parse, adaptive={"wave": 2}).n == 8
    assert BestOfN(llm, rule="majority", score=None, parser=parse, adaptive={"wave": 2, "max_n": 12}).n == 12


def test_weighting_score_in_select_hand_computed():
    cands = [Candidate("", "x", {"p": 0.2}, 0), Candidate("", "y", {"p": 0.9}, 1), Candidate("", "x", {"p": 0.3}, 2)]
    r = select(cands, "weighted", score="p", weighting="score")
    assert r.votes == pytest.approx({"x": 0.5, "y": 0.9}) and r.answer == "y"
    with pytest.raises(ValueError, match="must be >= 0"):
        select([Candidate("", "x", {"perplexity": 3.0}, 0)], "weighted", score="perplexity", weighting="score")


# ----------------------------------------------------------------------------------------------------------------
# End to end on a tiny model

PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51]]  # different lengths: left padding
PARAMS = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return KVModel(tiny_model("llama"), ByteTokenizer())


class PrefillCounter:
    """Counts forward calls that feed more than one token per sequence (prefills)."""

    def __init__(self, model):
        self.model, self.prefills = model, 0
        orig = model.forward

        def counted(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.prefills += int(ids.shape[1] > 1)
            return orig(*args, **kwargs)

        model.forward = counted

    def close(self):
        del self.model.forward


def first_char(text):
    return text[:1] or None


def test_one_wave_is_the_fixed_n_run_sample_by_sample(llm):
    kw = dict(scorers=[ProbabilityScores(window=4)], rule="majority", score="mean_max_prob", parser=first_char)
    fixed = BestOfN(llm, n=4, **kw)(PROMPTS, PARAMS)
    adaptive = BestOfN(llm, adaptive=AdaptiveConfig(wave=4, max_n=4), **kw)(PROMPTS, PARAMS)
    for f, a in zip(fixed, adaptive):
        assert [c.sample.token_ids for c in a.candidates] == [c.sample.token_ids for c in f.candidates]
        assert (a.chosen.index, a.answer, a.votes, a.note) == (f.chosen.index, f.answer, f.votes, f.note)
        assert a.usage.waves == 1 and a.usage.samples == 4 and f.usage.stopped_by == "fixed"
        assert a.usage.generated_tokens == f.usage.generated_tokens == 4 * PARAMS.max_new_tokens
    assert len({c.text for c in fixed[0].candidates}) == 4  # the samples differ


def test_waves_to_max_n_give_the_fixed_n_selection_over_the_same_samples(llm):
    def whole(text):
        return text  # every sample its own answer: never decided before max_n

    kw = dict(
        scorers=[ProbabilityScores(window=4)], rule="weighted", score="mean_max_prob", weighting="score", parser=whole
    )
    bon = BestOfN(llm, adaptive=AdaptiveConfig(wave=2, max_n=8), **kw)
    counter = PrefillCounter(llm.model)
    try:
        results = bon(PROMPTS, PARAMS)
    finally:
        counter.close()
    assert counter.prefills == 4  # one per wave: the engine re-prefills the prompts for every wave
    # the same waves, by hand: generate(n=2, seed=wave_seed(seed, k)), concatenated per prompt
    waves = [
        llm.generate(
            PROMPTS,
            PARAMS.model_copy(update={"n": 2, "seed": wave_seed(PARAMS.seed, k)}),
            components=[ProbabilityScores(window=4)],
        )
        for k in range(4)
    ]
    fixed = BestOfN(llm, n=8, **kw)
    for p, r in enumerate(results):
        union = [s for w in waves for s in w.samples[p]]
        assert [c.sample.token_ids for c in r.candidates] == [s.token_ids for s in union]
        assert len({s.text for s in union}) == 8 and r.usage.stopped_by == "max_n"
        assert (r.usage.samples, r.usage.waves) == (8, 4)
        assert r.usage.prompt_tokens == 4 * len(PROMPTS[p])
        assert r.usage.generated_tokens == sum(s.generated_tokens for s in union) == 8 * PARAMS.max_new_tokens
        # the fixed-n selection over these samples (renumbered 0..7, as the adaptive run numbers them)
        renumbered = [SampleResult(**{**s.__dict__, "sample_index": j}) for j, s in enumerate(union)]
        want = fixed.select_from(GenerationResult([renumbered], GenerationStats()))[0]
        assert (r.chosen.index, r.answer, r.votes) == (want.chosen.index, want.answer, want.votes)
        by_hand = select(candidates_from_samples(renumbered, whole), "weighted", "mean_max_prob", weighting="score")
        weights = [s.outputs["probability"]["mean_max_prob"] for s in union]
        assert by_hand.chosen.index == max(range(8), key=lambda j: (weights[j], -j))
        assert by_hand.chosen.index == r.chosen.index


def test_a_decided_vote_stops_early_on_a_tiny_model(llm):
    bon = BestOfN(
        llm,
        scorers=[ProbabilityScores(window=4)],
        rule="majority",
        score=None,
        parser=lambda t: "same",
        adaptive=AdaptiveConfig(wave=2, max_n=8),
    )
    counter = PrefillCounter(llm.model)
    try:
        results = bon(PROMPTS, PARAMS)
    finally:
        counter.close()
    assert counter.prefills == 3  # 2 > 6, 4 > 4 are false; 6 > 2 stops both prompts after the third wave
    for p, r in enumerate(results):
        assert (r.usage.samples, r.usage.waves, r.usage.stopped_by) == (6, 3, "decided")
        assert r.usage.generated_tokens == 6 * PARAMS.max_new_tokens
        assert r.usage.prompt_tokens == 3 * len(PROMPTS[p]) and r.votes == {"same": 6.0}
        assert r.chosen.index == 0 and math.isfinite(r.chosen.scores["mean_max_prob"])
