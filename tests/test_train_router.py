"""``kvagents train router`` on a tiny model with a stub grader: records, resume after a kill, the router artifact,
the controller taking a router, training from a collected work folder, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import ByteTokenizer, tiny_model

from kvagents import KVModel
from kvagents.cli import main as cli_main
from kvagents.evals import reasoning as er
from kvagents.evals.train_router import TrainRouterConfig, format_report, read_work, train_router
from kvagents.signals.artifact import ArtifactError, ArtifactMismatchError, fingerprint
from kvagents.signals.kv_classifier import KVClassifier, KVClassifierConfig, KVRouter, KVRouterConfig

STRATEGIES = {"always-fast", "always-slow", "router", "oracle router"}


def _data(path, n=12, field="q"):
    path.write_text("".join(json.dumps({field: f"question number {i}: what is {i} and {i}?", "a": str(i)}) + "\n"
                            for i in range(n)))
    return str(path)


def _cfg(tmp_path, **kw):
    base = dict(data=_data(tmp_path / "d.jsonl"), question_field="q", answer_field="a", grader="python:stub_grader:grade",
                out=str(tmp_path / "router"), fast_tokens=4, slow_tokens=60, answer_tokens=4, every=8, window=8,
                layers=2, folds=2, batch_prompts=5, holdout=0.25, device="cpu")
    return TrainRouterConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def llm():
    return KVModel(tiny_model("qwen2"), ByteTokenizer())


def _lines(path):
    return path.read_text().splitlines()


def test_train_router_end_to_end_then_resume_after_a_kill_loses_and_duplicates_nothing(tmp_path, llm, monkeypatch):
    cfg = _cfg(tmp_path)
    calls = {"n": 0}
    real_fast = er._fast

    def killed_at_second_batch(*a, **k):  # the run dies in its second batch, before recording it
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_fast(*a, **k)

    monkeypatch.setattr(er, "_fast", killed_at_second_batch)
    with pytest.raises(KeyboardInterrupt):
        train_router(cfg, llm=llm)
    rec_path = tmp_path / "router.work" / "records.jsonl"
    first = _lines(rec_path)
    assert [json.loads(x)["row"] for x in first] == list(range(5))  # the first batch was recorded as it came
    # ... and the kill also cut the last record in the middle of its line
    rec_path.write_text("\n".join(first[:4]) + "\n" + first[4][:30])
    monkeypatch.setattr(er, "_fast", real_fast)

    report = train_router(cfg, llm=llm)
    recs = [json.loads(x) for x in _lines(rec_path)]
    rows = [r["row"] for r in recs]
    assert sorted(rows) == list(range(12)) and len(rows) == len(set(rows))
    assert [json.loads(x) for x in first[:4]] == recs[:4]  # kept, not generated again
    for r in recs:
        assert (tmp_path / "router.work" / "features" / f"{r['row']}.npz").is_file()
        assert r["fast"]["tokens"] > 0 and len(r["slow"]["checkpoints"]) >= 1
        assert all({"step", "correct", "tokens", "answer", "answer_tokens"} <= set(c) for c in r["slow"]["checkpoints"])

    h = report["held_out"]
    assert h["rows"] == 3 and report["train"]["rows"] == 9 and STRATEGIES <= set(h)
    assert h["oracle router"]["accuracy"] >= max(h["always-fast"]["accuracy"], h["always-slow"]["accuracy"])
    assert h["router"]["accuracy"] in {k / 3 for k in range(4)} and 0 <= h["router"]["fast_rate"] <= 1
    text = format_report(report)
    assert "always-slow" in text and "oracle router" in text and "thresholds: gain" in text

    router = KVRouter.load(cfg.out, llm)  # tied to this model
    meta = router.metadata
    assert meta["metrics"]["held_out"] == h and meta["kind"] == "kv_router" and meta["kvagents_version"]
    assert meta["config"]["gain"]["window"] == 8 and meta["config"]["gain"]["layers"] == 2
    assert meta["config"]["router"]["tau_gain"] == report["calibration"]["tau_gain"]
    train_rows, held_rows = meta["training"]["train_rows"], meta["training"]["holdout_rows"]
    assert len(held_rows) == 3 and not set(train_rows) & set(held_rows) and len(train_rows) + 3 == 12

    # a run with other settings on the same records is refused, naming the setting
    with pytest.raises(ValueError, match="other settings .*every 8 there, 16 now"):
        train_router(_cfg(tmp_path, every=16), llm=llm)


def test_router_artifact_round_trip_fingerprint_and_loaders(tmp_path, llm):
    cfg = _cfg(tmp_path, seeds=[0])
    train_router(cfg, llm=llm)
    router = KVRouter.load(cfg.out, llm)
    again = KVRouter.load(cfg.out)
    x = np.random.default_rng(0).normal(size=(7, router.dim)).astype(np.float32)
    assert np.array_equal(router.predict(x), again.predict(x))
    assert np.array_equal(router.predict_step(x), again.predict_step(x))
    assert router.metadata["config"]["calibration"]["tau_gain"] == router.settings.tau_gain
    # a router fresh from training predicts exactly what its saved folder does
    rng = np.random.default_rng(1)
    kc = KVClassifierConfig(layers=2, window=8, hidden=16)
    xs, ws = rng.normal(size=(40, router.dim)).astype(np.float32), rng.normal(size=(60, router.dim)).astype(np.float32)
    gain, _ = KVClassifier.fit(xs, 100.0 * (xs[:, 0] > 0), kc, max_epochs=5)
    step, _ = KVClassifier.fit(ws, 100.0 * (ws[:, 1] > 0), kc, max_epochs=5)
    fresh = KVRouter(gain, step, KVRouterConfig(tau_gain=55.0, tau_step=12.5, thinking_budget=40, every=8))
    loaded = KVRouter.load(fresh.save(tmp_path / "fresh", llm), llm)
    assert np.array_equal(fresh.predict(x), loaded.predict(x)) and np.array_equal(fresh.route(x), loaded.route(x))
    assert np.array_equal(fresh.predict_step(x), loaded.predict_step(x))
    assert loaded.settings == fresh.settings and loaded.config == fresh.config

    other = KVModel(tiny_model("qwen2", seed=5), ByteTokenizer())
    with pytest.raises(ArtifactMismatchError) as e:
        KVRouter.load(cfg.out, other)
    msg = str(e.value)
    assert fingerprint(llm, None).describe() in msg and fingerprint(other, None).describe() in msg

    assert isinstance(KVClassifier.load(cfg.out), KVRouter)  # a router folder where a classifier path is taken
    assert np.array_equal(KVRouter.from_pretrained(cfg.out).predict(x), router.predict(x))
    with pytest.raises(ArtifactError, match="no trained signal 'no-such-router'"):
        KVRouter.from_pretrained("no-such-router")


def test_router_as_the_controllers_classifier_decides_as_it_routes(tmp_path, llm):
    cfg = _cfg(tmp_path)
    train_router(cfg, llm=llm)
    trained = KVRouter.load(cfg.out, llm)
    feats = np.stack([np.load(tmp_path / "router.work" / "features" / f"{i}.npz")["prompt"] for i in range(12)])
    mid = float(np.median(trained.predict(feats)))  # a threshold that sends some questions each way
    router = KVRouter(trained.gain, trained.step_head, trained.settings.model_copy(update={"tau_gain": mid}))
    route = router.route(feats)
    assert 0 < route.sum() < 12

    # scores: the gain head at prefill, the step head shifted by tau_gain - tau_step later
    xt = torch.as_tensor(feats[:3])
    router.step = -1
    assert torch.equal(router.scores(xt), router.gain.scores(xt))
    router.step = 7
    if router.step_head is not None:
        shift = router.settings.tau_gain - router.settings.tau_step
        assert torch.allclose(router.scores(xt), router.step_head.scores(xt) + shift)
    else:
        assert torch.equal(router.scores(xt), torch.full((3,), mid))

    from kvagents.control.thinking import ReasoningController
    from kvagents.evals.train_router import graded_task

    runner = er.Runner(cfg.model_copy(update={"model": "tiny"}), llm, tasks={"data": graded_task(cfg)})
    rows = [{"dataset": "data", "row": i, "question": f"question number {i}: what is {i} and {i}?", "gold": str(i)}
            for i in range(12)]
    ctl = ReasoningController(runner.fmt, runner.tok, classifier=router,
                              **{**router.controller_settings(), "capture": True})
    assert ctl.config.start == "auto" and ctl.config.switch_to_slow is False and ctl.threshold == mid
    from kvagents.engine.params import SamplingParams

    res = llm.generate([runner.prompt_ids(r) for r in rows], SamplingParams(max_new_tokens=40, temperature=0),
                       components=[ctl])
    outs = [g[0].outputs["reasoning"] for g in res.samples]
    got = np.array([o["start"] == "slow" for o in outs])
    captured = np.stack([o["features"]["prompt"].numpy() for o in outs])
    np.testing.assert_allclose(captured, feats, rtol=1e-4, atol=1e-4)  # the features it was trained on
    assert np.array_equal(got, router.route(captured))

    # the router given by its folder, settings left out: its calibrated rule is applied, the starts are its routes
    from kvagents.control.thinking import ControllerConfig

    folder = router.save(tmp_path / "mid", llm)
    for clf in (str(folder), KVRouter.load(folder)):
        ctl = ReasoningController(runner.fmt, runner.tok, classifier=clf, capture=True)
        assert isinstance(ctl.classifier, KVRouter)
        assert ctl.config == ControllerConfig(**router.controller_settings(), capture=True)
        res = llm.generate([runner.prompt_ids(r) for r in rows], SamplingParams(max_new_tokens=40, temperature=0),
                           components=[ctl])
        outs = [g[0].outputs["reasoning"] for g in res.samples]
        captured = np.stack([o["features"]["prompt"].numpy() for o in outs])
        assert np.array_equal(np.array([o["start"] == "slow" for o in outs]), router.route(captured))
    # what is given explicitly wins over the router's rule
    ctl = ReasoningController(runner.fmt, runner.tok, ControllerConfig(start="slow", every=4), classifier=router,
                              effort="low")
    assert (ctl.config.start, ctl.config.every, ctl.config.thinking_budget) == ("slow", 4, 128)
    assert ctl.config.max_switches == 1 and ctl.config.switch_to_slow is False  # the rest from the router


def _heads(n, d, k, seed, hidden=16):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(80, d)).astype(np.float32)
    kc = KVClassifierConfig(layers=2, window=8, hidden=hidden)
    return [KVClassifier.fit(x, 100.0 * (x[:, i % d] > 0), kc, seed=i, max_epochs=3)[0] for i in range(k)]


def test_router_ensemble_scores_are_the_heads_mean_and_survive_a_round_trip(tmp_path, llm):
    from kvagents.signals.artifact import save_artifact
    from kvagents.signals.kv_classifier import KVHeadEnsemble

    d = 256  # the tiny model's features: 2 layers averaged, 2 KV heads x 64 x K;V
    gains, steps = _heads(80, d, 3, 0), _heads(80, d, 2, 1)
    settings = KVRouterConfig(tau_gain=50.0, tau_step=30.0, every=8)
    router = KVRouter(gains, steps, settings)
    assert len(router.gain_heads) == 3 and len(router.step_heads) == 2
    x = np.random.default_rng(2).normal(size=(9, d)).astype(np.float32)
    want = np.mean([h.predict(x) for h in gains], axis=0)
    np.testing.assert_allclose(router.predict(x), want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(router.predict_step(x), np.mean([h.predict(x) for h in steps], axis=0), atol=1e-4)
    assert not np.allclose(router.predict(x), gains[0].predict(x))  # the mean, not one head
    router.step = 3
    shift = settings.tau_gain - settings.tau_step
    np.testing.assert_allclose(router.scores(torch.as_tensor(x)).numpy(), router.predict_step(x) + shift, atol=1e-4)

    loaded = KVRouter.load(router.save(tmp_path / "ens", llm), llm)
    assert loaded.metadata["config"]["gain_heads"] == 3 and loaded.metadata["config"]["step_heads"] == 2
    assert len(loaded.gain_heads) == 3 and len(loaded.step_heads) == 2
    assert np.array_equal(loaded.predict(x), router.predict(x)) and np.array_equal(loaded.route(x), router.route(x))
    assert np.array_equal(loaded.predict_step(x), router.predict_step(x))
    with pytest.raises(ArtifactMismatchError):
        KVRouter.load(tmp_path / "ens", KVModel(tiny_model("qwen2", seed=5), ByteTokenizer()))
    # a lost head is an error, not a smaller ensemble
    from safetensors.torch import load_file, save_file

    t = load_file(str(tmp_path / "ens" / "weights.safetensors"))
    save_file({k: v for k, v in t.items() if not k.startswith("gain.2.")}, str(tmp_path / "ens" / "weights.safetensors"))
    with pytest.raises(ArtifactError, match="weights lack gain.2."):
        KVRouter.load(tmp_path / "ens")

    # one head each (and none for the step): the single-head layout, which routers written before ensembles have
    single = KVRouter(gains[0], None, settings)
    meta_cfg = {"router": settings.model_dump(), "gain": gains[0].config.model_dump(), "step": None,
                "calibration": {}}
    old = save_artifact(tmp_path / "old", "kv_router", gains[0].tensors("gain."), meta_cfg, fingerprint(llm, None))
    for folder in (old, single.save(tmp_path / "single", llm)):
        r = KVRouter.load(folder, llm)
        assert len(r.gain_heads) == 1 and r.step_head is None
        assert np.array_equal(r.predict(x), gains[0].predict(x))
    assert set(load_file(str(tmp_path / "single" / "weights.safetensors"))) == set(gains[0].tensors("gain."))
    with pytest.raises(ValueError, match="differ in hidden"):
        KVHeadEnsemble([gains[0], _heads(80, d, 1, 3, hidden=8)[0]])


def _synthetic_work(folder, n=60, d=64, seed=0):
    """A collect work folder with learnable outcomes: fast is right on the rows whose first 16 features are shifted
    down, slow always; an early exit at a checkpoint is right when its window's features 16-31 are shifted up."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    prompt = rng.normal(size=(n, d)).astype(np.float32)
    easy = rng.random(n) < 0.5
    prompt[:, :16] += np.where(easy, -2.0, 2.0)[:, None]
    fast, slow, windows, win_row, win_step = [], [], [], [], []
    for i in range(n):
        ds = ("gsm8k", "math500")[i % 2]
        fast.append({"dataset": ds, "row": i, "gold": "1", "answer": "1", "correct": bool(easy[i]),
                     "tokens": 10})
        ckpts = []
        for j in range(3):
            w = rng.normal(size=d).astype(np.float32)
            done = bool(rng.random() < 0.5)
            w[16:32] += 2.0 if done else -2.0
            windows.append(w)
            win_row.append(i)
            win_step.append(8 * (j + 1) - 1)
            ckpts.append({"step": 8 * (j + 1) - 1, "correct": done, "tokens": 30 + 20 * j, "answer": "1",
                          "answer_tokens": 4})
        slow.append({"dataset": ds, "row": i, "gold": "1", "answer": "1", "correct": True, "tokens": 100,
                     "checkpoints": ckpts})
    for name, recs in (("train_fast.jsonl", fast), ("train_slow.jsonl", slow)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    np.savez_compressed(folder / "train_features.npz", prompt=prompt, windows=np.stack(windows),
                        win_row=np.array(win_row, dtype=np.int64), win_step=np.array(win_step, dtype=np.int64))
    (folder / "window.json").write_text(json.dumps({"window": 8, "slow_cue_tokens": 5}))
    conf = er.ReasoningEvalConfig(model="tiny", layers=2, every=8, window=8, slow_tokens=100).model_dump()
    (folder / "config.json").write_text(json.dumps({"config": conf}))
    return folder


def test_from_work_trains_by_row_and_reports_several_splits(tmp_path, llm):
    work = _synthetic_work(tmp_path / "w")
    data, info = read_work(work)
    assert len(data.fast) == 60 and len(data.windows) == 180 and info["window"] == 8
    cfg = TrainRouterConfig(from_work=str(work), out=str(tmp_path / "r"), seeds=[0, 1, 2], folds=3, device="cpu")
    report = train_router(cfg, llm=llm)
    assert report["seeds"] == [0, 1, 2] and len(report["splits"]) == 3
    for name in STRATEGIES:
        for key in ("accuracy", "tokens"):
            s = report["across_seeds"][name][key]
            assert s["min"] <= s["mean"] <= s["max"] and s["std"] >= 0
    helds = [s["held_out"] for s in report["splits"]]
    assert len({json.dumps(h, sort_keys=True) for h in helds}) > 1  # other splits, other numbers
    # the outcomes are learnable: the router answers the easy half fast and stops thinking early, at little loss
    r = report["across_seeds"]["router"]
    slow = report["across_seeds"]["always-slow"]
    assert r["tokens"]["mean"] < 0.8 * slow["tokens"]["mean"]
    assert r["accuracy"]["mean"] >= slow["accuracy"]["mean"] - 0.1
    router = KVRouter.load(tmp_path / "r", llm)
    tr = router.metadata["training"]
    assert tr["from_work"] == str(work) and len(tr["holdout_rows"]) == 12
    assert {x.split(":")[0] for x in tr["holdout_rows"]} == {"gsm8k", "math500"}
    by = report["held_out_by_dataset"]
    assert set(by) == {"gsm8k", "math500"} and sum(t["rows"] for t in by.values()) == 12
    for name in STRATEGIES:  # the mixture is the row-weighted mean of the datasets
        mix = sum(t[name]["accuracy"] * t["rows"] for t in by.values()) / 12
        assert mix == pytest.approx(report["held_out"][name]["accuracy"])
    assert not set(tr["train_rows"]) & set(tr["holdout_rows"])
    assert router.settings.every == 8 and router.config.window == 8


def test_the_saved_router_is_the_fold_ensemble_and_its_row_is_its_own_predictions(tmp_path, llm, monkeypatch):
    from kvagents.evals.train_router import Rule, Trials, held_out_table

    real = er.fit_router_heads

    def refit_always_slow(*a, **k):  # the refitted gain head scores every question 1000: it never answers fast
        heads = real(*a, **k)
        with torch.no_grad():
            heads["gain"][0].mlp.fc2.weight.zero_()
            heads["gain"][0].mlp.fc2.bias.fill_(10.0)
        return heads

    monkeypatch.setattr(er, "fit_router_heads", refit_always_slow)
    work = _synthetic_work(tmp_path / "w")
    data, _ = read_work(work)
    cfg = TrainRouterConfig(from_work=str(work), out=str(tmp_path / "r"), seeds=[0], folds=3, device="cpu")
    report = train_router(cfg, llm=llm)
    assert report["held_out"]["router, refit"]["fast_rate"] == 0 < report["held_out"]["router"]["fast_rate"]
    router = KVRouter.load(tmp_path / "r", llm)
    assert len(router.gain_heads) == 3 and len(router.step_heads) == 3  # the fold heads
    assert router.metadata["training"]["heads"] == {"gain": 3, "step": 3, "kind": "fold ensemble"}
    # the held-out "router" row, recomputed from the loaded router's own predictions on its held-out rows
    held = [data.names.index(x) for x in router.metadata["training"]["holdout_rows"]]
    hd = data.subset(held)
    ps = router.predict_step(hd.windows)
    tr = Trials(hd.fast, hd.slow, [ps[hd.win_row == i] for i in range(len(held))])
    c = report["calibration"]
    rule = Rule(c["tau_gain"], c["tau_step"], c["checkpoint_cap"], None)
    mine = held_out_table(tr, router.predict(hd.prompt), {"router": rule}, [], [], 8)["router"]
    for k in ("accuracy", "tokens", "fast_rate", "stopped_early_rate"):
        assert mine[k] == pytest.approx(report["held_out"]["router"][k])
    assert {"router, fold ensemble", "router, refit"} <= set(report["held_out"])

    # --no-ensemble: one gain and one step head refitted on all training rows, the fold ensemble still reported
    refit = train_router(cfg.model_copy(update={"ensemble": False, "out": str(tmp_path / "r1")}), llm=llm)
    one = KVRouter.load(tmp_path / "r1", llm)
    assert len(one.gain_heads) == 1 and len(one.step_heads) == 1
    assert one.metadata["training"]["heads"]["kind"] == "refit"
    assert refit["held_out"]["router"] == refit["held_out"]["router, refit"]
    assert refit["held_out"]["router"]["fast_rate"] == 0 and one.route(hd.prompt).all()
    assert refit["held_out"]["router, fold ensemble"]["tokens"] == pytest.approx(
        report["held_out"]["router"]["tokens"])


def test_from_work_through_the_cli(tmp_path, llm, monkeypatch, capsys):
    work = _synthetic_work(tmp_path / "w", n=20)
    monkeypatch.setattr(KVModel, "from_pretrained", lambda *a, **k: llm)
    assert cli_main(["train", "router", "--from-work", str(work), "--out", str(tmp_path / "r"), "--seeds", "0", "1",
                     "--folds", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "across 2 splits (seeds 0 1)" in out and "router written to" in out
    assert (tmp_path / "r" / "artifact.json").is_file()
    assert cli_main(["train", "router", "--from-work", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "lacks train_fast.jsonl" in err and "\n" not in err
    rows = _data(tmp_path / "d.jsonl")
    for argv, expected in [(["--data", rows, "--question-field", "question"], "has no field 'question'"),
                           (["--data", rows, "--question-field", "q", "--grader", "fuzzy"], "unknown grader 'fuzzy'"),
                           (["--data", rows, "--from-work", str(work)], "exactly one of them")]:
        assert cli_main(["train", "router", "--out", str(tmp_path / "r3"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and expected in err and "\n" not in err, err


def test_train_router_refuses_bad_input_clearly(tmp_path, llm):
    with pytest.raises(ValueError, match="has no field 'question'"):
        train_router(_cfg(tmp_path, question_field="question"), llm=llm)
    with pytest.raises(ValueError, match="grader 'python:stub_grader:broken' raised on row 0"):
        train_router(_cfg(tmp_path, grader="python:stub_grader:broken", out=str(tmp_path / "r2")), llm=llm)
    # nothing was recorded: the same folder runs with a working grader
    assert train_router(_cfg(tmp_path, out=str(tmp_path / "r2"), seeds=[1]), llm=llm)["held_out"]["rows"] == 3
    with pytest.raises(ValueError, match="unknown grader 'fuzzy'"):
        train_router(_cfg(tmp_path, grader="fuzzy"), llm=llm)
    with pytest.raises(ValueError, match="too few"):
        train_router(_cfg(tmp_path, limit=3, out=str(tmp_path / "r3")), llm=llm)
    assert not (tmp_path / "r3.work").exists()  # refused before generating
    with pytest.raises(ValueError, match="too few"):
        train_router(TrainRouterConfig(from_work=str(_synthetic_work(tmp_path / "w", n=4)), out=str(tmp_path / "r4"),
                                       holdout=0.2), llm=llm)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_router(_cfg(tmp_path, data=str(tmp_path / "missing.jsonl")), llm=llm)
    with pytest.raises(ValueError, match="exactly one of them"):
        TrainRouterConfig(out="r")
    with pytest.raises(ValueError, match="exactly one of them"):
        TrainRouterConfig(out="r", data="d.jsonl", from_work="w")
    with pytest.raises(ValueError, match="unknown thinking format 'fancy'"):
        TrainRouterConfig(out="r", data="d.jsonl", format="fancy")
    with pytest.raises(ValueError, match="seeds must be distinct"):
        TrainRouterConfig(out="r", data="d.jsonl", seeds=[1, 1])
    with pytest.raises(ValueError, match="tau_gain"):
        KVRouterConfig()


def test_from_work_reports_convergence_budgets_acceptance_and_a_learning_curve(tmp_path, llm):
    work = _synthetic_work(tmp_path / "w")
    cfg = TrainRouterConfig(from_work=str(work), out=str(tmp_path / "r"), seeds=[0, 1], folds=2, device="cpu",
                            convergence_patience=[1, 2], convergence_every=[8, 16], budgets=[16],
                            train_fractions=[0.5], auto_tolerance=1.0, tolerances=[-1.0, 0.0, 1.0])
    report = train_router(cfg, llm=llm)
    h = report["held_out"]
    want = {"router", "router, fold ensemble", "router + convergence", "router + convergence, fold ensemble",
            "convergence, patience 1, every 8", "convergence, patience 2, every 16", "budget 16"}
    assert want <= set(h)
    slow = h["always-slow"]
    for name, v in h.items():
        if name != "rows":
            assert v["x_fewer"] == pytest.approx(slow["tokens"] / v["tokens"])
            assert v["points"] == pytest.approx(100 * (v["accuracy"] - slow["accuracy"]))
    # every synthetic trial answer is "1" (checkpoints at steps 7, 15, 23 of 30, 50, 70 tokens: look-aheads of
    # 30 - 8, 50 - 16, 70 - 24 tokens): patience 1 stops at the first checkpoint (30 tokens, no look-ahead before
    # it), patience 2 at the second (50 + the first look-ahead's 22; + its own 34 as the controller counts)
    assert h["convergence, patience 1, every 8"]["tokens"] == 30
    assert h["convergence, patience 2, every 8"]["tokens"] == 50 + 22
    assert h["convergence, patience 2, every 8"]["tokens_controller"] == 50 + 22 + 34
    # a look-ahead every 16 tokens: at the second checkpoint only, patience 1 stops there (50, nothing before)
    assert h["convergence, patience 1, every 16"]["tokens"] == 50
    assert report["calibration"]["tolerance"] in (-1.0, 0.0, 1.0)
    assert [x["tolerance"] for x in report["calibration"]["tolerance_cross_fit"]["table"]] == [-1.0, 0.0, 1.0]
    acc = report["acceptance"]["strategies"]
    assert "always-slow" not in acc and len(acc["router"]["x_fewer"]) == 2
    assert acc["always-fast"]["holds"] == all(x >= 3 and p >= -1 for x, p in zip(acc["always-fast"]["x_fewer"],
                                                                                acc["always-fast"]["points"]))
    curve = report["learning_curve"]
    assert [c["fraction"] for c in curve] == [0.5, 1.0]
    assert curve[0]["train_rows"]["mean"] == 24 and curve[1]["train_rows"]["mean"] == 48
    assert set(report["across_seeds_by_dataset"]) == {"gsm8k", "math500"}
    text = format_report(report)
    assert "learning curve: 50% of the training rows" in text and "acceptance (" in text
    assert "x fewer than slow" in text and "math500 (6 held-out questions per split)" in text
    with pytest.raises(ValueError, match="not multiples"):
        train_router(cfg.model_copy(update={"convergence_every": [12]}), llm=llm)


def test_the_shipped_router_loads_by_the_models_name_and_is_its_seed_0_fold_ensemble(llm):
    from kvagents.control.thinking import ReasoningController
    from kvagents.signals.artifact import TRAINED_DIR, shipped

    assert "qwen2.5-coder-0.5b-router" in shipped("kv_router")
    router = KVRouter.from_pretrained("qwen2.5-coder-0.5b")
    assert router is not None and (TRAINED_DIR / "qwen2.5-coder-0.5b-router" / "weights.safetensors").is_file()
    assert len(router.gain_heads) == 5 and len(router.step_heads) == 5  # the fold heads, calibrated on
    meta = router.metadata
    tr = meta["training"]
    assert tr["seed"] == 0 and tr["ensemble"] is True and len(tr["holdout_rows"]) == 460
    assert not set(tr["train_rows"]) & set(tr["holdout_rows"])
    assert {x.split(":")[0] for x in tr["holdout_rows"]} == {"gsm8k", "commonsenseqa", "math500"}
    assert router.dim == 256 and router.config.window == 46  # Qwen2.5 0.5B: 2 KV heads x 64, K;V
    assert router.settings.tau_gain == meta["metrics"]["calibration"]["tau_gain"]
    assert router.settings.thinking_budget == meta["metrics"]["calibration"]["thinking_budget"]
    held = meta["metrics"]["held_out"]
    assert held["router"]["fast_rate"] == pytest.approx(held["router, fold ensemble"]["fast_rate"])
    # a model's name where a classifier is taken: the shipped router with its rule
    ctl = ReasoningController("plain", ByteTokenizer(), classifier="qwen2.5-coder-0.5b")
    assert isinstance(ctl.classifier, KVRouter) and ctl.config.start == "auto"
    assert ctl.config.max_thinking_tokens == router.settings.thinking_budget and ctl.threshold == router.settings.tau_gain
    with pytest.raises(ArtifactMismatchError):  # tied to Qwen2.5-Coder 0.5B, not the tiny model
        KVRouter.from_pretrained("qwen2.5-coder-0.5b", model=llm)
