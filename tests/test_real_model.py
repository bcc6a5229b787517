"""The engine on a real embedded model (smollm2-135m, float32, CPU)."""

import pytest
import torch

from kvagents import SamplingParams

pytestmark = pytest.mark.real_model

QUESTIONS = ["What is 12 times 7?", "Name three colours.", "Write a haiku about the sea, please, in English."]


def _chat_ids(llm, q):
    return llm.encode_prompt([{"role": "user", "content": q}])


def test_greedy_matches_hf_generate_smollm(smollm):
    tok, model = smollm.tokenizer, smollm.model
    prompts = [_chat_ids(smollm, q) for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=16, temperature=0)
    eos = smollm.engine.eos_token_ids
    T = max(len(p) for p in prompts)
    pad = smollm.engine.pad_token_id
    ids = torch.full((3, T), pad)
    mask = torch.zeros((3, T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = torch.tensor(p), 1
    hf = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16, pad_token_id=pad,
                        eos_token_id=eos)[:, T:].tolist()

    def cut(r):
        k = next((i for i, t in enumerate(r) if t in eos), None)
        return r if k is None else r[: k + 1]

    got = [g[0].token_ids for g in smollm.generate(prompts, params)]
    assert got == [cut(r) for r in hf]  # left-padded batch of 3
    single = smollm.generate([prompts[0]], params).samples[0][0].token_ids
    hf1 = model.generate(torch.tensor([prompts[0]]), do_sample=False, max_new_tokens=16, pad_token_id=pad,
                         eos_token_id=eos)[0, len(prompts[0]) :].tolist()
    assert single == cut(hf1)
    assert tok.decode(single, skip_special_tokens=True) == smollm.generate([prompts[0]], params).samples[0][0].text


def test_stop_string_across_real_token_boundaries(smollm):
    """Force a known text whose stop string spans several real tokens; output is cut exactly before it."""
    from kvagents import Component, ForceTokens

    text = " The answer is forty-two. Done."
    ids = smollm.tokenizer(text, add_special_tokens=False)["input_ids"]

    class Force(Component):
        name = "force"

        def on_step(self, view):
            return [ForceTokens(0, ids)] if view.step == 0 else None

    stop = "forty-two"
    pieces = [smollm.tokenizer.decode([i]) for i in ids]
    assert not any(stop in p for p in pieces)  # the stop string really spans tokens
    res = smollm.generate([_chat_ids(smollm, "Say something.")],
                          SamplingParams(max_new_tokens=40, temperature=0, stop=[stop]), components=[Force()])
    s = res.samples[0][0]
    assert s.finish_reason == "stop"
    assert s.text.endswith("The answer is ") and stop not in s.text
    assert s.forced_tokens == s.generated_tokens - 1


def test_demo_runs_and_shows_the_choice(capsys):
    from collections import Counter

    from kvagents.demo import PROBLEMS, run_demo

    summary = run_demo(model="smollm2-135m", n=3, max_new_tokens=24, dtype="float32", device="cpu")
    out = capsys.readouterr().out
    assert "What the KV cache bought here" in out and "tokens saved" in out and "Columns:" in out
    assert len(summary["problems"]) == len(PROBLEMS) and summary["early_stop"]["samples"] == 3 * len(PROBLEMS)
    # the majority pick is the most common parsed answer among the samples that were not stopped (recomputed here
    # from the printed table)
    for p, row in enumerate(summary["problems"]):
        block = out.split(f"Q{p + 1}: ")[1].split("\n\n")[0].splitlines()[2:]
        answers = [line.split()[3] for line in block if line.split()[2] != "weak"]
        counts = Counter(a for a in answers if a != "None")
        if counts:
            top = max(counts.values())
            assert row["majority"] in {a for a, c in counts.items() if c == top}


def test_cli_embed_writes_npy(tmp_path):
    import numpy as np

    from kvagents.cli import main

    src = tmp_path / "t.jsonl"
    src.write_text('{"text": "first"}\n{"text": "second one"}\n')
    assert main(["embed", str(src), str(tmp_path / "e.npy"), "--model", "smollm2-135m", "--dtype", "float32",
                 "--layers=-1,-2", "--part", "k"]) == 0
    arr = np.load(tmp_path / "e.npy")
    assert arr.shape == (2, 64) and np.allclose(np.linalg.norm(arr, axis=1), 1, atol=1e-5)
