"""Decode speed: kvagents' engine vs ``model.generate`` on the same model, prompt and settings.

Cases (both sides generate exactly ``--new-tokens`` tokens per sequence):

* ``greedy B=1``: one chat-templated prompt, greedy. Engine: ``SamplingParams(temperature=0, ignore_eos=True)``;
  HF: ``do_sample=False`` with EOS disabled (``eos_token_id=[]``). Token ids are compared.
  (``min_new_tokens=N`` alone is *not* equivalent: HF then masks EOS to -inf, so whenever EOS would be the argmax
  HF picks another token while the engine, with ``ignore_eos``, emits EOS and carries on.)
* ``sample 1x8``: the same prompt, 8 samples, temperature 0.7, top_p 0.95, fixed seed. Engine:
  ``SamplingParams(n=8)`` (one prefill shared by the 8 samples); HF: ``do_sample=True, num_return_sequences=8``
  (``top_k=0`` explicitly: HF fills in top_k=50 otherwise). Only token counts are compared (different RNGs).

Each case: one warm-up call per side, then the median of ``--repeats`` timed calls per side, engine and HF calls
alternating (``time.perf_counter`` around the whole call, ``torch.cuda.synchronize`` on CUDA). Torch threads are
the same for both sides (torch's default unless ``--threads``); on a shared CPU where other processes keep a core
busy, OpenMP with threads = cores can be an order of magnitude slower than ``--threads 1``.

    .venv/bin/python bench/decode.py --model smollm2-135m --dtype float32
    .venv/bin/python bench/decode.py --model qwen2.5-coder-0.5b --dtype bfloat16 --new-tokens 64 --write
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvagents import KVModel, SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "| date | device | model | dtype | case | new tokens | engine tok/s | HF tok/s | time ratio (engine/HF) "
    "| tokens identical |\n"
    "|---|---|---|---|---|---|---|---|---|---|\n"
)
DEFAULT_PROMPT = "What is 17 * 23? Explain step by step."


def load(name: str, dtype: str, device: str) -> KVModel:
    """The registry/path name through KVModel; on failure, the converted folder in ~/.cache/kvagents/models."""
    try:
        llm = KVModel.from_pretrained(name, dtype=dtype, device=device, progress=False)
        llm.load()
        return llm
    except Exception as exc:  # noqa: BLE001
        folder = Path.home() / ".cache" / "kvagents" / "models" / name
        if not folder.is_dir():
            raise
        print(f"loading {name!r} by name failed ({exc!r}); loading {folder} directly", file=sys.stderr)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kvagents.model import resolve_device, resolve_dtype

        dev = resolve_device(device)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype, dev)).to(dev).eval()
        return KVModel(model, AutoTokenizer.from_pretrained(folder))


SECTION = (
    "### Decode: kvagents engine vs `model.generate`\n\n"
    "Written by `bench/decode.py --write`. tok/s counts all generated tokens of the call (n x new tokens when "
    "sampling) over the whole call's wall time (prefill included); median of the timed repeats after one warm-up, "
    "engine and HF calls alternating; time ratio = engine s / HF s (< 1: engine faster). Greedy B=1: one "
    "chat-templated prompt, EOS ignored on both sides; sample 1x8: the same prompt, n=8, temperature 0.7, "
    "top_p 0.95.\n\n"
)


def append_rows(lines: list[str]) -> None:
    """Add rows to the decode table of RESULTS.md: right after its last row when the table exists (other
    sections of the file stay where they are), else a new section at the end."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if HEADER not in text:
        sep = "" if not text else ("\n" if text.endswith("\n") else "\n\n")
        RESULTS.write_text(text + sep + SECTION + HEADER + "".join(lines))
        return
    at = text.index(HEADER) + len(HEADER)
    while at < len(text) and text.startswith("|", at):
        nl = text.find("\n", at)
        at = len(text) if nl < 0 else nl + 1
    if at == len(text) and not text.endswith("\n"):
        text += "\n"
        at += 1
    RESULTS.write_text(text[:at] + "".join(lines) + text[at:])


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = platform.processor() or "CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {os.cpu_count()} cores"


def timed_pair(engine_fn, hf_fn, dev: torch.device, repeats: int):
    """One warm-up call of each, then ``repeats`` rounds alternating engine and HF (so load drift on a shared
    machine hits both alike); returns (engine median s, engine output, engine times, HF median s, HF output,
    HF times)."""

    def once(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0, out

    engine_fn()
    hf_fn()
    e_times, h_times, e_out, h_out = [], [], None, None
    for _ in range(repeats):
        t, e_out = once(engine_fn)
        e_times.append(t)
        t, h_out = once(hf_fn)
        h_times.append(t)
    return statistics.median(e_times), e_out, e_times, statistics.median(h_times), h_out, h_times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt in the sampling case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message (chat template applied)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads (0: leave torch's default; the same for both sides either way)")
    ap.add_argument("--write", action="store_true", help=f"append rows to {RESULTS.relative_to(ROOT)}")
    args = ap.parse_args(argv)

    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    llm = load(args.model, args.dtype, args.device)
    model, tok = llm.model, llm.tokenizer
    dev = model.device
    N = args.new_tokens
    enc = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                  tokenize=True)
    if hasattr(enc, "keys"):
        enc = enc["input_ids"]
    prompt_ids = [int(x) for x in enc]
    x = torch.tensor([prompt_ids], device=dev)
    am = torch.ones_like(x)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    print(f"model={args.model} dtype={model.dtype} device={dev} ({device_name(dev)}) "
          f"torch={torch.__version__} threads={torch.get_num_threads()} prompt_tokens={len(prompt_ids)} "
          f"new_tokens={N} repeats={args.repeats} attn={model.config._attn_implementation}")

    rows = []

    # (a) greedy, B = 1 ------------------------------------------------------------------------------------------
    sp_g = SamplingParams(max_new_tokens=N, temperature=0, ignore_eos=True)
    gc_g = GenerationConfig(max_new_tokens=N, do_sample=False, eos_token_id=[], pad_token_id=pad)
    e_s, e_out, e_times, h_s, h_out, h_times = timed_pair(
        lambda: llm.generate([prompt_ids], sp_g),
        lambda: model.generate(x, attention_mask=am, generation_config=gc_g), dev, args.repeats)
    e_tok = e_out.samples[0][0].token_ids
    h_tok = h_out[0, len(prompt_ids):].tolist()
    assert len(e_tok) == N and len(h_tok) == N, (len(e_tok), len(h_tok))
    same = e_tok == h_tok
    if not same:
        k = next(i for i, (a, b) in enumerate(zip(e_tok, h_tok)) if a != b)
        print(f"greedy tokens differ from position {k}: engine {e_tok[k:k + 5]} HF {h_tok[k:k + 5]}")
    rows.append(("greedy B=1", N, e_s, h_s, 1 * N, "yes" if same else "no", e_times, h_times, e_out.stats))

    # (b) one prompt x n sampled -------------------------------------------------------------------------------
    n = args.n
    sp_s = SamplingParams(max_new_tokens=N, temperature=0.7, top_p=0.95, n=n, seed=args.seed, ignore_eos=True)
    gc_s = GenerationConfig(max_new_tokens=N, do_sample=True, temperature=0.7, top_p=0.95, top_k=0,
                            num_return_sequences=n, eos_token_id=[], pad_token_id=pad)

    def hf_sample():
        torch.manual_seed(args.seed)
        return model.generate(x, attention_mask=am, generation_config=gc_s)

    e_s, e_out, e_times, h_s, h_out, h_times = timed_pair(
        lambda: llm.generate([prompt_ids], sp_s), hf_sample, dev, args.repeats)
    e_counts = [len(s.token_ids) for s in e_out.samples[0]]
    h_counts = [h_out.shape[1] - len(prompt_ids)] * h_out.shape[0]
    assert e_counts == [N] * n and h_counts == [N] * n, (e_counts, h_counts)
    rows.append((f"sample 1x{n}", N, e_s, h_s, n * N, "n/a (sampled)", e_times, h_times, e_out.stats))

    # table ------------------------------------------------------------------------------------------------------
    print()
    print(f"{'case':<12} {'engine s':>9} {'HF s':>9} {'engine tok/s':>13} {'HF tok/s':>10} {'ratio e/HF':>11}  "
          f"tokens identical")
    for case, _, es, hs, total, same, _et, _ht, _st in rows:
        print(f"{case:<12} {es:>9.3f} {hs:>9.3f} {total / es:>13.1f} {total / hs:>10.1f} {es / hs:>11.3f}  {same}")
    print()
    for case, _, _es, _hs, _total, _same, et, ht, st in rows:
        print(f"{case}: engine runs {[round(t, 3) for t in et]} (last: prefill {st.prefill_s:.3f}s, decode "
              f"{st.decode_s:.3f}s, {st.forward_calls} forward calls); HF runs {[round(t, 3) for t in ht]}")

    if args.write:
        date = dt.date.today().isoformat()
        dname = device_name(dev)
        if dev.type == "cpu":
            th = torch.get_num_threads()
            dname += f", {th} torch thread{'s' if th != 1 else ''}"
        dtype = str(model.dtype).removeprefix("torch.")
        lines = [f"| {date} | {dname} | {args.model} | {dtype} | {case} | {nt} | {total / es:.1f} | "
                 f"{total / hs:.1f} | {es / hs:.3f} | {same} |\n" for case, nt, es, hs, total, same, *_ in rows]
        append_rows(lines)
        print(f"appended {len(rows)} rows to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
