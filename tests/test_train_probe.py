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
    assert set(report["accuracy"]) >= {"majority vote", "probe vote", "logprob vote"}
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
