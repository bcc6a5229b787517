"""The fast scheduler with requests that carry components or logits processors, against plain requests only.

``R`` requests (GSM8K questions as raw text, ``--max-new-tokens`` greedy tokens each, EOS ignored) are submitted
together to one :class:`~kvagents.engine.fast_scheduler.FastScheduler` (``max_rows = R``); the wall time until every
handle resolved gives the aggregate output tok/s. Mixes:

- ``plain``: no request has a component (one captured step for all slots);
- ``scores-K``: ``K`` requests carry :class:`~kvagents.signals.scoring.ProbabilityScores` (the step splits into
  head and forward graphs, with the components' ``on_step`` between them);
- ``processor-K``: ``K`` requests carry a logits processor that bans a fixed set of tokens;
- ``scores-all``: every request carries the scores (what ``kvagents serve --fast --scores`` costs).

Each mix runs ``--repeats`` times after one warm-up (graphs captured), and the best wall time counts. For the
requests with components or processors, the tokens are compared with the same request alone on the fast path
(``generate([prompt], params, components, fast=True)``): equal on the CPU, where the step is the same arithmetic;
on a GPU the batch's rounding can break near-ties apart (random weights have many), so the count is reported.

    OMP_NUM_THREADS=2 .venv/bin/python bench/fast_scheduler_hosted.py --model random:tiny --device cpu \\
        --dtype float32 --requests 8 --max-new-tokens 16 --hosted 2     # a dry run
    python3 bench/fast_scheduler_hosted.py --model random:qwen3-8b-shape --device cuda --dtype bfloat16 \\
        --requests 32 --max-new-tokens 128 --hosted 8 --json $OUT/hosted.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import serve_load  # noqa: E402


class Ban:
    """A logits processor: tokens ``ids`` never come."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def __call__(self, logits, prev, valid):
        import torch

        return logits.index_fill(-1, torch.as_tensor(self.ids, device=logits.device), float("-inf"))


def run_mix(llm, sched, prompts, params, extras) -> tuple[float, list]:
    """Submit every prompt (with ``extras[i]`` = (components, processors)) at once; wall seconds and results."""
    t0 = time.perf_counter()
    with llm._lock:  # all queued before the loop's next iteration
        handles = [sched.submit(p, params, components=c(), logits_processors=g()) for p, (c, g) in zip(prompts, extras)]
    results = [h.result(timeout=600) for h in handles]
    return time.perf_counter() - t0, results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--data", default=str(serve_load.DEFAULT_DATA))
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--hosted", type=int, default=8, help="requests with a component or processor in the K mixes")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--check", type=int, default=4, help="hosted requests compared with their alone run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from kvagents import SamplingParams
    from kvagents.engine.fast_scheduler import FastScheduler
    from kvagents.engine.scheduler import SchedulerConfig
    from kvagents.signals.scoring import ProbabilityScores

    llm = serve_load.build_model(args.model, args.device, args.dtype, threads=2)
    reqs = serve_load.load_requests(args.data, args.requests, args.max_new_tokens)
    prompts = [r.prompt for r in reqs]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0, ignore_eos=True)
    longest = max(len(llm.encode_prompt(p)) for p in prompts) + args.max_new_tokens
    cfg = SchedulerConfig(fast=True, max_rows=args.requests, max_seq_len=-(-longest // 64) * 64,
                          prefill_chunk=1 << 16)
    sched = FastScheduler(llm.fast_engine, lock=llm._lock, config=cfg, encode=llm.encode_prompt)
    sched.precapture()
    ban = Ban(list(range(10, 20)))
    none = (lambda: [], lambda: [])
    scores = (lambda: [ProbabilityScores()], lambda: [])
    proc = (lambda: [], lambda: [ban])
    K = args.hosted
    mixes = {"plain": [none] * args.requests,
             f"scores-{K}": [scores if i % (args.requests // K) == 0 else none for i in range(args.requests)],
             f"processor-{K}": [proc if i % (args.requests // K) == 0 else none for i in range(args.requests)],
             "scores-all": [scores] * args.requests}
    rows = []
    print(f"{args.model}, {llm.device}, {args.requests} requests x {args.max_new_tokens} greedy tokens")
    print("| mix | hosted requests | tok/s | wall s | vs plain | hosted equal to alone | plain equal to alone |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for name, extras in mixes.items():
        run_mix(llm, sched, prompts, params, extras)  # warm-up: graphs of this mix captured
        best, results = min((run_mix(llm, sched, prompts, params, extras) for _ in range(args.repeats)),
                            key=lambda x: x[0])
        toks = sum(s.generated_tokens for r in results for s in r.samples[0])
        hosted = [i for i, e in enumerate(extras) if e is not none]
        plain = [i for i, e in enumerate(extras) if e is none]
        same = {"hosted": 0, "plain": 0}
        for kind, idx in (("hosted", hosted[: args.check]), ("plain", plain[: args.check])):
            for i in idx:
                c, g = extras[i]
                alone = llm.generate([prompts[i]], params, components=c(), logits_processors=g(), fast=True)
                same[kind] += alone.samples[0][0].token_ids == results[i].samples[0][0].token_ids
        rate = toks / best
        base = base or rate
        checked = {"hosted": min(len(hosted), args.check), "plain": min(len(plain), args.check)}
        rows.append(dict(mix=name, hosted=len(hosted), tok_s=round(rate, 1), wall_s=round(best, 3),
                         vs_plain=round(rate / base, 3), equal=same, checked=checked))
        print(f"| {name} | {len(hosted)} | {rate:.1f} | {best:.3f} | {rate / base:.3f} | "
              f"{same['hosted']} / {checked['hosted']} | {same['plain']} / {checked['plain']} |", flush=True)
    sched.shutdown(cancel=True, timeout=60)
    if args.json:
        import torch

        dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        Path(args.json).write_text(json.dumps(dict(args=vars(args), device=dev, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
