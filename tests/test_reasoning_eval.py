"""``kvagents eval reasoning``: labels, slices, the calibration simulator, and every stage end to end on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tiny import ByteTokenizer, tiny_model

from kvagents import KVModel
from kvagents.cli import main as cli_main
from kvagents.evals import reasoning as er


def test_paper_and_gain_labels():
    assert er.paper_label(True, 10, True) == 0 and er.paper_label(True, 200, False) == 25
    assert er.paper_label(False, 5, True) == 75 and er.paper_label(False, 5, False) == 100
    assert [er.gain_label(f, s) for f in (0, 1) for s in (0, 1)] == [0, 100, 0, 0]


def write_data(folder, n=12):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "gsm8k.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}\n#### {2 * i}"}) + "\n")
    with open(folder / "commonsenseqa.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "en": f"Question: pick {i}?\nChoices:\n(A) a\n(B) b", "answer": "AB"[i % 2]})
                    + "\n")
    with open(folder / "math500.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"problem": f"Find $x$ if $x={i}$.", "answer": str(i)}) + "\n")
    return folder


def test_slices_are_named_disjoint_and_checked(tmp_path):
    data = write_data(tmp_path / "d", n=12)
    cfg = er.ReasoningEvalConfig(data_dir=str(data), train_per_dataset=5, eval_per_dataset=4)
    sl = er.slices(cfg)
    for d in cfg.datasets:
        a, b = sl["eval"][d], sl["train"][d]
        assert a == [0, 4] and b == [7, 12] and a[1] <= b[0]
    assert er.slice_names(sl["train"]) == "gsm8k[7:12] + commonsenseqa[7:12] + math500[7:12]"
    rows = er.load_rows(cfg, "eval")
    assert [r["gold"] for r in rows if r["dataset"] == "gsm8k"] == ["0", "2", "4", "6"]
    assert {r["gold"] for r in rows if r["dataset"] == "commonsenseqa"} == {"A", "B"}
    with pytest.raises(ValueError, match="would overlap"):
        er.slices(cfg.model_copy(update={"train_per_dataset": 9}))
    with pytest.raises(ValueError, match="unknown datasets"):
        er.ReasoningEvalConfig(datasets=["gsm8k", "mmlu"])


def test_outcome_simulator_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    n = 40
    fast = [{"correct": bool(rng.integers(2)), "tokens": int(rng.integers(3, 12))} for _ in range(n)]
    slow, preds = [], []
    for _ in range(n):
        k = int(rng.integers(0, 6))
        slow.append({"correct": bool(rng.integers(2)), "tokens": 40 + 10 * k,
                     "checkpoints": [{"correct": bool(rng.integers(2)), "tokens": 8 * (j + 1) + 5} for j in range(k)]})
        preds.append(rng.uniform(0, 100, k))
    pp = rng.uniform(0, 100, n)
    out = er.Outcomes(fast, slow, preds)
    for tau_p, tau_s, cap in [(50, 30, None), (-math.inf, 60, 2), (math.inf, 0, None), (20, -math.inf, 1)]:
        c, t = out.simulate(pp, tau_p, tau_s, cap)
        for i in range(n):
            if pp[i] < tau_p:
                want = (fast[i]["correct"], fast[i]["tokens"])
            else:
                hit = [j for j in range(len(preds[i])) if preds[i][j] < tau_s or j == cap]
                src = slow[i]["checkpoints"][hit[0]] if hit else slow[i]
                want = (src["correct"], src["tokens"])
            assert (bool(c[i]), float(t[i])) == (bool(want[0]), float(want[1]))


def test_every_stage_end_to_end_on_a_tiny_model(tmp_path):
    data = write_data(tmp_path / "d", n=10)
    llm = KVModel(tiny_model("qwen2"), ByteTokenizer())
    cfg = er.ReasoningEvalConfig(model="tiny", data_dir=str(data), train_per_dataset=4, eval_per_dataset=3,
                                 fast_tokens=6, slow_tokens=40, answer_tokens=6, every=8, window=8, layers=2,
                                 budgets=[8, 16, 24], batch_prompts=8, folds=2, device="cpu")
    work = tmp_path / "w"
    res = er.run_all(cfg, work, tmp_path / "out", llm=llm)
    st = res["strategies"]
    for name in ("always-fast", "always-slow", "budget 8", "budget 16", "budget 24", "online paper", "online ours",
                 "prefill-only router (paper)", "prefill-only router (ours)", "oracle router",
                 "post-hoc switching (paper; all decoded tokens)"):
        assert name in st and st[name]["mixture"]["rows"] == 9, name
    assert any(k.startswith("random routing") for k in st)
    for f in ("results.md", "results.json", "pareto.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    slow = er._read_jsonl(work / "eval_slow.jsonl")
    for b in cfg.budgets:  # budget runs never think longer than their budget
        for r in er._read_jsonl(work / f"eval_budget_{b}.jsonl"):
            assert r["thinking"] <= b and r["answer_tokens"] <= cfg.answer_tokens
    for r in er._read_jsonl(work / "eval_online_ours.jsonl") + er._read_jsonl(work / "eval_online_paper.jsonl"):
        assert r["thinking"] + r["answer_tokens"] + r["forced"] == r["tokens"]
    # the answer-convergence exit in the loop (alone, and on top of our router): look-ahead tokens are counted
    er.eval_online(cfg.model_copy(update={"patience": 2, "lookahead_tokens": 3}), work, er.Runner(cfg, llm=llm),
                   names=("online_convergence", "online_ours_convergence"))
    for name in ("online_convergence", "online_ours_convergence"):
        recs = er._read_jsonl(work / f"eval_{name}.jsonl")
        assert len(recs) == 9
        for r in recs:
            assert r["thinking"] + r["answer_tokens"] + r["forced"] + r["lookahead_tokens"] == r["tokens"]
            if r["start"] == "slow" and r["thinking"] >= cfg.every:
                assert r["lookahead_tokens"] > 0  # at least one look-ahead after `every` thinking tokens
    assert "online convergence" in er.report(cfg, work, tmp_path / "out3")["strategies"]
    post = er._read_jsonl(work / "eval_posthoc.jsonl")
    assert all(p["tokens_all"] >= p["tokens"] for p in post)
    assert all(p["tokens_all"] == s["tokens"] for p, s in zip(post, slow) if p["posthoc"] == "slow")
    feats = np.load(work / "train_features.npz")
    assert feats["prompt"].shape == (12, 2 * 2 * 16) and len(feats["win_row"]) == len(feats["windows"])
    rep = json.loads((work / "train_report.json").read_text())
    assert rep["rows"] == 12 and "calibration" in rep
    # the report stage alone, through the CLI, appends to a results file
    md = tmp_path / "results.md"
    md.write_text("# Evaluations\n")
    cli_main(["eval", "reasoning", "report", "--data-dir", str(data), "--train-per-dataset", "4",
              "--eval-per-dataset", "3", "--budgets", "8", "16", "24", "--work", str(work), "--out",
              str(tmp_path / "out2"), "--append-results", str(md)])
    assert "online ours" in md.read_text() and "## Fast/slow thinking with a KV classifier, online" in md.read_text()


def test_cli_reports_bad_settings_clearly(tmp_path, capsys):
    data = write_data(tmp_path / "d", n=6)
    assert cli_main(["eval", "reasoning", "collect", "--data-dir", str(data), "--train-per-dataset", "4",
              "--eval-per-dataset", "4", "--work", str(tmp_path / "w")]) == 2
    assert 'would overlap' in capsys.readouterr().err
    assert cli_main(["eval", "reasoning", "report", "--data-dir", str(data), "--every", "0"]) == 2
    assert 'every must be >= 1' in capsys.readouterr().err
    assert cli_main(["eval", "reasoning", "collect", "--data-dir", str(tmp_path / "nowhere"), "--work", str(tmp_path)]) == 2
    assert 'not found' in capsys.readouterr().err
