"""``kvagents train probe`` end to end on a tiny model with a stub grader: records, resume, artifact, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny import ByteTokenizer, tiny_model

from kvagents import KVModel
from kvagents.evals.train_probe import TrainProbeConfig, split_rows, train_probe
from kvagents.signals.artifact import ArtifactMismatchError
from kvagents.signals.probe import KVProbe


def _data(path, n=10, field="q"):
    path.write_text("".join(json.dumps({field: f"question number {i}", "a": str(i)}) + "\n" for i in range(n)))
    return str(path)


def _cfg(tmp_path, **kw):
    base = dict(data=_data(tmp_path / "d.jsonl"), question_field="q", answer_field="a", grader="python:stub_grader:grade",
                out=str(tmp_path / "probe"), n=4, max_new_tokens=6, temperature=1.0, holdout=0.3, batch_prompts=3)
    return TrainProbeConfig(**{**base, **kw})


def test_train_probe_end_to_end_and_resume_without_loss_or_duplicates(tmp_path):
    llm = KVModel(tiny_model("qwen2"), ByteTokenizer())
    cfg = _cfg(tmp_path)
    report = train_probe(cfg, llm=llm)
    assert report["rows"] == 3 and report["train"]["rows"] == 7 and report["samples"] == 12
    assert set(report["accuracy"]) >= {"majority vote", "probe vote", "vote by mean_log_max_prob",
                                       "DeepConf top-50% vote"}
    assert report["train"]["l2"] in cfg.l2 and set(report["train"]["cv_vote_accuracy"]) == {str(x) for x in cfg.l2}
    probe = KVProbe.load(cfg.out, llm)  # tied to this model
    assert probe.metadata["metrics"]["auroc"] == report["auroc"]
    with pytest.raises(ArtifactMismatchError):
        KVProbe.load(cfg.out, KVModel(tiny_model("qwen2", seed=5), ByteTokenizer()))

    rec_path = tmp_path / "probe.work" / "records.jsonl"
    lines = rec_path.read_text().splitlines()
    assert sorted(json.loads(x)["row"] for x in lines) == list(range(10))
    # a run killed after four rows, in the middle of writing the fifth: the re-run samples only what is missing
    rec_path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:25])
    again = train_probe(cfg, llm=llm)
    new_lines = [json.loads(x) for x in rec_path.read_text().splitlines()]
    rows = [r["row"] for r in new_lines]
    assert sorted(rows) == list(range(10)) and len(rows) == len(set(rows))
    assert [json.loads(x) for x in lines[:4]] == new_lines[:4]  # kept, not sampled again
    assert again["train"]["rows"] == report["train"]["rows"] and again["train"]["samples"] == 28


def test_split_is_seeded_disjoint_and_refuses_too_few_rows():
    train, held = split_rows(20, 0.25, seed=3)
    assert not set(train) & set(held) and sorted(train + held) == list(range(20)) and len(held) == 5
    assert split_rows(20, 0.25, seed=3) == (train, held)


def test_rows_option_takes_that_slice_of_the_file(tmp_path):
    from kvagents.evals.train_probe import _rows

    rows = _rows(_cfg(tmp_path, rows="3:7"))
    assert [r["row"] for r in rows] == [3, 4, 5, 6] and rows[0]["question"] == "question number 3"
    with pytest.raises(ValueError, match="too few"):
        split_rows(3, 0.2, seed=0)


def test_train_probe_refuses_bad_input_clearly(tmp_path):
    llm = KVModel(tiny_model("qwen2"), ByteTokenizer())
    with pytest.raises(ValueError, match="has no field 'question'"):
        train_probe(_cfg(tmp_path, question_field="question"), llm=llm)
    with pytest.raises(ValueError, match="grader 'python:stub_grader:broken' raised on row 0"):
        train_probe(_cfg(tmp_path, grader="python:stub_grader:broken", out=str(tmp_path / "p2")), llm=llm)
    with pytest.raises(ValueError, match="unknown grader 'fuzzy'"):
        train_probe(_cfg(tmp_path, grader="fuzzy"), llm=llm)
    with pytest.raises(ValueError, match="too few"):
        train_probe(_cfg(tmp_path, limit=3, out=str(tmp_path / "p3")), llm=llm)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_probe(_cfg(tmp_path, data=str(tmp_path / "missing.jsonl")), llm=llm)
    assert np.isfinite(0)


def test_crossfit_scores_every_row_with_a_probe_that_never_saw_it(tmp_path):
    llm = KVModel(tiny_model("qwen2"), ByteTokenizer())
    cfg = _cfg(tmp_path, crossfit=True, folds=2, l2=[0.1, 10.0], center=True)
    report = train_probe(cfg, llm=llm)
    assert report["crossfit"]["rows"] == 10 and report["crossfit"]["samples"] == 40
    assert report["rows"] == 3 and report["train"]["center"] is True
    assert KVProbe.load(cfg.out, llm).config.center


def _rec(row, answers, correct, lp, lgc):
    return {"row": row, "samples": [{"answer": a, "correct": c, "tokens": 10, "scores": {"mean_log_max_prob": x, "mean_logprob": x,
                                      "mean_max_prob": x, "mean_entropy": -x, "lowest_group_confidence": g}}
                                     for a, c, x, g in zip(answers, correct, lp, lgc)]}


def test_rules_pick_what_a_hand_count_picks():
    from kvagents.evals.train_probe import bootstrap_se, rule_hits, weighted_vote

    assert weighted_vote(["a", "b", "b", None], [3, 1, 1, 9]) == "a"
    assert weighted_vote(["a", "b"], [1, 1]) == "a" and weighted_vote([None], [1]) is None
    # question 0: majority 'x' (wrong), the confident sample says 'y' (right); question 1: all agree on 'z' (right)
    recs = [_rec(0, ["x", "x", "y", "w"], [False, False, True, False], [-2.0, -2.0, -0.1, -3.0], [0.1, 0.2, 0.9, 0.8]),
            _rec(1, ["z"] * 4, [True] * 4, [-1.0] * 4, [0.5] * 4)]
    hits = rule_hits(recs, probs={0: [0.1, 0.1, 0.9, 0.2], 1: [0.5] * 4})
    assert hits["majority vote"].tolist() == [0.0, 1.0]
    assert hits["random sample"].tolist() == [0.25, 1.0]
    # min-max weights of question 0: x: 2 * (1.0 / 2.9) + 2e-3 = 0.692, y: 1.001 -> y wins
    assert hits["vote by mean_log_max_prob"].tolist() == [1.0, 1.0]
    assert hits["probe vote"].tolist() == [1.0, 1.0] and hits["probe argmax"].tolist() == [1.0, 1.0]
    # DeepConf keeps the half with lowest_group_confidence >= the median (0.5): 'y' and 'w' -> a tie, 'y' seen first
    assert hits["DeepConf top-50% vote"].tolist() == [1.0, 1.0]
    assert bootstrap_se([1.0, 1.0, 1.0]) == 0.0 and bootstrap_se([0, 1] * 50) > 0


def test_centred_probe_ranks_within_a_prompt_and_ignores_the_prompts_offset():
    from kvagents.signals.probe import center_by_group, probe_pooling

    x = np.array([[1.0, 5.0], [3.0, 5.0], [np.nan, 0.0], [10.0, 0.0], [14.0, 2.0]])
    c = center_by_group(x, np.array([0, 0, 1, 1, 1]))
    np.testing.assert_allclose(c[[0, 1, 3, 4]], [[-1, 0], [1, 0], [-2, -1], [2, 1]])
    assert np.isnan(c[2, 0])  # a row with no features stays as it is and is left out of its group's mean
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 4)
    offset = rng.normal(scale=50, size=(60, 1))[groups]  # each prompt shifts its samples: only within-prompt order counts
    signal = rng.normal(size=(240, 1))
    y = (signal[:, 0] > np.median(signal)).astype(float)
    feats = np.concatenate([signal + offset, rng.normal(size=(240, 2))], 1)
    centred = KVProbe.fit(feats, y, probe_pooling(1), l2=0.1, groups=groups)
    flat = KVProbe.fit(feats, y, probe_pooling(1), l2=0.1)
    def within(p):
        return np.mean([np.argmax(p.predict(feats[groups == g], groups=np.zeros(4)) if p.config.center else
                                  p.predict(feats[groups == g])) == np.argmax(signal[groups == g, 0]) for g in range(60)])
    assert centred.config.center and not flat.config.center
    assert within(centred) > 0.9 and within(centred) > within(flat) + 0.2


def test_adaptive_replay_stops_where_a_hand_count_does():
    from kvagents.evals.train_probe import adaptive_report

    recs = [_rec(1, ["z"] * 4, [True] * 4, [-1.0] * 4, [0.5] * 4),
            _rec(2, ["a", "b", "a", "a"], [False, True, False, False], [-1.0] * 4, [0.5] * 4)]
    rep = adaptive_report(recs, wave=2)
    assert rep["majority vote, fixed n"] == {"accuracy": 0.5, "tokens": 40.0}
    # decided: after 2 of 4 'z' vs nothing, 2 > 0 + 2 remaining is false -> all 4; row 2 never decided -> 4
    assert rep["majority vote, decided 0.95"]["tokens"] == 40.0
    # beta 0.8: row 1 after 2 samples: P(Beta(3, 1) > 1/2) = 1 - 0.5 ** 3 = 0.875 >= 0.8 -> stops at 2 (20 tokens);
    # row 2 after 2: a tie (1 vs 1) never stops; after 4: the end
    assert rep["majority vote, beta 0.8"] == {"accuracy": 0.5, "tokens": 30.0}
    assert "probe vote, fixed n" not in rep


@pytest.mark.parametrize("grader, text, ref, want", [
    ("gsm8k", "so 2 + 2 = 4. Answer: 1,000", "work... #### 1000", True),
    ("gsm8k", "Answer: 999", "#### 1000", False),
    ("math", "hence \\boxed{\\frac{14}{3}}.", "\\frac{14}{3}", True),
    ("math", "hence \\boxed{5}", "6", False),
    ("choice", "The answer is (B).", "B", True),
])
def test_built_in_graders_grade_by_the_parsed_answer(grader, text, ref, want):
    from kvagents.evals.train_probe import load_grader

    grade, parse = load_grader(grader)
    assert grade(text, ref) is want
    assert parse(text) is not None


def test_recorded_poolings_are_the_tokens_they_name_and_train_without_sampling_again(tmp_path):
    llm = KVModel(tiny_model("qwen2"), ByteTokenizer())
    cfg = _cfg(tmp_path, record=["window:1", "last", "window:64", "window:2"], l2=[1.0])
    train_probe(cfg, llm=llm)
    work = tmp_path / "probe.work"
    recs = {json.loads(x)["row"]: json.loads(x) for x in (work / "records.jsonl").read_text().splitlines()}
    for row, rec in recs.items():
        f = {t: np.load(work / "features" / f"{row}{t}.npy") for t in ("", ".w1", ".last", ".w64", ".w2")}
        assert all(v.shape == f[""].shape for v in f.values())
        np.testing.assert_allclose(f[".w1"], f[".last"], rtol=1e-6)  # the last fed token either way
        np.testing.assert_allclose(f[".w64"], f[""], rtol=1e-5, atol=1e-6)  # 6 tokens < 64: the window is all of them
        fed = [s["tokens"] - 1 for s in rec["samples"]]  # the last sampled token never enters the cache
        for i, k in enumerate(fed):
            if k >= 3:  # the mean of the last two rows is not the mean of three or more
                assert not np.allclose(f[".w2"][i], f[""][i])
    # a probe over the last two tokens, from the recorded features only: nothing is sampled again
    before = (work / "records.jsonl").read_text()
    cfg2 = TrainProbeConfig(**{**cfg.model_dump(), "positions": "window:2", "record": []})
    report = train_probe(cfg2, llm=llm)
    assert (work / "records.jsonl").read_text() == before and report["train"]["positions"] == "window:2"
    probe = KVProbe.load(cfg.out, llm)
    assert probe.config.pooling.positions == "window" and probe.config.pooling.window == 2
    # served: the probe scoring inside the decode loop gives what it was trained on (the first batch again)
    from kvagents import SamplingParams
    from kvagents.signals.probe import KVProbeScore

    prompts = [f"question number {i}\n\n{cfg.instruction}" for i in range(3)]
    res = llm.generate(prompts, SamplingParams(n=4, max_new_tokens=6, temperature=1.0, top_p=0.95, seed=0),
                       components=[KVProbeScore(probe)])
    for row, group in enumerate(res.samples):
        assert [s.generated_tokens for s in group] == [s["tokens"] for s in recs[row]["samples"]]
        want = probe.predict(np.load(work / "features" / f"{row}.w2.npy"))
        np.testing.assert_allclose([s.outputs["kv_probe"]["kv_probe"] for s in group], want, rtol=1e-4, atol=1e-6)
    # a folder sampled without a pooling's features is refused, not sampled again over its records
    with pytest.raises(ValueError, match=r"recorded without the features \['.w8.npy'\]"):
        train_probe(TrainProbeConfig(**{**cfg.model_dump(), "record": ["window:8"]}), llm=llm)
    with pytest.raises(ValueError, match=r"recorded without the features \['.w8.npy'\]"):
        train_probe(TrainProbeConfig(**{**cfg.model_dump(), "positions": "window:8", "record": []}), llm=llm)
    assert (work / "records.jsonl").read_text() == before  # nothing dropped
    with pytest.raises(ValueError, match="probe positions 'window:0'"):
        TrainProbeConfig(**{**cfg.model_dump(), "positions": "window:0"})
