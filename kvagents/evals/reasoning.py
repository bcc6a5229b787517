"""``kvagents eval reasoning``: fast/slow thinking routed and switched by KV classifiers, on a task mixture.

Stages (each reads and writes a work folder, so a GPU run can split them over processes):

* ``collect`` (training slice): fast and slow runs of every row (greedy, modes forced as the assistant's first
  words after a neutral prompt); the slow run's :class:`~kvagents.control.thinking.ReasoningController` captures, in the
  same pass that generates, the prompt's pooled KV window and the last-w tokens' pooled KV every ``every``
  tokens. Early-exit answers at each checkpoint (prefix + the end-of-thinking marker + a short answer) give the
  mid-generation labels.
* ``train``: three heads on those features: the paper's (labels 0/25/75/100, threshold 50), ``gain`` (the
  alternative labelling: 100 when only slow thinking is right) and ``step`` (mid-generation: 100 when thinking on
  turns a wrong early answer into a right final one). Thresholds for gain/step are calibrated on out-of-fold
  predictions of the training rows (fewest tokens at no more than ``tolerance`` points below always-slow).
* ``eval-base`` (evaluation slice): always-fast, always-slow (with features), budget-only at 3 budgets.
* ``eval-online``: the online controller (paper classifier at 50 -+ 20, and ours) -- switches in the loop.
* ``eval-posthoc``: the paper's post-hoc switching: generate fully, re-score the finished output, regenerate
  from the switch point.
* ``report``: tables per dataset and mixture (plus random routing at the controller's fast rate, prefill-only
  routers and the oracle router, computed from the fast/slow runs), ``pareto.png``, ``results.json/.md``.

The runner, the collection and labelling helpers, the cross-fitting and the calibration are shared with
``kvagents train router`` (:mod:`kvagents.evals.train_router`), which turns them into a router on the user's data.

Example:
    >>> cfg = ReasoningEvalConfig(model="qwen2.5-coder-0.5b", train_per_dataset=200, eval_per_dataset=150)
    >>> run_all(cfg, "out/reasoning")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from ..control.answers import get_parser, normalize_math, normalize_number
from ..control.thinking import ControllerConfig, ReasoningController, chat_prompt_ids, check_instruction, get_format
from ..engine.params import SamplingParams
from ..signals.kv_classifier import KVClassifier, KVClassifierConfig

# ----------------------------------------------------------------------------------------------------------------
# Tasks and slices


@dataclass(frozen=True)
class Task:
    """A dataset: where its question is, how to parse and normalise answers, the neutral format instruction and
    the answer cue the modes force (it continues the instruction, it does not quote a placeholder from it)."""

    name: str
    file: str
    field: str
    parser: str
    instruction: str
    answer_cue: str

    def gold(self, r: dict) -> str | None:
        a = r["answer"]
        if self.parser == "gsm8k":
            return normalize_number(str(a).split("####")[-1])
        if self.parser == "math":
            return normalize_math(str(a))
        return str(a).strip().upper()

    def user_text(self, question: str) -> str:
        return f"{question}\n\n{self.instruction}"

    def judge(self, text: str, r: dict) -> tuple[str | None, bool]:
        """``(parsed answer, correct)`` of a generated ``text`` for row ``r`` (its ``gold``)."""
        ans = get_parser(self.parser)(text)
        return ans, ans is not None and ans == r["gold"]


TASKS: dict[str, Task] = {
    "gsm8k": Task("gsm8k", "gsm8k.jsonl", "question", "gsm8k", "Put the final answer (a number) in \\boxed{}.",
                  "The final answer is $\\boxed{"),
    "commonsenseqa": Task("commonsenseqa", "commonsenseqa.jsonl", "en", "choice",
                          "Reply with the letter of the correct choice.", "The answer is ("),
    "math500": Task("math500", "math500.jsonl", "problem", "math", "Put the final answer in \\boxed{}.",
                    "The final answer is $\\boxed{"),
}


class ReasoningEvalConfig(BaseModel):
    """Everything a run depends on (written to ``config.json`` in the work folder).

    Slices: the evaluation slice is rows ``[0, eval_per_dataset)`` of each file, the training slice the last
    ``train_per_dataset`` rows; they must not overlap.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = "qwen2.5-coder-0.5b"
    data_dir: str = "../shared/data"
    datasets: list[str] = Field(default_factory=lambda: list(TASKS))
    train_per_dataset: int = 200
    eval_per_dataset: int = 150
    format: str = "plain"
    dtype: str = "auto"
    device: str = "auto"
    fast_tokens: int = Field(32, description="Answer tokens in fast mode (after the cue).")
    slow_tokens: int = Field(512, description="max_new_tokens of slow thinking.")
    answer_tokens: int = Field(32, description="Answer tokens after a forced end of thinking.")
    every: int = Field(32, description="Checkpoint / re-prediction period (tokens).")
    window: int = Field(64, description="Classifier window (positions); lowered to the shortest prompt if needed.")
    layers: int = Field(4, description="Last n attention layers read by the classifiers.")
    budgets: list[int] = Field(default_factory=lambda: [64, 128, 256])
    patience: int = Field(2, description="Answer-convergence exit: stop after this many equal trial answers.")
    lookahead_tokens: int = Field(8, description="Answer-convergence exit: greedy tokens of each look-ahead.")
    batch_prompts: int = 256
    tolerance: float = Field(0.5, description="Calibration: accuracy points below always-slow allowed (train rows).")
    folds: int = 5
    seed: int = 0

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, v):
        bad = [d for d in v if d not in TASKS]
        if bad or not v:
            raise ValueError(f"unknown datasets {bad}; use some of {', '.join(TASKS)}")
        return v

    @field_validator("train_per_dataset", "eval_per_dataset", "fast_tokens", "slow_tokens", "answer_tokens", "every",
                     "window", "layers", "batch_prompts", "folds", "patience", "lookahead_tokens")
    @classmethod
    def _positive(cls, v, info):
        if v < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {v}")
        return v


def slices(cfg: ReasoningEvalConfig) -> dict[str, dict[str, list[int]]]:
    """``{"train": {dataset: [start, end]}, "eval": {...}}``; raises when a file is too short to keep them apart."""
    out: dict[str, dict[str, list[int]]] = {"train": {}, "eval": {}}
    for name in cfg.datasets:
        path = Path(cfg.data_dir) / TASKS[name].file
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; pass --data-dir (the folder with {TASKS[name].file})")
        n = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        if cfg.eval_per_dataset + cfg.train_per_dataset > n:
            raise ValueError(f"{name} has {n} rows: eval {cfg.eval_per_dataset} + train {cfg.train_per_dataset} would "
                             "overlap; lower --eval-per-dataset or --train-per-dataset")
        out["eval"][name] = [0, cfg.eval_per_dataset]
        out["train"][name] = [n - cfg.train_per_dataset, n]
    return out


def slice_names(sl: dict[str, list[int]]) -> str:
    return " + ".join(f"{d}[{a}:{b}]" for d, (a, b) in sl.items())


def load_rows(cfg: ReasoningEvalConfig, which: str) -> list[dict]:
    rows = []
    for name, (a, b) in slices(cfg)[which].items():
        task = TASKS[name]
        lines = [x for x in (Path(cfg.data_dir) / task.file).read_text(encoding="utf-8").splitlines() if x.strip()]
        for i in range(a, b):
            r = json.loads(lines[i])
            rows.append({"dataset": name, "row": i, "question": r[task.field], "gold": task.gold(r)})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Generation


class Runner:
    """The model, its prompts and batched generation with one :class:`ReasoningController` per batch.

    ``cfg``: any settings object with this config's ``format``, ``model``, ``dtype``, ``device``, ``batch_prompts``
    (and, for the stage helpers, ``fast_tokens``, ``slow_tokens``, ``every``, ``layers``). ``tasks``: what a row's
    ``dataset`` names (default :data:`TASKS`): an object with ``instruction``, ``answer_cue``, ``user_text(question)``
    and ``judge(text, row) -> (answer, correct)``, like :class:`Task` (``kvagents train router`` passes the user's
    grader this way).
    """

    def __init__(self, cfg: ReasoningEvalConfig, llm=None, tasks: dict | None = None) -> None:
        from ..model import KVModel

        self.cfg = cfg
        self.fmt = get_format(cfg.format)
        self.tasks = TASKS if tasks is None else tasks
        for t in self.tasks.values():
            check_instruction(t.instruction, self.fmt, t.answer_cue)
        self.llm = llm or KVModel.from_pretrained(cfg.model, dtype=cfg.dtype, device=cfg.device).load()
        self.tok = self.llm.tokenizer
        self._prompts: dict[tuple, list[int]] = {}

    def prompt_ids(self, r: dict) -> list[int]:
        key = (r["dataset"], r["row"])
        if key not in self._prompts:
            self._prompts[key] = chat_prompt_ids(self.tok, self.tasks[r["dataset"]].user_text(r["question"]), self.fmt)
        return self._prompts[key]

    def end_ids(self, r: dict) -> list[int]:
        return self.fmt.token_ids(self.tok, self.tasks[r["dataset"]].answer_cue)["end_thinking"]

    def generate(self, rows: list[dict], desc: str, max_new: int, progress: bool = True, convergence=None,
                 **controller) -> list[dict]:
        """Greedy decoding of ``rows`` (batched, longest prompts first); one record per row, in input order.
        ``progress=False``: no bar and no summary line (a caller with its own bar). ``convergence``: a
        :class:`~kvagents.control.convergence.ConvergenceConfig`: the answer-convergence exit (look-ahead forks)
        on top of the controller, run per dataset (each with its own answer parser)."""
        if convergence is not None:
            out: list[dict | None] = [None] * len(rows)
            for name in dict.fromkeys(r["dataset"] for r in rows):
                idx = [i for i, r in enumerate(rows) if r["dataset"] == name]
                recs = self._generate([rows[i] for i in idx], f"{desc} [{name}]", max_new, progress,
                                      convergence=convergence, **controller)
                for i, rec in zip(idx, recs):
                    out[i] = rec
            return out
        return self._generate(rows, desc, max_new, progress, **controller)

    def _generate(self, rows: list[dict], desc: str, max_new: int, progress: bool = True, convergence=None,
                  **controller) -> list[dict]:
        order = sorted(range(len(rows)), key=lambda i: -len(self.prompt_ids(rows[i])))
        out: list[dict | None] = [None] * len(rows)
        bs = self.cfg.batch_prompts
        params = SamplingParams(max_new_tokens=max_new, temperature=0)
        t0 = time.perf_counter()
        for s in tqdm(range(0, len(rows), bs), desc=desc, disable=not progress):
            idx = order[s : s + bs]
            batch = [rows[i] for i in idx]
            cues = [self.tasks[r["dataset"]].answer_cue for r in batch]
            if convergence is not None:
                from ..control.convergence import ConvergenceController

                ctl = ConvergenceController(self.fmt, self.tok, convergence, answer_cues=cues,
                                            parser=self.tasks[batch[0]["dataset"]].parser, **controller)
            else:
                ctl = ReasoningController(self.fmt, self.tok, answer_cues=cues, **controller)
            res = self.llm.generate([self.prompt_ids(r) for r in batch], params, components=[ctl])
            for i, r, g in zip(idx, batch, res.samples):
                out[i] = record(r, g[0], self.tasks[r["dataset"]])
        dt = time.perf_counter() - t0
        if progress:
            print(f"{desc}: {len(rows)} rows in {dt:.1f}s, mean tokens "
                  f"{np.mean([o['tokens'] for o in out]):.1f}", flush=True)
        return out

    def continue_from(self, items: list[tuple[dict, list[int]]], desc: str, max_new: int,
                      progress: bool = True) -> list[dict]:
        """Greedy answers after ``prompt + prefix`` for (row, prefix ids) pairs (the prefix is re-processed: used
        for training labels and for the post-hoc baseline, never by the online controller)."""
        order = sorted(range(len(items)), key=lambda i: -(len(self.prompt_ids(items[i][0])) + len(items[i][1])))
        out: list[dict | None] = [None] * len(items)
        params = SamplingParams(max_new_tokens=max_new, temperature=0)
        bs = self.cfg.batch_prompts
        for s in tqdm(range(0, len(items), bs), desc=desc, disable=not progress):
            idx = order[s : s + bs]
            res = self.llm.generate([self.prompt_ids(items[i][0]) + items[i][1] for i in idx], params)
            for i, g in zip(idx, res.samples):
                r, prefix = items[i]
                ids = list(prefix) + g[0].token_ids
                text = self.tok.decode(ids, skip_special_tokens=True)
                ans, ok = self.tasks[r["dataset"]].judge(text, r)
                out[i] = {"answer": ans, "correct": ok, "new_tokens": g[0].generated_tokens, "text": text}
        return out


def record(r: dict, s, task=None) -> dict:
    """One run's record (``task``: what judges the answer; default ``TASKS[r["dataset"]]``)."""
    o = s.outputs.get("reasoning", {})
    ans, ok = (task or TASKS[r["dataset"]]).judge(s.text, r)
    rec = {"dataset": r["dataset"], "row": r["row"], "gold": r["gold"], "answer": ans,
           "correct": ok, "tokens": int(s.outputs.get("total_tokens", s.generated_tokens)), "finish": s.finish_reason,
           "lookahead_tokens": int(s.outputs.get("lookahead_tokens", 0)), "converged": o.get("converged"),
           "thinking": o.get("thinking_tokens"), "answer_tokens": o.get("answer_tokens"),
           "forced": o.get("forced_tokens"), "start": o.get("start"), "start_score": o.get("start_score"),
           "switches": o.get("switches", []), "budget_hit": o.get("budget_hit"), "text": s.text}
    if "features" in o:
        f = o["features"]
        rec["_features"] = {"prompt": f["prompt"].numpy(), "steps": f["steps"],
                            "windows": f["windows"].numpy() if f["windows"] is not None else None}
        rec["_token_ids"] = list(s.token_ids)
    return rec


def _write_jsonl(path: Path, recs: list[dict]) -> None:
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _save_features(path: Path, recs: list[dict]) -> None:
    """prompt ``[N, D]``; windows ``[M, D]`` with their row index and step; token ids of every row."""
    prompt = np.stack([r["_features"]["prompt"] for r in recs]).astype(np.float32)
    win, win_row, win_step = [], [], []
    for i, r in enumerate(recs):
        f = r["_features"]
        for j, t in enumerate(f["steps"]):
            win.append(f["windows"][j])
            win_row.append(i)
            win_step.append(t)
    d = prompt.shape[1]
    windows = np.stack(win).astype(np.float32) if win else np.zeros((0, d), np.float32)
    np.savez_compressed(path, prompt=prompt, windows=windows, win_row=np.array(win_row, dtype=np.int64),
                        win_step=np.array(win_step, dtype=np.int64))
    (path.with_suffix(".tokens.json")).write_text(json.dumps([r["_token_ids"] for r in recs]))


def _load_features(path: Path) -> tuple[dict[str, np.ndarray], list[list[int]]]:
    z = np.load(path)
    tokens = path.with_suffix(".tokens.json")
    return {k: z[k] for k in z.files}, (json.loads(tokens.read_text()) if tokens.exists() else None)


def _window(cfg: ReasoningEvalConfig, runner: Runner, rows: list[dict]) -> int:
    shortest = min(len(runner.prompt_ids(r)) for r in rows)
    if shortest < cfg.window:
        print(f"classifier window lowered from {cfg.window} to {shortest} (the shortest prompt)", flush=True)
    return min(cfg.window, shortest)


def kv_config(cfg: ReasoningEvalConfig, window: int) -> KVClassifierConfig:
    return KVClassifierConfig(layers=cfg.layers, window=window)


def _fast_max_new(cfg):
    return cfg.fast_tokens + 48  # the cue, then fast_tokens (the controller stops the answer)


def _fast(runner: Runner, rows, desc, progress: bool = True):
    cfg = runner.cfg
    return runner.generate(rows, desc, _fast_max_new(cfg), progress, start="fast", max_answer_tokens=cfg.fast_tokens)


def _slow_capture(runner: Runner, rows, desc, window, progress: bool = True):
    cfg = runner.cfg
    return runner.generate(rows, desc, cfg.slow_tokens, progress, config=ControllerConfig(start="slow", capture=True,
                                                                                          every=cfg.every),
                           kv_config=kv_config(cfg, window))


# ----------------------------------------------------------------------------------------------------------------
# Stages


def _prep(cfg: ReasoningEvalConfig, work: Path) -> Path:
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    sl = slices(cfg)
    dev = torch.cuda.get_device_name() if (torch.cuda.is_available() and cfg.device != "cpu") else "cpu"
    (work / "config.json").write_text(json.dumps({"config": cfg.model_dump(), "slices": sl, "device": dev,
                                                  "train": slice_names(sl["train"]), "eval": slice_names(sl["eval"])},
                                                 indent=2))
    return work


def collect(cfg: ReasoningEvalConfig, work: str | Path, runner: Runner | None = None) -> None:
    """Fast and slow runs on the training slice, features captured in the slow pass, early-exit labels."""
    work = _prep(cfg, work)
    runner = runner or Runner(cfg)
    rows = load_rows(cfg, "train")
    window = _window(cfg, runner, rows + load_rows(cfg, "eval"))
    fast = _fast(runner, rows, "collect fast")
    slow = _slow_capture(runner, rows, "collect slow", window)
    label_checkpoints(runner, rows, slow, cfg.answer_tokens)
    _write_jsonl(work / "train_fast.jsonl", fast)
    _write_jsonl(work / "train_slow.jsonl", slow)
    _save_features(work / "train_features.npz", slow)
    cue = len(runner.fmt.token_ids(runner.tok)["slow_cue"])
    (work / "window.json").write_text(json.dumps({"window": window, "slow_cue_tokens": cue}))


def label_checkpoints(runner: Runner, rows: list[dict], slow: list[dict], answer_tokens: int,
                      progress: bool = True) -> None:
    """Early-exit labels: at every captured checkpoint of each slow run (records of :func:`_slow_capture`), the
    prefix + the end-of-thinking marker + ``answer_tokens`` greedy answer tokens; sets ``checkpoints`` on every slow
    record (``step``, ``correct``, ``tokens`` of the whole early-exit output, ``answer``, ``answer_tokens``)."""
    items, where = [], []
    for i, (r, s) in enumerate(zip(rows, slow)):
        for j, t in enumerate(s["_features"]["steps"]):
            items.append((r, s["_token_ids"][: t + 1] + runner.end_ids(r)))
            where.append((i, j))
    early = runner.continue_from(items, "early-exit labels", answer_tokens, progress=progress) if items else []
    for s in slow:
        s["checkpoints"] = [{"step": t} for t in s["_features"]["steps"]]
    for (i, j), e, (_, prefix) in zip(where, early, items):
        slow[i]["checkpoints"][j].update(correct=e["correct"], tokens=len(prefix) + e["new_tokens"],
                                          answer=e["answer"], answer_tokens=e["new_tokens"])


def paper_label(fast_correct: bool, fast_tokens: int, slow_correct: bool) -> float:
    """The paper's difficulty: fast right and short 0, fast right and >= 128 tokens 25, only slow right 75,
    neither 100."""
    if fast_correct:
        return 0.0 if fast_tokens < 128 else 25.0
    return 75.0 if slow_correct else 100.0


def gain_label(fast_correct: bool, slow_correct: bool) -> float:
    """Alternative labelling: does slow thinking change the outcome? 100 only when slow is right and fast wrong."""
    return 100.0 if (slow_correct and not fast_correct) else 0.0


def _folds(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = np.arange(n) % k
    rng.shuffle(f)
    return f


class Outcomes:
    """Training-row outcomes as arrays: fast / slow (correct, tokens) and early exits at checkpoints ``[N, C]``."""

    def __init__(self, fast: list[dict], slow: list[dict], step_pred: list[np.ndarray] | None = None) -> None:
        n = len(fast)
        C = max((len(s["checkpoints"]) for s in slow), default=0)
        self.fc = np.array([f["correct"] for f in fast], bool)
        self.ft = np.array([f["tokens"] for f in fast], float)
        self.sc = np.array([s["correct"] for s in slow], bool)
        self.st = np.array([s["tokens"] for s in slow], float)
        self.cc = np.zeros((n, C), bool)
        self.ct = np.zeros((n, C))
        self.valid = np.zeros((n, C), bool)
        self.pred = np.full((n, C), np.inf)
        for i, s in enumerate(slow):
            for j, c in enumerate(s["checkpoints"]):
                self.cc[i, j], self.ct[i, j], self.valid[i, j] = c["correct"], c["tokens"], True
            if step_pred is not None:
                self.pred[i, : len(step_pred[i])] = step_pred[i]

    def simulate(self, pred_p: np.ndarray, tau_p: float, tau_s: float, max_ckpt: int | None = None):
        """Per-row (correct, tokens): fast when ``pred_p < tau_p``; else slow, ending at the first checkpoint whose
        step prediction is below ``tau_s`` or at checkpoint ``max_ckpt`` (a thinking budget), early-exit answer."""
        stop = self.valid & (self.pred < tau_s)
        if max_ckpt is not None and max_ckpt < stop.shape[1]:
            stop[:, max_ckpt] |= self.valid[:, max_ckpt]
        any_stop = stop.any(1)
        first = stop.argmax(1)
        rows = np.arange(len(self.fc))
        c = np.where(any_stop, self.cc[rows, first] if stop.shape[1] else self.sc, self.sc)
        t = np.where(any_stop, self.ct[rows, first] if stop.shape[1] else self.st, self.st)
        fast = pred_p < tau_p
        return np.where(fast, self.fc, c), np.where(fast, self.ft, t)


def step_labels(slow: list[dict], win_row: np.ndarray) -> np.ndarray:
    """Mid-generation labels, one per captured window (``win_row``: its row): 100 when thinking on turns a wrong
    early-exit answer at that checkpoint into a right final one, else 0."""
    ckpt = [c for s in slow for c in s["checkpoints"]]
    return np.array([100.0 if (slow[i]["correct"] and not c["correct"]) else 0.0 for i, c in zip(win_row, ckpt)])


def cross_fit(X_p: np.ndarray, prompt_heads: dict[str, tuple[np.ndarray, bool, bool]], X_w: np.ndarray,
              y_step: np.ndarray, win_row: np.ndarray, folds: np.ndarray, n_folds: int, kc: KVClassifierConfig,
              fit: dict, progress: bool = True) -> dict[str, np.ndarray]:
    """Out-of-fold predictions, folds by row (a row's step windows follow it). ``prompt_heads``: name ->
    ``(labels, balance, needs both classes in the fold)`` of the heads on the prompt features; the step head on the
    windows is fitted when its fold has >= 4 windows of both labels (else its predictions stay 0)."""
    n = len(X_p)
    oof = {name: np.zeros(n) for name in prompt_heads}
    oof["step"] = np.zeros(len(y_step))
    for k in tqdm(range(n_folds), desc="cross-fit", disable=not progress):
        tr, te = folds != k, folds == k
        wtr, wte = np.isin(win_row, np.nonzero(tr)[0]), np.isin(win_row, np.nonzero(te)[0])
        for name, (y, balance, both) in prompt_heads.items():
            if both and not 0 < y[tr].sum() < 100 * tr.sum():
                continue
            m, _ = KVClassifier.fit(X_p[tr], y[tr], kc, balance=balance, **fit)
            oof[name][te] = m.predict(X_p[te])
        if wtr.sum() >= 4 and 0 < y_step[wtr].sum() < 100 * wtr.sum():
            m, _ = KVClassifier.fit(X_w[wtr], y_step[wtr], kc, balance=True, batch_size=1024, **fit)
            oof["step"][wte] = m.predict(X_w[wte])
    return oof


def calibrate(out: Outcomes, pred_gain: np.ndarray, pred_step: np.ndarray, tolerance: float, every: int,
              cue_tokens: int) -> tuple[dict[str, Any], int | None]:
    """Thresholds with the fewest tokens at accuracy >= always-slow - ``tolerance`` points on these rows' (out-of-
    fold) predictions; a thinking budget ending at a checkpoint is part of the grid (it is what the budget forces
    there). Returns the calibration summary and the checkpoint index of the budget (``None``: no budget)."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 accuracy points, got {tolerance}")
    slow_acc = float(out.sc.mean())
    q = np.linspace(0, 100, 21)
    tp = sorted(set([-math.inf] + list(np.percentile(pred_gain, q)) + [math.inf]))
    ts = sorted(set([-math.inf] + (list(np.percentile(pred_step, q)) if len(pred_step) else [])))
    caps = [None] + list(range(1, out.valid.shape[1]))
    best = None
    for a in tp:
        for b in ts:
            for m in caps:
                c, t = out.simulate(pred_gain, a, b, m)
                acc, tok = float(c.mean()), float(t.mean())
                if acc >= slow_acc - tolerance / 100 and (best is None or (tok, -acc) < (best[3], -best[4])):
                    best = (a, b, m, tok, acc)
    tau_p, tau_s, cap, tok, acc = best
    budget = None if cap is None else (cap + 1) * every - cue_tokens  # thinking tokens up to checkpoint `cap`
    return {"slow_accuracy": slow_acc, "slow_tokens": float(out.st.mean()), "fast_accuracy": float(out.fc.mean()),
            "tau_gain": _clip(tau_p), "tau_step": _clip(tau_s), "thinking_budget": budget,
            "ours_accuracy_oof": acc, "ours_tokens_oof": tok}, cap


def fit_router_heads(X_p: np.ndarray, y_gain: np.ndarray, X_w: np.ndarray, y_step: np.ndarray,
                     kc: KVClassifierConfig, tau_gain: float, tau_step: float, fit: dict) -> dict[str, tuple]:
    """The final gain head (prompt features) and, when its labels hold both classes, the step head (windows), on
    every given row (20 % held out for early stopping), thresholds stored: name -> ``(classifier, fit report)``."""
    heads = {}
    m, rep = KVClassifier.fit(X_p, y_gain, kc.model_copy(update={"labels": "gain", "threshold": tau_gain}),
                              balance=True, **fit)
    heads["gain"] = (m, rep)
    if len(y_step) >= 4 and 0 < y_step.sum() < 100 * len(y_step):
        m, rep = KVClassifier.fit(X_w, y_step, kc.model_copy(update={"labels": "step", "threshold": tau_step}),
                                  balance=True, batch_size=1024, **fit)
        heads["step"] = (m, rep)
    return heads


def train(cfg: ReasoningEvalConfig, work: str | Path) -> dict:
    """Fit the paper / gain / step heads, calibrate gain+step thresholds on out-of-fold predictions, save them."""
    work = Path(work)
    fast, slow = _read_jsonl(work / "train_fast.jsonl"), _read_jsonl(work / "train_slow.jsonl")
    feats, _ = _load_features(work / "train_features.npz")
    window = json.loads((work / "window.json").read_text())["window"]
    kc = kv_config(cfg, window)
    dev = "cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
    n = len(fast)
    y_paper = np.array([paper_label(f["correct"], f["tokens"], s["correct"]) for f, s in zip(fast, slow)])
    y_gain = np.array([gain_label(f["correct"], s["correct"]) for f, s in zip(fast, slow)])
    win_row, X_w = feats["win_row"], feats["windows"]
    y_step = step_labels(slow, win_row)
    X_p = feats["prompt"]
    fit = dict(seed=cfg.seed, device=dev, max_epochs=300, patience=25)
    report: dict[str, Any] = {"rows": n, "window": window, "label_counts": {
        "paper": {str(int(v)): int((y_paper == v).sum()) for v in (0, 25, 75, 100)},
        "gain_positive": int(y_gain.sum() / 100), "step_samples": int(len(y_step)),
        "step_positive": int(y_step.sum() / 100)}}
    # out-of-fold predictions (folds by row; step samples follow their row)
    folds = _folds(n, cfg.folds, cfg.seed)
    oof = cross_fit(X_p, {"paper": (y_paper, False, False), "gain": (y_gain, True, True)}, X_w, y_step, win_row,
                    folds, cfg.folds, kc, fit)
    out = Outcomes(fast, slow, [oof["step"][win_row == i] for i in range(n)])
    cue = json.loads((work / "window.json").read_text()).get("slow_cue_tokens", 0)
    cal, _ = calibrate(out, oof["gain"], oof["step"], cfg.tolerance, cfg.every, cue)
    pc, pt = out.simulate(oof["paper"], 50.0, -math.inf)
    report["calibration"] = {**cal, "paper_prefill_accuracy_oof": float(pc.mean()),
                             "paper_prefill_tokens_oof": float(pt.mean()), "tolerance_points": cfg.tolerance}
    report["oof_auroc"] = {"paper": _auroc(oof["paper"], y_paper >= 50), "gain": _auroc(oof["gain"], y_gain >= 50),
                           "step": _auroc(oof["step"], y_step >= 50) if len(y_step) else None}
    # final heads on every training row (20 % held out for early stopping)
    heads = {}
    m, rep = KVClassifier.fit(X_p, y_paper, kc.model_copy(update={"labels": "paper", "threshold": 50.0}), **fit)
    heads["paper"] = (m, rep)
    heads.update(fit_router_heads(X_p, y_gain, X_w, y_step, kc, cal["tau_gain"], cal["tau_step"], fit))
    for name, (m, rep) in heads.items():
        m.save(work / f"clf_{name}")
        report[name] = {k: v for k, v in rep.items() if k not in ("val_predictions", "val_index")}
    (work / "train_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("label_counts", "calibration", "oof_auroc")}, indent=1), flush=True)
    return report


def _clip(x: float) -> float:
    return float(np.clip(x, -1e6, 1e6))


def _auroc(s: np.ndarray, y: np.ndarray) -> float | None:
    from .metrics import auroc

    if y.all() or not y.any():
        return None
    return float(auroc(np.asarray(s, float), np.asarray(y, bool)))


def eval_base(cfg: ReasoningEvalConfig, work: str | Path, runner: Runner | None = None,
              parts: tuple[str, ...] = ("fast", "slow", "budgets")) -> None:
    """Always-fast, always-slow (features captured for the post-hoc baseline and the routers), budget-only."""
    work = _prep(cfg, work)
    runner = runner or Runner(cfg)
    rows = load_rows(cfg, "eval")
    window = _window(cfg, runner, rows + load_rows(cfg, "train"))
    if "fast" in parts:
        _write_jsonl(work / "eval_fast.jsonl", _fast(runner, rows, "eval fast"))
    if "slow" in parts:
        slow = _slow_capture(runner, rows, "eval slow", window)
        _write_jsonl(work / "eval_slow.jsonl", slow)
        _save_features(work / "eval_features.npz", slow)
    if "budgets" in parts:
        for b in cfg.budgets:
            recs = runner.generate(rows, f"eval budget {b}", b + cfg.answer_tokens + 96, start="slow",
                                   max_thinking_tokens=b, max_answer_tokens=cfg.answer_tokens)
            _write_jsonl(work / f"eval_budget_{b}.jsonl", recs)


CONTROLLERS = ("online_paper", "online_ours", "online_convergence", "online_ours_convergence")


def _controllers(cfg: ReasoningEvalConfig, work: Path, names=CONTROLLERS) -> dict[str, dict]:
    """Controller settings by name (only the classifiers the named ones need are loaded): the paper's, ours
    (gain head at prefill, step head while thinking), the answer-convergence exit alone (always slow, look-ahead
    trial answers every ``every`` tokens) and ours with the convergence exit on top."""
    from ..control.convergence import ConvergenceConfig

    conv = ConvergenceConfig(every=cfg.every, patience=cfg.patience, answer_tokens=cfg.lookahead_tokens)
    out: dict[str, dict] = {}
    if "online_convergence" in names:
        out["online_convergence"] = dict(start="slow", every=cfg.every, max_answer_tokens=cfg.answer_tokens,
                                         stop_thinking_at=cfg.slow_tokens, convergence=conv)
    if "online_paper" in names:
        paper = KVClassifier.load(work / "clf_paper")
        out["online_paper"] = dict(classifier=paper, step_classifier=paper, start="auto", threshold=50.0,
                                   delta=20.0, every=cfg.every, max_switches=1, max_answer_tokens=cfg.answer_tokens,
                                   stop_thinking_at=cfg.slow_tokens)
    if {"online_ours", "online_ours_convergence"} & set(names):
        gain = KVClassifier.load(work / "clf_gain")
        step = KVClassifier.load(work / "clf_step") if (work / "clf_step").exists() else False
        budget = json.loads((work / "train_report.json").read_text())["calibration"].get("thinking_budget")
        ours = dict(classifier=gain, step_classifier=step, start="auto", delta=0.0, every=cfg.every,
                    max_switches=1, max_answer_tokens=cfg.answer_tokens, switch_to_slow=False,
                    max_thinking_tokens=budget, stop_thinking_at=cfg.slow_tokens)
        out["online_ours"] = ours
        out["online_ours_convergence"] = dict(ours, convergence=conv)
    return out


def eval_online(cfg: ReasoningEvalConfig, work: str | Path, runner: Runner | None = None,
                names: tuple[str, ...] = ("online_paper", "online_ours")) -> None:
    """The online controllers: decide at prefill, re-predict every ``every`` tokens, switch in the loop. Sequences
    still thinking at ``slow_tokens`` are cut there, as always-slow is; a switched one may answer past it."""
    work = Path(work)
    runner = runner or Runner(cfg)
    rows = load_rows(cfg, "eval")
    bad = [n for n in names if n not in CONTROLLERS]
    if bad:
        raise ValueError(f"unknown controllers {bad}; use some of {', '.join(CONTROLLERS)}")
    ctls = _controllers(cfg, work, names)
    for name in names:
        kw = ctls[name]
        recs = runner.generate(rows, f"eval {name}", cfg.slow_tokens + cfg.answer_tokens + 64, **kw)
        _write_jsonl(work / f"eval_{name}.jsonl", recs)


def eval_posthoc(cfg: ReasoningEvalConfig, work: str | Path, runner: Runner | None = None) -> None:
    """The paper's released procedure: decide at prefill (>= 50 slow); for slow rows, score every checkpoint of
    the *finished* slow output; at the first one below 50 - 20, cut there, append the end marker and generate
    the answer again from the start (prompt and prefix re-processed)."""
    work = Path(work)
    runner = runner or Runner(cfg)
    rows = load_rows(cfg, "eval")
    fast, slow = _read_jsonl(work / "eval_fast.jsonl"), _read_jsonl(work / "eval_slow.jsonl")
    feats, token_ids = _load_features(work / "eval_features.npz")

    paper = KVClassifier.load(work / "clf_paper")
    p0 = paper.predict(feats["prompt"])
    pw = paper.predict(feats["windows"]) if len(feats["windows"]) else np.zeros(0)
    items, where, out = [], [], []
    for i, r in enumerate(rows):
        if p0[i] < 50.0:
            out.append({**fast[i], "posthoc": "fast", "tokens_all": fast[i]["tokens"]})
            continue
        mine = np.nonzero(feats["win_row"] == i)[0]
        hit = [j for j in mine if pw[j] < 30.0]
        if not hit:
            out.append({**slow[i], "posthoc": "slow", "tokens_all": slow[i]["tokens"]})
            continue
        t = int(feats["win_step"][hit[0]])
        items.append((r, token_ids[i][: t + 1] + runner.end_ids(r)))
        where.append(i)
        out.append(None)
    regen = runner.continue_from(items, "post-hoc regenerate", cfg.answer_tokens) if items else []
    for i, (r, prefix), g in zip(where, items, regen):
        n_final = len(prefix) + g["new_tokens"]
        out[i] = {"dataset": r["dataset"], "row": r["row"], "gold": r["gold"], "answer": g["answer"],
                  "correct": g["correct"], "tokens": n_final,
                  "tokens_all": slow[i]["tokens"] + len(runner.end_ids(r)) + g["new_tokens"],
                  "posthoc": "switched", "text": g["text"], "prefill_again": len(runner.prompt_ids(r)) + len(prefix)}
    _write_jsonl(work / "eval_posthoc.jsonl", out)


# ----------------------------------------------------------------------------------------------------------------
# Report


def _summ(recs: list[dict], key: str = "tokens") -> dict[str, dict[str, float]]:
    by: dict[str, list[dict]] = {}
    for r in recs:
        by.setdefault(r["dataset"], []).append(r)
    out = {d: {"accuracy": float(np.mean([r["correct"] for r in v])), "tokens": float(np.mean([r[key] for r in v])),
               "rows": len(v)} for d, v in sorted(by.items())}
    out["mixture"] = {"accuracy": float(np.mean([r["correct"] for r in recs])),
                      "tokens": float(np.mean([r[key] for r in recs])), "rows": len(recs)}
    return out


def _route(fast: list[dict], slow: list[dict], use_slow) -> list[dict]:
    return [dict(s if u else f) for f, s, u in zip(fast, slow, use_slow)]


def _expected(fast: list[dict], slow: list[dict], p_fast: float) -> list[dict]:
    """Random routing: each row fast with probability ``p_fast`` (expected accuracy and tokens, no sampling)."""
    return [{"dataset": f["dataset"], "correct": p_fast * f["correct"] + (1 - p_fast) * s["correct"],
             "tokens": p_fast * f["tokens"] + (1 - p_fast) * s["tokens"]} for f, s in zip(fast, slow)]


def report(cfg: ReasoningEvalConfig, work: str | Path, out: str | Path | None = None) -> dict:
    """Tables per dataset and mixture, the Pareto plot, ``results.json`` and ``results.md``."""
    work = Path(work)
    out = Path(out or work)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((work / "config.json").read_text())
    cfg = ReasoningEvalConfig(**meta["config"])  # the run's own settings (the report may run elsewhere)
    fast, slow = _read_jsonl(work / "eval_fast.jsonl"), _read_jsonl(work / "eval_slow.jsonl")
    feats, _ = _load_features(work / "eval_features.npz")
    strategies: dict[str, dict] = {}
    strategies["always-fast"] = _summ(fast)
    strategies["always-slow"] = _summ(slow)
    for b in cfg.budgets:
        p = work / f"eval_budget_{b}.jsonl"
        if p.exists():
            strategies[f"budget {b}"] = _summ(_read_jsonl(p))
    oracle = _route(fast, slow, [s["correct"] and not f["correct"] for f, s in zip(fast, slow)])
    fast_rates = {}
    for name in CONTROLLERS:
        p = work / f"eval_{name}.jsonl"
        if p.exists():
            recs = _read_jsonl(p)
            strategies[name.replace("_", " ")] = _summ(recs)
            fast_rates[name] = float(np.mean([r["start"] == "fast" for r in recs]))
            strategies[name.replace("_", " ")]["mixture"]["fast_start_rate"] = fast_rates[name]
            strategies[name.replace("_", " ")]["mixture"]["switched_rate"] = float(np.mean([bool(r["switches"])
                                                                                           for r in recs]))
    if (work / "clf_paper").exists():
        pp = KVClassifier.load(work / "clf_paper").predict(feats["prompt"])
        strategies["prefill-only router (paper)"] = _summ(_route(fast, slow, pp >= 50))
    if (work / "clf_gain").exists():
        g = KVClassifier.load(work / "clf_gain")
        strategies["prefill-only router (ours)"] = _summ(_route(fast, slow, g.predict(feats["prompt"]) >=
                                                                g.config.threshold))
    rate = fast_rates.get("online_ours", fast_rates.get("online_paper"))
    if rate is not None:
        strategies[f"random routing (fast {100 * rate:.0f} %)"] = _summ(_expected(fast, slow, rate))
    p = work / "eval_posthoc.jsonl"
    if p.exists():
        recs = _read_jsonl(p)
        strategies["post-hoc switching (paper; all decoded tokens)"] = _summ(recs, "tokens_all")
        strategies["post-hoc switching (final output only, as the paper counts)"] = _summ(recs)
    strategies["oracle router"] = _summ(oracle)
    datasets = [d for d in cfg.datasets if d in strategies["always-slow"]]
    result = {"model": cfg.model, "train_slice": meta["train"], "eval_slice": meta["eval"],
              "config": cfg.model_dump(), "strategies": strategies,
              "device": meta.get("device", "unknown")}
    tr = work / "train_report.json"
    if tr.exists():
        result["train_report"] = json.loads(tr.read_text())
    result["bar"] = _bar(strategies)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    md = markdown(result, datasets)
    (out / "results.md").write_text(md)
    plot(strategies, datasets, out / "pareto.png", cfg.budgets)
    print(md, flush=True)
    return result


def _bar(st: dict) -> dict:
    slow = st["always-slow"]["mixture"]
    ours = st.get("online ours", {}).get("mixture")
    if ours is None:
        return {}
    bud = sorted([(v["mixture"]["tokens"], v["mixture"]["accuracy"]) for k, v in st.items() if k.startswith("budget")]
                 + [(st["always-fast"]["mixture"]["tokens"], st["always-fast"]["mixture"]["accuracy"]),
                    (slow["tokens"], slow["accuracy"])])
    xs, ys = [b[0] for b in bud], [b[1] for b in bud]
    curve = float(np.interp(ours["tokens"], xs, ys))
    post = st.get("post-hoc switching (paper; all decoded tokens)", {}).get("mixture")
    return {"token_reduction_vs_slow": slow["tokens"] / max(ours["tokens"], 1e-9),
            "accuracy_change_points": 100 * (ours["accuracy"] - slow["accuracy"]),
            "budget_curve_accuracy_at_same_tokens": curve,
            "above_budget_curve_points": 100 * (ours["accuracy"] - curve),
            "posthoc_tokens": post["tokens"] if post else None,
            "posthoc_accuracy": post["accuracy"] if post else None,
            "meets_2x_at_1pt": bool(slow["tokens"] / max(ours["tokens"], 1e-9) >= 2
                                    and ours["accuracy"] >= slow["accuracy"] - 0.01)}


def markdown(result: dict, datasets: list[str]) -> str:
    st = result["strategies"]
    slow_tok = st["always-slow"]["mixture"]["tokens"]
    head = "| strategy | " + " | ".join(f"{d} acc % | {d} tokens" for d in datasets) + \
        " | mixture acc % | mixture tokens | x fewer than slow |"
    lines = [f"model `{result['model']}`, device {result['device']}; training slice {result['train_slice']}; "
             f"evaluation slice {result['eval_slice']} ({st['always-slow']['mixture']['rows']} rows). "
             "Tokens: mean generated tokens per question (forced cues and markers included).", "", head,
             "|" + "---|" * (2 * len(datasets) + 4)]
    for name, s in st.items():
        cells = [f"{100 * s[d]['accuracy']:.1f} | {s[d]['tokens']:.0f}" if d in s else "- | -" for d in datasets]
        m = s["mixture"]
        extra = ""
        if "fast_start_rate" in m:
            extra = f" (fast start {100 * m['fast_start_rate']:.0f} %, switched {100 * m['switched_rate']:.0f} %)"
        lines.append(f"| {name}{extra} | " + " | ".join(cells) +
                     f" | {100 * m['accuracy']:.1f} | {m['tokens']:.0f} | {slow_tok / max(m['tokens'], 1e-9):.2f} |")
    b = result.get("bar") or {}
    if b:
        lines += ["", f"Bar (online ours vs always-slow on the mixture): {b['token_reduction_vs_slow']:.2f}x fewer "
                  f"tokens, accuracy {b['accuracy_change_points']:+.1f} points; budget-only curve at the same tokens "
                  f"{100 * b['budget_curve_accuracy_at_same_tokens']:.1f} % ({b['above_budget_curve_points']:+.1f} "
                  "points above it)" + (f"; post-hoc switching {100 * b['posthoc_accuracy']:.1f} % at "
                                        f"{b['posthoc_tokens']:.0f} tokens (all decoded)" if b["posthoc_tokens"] else "")
                  + "."]
    tr = result.get("train_report")
    if tr:
        c = tr["calibration"]
        lines += ["", f"Training: {tr['rows']} rows, window {tr['window']}; labels {tr['label_counts']}; out-of-fold "
                  f"AUROC {tr['oof_auroc']}; calibrated thresholds gain {c['tau_gain']}, step {c['tau_step']} "
                  f"(train OOF: {100 * c['ours_accuracy_oof']:.1f} % at {c['ours_tokens_oof']:.0f} tokens vs slow "
                  f"{100 * c['slow_accuracy']:.1f} % at {c['slow_tokens']:.0f})."]
    return "\n".join(lines) + "\n"


def plot(st: dict, datasets: list[str], path: Path, budgets: list[int]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    panels = ["mixture"] + datasets
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5.6))
    axes = np.atleast_1d(axes)
    for ax, d in zip(axes, panels):
        curve = [("always-fast", st["always-fast"])] + [(k, v) for k, v in st.items() if k.startswith("budget")] + \
            [("always-slow", st["always-slow"])]
        pts = sorted((v[d]["tokens"], 100 * v[d]["accuracy"]) for _, v in curve if d in v)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color="grey", lw=1, label="budget-only curve")
        markers = "os^vD<>pP*Xh"
        for j, (k, v) in enumerate(st.items()):
            if d not in v or "as the paper counts" in k:
                continue
            label = k.replace("post-hoc switching (paper; all decoded tokens)", "post-hoc switching (paper)")
            ax.scatter(v[d]["tokens"], 100 * v[d]["accuracy"], s=36, marker=markers[j % len(markers)],
                       label=label, zorder=3)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("mean generated tokens")
        ax.set_ylabel("accuracy %")
        ax.set_title(d)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="upper left", bbox_to_anchor=(0, -0.15), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_all(cfg: ReasoningEvalConfig, work: str | Path, out: str | Path | None = None, llm=None) -> dict:
    """Every stage in one process."""
    random.seed(cfg.seed)
    runner = Runner(cfg, llm)
    collect(cfg, work, runner)
    train(cfg, work)
    eval_base(cfg, work, runner)
    eval_online(cfg, work, runner)
    eval_posthoc(cfg, work, runner)
    return report(cfg, work, out)
