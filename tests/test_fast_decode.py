"""Fast decode path (static cache, graph-safe steps): equal to HF generate and to the eager engine on the CPU;
the CUDA test (graphs + compile) runs where a GPU exists."""

from __future__ import annotations

import math

import pytest
import torch
from test_engine import PROMPTS, hf_greedy
from tiny import ByteTokenizer, tiny_model

from kvagents import Component, ForceTokens, KVEmbedding, KVModel, KVPooling, SamplingParams, StopSequence
from kvagents.engine.decode import DecodeEngine
from kvagents.engine.fast_decode import FastDecodeEngine, StaticStepView, UnsupportedModelError, hash_exponential
from kvagents.signals.probe import probe_pooling
from kvagents.signals.scoring import LayerCoE, ProbabilityScores, TokenCoE

ARCHS = ["llama", "qwen2", "qwen3"]


def fast_for(arch, **kw):
    kw.setdefault("bucket", 4)  # several attention buckets in a short run
    kw.setdefault("sync_every", 3)
    return FastDecodeEngine(tiny_model(arch), ByteTokenizer(), **kw)


def comps():
    return [
        LayerCoE(), LayerCoE(part="v", heads="flatten", name="lv"), TokenCoE(initial_capacity=4),
        ProbabilityScores(window=4), KVEmbedding(probe_pooling(4), name="features"),
        KVEmbedding(KVPooling(segment="all", positions="window", window=3, layers=2), name="win"),
        KVEmbedding(KVPooling(segment="generated", positions="first"), name="first"),
        KVEmbedding(KVPooling(segment="generated", positions="last", part="k"), name="last"),
    ]


def same_output(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_output(a[k], b[k]) for k in a)
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-4 * max(1.0, abs(a))
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def assert_same_results(ra, rb):
    for sa, sb in zip(ra.flat, rb.flat, strict=True):
        assert sa.token_ids == sb.token_ids
        assert (sa.finish_reason, sa.text, sa.generated_tokens, sa.forced_tokens) == (
            sb.finish_reason, sb.text, sb.generated_tokens, sb.forced_tokens)
        assert sa.outputs.keys() == sb.outputs.keys()
        for k in sa.outputs:
            assert same_output(sa.outputs[k], sb.outputs[k]), (k, sa.outputs[k], sb.outputs[k])


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_hf_generate_single_and_mixed_lengths(arch):
    fast = fast_for(arch)
    params = SamplingParams(max_new_tokens=14, temperature=0)
    for p in PROMPTS:
        assert fast.generate([p], params).samples[0][0].token_ids == hf_greedy(tiny_model(arch), [p], 14)[0]
    got = [g[0].token_ids for g in fast.generate(PROMPTS, params)]
    assert got == hf_greedy(tiny_model(arch), PROMPTS, 14)


@pytest.mark.parametrize("arch", ARCHS)
def test_components_and_n_samples_equal_eager_engine(arch):
    model = tiny_model(arch)
    eager, fast = DecodeEngine(model, ByteTokenizer()), fast_for(arch)
    for params in (SamplingParams(max_new_tokens=13, temperature=0, n=2),
                   SamplingParams(max_new_tokens=11, temperature=0, stop_token_ids=[213, 57, 94])):
        assert_same_results(eager.generate(PROMPTS, params, comps()), fast.generate(PROMPTS, params, comps()))


def test_stop_strings_inside_a_check_window_roll_back_exactly():
    model = tiny_model("qwen3")
    eager = DecodeEngine(model, ByteTokenizer())
    free = eager.generate(PROMPTS, SamplingParams(max_new_tokens=20, temperature=0)).flat
    stops = [free[0].text[4:6], free[1].text[9:11]]  # complete mid-window for sync_every=5
    params = SamplingParams(max_new_tokens=20, temperature=0, stop=stops)
    fast = fast_for("qwen3", sync_every=5)
    ref = eager.generate(PROMPTS, params, comps())
    got = fast.generate(PROMPTS, params, comps())
    assert [s.finish_reason for s in got.flat][:2] == ["stop", "stop"]
    assert_same_results(ref, got)
    ev_e, ev_f = [], []
    eager.generate(PROMPTS, params, on_text=ev_e.append)
    fast.generate(PROMPTS, params, on_text=ev_f.append)
    for i, s in enumerate(ref.flat):
        assert "".join(e.text for e in ev_f if e.prompt_index == i) == s.text
        finals = [e.finish_reason for e in ev_f if e.prompt_index == i and e.finish_reason]
        assert finals == [s.finish_reason]


class Forcer(Component):
    """A plain component (no graph step): forces tokens and stops a sequence."""

    name = "forcer"

    def on_step(self, view):
        if view.step == 2:
            return [ForceTokens(0, [50, 51, 52])]
        if view.step == 5:
            return [StopSequence(1, "mine")]
        return None


def test_plain_components_actions_equal_eager_engine():
    model = tiny_model("llama")
    params = SamplingParams(max_new_tokens=12, temperature=0)
    ref = DecodeEngine(model, ByteTokenizer()).generate(PROMPTS, params, [Forcer(), LayerCoE()])
    got = fast_for("llama").generate(PROMPTS, params, [Forcer(), LayerCoE()])
    assert_same_results(ref, got)
    assert got.flat[0].forced_tokens == 3 and got.flat[1].finish_reason == "mine"


class StepCounter(Component):
    """A user component offering a graph-safe step: counts live fed tokens on the device."""

    name = "counter"

    def on_prefill(self, view):
        self.count = torch.zeros(view.input_ids.shape[0] * view.n, dtype=torch.long)
        self.kinds = set()

    def graph_state(self):
        return {"count": self.count}

    def step_tensors(self, view):
        self.kinds.add((type(view).__name__, isinstance(view.step, torch.Tensor)))
        if view.has_kv:
            self.count += view.fed_valid.long()

    def on_finish(self, view):
        return self.count.tolist()


def test_user_graph_step_component():
    comp = StepCounter()
    res = fast_for("qwen2").generate(PROMPTS, SamplingParams(max_new_tokens=9, temperature=0,
                                                             stop_token_ids=[213]), [comp])
    assert comp.kinds == {(StaticStepView.__name__, True)}
    for s in res.flat:  # every generated token but the last was fed
        assert s.outputs["counter"] == s.generated_tokens - 1


def test_sampling_seeded_reproducible_distinct_and_top_k_1_is_greedy():
    fast = fast_for("qwen3")
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=4, seed=3)
    a = [s.token_ids for s in fast.generate(PROMPTS[:2], params).flat]
    b = [s.token_ids for s in fast.generate(PROMPTS[:2], params).flat]
    assert a == b and len({tuple(x) for x in a}) == len(a)
    c = [s.token_ids for s in fast.generate(PROMPTS[:2], params.model_copy(update={"seed": 4})).flat]
    assert c != a
    k1 = fast.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.9, top_k=1, seed=0))
    greedy = fast.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0))
    assert [s.token_ids for s in k1.flat] == [s.token_ids for s in greedy.flat]


def test_hash_noise_is_exponential_and_varies_with_every_coordinate():
    V = 4096
    rows, vocab = torch.arange(4), torch.arange(V)
    x = hash_exponential(torch.tensor(7), torch.tensor(3), rows, vocab)
    assert x.shape == (4, V) and bool((x > 0).all())
    assert abs(float(x.mean()) - 1.0) < 0.03 and abs(float(x.var()) - 1.0) < 0.1  # Exp(1): mean 1, variance 1
    u = torch.exp(-x)  # back to the uniforms: a sample of U(0,1)
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert float((hist - 0.1).abs().max()) < 0.01
    y = hash_exponential(torch.tensor(7), torch.tensor(4), rows, vocab)
    z = hash_exponential(torch.tensor(8), torch.tensor(3), rows, vocab)
    for other in (y, z):
        assert abs(float(torch.corrcoef(torch.stack([x.flatten(), other.flatten()]))[0, 1])) < 0.05
    assert not torch.equal(x[0], x[1])


def test_hash_noise_is_never_zero_on_a_large_vocabulary():
    """Zero noise makes ``probs / noise`` NaN (masked token) or inf: a draw outside the nucleus. 64 rows of a
    152k vocabulary over 20 steps (24-bit uniforms rounded to 1.0 about once a step here)."""
    rows, vocab = torch.arange(64), torch.arange(151936)
    for step in range(20):
        x = hash_exponential(torch.tensor(7), torch.tensor(step), rows, vocab)
        assert bool(torch.isfinite(x).all()) and float(x.min()) > 0, step


class _TopKCheck(Component):
    """Counts sampled tokens that are not among the ``k`` most likely of their step (alive rows only)."""

    name = "topk_check"

    def __init__(self, k: int) -> None:
        self.k, self.bad, self.seen = k, None, 0

    def on_step(self, view):
        inside = (view.logits.topk(self.k, dim=-1).indices == view.token_ids[:, None]).any(-1)
        bad = (~inside & view.alive).long()
        self.bad = bad if self.bad is None else self.bad + bad
        self.seen += int(view.alive.sum())

    def on_finish(self, view):
        return self.bad.tolist()


def test_fast_path_draws_stay_inside_top_k_on_a_large_vocabulary():
    """64 sampled rows over a 152k vocabulary with top-k 4: every draw is among the 4 most likely tokens."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    fast = FastDecodeEngine(model, None, bucket=16, sync_every=4, eos_token_ids=[])
    check = _TopKCheck(4)
    params = SamplingParams(max_new_tokens=24, temperature=1.5, top_k=4, n=8, seed=11, ignore_eos=True)
    res = fast.generate([[5, 6, 7, 8], [9, 10], [11, 12, 13], [14], [15, 16], [17], [18, 19], [20, 21]], params,
                        [check])
    assert sum(s.generated_tokens for s in res.flat) == 64 * 24 == check.seen
    assert sum(s.outputs["topk_check"] for s in res.flat) == 0


def test_kvmodel_fast_flag_and_errors():
    llm = KVModel(tiny_model("qwen2"), ByteTokenizer())
    params = SamplingParams(max_new_tokens=8, temperature=0)
    assert llm.generate(PROMPTS, params, fast=True).texts == llm.generate(PROMPTS, params).texts
    ban = list(range(3, 256, 2))

    def suppress(x, prev, valid):
        return x.index_fill(1, torch.tensor(ban), float("-inf"))

    masked = llm.generate(PROMPTS, params, fast=True, logits_processors=[suppress])
    assert masked.texts == llm.generate(PROMPTS, params, logits_processors=[suppress]).texts
    assert all(t not in ban for s in masked.flat for t in s.token_ids)
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        FastDecodeEngine(gpt2, ByteTokenizer())
    with pytest.raises(ValueError, match="cuda_graphs"):
        FastDecodeEngine(tiny_model("qwen2"), ByteTokenizer(), cuda_graphs=True)  # a CPU model
    with pytest.raises(ValueError, match="bucket"):
        FastDecodeEngine(tiny_model("qwen2"), ByteTokenizer(), bucket=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graphs + torch.compile)")
def test_cuda_graphs_and_compile_equal_eager_engine():
    import copy

    model = copy.deepcopy(tiny_model("qwen3")).cuda()
    eager = DecodeEngine(model, ByteTokenizer())
    fast = FastDecodeEngine(model, ByteTokenizer(), bucket=8, sync_every=4)
    assert fast.graphs and fast.lm.compiled
    for params in (SamplingParams(max_new_tokens=20, temperature=0, n=2, stop_token_ids=[213]),
                   SamplingParams(max_new_tokens=20, temperature=0, stop=["a", "Q"])):
        assert_same_results(eager.generate(PROMPTS, params, comps()), fast.generate(PROMPTS, params, comps()))
        captured = fast.captures
        assert_same_results(eager.generate(PROMPTS, params, comps()), fast.generate(PROMPTS, params, comps()))
        assert fast.captures == captured  # same shapes: graphs reused
    # one row: the one-row fused Triton GEMVs (when Triton is there)
    one = SamplingParams(max_new_tokens=20, temperature=0)
    for p in PROMPTS:
        assert_same_results(eager.generate([p], one, comps()), fast.generate([p], one, comps()))
    # logits processors: the forward graph, the processors on the host, then the sampling graph
    ban = torch.arange(3, 256, 2, device="cuda")

    def suppress(x, prev, valid):
        return x.index_fill(1, ban, float("-inf"))

    for params in (SamplingParams(max_new_tokens=20, temperature=0, n=2, stop_token_ids=[212]),
                   SamplingParams(max_new_tokens=20, temperature=0, stop=["a", "Q"])):
        assert_same_results(eager.generate(PROMPTS, params, comps(), logits_processors=[suppress]),
                            fast.generate(PROMPTS, params, comps(), logits_processors=[suppress]))
    s = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, n=3, seed=1)
    cpu = FastDecodeEngine(tiny_model("qwen3"), ByteTokenizer(), bucket=8)
    assert [x.token_ids for x in fast.generate(PROMPTS, s).flat] == [x.token_ids for x in cpu.generate(PROMPTS, s).flat]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graphs + torch.compile + Triton)")
def test_cuda_range_attention_and_row_kernels_equal_eager_engine(monkeypatch):
    """Graphs + compile with the per-row-range Triton attention (finished rows read nothing) and the several-row
    fused GEMVs: mixed prompt lengths, n samples, rows finishing early on a stop token, components on."""
    import copy

    pytest.importorskip("triton")
    monkeypatch.setenv("KVAGENTS_ATTN", "triton")
    monkeypatch.setenv("KVAGENTS_GEMV_ROWS", "32")
    model = copy.deepcopy(tiny_model("qwen3")).cuda()
    eager = DecodeEngine(model, ByteTokenizer())
    fast = FastDecodeEngine(model, ByteTokenizer(), bucket=8, sync_every=4)
    assert fast.lm.attention_for(4) == "triton" and fast.lm.fused_gemv_for(8)
    free = eager.generate(PROMPTS, SamplingParams(max_new_tokens=20, temperature=0)).flat
    stops = [free[0].token_ids[3], free[2].token_ids[9]]  # rows 0 and 2 finish early, at different steps
    for params in (SamplingParams(max_new_tokens=20, temperature=0, n=2, stop_token_ids=stops),
                   SamplingParams(max_new_tokens=20, temperature=0, stop=["a", "Q"]),
                   SamplingParams(max_new_tokens=20, temperature=0)):
        assert_same_results(eager.generate(PROMPTS, params, comps()), fast.generate(PROMPTS, params, comps()))
    for p in PROMPTS:
        one = SamplingParams(max_new_tokens=20, temperature=0)
        assert_same_results(eager.generate([p], one, comps()), fast.generate([p], one, comps()))


@pytest.mark.parametrize("ways", [2, 3, 8])
def test_top_p_search_keeps_the_sorted_nucleus(ways):
    """The sort-free nucleus (a ways-ary search over the probabilities' bit patterns; 2 = bisection) equals the
    sort-and-cumsum rule of kvagents.sampling."""
    from kvagents.engine.fast_sampling import top_p_keep

    g = torch.Generator().manual_seed(0)
    for scale in (0.5, 3.0, 10.0):
        logits = torch.randn(6, 300, generator=g) * scale
        probs = logits.softmax(-1)
        for top_p in (0.1, 0.5, 0.9, 0.95):
            sp, order = probs.sort(-1, descending=True)
            keep_sorted = (sp.cumsum(-1) - sp) <= top_p
            want = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
            got = top_p_keep(probs, top_p, ways=ways)
            assert torch.equal(got, want), (scale, top_p, (got != want).sum())


def test_top_p_search_compiles_with_inductor():
    """The sampled head's top-p custom op lowers through Inductor (the CPU backend here; CUDA compiles the same graph).
    An op argument named ``kernel`` once collided with Inductor's FallbackKernel.create(kernel, ...) and failed every
    compiled sampled head on the GPU; this test failed the same way."""
    from kvagents.engine.fast_sampling import process_logits_search

    logits = torch.randn(3, 257, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(temperature=0.7, top_p=0.9)
    compiled = torch.compile(lambda x: process_logits_search(x, params), backend="inductor", fullgraph=True)
    with torch._inductor.config.patch(force_disable_caches=True):  # lower it here, not from an earlier run's cache
        got = compiled(logits)
    assert torch.equal(got, process_logits_search(logits, params))


class PrefillForcer(Component):
    """Forces a cue from the first generated token (ForceTokens returned by on_prefill)."""

    name = "cue"

    def on_prefill(self, view):
        return [ForceTokens(1, [70, 71])]


def test_prefill_forced_tokens_equal_eager_engine():
    params = SamplingParams(max_new_tokens=8, temperature=0, n=2)
    ref = DecodeEngine(tiny_model("qwen3"), ByteTokenizer()).generate(PROMPTS, params, [PrefillForcer(), LayerCoE()])
    got = fast_for("qwen3").generate(PROMPTS, params, [PrefillForcer(), LayerCoE()])
    assert_same_results(ref, got)
    assert got.flat[1].token_ids[:2] == [70, 71] and got.flat[1].forced_tokens == 2


def test_reduction_attention_equals_sdpa_with_padding_mask():
    """The B=1 GPU attention (elementwise products + reductions, for Inductor) == SDPA, grouped-query heads."""
    from kvagents.engine.static_cache import attend, attend_reduce

    g = torch.Generator().manual_seed(0)
    b, hq, hkv, d, L = 2, 8, 2, 16, 37
    q, k, v = (torch.randn(*s, generator=g) for s in ((b, hq, d), (b, hkv, L, d), (b, hkv, L, d)))
    valid = torch.ones(b, L, dtype=torch.bool)
    valid[1, :5] = False  # row 1 left-padded
    valid[:, 30:] = False  # columns past the current length in the bucket
    mask = torch.zeros(b, 1, 1, L).masked_fill(~valid[:, None, None], float("-inf"))
    want = attend(q, k, v, mask, 0.25, hkv)
    got = attend_reduce(q, k, v, mask, 0.25, hkv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.shape == (b, hq * d)
