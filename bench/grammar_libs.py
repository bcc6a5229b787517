"""Which constrained-decoding library for ChatKV's tool calls and structured output: xgrammar, llguidance or
outlines-core, measured on the embedded smollm2-135m tokenizer (49,152 tokens), CPU, one thread.

For each library: tokenizer set-up time, compile time of two grammars (the joke schema of LangChain's structured
output test and a tool's argument schema), and the per-token cost of decoding under the grammar (fill the
allowed-token mask, then accept the token) while replaying a valid JSON answer token by token; every library must
accept the whole answer and end in an accepting state. ``python bench/grammar_libs.py`` prints a table.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

torch.set_num_threads(1)

JOKE = {"type": "object", "properties": {"setup": {"type": "string"}, "punchline": {"type": "string"}},
        "required": ["setup", "punchline"], "additionalProperties": False}
TOOL = {"type": "object", "properties": {"customer_name": {"type": "string"}, "description": {"type": "string"},
                                          "count": {"type": "integer", "minimum": -999, "maximum": 999}},
        "required": ["customer_name", "description", "count"], "additionalProperties": False}
ANSWERS = {
    "joke": {"setup": "Why did the cat sit on the computer?", "punchline": "To keep an eye on the mouse!"},
    "tool": {"customer_name": "你好啊集团", "description": "A Chinese technology company", "count": 42},
}
SCHEMAS = {"joke": JOKE, "tool": TOOL}


def timed(fn, repeat=1):
    best = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return out, best


def bench_xgrammar(tok, vocab, ids_of):
    import xgrammar as xgr

    (comp,), setup = timed(lambda: (xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab),
                                                        max_threads=1),))
    res = {"setup_s": setup}
    for name, schema in SCHEMAS.items():
        g, res[f"compile_{name}_s"] = timed(lambda s=schema: comp.compile_json_schema(json.dumps(s),
                                                                                       any_whitespace=False))
        m = xgr.GrammarMatcher(g)
        mask = xgr.allocate_token_bitmask(1, vocab)
        per = []
        for t in ids_of[name]:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask, 0)
            ok = m.accept_token(t)
            per.append(time.perf_counter() - t0)
            assert ok, f"xgrammar rejected token {t}"
        res[f"token_{name}_us"] = statistics.mean(per) * 1e6
        res[f"accepts_{name}"] = m.accept_token(tok.eos_token_id) or m.is_completed()
    return res


def bench_llguidance(tok, vocab, ids_of):
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    lltok, setup = timed(lambda: llguidance.hf.from_tokenizer(tok, n_vocab=vocab))
    res = {"setup_s": setup}
    for name, schema in SCHEMAS.items():
        def build(s=schema):
            m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(
                s, defaults={"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}))
            m.compute_bitmask()  # llguidance compiles lazily: count the first mask in the compile time
            return m
        m, res[f"compile_{name}_s"] = timed(build)
        m.reset()
        mask = lt.allocate_token_bitmask(1, vocab)
        per = []
        for t in ids_of[name]:
            t0 = time.perf_counter()
            lt.fill_next_token_bitmask(m, mask, 0)
            ok = m.consume_token(t)
            per.append(time.perf_counter() - t0)
            assert ok, f"llguidance rejected token {t}: {m.get_error()}"
        res[f"token_{name}_us"] = statistics.mean(per) * 1e6
        res[f"accepts_{name}"] = m.is_accepting()
    return res


def bench_outlines_core(tok, vocab, ids_of):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    def make_vocab():
        table: dict[str, list[int]] = {}
        eos = tok.eos_token_id
        for i in range(len(tok)):
            if i == eos:
                continue
            s = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)])
            if s:
                table.setdefault(s, []).append(i)
        return Vocabulary(eos, table)

    voc, setup = timed(make_vocab)
    res = {"setup_s": setup}
    for name, schema in SCHEMAS.items():
        regex = build_regex_from_schema(json.dumps(schema), r"[ ]?")
        idx, res[f"compile_{name}_s"] = timed(lambda r=regex: Index(r, voc))
        g = Guide(idx)
        mask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
        per, ok_all = [], True
        for t in ids_of[name]:
            t0 = time.perf_counter()
            g.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            try:
                g.advance(t)
            except Exception:  # noqa: BLE001 - a rejected token ends the replay
                ok_all = False
                break
            per.append(time.perf_counter() - t0)
        res[f"token_{name}_us"] = statistics.mean(per) * 1e6 if per else float("nan")
        res[f"accepts_{name}"] = ok_all and g.is_finished()
    return res


def main() -> dict:
    from transformers import AutoTokenizer

    from kvagents.registry import fetch_model

    tok = AutoTokenizer.from_pretrained(fetch_model("smollm2-135m", progress=False))
    vocab = len(tok)
    ids_of = {k: tok(json.dumps(v, ensure_ascii=False), add_special_tokens=False)["input_ids"]
              for k, v in ANSWERS.items()}
    rows = {}
    for name, fn in [("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance),
                     ("outlines-core", bench_outlines_core)]:
        try:
            rows[name] = fn(tok, vocab, ids_of)
        except ImportError as e:
            rows[name] = {"error": f"not installed: {e}"}
    keys = ["setup_s", "compile_joke_s", "compile_tool_s", "token_joke_us", "token_tool_us", "accepts_joke",
            "accepts_tool"]
    print(f"{'library':14s} " + " ".join(f"{k:>15s}" for k in keys))
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:14s} {r['error']}")
            continue
        cells = [f"{r[k]:15.4f}" if isinstance(r[k], float) and k.endswith("_s") else
                 f"{r[k]:15.1f}" if isinstance(r[k], float) else f"{r[k]!s:>15s}" for k in keys]
        print(f"{name:14s} " + " ".join(cells))
    return rows


if __name__ == "__main__":
    main()
