"""bench/serve_load.py on a tiny random model (CPU, no downloads): every mode serves the same greedy tokens per
request (serial == scheduler == static), the summaries count what was sent, the budget cut and main() work.
Nothing here asserts a timing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from tiny import ByteTokenizer, tiny_model

from kvagents import KVModel

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
sl = sys.modules.setdefault("serve_load", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(sl)

QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many?", "3 + 4 = 7\n#### 7"),
    ("A box holds 12 eggs. How many eggs are in 5 boxes?", "12 * 5 = 60\n#### 60"),
    ("Sara reads 9 pages a day. How many pages in a week?", "9 * 7 = 63\n#### 63"),
    ("What is half of 48?", "48 / 2 = 24\n#### 24"),
]


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "gsm8k.jsonl"
    p.write_text("".join(json.dumps({"question": q, "answer": a, "idx": i}) + "\n"
                         for i, (q, a) in enumerate(QUESTIONS)))
    return p


@pytest.fixture
def llm():
    m = KVModel(tiny_model("qwen3"), ByteTokenizer())
    yield m
    if m._scheduler is not None:
        assert m._scheduler.shutdown(cancel=True, timeout=60)
    sl.stop_http()
    if id(m) in sl._FAST:
        assert sl._FAST.pop(id(m)).shutdown(cancel=True, timeout=60)


def tokens(records):
    return {r.index: r.token_ids for r in records}


def test_modes_serve_the_same_greedy_tokens(llm, data):
    reqs = sl.load_requests(data, 4, 4)
    assert [r.max_new for r in reqs] == [4] * 4 and reqs[0].prompt.startswith("Question: Tom")
    sampling = sl.Sampling(temperature=0.0, ignore_eos=True)
    runs = {
        "serial": sl.run_load(llm, "serial", reqs, sampling, clients=2),
        "scheduler": sl.run_load(llm, "scheduler", reqs, sampling, clients=2, scheduler_config={"max_rows": 4}),
        "scheduler-open": sl.run_load(llm, "scheduler", reqs, sampling, rate=500.0, seed=1),
        "scheduler-direct": sl.run_load(llm, "scheduler-direct", reqs, sampling, clients=4),
        "static": sl.run_static(llm, reqs, sampling),
    }
    alone = {r.index: llm.generate(r.prompt, sl.params_for(r, sampling)).samples[0][0].token_ids for r in reqs}
    for name, (records, t0) in runs.items():
        assert tokens(records) == alone, name
        for r in records:
            assert len(r.token_times) == 4 and r.token_times == sorted(r.token_times), name
            assert r.send <= r.token_times[0] <= r.end + 1e-9 and r.error is None and not r.cut, name
            assert len(r.itl) == 3 and r.finish_reason == "length", name
        s = sl.summarize(records, t0)
        assert (s["requests"], s["completed"], s["cut"], s["errors"], s["output_tokens"]) == (4, 4, 0, 0, 16), name
        assert s["output_tok_s"] > 0 and s["ttft_p50"] <= s["ttft_p99"] and s["itl_p50"] <= s["itl_p99"], name
    md = sl.table([{"mode": "serial", "load": "c=2", **sl.summarize(*runs["serial"])}])
    assert md.count("\n") == 2 and "| serial | c=2 | 4 | 4 | 0 |" in md


def test_reference_lengths_and_sampled_seeds(llm, data):
    reqs = sl.load_requests(data, 6, 8, lengths="reference", tokenizer=ByteTokenizer(), seed=5, sampled=True)
    assert len(reqs) == 6 and reqs[4].prompt == reqs[0].prompt  # cycled
    assert [r.max_new for r in reqs[:4]] == [min(8, len(a.encode())) for _, a in QUESTIONS]
    assert [r.seed for r in reqs] == [5, 6, 7, 8, 9, 10]
    sampling = sl.Sampling(temperature=1.0, ignore_eos=True)
    serial, _ = sl.run_load(llm, "serial", reqs[:4], sampling, clients=1)
    sched, _ = sl.run_load(llm, "scheduler", reqs[:4], sampling, clients=4)
    assert tokens(serial) == tokens(sched)  # each request samples with its own seed


def test_scheduler_fast_serves_the_fast_paths_tokens(llm, data):
    reqs = sl.load_requests(data, 4, 6, seed=3, sampled=True)
    sampling = sl.Sampling(temperature=0.8, top_p=0.9)
    records, t0 = sl.run_load(llm, "scheduler-fast", reqs, sampling, clients=3, scheduler_config={"max_rows": 4})
    sched = sl._FAST[id(llm)]
    longest = max(len(llm.encode_prompt(r.prompt)) + 6 for r in reqs)
    assert sched.max_seq_len == -(-longest // 128) * 128 and 1 <= sched.peak_rows <= 3
    alone = {r.index: llm.generate(r.prompt, sl.params_for(r, sampling), fast=True).samples[0][0].token_ids
             for r in reqs}
    assert tokens(records) == alone  # each request samples with its own seed, as alone on the fast path
    s = sl.summarize(records, t0)
    assert (s["requests"], s["completed"], s["errors"]) == (4, 4, 0)
    assert sl.fast_scheduler(llm, sl.fast_config(llm, reqs, {"max_rows": 4})) is sched  # kept over loads


def test_http_mode_serves_the_in_process_schedulers_tokens(llm, data):
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    reqs = sl.load_requests(data, 4, 5)
    sampling = sl.Sampling(temperature=0.0, ignore_eos=True)
    cfg = {"max_rows": 4, "max_queue": 16, "prefill_chunk": 64}
    inproc, _ = sl.run_load(llm, "scheduler", reqs, sampling, clients=2, scheduler_config=cfg)
    records, t0 = sl.run_load(llm, "http", reqs, sampling, clients=2, scheduler_config=cfg)
    srv = sl._HTTP["http"]
    assert srv.app.state.server.scheduler is llm.scheduler() and llm.scheduler().config.max_rows == 4
    assert tokens(records) == tokens(inproc)
    assert all(r.text and r.text == q.text for r, q in zip(records, inproc))
    for r in records:  # one token per chunk here (every byte-tokenizer token releases a character)
        assert len(r.token_times) == 5 and r.token_times == sorted(r.token_times) and r.finish_reason == "length"
        assert r.send <= r.token_times[0] <= r.end and r.error is None and not r.cut
    s = sl.summarize(records, t0)
    assert (s["requests"], s["completed"], s["errors"], s["output_tokens"]) == (4, 4, 0, 20)
    assert sl.http_check(inproc, records) == {"compared": 4, "same_tokens": 4, "same_text": 4, "differ": []}
    # sampled, each request with its own seed, on the fast scheduler: the same samples as scheduler-fast
    sampled = sl.load_requests(data, 4, 6, seed=3, sampled=True)
    hot = sl.Sampling(temperature=0.8, top_p=0.9)
    fast_in, _ = sl.run_load(llm, "scheduler-fast", sampled, hot, clients=2, scheduler_config=cfg)
    fast_http, _ = sl.run_load(llm, "http-fast", sampled, hot, clients=3, scheduler_config=cfg)
    assert sl._HTTP["http-fast"].app.state.server.scheduler is sl._FAST[id(llm)] is llm.scheduler()
    assert tokens(fast_http) == tokens(fast_in) and all(r.error is None for r in fast_http)
    # back to the eager scheduler: the fast one is kept (its graphs), the http server follows the model's scheduler
    again, _ = sl.run_load(llm, "http", reqs, sampling, clients=4, scheduler_config=cfg)
    assert tokens(again) == tokens(inproc) and not sl._FAST[id(llm)].closed and not llm.scheduler().config.fast


@pytest.mark.parametrize("mode", ["serial", "scheduler", "scheduler-direct", "scheduler-fast", "http"])
def test_budget_cut(llm, data, mode):
    reqs = sl.load_requests(data, 4, 300)
    sampling = sl.Sampling(temperature=0.0, ignore_eos=True)
    records, t0 = sl.run_load(llm, mode, reqs, sampling, clients=2, budget_s=0.05, grace_s=0.0)
    assert 1 <= len(records) <= 4
    for r in records:  # timing decides which were cut, not whether the bookkeeping holds
        assert r.error is None
        if r.cut:
            assert r.finish_reason in ("budget", "cancelled") and len(r.token_ids) < 300
        else:
            assert len(r.token_ids) == 300
    s = sl.summarize(records, t0)
    assert s["completed"] + s["cut"] == s["requests"] == len(records)


def test_pct():
    assert sl.pct([3.0, 1.0, 2.0], 50) == 2.0 and sl.pct([1.0, 2.0], 99) == pytest.approx(1.99)
    assert sl.pct([], 50) != sl.pct([], 50)  # NaN


def test_main_random_model(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVAGENTS_THREADS", "1")
    threads = torch.get_num_threads()
    out = tmp_path / "serve.json"
    try:
        rc = sl.main(["--model", "random:tiny", "--device", "cpu", "--dtype", "float32", "--data", str(data),
                      "--requests", "4", "--max-new-tokens", "4", "--clients", "1", "2", "--rate", "400",
                      "--modes", "serial", "scheduler", "static", "scheduler-direct",
                      "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| static | batch=4 |" in printed and "| scheduler | r=400/s |" in printed
    doc = json.loads(out.read_text())
    assert [(r["mode"], r["load"]) for r in doc["runs"]] == [
        ("serial", "c=1"), ("serial", "c=2"), ("serial", "r=400/s"),
        ("scheduler", "c=1"), ("scheduler", "c=2"), ("scheduler", "r=400/s"), ("static", "batch=4"),
        ("scheduler-direct", "c=1"), ("scheduler-direct", "c=2"), ("scheduler-direct", "r=400/s")]
    for run in doc["runs"]:
        assert run["requests"] == len(run["records"]) == 4 and run["output_tokens"] == 16  # random: no EOS
        assert all(len(r["token_times"]) == r["tokens"] == 4 for r in run["records"])
    toks = {run["load"] + run["mode"]: [r["token_ids"] for r in run["records"]] for run in doc["runs"]}
    assert len({json.dumps(v) for v in toks.values()}) == 1  # greedy: every mode and load, the same tokens


def test_main_http_mode(data, tmp_path, monkeypatch, capsys):
    pytest.importorskip("uvicorn")
    monkeypatch.setenv("KVAGENTS_THREADS", "1")
    threads = torch.get_num_threads()
    out = tmp_path / "serve.json"
    try:
        rc = sl.main(["--model", "random:tiny", "--device", "cpu", "--dtype", "float32", "--data", str(data),
                      "--requests", "4", "--max-new-tokens", "4", "--clients", "2", "--max-rows", "4",
                      "--modes", "scheduler", "http", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| http | c=2 | 4 | 4 | 0 |" in printed
    assert "greedy check, http vs scheduler c=2: 4/4 same tokens, 4/4 same text" in printed
    doc = json.loads(out.read_text())
    http = doc["runs"][1]
    assert http["mode"] == "http" and http["http_check"]["same_tokens"] == 4 and http["output_tokens"] == 16
    assert [r["token_ids"] for r in http["records"]] == [r["token_ids"] for r in doc["runs"][0]["records"]]
    assert not sl._HTTP  # servers stopped
