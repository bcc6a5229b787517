"""Reasoning control: thinking formats, hard budget, KV classifier, online controller (tiny models, CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from reference import full_forward_kv, ref_pool
from test_engine import ForwardCounter
from tiny import ByteTokenizer, tiny_model

from kvagents import Component, ForceTokens, KVModel, SamplingParams
from kvagents.control.thinking import (
    EFFORT_BUDGETS,
    PLAIN_FORMAT,
    QWEN3_FORMAT,
    ControllerConfig,
    Effort,
    HardBudget,
    ReasoningController,
    ThinkingFormat,
    budget_for,
    check_instruction,
    encode_text,
)
from kvagents.signals.kv_classifier import KVClassifier, KVClassifierConfig, StubClassifier

TOK = ByteTokenizer()
PROMPTS = [list(range(5, 25)), list(range(30, 48)), list(range(60, 82))]
GREEDY = SamplingParams(max_new_tokens=110, temperature=0, ignore_eos=True)


def llm_for(arch: str = "qwen2") -> KVModel:
    return KVModel(tiny_model(arch), ByteTokenizer())


def ids_of(text: str) -> list[int]:
    return encode_text(TOK, text)


def find(seq: list[int], sub: list[int]) -> int:
    for k in range(len(seq) - len(sub) + 1):
        if seq[k : k + len(sub)] == sub:
            return k
    return -1


def test_on_prefill_force_tokens_apply_from_the_first_token():
    class Cue(Component):
        name = "cue"

        def on_prefill(self, view):
            return [ForceTokens(1, [50, 51, 52])]

    llm = llm_for("llama")
    res = llm.generate(PROMPTS[:2], SamplingParams(max_new_tokens=6, temperature=0, n=2), components=[Cue()])
    free = llm.generate(PROMPTS[:2], SamplingParams(max_new_tokens=6, temperature=0, n=2))
    assert res.samples[0][1].token_ids[:3] == [50, 51, 52] and res.samples[0][1].forced_tokens == 3
    assert res.samples[0][0].token_ids == free.samples[0][0].token_ids  # other rows untouched
    assert res.samples[1][0].token_ids == free.samples[1][0].token_ids


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_stub_controller_starts_in_its_mode_switches_once_and_reprocesses_nothing(arch):
    llm = llm_for(arch)
    every, flip = 8, 40
    # row 0: slow, then the stub drops to 10 at step >= 40 and oscillates afterwards (at most one switch);
    # row 1: fast all along (20: below 50, never above 70); row 2: slow, stays at 60 (inside the hysteresis band)

    def fn(step, b):
        if step < 0:
            return [80.0, 20.0, 60.0]
        return [10.0 if (step >= flip and (step // every) % 2 == 1) or step == 47 else 80.0, 20.0, 45.0]

    stub = StubClassifier(fn, window=4)
    ctl = ReasoningController(PLAIN_FORMAT, TOK, classifier=stub, start="auto", every=every, max_answer_tokens=None)
    counter = ForwardCounter(llm.model)
    try:
        res = llm.generate(PROMPTS, GREEDY, components=[ctl])
    finally:
        counter.close()
    outs = [g[0].outputs["reasoning"] for g in res.samples]
    assert [o["start"] for o in outs] == ["slow", "fast", "slow"]
    # exactly one switch, at the first check (t + 1 multiple of 8) where the stub is below 50 - 20
    first = min(t for t in range(flip, 200) if (t + 1) % every == 0 and fn(t, 3)[0] < 30)
    assert outs[0]["switches"] == [{"step": first, "to": "fast", "reason": "classifier", "score": 10.0}]
    assert outs[1]["switches"] == [] and outs[2]["switches"] == []
    # the forced markers are in the tokens right after the switch step, in the text, and in the counts
    s0 = res.samples[0][0]
    cue, end = ids_of(PLAIN_FORMAT.render()["slow_cue"]), ids_of(PLAIN_FORMAT.render()["end_thinking"])
    assert s0.token_ids[: len(cue)] == cue
    assert s0.token_ids[first + 1 : first + 1 + len(end)] == end
    assert PLAIN_FORMAT.render()["end_thinking"].strip() in s0.text and s0.text.startswith("Let's think step by step.")
    assert outs[0]["forced_tokens"] == len(cue) + len(end) == s0.forced_tokens
    assert outs[0]["thinking_tokens"] == first + 1 - len(cue)
    assert outs[0]["answer_tokens"] == s0.generated_tokens - first - 1 - len(end)
    fast = ids_of(PLAIN_FORMAT.render()["fast_cue"])
    s1 = res.samples[1][0]
    assert s1.token_ids[: len(fast)] == fast and outs[1]["thinking_tokens"] == 0
    assert outs[1]["answer_tokens"] == s1.generated_tokens - len(fast)
    for g, o in zip(res.samples, outs):
        assert o["thinking_tokens"] + o["answer_tokens"] + o["forced_tokens"] == g[0].generated_tokens
    # no prompt token re-processed: one prefill of the padded batch, then one token per row per step
    T = max(len(p) for p in PROMPTS)
    assert counter.lengths[0] == T and all(x == 1 for x in counter.lengths[1:])
    assert len(counter.lengths) == res.stats.decode_steps == GREEDY.max_new_tokens
    assert res.stats.prefill_tokens == sum(len(p) for p in PROMPTS)
    # host reads: one at prefill, one per check while a switch is possible (not per token)
    assert ctl.host_reads <= 1 + GREEDY.max_new_tokens // every


def test_controller_fast_to_slow_switch_and_hysteresis_delta():
    llm = llm_for()
    stub = StubClassifier(lambda step, b: [20.0] * b if step < 16 else [90.0] * b, window=4)
    ctl = ReasoningController(PLAIN_FORMAT, TOK, classifier=stub, start="auto", every=8, max_answer_tokens=None)
    res = llm.generate(PROMPTS[:1], GREEDY, components=[ctl]).samples[0][0]
    o = res.outputs["reasoning"]
    assert o["start"] == "fast" and o["switches"][0]["to"] == "slow" and o["switches"][0]["step"] == 23
    marker = ids_of(PLAIN_FORMAT.render()["start_thinking"])
    assert res.token_ids[24 : 24 + len(marker)] == marker
    assert o["thinking_tokens"] == res.generated_tokens - 24 - len(marker)
    stub = StubClassifier(lambda step, b: [20.0] * b if step < 16 else [90.0] * b, window=4)
    ctl = ReasoningController(PLAIN_FORMAT, TOK, classifier=stub, start="auto", every=8, switch_to_slow=False)
    assert llm.generate(PROMPTS[:1], GREEDY, components=[ctl]).samples[0][0].outputs["reasoning"]["switches"] == []
    assert ctl.host_reads == 2  # prefill + the planned answer-limit stop; no prediction (nothing can switch)
    stub = StubClassifier(lambda step, b: [80.0] * b if step < 0 else [10.0] * b, window=4)
    ctl = ReasoningController(PLAIN_FORMAT, TOK, classifier=stub, start="auto", every=8, step_classifier=False)
    assert llm.generate(PROMPTS[:1], GREEDY, components=[ctl]).samples[0][0].outputs["reasoning"]["switches"] == []
    assert stub.calls == [-1]  # prefill only
    # 45 sits in the band 50 -+ 20 (no switch); with delta 0 it is below 50 (switch)
    for delta, switched in ((20.0, False), (0.0, True)):
        stub = StubClassifier(lambda step, b: [80.0] * b if step < 0 else [45.0] * b, window=4)
        ctl = ReasoningController(PLAIN_FORMAT, TOK, classifier=stub, start="auto", every=8, delta=delta)
        o = llm.generate(PROMPTS[:1], GREEDY, components=[ctl]).samples[0][0].outputs["reasoning"]
        assert bool(o["switches"]) is switched


@pytest.mark.parametrize("budget", [1, 7, 16, 33])
def test_hard_budget_forces_the_end_sequence_exactly_at_the_budget(budget):
    llm = llm_for()
    hb = HardBudget(PLAIN_FORMAT, TOK, budget, max_answer_tokens=9)
    res = llm.generate(PROMPTS, GREEDY.model_copy(update={"max_new_tokens": 140}), components=[hb])
    cue = ids_of(PLAIN_FORMAT.render()["slow_cue"])
    end = ids_of(PLAIN_FORMAT.render()["end_thinking"])
    for g in res.samples:
        s = g[0]
        o = s.outputs["reasoning"]
        k = find(s.token_ids, end)
        assert k == len(cue) + budget  # exactly `budget` sampled thinking tokens, then the marker
        assert o["thinking_tokens"] == budget and o["budget_hit"]
        assert o["answer_tokens"] == len(s.token_ids) - k - len(end) == 9  # answer finished at its own limit
        assert s.finish_reason == "answer_limit"
        assert o["forced_tokens"] == len(cue) + len(end)


def test_hard_budget_never_exceeded_with_sampling_and_n():
    llm = llm_for("llama")
    hb = HardBudget(PLAIN_FORMAT, TOK, 12, max_answer_tokens=None)
    params = SamplingParams(max_new_tokens=110, temperature=1.0, n=3, seed=0)
    res = llm.generate(PROMPTS[:2], params, components=[hb])
    cue, end = ids_of(PLAIN_FORMAT.render()["slow_cue"]), ids_of(PLAIN_FORMAT.render()["end_thinking"])
    for g in res.samples:
        for s in g:
            o = s.outputs["reasoning"]
            assert o["thinking_tokens"] <= 12
            k = find(s.token_ids, end)
            stop = k if k >= 0 else len(s.token_ids)
            assert stop - len(cue) <= 12  # thinking before the marker never exceeds the budget
            assert o["thinking_tokens"] + o["answer_tokens"] + o["forced_tokens"] == s.generated_tokens


def test_native_end_token_stops_the_thinking_count():
    llm = llm_for()
    probe = llm.generate(PROMPTS[:1], GREEDY, components=[HardBudget(PLAIN_FORMAT, TOK, 500)]).samples[0][0]
    cue = ids_of(PLAIN_FORMAT.render()["slow_cue"])
    gen = probe.token_ids[len(cue) :]
    pos = next(j for j in range(5, len(gen)) if gen[j] not in gen[:j] and gen[j] >= 3)
    end_char = TOK.decode([gen[pos]])
    fmt = ThinkingFormat(name="t", native=True, slow_cue=PLAIN_FORMAT.slow_cue, fast_cue="x", end_thinking="!",
                         end_token=end_char)
    o = llm.generate(PROMPTS[:1], GREEDY, components=[HardBudget(fmt, TOK, 500)]).samples[0][0].outputs["reasoning"]
    assert o["thinking_tokens"] == pos + 1  # the end token itself still counts as thinking
    assert o["answer_tokens"] == GREEDY.max_new_tokens - len(cue) - pos - 1


def test_effort_levels_map_to_budgets():
    assert [budget_for(e) for e in Effort] == [EFFORT_BUDGETS[k] for k in ("low", "medium", "high")]
    assert budget_for("low") < budget_for("medium") < budget_for("high")
    assert ControllerConfig(effort="medium").thinking_budget == EFFORT_BUDGETS["medium"]
    assert ControllerConfig(effort="high", effort_budgets={"low": 1, "medium": 2, "high": 3}).thinking_budget == 3
    assert HardBudget(PLAIN_FORMAT, TOK, effort=Effort.low).budget == EFFORT_BUDGETS["low"]
    with pytest.raises(ValueError, match="unknown effort 'extreme'"):
        budget_for("extreme")
    with pytest.raises(ValueError, match="either effort or max_thinking_tokens"):
        ControllerConfig(effort="low", max_thinking_tokens=5)
    with pytest.raises(ValueError, match="max_thinking_tokens must be >= 1"):
        ControllerConfig(max_thinking_tokens=0)
    with pytest.raises(ValueError, match="needs max_thinking_tokens or effort"):
        HardBudget(PLAIN_FORMAT, TOK)


def test_formats_render_and_instruction_collision_check():
    r = PLAIN_FORMAT.render("The answer is (")
    assert r["fast_cue"] == "The answer is (" and r["end_thinking"].endswith("The answer is (")
    assert QWEN3_FORMAT.chat_template_kwargs == {"enable_thinking": True} and QWEN3_FORMAT.start_thinking is None
    check_instruction("Put the final answer in \\boxed{}.", PLAIN_FORMAT, "The final answer is $\\boxed{")
    with pytest.raises(ValueError, match="placeholder"):
        check_instruction("Finish with 'Answer: N'.", PLAIN_FORMAT, "Answer:")


# ---- the classifier ------------------------------------------------------------------------------------------


def synthetic(n: int, d: int, seed: int):
    """Two classes separated along one fixed direction (the same for every seed), labels 0 / 100."""
    direction = np.random.default_rng(12345).normal(size=d)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)) + np.outer(2 * y - 1, direction) * 0.6
    return x.astype(np.float32), 100.0 * y


def test_classifier_learns_separable_kv_features_and_round_trips(tmp_path):
    x, y = synthetic(600, 256, 0)
    clf, rep = KVClassifier.fit(x, y, KVClassifierConfig(), seed=0)
    xt, yt = synthetic(400, 256, 1)  # fresh rows
    acc = float(np.mean((clf.predict(xt) >= 50) == (yt >= 50)))
    assert acc >= 0.95 and rep["val_accuracy"] >= 0.95, (acc, rep["val_accuracy"])
    assert rep["best_epoch"] < rep["epochs"] and rep["val_rows"] == 120
    clf.save(tmp_path / "clf")
    again = KVClassifier.load(tmp_path / "clf")
    np.testing.assert_array_equal(again.predict(xt), clf.predict(xt))
    assert again.config == clf.config and again.config.input_dim == 256


def test_classifier_bad_configs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown layer aggregation 'median'"):
        KVClassifierConfig(layer_agg="median")
    with pytest.raises(ValueError, match="unknown position aggregation 'max'"):
        KVClassifierConfig(positions="max")
    with pytest.raises(ValueError, match="window must be >= 1"):
        KVClassifierConfig(window=0)
    llm = llm_for()
    long_window = StubClassifier(lambda s, b: [60.0] * b, window=64)  # longer than every prompt: still runs
    res = llm.generate(PROMPTS, GREEDY, components=[ReasoningController(PLAIN_FORMAT, TOK, classifier=long_window,
                                                                        start="auto")])
    assert all(s.outputs["reasoning"]["start"] == "slow" for g in res.samples for s in g)
    bad_layer = StubClassifier(lambda s, b: [60.0] * b, window=4, layers=[7])
    with pytest.raises(ValueError, match="layer index 7 is out of range"):
        llm.generate(PROMPTS, GREEDY, components=[ReasoningController(PLAIN_FORMAT, TOK, classifier=bad_layer,
                                                                      start="auto")])
    with pytest.raises(ValueError, match="start='auto' needs a classifier"):
        ReasoningController(PLAIN_FORMAT, TOK, start="auto")
    with pytest.raises(FileNotFoundError, match="no classifier"):
        KVClassifier.load(tmp_path / "nothing")
    clf, _ = KVClassifier.fit(*synthetic(40, 8, 0), KVClassifierConfig(hidden=4, window=4), max_epochs=2)
    with pytest.raises(ValueError, match="expects 8 features"):
        llm.generate(PROMPTS, GREEDY, components=[ReasoningController(PLAIN_FORMAT, TOK, classifier=clf, start="auto")])


@pytest.mark.parametrize("cfg", [
    KVClassifierConfig(layers=2, window=6, positions="sum", heads="flatten", layer_agg="mean"),
    KVClassifierConfig(layers=[0, -1], part="k", window=5, positions="mean", heads="mean", layer_agg="flatten"),
    KVClassifierConfig(layers=3, part="v", window=3, positions="last", heads="flatten", layer_agg="last"),
])
def test_captured_features_match_a_fresh_forward(cfg):
    """Prefill and mid-generation window features (ring buffer in the loop) == pooling a full forward pass."""
    llm = llm_for("qwen3")
    ctl = ReasoningController(PLAIN_FORMAT, TOK, ControllerConfig(start="slow", capture=True, every=7), kv_config=cfg)
    res = llm.generate(PROMPTS[:2], GREEDY.model_copy(update={"max_new_tokens": 30}), components=[ctl])
    for p, g in zip(PROMPTS, res.samples):
        s = g[0]
        f = s.outputs["reasoning"]["features"]
        ks, vs = full_forward_kv(llm.model, p + s.token_ids)
        ref_cfg = SimpleNamespace(layers=cfg.layers, part=cfg.part, positions=cfg.positions, heads=cfg.heads,
                                  layer_agg=cfg.layer_agg, normalize=False, window=cfg.window)
        want = ref_pool(ks, vs, list(range(len(p) - cfg.window, len(p))), ref_cfg)
        np.testing.assert_allclose(f["prompt"].numpy(), want, rtol=1e-4, atol=1e-4)
        assert f["steps"] == [6, 13, 20, 27]
        for t, got in zip(f["steps"], f["windows"]):
            end = len(p) + t  # rows fed before step t: prompt + tokens 0..t-1
            want = ref_pool(ks, vs, list(range(end - cfg.window, end)), ref_cfg)
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


def test_trained_classifier_inside_the_controller_matches_its_offline_prediction(tmp_path):
    """A real KVClassifier: its prefill decision in the loop == predict() on the captured prompt features."""
    llm = llm_for()
    cfg = KVClassifierConfig(layers=2, window=8)
    cap = ReasoningController(PLAIN_FORMAT, TOK, ControllerConfig(capture=True), kv_config=cfg)
    res = llm.generate(PROMPTS, GREEDY.model_copy(update={"max_new_tokens": 4}), components=[cap])
    feats = np.stack([g[0].outputs["reasoning"]["features"]["prompt"].numpy() for g in res.samples])
    x = np.concatenate([feats + np.random.default_rng(i).normal(scale=0.01, size=feats.shape) for i in range(10)])
    y = np.tile([100.0, 0.0, 100.0], 10)
    clf, _ = KVClassifier.fit(x, y, cfg, seed=0, max_epochs=300)
    clf.save(tmp_path / "c")
    clf = KVClassifier.load(tmp_path / "c")
    ctl = ReasoningController(PLAIN_FORMAT, TOK, classifier=clf, start="auto", every=1000)
    out = llm.generate(PROMPTS, GREEDY.model_copy(update={"max_new_tokens": 4}), components=[ctl])
    offline = clf.predict(feats)
    got = [g[0].outputs["reasoning"] for g in out.samples]
    np.testing.assert_allclose([o["start_score"] for o in got], offline, rtol=1e-5, atol=1e-4)
    assert [o["start"] for o in got] == ["slow" if v >= 50 else "fast" for v in offline]


def test_stop_thinking_at_cuts_only_sequences_still_thinking():
    llm = llm_for()
    stub = StubClassifier(lambda step, b: [80.0, 20.0, 80.0] if step < 0 else [90.0, 20.0, 10.0], window=4)
    ctl = ReasoningController(PLAIN_FORMAT, TOK, classifier=stub, start="auto", every=8, stop_thinking_at=40,
                              max_answer_tokens=12)
    res = llm.generate(PROMPTS, GREEDY, components=[ctl])
    a, b, c = (g[0] for g in res.samples)
    assert a.generated_tokens == 40 and a.finish_reason == "length" and a.outputs["reasoning"]["switches"] == []
    assert b.outputs["reasoning"]["start"] == "fast" and b.finish_reason == "answer_limit"
    end = ids_of(PLAIN_FORMAT.render()["end_thinking"])
    cue = len(ids_of(PLAIN_FORMAT.render()["slow_cue"]))
    first = next(t for t in range(cue, 100) if (t + 1) % 8 == 0)  # first check after the forced cue
    assert c.outputs["reasoning"]["switches"][0]["step"] == first < 40  # switched before the cut: answers past it
    assert c.generated_tokens == first + 1 + len(end) + 12 > 40 and c.finish_reason == "answer_limit"


# ---- the controller on the fast path (static cache; its per-step work inside the step) --------------------------


def _same_results(a, b):
    for ga, gb in zip(a.samples, b.samples):
        for x, y in zip(ga, gb):
            assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
            assert x.forced_tokens == y.forced_tokens
            ra, rb = x.outputs["reasoning"], y.outputs["reasoning"]
            for k in ("start", "thinking_tokens", "answer_tokens", "forced_tokens", "budget_hit"):
                assert ra[k] == rb[k], (k, ra[k], rb[k])
            strip = lambda sw: [{**w, "score": None} for w in sw]  # noqa: E731
            assert strip(ra["switches"]) == strip(rb["switches"])
            score = lambda sw: [w["score"] or 0.0 for w in sw]  # noqa: E731
            assert score(ra["switches"]) == pytest.approx(score(rb["switches"]), rel=1e-4)
            assert len(ra["scores"]) == len(rb["scores"])
            for (sa, va), (sb, vb) in zip(ra["scores"], rb["scores"]):
                assert sa == sb and va == pytest.approx(vb, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("arch,device", [
    ("qwen2", "cpu"), ("qwen3", "cpu"),
    pytest.param("qwen3", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_fast_path_controller_equals_the_eager_engine_and_reads_the_host_only_at_checks(arch, device):
    """Stub switches, a hard budget, and a real KV classifier reading the in-step ring buffer: the fast path (on
    CUDA: CUDA graphs + compile; on the CPU the same step without graphs) gives the eager engine's tokens,
    switches, counts and scores, and calls the host part only at the steps the controller asks for (never
    ``on_step``)."""
    import copy

    llm = KVModel(copy.deepcopy(tiny_model(arch)).to(device), ByteTokenizer())
    every = 8

    def fn(step, b):
        if step < 0:
            return [80.0, 20.0, 60.0]
        return [10.0 if step >= 40 else 80.0, 20.0, 45.0]

    c = llm.model.config
    cfg = KVClassifierConfig(layers=2, window=4, hidden=8)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    clf, _ = KVClassifier.fit(*synthetic(64, cfg.feature_dim(2, c.num_key_value_heads, head_dim), 0), cfg,
                              max_epochs=3)
    clf = clf.to(device)
    makers = [
        lambda: ReasoningController(PLAIN_FORMAT, TOK, classifier=StubClassifier(fn, window=4), start="auto",
                                    every=every, max_answer_tokens=30),
        lambda: HardBudget(PLAIN_FORMAT, TOK, 17, max_answer_tokens=9),
        lambda: ReasoningController(PLAIN_FORMAT, TOK, classifier=clf, start="slow", every=every, delta=0.0,
                                    threshold=float(np.median(clf.predict(synthetic(64, clf.dim, 1)[0])))),
    ]
    for make in makers:
        eager = llm.generate(PROMPTS, GREEDY, components=[make()])
        ctl = make()
        calls = {"host": [], "on_step": 0}
        orig_host, orig_step = ctl.on_host_check, ctl.on_step
        ctl.on_host_check = lambda view, calls=calls, f=orig_host: (calls["host"].append(int(view.step)), f(view))[1]
        ctl.on_step = lambda view, calls=calls, f=orig_step: (calls.__setitem__("on_step", calls["on_step"] + 1),
                                                              f(view))[1]
        fast = llm.generate(PROMPTS, GREEDY, components=[ctl], fast=True)
        _same_results(eager, fast)
        assert calls["on_step"] == 0 and 0 < len(calls["host"]) <= 1 + GREEDY.max_new_tokens // every + 6
        outs = [g[0].outputs["reasoning"] for g in eager.samples]
        assert any(o["switches"] for o in outs)  # each case really switches (classifier or budget)


def test_a_prompt_shorter_than_the_window_is_filled_with_the_mean_of_its_rows():
    from kvagents.signals.kv_classifier import prompt_window

    cfg = KVClassifierConfig(window=4, layers=1)
    rows = torch.arange(2 * 1 * 1 * 1 * 6 * 2, dtype=torch.float32).reshape(2, 1, 1, 1, 6, 2)  # [P, nL, parts, H, T, d]
    win = prompt_window(rows, [6, 2], cfg)  # prompt 1 is left-padded: its 2 real rows are the last two columns
    assert win.shape == (2, 4, 1, 1, 1, 2)
    assert torch.equal(win[0, :, 0, 0, 0], rows[0, 0, 0, 0, 2:])  # long enough: its last 4 rows
    own = rows[1, 0, 0, 0, 4:]
    assert torch.equal(win[1, 2:, 0, 0, 0], own)
    assert torch.allclose(win[1, :2, 0, 0, 0], own.mean(0).expand(2, 2))
    short = prompt_window(rows[:, :, :, :, -3:], [3, 3], cfg)  # every prompt shorter than the window
    assert short.shape == (2, 4, 1, 1, 1, 2) and torch.allclose(short[0, 0, 0, 0, 0], rows[0, 0, 0, 0, 3:].mean(0))
    with pytest.raises(ValueError, match="0 tokens"):
        prompt_window(rows, [6, 0], cfg)
