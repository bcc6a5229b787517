"""The fast path against the eager engine over random configurations (greedy): prompt counts and lengths, n,
lengths, stop ids and stop strings taken from the unconstrained output, EOS ignored or not, graph components,
plain components forcing tokens and stopping rows at random steps, a logits processor, host-check intervals,
attention buckets, and the kernels' recording pass leaving garbage behind (simulated). Tokens, texts, finish
reasons, forced counts, component outputs and the streamed text must be equal. (360 + 200 such configurations
passed when this was written; the test keeps a fixed sample of them.)"""

from __future__ import annotations

import random

import pytest
import torch
from test_fast_decode import assert_same_results, comps
from test_kernel_precompile import GarbagePass
from tiny import ByteTokenizer, tiny_model

from kvagents import Component, ForceTokens, SamplingParams, StopSequence
from kvagents.engine.decode import DecodeEngine
from kvagents.engine.fast_decode import FastDecodeEngine

MODELS = {}


class Planned(Component):
    """A plain component whose actions come from a plan: ``(step, "force" | "stop", row, tokens)``."""

    name = "planned"

    def __init__(self, plan):
        self.plan = plan

    def on_step(self, view):
        return [ForceTokens(row, toks) if kind == "force" else StopSequence(row, "mine")
                for step, kind, row, toks in self.plan if view.step == step and row < view.token_ids.shape[0]]


def banning(every: int):
    def proc(logits, prev_tokens, prev_valid):
        return logits.index_fill(1, torch.arange(3, logits.shape[1], every), float("-inf"))

    return proc


def configuration(seed: int):
    rng = random.Random(seed)
    arch = rng.choice(["llama", "qwen2", "qwen3"])
    if arch not in MODELS:
        MODELS[arch] = tiny_model(arch)
    model = MODELS[arch]
    P, n, max_new = rng.randint(1, 4), rng.choice([1, 1, 2, 3]), rng.randint(1, 20)
    prompts = [[rng.randint(3, 250) for _ in range(rng.randint(1, 12))] for _ in range(P)]
    kw = dict(max_new_tokens=max_new, temperature=0, n=n)
    free = DecodeEngine(model, ByteTokenizer()).generate(prompts, SamplingParams(**kw)).flat
    if rng.random() < 0.4:
        kw["stop_token_ids"] = [rng.choice(s.token_ids) for s in free if s.token_ids][:2]
    texts = [s.text for s in free if len(s.text) > 3]
    if rng.random() < 0.4 and texts:
        t = rng.choice(texts)
        i = rng.randint(0, len(t) - 2)
        kw["stop"] = [t[i : i + rng.randint(1, 3)]]
    kw["ignore_eos"] = rng.random() < 0.2
    with_comps = rng.random() < 0.6
    plan = [(rng.randint(0, max_new), rng.choice(["force", "stop"]), rng.randint(0, P * n - 1),
             [rng.randint(3, 250) for _ in range(rng.randint(1, 3))])
            for _ in range(rng.randint(1, 3) if rng.random() < 0.4 else 0)]  # fmt: skip
    procs = [banning(rng.choice([2, 3, 5]))] if rng.random() < 0.4 else []
    sync, bucket = rng.choice([1, 2, 3, 5, 8]), rng.choice([1, 2, 4, 8, 128])

    def components():
        return (comps() if with_comps else []) + ([Planned(plan)] if plan else [])

    return model, prompts, SamplingParams(**kw), components, procs, sync, bucket


@pytest.mark.parametrize("seed", [3, 11, 17, 29, 42, 57, 64, 88, 101, 123, 150, 199, 230, 271, 333, 1007])
def test_random_configuration_equals_the_eager_engine(seed):
    model, prompts, params, components, procs, sync, bucket = configuration(seed)
    eager = DecodeEngine(model, ByteTokenizer(), sync_every=sync)
    fast = FastDecodeEngine(model, ByteTokenizer(), bucket=bucket, sync_every=sync, precompile=seed % 2 == 1)
    fast._precompiler = lambda: GarbagePass(fast, [])
    ref = eager.generate(prompts, params, components(), logits_processors=procs)
    assert_same_results(ref, fast.generate(prompts, params, components(), logits_processors=procs))
    events = []
    assert_same_results(ref, fast.generate(prompts, params, components(), on_text=events.append,
                                           logits_processors=procs))
    for i, s in enumerate(ref.flat):
        p, k = divmod(i, params.n)
        assert "".join(e.text for e in events if (e.prompt_index, e.sample_index) == (p, k)) == s.text
