"""``kvagents train probe``: a correctness probe trained on your model and your data, with a held-out report.

For each row of a JSONL file (a question and its reference answer) the model samples ``n`` answers from one prefill;
each sample's pooled KV (every attention layer, generated segment) and probability scores are recorded, and a grader
says whether it is right. A seeded split by row keeps ``holdout`` of the rows out of training; the probe
(:class:`~kvagents.signals.probe.KVProbe`) is fitted on the rest and reported on the held-out rows against the plain
baselines (a random sample, majority vote, the mean-log-max-probability score and vote). The probe is saved as a
trained-signal folder (:mod:`kvagents.signals.artifact`) tied to the model's fingerprint, with the report inside.

Records are appended to ``<out>.work/records.jsonl`` as each batch finishes (features in ``features/<row>.npy``,
written first), so a killed run continues where it stopped, and never records a row twice.

Graders: ``gsm8k`` (the number after ``####`` / ``Answer:`` or the last number), ``math`` (``\\boxed{}``), ``choice``
(a letter A-E), ``exact`` (whitespace-normalised text) or ``python:module:function`` — ``function(text, reference)``
returning a bool (and, optionally, a module-level ``parse(text)`` for the votes).

Example:
    >>> from kvagents.evals.train_probe import TrainProbeConfig
    >>> cfg = TrainProbeConfig(data="my.jsonl", question_field="q", answer_field="a", out="probes/mine")
    >>> # train_probe(cfg)  ->  the report dict; the probe is in probes/mine
"""

from __future__ import annotations

import importlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TrainProbeConfig(BaseModel):
    """What ``kvagents train probe`` does; every field is a command-line option of the same name."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("qwen2.5-coder-0.5b", description="registry name, Hugging Face id, folder or .gguf")
    data: str = Field(description="JSONL file, one question per line")
    question_field: str = Field("question", description="field holding the question")
    answer_field: str = Field("answer", description="field holding the reference answer")
    grader: str = Field("gsm8k", description="gsm8k, math, choice, exact or python:module:function")
    out: str = Field(description="folder the probe is written to")
    n: int = Field(8, ge=2, le=64, description="samples per question")
    rows: str | None = Field(None, pattern=r"^\d+:\d+$", description="START:END: only these rows of the file "
                             "(0-based, END excluded), e.g. to keep evaluation rows out of training")
    limit: int = Field(0, ge=0, description="only the first N rows (0: all)")
    holdout: float = Field(0.2, gt=0, lt=1, description="fraction of rows kept out of training for the report")
    max_new_tokens: int = Field(384, ge=1)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_prompts: int = Field(16, ge=1)
    seed: int = Field(0, ge=0, lt=2**32)
    dtype: str = "auto"
    device: str = "auto"
    instruction: str = Field("Solve the problem step by step, then give the final answer after 'Answer:'.",
                             description="appended to every question")


def load_grader(name: str) -> tuple[Callable[[str, str], bool], Callable[[str], str | None] | None]:
    """``(grade(text, reference) -> bool, parse(text) -> answer or None)`` for a grader name."""
    from ..control.answers import get_parser, normalize_math, normalize_number

    if name.startswith("python:"):
        try:
            _, module, fn = name.split(":", 2)
            mod = importlib.import_module(module)
            grade = getattr(mod, fn)
        except (ValueError, ImportError, AttributeError) as e:
            raise ValueError(f"grader {name!r}: expected python:module:function importable from here ({e})") from None
        return grade, getattr(mod, "parse", None)
    if name == "exact":
        def norm(s):
            return " ".join(str(s).split()).lower()
        return (lambda text, ref: norm(text) == norm(ref)), norm
    if name not in ("gsm8k", "math", "choice"):
        raise ValueError(f"unknown grader {name!r}; use gsm8k, math, choice, exact or python:module:function")
    parse = get_parser({"gsm8k": "gsm8k", "math": "boxed", "choice": "choice"}[name])
    normalize = {"gsm8k": normalize_number, "math": normalize_math, "choice": lambda s: str(s).strip().upper()}[name]

    def grade(text: str, ref: str) -> bool:
        got = parse(text)
        want = parse(str(ref)) or normalize(str(ref))
        return got is not None and got == want

    return grade, parse


def _rows(cfg: TrainProbeConfig) -> list[dict]:
    path = Path(cfg.data)
    if not path.is_file():
        raise FileNotFoundError(f"data file {cfg.data!r} does not exist")
    start, end = (int(x) for x in cfg.rows.split(":")) if cfg.rows else (0, None)
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip() or i < start or (end is not None and i >= end):
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg.data}:{i + 1} is not valid JSON ({e})") from None
        for f in (cfg.question_field, cfg.answer_field):
            if f not in r:
                raise ValueError(f"{cfg.data}:{i + 1} has no field {f!r} (it has {sorted(r)}); pass "
                                 f"--question-field / --answer-field")
        rows.append({"row": i, "question": str(r[cfg.question_field]), "reference": str(r[cfg.answer_field])})
        if cfg.limit and len(rows) >= cfg.limit:
            break
    return rows


def split_rows(n_rows: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split by row: ``(train rows, held-out rows)``; each side needs at least 2 rows."""
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    k = round(n_rows * holdout)
    if k < 2 or n_rows - k < 2:
        raise ValueError(f"{n_rows} rows are too few for a held-out split of {holdout:.0%} (each side needs >= 2 "
                         "rows); add rows or change --holdout")
    return sorted(order[k:]), sorted(order[:k])


def _collect(llm, cfg: TrainProbeConfig, rows: list[dict], work: Path, grade, parse) -> list[dict]:
    """Sample, grade and record every row not yet recorded in ``work``; returns all records."""
    import numpy as np
    from tqdm.auto import tqdm

    from ..engine.params import SamplingParams
    from ..signals.embedding import KVEmbedding
    from ..signals.probe import probe_pooling
    from ..signals.scoring import ProbabilityScores
    from .selection import _attention_layers

    (work / "features").mkdir(parents=True, exist_ok=True)
    rec_path = work / "records.jsonl"
    done: dict[int, list[dict]] = {}
    if rec_path.exists():
        kept = []
        for line in rec_path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: that row is sampled again
                continue
            if (work / "features" / f"{r['row']}.npy").exists() and r["row"] not in done:
                done[r["row"]] = r["samples"]
                kept.append(line)
        tmp = rec_path.with_suffix(".tmp")  # only whole records stay, so appending starts on a fresh line
        tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
        tmp.replace(rec_path)
    todo = [r for r in rows if r["row"] not in done]
    params = SamplingParams(n=cfg.n, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, seed=cfg.seed)
    layers = len(_attention_layers(llm))
    cfg_m = llm.model.config
    head_dim = getattr(cfg_m, "head_dim", None) or cfg_m.hidden_size // cfg_m.num_attention_heads
    dim = layers * 2 * head_dim  # the probe pooling: every attention layer, [K; V], heads averaged
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="sample and grade", unit="question")
    with open(rec_path, "a", encoding="utf-8") as out:
        for start in range(0, len(todo), cfg.batch_prompts):
            chunk = todo[start: start + cfg.batch_prompts]
            comps = [KVEmbedding(probe_pooling(layers), name="features"), ProbabilityScores()]
            prompts = [f"{r['question']}\n\n{cfg.instruction}" for r in chunk]
            if getattr(llm.tokenizer, "chat_template", None):
                prompts = [[{"role": "user", "content": p}] for p in prompts]
            res = llm.generate(prompts, params, components=comps)
            for r, group in zip(chunk, res.samples):
                feats, samples = [], []
                for s in group:
                    try:
                        ok = bool(grade(s.text, r["reference"]))
                    except Exception as e:
                        raise ValueError(f"grader {cfg.grader!r} raised on row {r['row']} ({type(e).__name__}: {e})"
                                         ) from e
                    f = s.outputs["features"]
                    feats.append(np.full(dim, np.nan, np.float32) if f is None else f.numpy())
                    samples.append({"correct": ok, "answer": parse(s.text) if parse else None,
                                    "tokens": s.generated_tokens, "scores": s.outputs["probability"],
                                    "has_features": f is not None})
                np.save(work / "features" / f"{r['row']}.npy", np.stack(feats).astype(np.float32))
                out.write(json.dumps({"row": r["row"], "samples": samples}) + "\n")
                out.flush()
                done[r["row"]] = samples
                bar.update(1)
    bar.close()
    return [{"row": row, "samples": done[row]} for row in sorted(done)], layers


def _report(records: list[dict], probs: dict[int, list[float]]) -> dict[str, Any]:
    """Held-out metrics of the probe against the plain baselines."""
    import numpy as np

    from .metrics import auroc

    def vote(rec, weights):
        tally: dict[str, float] = {}
        for s, w in zip(rec["samples"], weights):
            if s["answer"] is not None:
                tally[s["answer"]] = tally.get(s["answer"], 0.0) + w
        if not tally:
            return False
        best = max(tally, key=tally.get)
        return any(s["correct"] for s in rec["samples"] if s["answer"] == best)

    def minmax(v):
        v = np.nan_to_num(np.asarray(v, float), nan=np.nanmin(v) if np.isfinite(v).any() else 0.0)
        span = v.max() - v.min()
        return (v - v.min()) / span + 1e-3 if span > 0 else np.ones_like(v)

    labels, p_all, lp_all = [], [], []
    rows = {"random sample": [], "majority vote": [], "logprob vote": [], "probe vote": [], "logprob argmax": [],
            "probe argmax": []}
    for rec in records:
        correct = [s["correct"] for s in rec["samples"]]
        lp = [s["scores"]["mean_log_max_prob"] for s in rec["samples"]]
        p = probs[rec["row"]]
        labels += correct
        p_all += p
        lp_all += lp
        rows["random sample"].append(float(np.mean(correct)))
        rows["majority vote"].append(vote(rec, [1.0] * len(correct)))
        rows["logprob vote"].append(vote(rec, minmax(lp)))
        rows["probe vote"].append(vote(rec, minmax(p)))
        rows["logprob argmax"].append(correct[int(np.nanargmax(lp))])
        rows["probe argmax"].append(correct[int(np.nanargmax(p))])
    return {"rows": len(records), "samples": len(labels), "accuracy": {k: float(np.mean(v)) for k, v in rows.items()},
            "auroc": {"probe": auroc(p_all, labels), "mean_log_max_prob": auroc(lp_all, labels)}}


def train_probe(cfg: TrainProbeConfig, llm=None) -> dict[str, Any]:
    """Sample, grade, train and report (see the module docstring); returns the report. ``llm``: a ``KVModel`` to use
    instead of loading ``cfg.model``."""
    import numpy as np

    from ..model import KVModel
    from ..signals.artifact import fingerprint
    from ..signals.probe import KVProbe, probe_pooling

    grade, parse = load_grader(cfg.grader)
    rows = _rows(cfg)
    train_i, held_i = split_rows(len(rows), cfg.holdout, cfg.seed)
    train_rows, held_rows = [rows[i]["row"] for i in train_i], [rows[i]["row"] for i in held_i]
    llm = llm or KVModel.from_pretrained(cfg.model, dtype=cfg.dtype, device=cfg.device)
    out = Path(cfg.out)
    work = out.with_name(out.name + ".work")
    records, layers = _collect(llm, cfg, rows, work, grade, parse)
    by_row = {r["row"]: r for r in records}
    feats = {row: np.load(work / "features" / f"{row}.npy") for row in by_row}

    def stack(which):
        x = np.concatenate([feats[r] for r in which])
        y = np.array([s["correct"] for r in which for s in by_row[r]["samples"]], dtype=float)
        return x, y

    x, y = stack(train_rows)
    if not 0 < y.mean() < 1:
        raise ValueError(f"the {len(y)} training samples are all {'right' if y.mean() else 'wrong'}: a probe needs "
                         "both; use harder or easier questions, more rows, or check the grader")
    probe = KVProbe.fit(x, y, probe_pooling(layers))
    probs = {r: [float(v) for v in probe.predict(np.nan_to_num(feats[r]))] for r in held_rows}
    report = _report([by_row[r] for r in held_rows], probs)
    report["train"] = {"rows": len(train_rows), "samples": int(len(y)), "positive_rate": float(y.mean())}
    training = {"data": cfg.data, "question_field": cfg.question_field, "answer_field": cfg.answer_field,
                "grader": cfg.grader, "n": cfg.n, "train_rows": train_rows, "holdout_rows": held_rows,
                "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature}
    probe.save(out, fingerprint(llm, None), training=training, metrics=report)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"held-out: {report['rows']} questions, {report['samples']} samples (trained on "
             f"{report['train']['rows']} questions, {report['train']['positive_rate']:.0%} of samples correct)",
             f"  AUROC: probe {report['auroc']['probe']:.3f}, mean_log_max_prob {report['auroc']['mean_log_max_prob']:.3f}",
             "  accuracy of the picked answer:"]
    lines += [f"    {k:<15} {v:6.1%}" for k, v in report["accuracy"].items()]
    return "\n".join(lines)
