"""``kvagents demo``: n sampled answers per built-in question, with what the KV cache says about each."""

from __future__ import annotations

import time

import torch

from .engine.params import SamplingParams
from .model import KVModel
from .signals.embedding import KVEmbedding
from .signals.pooling import KVPooling

QUESTIONS = [
    "Tom has 3 boxes with 12 apples each. He gives away 10 apples. How many apples does he have left?",
    "A train travels 60 km per hour for 2.5 hours. How far does it go in km?",
    "Write a Python expression that returns the sum of the squares of 1 to 10, then give its value.",
]
SYSTEM = "You are a helpful assistant. Think step by step, then give the final answer after 'Answer:'."


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def run_demo(model: str = "qwen2.5-coder-0.5b", n: int = 4, max_new_tokens: int = 192, dtype: str = "auto",
             device: str = "auto", seed: int = 0, temperature: float = 0.7) -> None:
    from .model import resolve_device

    dev = resolve_device(device)
    if dtype == "auto":  # bf16 on GPUs and on CPUs with bf16 instructions (2-3x faster there); else float32
        from .model import fast_dtype

        dtype = fast_dtype(dev)
    llm = KVModel.from_pretrained(model, dtype=dtype, device=dev)
    t0 = time.perf_counter()
    llm.load()
    print(f"model {model} loaded in {time.perf_counter() - t0:.1f}s on {dev} ({llm.dtype})")
    prompts = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.95, seed=seed)
    from .control.selection import candidates_from_samples, select
    from .signals.scoring import LayerCoE, ProbabilityScores, TokenCoE

    gen_emb = KVEmbedding(KVPooling(segment="generated"), name="kv_generated")
    prompt_emb = KVEmbedding(KVPooling(segment="prompt"), name="kv_prompt")
    scorers = [LayerCoE(), TokenCoE(), ProbabilityScores()]
    res = llm.generate(prompts, params, components=[gen_emb, prompt_emb, *scorers])
    st = res.stats
    print(
        f"{len(prompts)} prompts x n={n}: prefill {st.prefill_tokens} tokens in {st.prefill_s:.2f}s "
        f"(once per prompt), decode {st.generated_tokens} tokens in {st.decode_s:.1f}s "
        f"= {st.tokens_per_s:.1f} tokens/s, {st.forward_calls} forward calls"
    )
    print("KV columns: cos(prompt) = cosine of the sample's generated-segment KV embedding to its prompt's; "
          "agree = mean cosine to its sibling samples (higher = the sample resembles the others); entropy = mean "
          "token entropy (lower = more confident); KV-CoE-C = layer-axis chain-of-embedding, tokCoE-R = the paper's "
          "token-axis form (higher = more likely correct). * = chosen: majority vote over parsed answers, ties "
          "broken by the lowest entropy.")
    for p, group in enumerate(res.samples):
        print(f"\nQ{p + 1}: {QUESTIONS[p]}")
        gen = torch.stack([s.outputs["kv_generated"] for s in group])
        prm = torch.stack([s.outputs["kv_prompt"] for s in group])
        cos_prompt = (gen * prm).sum(-1)
        sims = gen @ gen.T
        agree = (sims.sum(-1) - sims.diagonal()) / max(len(group) - 1, 1)
        cands = candidates_from_samples(group, "gsm8k")
        choice = select(cands, rule="majority", score="mean_entropy")
        print(f"  {'#':>2} {'tokens':>6} {'finish':>7} {'cos(prompt)':>11} {'agree':>6} {'entropy':>7} "
              f"{'KV-CoE-C':>8} {'tokCoE-R':>8} {'answer':>8}  text end")
        for j, s in enumerate(group):
            sc = {**s.outputs["kv_coe_layer"], **s.outputs["kv_coe_token"], **s.outputs["probability"]}
            mark = "*" if j == choice.chosen.index else " "
            print(f"{mark} {j:>2} {s.generated_tokens:>6} {s.finish_reason:>7} {cos_prompt[j]:>11.3f} {agree[j]:>6.3f} "
                  f"{sc['mean_entropy']:>7.3f} {sc['kv_coe_layer_c']:>8.3f} {sc['kv_coe_token_r']:>8.3f} "
                  f"{str(cands[j].answer):>8}  {_clip(s.text[-60:], 50)}")
        print(f"  chosen: sample {choice.chosen.index} (answer {choice.answer}) by {choice.rule}: {choice.note}")
