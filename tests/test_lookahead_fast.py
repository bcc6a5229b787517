"""Look-ahead forks on the fast path (its CPU twin): the same forks, results and exits as the eager engine."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import full_forward_kv
from test_lookahead import END, FORCED, PROMPTS, TOK, Peeker, converge, fresh_greedy
from tiny import tiny_model

from kvagents import SamplingParams
from kvagents.control.thinking import PLAIN_FORMAT, ReasoningController
from kvagents.engine.decode import DecodeEngine
from kvagents.engine.fast_decode import FastDecodeEngine, UnsupportedComponentError


def engines(arch, device="cpu"):
    model = tiny_model(arch) if device == "cpu" else copy.deepcopy(tiny_model(arch)).to(device)
    return DecodeEngine(model, TOK), FastDecodeEngine(model, TOK)


@pytest.mark.parametrize("arch,device", [
    ("qwen2", "cpu"), ("llama", "cpu"),
    pytest.param("qwen3", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
@pytest.mark.parametrize("patience", [3, 10**6])
def test_fast_path_lookaheads_and_exits_equal_the_eager_engine(arch, device, patience):
    """On CUDA the fast path's steps are CUDA graphs (+ compile); the forks run eagerly between two replays."""
    eager, fast = engines(arch, device)
    params = SamplingParams(max_new_tokens=130, temperature=0, ignore_eos=True, n=2)
    res = {}
    for name, engine in (("eager", eager), ("fast", fast)):
        ctl = converge(every=8, patience=patience, answer_tokens=4, max_answer_tokens=8)
        res[name] = engine.generate(PROMPTS, params, components=[ctl])
    for a, b in zip(res["eager"].flat, res["fast"].flat):
        ra, rb = a.outputs["reasoning"], b.outputs["reasoning"]
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert ra["converged_step"] == rb["converged_step"] and ra["converged"] == (patience == 3)
        assert [x["token_ids"] for x in ra["lookaheads"]] == [x["token_ids"] for x in rb["lookaheads"]]
        assert [x["step"] for x in ra["lookaheads"]] == [x["step"] for x in rb["lookaheads"]]
        assert [x["confidence"] for x in rb["lookaheads"]] == pytest.approx([x["confidence"] for x in ra["lookaheads"]],
                                                                             abs=1e-5)
        assert a.outputs["lookahead_tokens"] == b.outputs["lookahead_tokens"] == len(ra["lookaheads"]) * (len(END) + 4)
        assert a.outputs["total_tokens"] == b.outputs["total_tokens"]
        if ra["converged"]:
            t = ra["converged_step"]
            assert b.token_ids[t + 1 : t + 1 + len(END)] == END


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_fast_path_without_an_exit_samples_exactly_as_without_lookaheads(arch):
    fast = FastDecodeEngine(tiny_model(arch), TOK)
    params = SamplingParams(max_new_tokens=60, temperature=0.9, top_p=0.95, seed=4, ignore_eos=True, n=2)
    base = fast.generate(PROMPTS, params, components=[ReasoningController(PLAIN_FORMAT, TOK, max_answer_tokens=None)])
    ctl = converge(every=5, patience=10**6, answer_tokens=3, max_answer_tokens=None)
    res = fast.generate(PROMPTS, params, components=[ctl])
    assert [s.token_ids for s in res.flat] == [s.token_ids for s in base.flat]
    assert all(len(s.outputs["reasoning"]["lookaheads"]) >= 5 for s in res.flat)


def test_fast_path_lookahead_tokens_and_kv_equal_a_fresh_full_forward_continuation():
    fast = FastDecodeEngine(tiny_model("qwen3"), TOK)
    m = 5
    peek = Peeker(rows=[0, 1, 3], at=[0, 6, 13], m=m, kv_layers=(0, 2))
    params = SamplingParams(max_new_tokens=20, temperature=0.9, seed=2, ignore_eos=True, n=2)
    res = fast.generate(PROMPTS, params, components=[peek])
    plain = fast.generate(PROMPTS, params)
    assert [s.token_ids for s in res.flat] == [s.token_ids for s in plain.flat]
    assert len(peek.results) == 9
    for r in peek.results:
        seq = PROMPTS[r.index // 2] + res.flat[r.index].token_ids[: r.step + 1] + FORCED
        toks, probs = fresh_greedy(fast.model, seq, m)
        assert r.token_ids == toks and r.probs == pytest.approx(probs, abs=1e-5)
        ks, vs = full_forward_kv(fast.model, seq + toks[:-1])
        S = len(FORCED) + m - 1
        for a, layer in enumerate((0, 2)):
            assert torch.allclose(r.kv[a, 0].double(), torch.from_numpy(ks[layer][:, -S:]), atol=1e-5)
            assert torch.allclose(r.kv[a, 1].double(), torch.from_numpy(vs[layer][:, -S:]), atol=1e-5)
    assert [s.outputs["lookahead_tokens"] for s in res.flat] == [3 * (len(FORCED) + m)] * 2 + [0, 3 * (len(FORCED) + m)]


def test_fast_path_refuses_lookaheads_on_a_sliding_window_model():
    model = tiny_model("qwen2")
    fast = FastDecodeEngine(model, TOK)
    old = (model.config.sliding_window, getattr(model.config, "use_sliding_window", None))
    model.config.sliding_window, model.config.use_sliding_window = 64, True
    try:
        with pytest.raises(UnsupportedComponentError, match="eager engine: generate\\(..., fast=False\\)"):
            fast.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4, temperature=0), components=[converge()])
    finally:
        model.config.sliding_window, model.config.use_sliding_window = old
