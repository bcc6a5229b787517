"""Serving load, in process: serial ``generate`` calls vs continuous batching (``KVModel.submit``) vs one static batch.

Requests are GSM8K questions (``--data``, one JSON object a line with ``question`` and ``answer``), sent as raw text
(``Question: ...\\nAnswer:``) or, with ``--chat``, as one user message through the tokenizer's chat template. Each
request generates at most ``--max-new-tokens`` tokens (``--lengths reference``: the token count of the reference
solution, capped at ``--max-new-tokens``; add ``--ignore-eos`` for exactly that many). ``--temperature 0`` is
greedy; above 0 each request samples with its own seed (``--seed`` + its index), so serial and scheduler draw the
same samples.

Modes:

- ``serial``: every client calls ``llm.generate(prompt, params, on_text=...)``: today's behaviour, the calls
  serialise on the model lock. Streaming makes the engine sync every step (as the scheduler does); a token is timed
  when the ``on_text`` event that releases its text arrives (a token whose text is held back, e.g. half a UTF-8
  character, is timed with the next event).
- ``scheduler``: every client calls ``llm.submit(prompt, params, stream=True)`` and iterates its ``TokenEvent`` s
  (one per token, timed when the client thread receives it).
- ``scheduler-fast`` (not run by default): the same through a
  :class:`~kvagents.engine.fast_scheduler.FastScheduler` over ``llm.fast_engine`` (slots of static KV buffers, one
  CUDA-graph step for every slot), built once per process with the model's lock and ``encode_prompt`` (as
  ``llm.scheduler(fast=True)`` builds it) and kept over every load, so its graphs are captured once, in the
  warm-up (``precapture``). ``max_seq_len``: ``--max-seq-len``, default the longest prompt + its cap rounded up
  to 128.
- ``scheduler-direct`` (not run by default): the same, but prompts are encoded to token ids before the load and
  submitted to a :class:`~kvagents.engine.scheduler.Scheduler` built on ``llm.engine`` with the model's lock and no
  ``encode`` hook. ``llm.submit`` takes the model lock (``KVModel.scheduler()``, and ``encode_prompt`` through
  ``KVModel.model`` -> ``load()``), which the decode loop re-takes every step, and ``threading.RLock`` is not fair:
  a submitting client can wait for many steps (seen: seconds on an H100). This mode measures the scheduler without
  that wait.
- ``http`` (not run by default): the same load through ``kvagents serve``: the app of
  :func:`kvagents.serving.app.create_app` on the same loaded model and the same scheduler settings (``--max-rows``,
  ``--max-queue``, ``--prefill-chunk``; it shares the model's scheduler with ``scheduler``), served by uvicorn on
  127.0.0.1 (a free port, a daemon thread of this process, lifespan off so the scheduler outlives the server).
  Each client thread posts its request with its own ``httpx`` client as one streaming call: ``/v1/completions``
  (raw text) or ``/v1/chat/completions`` (``--chat``), with the same ``max_tokens``, ``temperature``, ``top_p``,
  ``seed`` and ``ignore_eos`` as the in-process modes, plus ``return_token_ids`` (a kvagents extension: each SSE
  chunk lists the token ids whose text it carries). A token is timed when the chunk that carries it has been read
  and parsed by the client thread (the server sends one chunk per token that releases text; a token whose text is
  held back comes with the next chunk, as in ``serial``). The probability scores the server adds to each choice by
  default are off (``--http-scores`` turns them on: one more component per request). A cut request is closed by
  its client, which cancels it on the server. With greedy decoding and ``scheduler`` in the same run, the tokens and
  text of every request both modes completed are compared (printed, and ``http_check`` in the JSON).
- ``http-fast`` (not run by default): the same through ``kvagents serve --fast`` (``create_app(fast=True)``) on the
  ``scheduler-fast`` mode's scheduler (same ``max_seq_len``, graphs captured once), compared with
  ``scheduler-fast``.
- ``static``: all requests in one ``generate`` call (one left-padded batch, decoded to the longest request's cap;
  each request's own tokens are counted, the rest of its row is not): the upper-bound reference. Run once, whatever
  the load.

Load: ``--clients C ...`` closed loop (C clients, each sends its next request when the previous one finished), or
``--rate R ...`` open loop (Poisson arrivals at R requests/s, at most ``--requests`` and ``--duration`` seconds).
Every configuration stops issuing requests after ``--budget-s`` seconds; requests still running ``--grace-s``
later are cut (scheduler: cancelled; serial: stopped by a component at the next step, finish reason ``budget``) and
counted in ``cut``.

Metrics per request: TTFT = first token time - send time (open loop: the scheduled arrival, so queueing before
the model counts); ITL = the gaps between a request's consecutive tokens (pooled over requests); e2e = completion
- send time. Output tok/s = all output tokens / (last completion - first send). p50 / p99 interpolate linearly.
Per configuration (printed, and in the JSON): ``cpu_s``, the process's CPU seconds (client threads and server
included); ``loop_cpu_s``, the scheduler's decode-loop thread's; ``loadavg_1m``, the machine's 1-minute load before
and after. On a shared machine, wall time above the loop's CPU time is time the loop waited for a core (or the GIL).

    OMP_NUM_THREADS=1 .venv/bin/python bench/serve_load.py --model smollm2-135m --device cpu --dtype float32 \\
        --clients 1 4 --requests 8 --max-new-tokens 16 --modes serial scheduler static
    python bench/serve_load.py --model /tmp/m/model.gguf --device cuda --clients 1 8 32 --data .carry/gsm8k.jsonl \\
        --json $OUT/serve_load.json   # defaults: 64 requests, 128 tokens, 8 s budget + 4 s grace a configuration
    python bench/serve_load.py --model random:qwen3-8b-shape --device cuda --dtype bfloat16 --clients 1 8 32 \\
        --modes serial scheduler scheduler-fast static --json $OUT/serve_load_fast.json   # the fast scheduler

HTTP against in-process, the fast scheduler on a GPU:

    python bench/serve_load.py --model random:qwen3-8b-shape --device cuda --dtype bfloat16 --max-rows 32 \\
        --clients 1 8 32 --requests 64 --max-new-tokens 32 --modes scheduler-fast http-fast \\
        --json $OUT/serve_load_http_fast.json

On CUDA, torch's cuDNN attention is turned off unless ``--cudnn-sdp``: with it on (torch 2.11, H100), every KV length
the process had not seen yet cost about 40 ms more per decode step (57 vs 15 ms/token, random 0.5B shape), so a
short run would time plan building, not decoding.

``--model``: a registry name (``smollm2-135m``), hub id, folder or ``.gguf`` file (``kvagents.registry``), or random
weights ``random:tiny`` / ``random:qwen2.5-0.5b-shape`` / ``random:qwen3-8b-shape`` (byte tokenizer, no EOS).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_DATA = next((p for p in (ROOT / "shared" / "data" / "gsm8k.jsonl", ROOT.parent / "shared" / "data" / "gsm8k.jsonl")
                     if p.exists()), ROOT.parent / "shared" / "data" / "gsm8k.jsonl")
MODES = ("serial", "scheduler", "static", "scheduler-direct", "scheduler-fast", "http", "http-fast")
DEFAULT_MODES = ("serial", "scheduler", "static")

RANDOM_SHAPES = {
    "tiny": dict(arch="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096),
    "qwen2.5-0.5b-shape": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                               num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                               max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen3-8b-shape": dict(arch="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                           num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                           max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6),
}


# -- requests ---------------------------------------------------------------------------------------------------
@dataclass
class Request:
    index: int
    prompt: str | list  # text, or chat messages
    max_new: int
    seed: int | None = None


def load_requests(path: str | Path, n: int, max_new: int, *, lengths: str = "fixed", tokenizer=None,
                  chat: bool = False, seed: int = 0, sampled: bool = False) -> list[Request]:
    """The first ``n`` questions of a GSM8K-style JSONL file (cycled when it has fewer) as requests. ``lengths``:
    ``fixed`` (every request ``max_new`` tokens at most) or ``reference`` (the reference answer's token count under
    ``tokenizer``, capped at ``max_new``, at least 1)."""
    if lengths not in ("fixed", "reference"):
        raise ValueError(f"lengths must be 'fixed' or 'reference', got {lengths!r}")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no requests")
    out = []
    for i in range(n):
        row = rows[i % len(rows)]
        q = row["question"]
        prompt = [{"role": "user", "content": q}] if chat else f"Question: {q}\nAnswer:"
        k = max_new
        if lengths == "reference":
            if tokenizer is None:
                raise ValueError("lengths='reference' needs the tokenizer")
            k = max(1, min(max_new, len(tokenizer(row["answer"], add_special_tokens=False)["input_ids"])))
        out.append(Request(i, prompt, k, seed + i if sampled else None))
    return out


def params_for(req: Request, args_like) -> object:
    from kvagents import SamplingParams

    t = float(args_like.temperature)
    return SamplingParams(max_new_tokens=req.max_new, temperature=t, top_p=args_like.top_p,
                          seed=req.seed if t > 0 else None, ignore_eos=args_like.ignore_eos)


@dataclass
class Sampling:
    """The sampling settings shared by every request (``params_for``)."""

    temperature: float = 0.0
    top_p: float = 1.0
    ignore_eos: bool = False


# -- models -----------------------------------------------------------------------------------------------------
class ByteTokenizer:
    """Tokenizer of the random models: text is its UTF-8 bytes (id = byte + 3); every id decodes to one printable
    character (so each streamed token releases text)."""

    pad_token_id = 0
    bos_token_id = None
    eos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [b + 3 for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x4E00 + (int(i) % 20000)) for i in ids)


def random_model(shape: str, device: str, dtype):
    """A random-weight model of one of :data:`RANDOM_SHAPES` (decode cost does not depend on the weights)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    if shape not in RANDOM_SHAPES:
        raise SystemExit(f"unknown random shape {shape!r}; use one of {sorted(RANDOM_SHAPES)}")
    kw = dict(RANDOM_SHAPES[shape])
    arch = kw.pop("arch")
    kw.setdefault("tie_word_embeddings", False)
    cfg = (Qwen3Config if arch == "qwen3" else Qwen2Config)(**kw, eos_token_id=None, pad_token_id=0,
                                                            bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = None
    return model.eval()


def build_model(spec: str, device: str = "auto", dtype: str = "auto", threads: int = 1):
    """A loaded :class:`~kvagents.KVModel` for ``spec`` (see the module docstring); on the CPU torch and kvagents
    use ``threads`` intra-op threads."""
    import torch

    from kvagents import KVModel
    from kvagents.model import resolve_device, resolve_dtype

    dev = resolve_device(device)
    if dev.type == "cpu":
        os.environ["KVAGENTS_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    if spec.startswith("random:"):
        model = random_model(spec.split(":", 1)[1], str(dev), resolve_dtype(dtype, dev))
        return KVModel(model, ByteTokenizer())
    return KVModel.from_pretrained(spec, dtype=dtype, device=str(dev), progress=False).load()


# -- per-request records --------------------------------------------------------------------------------------
@dataclass
class Record:
    index: int
    send: float  # perf_counter seconds
    max_new: int
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    end: float | None = None
    finish_reason: str | None = None
    cut: bool = False
    error: str | None = None
    text: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.send if self.token_times else None

    @property
    def e2e(self) -> float | None:
        return self.end - self.send if self.end is not None else None

    @property
    def itl(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


class _Clock:
    """A component (one request or one static batch): remembers the step being decoded, so an ``on_text`` event
    tells which token released it, and stops every row once ``cut`` is set (the budget's hard stop)."""

    name = "serve_load_clock"

    def __init__(self, cut: threading.Event) -> None:
        self.step, self.cut = -1, cut

    def on_prefill(self, view):
        return None

    def on_step(self, view):
        from kvagents import StopSequence

        self.step = view.step
        if self.cut.is_set():
            return [StopSequence(i, reason="budget") for i in range(int(view.token_ids.shape[0]))]
        return None

    def on_finish(self, view):
        return None


def _times_from_events(events: list[tuple[float, int]], n_tokens: int, fallback: float) -> list[float]:
    """Token t's time = the first event released at step >= t (events are (time, step) in order)."""
    out, j = [], 0
    for t in range(n_tokens):
        while j < len(events) and events[j][1] < t:
            j += 1
        out.append(events[j][0] if j < len(events) else fallback)
    return out


# -- issuing one request ----------------------------------------------------------------------------------------
def issue_serial(llm, req: Request, sampling: Sampling, rec: Record, cut: threading.Event) -> None:
    clock = _Clock(cut)
    events: list[tuple[float, int]] = []

    def on_text(ev):
        events.append((time.perf_counter(), clock.step))

    try:
        res = llm.generate(req.prompt, params_for(req, sampling), components=[clock], on_text=on_text)
    except Exception as err:  # noqa: BLE001 - a failed request is recorded, the load goes on
        rec.end, rec.error = time.perf_counter(), repr(err)
        return
    rec.end = time.perf_counter()
    s = res.samples[0][0]
    rec.token_ids, rec.finish_reason, rec.text = list(s.token_ids), s.finish_reason, s.text
    rec.cut = s.finish_reason == "budget"
    rec.token_times = _times_from_events(events, len(rec.token_ids), rec.end)


def issue_scheduler(submit, prompt, req: Request, sampling: Sampling, rec: Record, handles: list,
                    hlock: threading.Lock, cut: threading.Event) -> None:
    """``submit(prompt, params, stream=True)`` (``llm.submit`` or a scheduler's own), then consume its events."""
    from kvagents.engine.scheduler import QueueFullError

    while True:
        try:
            h = submit(prompt, params_for(req, sampling), stream=True)
            break
        except QueueFullError as err:
            if cut.is_set():
                rec.end, rec.error = time.perf_counter(), repr(err)
                return
            time.sleep(0.005)
    with hlock:
        handles.append(h)
    if cut.is_set():
        h.cancel()
    try:
        for ev in h:
            if ev.token_id is not None:
                rec.token_times.append(time.perf_counter())
        res = h.result()
    except Exception as err:  # noqa: BLE001
        rec.end, rec.error = time.perf_counter(), repr(err)
        return
    rec.end = time.perf_counter()
    s = res.samples[0][0]
    rec.token_ids, rec.finish_reason, rec.text = list(s.token_ids), s.finish_reason, s.text
    rec.cut = s.finish_reason == "cancelled"
    rec.token_times = rec.token_times[: len(rec.token_ids)]


class HttpServer:
    """``create_app(llm, ...)`` behind uvicorn on 127.0.0.1 (a free port), in a daemon thread of this process.

    ``fast``: ``create_app(fast=True, max_seq_len=...)``. uvicorn's lifespan is off, so stopping the server leaves
    the model's scheduler running (the bench shuts it down). ``httpx.Client`` s are pooled (:meth:`prepare` makes
    them before a load: making one costs milliseconds of CPU, which would count against the load); a request
    takes one, so each client thread has its own connection."""

    name = "serve-load"

    def __init__(self, llm, *, fast: bool, config: dict, scores: bool = False) -> None:
        import uvicorn

        from kvagents.serving.app import create_app

        kw = dict(max_rows=config.get("max_rows", 16), max_queue=config.get("max_queue", 64),
                  prefill_chunk=config.get("prefill_chunk", 256))
        if fast:
            kw.update(fast=True, max_seq_len=config.get("max_seq_len"))
        self.fast, self.scores = fast, scores
        self.app = create_app(llm, served_model_name=self.name, scores=scores, **kw)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False,
                                                    lifespan="off", timeout_keep_alive=60))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t0 = time.perf_counter()
        while not self.server.started:
            if not self.thread.is_alive() or time.perf_counter() - t0 > 60:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self._clients: list = []  # every client made
        self._free: list = []  # those no request holds
        self._lock = threading.Lock()

    def _new_client(self):
        import httpx

        c = httpx.Client(base_url=self.url, timeout=httpx.Timeout(600.0))
        with self._lock:
            self._clients.append(c)
        return c

    def prepare(self, n: int) -> None:
        """At least ``n`` idle clients."""
        with self._lock:
            k = n - len(self._free)
        for _ in range(k):
            c = self._new_client()
            with self._lock:
                self._free.append(c)

    def acquire(self):
        with self._lock:
            if self._free:
                return self._free.pop()
        return self._new_client()

    def release(self, c) -> None:
        with self._lock:
            self._free.append(c)

    def body(self, req: Request, sampling: Sampling) -> tuple[str, dict]:
        """(path, JSON body) of ``req``: the sampling of :func:`params_for`, streamed, with token ids."""
        t = float(sampling.temperature)
        body = {"model": self.name, "max_tokens": req.max_new, "temperature": t, "top_p": sampling.top_p,
                "stream": True, "return_token_ids": True}
        if t > 0 and req.seed is not None:
            body["seed"] = req.seed
        if sampling.ignore_eos:
            body["ignore_eos"] = True
        if isinstance(req.prompt, str):
            return "/v1/completions", {**body, "prompt": req.prompt}
        return "/v1/chat/completions", {**body, "messages": req.prompt}

    def stop(self) -> None:
        for c in self._clients:
            c.close()
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


_HTTP: dict[str, HttpServer] = {}  # mode -> its running server


def http_server(llm, mode: str, config: dict, scores: bool = False) -> HttpServer:
    """The server of ``mode`` (``http``: the model's eager scheduler with ``config``; ``http-fast``: the
    ``scheduler-fast`` mode's FastScheduler), started on first call and kept until :func:`stop_http`."""
    sched = use_scheduler(llm, mode, config)
    srv = _HTTP.get(mode)
    if srv is not None and (srv.app.state.server.scheduler is not sched or srv.scores != scores):
        _HTTP.pop(mode).stop()  # its scheduler was replaced (another mode ran in between)
        srv = None
    if srv is None:
        srv = _HTTP[mode] = HttpServer(llm, fast=mode == "http-fast", config=config, scores=scores)
    return srv


def stop_http() -> None:
    while _HTTP:
        _HTTP.popitem()[1].stop()


def use_scheduler(llm, mode: str, config: dict):
    """Make the model's scheduler (``llm.scheduler()``, the one the app submits to) the one ``mode`` runs on:
    ``scheduler`` / ``http``: an eager one with ``config`` (the fast one, if installed, is detached and kept);
    ``http-fast``: the ``scheduler-fast`` mode's FastScheduler (an eager one running is shut down)."""
    cur = llm._scheduler
    if mode == "http-fast":
        fast = fast_scheduler(llm, config)
        if cur is not fast:
            if cur is not None and not cur.closed:
                cur.shutdown(cancel=True, timeout=60)
            llm._scheduler = fast
        return fast
    from kvagents.engine.scheduler import SchedulerConfig

    eager = {k: v for k, v in config.items() if k != "max_seq_len"}
    if cur is not None and (cur.closed or cur.config.fast):
        llm._scheduler = None  # a FastScheduler stays in _FAST (kept over loads)
    elif cur is not None and cur.config != SchedulerConfig(**eager):
        cur.shutdown(cancel=True, timeout=60)
    return llm.scheduler(**eager)


def issue_http(srv: HttpServer, req: Request, sampling: Sampling, rec: Record, cut: threading.Event) -> None:
    """One streamed request through ``srv``; tokens are timed when their chunk has been read (module docstring)."""
    path, body = srv.body(req, sampling)
    client = srv.acquire()
    text: list[str] = []
    try:
        while True:
            with client.stream("POST", path, json=body) as r:
                if r.status_code == 429 and not cut.is_set():  # the queue is full: retry, as the in-process modes
                    r.read()
                    time.sleep(0.005)
                    continue
                if r.status_code != 200:
                    r.read()
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    now = time.perf_counter()
                    if "error" in obj:
                        raise RuntimeError(obj["error"].get("message"))
                    if not obj.get("choices"):
                        continue
                    ch = obj["choices"][0]
                    kv = ch.get("kvagents") or {}
                    ids = kv.get("token_ids") or ()
                    rec.token_ids.extend(ids)
                    rec.token_times.extend([now] * len(ids))
                    piece = ch["delta"].get("content") if "delta" in ch else ch.get("text")
                    if piece:
                        text.append(piece)
                    if ch.get("finish_reason") is not None:
                        rec.finish_reason = kv.get("finish_reason", ch["finish_reason"])
                    if cut.is_set():  # closing the stream cancels the request on the server
                        rec.cut, rec.finish_reason = True, "cancelled"
                        break
            break
    except Exception as err:  # noqa: BLE001
        rec.end, rec.error = time.perf_counter(), repr(err)
        return
    finally:
        srv.release(client)
    rec.end = time.perf_counter()
    rec.text = "".join(text)
    if rec.finish_reason == "cancelled":
        rec.cut = True


def http_check(a: list[Record], b: list[Record]) -> dict:
    """Requests completed in both runs whose token ids (and text) are equal."""
    first = {r.index: r for r in a if r.error is None and not r.cut}
    both = [(first[r.index], r) for r in b if r.error is None and not r.cut and r.index in first]
    ids = sum(x.token_ids == y.token_ids for x, y in both)
    text = sum(x.text == y.text for x, y in both)
    return {"compared": len(both), "same_tokens": ids, "same_text": text,
            "differ": [x.index for x, y in both if x.token_ids != y.token_ids or x.text != y.text][:10]}


# -- load drivers -----------------------------------------------------------------------------------------------
def _drive(reqs: list[Request], issue, *, clients: int | None, rate: float | None, duration: float,
           budget_s: float, grace_s: float, on_cut, seed: int) -> tuple[list[Record], float]:
    """Run ``issue(req, rec)`` under a closed (``clients``) or open (``rate``) loop; returns the records of the
    requests sent and the start time."""
    records: list[Record] = []
    rlock = threading.Lock()
    threads: list[threading.Thread] = []
    t0 = time.perf_counter()

    def new_record(req: Request, send: float) -> Record:
        rec = Record(req.index, send, req.max_new)
        with rlock:
            records.append(rec)
        return rec

    if clients is not None:
        pending = iter(reqs)

        def client():
            while True:
                with rlock:
                    if time.perf_counter() - t0 > budget_s:
                        return
                    req = next(pending, None)
                if req is None:
                    return
                issue(req, new_record(req, time.perf_counter()))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for th in threads:
            th.start()
    else:
        rng = random.Random(seed)
        at = 0.0
        for req in reqs:
            at += rng.expovariate(rate)
            if at > min(duration, budget_s):
                break
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            rec = new_record(req, t0 + at)
            th = threading.Thread(target=issue, args=(req, rec), daemon=True)
            th.start()
            threads.append(th)
    hard = t0 + budget_s + grace_s
    for th in threads:
        th.join(None if math.isinf(hard) else max(0.0, hard - time.perf_counter()))
    if any(th.is_alive() for th in threads):
        on_cut()
        for th in threads:
            th.join()
    records.sort(key=lambda r: r.index)
    return records, t0


def run_load(llm, mode: str, reqs: list[Request], sampling: Sampling, *, clients: int | None = None,
             rate: float | None = None, duration: float = float("inf"), budget_s: float = float("inf"),
             grace_s: float = float("inf"), seed: int = 0, scheduler_config: dict | None = None,
             http_scores: bool = False) -> tuple[list[Record], float]:
    """One configuration: ``mode`` (any but ``static``) under ``clients`` (closed loop) or ``rate`` (open loop).
    Returns (records, start time). ``http_scores``: the http modes' server adds its probability scores."""
    if (clients is None) == (rate is None):
        raise ValueError("pass clients (closed loop) or rate (open loop)")
    cut = threading.Event()
    if mode == "serial":
        def issue(req, rec):
            issue_serial(llm, req, sampling, rec, cut)

        on_cut = cut.set
    elif mode in ("http", "http-fast"):
        config = scheduler_config or {}
        srv = http_server(llm, mode, fast_config(llm, reqs, config) if mode == "http-fast" else config,
                          scores=http_scores)
        srv.prepare(clients if clients is not None else len(reqs))

        def issue(req, rec):
            issue_http(srv, req, sampling, rec, cut)

        on_cut = cut.set
    elif mode in ("scheduler", "scheduler-direct", "scheduler-fast"):
        handles: list = []
        hlock = threading.Lock()
        if mode == "scheduler":
            use_scheduler(llm, mode, scheduler_config or {})
            submit, prompts = llm.submit, {r.index: r.prompt for r in reqs}
        elif mode == "scheduler-fast":
            submit = fast_scheduler(llm, fast_config(llm, reqs, scheduler_config or {})).submit
            prompts = {r.index: r.prompt for r in reqs}
        else:  # token ids encoded here, a Scheduler that never takes the model lock in submit (module docstring)
            from kvagents.engine.scheduler import Scheduler, SchedulerConfig

            prompts = {r.index: llm.encode_prompt(r.prompt) for r in reqs}
            direct = Scheduler(llm.engine, lock=llm._lock, config=SchedulerConfig(**(scheduler_config or {})))
            submit = direct.submit

        def issue(req, rec):
            issue_scheduler(submit, prompts[req.index], req, sampling, rec, handles, hlock, cut)

        def on_cut():
            cut.set()
            with hlock:
                for h in handles:
                    h.cancel()
    else:
        raise ValueError(f"run_load runs serial, scheduler, scheduler-fast, scheduler-direct, http or http-fast, got "
                         f"{mode!r} (static: run_static)")
    try:
        return _drive(reqs, issue, clients=clients, rate=rate, duration=duration, budget_s=budget_s,
                      grace_s=grace_s, on_cut=on_cut, seed=seed)
    finally:
        if mode == "scheduler-direct":
            run_load.last_direct = direct  # its counters, for the summary
            direct.shutdown(cancel=True, timeout=60)


_FAST: dict[int, object] = {}  # id(llm) -> its FastScheduler, kept over loads (graphs captured once)


def fast_config(llm, reqs: list[Request], config: dict) -> dict:
    """``config`` for the fast scheduler: ``max_seq_len`` (unless given) = the longest prompt + its cap, rounded up
    to 128 and at most the model's context."""
    if config.get("max_seq_len") is None:
        longest = max(len(llm.encode_prompt(r.prompt)) + r.max_new for r in reqs)
        seq = -(-longest // 128) * 128
        ctx = llm.context_length
        config = {**config, "max_seq_len": min(seq, ctx) if ctx else seq}
    return config


def fast_scheduler(llm, config: dict):
    """The process's :class:`~kvagents.engine.fast_scheduler.FastScheduler` for ``llm`` (started on first call; a
    different ``config`` replaces it)."""
    from kvagents.engine.fast_scheduler import FastScheduler
    from kvagents.engine.scheduler import SchedulerConfig

    cfg = SchedulerConfig(**{**config, "fast": True})
    sched = _FAST.get(id(llm))
    if sched is not None and (sched.closed or sched.config != cfg):
        sched.shutdown(cancel=True, timeout=60)
        sched = None
    if sched is None:
        sched = _FAST[id(llm)] = FastScheduler(llm.fast_engine, lock=llm._lock, config=cfg,
                                               encode=llm.encode_prompt)
    return sched


def run_static(llm, reqs: list[Request], sampling: Sampling) -> tuple[list[Record], float]:
    """All ``reqs`` in one ``generate`` call, decoded to the longest cap; each request keeps its own cap's tokens."""
    from kvagents import SamplingParams

    cut = threading.Event()
    clock = _Clock(cut)
    longest = max(r.max_new for r in reqs)
    t = float(sampling.temperature)
    params = SamplingParams(max_new_tokens=longest, temperature=t, top_p=sampling.top_p,
                            seed=reqs[0].seed if t > 0 else None, ignore_eos=sampling.ignore_eos)
    events: list[list[tuple[float, int]]] = [[] for _ in reqs]

    def on_text(ev):
        events[ev.prompt_index].append((time.perf_counter(), clock.step))

    t0 = time.perf_counter()
    records = [Record(r.index, t0, r.max_new) for r in reqs]
    try:
        res = llm.generate([r.prompt for r in reqs], params, components=[clock], on_text=on_text)
    except Exception as err:  # noqa: BLE001
        end = time.perf_counter()
        for rec in records:
            rec.end, rec.error = end, repr(err)
        return records, t0
    end = time.perf_counter()
    for i, (rec, req) in enumerate(zip(records, reqs)):
        s = res.samples[i][0]
        rec.token_ids = list(s.token_ids[: req.max_new])
        rec.finish_reason = s.finish_reason if len(s.token_ids) <= req.max_new else "length"
        rec.token_times = _times_from_events(events[i], len(rec.token_ids), end)
        rec.end = rec.token_times[-1] if rec.token_times else end
    return records, t0


# -- summary ----------------------------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float:
    """The ``q``-th percentile of ``xs`` (linear interpolation); NaN when empty."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(records: list[Record], t0: float, end: float | None = None) -> dict:
    """Counts and latency percentiles (seconds) of one configuration; ``end`` (default: the last completion)
    closes the throughput window opened at ``t0``."""
    ok = [r for r in records if r.error is None]
    ends = [r.end for r in records if r.end is not None]
    end = end if end is not None else (max(ends) if ends else t0)
    wall = max(end - t0, 1e-9)
    out_tokens = sum(len(r.token_ids) for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [g for r in ok for g in r.itl]
    e2e = [r.e2e for r in ok if r.e2e is not None and not r.cut]
    tpot = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) for r in ok if len(r.token_times) > 1]
    return {
        "requests": len(records), "completed": sum(1 for r in ok if not r.cut), "cut": sum(1 for r in ok if r.cut),
        "errors": len(records) - len(ok), "output_tokens": out_tokens, "wall_s": wall,
        "output_tok_s": out_tokens / wall, "requests_s": len(ok) / wall,
        "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
        "tpot_p50": pct(tpot, 50), "e2e_p50": pct(e2e, 50), "e2e_p99": pct(e2e, 99),
    }


def _ms(x: float) -> str:
    return "-" if x != x else f"{x * 1e3:.1f}"


def table(rows: list[dict]) -> str:
    """A markdown table of summaries (latencies in ms)."""
    head = ("| mode | load | requests | done | cut | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | "
            "e2e p50 / p99 ms |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['load']} | {r['requests']} | {r['completed']} | {r['cut']} | "
                     f"{r['output_tok_s']:.1f} | {_ms(r['ttft_p50'])} / {_ms(r['ttft_p99'])} | "
                     f"{_ms(r['itl_p50'])} / {_ms(r['itl_p99'])} | {_ms(r['e2e_p50'])} / {_ms(r['e2e_p99'])} |")
    return "\n".join(lines)


def record_json(r: Record, t0: float) -> dict:
    d = asdict(r)
    d.pop("token_times")
    d["send"] = r.send - t0
    d["end"] = None if r.end is None else r.end - t0
    d["ttft"], d["e2e"], d["tokens"] = r.ttft, r.e2e, len(r.token_ids)
    d["token_times"] = [x - r.send for x in r.token_times]
    return d


def warm_up(llm, reqs: list[Request], sampling: Sampling, modes, scheduler_config: dict,
            http_scores: bool = False) -> None:
    """Kernels, allocator and tokenizer warm before timing: one short serial call, a static batch of two, two
    scheduler requests (and two through each http mode's server)."""
    short = [Request(r.index, r.prompt, min(4, r.max_new), r.seed) for r in reqs[:2]]
    issue_serial(llm, short[0], sampling, Record(0, time.perf_counter(), 4), threading.Event())
    if "static" in modes:
        llm.generate([r.prompt for r in short], params_for(short[0], sampling), on_text=lambda ev: None)
    if "scheduler" in modes or "http" in modes:
        use_scheduler(llm, "scheduler", scheduler_config)
        hs = [llm.submit(r.prompt, params_for(r, sampling)) for r in short]
        for h in hs:
            h.result()
    if "scheduler-fast" in modes:
        sched = fast_scheduler(llm, fast_config(llm, reqs, scheduler_config))
        sched.precapture()  # CUDA: every attention bucket's greedy step (a sampled mode captures when first used)
        for h in [sched.submit(r.prompt, params_for(r, sampling)) for r in short]:
            h.result()
    for mode in ("http", "http-fast"):
        if mode in modes:
            config = fast_config(llm, reqs, scheduler_config) if mode == "http-fast" else scheduler_config
            if mode == "http-fast":
                fast_scheduler(llm, config).precapture()
            srv = http_server(llm, mode, config, scores=http_scores)
            threads = [threading.Thread(target=issue_http, args=(srv, r, sampling, Record(r.index, 0.0, r.max_new),
                                                                 threading.Event())) for r in short]
            for th in threads:
                th.start()
            for th in threads:
                th.join()


def thread_cpu_s(th: threading.Thread | None) -> float:
    """CPU seconds ``th`` has used so far (NaN where the OS does not tell)."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(th.ident))
    except (AttributeError, OSError, TypeError):
        return float("nan")


def process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m",
                    help="registry name, hub id, folder, .gguf file, or random:<shape> (%(default)s)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (%(default)s)")
    ap.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (%(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (%(default)s)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="GSM8K JSONL (%(default)s)")
    ap.add_argument("--chat", action="store_true", help="send questions through the chat template")
    ap.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES)
    ap.add_argument("--clients", nargs="*", type=int, default=None,
                    help="closed-loop client counts (default 1 8 32 unless --rate is given)")
    ap.add_argument("--rate", nargs="*", type=float, default=[], help="open-loop Poisson rates, requests/s")
    ap.add_argument("--duration", type=float, default=float("inf"), help="open loop: stop arrivals after this (s)")
    ap.add_argument("--requests", type=int, default=64, help="requests per configuration at most (%(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--lengths", choices=("fixed", "reference"), default="fixed",
                    help="output cap: --max-new-tokens, or the reference answer's token count capped by it")
    ap.add_argument("--ignore-eos", action="store_true", help="generate exactly the cap")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (%(default)s)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=8.0,
                    help="per configuration: stop issuing requests after this many seconds (%(default)s)")
    ap.add_argument("--grace-s", type=float, default=None,
                    help="cut requests still running this long after the budget (default: budget / 2)")
    ap.add_argument("--max-rows", type=int, default=64, help="scheduler rows (%(default)s)")
    ap.add_argument("--max-queue", type=int, default=1024, help="scheduler queue (%(default)s)")
    ap.add_argument("--prefill-chunk", type=int, default=256, help="scheduler prefill chunk (%(default)s)")
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help="scheduler-fast: prompt + new tokens per request (default: the longest, rounded up to 128)")
    ap.add_argument("--cudnn-sdp", action="store_true",
                    help="leave torch's cuDNN attention on (default off: on an H100 it built a plan for every new KV "
                         "length, ~40 ms per decode step whose length the process had not seen)")
    ap.add_argument("--http-scores", action="store_true",
                    help="http modes: the server adds its probability scores to each choice (kvagents serve's "
                         "default; off here so http and in-process run the same components)")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--json", default=None, help="write every summary and request record here")
    args = ap.parse_args(argv)
    if args.clients is None:
        args.clients = [] if args.rate else [1, 8, 32]
    if args.http_scores and "http-fast" in args.modes:
        ap.error("--http-scores adds a per-request component, which the fast scheduler (http-fast) does not run")
    grace = args.budget_s / 2 if args.grace_s is None else args.grace_s

    import torch
    import transformers

    if torch.cuda.is_available() and not args.cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    t_load = time.perf_counter()
    llm = build_model(args.model, args.device, args.dtype, args.threads)
    load_s = time.perf_counter() - t_load
    sampling = Sampling(args.temperature, args.top_p, args.ignore_eos)
    reqs = load_requests(args.data, args.requests, args.max_new_tokens, lengths=args.lengths,
                         tokenizer=llm.tokenizer, chat=args.chat, seed=args.seed, sampled=args.temperature > 0)
    sched_cfg = dict(max_rows=args.max_rows, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk)
    if args.max_seq_len is not None:
        sched_cfg["max_seq_len"] = args.max_seq_len
    dev = llm.device
    device_name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"{args.model} on {device_name}, {llm.dtype}, loaded in {load_s:.1f} s; {len(reqs)} requests, "
          f"max {args.max_new_tokens} new tokens ({args.lengths}), T={args.temperature}", flush=True)
    if not args.no_warmup:
        t = time.perf_counter()
        warm_up(llm, reqs, sampling, args.modes, sched_cfg, args.http_scores)
        print(f"warm-up {time.perf_counter() - t:.1f} s", flush=True)

    loads = [("clients", c) for c in args.clients] + [("rate", r) for r in args.rate]
    rows, runs = [], []
    done: dict[tuple[str, str], list[Record]] = {}  # (mode, load) -> records, for the http modes' greedy check
    for mode in args.modes:
        configs = [("batch", len(reqs))] if mode == "static" else loads
        for kind, value in configs:
            t = time.perf_counter()
            steps0 = 0
            load0, cpu0 = os.getloadavg()[0], process_cpu_s()
            if mode in ("scheduler", "http"):
                sched = use_scheduler(llm, mode, sched_cfg)
                sched.peak_rows, steps0 = 0, sched.steps
            elif mode in ("scheduler-fast", "http-fast"):
                sched = fast_scheduler(llm, fast_config(llm, reqs, sched_cfg))
                sched.peak_rows, steps0, captures0 = 0, sched.steps, llm.fast_engine.captures
            if mode in ("scheduler", "http", "scheduler-fast", "http-fast"):
                loop0 = thread_cpu_s(getattr(sched, "_thread", None))
            if mode == "static":
                records, t0 = run_static(llm, reqs, sampling)
                label = f"batch={value}"
            else:
                kw = {"clients": value} if kind == "clients" else {"rate": value, "duration": args.duration}
                records, t0 = run_load(llm, mode, reqs, sampling, budget_s=args.budget_s, grace_s=grace,
                                       seed=args.seed, scheduler_config=sched_cfg, http_scores=args.http_scores, **kw)
                label = f"c={value}" if kind == "clients" else f"r={value:g}/s"
            s = {"mode": mode, "load": label, kind: value, **summarize(records, t0)}
            s["cpu_s"], s["loadavg_1m"] = process_cpu_s() - cpu0, [load0, os.getloadavg()[0]]
            if mode in ("scheduler", "scheduler-fast", "http", "http-fast"):
                s["scheduler_peak_rows"], s["scheduler_steps"] = sched.peak_rows, sched.steps - steps0
                s["loop_cpu_s"] = thread_cpu_s(getattr(sched, "_thread", None)) - loop0
            if mode in ("scheduler-fast", "http-fast"):  # graphs captured while this load ran (0: all in the warm-up)
                s["captures"], s["compactions"] = llm.fast_engine.captures - captures0, sched.compactions
            elif mode == "scheduler-direct":
                d = run_load.last_direct
                s["scheduler_peak_rows"], s["scheduler_steps"] = d.peak_rows, d.steps
            done[mode, label] = records
            pair = {"http": "scheduler", "http-fast": "scheduler-fast"}
            other = pair.get(mode) or {v: k for k, v in pair.items()}.get(mode)
            if other is not None and args.temperature == 0 and (other, label) in done:
                http, inproc = (mode, other) if mode in pair else (other, mode)
                s["http_check"] = chk = http_check(done[inproc, label], done[http, label])
                print(f"  greedy check, {http} vs {inproc} {label}: {chk['same_tokens']}/{chk['compared']} same "
                      f"tokens, {chk['same_text']}/{chk['compared']} same text", flush=True)
            rows.append(s)
            runs.append({**s, "records": [record_json(r, t0) for r in records]})
            steps = f", {s['scheduler_steps']} steps" if "scheduler_steps" in s else ""
            loop = (f", decode loop {s['loop_cpu_s']:.1f} s" if not math.isnan(s.get("loop_cpu_s", float("nan")))
                    else "")
            print(f"  {mode} {label}: {s['requests']} requests, {s['output_tok_s']:.1f} tok/s "
                  f"({time.perf_counter() - t:.1f} s{steps}; CPU {s['cpu_s']:.1f} s{loop}; load "
                  f"{load0:.2f} -> {s['loadavg_1m'][1]:.2f})", flush=True)
    stop_http()
    if llm._scheduler is not None:
        llm._scheduler.shutdown(cancel=True, timeout=60)
    if id(llm) in _FAST:
        _FAST.pop(id(llm)).shutdown(cancel=True, timeout=60)
    print()
    print(table(rows))
    if args.json:
        meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device_name,
                "dtype": str(llm.dtype), "torch": torch.__version__, "transformers": transformers.__version__,
                "load_s": load_s,
                "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled(), "args": vars(args) | {"grace_s": grace}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
