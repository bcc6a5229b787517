"""Look-ahead forks of the running cache and the answer-convergence early exit (tiny models, CPU)."""

from __future__ import annotations

import pytest
import torch
from reference import full_forward_kv
from tiny import ByteTokenizer, tiny_model

from kvagents import Component, ForceTokens, KVModel, SamplingParams
from kvagents.control.convergence import ConvergenceConfig, ConvergenceController, convergence_summary, lookahead_text
from kvagents.control.thinking import PLAIN_FORMAT, QWEN3_FORMAT, ReasoningController, encode_text
from kvagents.engine.components import InvalidActionError, LookAhead

TOK = ByteTokenizer()
PROMPTS = [list(range(5, 25)), list(range(30, 41))]  # different lengths: left padding in the batch
FORCED = encode_text(TOK, " The answer is")
END = encode_text(TOK, lookahead_text(PLAIN_FORMAT))  # the plain format's end of thinking + answer cue


def llm_for(arch: str) -> KVModel:
    return KVModel(tiny_model(arch), TOK)


class TokenCounter:
    """Wraps model.forward and records each call's input shape ``(rows, tokens)``."""

    def __init__(self, model):
        self.model, self.shapes = model, []
        orig = model.forward

        def counted(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.shapes.append(tuple(ids.shape))
            return orig(*args, **kwargs)

        model.forward = counted

    @property
    def tokens(self) -> int:
        return sum(b * t for b, t in self.shapes)

    def close(self):
        del self.model.forward


class CacheRecorder(Component):
    """Keeps the engine's running cache; at the end, clones every layer's K/V (the final cache)."""

    name = "cache"

    def on_step(self, view):
        self.cache = view.cache

    def on_finish(self, view):
        self.kv = [(layer.keys.clone(), layer.values.clone()) for layer in self.cache.layers]
        return None


class Peeker(Component):
    """Asks for a look-ahead on ``rows`` at the steps in ``at``; keeps the results; optionally forces on row 0."""

    name = "peek"

    def __init__(self, rows, at, forced=FORCED, m=5, kv_layers=None, force_after=None):
        self.rows, self.at, self.forced, self.m, self.kv_layers = rows, set(at), forced, m, kv_layers
        self.force_after, self.results = force_after, []

    def on_step(self, view):
        if view.step in self.at:
            return [LookAhead(i, self.forced, self.m, kv_layers=self.kv_layers) for i in self.rows]
        return None

    def on_lookahead(self, results):
        self.results.extend(results)
        if self.force_after is not None and results[0].step == self.force_after:
            return [ForceTokens(0, results[0].token_ids)]
        return None


def fresh_greedy(model, ids: list[int], m: int) -> tuple[list[int], list[float]]:
    """Greedy continuation by full forward passes over the whole sequence (no cache): the independent oracle."""
    seq, toks, probs = list(ids), [], []
    with torch.no_grad():
        for _ in range(m):
            p = torch.softmax(model(input_ids=torch.tensor([seq])).logits[0, -1].float(), -1)
            toks.append(int(p.argmax()))
            probs.append(float(p.max()))
            seq.append(toks[-1])
    return toks, probs


def assert_same_cache(a, b, rows=None):
    assert len(a) == len(b)
    for (ka, va), (kb, vb) in zip(a, b):
        if rows is not None:
            ka, va, kb, vb = ka[rows], va[rows], kb[rows], vb[rows]
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def converge(**kw):
    cfg = {k: kw.pop(k) for k in list(kw) if k in ConvergenceConfig.model_fields}
    kw.setdefault("parser", lambda text: "same")
    return ConvergenceController(PLAIN_FORMAT, TOK, ConvergenceConfig(**cfg), **kw)


# -- (1) the fork re-processes no prompt or prefix token ------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("patience", [2, 10**6])  # exit / no exit
def test_lookahead_forks_reprocess_no_prompt_or_prefix_token(arch, patience):
    llm = llm_for(arch)
    every, m, max_new = 8, 4, 90
    ctl = converge(every=every, patience=patience, answer_tokens=m, max_answer_tokens=None)
    counter = TokenCounter(llm.model)
    try:
        res = llm.generate([PROMPTS[0]], SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True),
                           components=[ctl])
    finally:
        counter.close()
    s = res.samples[0][0]
    rec = s.outputs["reasoning"]
    n_la = len(rec["lookaheads"])
    assert n_la >= 2 and rec["converged"] == (patience == 2)
    f = len(END)
    assert rec["lookahead_tokens"] == s.outputs["lookahead_tokens"] == n_la * (f + m)
    assert s.outputs["total_tokens"] == s.generated_tokens + n_la * (f + m)
    # fed tokens: the prompt once, every generated token but the last, every look-ahead token but the last decoded
    assert s.generated_tokens == max_new
    assert counter.tokens == len(PROMPTS[0]) + (max_new - 1) + n_la * (f + m - 1)
    assert counter.shapes[0] == (1, len(PROMPTS[0]))  # the only multi-token call over the prompt
    assert counter.shapes.count((1, f)) == n_la  # each fork starts with its forced ids, nothing before them
    assert all(t == 1 for _, t in counter.shapes[1:] if t != f)
    assert res.stats.forward_calls == len(counter.shapes)


# -- (2) without an exit the main rows are exactly the run without the feature --------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=70, temperature=0, ignore_eos=True, n=2),
    SamplingParams(max_new_tokens=70, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True, n=2),
], ids=["greedy", "seeded"])
def test_no_exit_leaves_tokens_and_final_cache_exactly_unchanged(arch, params):
    llm = llm_for(arch)
    base_rec, rec = CacheRecorder(), CacheRecorder()
    base = llm.generate(PROMPTS, params, components=[
        ReasoningController(PLAIN_FORMAT, TOK, max_answer_tokens=None, max_thinking_tokens=40), base_rec])
    ctl = converge(every=6, patience=10**6, answer_tokens=3, max_answer_tokens=None, max_thinking_tokens=40)
    res = llm.generate(PROMPTS, params, components=[ctl, rec])
    for a, b in zip(base.flat, res.flat):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        ra, rb = a.outputs["reasoning"], b.outputs["reasoning"]
        assert {k: ra[k] for k in ra} == {k: rb[k] for k in ra}  # the controller's own record is the same
        assert len(rb["lookaheads"]) >= 3 and not rb["converged"]
        assert b.outputs["total_tokens"] == b.generated_tokens + rb["lookahead_tokens"] > b.generated_tokens
    assert_same_cache(base_rec.kv, rec.kv)


def test_engine_lookahead_alone_changes_nothing_and_other_rows_ignore_a_forced_row():
    llm = llm_for("qwen2")
    params = SamplingParams(max_new_tokens=30, temperature=0.8, seed=3, ignore_eos=True, n=2)
    base_rec, rec, rec2 = CacheRecorder(), CacheRecorder(), CacheRecorder()
    base = llm.generate(PROMPTS, params, components=[base_rec])
    peek = Peeker(rows=[0, 2, 3], at=[4, 11, 20])
    res = llm.generate(PROMPTS, params, components=[peek, rec])
    assert [s.token_ids for s in res.flat] == [s.token_ids for s in base.flat]
    assert_same_cache(base_rec.kv, rec.kv)
    assert len(peek.results) == 9
    x = 3 * (len(FORCED) + 5)
    assert [s.outputs["lookahead_tokens"] for s in res.flat] == [x, 0, x, x]
    # a look-ahead that makes row 0 change course: the other rows stay exactly as without it
    forcing = Peeker(rows=[0, 1, 2], at=[4, 11], force_after=4)
    res2 = llm.generate(PROMPTS, params, components=[forcing, rec2])
    assert res2.flat[0].token_ids[5:10] == forcing.results[0].token_ids
    assert res2.flat[0].token_ids != base.flat[0].token_ids
    assert [s.token_ids for s in res2.flat[1:]] == [s.token_ids for s in base.flat[1:]]
    assert_same_cache(base_rec.kv, rec2.kv, rows=slice(1, None))


def test_exit_on_one_prompt_leaves_the_other_prompts_rows_unchanged():
    llm = llm_for("llama")
    params = SamplingParams(max_new_tokens=80, temperature=0.7, seed=11, ignore_eos=True, n=2)
    cues = ["@@Q@@", "##Z##"]
    base_rec, rec = CacheRecorder(), CacheRecorder()
    base = llm.generate(PROMPTS, params, components=[
        ReasoningController(PLAIN_FORMAT, TOK, answer_cues=cues, max_answer_tokens=None), base_rec])
    ctl = converge(every=6, patience=2, answer_tokens=3, answer_cues=cues, max_answer_tokens=None,
                   parser=lambda text: "q" if "@@Q@@" in text else None)
    res = llm.generate(PROMPTS, params, components=[ctl, rec])
    assert all(s.outputs["reasoning"]["converged"] for s in res.samples[0])
    assert not any(s.outputs["reasoning"]["converged"] for s in res.samples[1])
    assert [s.token_ids for s in res.samples[1]] == [s.token_ids for s in base.samples[1]]
    assert [s.token_ids for s in res.samples[0]] != [s.token_ids for s in base.samples[0]]
    assert_same_cache(base_rec.kv, rec.kv, rows=slice(2, None))


# -- (3) look-ahead tokens are the greedy continuation of prompt + prefix + forced ids ------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
def test_lookahead_tokens_and_kv_equal_a_fresh_full_forward_continuation(arch):
    llm = llm_for(arch)
    m = 6
    peek = Peeker(rows=[0, 1, 3], at=[0, 7, 15], m=m, kv_layers=(1, 3))
    other = Peeker(rows=[2, 1], at=[7], forced=FORCED[:3], m=2)  # another shape at the same step: its own batch
    params = SamplingParams(max_new_tokens=20, temperature=0.9, seed=5, ignore_eos=True, n=2)
    res = llm.generate(PROMPTS, params, components=[peek, other])
    assert len(peek.results) == 9 and [r.index for r in other.results] == [2, 1]
    for r in peek.results + other.results:
        s = res.flat[r.index]
        seq = PROMPTS[r.index // 2] + s.token_ids[: r.step + 1] + r.forced_ids
        toks, probs = fresh_greedy(llm.model, seq, len(r.token_ids))
        assert r.token_ids == toks
        assert r.probs == pytest.approx(probs, abs=1e-5)
        assert r.logprobs == pytest.approx([float(torch.tensor(p).log()) for p in probs], abs=1e-4)
        if r.kv is None:
            continue
        ks, vs = full_forward_kv(llm.model, seq + toks[:-1])  # K/V of the fed look-ahead tokens
        S = len(FORCED) + m - 1
        for a, layer in enumerate((1, 3)):
            assert torch.allclose(r.kv[a, 0].double(), torch.from_numpy(ks[layer][:, -S:]), atol=1e-5)
            assert torch.allclose(r.kv[a, 1].double(), torch.from_numpy(vs[layer][:, -S:]), atol=1e-5)
    assert other.results[0].kv is None and peek.results[0].kv.shape[:2] == (2, 2)


def test_controller_lookaheads_force_the_end_of_thinking_and_cue_and_decode_greedily():
    llm = llm_for("qwen2")
    ctl = converge(every=10, patience=10**6, answer_tokens=5)
    res = llm.generate(PROMPTS, SamplingParams(max_new_tokens=60, temperature=0.9, seed=1, ignore_eos=True),
                       components=[ctl])
    for p, s in enumerate(res.flat):
        las = s.outputs["reasoning"]["lookaheads"]
        cue = len(encode_text(TOK, PLAIN_FORMAT.slow_cue))
        assert [la["step"] for la in las] == [cue - 1 + 10 * j for j in range(1, len(las) + 1)]  # every k thinking
        for la in las:
            toks, probs = fresh_greedy(llm.model, PROMPTS[p] + s.token_ids[: la["step"] + 1] + END, 5)
            assert la["token_ids"] == toks
            assert la["confidence"] == pytest.approx(sum(probs) / 5, abs=1e-5)


# -- (4) the exit: end of thinking + answer cue + the answer, counts include the look-aheads -------------------------
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_exit_forces_the_marker_and_cue_then_answers_and_counts_lookahead_tokens(arch):
    llm = llm_for(arch)
    every, m, answer = 8, 4, 6
    ctl = converge(every=every, patience=3, answer_tokens=m, max_answer_tokens=answer)
    res = llm.generate(PROMPTS, SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True, n=1),
                       components=[ctl])
    cue = encode_text(TOK, PLAIN_FORMAT.slow_cue)
    for s in res.flat:
        rec = s.outputs["reasoning"]
        t = rec["converged_step"]
        assert rec["converged"] and rec["converged_answer"] == "same" and len(rec["lookaheads"]) == 3
        assert rec["switches"] == [{"step": t, "to": "fast", "reason": "converged",
                                    "score": rec["lookaheads"][-1]["confidence"]}]
        assert t == len(cue) - 1 + 3 * every and rec["thinking_tokens"] == 3 * every
        assert s.token_ids[: len(cue)] == cue
        assert s.token_ids[t + 1 : t + 1 + len(END)] == END  # end of thinking + answer cue, as the budget switch
        assert s.token_ids[t + 1 + len(END) : t + 1 + len(END) + m] == rec["lookaheads"][-1]["token_ids"]
        assert s.finish_reason == "answer_limit" and rec["answer_tokens"] == answer
        assert s.generated_tokens == len(cue) + 3 * every + len(END) + answer == len(s.token_ids)
        assert "Time is up, so I stop thinking here. The final answer is" in s.text
        assert rec["lookahead_tokens"] == s.outputs["lookahead_tokens"] == 3 * (len(END) + m)
        assert s.outputs["total_tokens"] == s.generated_tokens + 3 * (len(END) + m)
    summary = convergence_summary(res)
    gen = sum(s.generated_tokens for s in res.flat)
    assert summary == {"samples": 2, "converged": 2, "generated_tokens": gen, "lookahead_tokens": 6 * (len(END) + m),
                       "total_tokens": gen + 6 * (len(END) + m),
                       "lookahead_fraction": pytest.approx(6 * (len(END) + m) / (gen + 6 * (len(END) + m)))}
    with pytest.raises(ValueError, match="no look-ahead output 'other'"):
        convergence_summary(res, name="other")


def test_exit_with_a_named_parser_and_the_native_format_appends_the_cue():
    llm = llm_for("qwen2")
    ctl = ConvergenceController(PLAIN_FORMAT, TOK, ConvergenceConfig(every=6, patience=2, answer_tokens=3,
                                                                     forced_text="\n#### 7\n"), parser="gsm8k")
    res = llm.generate([PROMPTS[0]], SamplingParams(max_new_tokens=80, temperature=0, ignore_eos=True),
                       components=[ctl])
    rec = res.flat[0].outputs["reasoning"]
    assert [la["answer"] for la in rec["lookaheads"]] == ["7", "7"] and rec["converged_answer"] == "7"
    assert TOK.decode(encode_text(TOK, "\n#### 7\nThe final answer is")) in res.flat[0].text  # cue appended
    assert lookahead_text(QWEN3_FORMAT, "Answer:") == QWEN3_FORMAT.end_thinking + "Answer:"
    assert lookahead_text(PLAIN_FORMAT, "A:", forced_text="so {answer_cue}") == "so A:"


def test_confidence_and_probe_gates_and_the_probe_sees_the_lookahead_kv():
    llm = llm_for("qwen2")
    params = SamplingParams(max_new_tokens=70, temperature=0, ignore_eos=True)
    seen = []

    def probe(features):
        seen.append(features)
        return 0.8

    never = converge(every=6, patience=1, answer_tokens=3, min_confidence=1.0)
    assert not llm.generate([PROMPTS[0]], params, components=[never]).flat[0].outputs["reasoning"]["converged"]
    low = converge(every=6, patience=1, answer_tokens=3, probe=probe, probe_threshold=0.9, probe_layers=2)
    sample = llm.generate([PROMPTS[0]], params, components=[low]).flat[0]
    rec = sample.outputs["reasoning"]
    assert not rec["converged"] and all(la["p_stable"] == 0.8 for la in rec["lookaheads"])
    cfg = tiny_model("qwen2").config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert seen[0].shape == (2 * 2 * cfg.num_key_value_heads * head_dim,)  # 2 layers x K,V x heads x d
    # the features: the fed look-ahead tokens' K/V of the last 2 layers, averaged over tokens (a fresh forward)
    la = rec["lookaheads"][1]
    ks, vs = full_forward_kv(llm.model, PROMPTS[0] + sample.token_ids[: la["step"] + 1] + END + la["token_ids"][:-1])
    S = len(END) + 3 - 1
    ref = torch.cat([torch.from_numpy(x[layer][:, -S:].mean(1)).flatten() for layer in (2, 3) for x in (ks, vs)])
    assert torch.allclose(seen[1].double(), ref, atol=1e-5)
    high = converge(every=6, patience=1, answer_tokens=3, probe=probe, probe_threshold=0.5)
    assert llm.generate([PROMPTS[0]], params, components=[high]).flat[0].outputs["reasoning"]["converged"]


# -- (5) bad configs and refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ({"every": 0}, "every must be >= 1 thinking token, got 0"),
    ({"patience": 0}, "patience must be >= 1 look-ahead, got 0"),
    ({"answer_tokens": 0}, "answer_tokens must be >= 1, got 0"),
    ({"forced_text": ""}, "forced_text must be a non-empty string"),
    ({"probe_threshold": 1.5}, "probe_threshold must be a probability in [0, 1], got 1.5"),
    ({"min_confidence": 2.0}, "min_confidence must be in [0, 1]"),
    ({"probe_layers": 0}, "probe_layers must be >= 1"),
])
def test_bad_convergence_configs_raise_naming_the_value(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ConvergenceConfig(**bad)


def test_bad_lookahead_requests_and_components_raise_clearly():
    with pytest.raises(InvalidActionError, match="at least one token id to force"):
        LookAhead(0, [], 4)
    with pytest.raises(InvalidActionError, match="max_tokens must be >= 1, got 0"):
        LookAhead(0, [5], 0)
    with pytest.raises(InvalidActionError, match="index must be >= 0"):
        LookAhead(-1, [5], 2)
    with pytest.raises(ValueError, match="probe_threshold needs a probe"):
        ConvergenceController(PLAIN_FORMAT, TOK, ConvergenceConfig(probe_threshold=0.5))
    llm = llm_for("qwen2")
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)

    class NoHook(Component):
        name = "nohook"

        def on_step(self, view):
            return [LookAhead(0, [5], 2)]

    with pytest.raises(TypeError, match="'nohook' returned a LookAhead but has no on_lookahead"):
        llm.generate([PROMPTS[0]], params, components=[NoHook()])
    with pytest.raises(InvalidActionError, match="vocabulary"):
        llm.generate([PROMPTS[0]], params, components=[Peeker([0], [1], forced=[10**6])])
    with pytest.raises(InvalidActionError, match="layers \\[9\\], which hold no keys"):
        llm.generate([PROMPTS[0]], params, components=[Peeker([0], [1], kv_layers=(9,))])
    with pytest.raises(InvalidActionError, match="for sequence 3"):
        llm.generate([PROMPTS[0]], params, components=[Peeker([3], [1])])

    class Again(Peeker):
        def on_lookahead(self, results):
            return [LookAhead(0, [5], 2)]

    with pytest.raises(TypeError, match="returned a LookAhead from on_lookahead"):
        llm.generate([PROMPTS[0]], params, components=[Again([0], [1])])
    bad_probe = converge(every=2, patience=1, answer_tokens=2, probe=lambda f: 1.5)
    with pytest.raises(ValueError, match="probability in \\[0, 1\\], got 1.5"):
        llm.generate([PROMPTS[0]], SamplingParams(max_new_tokens=40, temperature=0), components=[bad_probe])

