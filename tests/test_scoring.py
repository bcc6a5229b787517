"""Tests of kvagents.signals.scoring: the CoE reference, and in-loop scores against one fresh full forward pass."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import ByteTokenizer, tiny_model  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from kvagents import Component, DecodeEngine, KVModel, SamplingParams, StopSequence  # noqa: E402
from kvagents.signals.scoring import (  # noqa: E402
    SCORE_DIRECTIONS,
    LayerCoE,
    ProbabilityScores,
    TokenCoE,
    coe_scores,
    hidden_coe_from_forward,
)

TOL = 1e-4


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread; with 2 cores shared by other processes, OpenMP's spinning threads
    made these tests ~50x slower. Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51]]  # different lengths: left padding


# ----------------------------------------------------------------------------------------------------------------
# Independent NumPy reference, written from the definitions (docs/paper.md, "Chain-of-Embedding")


def ref_coe(h: np.ndarray) -> dict[str, float]:
    h = np.asarray(h, dtype=np.float64)
    nan = float("nan")
    if len(h) < 2:
        return dict.fromkeys(("mag", "ang", "r", "c"), nan)

    def ang(a, b):
        na, nb = math.sqrt(float(a @ a)), math.sqrt(float(b @ b))
        if na == 0 or nb == 0:
            return nan
        return math.acos(min(1.0, max(-1.0, float(a @ b) / (na * nb))))

    zm = math.sqrt(float((h[-1] - h[0]) @ (h[-1] - h[0])))
    za = ang(h[-1], h[0])
    mags, angs = [], []
    for j in range(len(h) - 1):
        d = h[j + 1] - h[j]
        mags.append(math.sqrt(float(d @ d)) / zm if zm > 0 else nan)
        angs.append(ang(h[j + 1], h[j]) / za if za > 0 else nan)
    mag, an = sum(mags) / len(mags), sum(angs) / len(angs)
    x = sum(m * math.cos(a) for m, a in zip(mags, angs)) / len(mags)
    y = sum(m * math.sin(a) for m, a in zip(mags, angs)) / len(mags)
    return {"mag": mag, "ang": an, "r": mag - an, "c": math.sqrt(x * x + y * y)}


def assert_scores(got: dict[str, float], want: dict[str, float], prefix: str = "", tol: float = TOL) -> None:
    for k, v in want.items():
        key = f"{prefix}_{k}" if prefix else k
        assert isinstance(got[key], float), (key, type(got[key]))
        np.testing.assert_allclose(got[key], v, rtol=tol, atol=tol, equal_nan=True, err_msg=key)


# ----------------------------------------------------------------------------------------------------------------
# coe_scores


def test_coe_scores_matches_reference_on_random_trajectories():
    rng = np.random.default_rng(0)
    for n, d in [(2, 1), (2, 5), (3, 3), (5, 16), (9, 64), (33, 128)]:
        for _ in range(5):
            h = rng.normal(size=(n, d)) + rng.normal(size=d)  # shared offset: smaller angles
            assert_scores(coe_scores(h), ref_coe(h), tol=1e-5)
    h = rng.normal(size=(6, 10))
    assert_scores(coe_scores(torch.from_numpy(h).float()), ref_coe(h.astype(np.float32)), tol=1e-5)


def test_coe_scores_degenerate_cases_are_nan():
    assert all(math.isnan(v) for v in coe_scores(np.ones((1, 4))).values())
    loop = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # h_last == h_0
    s = coe_scores(loop)
    assert math.isnan(s["mag"]) and math.isnan(s["ang"]) and math.isnan(s["r"]) and math.isnan(s["c"])
    scaled = np.array([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])  # h_last parallel to h_0: angle normaliser 0
    s = coe_scores(scaled)
    assert math.isfinite(s["mag"]) and math.isnan(s["ang"]) and math.isnan(s["r"]) and math.isnan(s["c"])
    with pytest.raises(ValueError):
        coe_scores(np.ones(3))


def test_coe_scores_of_a_repeated_end_point_are_nan_not_huge():
    """h_last == h_0 exactly: the end-to-start angle is 0, so every score is NaN (the arccos of the rounded cosine
    gave ~1e-8 here, and ang ~1e8 for a random 9 x 16 trajectory). The same in the row and torch paths, and a
    nearly parallel end point (angle 1e-6, well above rounding) still scores finitely."""
    from kvagents.signals.scoring import coe_scores_rows

    rng = np.random.default_rng(5)
    trajs = rng.normal(size=(6, 9, 16))
    trajs[:, -1] = trajs[:, 0]
    for h in trajs:
        assert all(math.isnan(v) for v in coe_scores(h).values()), coe_scores(h)
    for rows in (coe_scores_rows(trajs), coe_scores_rows(torch.from_numpy(trajs)),
                 coe_scores_rows(torch.from_numpy(trajs).float())):
        assert all(math.isnan(v) for row in rows for v in row.values()), rows
    h = rng.normal(size=(5, 3))
    h[-1] = 2.0 * h[0] + np.cross(h[0], rng.normal(size=3)) * 1e-6  # almost parallel: angle ~1e-6
    s, ref = coe_scores(h), ref_coe(h)
    assert all(math.isfinite(v) for v in s.values()), s
    # the arccos reference keeps ~half the digits at this angle (c, a cosine of angles ~1e6 / 1e-6, keeps none)
    assert s["mag"] == pytest.approx(ref["mag"], rel=1e-9) and s["ang"] == pytest.approx(ref["ang"], rel=1e-3)


def test_score_directions_cover_every_output_key():
    keys = {f"{p}_{k}" for p in ("kv_coe_layer", "kv_coe_token", "hidden_coe") for k in ("mag", "ang", "r", "c")}
    keys |= {"mean_max_prob", "mean_log_max_prob", "mean_logprob", "perplexity", "mean_entropy", "lowest_group_confidence"}
    assert set(SCORE_DIRECTIONS) == keys
    assert SCORE_DIRECTIONS["kv_coe_token_c"] == SCORE_DIRECTIONS["kv_coe_layer_r"] == 1
    assert SCORE_DIRECTIONS["perplexity"] == SCORE_DIRECTIONS["mean_entropy"] == -1


# ----------------------------------------------------------------------------------------------------------------
# In-loop components against one full forward pass over the final sequence


class StopAt(Component):
    """Test helper: finish sequence i after its token at step ``steps[i]``."""

    name = "stop_at"

    def __init__(self, steps: dict[int, int]) -> None:
        self.steps = steps

    def on_step(self, view):
        return [StopSequence(i) for i, s in self.steps.items() if s == view.step]


def full_forward(model, prompt: list[int], gen: list[int]):
    """K, V ``[nL, H, T, d]`` and logits ``[T, V]`` of prompt + gen[:-1] (the last token is never fed)."""
    fed = prompt + gen[:-1]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([fed]), use_cache=True, cache=cache)
    k = np.stack([layer.keys[0].numpy() for layer in cache.layers])
    v = np.stack([layer.values[0].numpy() for layer in cache.layers])
    return k, v, out.logits[0].float().numpy()


def ref_probability(logits: np.ndarray, gen: list[int], window: int, top_k: int = 20) -> dict[str, float]:
    lg = logits.astype(np.float64)
    logp = lg - lg.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    p = np.exp(logp)
    chosen = logp[np.arange(len(gen)), gen]
    conf = -np.sort(logp, axis=-1)[:, ::-1][:, :top_k].mean(-1)
    if len(conf) >= window:
        lowest = min(conf[s : s + window].mean() for s in range(len(conf) - window + 1))
    else:
        lowest = conf.mean()
    return {
        "mean_max_prob": p.max(-1).mean(),
        "mean_log_max_prob": logp.max(-1).mean(),
        "mean_logprob": chosen.mean(),
        "perplexity": math.exp(-chosen.mean()),
        "mean_entropy": (-(p * logp).sum(-1)).mean(),
        "lowest_group_confidence": lowest,
    }


def check_against_full_forward(model, result, min_fed_seen: int) -> None:
    n_checked, fed_counts = 0, []
    for prompt, samples in zip(PROMPTS, result.samples):
        for s in samples:
            gen = s.token_ids
            assert len(gen) >= 1
            k, v, logits = full_forward(model, prompt, gen)
            rows = slice(len(prompt), len(prompt) + len(gen) - 1)  # the fed generated tokens
            kg, vg = k[:, :, rows], v[:, :, rows]  # [nL, H, n-1, d]
            nl, h, n_fed, d = kg.shape
            fed_counts.append(n_fed)
            # layer axis: per-layer mean over fed generated tokens
            if n_fed:
                km, vm = kg.mean(2), vg.mean(2)  # [nL, H, d]
                traj_mean = np.concatenate([km.mean(1), vm.mean(1)], -1)
                traj_k_flat = km.reshape(nl, h * d)
            else:
                traj_mean = traj_k_flat = np.zeros((0, 1))
            assert_scores(s.outputs["kv_coe_layer"], ref_coe(traj_mean), "kv_coe_layer")
            assert_scores(s.outputs["layer_k_flat"], ref_coe(traj_k_flat), "kv_coe_layer")
            # token axis: e_t = mean over layers of [K_t ; V_t], heads flattened
            e = np.concatenate([kg.transpose(2, 0, 1, 3).reshape(n_fed, nl, h * d),
                                vg.transpose(2, 0, 1, 3).reshape(n_fed, nl, h * d)], -1).mean(1)
            assert_scores(s.outputs["kv_coe_token"], ref_coe(e), "kv_coe_token")
            # probabilities: logits that chose each generated token
            lg = logits[len(prompt) - 1 :]
            assert lg.shape[0] == len(gen)
            assert_scores(s.outputs["probability"], ref_probability(lg, gen, window=4))
            assert_scores(s.outputs["probability_w32"], ref_probability(lg, gen, window=32))
            n_checked += 1
    assert n_checked == len(result.samples) * len(result.samples[0])
    assert min(fed_counts) <= min_fed_seen, fed_counts  # an early-stopped sequence was part of the check


def components():
    return [
        LayerCoE(),
        LayerCoE(part="k", heads="flatten", name="layer_k_flat"),
        TokenCoE(initial_capacity=4),  # exercises buffer growth
        ProbabilityScores(window=4),
        ProbabilityScores(name="probability_w32"),
    ]


def test_in_loop_scores_match_full_forward_greedy_with_eos():
    model = tiny_model("llama")
    tok = ByteTokenizer()
    params = SamplingParams(max_new_tokens=12, temperature=0)
    first = KVModel(model, tok).generate(PROMPTS, params)
    g0 = first.samples[0][0].token_ids
    eos = g0[3]  # make sequence 0 end at the first occurrence of its 4th token
    engine = DecodeEngine(model, tok, eos_token_ids=[eos])
    res = engine.generate(PROMPTS, params, components())
    assert res.samples[0][0].finish_reason == "eos" and len(res.samples[0][0].token_ids) <= 4
    check_against_full_forward(model, res, min_fed_seen=3)


def test_in_loop_scores_match_full_forward_sampled_batch():
    model = tiny_model("qwen3")
    llm = KVModel(model, ByteTokenizer())
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=0)
    stop = StopAt({1: 5, 3: 0, 4: 1, 5: 2})  # 5, 0 (NaN CoE), 1 (one fed row) and 2 fed rows
    res = llm.generate(PROMPTS, params, components=[stop, *components()])
    lens = [len(s.token_ids) for ps in res.samples for s in ps]
    assert lens == [12, 6, 12, 1, 2, 3], lens
    check_against_full_forward(model, res, min_fed_seen=0)
    nothing_fed = res.samples[1][0].outputs
    assert all(math.isnan(v) for v in nothing_fed["kv_coe_layer"].values())
    assert all(math.isnan(v) for v in nothing_fed["kv_coe_token"].values())
    assert math.isfinite(nothing_fed["probability"]["perplexity"])
    one_fed = res.samples[1][1].outputs
    assert all(math.isfinite(v) for v in one_fed["kv_coe_layer"].values())
    assert all(math.isnan(v) for v in one_fed["kv_coe_token"].values())


def _tensor_numel(comp, exclude: tuple[str, ...] = ()) -> int:
    return sum(v.numel() for k, v in vars(comp).items() if isinstance(v, torch.Tensor) and k not in exclude)


def test_state_is_flat_in_generated_tokens():
    model = tiny_model("llama")
    llm = KVModel(model, ByteTokenizer())
    sizes = []
    for max_new in (16, 64):
        comps = [LayerCoE(), TokenCoE(initial_capacity=8), ProbabilityScores()]
        res = llm.generate(PROMPTS[:1], SamplingParams(max_new_tokens=max_new, temperature=1.0, n=2, seed=1,
                                                       ignore_eos=True), components=comps)
        assert len(res.samples[0][0].token_ids) == max_new
        layer, token, prob = comps
        per_token = _tensor_numel(token) - _tensor_numel(token, TokenCoE.PER_TOKEN_STATE)
        sizes.append((_tensor_numel(layer), _tensor_numel(token, TokenCoE.PER_TOKEN_STATE), _tensor_numel(prob),
                      per_token))
    (l16, t16, p16, s16), (l64, t64, p64, s64) = sizes
    assert (l16, t16, p16) == (l64, t64, p64)
    assert s64 > s16  # only the per-token scalars grew


def test_hidden_coe_from_forward_matches_reference():
    model = tiny_model("qwen2")
    ids = [1, 40, 41, 42, 60, 61, 62, 63, 64]
    got = hidden_coe_from_forward(model, ids, n_prompt=4)
    with torch.no_grad():
        hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    traj = np.stack([h[0, 4:].double().mean(0).numpy() for h in hs])
    assert traj.shape[0] == model.config.num_hidden_layers + 1
    assert_scores(got, ref_coe(traj), "hidden_coe", tol=1e-5)
    with pytest.raises(ValueError):
        hidden_coe_from_forward(model, ids, n_prompt=len(ids))


def test_row_batched_coe_equals_the_per_row_reference():
    """coe_from_steps_rows / coe_scores_rows (the vectorised finish of LayerCoE / TokenCoE) against the per-row
    reference: random steps with ragged valid masks, a row with no valid step, zero and non-finite normalisers,
    a NaN step, and trajectories with a repeated end point."""
    from kvagents.signals.scoring import coe_from_steps, coe_from_steps_rows, coe_scores, coe_scores_rows

    rng = np.random.default_rng(0)
    B, S = 7, 12
    norms, angles = rng.random((B, S)) * 3, rng.random((B, S)) * 2
    valid = rng.random((B, S)) < 0.7
    valid[3] = False
    norms[4, 2] = np.nan
    valid[4, 2] = True
    tn, ta = rng.random(B) * 5, rng.random(B)
    tn[5], ta[6] = 0.0, np.inf
    rows = coe_from_steps_rows(norms, angles, valid, tn, ta)
    for i in range(B):
        want = coe_from_steps(norms[i, valid[i]], angles[i, valid[i]], tn[i], ta[i])
        assert rows[i].keys() == want.keys()
        for k in want:
            assert rows[i][k] == pytest.approx(want[k], rel=1e-12, abs=1e-12, nan_ok=True), (i, k)
    traj = rng.normal(size=(5, 9, 16))
    traj[2, -1] = traj[2, 0]  # end == start: mag, r, c undefined
    traj[3, 4] = 0.0  # a zero vector: its angles are NaN
    for got, h in zip(coe_scores_rows(traj), traj):
        want = coe_scores(h)
        assert all(got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12, nan_ok=True) for k in want)
    assert all(np.isnan(v) for v in coe_scores_rows(traj)[2].values())  # end == start: the angle too
    assert all(np.isnan(v) for v in coe_scores_rows(traj[:, :1])[0].values())
    with pytest.raises(ValueError, match=r"\[B, N_points, D\]"):
        coe_scores_rows(traj[0])


def test_row_batched_coe_of_a_tensor_equals_numpy():
    """coe_scores_rows on a torch tensor (norms and angles computed in torch, one transfer) equals the numpy path."""
    from kvagents.signals.scoring import coe_scores_rows

    traj = np.random.default_rng(1).normal(size=(4, 6, 8))
    traj[1, -1] = traj[1, 0]
    traj[2, 3] = 0.0
    for a, b in zip(coe_scores_rows(torch.from_numpy(traj).float()), coe_scores_rows(traj.astype(np.float32))):
        assert all(a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-9, nan_ok=True) for k in b)
