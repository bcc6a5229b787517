"""The strategies ``kvagents train router --from-work`` simulates from recorded runs (answer-convergence exit with
its look-ahead cost, budgets, the calibrated rule, the stratified split) and ``bench/merge_reasoning_work.py``,
on hand-built records with hand-computed expectations."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from kvagents.evals.train_probe import split_rows
from kvagents.evals.train_router import Rule, RuleGrid, Trials, read_work, split_by_dataset, subsample

LA = [20, 21, 22, 23, 24, 25]  # look-ahead cost at each checkpoint: end-of-thinking marker + trial answer tokens


def _ckpts(answers, correct, la=LA, every=32):
    return [{"step": every * (j + 1) - 1, "correct": c, "tokens": every * (j + 1) + la[j], "answer": a,
             "answer_tokens": la[j] - 18} for j, (a, c) in enumerate(zip(answers, correct))]


def _rows():
    """Row 0 thinks 300 tokens (final answer right), its trial answers None, 3, 3, 5, 5, 5 (right from checkpoint 3
    on); row 1 thinks 70 tokens (wrong), trial answers 7, None."""
    fast = [{"dataset": "gsm8k", "row": 0, "correct": False, "tokens": 12},
            {"dataset": "math500", "row": 1, "correct": True, "tokens": 9}]
    slow = [{"dataset": "gsm8k", "row": 0, "correct": True, "tokens": 300,
             "checkpoints": _ckpts([None, "3", "3", "5", "5", "5"], [False, False, False, True, True, True])},
            {"dataset": "math500", "row": 1, "correct": False, "tokens": 70,
             "checkpoints": _ckpts(["7", None], [True, False])}]
    return fast, slow


def test_convergence_exit_stops_where_the_trial_answers_agree_and_pays_every_look_ahead():
    tr = Trials(*_rows())
    assert tr.streak[0].tolist() == [0, 1, 2, 1, 2, 3] and tr.streak[1, :2].tolist() == [1, 0]
    assert tr.la[0].tolist() == LA
    # patience 1: the first parsed answer (checkpoint 1, step 63): its early exit 64 + 21 tokens, plus the
    # look-ahead at checkpoint 0 (20); row 1 stops at once at checkpoint 0: 32 + 20, nothing before it
    c, t = tr.exit(patience=1)
    assert c.tolist() == [False, True] and t.tolist() == [64 + 21 + 20, 32 + 20]
    # patience 2: row 0 at checkpoint 2 (3, 3): 96 + 22 + 20 + 21; row 1 never converges: its whole slow run plus
    # both look-aheads, and the slow answer
    c, t = tr.exit(patience=2)
    assert c.tolist() == [False, False] and t.tolist() == [96 + 22 + 20 + 21, 70 + 20 + 21]
    # the controller's accounting also pays the look-ahead that converged (it answers again on the main sequence)
    assert tr.exit(patience=2, final_lookahead=True)[1].tolist() == [96 + 22 + 20 + 21 + 22, 70 + 20 + 21]
    # patience 3: row 0 at checkpoint 5 (5, 5, 5), right: 192 + 25 + 20 + 21 + 22 + 23 + 24
    c, t = tr.exit(patience=3)
    assert c.tolist() == [True, False] and t[0] == 192 + 25 + 110
    # patience 4: never; the slow run (300, right) plus all six look-aheads
    c, t = tr.exit(patience=4)
    assert c[0] and t[0] == 300 + sum(LA)
    # a look-ahead only every 64 tokens (checkpoints 1, 3, 5: answers 3, 5, 5): patience 2 stops at checkpoint 5,
    # paying the look-aheads at 1 and 3 only
    c, t = tr.exit(patience=2, stride=2)
    assert tr.lookaheads(2)[0][0].tolist() == [0, 1, 0, 1, 0, 2]
    assert c[0] and t[0] == 192 + 25 + 21 + 23


def test_step_head_budgets_and_the_routed_rule():
    fast, slow = _rows()
    pred = [np.array([50.0, 50.0, 5.0, 50.0, 50.0, 50.0]), np.array([50.0, 50.0])]
    tr = Trials(fast, slow, pred)
    # the step head stops row 0 at checkpoint 2 (5 < 10) before patience 3 would; the look-aheads before it are paid,
    # the stop's own is not (no look-ahead is needed where the step head stops)
    c, t = tr.exit(tau_step=10.0, patience=3, final_lookahead=True)
    assert t[0] == 96 + 22 + 20 + 21 and not c[0]
    assert tr.exit(tau_step=10.0)[1][0] == 96 + 22  # no convergence: no look-ahead at all
    # budgets: the early exit at the first checkpoint at or past b generated tokens; a run that ended before: slow
    c, t = tr.exit(budget=128)
    assert c.tolist() == [True, False] and t.tolist() == [128 + 23, 70]
    c, t = tr.exit(budget=64)
    assert c.tolist() == [False, False] and t.tolist() == [64 + 21, 64 + 21]
    # a checkpoint cap (index 1) is a thinking budget too
    assert tr.exit(cap=1)[1].tolist() == [64 + 21, 64 + 21]
    # the routed rule: row 1 fast (gain 10 < 20), row 0 slow with patience 2
    c, t, is_fast, early = tr.rule(np.array([30.0, 10.0]), Rule(20.0, -math.inf, None, 2))
    assert c.tolist() == [False, True] and t.tolist() == [96 + 22 + 20 + 21, 9]
    assert is_fast.tolist() == [False, True] and early.tolist() == [True, False]


def test_rule_grid_picks_the_fewest_tokens_within_the_tolerance():
    # no checkpoints: fast or slow only. Fast right on rows 0 and 2, slow on 0, 1 and 3 (always-slow 75 %)
    fast = [{"dataset": "d", "row": i, "correct": c, "tokens": 10} for i, c in enumerate([True, False, True, False])]
    slow = [{"dataset": "d", "row": i, "correct": c, "tokens": 100, "checkpoints": []}
            for i, c in enumerate([True, True, False, True])]
    tr = Trials(fast, slow)
    gain = np.array([0.0, 90.0, 10.0, 80.0])
    grid = RuleGrid(tr, gain, np.zeros(0), [None], np.array([0, 0, 1, 1]))

    def chosen(tol):
        r = grid.rules[grid.choose(tol)]
        c, t, _, _ = tr.rule(gain, r)
        return c.mean(), t.mean()

    assert chosen(0.5) == (0.75, 32.5)  # rows 0, 2, 3 fast: 75 % (= always-slow) at (10 + 100 + 10 + 10) / 4
    assert chosen(-1.0) == (1.0, 55.0)  # more than always-slow asked: rows 0 and 2 fast, 100 %
    assert chosen(30.0) == (0.5, 10.0)  # 30 points allowed: all fast
    # chosen on the first two rows only (slow 100 % there): row 0 fast, row 1 slow
    r = grid.rules[grid.choose(0.0, [0])]
    assert r.tau_gain > 0.0 and r.tau_gain <= 90.0
    cf = grid.cross_fit_tolerance([0.0, 30.0], target=10.0)
    assert [x["tolerance"] for x in cf["table"]] == [0.0, 30.0] and cf["chosen"] in (0.0, 30.0)


def test_split_by_dataset_is_stratified_and_nested_subsamples():
    ds = ["a"] * 50 + ["b"] * 30 + ["c"] * 10
    train, held = split_by_dataset(ds, 0.2, 3)
    assert sorted(train + held) == list(range(90)) and not set(train) & set(held)
    assert [sum(ds[i] == d for i in held) for d in "abc"] == [10, 6, 2]
    assert split_by_dataset(["x"] * 40, 0.25, 5) == split_rows(40, 0.25, 5)  # one dataset: the old split
    half, quarter = subsample(ds, train, 0.5, 3), subsample(ds, train, 0.25, 3)
    assert set(quarter) <= set(half) <= set(train)
    assert [sum(ds[i] == d for i in half) for d in "abc"] == [20, 12, 4]
    with pytest.raises(ValueError, match="too few"):
        split_by_dataset(["a", "b", "c"], 0.2, 0)


# -- bench/merge_reasoning_work.py


def _merge_module():
    path = Path(__file__).resolve().parents[1] / "bench" / "merge_reasoning_work.py"
    spec = importlib.util.spec_from_file_location("merge_reasoning_work", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _work(folder: Path, rows: list[tuple[str, int]], window=8, every=8, d=4, seed=0):
    """A collect work folder: row k has k % 3 + 1 windows, each window's features = (row number, checkpoint)."""
    folder.mkdir(parents=True)
    fast, slow, prompt, windows, win_row, win_step, tokens = [], [], [], [], [], [], []
    for i, (ds, r) in enumerate(rows):
        k = r % 3 + 1
        fast.append({"dataset": ds, "row": r, "correct": True, "tokens": 5, "answer": "1"})
        slow.append({"dataset": ds, "row": r, "correct": True, "tokens": 40,
                     "checkpoints": [{"step": every * (j + 1) - 1, "correct": True, "tokens": 20, "answer": "1",
                                      "answer_tokens": 2} for j in range(k)]})
        prompt.append(np.full(d, r, np.float32))
        for j in range(k):
            windows.append(np.array([r, j] + [seed] * (d - 2), np.float32))
            win_row.append(i)
            win_step.append(every * (j + 1) - 1)
        tokens.append([r, r + 1])
    for name, recs in (("train_fast.jsonl", fast), ("train_slow.jsonl", slow)):
        (folder / name).write_text("".join(json.dumps(x) + "\n" for x in recs))
    np.savez_compressed(folder / "train_features.npz", prompt=np.stack(prompt), windows=np.stack(windows),
                        win_row=np.array(win_row), win_step=np.array(win_step))
    (folder / "train_features.tokens.json").write_text(json.dumps(tokens))
    (folder / "window.json").write_text(json.dumps({"window": window, "slow_cue_tokens": 3}))
    conf = {"model": "tiny", "format": "plain", "fast_tokens": 4, "slow_tokens": 40, "answer_tokens": 2,
            "every": every, "layers": 2, "window": 8, "datasets": sorted({x for x, _ in rows})}
    (folder / "config.json").write_text(json.dumps({"config": conf, "train": folder.name}))
    return folder


def test_merge_deduplicates_rows_and_renumbers_windows(tmp_path):
    m = _merge_module()
    a = _work(tmp_path / "a", [("gsm8k", 1), ("gsm8k", 2), ("commonsenseqa", 1)])
    b = _work(tmp_path / "b", [("gsm8k", 2), ("math500", 4), ("gsm8k", 5)], seed=9)
    s = m.merge(tmp_path / "m", [a, b])
    assert s == {"rows": 5, "duplicates": 1, "per_dataset": {"gsm8k": 3, "commonsenseqa": 1, "math500": 1},
                 "windows": 2 + 3 + 2 + 2 + 3}
    data, info = read_work(tmp_path / "m")
    assert data.names == ["gsm8k:1", "gsm8k:2", "commonsenseqa:1", "math500:4", "gsm8k:5"]
    assert info["window"] == 8 and info["config"]["datasets"] == ["commonsenseqa", "gsm8k", "math500"]
    assert data.win_row.tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 4]
    # each window follows its row; gsm8k:2 kept from the first folder (seed column 0), math500:4 from the second
    assert data.windows[:, 0].tolist() == [1, 1, 2, 2, 2, 1, 1, 4, 4, 5, 5, 5]
    assert data.windows[2:5, 2].tolist() == [0, 0, 0] and data.windows[7:, 2].tolist() == [9] * 5
    assert data.prompt[:, 0].tolist() == [1, 2, 1, 4, 5]
    z = np.load(tmp_path / "m" / "train_features.npz")
    assert z["win_step"].tolist() == [7, 15, 7, 15, 23, 7, 15, 7, 15, 7, 15, 23]
    assert json.loads((tmp_path / "m" / "train_features.tokens.json").read_text()) == [[1, 2], [2, 3], [1, 2],
                                                                                          [4, 5], [5, 6]]
    with pytest.raises(FileExistsError):
        m.merge(tmp_path / "m", [a, b])


def test_merge_refuses_folders_collected_otherwise(tmp_path, capsys):
    m = _merge_module()
    a = _work(tmp_path / "a", [("gsm8k", 1), ("gsm8k", 2)])
    b = _work(tmp_path / "b", [("gsm8k", 3)], window=6)
    with pytest.raises(ValueError, match="window 8 vs 6"):
        m.merge(tmp_path / "m", [a, b])
    c = _work(tmp_path / "c", [("gsm8k", 3)], every=16)
    with pytest.raises(ValueError, match="every 8 vs 16"):
        m.merge(tmp_path / "m", [a, c])
    d = _work(tmp_path / "d", [("gsm8k", 3)], d=6)
    with pytest.raises(ValueError, match="feature width 4 vs 6"):
        m.merge(tmp_path / "m", [a, d])
    assert not (tmp_path / "m").exists()  # refused before writing anything
    assert m.main([str(tmp_path / "m"), str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot merge") and "window 8 vs 6" in err
