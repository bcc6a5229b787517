"""Answer parsers, selection rules, BestOfN on a tiny model (one prefill), and early stop of weak samples."""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass

import pytest
import torch
from tiny import ByteTokenizer, tiny_model

from kvagents import Component, KVModel, SamplingParams, StopSequence
from kvagents.control.answers import (
    get_parser,
    normalize_math,
    normalize_number,
    parse_boxed,
    parse_choice,
    parse_gsm8k,
)
from kvagents.control.early_stop import EarlyStopWeak, early_stop_summary
from kvagents.control.selection import BestOfN, Candidate, candidates_from_samples, select
from kvagents.signals.scoring import ProbabilityScores

PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51]]  # different lengths: left padding


def llm_for(arch: str = "llama") -> KVModel:
    return KVModel(tiny_model(arch), ByteTokenizer())


# ----------------------------------------------------------------------------------------------------------------
# Parsers

GSM8K_CASES = [
    # GSM8K reference solution
    (
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at the "
        "farmer’s market.\n#### 18",
        "18",
    ),
    ("The discount price of one glass is 60/100 * 5 = $<<60/100*5=3>>3.\n#### 64", "64"),
    ("#### 1,450,000", "1450000"),
    ("so the total is\n####$2,125.00", "2125"),
    # model-style answers
    ("Step 1: 3 * 12 = 36 apples.\nStep 2: 36 - 10 = 26.\nAnswer: 26", "26"),
    ("**Answer:** $18 per day", "18"),
    ("The answer is 16 - 3 - 4 = 9.", "9"),
    ("Therefore, the final answer is: 150.", "150"),
    ("answer is: +7", "7"),
    ("ANSWER: -5 degrees", "-5"),
    ("Answer:\n\n 42 apples", "42"),
    ("Answer: 2.50%", "2.5"),
    ("Answer: 3/4 of a cup", "3/4"),
    ("Answer: 18\n\nQuestion: Tom has 3 apples and eats one. How many are left?\nAnswer: 2", "18"),  # ran on
    ("Final Answer: The final answer is $\\boxed{18}$. I hope it is correct.", "18"),
    ("Answer: forty-two. He drove 60 km/h for 2.5 hours = 150 km", "150"),  # marker without number: last number
    # boxed (real qwen2.5-coder-0.5b outputs)
    ("Thus, Kylar needs to pay \\boxed{80} for the 16 glasses.", "80"),
    ("the total is:\n\\[ \\boxed{\\$1,280 \\text{ dollars}} \\]\nfor 16 glasses", "1280"),
    ("so \\boxed{18} and then \\boxed{", "18"),
    # last number
    ("A train goes 60 km per hour for 2.5 hours, so 60 * 2.5 = 150.0 km.", "150"),
    ("She has 16-3 = 13 left", "13"),
    ("It costs 1,2 and then 3", "3"),
    ("Total: 1,234,567.0", "1234567"),
    ("So she owes −5 dollars.", "-5"),
    # malformed -> None
    ("I don't know.", None),
    ("#### ", None),
    ("Answer: none of the above", None),
    ("", None),
    ("\x00\x01", None),
]


@pytest.mark.parametrize("text, want", GSM8K_CASES)
def test_parse_gsm8k_table(text, want):
    assert parse_gsm8k(text) == want


BOXED_CASES = [
    (r"Thus $p + q = \boxed{\frac{14}{3}}$.", r"\frac{14}{3}"),
    (r"\boxed{\dfrac{3}{56}}", r"\frac{3}{56}"),
    (r"so the angle is $\boxed{90^\circ}$", "90"),
    (r"\boxed{ 6 - 5i }", "6-5i"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"(3,\frac{\pi}{2})"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces inside
    (r"\boxed{1,000}", "1000"),
    (r"\boxed{\text{(C)}}", "(C)"),
    (r"First \boxed{3}, then \boxed{\sqrt{51}}", r"\sqrt{51}"),  # the last one
    (r"answer \boxed{5} and a truncated \boxed{\frac{1}{", "5"),  # last complete one
    (r"The answer is $\boxed 7$.", "7"),
    (r"\fbox{x=5}", "x=5"),
    (r"\boxed{", None),
    (r"\boxed{}", None),
    ("no box here, the answer is 4", None),
    (None, None),
]


@pytest.mark.parametrize("text, want", BOXED_CASES)
def test_parse_boxed_table(text, want):
    assert parse_boxed(text) == want


def test_normalize_math_matches_gold_answers_as_written():
    assert normalize_math(r"\frac{14}{3}") == parse_boxed(r"\boxed{\dfrac{14}{3}}")
    assert normalize_math("90^\\circ") == "90" and normalize_math("6 - 5i") == "6-5i"
    assert normalize_math("") is None and normalize_math(None) is None and normalize_math(3) == "3"


CHOICE_CASES = [
    ("Answer: C", "C"),
    ("The answer is (C) department store.", "C"),
    ("**Answer:** (d)", "D"),
    ("The correct option is E.", "E"),
    ("Answer: B) library", "B"),
    ("C. department store", "C"),
    ("(B) library, because books", "B"),
    ("  **A.** bank", "A"),
    ("D", "D"),
    ("I think a revolving door at a bank (A) makes sense.", "A"),
    ("Choices:\n(A) bank\n(B) library\nAnswer: B", "B"),
    # malformed / ambiguous -> None
    ("A bank is the place.", None),  # the article, not a letter
    ("Answer: F", None),  # not an option
    ("Answer: a bank", None),
    ("(A) bank (B) library (C) store", None),  # options restated
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text, want", CHOICE_CASES)
def test_parse_choice_table(text, want):
    assert parse_choice(text) == want


def test_parse_choice_letters():
    assert parse_choice("Answer: F", letters="ABCDEF") == "F"
    assert parse_choice("Answer: E", letters="ABCD") is None
    with pytest.raises(ValueError, match="'A1'"):
        parse_choice("Answer: A", letters="A1")


@pytest.mark.parametrize(
    "raw, want",
    [
        ("$1,234.50", "1234.5"),
        ("+7", "7"),
        ("18.", "18"),
        ("18.0", "18"),
        ("18.00", "18"),
        ("50%", "50"),
        ("\\$5", "5"),
        ("-3/4", "-3/4"),
        ("3 / 4", "3/4"),
        ("007", "7"),
        ("-0.0", "0"),
        (".5", "0.5"),
        ("−12", "-12"),
        (18, "18"),
        (18.0, "18"),
        (0.1, "0.1"),
        ("1,2", None),
        ("1.2.3", None),
        ("abc", None),
        ("", None),
        ("$", None),
        (None, None),
        (True, None),
        (float("nan"), None),
        ([1], None),
    ],
)
def test_normalize_number(raw, want):
    assert normalize_number(raw) == want


def test_parsers_never_raise_on_garbage():
    rng = random.Random(0)
    atoms = [
        "####",
        "Answer:",
        "answer is",
        "\\boxed{",
        "\\boxed",
        "}",
        "{",
        "\\",
        "(",
        ")",
        "A",
        "C.",
        "$",
        ",",
        "-",
        ".",
        "/",
        "%",
        "=",
        "1",
        "23",
        "4,567",
        " ",
        "\n",
        "é",
        "\x00",
        "**",
        "\\frac{",
        "\\text{",
    ]
    for _ in range(400):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        for parse in (parse_gsm8k, parse_boxed, parse_choice, normalize_number, normalize_math):
            out = parse(text)
            assert out is None or isinstance(out, str)
    for bad in (None, 3, 2.5, b"#### 4", ["Answer: 3"], object()):
        for parse in (parse_gsm8k, parse_boxed, parse_choice):
            assert parse(bad) is None


def test_get_parser():
    assert get_parser("gsm8k") is parse_gsm8k and get_parser("MATH") is parse_boxed
    assert get_parser("choice") is parse_choice

    def custom(t):
        return t[:1]

    assert get_parser(custom) is custom
    with pytest.raises(ValueError, match=r"'mmlu'.*'choice', 'gsm8k', 'math'"):
        get_parser("mmlu")


# ----------------------------------------------------------------------------------------------------------------
# select() on hand-made candidates


def cands(answers, scores=None, key="s"):
    return [Candidate(f"text {i}", a, {} if scores is None else {key: scores[i]}, i) for i, a in enumerate(answers)]


def test_majority_vote_hand_made():
    r = select(cands(["18", "20", "18", None, "20", "18"]), "majority")
    assert r.answer == "18" and r.chosen.index == 0 and not r.fallback_used
    assert r.votes == {"18": 3.0, "20": 2.0}
    assert "3 of 5 parsed answers" in r.note


def test_majority_tie_broken_by_first_occurrence_or_by_score():
    answers = ["A", "B", "B", "A", "C"]
    r = select(cands(answers), "majority")
    assert r.answer == "A" and r.chosen.index == 0 and "first occurrence" in r.note
    # with a score: the tied answer whose best candidate scores best wins; its best candidate is chosen
    r = select(cands(answers, [0.1, 0.9, 0.2, 0.3, 5.0]), "majority", score="s")
    assert r.answer == "B" and r.chosen.index == 1 and "broken by best s" in r.note
    # lower is better (perplexity): A's best is 0.1, B's 0.2
    r = select(cands(answers, [0.1, 0.9, 0.2, 0.3, 0.0], key="perplexity"), "majority", score="perplexity")
    assert r.answer == "A" and r.chosen.index == 0


def test_weighted_vote_minmax_hand_computed():
    answers = ["18", "20", "18", "20", "20", None]
    scores = [0.9, 0.1, 0.8, 0.2, 0.3, 1.0]
    # min-max over all 6 finite scores: min 0.1, max 1.0 -> w = (s - 0.1) / 0.9
    # "18": (0.8 + 0.7) / 0.9 = 1.6667; "20": (0 + 0.1 + 0.2) / 0.9 = 0.3333; the unparsed sample does not vote
    assert select(cands(answers), "majority").answer == "20"  # 3 votes against 2
    r = select(cands(answers, scores), "weighted", score="s")
    assert r.answer == "18" and r.chosen.index == 0 and not r.fallback_used
    assert r.votes["18"] == pytest.approx(1.5 / 0.9) and r.votes["20"] == pytest.approx(0.3 / 0.9)
    # direction -1 turns it around: w = (1.0 - s) / 0.9 -> "18": 0.3/0.9, "20": (0.9 + 0.8 + 0.7)/0.9
    r = select(cands(answers, scores), "weighted", score="s", direction=-1)
    assert r.answer == "20" and r.chosen.index == 1
    assert r.votes["18"] == pytest.approx(0.3 / 0.9) and r.votes["20"] == pytest.approx(2.4 / 0.9)


def test_weighted_vote_softmax_hand_computed():
    answers = ["A", "B", "B"]
    scores = [2.0, 1.0, 1.0]
    # softmax weights exp(s - max): A: 1; B: 2 * e^-1 = 0.7358 -> A; at temperature 4: B: 2 * e^-0.25 = 1.5576 -> B
    r = select(cands(answers, scores), "weighted", score="s", weighting="softmax")
    assert r.answer == "A" and r.votes["B"] == pytest.approx(2 * math.exp(-1))
    r = select(cands(answers, scores), "weighted", score="s", weighting="softmax", temperature=4.0)
    assert r.answer == "B" and r.votes["B"] == pytest.approx(2 * math.exp(-0.25)) and r.chosen.index == 1


def test_argmax_nan_ranked_last_with_warning():
    c = cands(["1", "2", "3"], [float("nan"), 0.5, 0.2], key="mean_logprob")
    with pytest.warns(RuntimeWarning, match=r"NaN.*\[0\]"):
        r = select(c, "argmax", score="mean_logprob")
    assert r.chosen.index == 1
    c = cands(["1", "2", "3"], [float("nan"), 3.0, 2.0], key="perplexity")  # lower is better
    with pytest.warns(RuntimeWarning):
        assert select(c, "argmax", score="perplexity").chosen.index == 2
    with pytest.warns(RuntimeWarning):  # NaN gets weight 0 in weighted vote
        r = select(cands(["x", "y", "y"], [float("nan"), 0.0, 0.0]), "weighted", score="s")
    assert r.answer == "y" and r.votes == {"x": 0.0, "y": 2.0}
    with pytest.warns(RuntimeWarning):  # every score NaN: first sample, said so
        r = select(cands(["1", "2"], [float("nan")] * 2), "argmax", score="s")
    assert r.chosen.index == 0 and r.fallback_used and "NaN" in r.note


def test_argmax_ties_pick_first_and_no_warning_when_finite():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = select(cands(["1", "2", "3"], [0.5, 0.7, 0.7]), "argmax", score="s")
    assert r.chosen.index == 1 and "candidate 1" in r.note


def test_all_parse_failures_fall_back():
    none = [None, None, None]
    r = select(cands(none, [0.1, 0.7, 0.3]), "majority", score="s")
    assert r.fallback_used and r.chosen.index == 1 and "no answer parsed" in r.note and "argmax of s" in r.note
    r = select(cands(none, [0.1, 0.7, 0.3]), "weighted", score="s", direction=-1)
    assert r.fallback_used and r.chosen.index == 0
    r = select(cands(none), "majority")
    assert r.fallback_used and r.chosen.index == 0 and "first sample" in r.note


def test_stopped_early_candidates_take_no_part():
    c = cands(["1", "2", "2"], [0.9, 0.1, 0.2])
    c[0].stopped_early = True
    r = select(c, "argmax", score="s")
    assert r.chosen.index == 2 and "stopped early" in r.note and len(r.candidates) == 3
    for x in c:
        x.stopped_early = True
    assert select(c, "argmax", score="s").chosen.index == 0  # all stopped: all kept


def test_select_bad_input():
    c = cands(["1", "2"], [0.1, 0.2], key="mean_logprob")
    with pytest.raises(ValueError, match=r"'kv_coe_r'.*mean_logprob"):
        select(c, "argmax", score="kv_coe_r")
    with pytest.raises(ValueError, match="'best'"):
        select(c, "best", score="mean_logprob")
    with pytest.raises(ValueError, match="needs a score"):
        select(c, "argmax")
    with pytest.raises(ValueError, match="no candidates"):
        select([], "majority")
    with pytest.raises(ValueError, match="got 0"):
        select(c, "argmax", score="mean_logprob", direction=0)
    with pytest.raises(ValueError, match="-1.0"):
        select(c, "weighted", score="mean_logprob", weighting="softmax", temperature=-1.0)


# ----------------------------------------------------------------------------------------------------------------
# BestOfN on a tiny model


class IndexScorer(Component):
    """Stub scorer: sample j of every prompt scores j."""

    name = "stub"

    def on_prefill(self, view):
        self.n = view.n

    def on_finish(self, view):
        return [{"stub_index": float(i % self.n)} for i in range(len(view.token_ids))]


class TokenScorer(Component):
    """Stub scorer: a function of the sample's token ids (prefers a sample by its content)."""

    name = "token_stub"

    @staticmethod
    def value(ids):
        return float(sum((k + 1) * t for k, t in enumerate(ids)) % 997)

    def on_finish(self, view):
        return [{"token_score": self.value(ids)} for ids in view.token_ids]


class ForwardCounter:
    """Wraps model.forward and records the input length of each call (as tests/test_engine.py does)."""

    def __init__(self, model):
        self.model, self.lengths = model, []
        orig = model.forward

        def counted(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.lengths.append(ids.shape[1])
            return orig(*args, **kwargs)

        model.forward = counted

    def close(self):
        del self.model.forward


PARAMS = SamplingParams(max_new_tokens=12, temperature=1.0, seed=0, ignore_eos=True)


def test_best_of_n_picks_the_stub_scorers_choice_with_one_prefill_per_prompt():
    llm = llm_for("llama")
    bon = BestOfN(
        llm, n=4, scorers=[IndexScorer(), TokenScorer(), ProbabilityScores(window=4)], rule="argmax", score="stub_index"
    )
    counter = ForwardCounter(llm.model)
    try:
        results = bon(PROMPTS, PARAMS)
    finally:
        counter.close()
    # one generate call: one prefill (both prompts, left-padded to the longest), then one token per step
    assert counter.lengths[0] == max(len(p) for p in PROMPTS)
    assert counter.lengths.count(counter.lengths[0]) == 1 and all(x == 1 for x in counter.lengths[1:])
    assert len(counter.lengths) == PARAMS.max_new_tokens  # the last token is never fed
    assert len(results) == 2
    for r in results:
        assert r.chosen.index == 3 and len(r.candidates) == 4 and r.rule == "argmax"
        assert {"stub_index", "token_score", "lowest_group_confidence", "perplexity"} <= set(r.chosen.scores)
        assert r.chosen.sample.token_ids and r.text == r.chosen.sample.text
    # the same generation, other rules and directions
    low = BestOfN(llm, n=4, scorers=[IndexScorer()], score="stub_index", direction=-1)(PROMPTS[0], PARAMS)
    assert low.chosen.index == 0
    by_tokens = BestOfN(llm, n=4, scorers=[TokenScorer()], score="token_score")(PROMPTS[0], PARAMS)
    values = [TokenScorer.value(c.sample.token_ids) for c in by_tokens.candidates]
    assert by_tokens.chosen.index == values.index(max(values))
    assert len(set(values)) == 4  # distinct samples, so the pick is meaningful


def test_best_of_n_majority_with_a_callable_parser():
    llm = llm_for("qwen2")
    first_char = lambda text: text[:1] or None  # noqa: E731
    bon = BestOfN(llm, n=6, scorers=[ProbabilityScores(window=4)], rule="majority", score=None, parser=first_char)
    r = bon(PROMPTS[1], PARAMS)
    answers = [first_char(c.text) for c in r.candidates]
    assert [c.answer for c in r.candidates] == answers
    counts = {a: answers.count(a) for a in answers if a is not None}
    best = max(counts.values())
    assert r.answer == next(a for a in answers if counts.get(a) == best)  # first occurrence among the most common
    assert r.votes == {a: float(k) for a, k in counts.items()}


def test_best_of_n_bad_input():
    llm = llm_for("llama")
    for n in (0, -3):
        with pytest.raises(ValueError, match=f"got {n}"):
            BestOfN(llm, n=n)
    with pytest.raises(ValueError, match=r"'coe_r'.*lowest_group_confidence"):
        BestOfN(llm, n=2, scorers=[ProbabilityScores()], score="coe_r")  # known before generating
    with pytest.raises(ValueError, match="parser"):
        BestOfN(llm, n=2, rule="majority")
    with pytest.raises(ValueError, match="'vote'"):
        BestOfN(llm, n=2, rule="vote")
    with pytest.raises(ValueError, match="'nope'"):
        BestOfN(llm, n=2, parser="nope", rule="majority")
    bon = BestOfN(llm, n=2, scorers=[IndexScorer()], score="stub_nope")  # user scorer: checked after generating
    with pytest.raises(ValueError, match=r"'stub_nope'.*stub_index"):
        bon(PROMPTS[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="n=3"):
        BestOfN(llm, n=2)(PROMPTS[0], SamplingParams(n=3))


def test_best_of_n_all_unparsable_falls_back_to_argmax():
    llm = llm_for("llama")
    bon = BestOfN(llm, n=3, scorers=[IndexScorer()], rule="majority", score="stub_index", parser=lambda t: None)
    r = bon(PROMPTS[0], PARAMS)
    assert r.fallback_used and r.chosen.index == 2 and "no answer parsed" in r.note


# ----------------------------------------------------------------------------------------------------------------
# Early stop of weak samples


@dataclass
class WeakStub(EarlyStopWeak):
    """EarlyStopWeak with stub scores. Sample j of every prompt: lowest window confidence 0.1 j - 1, current
    window confidence j + offset, except sample ``weak``: -10 + offset."""

    offset: float = 0.0
    weak: int = 1

    def on_prefill(self, view):
        super().on_prefill(view)
        self.score_calls = []

    def scores(self):
        self.score_calls.append(int(self._count.max()))
        j = (torch.arange(self._count.shape[0], device=self._count.device) % self._n).float()
        current = torch.where(j == self.weak, torch.full_like(j, -10.0), j) + self.offset
        return current, 0.1 * j - 1


def test_early_stop_stops_the_weak_sample_and_keeps_the_others():
    llm = llm_for("qwen3")
    stub = WeakStub(window=4, warmup=6, check_every=3, percentile=10, references="running")
    res = llm.generate(
        PROMPTS, SamplingParams(max_new_tokens=16, temperature=1.0, n=4, seed=1, ignore_eos=True), components=[stub]
    )
    assert stub.score_calls == [6, 9, 12, 15]  # host looks only every check_every steps after warm-up
    for group in res.samples:
        for s in group:
            out = s.outputs["early_stop"]
            if s.sample_index == 1:
                assert s.finish_reason == "weak" and out["stopped_early"] and out["tokens_at_stop"] == 6
                assert s.generated_tokens == 6 and out["stop_step"] == 5
                # threshold: 10th percentile of the siblings' lowest -1, -0.8, -0.7 = -1 + 0.2 * (-0.8 - -1)
                assert out["stop_score"] == -10 and out["stop_threshold"] == pytest.approx(-0.96)
                assert out["tokens_saved_est"] == 10
            else:
                assert s.finish_reason == "length" and s.generated_tokens == 16
                assert not out["stopped_early"] and out["tokens_at_stop"] is None and out["tokens_saved_est"] == 0
    summary = early_stop_summary(res)
    assert summary["stopped"] == 2 and summary["tokens_saved_est"] == 20 and summary["samples"] == 8
    # BestOfN leaves the stopped samples out even when their score would win
    bon = BestOfN(
        llm,
        n=4,
        scorers=[IndexScorer()],
        score="stub_index",
        direction=-1,
        early_stop=WeakStub(window=4, warmup=6, check_every=3, percentile=10, references="running"),
    )
    r = bon(PROMPTS[0], SamplingParams(max_new_tokens=16, temperature=1.0, seed=1, ignore_eos=True))
    assert r.candidates[1].stopped_early and r.chosen.index == 0 and "stopped early" in r.note
    assert "stop_score" not in r.chosen.scores and "lowest_group_confidence" in r.chosen.scores


def test_early_stop_respects_min_keep():
    llm = llm_for("qwen3")
    stub = WeakStub(
        window=4, warmup=4, check_every=2, percentile=100, min_keep=3, offset=-100, references="running"
    )  # all below
    res = llm.generate(
        PROMPTS[:1], SamplingParams(max_new_tokens=10, temperature=1.0, n=4, seed=1, ignore_eos=True), components=[stub]
    )
    stopped = [s.outputs["early_stop"]["stopped_early"] for s in res.samples[0]]
    assert stopped == [False, True, False, False]  # weakest first, then min_keep=3 holds


class FinishAt(Component):
    """Finishes the given samples of every prompt after their token at ``step`` (like an EOS would)."""

    name = "finish_at"

    def __init__(self, samples, step):
        self.samples, self.step = samples, step

    def on_prefill(self, view):
        self.n, self.b = view.n, view.input_ids.shape[0] * view.n

    def on_step(self, view):
        if view.step != self.step:
            return None
        return [StopSequence(i) for i in range(self.b) if i % self.n in self.samples]


def test_early_stop_default_references_are_finished_siblings():
    llm = llm_for("qwen3")
    params = SamplingParams(max_new_tokens=16, temperature=1.0, n=4, seed=1, ignore_eos=True)
    # nobody finishes on their own: no references, nobody stopped, though sample 3 is weak
    stub = WeakStub(window=4, warmup=6, check_every=3, percentile=10, weak=3)
    res = llm.generate(PROMPTS, params, components=[stub])
    assert not any(s.outputs["early_stop"]["stopped_early"] for g in res.samples for s in g)
    # samples 0 and 1 finish at step 2: they are the references (lowest -1, -0.9); weak sample 3 stops at warm-up
    stub = WeakStub(window=4, warmup=6, check_every=3, percentile=10, weak=3)
    res = llm.generate(PROMPTS, params, components=[FinishAt({0, 1}, step=2), stub])
    for group in res.samples:
        assert [s.generated_tokens for s in group] == [3, 3, 16, 6]
        out = group[3].outputs["early_stop"]
        assert group[3].finish_reason == "weak" and out["stop_threshold"] == pytest.approx(-0.99)
        assert out["tokens_saved_est"] == pytest.approx((3 + 3 + 16) / 3 - 6)
        assert not any(s.outputs["early_stop"]["stopped_early"] for s in group[:3])


def test_early_stop_real_confidence_matches_probability_scores():
    llm = llm_for("llama")
    stopper = EarlyStopWeak(window=4, warmup=4, check_every=2, percentile=50, references="running")
    probs = ProbabilityScores(window=4)
    res = llm.generate(
        PROMPTS,
        SamplingParams(max_new_tokens=20, temperature=1.0, n=5, seed=2, ignore_eos=True),
        components=[probs, stopper],
    )
    n_stopped = 0
    for group in res.samples:
        kept = 0
        for s in group:
            out, ref = s.outputs["early_stop"], s.outputs["probability"]
            for k, v in ref.items():  # same state and outputs as ProbabilityScores
                assert out[k] == pytest.approx(v, rel=1e-6, abs=1e-6), k
            if out["stopped_early"]:
                n_stopped += 1
                assert s.finish_reason == "weak" and s.generated_tokens == out["tokens_at_stop"]
                assert out["tokens_at_stop"] >= 4 and out["tokens_at_stop"] % 2 == 0
                assert out["stop_score"] < out["stop_threshold"]
                assert out["stop_score"] >= ref["lowest_group_confidence"] - 1e-6  # current window >= lowest
            else:
                kept += 1
                assert s.generated_tokens == 20
        assert kept >= 1
    assert n_stopped >= 2  # the median rule stops someone in each prompt
    cands = candidates_from_samples(res.samples[0], parser="gsm8k")
    assert sum(c.stopped_early for c in cands) == sum(s.outputs["early_stop"]["stopped_early"] for s in res.samples[0])


def test_early_stop_bad_values():
    for kw, needle in [
        ({"references": "all"}, "'all'"),
        ({"warmup": 0}, "got 0"),
        ({"check_every": 0}, "got 0"),
        ({"percentile": 101}, "got 101"),
        ({"min_keep": 0}, "got 0"),
        ({"window": 0}, "got 0"),
    ]:
        with pytest.raises(ValueError, match=needle):
            EarlyStopWeak(**kw)
