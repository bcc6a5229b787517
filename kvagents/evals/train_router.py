"""``kvagents train router``: a fast/slow thinking router trained on your model and your data, with a held-out report.

For each row of a JSONL file (a question and its reference answer) the model answers twice, greedily: fast (the
answer cue forced at once) and slow (step-by-step thinking), with the same :class:`~kvagents.evals.reasoning.Runner`
and :class:`~kvagents.control.thinking.ReasoningController` as ``kvagents eval reasoning collect``. The slow run
captures the prompt's pooled KV window and, every ``every`` tokens, the last-w tokens' pooled KV; at each of those
checkpoints an early-exit answer (prefix + the end-of-thinking marker + a short answer) is graded too. Labels:
``gain`` (100 when only slow thinking is right) for the prefill head, ``step`` (100 when thinking on turns a wrong
early answer into a right final one) for the mid-generation head.

A seeded split by row keeps ``holdout`` of the rows out of training. On the training rows the two
:class:`~kvagents.signals.kv_classifier.KVClassifier` heads are cross-fitted (folds by row) and their thresholds (and a
thinking budget at a checkpoint) calibrated on the out-of-fold predictions: the fewest tokens at no more than
``tolerance`` accuracy points below always-slow. The router keeps the fold heads themselves (``ensemble``, the
default: its scores are the mean of the K fold heads' scores, the heads the thresholds were calibrated on; without
it, one gain and one step head refitted on all training rows, whose scores run higher than the out-of-fold ones the
thresholds were chosen on). The saved router's own predictions are reported on the held-out rows (``router``) against
always-fast, always-slow and the oracle router; the router's outcome is simulated from the recorded fast and slow runs
and checkpoints (as :meth:`~kvagents.evals.reasoning.Outcomes.simulate` does). The router
(:class:`~kvagents.signals.kv_classifier.KVRouter`) is saved as one trained-signal folder tied to the model's
fingerprint, with the report inside. ``seeds``: the held-out report for several random splits (by row, stratified by
dataset; mean and spread, per dataset too); the router saved is the first seed's.

The held-out report also simulates, from the checkpoints: the answer-convergence exit of
:class:`~kvagents.control.convergence.ConvergenceController` (stop at the first checkpoint where ``patience``
consecutive trial answers are equal and parsed; every look-ahead before it -- the forced end-of-thinking marker and
the trial answer's tokens -- is paid as generated tokens; ``convergence_every``: a look-ahead only every so many
tokens), the router with that exit calibrated jointly (``router + convergence``), thinking budgets, the router's rule
read by the mean of the cross-fitted fold heads (``fold ensemble``: the heads whose out-of-fold predictions the
thresholds were calibrated on) and by one head pair refitted on all training rows (``refit``), and whether ">= 3x fewer tokens than always-slow at <= 1 point below it" holds on
every split. ``auto_tolerance``: the calibration tolerance chosen by cross-fitting on the training rows only;
``train_fractions``: a learning curve (the same held-out rows, fewer training rows).

Records are appended to ``<out>.work/records.jsonl`` as each batch finishes (features in ``features/<row>.npz``,
written first), so a killed run continues where it stopped, and never records a row twice. ``from_work``: train
from a ``kvagents eval reasoning collect`` work folder (``train_fast.jsonl``, ``train_slow.jsonl``,
``train_features.npz``) without generating, e.g. a GPU collection turned into a router on the CPU.

Example:
    >>> from kvagents.evals.train_router import TrainRouterConfig
    >>> cfg = TrainRouterConfig(data="my.jsonl", question_field="q", answer_field="a", out="routers/mine")
    >>> # train_router(cfg)  ->  the report dict; the router is in routers/mine
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    import numpy as np

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


class TrainRouterConfig(BaseModel):
    """What ``kvagents train router`` does; every field is a command-line option of the same name."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description=f"registry name, Hugging Face id, folder or .gguf (default "
                              f"{DEFAULT_MODEL}; with --from-work: the work folder's model)")
    data: str | None = Field(None, description="JSONL file, one question per line (not with --from-work)")
    question_field: str = Field("question", description="field holding the question")
    answer_field: str = Field("answer", description="field holding the reference answer")
    grader: str = Field("gsm8k", description="gsm8k, math, choice, exact or python:module:function")
    out: str = Field(description="folder the router is written to")
    from_work: str | None = Field(None, description="train from this `kvagents eval reasoning collect` work folder "
                                  "instead of generating (its own format, tokens, every, window and layers are used)")
    rows: str | None = Field(None, pattern=r"^\d+:\d+$", description="START:END: only these rows of the file "
                             "(0-based, END excluded)")
    limit: int = Field(0, ge=0, description="only the first N rows (0: all)")
    holdout: float = Field(0.2, gt=0, lt=1, description="fraction of rows kept out of training for the report")
    seeds: list[int] = Field(default_factory=lambda: [0], description="split seeds: the held-out report for each "
                             "(mean and spread); the router saved is the first seed's")
    tolerance: float = Field(0.5, ge=-100, le=100, description="calibration: accuracy points below always-slow "
                             "allowed (negative: asks that much more accuracy than always-slow)")
    auto_tolerance: float | None = Field(None, ge=0, description="choose the calibration tolerance among "
                                         "--tolerances by cross-fitting on the training rows: the fewest tokens at "
                                         "a cross-fitted loss of at most this many points (instead of --tolerance)")
    tolerances: list[float] = Field(default_factory=lambda: [-2.0, -1.5, -1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5,
                                                             1.0], description="candidates for --auto-tolerance")
    convergence_patience: list[int] = Field(default_factory=lambda: [1, 2, 3, 4], description="answer-convergence "
                                            "exits simulated from the checkpoints: stop thinking once this many "
                                            "consecutive trial answers are equal (ConvergenceController's patience)")
    convergence_every: list[int] = Field(default_factory=list, description="tokens between the simulated "
                                         "convergence look-aheads: multiples of the checkpoints' every (default: "
                                         "every checkpoint)")
    budgets: list[int] = Field(default_factory=lambda: [64, 128, 256], description="thinking budgets reported "
                               "(generated tokens; the early exit at the checkpoint there)")
    train_fractions: list[float] = Field(default_factory=lambda: [1.0], description="learning curve: also train on "
                                         "these fractions of each split's training rows (e.g. 0.25 0.5 1)")
    folds: int = Field(5, ge=2, description="cross-fitting folds (by row) for the calibration")
    hidden: int = Field(512, ge=1, le=4096, description="hidden units of each head's MLP (the folder holds "
                        "folds x 2 heads of about (features + 2) x hidden numbers)")
    ensemble: bool = Field(True, description="save the cross-fitted fold heads (their mean score; the heads the "
                           "thresholds were calibrated on) as the router; --no-ensemble: one gain and one step head "
                           "refitted on all training rows")
    format: str = Field("plain", description="thinking format: plain (cues for instruct models) or qwen3")
    instruction: str | None = Field(None, description="appended to every question (default: by grader, e.g. "
                                    "'Put the final answer (a number) in \\boxed{}.' for gsm8k)")
    answer_cue: str | None = Field(None, description="forced to start an answer (default: by grader, e.g. "
                                   "'The final answer is $\\boxed{')")
    fast_tokens: int = Field(32, ge=1, description="answer tokens of a fast answer")
    slow_tokens: int = Field(512, ge=1, description="most generated tokens of slow thinking")
    answer_tokens: int = Field(32, ge=1, description="answer tokens after an early end of thinking")
    every: int = Field(32, ge=1, description="tokens between checkpoints (step predictions)")
    window: int = Field(64, ge=1, description="KV positions the heads read (lowered to the shortest prompt)")
    layers: int = Field(4, ge=1, description="last n attention layers the heads read")
    batch_prompts: int = Field(64, ge=1, description="questions decoded together (and recorded) per batch")
    dtype: str = "auto"
    device: str = "auto"

    @field_validator("format")
    @classmethod
    def _format(cls, v):
        from ..control.thinking import FORMATS

        if v not in FORMATS:
            raise ValueError(f"unknown thinking format {v!r}; use one of {', '.join(FORMATS)}")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if not v or len(set(v)) != len(v) or any(s < 0 or s >= 2**32 for s in v):
            raise ValueError(f"seeds must be distinct integers in [0, 2**32), at least one; got {v}")
        return v

    @field_validator("convergence_patience", "budgets", "convergence_every")
    @classmethod
    def _positive_list(cls, v, info):
        if any(x < 1 for x in v) or len(set(v)) != len(v):
            raise ValueError(f"{info.field_name} must be distinct integers >= 1, got {v}")
        return v

    @field_validator("train_fractions")
    @classmethod
    def _fractions(cls, v):
        if not v or any(not 0 < x <= 1 for x in v):
            raise ValueError(f"train_fractions must be in (0, 1], at least one; got {v}")
        return v

    @model_validator(mode="after")
    def _source(self):
        if (self.data is None) == (self.from_work is None):
            raise ValueError("give either --data (a JSONL file to generate on) or --from-work (a collected work "
                             "folder), exactly one of them")
        return self


# ----------------------------------------------------------------------------------------------------------------
# The user's task: prompts, cues and the grader in the shape reasoning.Runner reads


@dataclass(frozen=True)
class GradedTask:
    """A question set judged by a grader (see :func:`~kvagents.evals.train_probe.load_grader`); the shape of
    :class:`~kvagents.evals.reasoning.Task` that :class:`~kvagents.evals.reasoning.Runner` reads."""

    name: str
    grader: str
    instruction: str
    answer_cue: str
    grade: Any
    parse: Any = None

    def user_text(self, question: str) -> str:
        return f"{question}\n\n{self.instruction}" if self.instruction else question

    def judge(self, text: str, r: dict) -> tuple[str | None, bool]:
        try:
            return (self.parse(text) if self.parse else None), bool(self.grade(text, r["gold"]))
        except Exception as e:
            raise ValueError(f"grader {self.grader!r} raised on row {r['row']} ({type(e).__name__}: {e})") from e


def graded_task(cfg: TrainRouterConfig) -> GradedTask:
    """The task of ``cfg``: its grader, and its instruction and answer cue (or the grader's defaults)."""
    from .reasoning import TASKS
    from .train_probe import load_grader

    grade, parse = load_grader(cfg.grader)
    like = {"gsm8k": TASKS["gsm8k"], "math": TASKS["math500"], "choice": TASKS["commonsenseqa"]}.get(cfg.grader)
    instruction = cfg.instruction if cfg.instruction is not None else (
        like.instruction if like else "Give the final answer at the end.")
    cue = cfg.answer_cue if cfg.answer_cue is not None else (like.answer_cue if like else "The final answer is")
    return GradedTask("data", cfg.grader, instruction, cue, grade, parse)


# ----------------------------------------------------------------------------------------------------------------
# Records: collected here (resumable) or read from a reasoning work folder


#: the settings a record depends on: a work folder written with others is refused
RECORD_SETTINGS = ("model", "data", "question_field", "answer_field", "grader", "format", "instruction", "answer_cue",
                   "fast_tokens", "slow_tokens", "answer_tokens", "every", "window", "layers")


def _public(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.startswith("_")}


def _read_records(work: Path) -> dict[int, dict]:
    """The whole records of ``work`` whose features exist (the first of a row); rewrites the file with them."""
    from .train_probe import read_records

    return read_records(work, ".npz")


def _check_work(work: Path, settings: dict[str, Any], has_records: bool) -> dict[str, Any]:
    """Write ``meta.json`` on a work folder without records; on one with records, refuse other settings. Returns
    what is stored."""
    meta_path = work / "meta.json"
    if has_records and meta_path.exists():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        bad = [k for k in RECORD_SETTINGS if old.get(k) != settings.get(k)]
        if bad:
            diff = ", ".join(f"{k} {old.get(k)!r} there, {settings.get(k)!r} now" for k in bad)
            raise ValueError(f"the work folder {work} holds records made with other settings ({diff}); use the same "
                             "settings, another --out, or delete that folder to start again")
        return old
    meta_path.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return settings


def collect(cfg: TrainRouterConfig, rows: list[dict], runner, work: Path) -> tuple[list[dict], int, int]:
    """Fast and slow runs, features and early-exit labels of every row not yet recorded in ``work``. Returns the
    records of ``rows`` (in order), the classifier window and the slow cue's token count."""
    import numpy as np
    from tqdm.auto import tqdm

    from .reasoning import _fast, _slow_capture, label_checkpoints

    (work / "features").mkdir(parents=True, exist_ok=True)
    shortest = min(len(runner.prompt_ids(r)) for r in rows)
    cue = len(runner.fmt.token_ids(runner.tok)["slow_cue"])
    from ..signals.artifact import fingerprint

    settings = {k: getattr(cfg, k) for k in RECORD_SETTINGS if k != "model"}
    settings.update(model=fingerprint(runner.llm, None).describe(), instruction=runner.tasks["data"].instruction, answer_cue=runner.tasks["data"].answer_cue,
                    window_used=min(cfg.window, shortest), slow_cue_tokens=cue)
    done = _read_records(work)
    meta = _check_work(work, settings, bool(done))
    window = int(meta["window_used"])
    if shortest < window:
        raise ValueError(f"a prompt of {shortest} tokens is shorter than the window {window} the records of {work} "
                         "were made with; drop the short rows or start again with another --out")
    if window < cfg.window:
        print(f"classifier window lowered from {cfg.window} to {window} (the shortest prompt)", flush=True)
    todo = [r for r in rows if r["row"] not in done]
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="fast and slow runs", unit="question")
    with open(work / "records.jsonl", "a", encoding="utf-8") as out:
        for start in range(0, len(todo), cfg.batch_prompts):
            chunk = todo[start: start + cfg.batch_prompts]
            fast = _fast(runner, chunk, "fast", progress=False)
            slow = _slow_capture(runner, chunk, "slow", window, progress=False)
            label_checkpoints(runner, chunk, slow, cfg.answer_tokens, progress=False)
            for r, f, s in zip(chunk, fast, slow):
                feats = s["_features"]
                prompt = np.asarray(feats["prompt"], np.float32)
                win = feats["windows"]
                win = np.zeros((0, prompt.shape[0]), np.float32) if win is None else np.asarray(win, np.float32)
                np.savez(work / "features" / f"{r['row']}.npz", prompt=prompt, windows=win,
                         steps=np.asarray(feats["steps"], np.int64))
                rec = {"row": r["row"], "fast": _public(f), "slow": _public(s)}
                out.write(json.dumps(rec) + "\n")
                out.flush()
                done[r["row"]] = rec
                bar.update(1)
    bar.close()
    return [done[r["row"]] for r in rows], window, cue


@dataclass
class Collected:
    """Fast / slow records of N rows and their features: ``prompt`` ``[N, D]``, ``windows`` ``[M, D]`` with
    ``win_row`` (their row) in checkpoint order."""

    fast: list[dict]
    slow: list[dict]
    prompt: np.ndarray
    windows: np.ndarray
    win_row: np.ndarray

    def __post_init__(self) -> None:
        import numpy as np
        n = len(self.fast)
        if not (len(self.slow) == n == len(self.prompt)):
            raise ValueError(f"{len(self.fast)} fast records, {len(self.slow)} slow records and {len(self.prompt)} "
                             "prompt features: they must be one per row")
        ckpts = [len(s["checkpoints"]) for s in self.slow]
        if len(self.windows) != sum(ckpts) or len(self.win_row) != len(self.windows) or (
                len(self.win_row) and not np.array_equal(self.win_row, np.repeat(np.arange(n), ckpts))):
            raise ValueError(f"{len(self.windows)} window features for {sum(ckpts)} checkpoints of the slow records: "
                             "they must be one per checkpoint, in row order")

    @property
    def names(self) -> list[str]:
        return [f"{f['dataset']}:{f['row']}" for f in self.fast]

    def subset(self, idx) -> Collected:
        import numpy as np
        idx = np.asarray(idx, dtype=np.int64)
        keep = np.isin(self.win_row, idx)
        renum = np.full(len(self.fast), -1)
        renum[idx] = np.arange(len(idx))
        order = np.argsort(renum[self.win_row[keep]], kind="stable")
        return Collected([self.fast[i] for i in idx], [self.slow[i] for i in idx], self.prompt[idx],
                         self.windows[keep][order], renum[self.win_row[keep]][order])


def _collected(records: list[dict], work: Path) -> Collected:
    import numpy as np
    prompt, windows, win_row = [], [], []
    for i, rec in enumerate(records):
        z = np.load(work / "features" / f"{rec['row']}.npz")
        prompt.append(z["prompt"])
        windows.append(z["windows"])
        win_row += [i] * len(z["windows"])
    d = prompt[0].shape[0]
    return Collected([r["fast"] for r in records], [r["slow"] for r in records], np.stack(prompt),
                     np.concatenate(windows) if windows else np.zeros((0, d), np.float32),
                     np.asarray(win_row, dtype=np.int64))


def read_work(work: str | Path) -> tuple[Collected, dict[str, Any]]:
    """The training records of a ``kvagents eval reasoning collect`` work folder and its settings (``config``: the
    run's ``ReasoningEvalConfig`` fields, ``window``, ``slow_cue_tokens``)."""
    import numpy as np

    from .reasoning import _load_features, _read_jsonl

    work = Path(work)
    need = ["train_fast.jsonl", "train_slow.jsonl", "train_features.npz", "window.json"]
    missing = [f for f in need if not (work / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{work} is not a collected reasoning work folder: it lacks {', '.join(missing)}; "
                                "run `kvagents eval reasoning collect --work DIR` first (or pass that folder)")
    feats, _ = _load_features(work / "train_features.npz")
    for k in ("prompt", "windows", "win_row"):
        if k not in feats:
            raise ValueError(f"{work / 'train_features.npz'} has no {k!r} array; collect it again")
    data = Collected(_read_jsonl(work / "train_fast.jsonl"), _read_jsonl(work / "train_slow.jsonl"),
                     feats["prompt"].astype(np.float32), feats["windows"].astype(np.float32),
                     feats["win_row"].astype(np.int64))
    win = json.loads((work / "window.json").read_text())
    conf = json.loads((work / "config.json").read_text()).get("config", {}) if (work / "config.json").is_file() else {}
    from .reasoning import ReasoningEvalConfig

    conf = ReasoningEvalConfig(**conf).model_dump()  # the run's settings, defaults where it wrote none
    return data, {"config": conf, "window": int(win["window"]), "slow_cue_tokens": int(win.get("slow_cue_tokens", 0))}


# ----------------------------------------------------------------------------------------------------------------
# Training and the held-out report


def labels(data: Collected) -> tuple[np.ndarray, np.ndarray]:
    """``(gain labels [N], step labels [M])`` as ``kvagents eval reasoning train`` makes them."""
    import numpy as np

    from .reasoning import gain_label, step_labels

    y_gain = np.array([gain_label(f["correct"], s["correct"]) for f, s in zip(data.fast, data.slow)], dtype=float)
    return y_gain, step_labels(data.slow, data.win_row)


# ----------------------------------------------------------------------------------------------------------------
# Strategies simulated from the recorded runs


class Trials:
    """The recorded outcomes of some rows, as arrays, and every strategy simulated from them.

    Fast / slow runs: ``fc``, ``ft``, ``sc``, ``st`` (correct, generated tokens) ``[N]``. Checkpoints ``[N, C]``
    (``valid`` where the slow run reached them): the early exit's ``cc`` / ``ct`` (correct, tokens of the whole
    early-exit output), the checkpoint's ``step``, the step head's prediction ``pred`` (``inf`` without one), its
    look-ahead cost ``la`` (the forced end-of-thinking marker and the trial answer's tokens: what
    :class:`~kvagents.control.convergence.ConvergenceController` generates on a fork there) and ``streak``: how many
    consecutive trial answers, ending there, are equal (0 for an unparsed one; the controller's count).
    """

    def __init__(self, fast: list[dict], slow: list[dict], step_pred: list[np.ndarray] | None = None) -> None:
        import numpy as np

        from .reasoning import Outcomes

        o = Outcomes(fast, slow, step_pred)
        self.fc, self.ft, self.sc, self.st = o.fc, o.ft, o.sc, o.st
        self.cc, self.ct, self.valid, self.pred = o.cc, o.ct, o.valid, o.pred
        n, C = self.cc.shape
        self.step = np.full((n, C), np.iinfo(np.int64).max, dtype=np.int64)
        self.la = np.zeros((n, C))
        self.streak = np.zeros((n, C), dtype=np.int64)
        self._answers = [[c.get("answer") for c in s["checkpoints"]] for s in slow]
        for i, s in enumerate(slow):
            prev, run = None, 0
            for j, c in enumerate(s["checkpoints"]):
                a = c.get("answer")
                run = 0 if a is None else (run + 1 if a == prev else 1)
                prev = a
                self.streak[i, j], self.step[i, j] = run, c["step"]
                self.la[i, j] = c["tokens"] - (c["step"] + 1)
        self._strided: dict[int, tuple] = {1: (self.streak, self.la)}

    def __len__(self) -> int:
        return len(self.fc)

    def lookaheads(self, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``(streak, look-ahead cost)`` ``[N, C]`` when a look-ahead runs only at every ``stride``-th checkpoint
        (0 at the others): the trial answers compared are those of the look-aheads that ran."""
        import numpy as np

        if stride not in self._strided:
            n, C = self.cc.shape
            streak, la = np.zeros((n, C), dtype=np.int64), np.zeros((n, C))
            cols = np.arange(stride - 1, C, stride)
            la[:, cols] = self.la[:, cols]
            for i in range(n):
                prev, run = None, 0
                for j in cols:
                    if not self.valid[i, j]:
                        break
                    a = self._answers[i][j]
                    run = 0 if a is None else (run + 1 if a == prev else 1)
                    prev = a
                    streak[i, j] = run
            self._strided[stride] = (streak, la)
        return self._strided[stride]

    def exit(self, tau_step: float = -math.inf, cap: int | None = None, patience: int | None = None,
             budget: int | None = None, final_lookahead: bool = False, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Per-row ``(correct, tokens)`` of slow thinking that stops at the first checkpoint where the step
        prediction is below ``tau_step``, at checkpoint index ``cap``, at the first checkpoint at or past ``budget``
        generated tokens, or (``patience``) where that many consecutive trial answers are equal and not ``None``;
        the answer is that checkpoint's early exit. With ``patience`` every look-ahead before the stop is cost too
        (a row that never stops: the slow run plus all its look-aheads); ``final_lookahead``: also the one that
        converged (ConvergenceController forces the answer again on the main sequence instead of keeping the
        fork). ``stride``: a look-ahead only at every ``stride``-th checkpoint (see :meth:`lookaheads`)."""
        return self._exit(tau_step, cap, patience, budget, final_lookahead, stride)[:2]

    def _exit(self, tau_step, cap, patience, budget, final_lookahead, stride=1):
        import numpy as np

        n, C = self.cc.shape
        if C == 0:
            return self.sc.copy(), self.st.copy(), np.zeros(n, bool)
        other = self.valid & (self.pred < tau_step)
        if cap is not None and cap < C:
            other[:, cap] |= self.valid[:, cap]
        if budget is not None:
            other |= self.valid & (self.step + 1 >= budget)
        streak, la = self.lookaheads(stride) if patience else (None, None)
        conv = self.valid & (streak >= patience) if patience else np.zeros_like(other)
        stop = other | conv
        stopped, first, rows = stop.any(1), stop.argmax(1), np.arange(n)
        c = np.where(stopped, self.cc[rows, first], self.sc)
        t = np.where(stopped, self.ct[rows, first], self.st)
        if patience:
            before = np.cumsum(la, 1) - la  # the look-aheads at the checkpoints before each one
            extra = before[rows, first]
            if final_lookahead:
                extra = extra + np.where(conv[rows, first] & ~other[rows, first], la[rows, first], 0.0)
            t = t + np.where(stopped, extra, la.sum(1))
        return c, t, stopped

    def rule(self, pred_gain: np.ndarray, rule: Rule, final_lookahead: bool = False):
        """``(correct, tokens, fast, stopped early)`` per row of a calibrated rule: fast when the gain prediction is
        below ``rule.tau_gain``, else slow with :meth:`exit`."""
        import numpy as np

        c, t, stopped = self._exit(rule.tau_step, rule.cap, rule.patience, None, final_lookahead, rule.stride)
        fast = np.asarray(pred_gain) < rule.tau_gain
        return np.where(fast, self.fc, c), np.where(fast, self.ft, t), fast, ~fast & stopped


@dataclass(frozen=True)
class Rule:
    """A calibrated decision rule: fast below ``tau_gain``; thinking stops where the step prediction is below
    ``tau_step``, at checkpoint ``cap`` (a thinking budget) or once ``patience`` trial answers agree (look-aheads at
    every ``stride``-th checkpoint)."""

    tau_gain: float
    tau_step: float
    cap: int | None
    patience: int | None
    stride: int = 1

    def as_dict(self, every: int, cue: int) -> dict[str, Any]:
        from .reasoning import _clip

        return {"tau_gain": _clip(self.tau_gain), "tau_step": _clip(self.tau_step),
                "thinking_budget": None if self.cap is None else (self.cap + 1) * every - cue,
                "checkpoint_cap": self.cap, "patience": self.patience,
                "lookahead_every": None if self.patience is None else self.stride * every}


class RuleGrid:
    """Every rule of the calibration grid (gain and step thresholds at the predictions' 5 % quantiles, a thinking
    budget at each checkpoint, each ``(patience, stride)`` of ``exits`` or none) with its correct answers and tokens summed per group of rows (the
    cross-fitting folds), so that a rule can be chosen on some folds and scored on another."""

    def __init__(self, tr: Trials, pred_gain: np.ndarray, pred_step: np.ndarray,
                 exits: list[tuple[int, int] | None], groups: np.ndarray) -> None:
        import numpy as np

        q = np.linspace(0, 100, 21)
        tp = sorted(set([-math.inf] + [float(x) for x in np.percentile(pred_gain, q)] + [math.inf]))
        ts = sorted(set([-math.inf] + ([float(x) for x in np.percentile(pred_step, q)] if len(pred_step) else [])))
        caps = [None] + list(range(1, tr.valid.shape[1]))
        groups = np.asarray(groups)
        self.n_groups = int(groups.max()) + 1
        onehot = np.eye(self.n_groups)[groups]  # [N, G]
        self.counts = onehot.sum(0)
        self.slow = tr.sc.astype(float) @ onehot
        fast = np.stack([np.asarray(pred_gain) < a for a in tp])  # [P, N]
        rules, sc, st = [], [], []
        for e in exits:
            k, stride = e if e is not None else (None, 1)
            for b in ts:
                for m in caps:
                    c, t = tr.exit(b, m, k, stride=stride)
                    sc.append(np.where(fast, tr.fc, c).astype(float) @ onehot)
                    st.append(np.where(fast, tr.ft, t) @ onehot)
                    rules += [Rule(a, b, m, k, stride) for a in tp]
        self.rules, self.sc, self.st = rules, np.concatenate(sc), np.concatenate(st)
        self.converges = np.array([r.patience is not None for r in rules])

    def choose(self, tolerance: float, groups=None, convergence: bool = True) -> int:
        """The rule with the fewest tokens on ``groups`` (all: ``None``) at accuracy >= always-slow - ``tolerance``
        points there (the most accurate one when none is, a negative tolerance asking more than always-slow);
        ``convergence=False``: only rules without the convergence exit."""
        import numpy as np

        g = np.arange(self.n_groups) if groups is None else np.asarray(groups)
        n = self.counts[g].sum()
        acc, tok = self.sc[:, g].sum(1) / n, self.st[:, g].sum(1) / n
        allowed = np.ones(len(self.rules), bool) if convergence else ~self.converges
        ok = allowed & (acc >= self.slow[g].sum() / n - tolerance / 100 - 1e-12)
        if not ok.any():
            cand = np.nonzero(allowed)[0]
            return int(cand[np.lexsort((tok[cand], -acc[cand]))[0]])
        cand = np.nonzero(ok)[0]
        return int(cand[np.lexsort((-acc[cand], tok[cand]))[0]])

    def cross_fit_tolerance(self, tolerances: list[float], target: float, convergence: bool = True) -> dict[str, Any]:
        """For each of ``tolerances``: per group, the rule chosen on the other groups, scored on that group; pooled
        over the groups, its accuracy loss vs always-slow (points) and tokens. Picks the tolerance with the fewest
        tokens at a loss <= ``target`` points (the one with the least loss when none is)."""
        n = self.counts.sum()
        table = []
        for tol in tolerances:
            c = t = 0.0
            for k in range(self.n_groups):
                g = self.choose(tol, [j for j in range(self.n_groups) if j != k], convergence)
                c, t = c + self.sc[g, k], t + self.st[g, k]
            table.append({"tolerance": tol, "loss_points": float(100 * (self.slow.sum() - c) / n),
                          "tokens": float(t / n)})
        ok = [r for r in table if r["loss_points"] <= target + 1e-9]
        best = min(ok, key=lambda r: (r["tokens"], r["loss_points"])) if ok else min(
            table, key=lambda r: (r["loss_points"], r["tokens"]))
        return {"target_points": target, "chosen": best["tolerance"], "table": table}


def _summary(c, t) -> dict[str, float]:
    import numpy as np

    return {"accuracy": float(np.mean(c)), "tokens": float(np.mean(t))}


def held_out_table(tr: Trials, pred_gain: np.ndarray, rules: dict[str, Rule], exits: list[tuple[int, int]],
                   budgets: list[int], every: int = 1) -> dict[str, dict[str, float]]:
    """Accuracy and mean generated tokens on the rows of ``tr`` (step predictions of the final head set) of:
    always-fast, always-slow, each calibrated rule of ``rules`` (``"router"``, ``"router + convergence"``), the
    answer-convergence exit alone at each ``(patience, stride)`` of ``exits`` (every question thinks; look-aheads
    counted; named by ``every * stride`` tokens between look-aheads), thinking
    budgets stopping at the checkpoints at ``budgets`` generated tokens, and the oracle router (slow only where only
    slow is right). ``tokens_controller``: the tokens when the converged look-ahead's answer is generated again on
    the main sequence, as ConvergenceController does."""
    import numpy as np

    res = {"always-fast": _summary(tr.fc, tr.ft), "always-slow": _summary(tr.sc, tr.st)}
    for name, rule in rules.items():
        c, t, fast, early = tr.rule(pred_gain, rule)
        res[name] = {**_summary(c, t), "fast_rate": float(fast.mean()), "stopped_early_rate": float(early.mean())}
        if rule.patience:
            res[name]["tokens_controller"] = float(tr.rule(pred_gain, rule, final_lookahead=True)[1].mean())
    for k, stride in exits:
        c, t = tr.exit(patience=k, stride=stride)
        name = f"convergence, patience {k}" + ("" if len({x[1] for x in exits}) < 2 else f", every {stride * every}")
        res[name] = {**_summary(c, t), "tokens_controller": float(
            tr.exit(patience=k, final_lookahead=True, stride=stride)[1].mean())}
    for b in budgets:
        res[f"budget {b}"] = _summary(*tr.exit(budget=b))
    oracle_slow = tr.sc & ~tr.fc
    res["oracle router"] = {**_summary(tr.fc | tr.sc, np.where(oracle_slow, tr.st, tr.ft)),
                            "fast_rate": float((~oracle_slow).mean())}
    slow_acc, slow_tok = res["always-slow"]["accuracy"], res["always-slow"]["tokens"]
    for v in res.values():
        v["x_fewer"] = slow_tok / max(v["tokens"], 1e-9)
        v["points"] = 100 * (v["accuracy"] - slow_acc)
    return res


def cross_fit_heads(tr: Collected, y_gain: np.ndarray, y_step: np.ndarray, folds: np.ndarray, n_folds: int, kc,
                    fit: dict, progress: bool = True) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Out-of-fold predictions of the gain and step heads, folds by row (as
    :func:`~kvagents.evals.reasoning.cross_fit`), and the fold heads themselves: ``(oof, {"gain": [...], "step":
    [...]})``. A fold whose labels miss a class fits no head there (its predictions stay 0)."""
    import numpy as np
    from tqdm.auto import tqdm

    from ..signals.kv_classifier import KVClassifier

    n = len(tr.fast)
    oof = {"gain": np.zeros(n), "step": np.zeros(len(y_step))}
    models: dict[str, list] = {"gain": [], "step": []}
    for k in tqdm(range(n_folds), desc="cross-fit", disable=not progress):
        trn, te = folds != k, folds == k
        wtr, wte = np.isin(tr.win_row, np.nonzero(trn)[0]), np.isin(tr.win_row, np.nonzero(te)[0])
        if 0 < y_gain[trn].sum() < 100 * trn.sum():
            m, _ = KVClassifier.fit(tr.prompt[trn], y_gain[trn], kc, balance=True, **fit)
            oof["gain"][te] = m.predict(tr.prompt[te])
            models["gain"].append(m)
        if wtr.sum() >= 4 and 0 < y_step[wtr].sum() < 100 * wtr.sum():
            m, _ = KVClassifier.fit(tr.windows[wtr], y_step[wtr], kc, balance=True, batch_size=1024, **fit)
            oof["step"][wte] = m.predict(tr.windows[wte])
            models["step"].append(m)
    return oof, models


def _mean_pred(models: list, x: np.ndarray) -> np.ndarray:
    import numpy as np

    if not models or not len(x):
        return np.zeros(len(x))
    return np.mean([m.predict(x) for m in models], axis=0)


def fit_split(data: Collected, train_i, held_i, kc, settings, *, folds: int, seed: int, device: str = "cpu",
              progress: bool = True, patiences: list[int] = (), strides: list[int] = (1,), budgets: list[int] = (),
              auto_tolerance: float | None = None, tolerances: list[float] = (),
              ensemble: bool = True) -> tuple[Any, dict[str, Any]]:
    """Cross-fit on rows ``train_i``; calibrate the router (gain and step thresholds, a thinking budget) and the
    router with the convergence exit (also its patience, and a look-ahead at every ``stride``-th checkpoint for one
    of ``strides``) on the out-of-fold predictions, at ``settings.tolerance``
    or, with ``auto_tolerance``, at the one of ``tolerances`` whose cross-fitted loss on the training rows is at most
    that many points; the router's heads are the fold heads (``ensemble``) or refitted on all rows ``train_i``;
    report on rows ``held_i`` (``router``: the returned router's own predictions). Returns the
    :class:`~kvagents.signals.kv_classifier.KVRouter` and ``{"calibration", "train", "held_out", ...}``."""
    import numpy as np

    from ..signals.kv_classifier import KVRouter
    from .reasoning import _auroc, _folds, fit_router_heads

    tr = data.subset(train_i)
    y_gain, y_step = labels(tr)
    n = len(tr.fast)
    fit = dict(seed=seed, device=device, max_epochs=300, patience=25)
    fold = _folds(n, folds, seed)
    oof, fold_heads = cross_fit_heads(tr, y_gain, y_step, fold, folds, kc, fit, progress)
    trials = Trials(tr.fast, tr.slow, [oof["step"][tr.win_row == i] for i in range(n)])
    exits = [(k, m) for m in strides for k in patiences]
    grid = RuleGrid(trials, oof["gain"], oof["step"], [None, *exits], fold)
    families = {"router": False, **({"router + convergence": True} if exits else {})}
    rules, cal = {}, {}
    for name, allowed in families.items():
        tol = settings.tolerance
        chosen = None
        if auto_tolerance is not None:
            chosen = grid.cross_fit_tolerance(list(tolerances), auto_tolerance, allowed)
            tol = chosen["chosen"]
        g = grid.choose(tol, None, allowed)
        rules[name] = grid.rules[g]
        cnt = grid.counts.sum()
        cal[name] = {**rules[name].as_dict(settings.every, settings.cue), "tolerance": tol,
                     "oof_accuracy": float(grid.sc[g].sum() / cnt), "oof_tokens": float(grid.st[g].sum() / cnt),
                     **({"tolerance_cross_fit": chosen} if chosen else {})}
    r = rules["router"]
    calibration = {"slow_accuracy": float(trials.sc.mean()), "slow_tokens": float(trials.st.mean()),
                   "fast_accuracy": float(trials.fc.mean()), **cal["router"],
                   "ours_accuracy_oof": cal["router"]["oof_accuracy"], "ours_tokens_oof": cal["router"]["oof_tokens"]}
    if "router + convergence" in cal:
        calibration["with_convergence"] = cal["router + convergence"]
    heads = fit_router_heads(tr.prompt, y_gain, tr.windows, y_step, kc, r.tau_gain, r.tau_step, fit)
    rule = settings.router(calibration["tau_gain"], calibration["tau_step"], calibration["thinking_budget"],
                           cal["router"]["tolerance"])
    refit = KVRouter(heads["gain"][0], heads["step"][0] if "step" in heads else None, rule)
    router = refit
    if ensemble and fold_heads["gain"]:  # a fold whose labels miss a class has no head (none at all: the refit)
        for name, tau in (("gain", r.tau_gain), ("step", r.tau_step)):
            for m in fold_heads[name]:
                m.config = m.config.model_copy(update={"labels": name, "threshold": float(tau)})
        router = KVRouter(fold_heads["gain"], fold_heads["step"] or None, rule)
    train = {"rows": n, "gain_positive": int(y_gain.sum() / 100), "step_samples": int(len(y_step)),
             "step_positive": int(y_step.sum() / 100), "step_head": router.step_head is not None,
             "router_heads": {"gain": len(router.gain_heads), "step": len(router.step_heads),
                              "kind": "fold ensemble" if router is not refit else "refit"},
             "oof_auroc": {"gain": _auroc(oof["gain"], y_gain >= 50),
                           "step": _auroc(oof["step"], y_step >= 50) if len(y_step) else None}}
    # held-out predictions: the router returned (and saved), read through the object itself (what a user of it
    # gets), then the mean of the fold heads (the heads whose out-of-fold predictions the thresholds were calibrated
    # on) and the heads refitted on all training rows
    hd = data.subset(held_i)

    def predictions(rt) -> tuple[np.ndarray, np.ndarray]:
        ps = rt.predict_step(hd.windows) if (len(hd.windows) and rt.step_head is not None) else \
            np.zeros(len(hd.windows))
        return rt.predict(hd.prompt), ps

    preds = {"": predictions(router),
             ", fold ensemble": (_mean_pred(fold_heads["gain"], hd.prompt), _mean_pred(fold_heads["step"], hd.windows)),
             ", refit": predictions(refit)}

    def table(rows: list[int]) -> dict[str, dict[str, float]]:
        res = None
        for suffix, (pg, ps) in preds.items():
            per_row = [ps[hd.win_row == i] for i in rows]
            t = held_out_table(Trials([hd.fast[i] for i in rows], [hd.slow[i] for i in rows], per_row), pg[rows],
                               rules, exits, list(budgets), settings.every)
            if res is None:
                res = t
            else:  # the rules again, with the other predictions, after the first set
                keys = list(res)
                at = max(keys.index(k + x) for k in rules for x in preds if k + x in res) + 1
                extra = {k + suffix: t[k] for k in rules}
                res = {**{k: res[k] for k in keys[:at]}, **extra, **{k: res[k] for k in keys[at:]}}
        return {**res, "rows": len(rows)}

    held = table(list(range(len(hd.fast))))
    rep = {"seed": seed, "calibration": calibration, "train": train, "held_out": held}
    datasets = sorted({f["dataset"] for f in hd.fast})
    if len(datasets) > 1:
        rep["held_out_by_dataset"] = {d: table([i for i, f in enumerate(hd.fast) if f["dataset"] == d])
                                      for d in datasets}
    return router, rep


@dataclass
class _Settings:
    """What the router records of the runs it was trained on (reasoning work folder or this command)."""

    format: str
    every: int
    fast_tokens: int
    slow_tokens: int
    answer_tokens: int
    tolerance: float
    cue: int
    instruction: str | None = None
    answer_cue: str | None = None

    def router(self, tau_gain: float, tau_step: float, budget: int | None, tolerance: float | None = None):
        from ..signals.kv_classifier import KVRouterConfig

        return KVRouterConfig(tau_gain=tau_gain, tau_step=tau_step, thinking_budget=budget, format=self.format,
                              every=self.every, fast_tokens=self.fast_tokens, slow_tokens=self.slow_tokens,
                              answer_tokens=self.answer_tokens,
                              tolerance=self.tolerance if tolerance is None else tolerance,
                              instruction=self.instruction, answer_cue=self.answer_cue)


def split_by_dataset(datasets: list[str], holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split by row, stratified by dataset: ``round(holdout * rows)`` of each dataset held out. One dataset:
    the same split as :func:`~kvagents.evals.train_probe.split_rows`."""
    import random

    rng = random.Random(seed)
    train, held = [], []
    for d in sorted(set(datasets)):
        order = [i for i, x in enumerate(datasets) if x == d]
        rng.shuffle(order)
        k = round(len(order) * holdout)
        held += order[:k]
        train += order[k:]
    if len(held) < 2 or len(train) < 2:
        raise ValueError(f"{len(datasets)} rows are too few for a held-out split of {holdout:.0%} (each side needs "
                         ">= 2 rows); add rows or change --holdout")
    return sorted(train), sorted(held)


def subsample(datasets: list[str], rows: list[int], fraction: float, seed: int) -> list[int]:
    """``fraction`` of ``rows`` per dataset, seeded; a smaller fraction's rows are part of a larger one's."""
    import random

    if fraction >= 1:
        return list(rows)
    rng = random.Random(seed + 7919)
    out = []
    for d in sorted({datasets[i] for i in rows}):
        mine = [i for i in rows if datasets[i] == d]
        rng.shuffle(mine)
        out += mine[: max(2, round(len(mine) * fraction))]
    return sorted(out)


_STATS = ("accuracy", "tokens", "x_fewer", "points")


def _stats(v) -> dict[str, float]:
    import numpy as np

    v = np.asarray(v, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}


def _spread_of(tables: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    return {name: {k: _stats([t[name][k] for t in tables]) for k in _STATS}
            for name in tables[0] if name != "rows"}


def _spread(splits: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    return _spread_of([s["held_out"] for s in splits])


def acceptance(splits: list[dict], factor: float = 3.0, points: float = 1.0) -> dict[str, dict[str, Any]]:
    """Per strategy, whether on the mixture it used >= ``factor`` x fewer tokens than always-slow at <= ``points``
    accuracy points below it on every split."""
    out = {}
    for name in splits[0]["held_out"]:
        if name in ("rows", "always-slow"):
            continue
        per = [(s["held_out"][name]["x_fewer"], s["held_out"][name]["points"]) for s in splits]
        out[name] = {"holds": all(x >= factor and p >= -points for x, p in per),
                     "x_fewer": [x for x, _ in per], "points": [p for _, p in per]}
    return out


def _check_dim(data: Collected, kc, fp) -> None:
    layers = kc.resolve_layers(fp.attention_layers, fp.num_layers)
    want = kc.feature_dim(len(layers), fp.kv_heads, fp.head_dim)
    if data.prompt.shape[1] != want:
        raise ValueError(f"the records hold {data.prompt.shape[1]} features per row but {fp.describe()} gives {want} "
                         f"({len(layers)} layers x {fp.kv_heads} KV heads x {fp.head_dim} x {kc.parts}): they were "
                         "collected on another model; pass that model with --model")


def train_router(cfg: TrainRouterConfig, llm=None) -> dict[str, Any]:
    """Collect (or read ``from_work``), train, calibrate, report and save (see the module docstring); returns the
    report. ``llm``: a ``KVModel`` to use instead of loading ``cfg.model``."""
    import torch

    from ..model import KVModel
    from ..signals.artifact import fingerprint
    from ..signals.kv_classifier import KVClassifierConfig
    from .reasoning import Runner, kv_config
    from .train_probe import _rows, split_rows

    out = Path(cfg.out)
    if cfg.from_work is not None:
        data, info = read_work(cfg.from_work)
        split_rows(len(data.fast), cfg.holdout, cfg.seeds[0])  # too few rows: refused before loading the model
        conf = info["config"]
        llm = llm or KVModel.from_pretrained(cfg.model or conf["model"], dtype=cfg.dtype, device=cfg.device)
        window = info["window"]
        kc = KVClassifierConfig(layers=conf["layers"], window=window, hidden=cfg.hidden)
        settings = _Settings(conf["format"], conf["every"], conf["fast_tokens"], conf["slow_tokens"],
                             conf["answer_tokens"], cfg.tolerance, info["slow_cue_tokens"])
        source = {"from_work": str(cfg.from_work), "datasets": conf.get("datasets"), "model_collected": conf["model"]}
    else:
        task = graded_task(cfg)
        rows = [{"dataset": "data", "row": r["row"], "question": r["question"], "gold": r["reference"]}
                for r in _rows(cfg)]
        split_rows(len(rows), cfg.holdout, cfg.seeds[0])  # too few rows: refused before any generation
        run_cfg = cfg.model_copy(update={"model": cfg.model or DEFAULT_MODEL})
        runner = Runner(run_cfg, llm, tasks={"data": task})
        llm = runner.llm
        records, window, cue = collect(cfg, rows, runner, out.with_name(out.name + ".work"))
        data = _collected(records, out.with_name(out.name + ".work"))
        kc = kv_config(cfg, window).model_copy(update={"hidden": cfg.hidden})
        settings = _Settings(cfg.format, cfg.every, cfg.fast_tokens, cfg.slow_tokens, cfg.answer_tokens,
                             cfg.tolerance, cue, task.instruction, task.answer_cue)
        source = {"data": cfg.data, "question_field": cfg.question_field, "answer_field": cfg.answer_field,
                  "grader": cfg.grader, "rows": cfg.rows, "limit": cfg.limit}
    try:
        fp = fingerprint(llm, None)
    except ValueError as e:
        if cfg.from_work is None or cfg.model is not None:
            raise
        raise ValueError(f"{e} (the model recorded in {cfg.from_work}; pass --model with the same model as it is "
                         "here)") from None
    _check_dim(data, kc, fp)
    dev = "cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
    n = len(data.fast)
    ds = [f["dataset"] for f in data.fast]
    bad = [v for v in cfg.convergence_every if v % settings.every]
    if bad:
        raise ValueError(f"--convergence-every {bad} are not multiples of the checkpoints' every ({settings.every})")
    strides = sorted({v // settings.every for v in cfg.convergence_every} or {1})
    fractions = sorted(set(cfg.train_fractions) | {1.0})
    from tqdm.auto import tqdm

    kw = dict(folds=cfg.folds, device=dev, progress=len(cfg.seeds) < 2 and len(fractions) < 2,
              patiences=list(cfg.convergence_patience), strides=strides, budgets=list(cfg.budgets),
              auto_tolerance=cfg.auto_tolerance, tolerances=list(cfg.tolerances), ensemble=cfg.ensemble)
    splits, curve, router = [], {f: [] for f in fractions if f < 1}, None
    jobs = [(s, f) for s in cfg.seeds for f in fractions]
    for seed, frac in tqdm(jobs, desc="train and report per split", unit="fit", disable=len(jobs) < 2):
        train_i, held_i = split_by_dataset(ds, cfg.holdout, seed)
        mine = subsample(ds, train_i, frac, seed)
        r, rep = fit_split(data, mine, held_i, kc, settings, seed=seed, **kw)
        if frac < 1:
            curve[frac].append(rep)
            continue
        rep["train_rows"], rep["holdout_rows"] = [data.names[i] for i in train_i], [data.names[i] for i in held_i]
        splits.append(rep)
        router = router or r
    first = splits[0]
    report = {"rows": n, "holdout": cfg.holdout, "tolerance": cfg.tolerance, "auto_tolerance": cfg.auto_tolerance,
              "window": window, "every": settings.every,
              "held_out": first["held_out"], "calibration": first["calibration"], "train": first["train"],
              **({"held_out_by_dataset": first["held_out_by_dataset"]} if "held_out_by_dataset" in first else {}),
              "seeds": list(cfg.seeds),
              "splits": [{k: v for k, v in s.items() if k not in ("train_rows", "holdout_rows")} for s in splits]}
    if len(splits) > 1:
        report["across_seeds"] = _spread(splits)
        if "held_out_by_dataset" in first:
            report["across_seeds_by_dataset"] = {d: _spread_of([s["held_out_by_dataset"][d] for s in splits])
                                                 for d in first["held_out_by_dataset"]}
    report["acceptance"] = {"target": "on the mixture, >= 3x fewer generated tokens than always-slow at <= 1 "
                            "accuracy point below it, on every split", "strategies": acceptance(splits)}
    if curve:
        names = [k for k in ("always-slow", "router", "router, fold ensemble", "router, refit", "router + convergence",
                             "router + convergence, fold ensemble", "router + convergence, refit")
                 if k in first["held_out"]]
        report["learning_curve"] = [
            {"fraction": f, "train_rows": _stats([r["train"]["rows"] for r in reps]),
             "strategies": _spread_of([{k: r["held_out"][k] for k in names} for r in reps])}
            for f, reps in sorted(curve.items())] + [
            {"fraction": 1.0, "train_rows": _stats([s["train"]["rows"] for s in splits]),
             "strategies": _spread_of([{k: s["held_out"][k] for k in names} for s in splits])}]
    training = {**source, "seed": cfg.seeds[0], "train_rows": first["train_rows"],
                "holdout_rows": first["holdout_rows"], "folds": cfg.folds, "tolerance": cfg.tolerance,
                "auto_tolerance": cfg.auto_tolerance, "ensemble": cfg.ensemble, "heads": first["train"]["router_heads"]}
    router.save(out, fp, training=training, metrics=report, calibration=first["calibration"])
    return report


def _pm(s: dict[str, float], fmt: str, scale: float = 1.0) -> str:
    return f"{format(scale * s['mean'], fmt)} +- {format(scale * s['std'], fmt.lstrip('+'))}"


def _table(spread: dict, title: str) -> list[str]:
    lines = [title, f"  {'strategy':<36} {'accuracy %':>16} {'mean tokens':>16} {'x fewer than slow':>18} "
             f"{'points vs slow':>16}"]
    for name, v in spread.items():
        lines.append(f"  {name:<36} {_pm(v['accuracy'], '.1f', 100):>16} {_pm(v['tokens'], '.1f'):>16} "
                     f"{_pm(v['x_fewer'], '.2f'):>18} {_pm(v['points'], '+.1f'):>16}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The held-out table (and the spread across splits, per dataset, the learning curve) as text."""
    h, c = report["held_out"], report["calibration"]
    tol = (f"the tolerance chosen by cross-fitting on the training rows (loss <= {report['auto_tolerance']} points)"
           if report.get("auto_tolerance") is not None else f"{report['tolerance']} points below always-slow")
    lines = [f"held-out: {h['rows']} questions (trained on {report['train']['rows']}; thresholds calibrated on "
             f"out-of-fold predictions at {tol}). Tokens: mean generated tokens per question, look-ahead tokens "
             "included.",
             f"seed {report['seeds'][0]}:",
             f"  {'strategy':<66} {'accuracy':>8} {'mean tokens':>12} {'x fewer than slow':>18} {'points':>7}"]
    for name, v in h.items():
        if name == "rows":
            continue
        label = name
        if "fast_rate" in v and "stopped_early_rate" in v:
            label = f"{name} (fast {v['fast_rate']:.0%}, stopped early {v['stopped_early_rate']:.0%})"
        lines.append(f"  {label:<66} {v['accuracy']:>8.1%} {v['tokens']:>12.1f} {v['x_fewer']:>18.2f} "
                     f"{v['points']:>+7.1f}")
    for d, t in report.get("held_out_by_dataset", {}).items():
        lines.append(f"  {d} ({t['rows']} questions): " + ", ".join(
            f"{k} {t[k]['accuracy']:.1%} at {t[k]['tokens']:.1f} tokens" for k in t if k != "rows"))
    budget = c["thinking_budget"]
    lines.append(f"  thresholds: gain {c['tau_gain']:.4g}, step {c['tau_step']:.4g}, thinking budget "
                 f"{'none' if budget is None else f'{budget} tokens'} (tolerance {c['tolerance']:+g})")
    w = c.get("with_convergence")
    if w:
        b = w["thinking_budget"]
        lines.append(f"  router + convergence: gain {w['tau_gain']:.4g}, step {w['tau_step']:.4g}, thinking budget "
                     f"{'none' if b is None else f'{b} tokens'}, patience {w['patience'] or 'none'}"
                     + (f" with a look-ahead every {w['lookahead_every']} tokens" if w["patience"] else "") + " (tolerance "
                     f"{w['tolerance']:+g})")
    spread = report.get("across_seeds")
    if spread:
        seeds = " ".join(map(str, report["seeds"]))
        lines += _table(spread, f"across {len(report['seeds'])} splits (seeds {seeds}): mean +- std, mixture "
                        f"({h['rows']} held-out questions per split)")
        for d, s in report.get("across_seeds_by_dataset", {}).items():
            lines += _table(s, f"{d} ({report['held_out_by_dataset'][d]['rows']} held-out questions per split)")
    acc = report.get("acceptance")
    if acc:
        held = [k for k, v in acc["strategies"].items() if v["holds"]]
        lines.append(f"acceptance ({acc['target']}): " + (f"holds for {', '.join(held)}" if held else
                                                           "holds for no strategy"))
    for row in report.get("learning_curve", []):
        lines.append(f"learning curve: {row['fraction']:.0%} of the training rows ({row['train_rows']['mean']:.0f}): "
                     + "; ".join(f"{k} {_pm(v['accuracy'], '.1f', 100)} % at {_pm(v['tokens'], '.1f')} tokens "
                                 f"({v['x_fewer']['mean']:.2f}x fewer, {v['points']['mean']:+.1f} points)"
                                 for k, v in row["strategies"].items()))
    return "\n".join(lines)
