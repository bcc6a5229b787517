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
``tolerance`` accuracy points below always-slow. The final heads, fitted on all training rows, are reported on the
held-out rows against always-fast, always-slow and the oracle router; the router's outcome is simulated from the
recorded fast and slow runs and checkpoints (as :meth:`~kvagents.evals.reasoning.Outcomes.simulate` does). The router
(:class:`~kvagents.signals.kv_classifier.KVRouter`) is saved as one trained-signal folder tied to the model's
fingerprint, with the report inside. ``seeds``: the held-out report for several random splits (mean and spread);
the router saved is the first seed's.

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
    tolerance: float = Field(0.5, ge=0, description="calibration: accuracy points below always-slow allowed")
    folds: int = Field(5, ge=2, description="cross-fitting folds (by row) for the calibration")
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
    rec_path = work / "records.jsonl"
    done: dict[int, dict] = {}
    if not rec_path.exists():
        return done
    kept = []
    for line in rec_path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: that row is run again
            continue
        if (work / "features" / f"{r['row']}.npz").exists() and r["row"] not in done:
            done[r["row"]] = r
            kept.append(line)
    tmp = rec_path.with_suffix(".tmp")  # only whole records stay, so appending starts on a fresh line
    tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
    tmp.replace(rec_path)
    return done


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


def held_out_table(data: Collected, router, cap: int | None) -> dict[str, dict[str, float]]:
    """Accuracy and mean generated tokens of always-fast, always-slow, the router (simulated from the recorded runs
    and checkpoints) and the oracle router on ``data``."""
    import numpy as np

    from .reasoning import Outcomes

    n = len(data.fast)
    steps = router.predict_step(data.windows) if len(data.windows) else np.zeros(0)
    out = Outcomes(data.fast, data.slow, [steps[data.win_row == i] for i in range(n)])
    s = router.settings
    gain = router.predict(data.prompt)
    c, t = out.simulate(gain, s.tau_gain, s.tau_step, cap)
    fast = gain < s.tau_gain
    oracle_slow = out.sc & ~out.fc
    table = {"always-fast": (out.fc, out.ft), "always-slow": (out.sc, out.st), "router": (c, t),
             "oracle router": (out.fc | out.sc, np.where(oracle_slow, out.st, out.ft))}
    res = {k: {"accuracy": float(np.mean(a)), "tokens": float(np.mean(b))} for k, (a, b) in table.items()}
    res["router"].update(fast_rate=float(fast.mean()), stopped_early_rate=float(((~fast) & (t < out.st)).mean()))
    res["oracle router"]["fast_rate"] = float((~oracle_slow).mean())
    return res


def fit_split(data: Collected, train_i, held_i, kc, settings, *, folds: int, seed: int, device: str = "cpu",
              progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Cross-fit and calibrate on rows ``train_i``, fit the final heads there, report on rows ``held_i``: the
    :class:`~kvagents.signals.kv_classifier.KVRouter` and ``{"calibration", "train", "held_out"}``."""
    from ..signals.kv_classifier import KVRouter
    from .reasoning import Outcomes, _auroc, _folds, calibrate, cross_fit, fit_router_heads

    tr = data.subset(train_i)
    y_gain, y_step = labels(tr)
    n = len(tr.fast)
    fit = dict(seed=seed, device=device, max_epochs=300, patience=25)
    oof = cross_fit(tr.prompt, {"gain": (y_gain, True, True)}, tr.windows, y_step, tr.win_row,
                    _folds(n, folds, seed), folds, kc, fit, progress=progress)
    out = Outcomes(tr.fast, tr.slow, [oof["step"][tr.win_row == i] for i in range(n)])
    cal, cap = calibrate(out, oof["gain"], oof["step"], settings.tolerance, settings.every, settings.cue)
    cal["checkpoint_cap"] = cap
    heads = fit_router_heads(tr.prompt, y_gain, tr.windows, y_step, kc, cal["tau_gain"], cal["tau_step"], fit)
    router = KVRouter(heads["gain"][0], heads["step"][0] if "step" in heads else None,
                      settings.router(cal["tau_gain"], cal["tau_step"], cal["thinking_budget"]))
    train = {"rows": n, "gain_positive": int(y_gain.sum() / 100), "step_samples": int(len(y_step)),
             "step_positive": int(y_step.sum() / 100), "step_head": "step" in heads,
             "oof_auroc": {"gain": _auroc(oof["gain"], y_gain >= 50),
                           "step": _auroc(oof["step"], y_step >= 50) if len(y_step) else None}}
    hd = data.subset(held_i)
    held = held_out_table(hd, router, cap)
    held["rows"] = len(held_i)
    rep = {"seed": seed, "calibration": cal, "train": train, "held_out": held}
    datasets = sorted({f["dataset"] for f in hd.fast})
    if len(datasets) > 1:
        rep["held_out_by_dataset"] = {}
        for d in datasets:
            mine = [i for i, f in enumerate(hd.fast) if f["dataset"] == d]
            rep["held_out_by_dataset"][d] = {**held_out_table(hd.subset(mine), router, cap), "rows": len(mine)}
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

    def router(self, tau_gain: float, tau_step: float, budget: int | None):
        from ..signals.kv_classifier import KVRouterConfig

        return KVRouterConfig(tau_gain=tau_gain, tau_step=tau_step, thinking_budget=budget, format=self.format,
                              every=self.every, fast_tokens=self.fast_tokens, slow_tokens=self.slow_tokens,
                              answer_tokens=self.answer_tokens, tolerance=self.tolerance,
                              instruction=self.instruction, answer_cue=self.answer_cue)


def _spread(splits: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    import numpy as np

    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in splits[0]["held_out"]:
        if name == "rows":
            continue
        out[name] = {}
        for key in ("accuracy", "tokens"):
            v = np.array([s["held_out"][name][key] for s in splits])
            out[name][key] = {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
                              "max": float(v.max())}
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
        kc = KVClassifierConfig(layers=conf["layers"], window=window)
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
        kc = kv_config(cfg, window)
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
    from tqdm.auto import tqdm

    splits, router = [], None
    for seed in tqdm(cfg.seeds, desc="train and report per split", unit="split", disable=len(cfg.seeds) < 2):
        train_i, held_i = split_rows(n, cfg.holdout, seed)
        r, rep = fit_split(data, train_i, held_i, kc, settings, folds=cfg.folds, seed=seed, device=dev,
                           progress=len(cfg.seeds) < 2)
        rep["train_rows"], rep["holdout_rows"] = [data.names[i] for i in train_i], [data.names[i] for i in held_i]
        splits.append(rep)
        router = router or r
    first = splits[0]
    report = {"rows": n, "holdout": cfg.holdout, "tolerance": cfg.tolerance, "window": window,
              "held_out": first["held_out"], "calibration": first["calibration"], "train": first["train"],
              **({"held_out_by_dataset": first["held_out_by_dataset"]} if "held_out_by_dataset" in first else {}),
              "seeds": list(cfg.seeds),
              "splits": [{k: v for k, v in s.items() if k not in ("train_rows", "holdout_rows")} for s in splits]}
    if len(splits) > 1:
        report["across_seeds"] = _spread(splits)
    training = {**source, "seed": cfg.seeds[0], "train_rows": first["train_rows"],
                "holdout_rows": first["holdout_rows"], "folds": cfg.folds, "tolerance": cfg.tolerance}
    router.save(out, fp, training=training, metrics=report, calibration=first["calibration"])
    return report


def format_report(report: dict[str, Any]) -> str:
    """The held-out table (and the spread across splits) as text."""
    h, c = report["held_out"], report["calibration"]
    slow_tok = h["always-slow"]["tokens"]
    lines = [f"held-out: {h['rows']} questions (trained on {report['train']['rows']}; thresholds calibrated on "
             f"out-of-fold predictions at {report['tolerance']} points below always-slow)",
             f"  {'strategy':<40} {'accuracy':>8} {'mean tokens':>12} {'x fewer than slow':>18}"]
    for name, v in h.items():
        if name == "rows":
            continue
        label = name
        if name == "router":
            label = f"router (fast {v['fast_rate']:.0%}, stopped early {v['stopped_early_rate']:.0%})"
        lines.append(f"  {label:<40} {v['accuracy']:>8.1%} {v['tokens']:>12.1f} "
                     f"{slow_tok / max(v['tokens'], 1e-9):>18.2f}")
    for d, t in report.get("held_out_by_dataset", {}).items():
        lines.append(f"  {d} ({t['rows']} questions): " + ", ".join(
            f"{k} {t[k]['accuracy']:.1%} at {t[k]['tokens']:.1f} tokens" for k in t if k != "rows"))
    budget = c["thinking_budget"]
    lines.append(f"  thresholds: gain {c['tau_gain']:.4g}, step {c['tau_step']:.4g}, thinking budget "
                 f"{'none' if budget is None else f'{budget} tokens'}")
    spread = report.get("across_seeds")
    if spread:
        lines.append(f"across {len(report['seeds'])} splits (seeds {' '.join(map(str, report['seeds']))}): "
                     "mean +- std (min .. max)")
        for name, v in spread.items():
            a, t = v["accuracy"], v["tokens"]
            lines.append(f"  {name:<16} accuracy {a['mean']:.1%} +- {a['std']:.1%} ({a['min']:.1%} .. {a['max']:.1%})"
                         f", tokens {t['mean']:.1f} +- {t['std']:.1f} ({t['min']:.1f} .. {t['max']:.1f})")
    return "\n".join(lines)
