"""The selection evaluation's aggregation on hand-made records (hand-computed expectations)."""

import math

import pytest

from kvagents.evals.selection import best_of_n, majority, markdown_table, summarize


def rec(row, answer, gold, score, tokens=10):
    return {"row": row, "sample": 0, "answer": answer, "gold": gold, "correct": answer == gold, "tokens": tokens,
            "finish": "eos", "scores": {"mean_logprob": score, "perplexity": -score}}


RECORDS = [
    # row 0: majority "3" is wrong; the best mean_logprob picks "5" (right)
    rec(0, "3", "5", -2.0), rec(0, "3", "5", -1.5), rec(0, "5", "5", -0.1),
    # row 1: majority right, best score wrong
    rec(1, "7", "7", -1.0), rec(1, "7", "7", -1.1), rec(1, "8", "7", -0.2),
    # row 2: nothing parsed on one sample, NaN score on another
    rec(2, None, "1", -0.5), rec(2, "1", "1", math.nan), rec(2, "2", "1", -3.0),
]


def test_best_of_n_majority_and_weighted_vote():
    groups = {}
    for r in RECORDS:
        groups.setdefault(r["row"], []).append(r)
    assert best_of_n(groups, "mean_logprob") == pytest.approx(1 / 3)  # picks 5 (ok), 8 (wrong), None (wrong)
    assert best_of_n(groups, "perplexity") == pytest.approx(1 / 3)  # direction -1 -> same ranking
    assert majority(groups) == pytest.approx(2 / 3)  # row 0 wrong, row 1 right, row 2 tie 1 vs 2 -> first seen "1"
    # weighted by min-max normalised mean_logprob: row0 3:(0+0.26) vs 5:1 -> 5 right; row1 7:(0.11+0) vs 8:1 -> wrong
    assert majority(groups, weight="mean_logprob") == pytest.approx(2 / 3)


def test_summary_and_table():
    s = summarize(RECORDS, greedy=[RECORDS[2]])
    assert s["oracle_any_correct"] == 1.0 and s["single_sample_accuracy"] == pytest.approx(4 / 9)
    assert s["scores"]["mean_logprob"]["direction"] == 1 and s["scores"]["perplexity"]["direction"] == -1
    assert "| majority vote | 66.7 |" in markdown_table(s)
