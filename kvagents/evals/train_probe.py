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
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    import numpy as np


L2_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


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
    positions: str = Field("mean", description="tokens the probe's KV features average: mean (every generated "
                           "token), last (the last one) or window:K (the last K, where the final answer is written)")
    record: list[str] = Field(default_factory=list, description="more poolings (mean, last, window:K) whose features "
                              "are recorded beside the probe's, to train other probes later from the same samples "
                              "(--positions P on a finished work folder only trains)")
    center: bool = Field(False, description="--center: a ranking probe that compares each question's samples with "
                         "each other (features minus the question's mean; as good for voting, but its probabilities "
                         "say nothing about how hard the question is); default: an absolute correctness probe")
    l2: list[float] = Field(default_factory=lambda: list(L2_GRID), min_length=1,
                            description="L2 penalties tried; the one whose probe vote is best across folds of the "
                            "training rows is kept")
    folds: int = Field(5, ge=2, le=20, description="folds for the L2 choice (and --crossfit)")
    crossfit: bool = Field(False, description="also score every row with a probe trained on the other folds and "
                           "report all rows (each row evaluated by a probe that never saw it)")
    dtype: str = "auto"
    device: str = "auto"
    instruction: str = Field("Solve the problem step by step, then give the final answer after 'Answer:'.",
                             description="appended to every question")

    @field_validator("positions", "record")
    @classmethod
    def _check_poolings(cls, v: str | list[str]) -> str | list[str]:
        from ..signals.probe import pooling_tag

        for p in [v] if isinstance(v, str) else v:
            pooling_tag(p)
        return v

    def poolings(self) -> list[str]:
        """Every pooling whose features a row needs: the probe's first, then ``record`` (no repeats)."""
        return list(dict.fromkeys([self.positions, *self.record]))


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
    parse = get_parser(name)
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


def read_records(work: Path, feature_suffix: str | list[str]) -> dict[int, dict]:
    """The whole records of a resumable work folder (``records.jsonl``) whose row's features files
    (``features/<row><suffix>`` for each suffix) exist, the first one of each row; the file is rewritten with only
    those, so that appending starts on a fresh line (a line cut by a kill is dropped and its row done again).

    A recorded row that lacks one of these files but has other features (the folder was sampled with other
    poolings) raises rather than being dropped and sampled again."""
    suffixes = [feature_suffix] if isinstance(feature_suffix, str) else list(feature_suffix)
    rec_path = work / "records.jsonl"
    done: dict[int, dict] = {}
    if not rec_path.exists():
        return done
    kept = []
    for line in rec_path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        have = [(work / "features" / f"{r['row']}{x}").exists() for x in suffixes]
        if not all(have) and next((work / "features").glob(f"{r['row']}.*"), None) is not None:
            lacking = [x for x, h in zip(suffixes, have) if not h]
            raise ValueError(f"row {r['row']} of {work} was recorded without the features {lacking}: the folder was "
                             "sampled with other poolings; record them when sampling (--record) or use another --out")
        if all(have) and r["row"] not in done:
            done[r["row"]] = r
            kept.append(line)
    tmp = rec_path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
    tmp.replace(rec_path)
    return done


def _collect(llm, cfg: TrainProbeConfig, rows: list[dict], work: Path, grade, parse) -> list[dict]:
    """Sample, grade and record every row not yet recorded in ``work``; returns all records."""
    import numpy as np
    from tqdm.auto import tqdm

    from ..engine.params import SamplingParams
    from ..signals.embedding import KVEmbedding
    from ..signals.probe import pooling_tag, probe_pooling
    from ..signals.scoring import ProbabilityScores
    from .selection import _attention_layers

    (work / "features").mkdir(parents=True, exist_ok=True)
    rec_path = work / "records.jsonl"
    poolings = cfg.poolings()
    tags = {p: pooling_tag(p) for p in poolings}
    done: dict[int, list[dict]] = {
        row: r["samples"] for row, r in read_records(work, [tags[p] + ".npy" for p in poolings]).items()}
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
            comps = [KVEmbedding(probe_pooling(layers, p), name="features" + tags[p]) for p in poolings]
            comps.append(ProbabilityScores())
            prompts = [f"{r['question']}\n\n{cfg.instruction}" for r in chunk]
            if getattr(llm.tokenizer, "chat_template", None):
                prompts = [[{"role": "user", "content": p}] for p in prompts]
            res = llm.generate(prompts, params, components=comps)
            for r, group in zip(chunk, res.samples):
                feats, samples = {p: [] for p in poolings}, []
                for s in group:
                    try:
                        ok = bool(grade(s.text, r["reference"]))
                    except Exception as e:
                        raise ValueError(f"grader {cfg.grader!r} raised on row {r['row']} ({type(e).__name__}: {e})"
                                         ) from e
                    for p in poolings:  # every pooling is None together: nothing was fed to the model
                        f = s.outputs["features" + tags[p]]
                        feats[p].append(np.full(dim, np.nan, np.float32) if f is None else f.numpy())
                    samples.append({"correct": ok, "answer": parse(s.text) if parse else None,
                                    "tokens": s.generated_tokens, "scores": s.outputs["probability"],
                                    "has_features": s.outputs["features" + tags[poolings[0]]] is not None})
                for p in poolings:  # every features file before the record: a record means its row is complete
                    np.save(work / "features" / f"{r['row']}{tags[p]}.npy", np.stack(feats[p]).astype(np.float32))
                out.write(json.dumps({"row": r["row"], "samples": samples}) + "\n")
                out.flush()
                done[r["row"]] = samples
                bar.update(1)
    bar.close()
    return [{"row": row, "samples": done[row]} for row in sorted(done)], layers


def weighted_vote(answers: list, weights) -> Any:
    """The answer with the largest summed weight (``None`` answers do not vote; first seen wins ties); ``None`` when
    no sample has an answer."""
    tally: dict[Any, float] = {}
    for a, w in zip(answers, weights):
        if a is not None:
            tally[a] = tally.get(a, 0.0) + float(w)
    return max(tally, key=tally.get) if tally else None


def minmax_weights(values) -> np.ndarray:
    """Scores mapped to ``[1e-3, 1 + 1e-3]`` within one question (NaN gets the lowest); all equal -> all 1."""
    import numpy as np

    v = np.asarray(values, float)
    v = np.nan_to_num(v, nan=np.nanmin(v) if np.isfinite(v).any() else 0.0)
    span = v.max() - v.min()
    return (v - v.min()) / span + 1e-3 if span > 0 else np.ones_like(v)


PROB_SCORES = ("mean_log_max_prob", "mean_logprob", "mean_max_prob", "mean_entropy", "lowest_group_confidence")


def rule_hits(records: list[dict], probs: dict[int, list[float]] | None = None) -> dict[str, np.ndarray]:
    """Per question, 1 when a rule picks a right answer: a random sample (its expected value), majority vote,
    a vote weighted by each probability score (min-max within the question), DeepConf-style filtering (majority
    among the most confident half by lowest group confidence), and with ``probs`` the probe's vote (weights = the
    probe's probabilities) and argmax."""
    import numpy as np

    from ..signals.scoring import SCORE_DIRECTIONS

    out: dict[str, list[float]] = {"random sample": [], "majority vote": []}

    def hit(rec, answer):
        return float(answer is not None and any(s["correct"] for s in rec["samples"] if s["answer"] == answer))

    for rec in records:
        ss = rec["samples"]
        answers = [s["answer"] for s in ss]
        out["random sample"].append(float(np.mean([s["correct"] for s in ss])))
        out["majority vote"].append(hit(rec, weighted_vote(answers, [1.0] * len(ss))))
        for k in PROB_SCORES:
            v = [SCORE_DIRECTIONS.get(k, 1) * float(s["scores"].get(k, np.nan)) for s in ss]
            out.setdefault(f"vote by {k}", []).append(hit(rec, weighted_vote(answers, minmax_weights(v))))
        conf = np.nan_to_num(np.array([float(s["scores"].get("lowest_group_confidence", np.nan)) for s in ss]),
                             nan=-np.inf)
        top = conf >= np.quantile(conf, 0.5)
        out.setdefault("DeepConf top-50% vote", []).append(hit(rec, weighted_vote(answers, top.astype(float))))
        if probs is not None:
            p = np.asarray(probs[rec["row"]], float)
            out.setdefault("probe vote", []).append(hit(rec, weighted_vote(answers, np.nan_to_num(p))))
            out.setdefault("probe argmax", []).append(float(ss[int(np.nanargmax(p))]["correct"]) if
                                                      np.isfinite(p).any() else 0.0)
    return {k: np.asarray(v) for k, v in out.items()}


def bootstrap_se(values, base=None, resamples: int = 2000, seed: int = 0) -> float:
    """Standard error of the mean of ``values`` (of ``values - base`` when given) by resampling questions."""
    import numpy as np

    v = np.asarray(values, float) - (0.0 if base is None else np.asarray(base, float))
    idx = np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))
    return float(v[idx].mean(1).std())


ADAPTIVE_RULES = (("decided", 0.95), ("beta", 0.9), ("beta", 0.8))


def adaptive_report(records: list[dict], probs: dict[int, list[float]] | None = None, wave: int = 2
                    ) -> dict[str, dict[str, float]]:
    """Adaptive best-of-n replayed on the recorded samples (in sampling order, waves of ``wave``, at most all of
    them): per stop rule, for the majority vote and (with ``probs``) the probe vote, the accuracy and the mean
    generated tokens per question beside the fixed-n vote's."""
    import numpy as np

    from ..control.adaptive import adaptive_stop

    out: dict[str, dict[str, float]] = {}
    votes = {"majority": None} | ({"probe": probs} if probs is not None else {})
    for vote_name, pr in votes.items():
        for rule, conf in (("fixed", 0.0),) + ADAPTIVE_RULES:
            acc, tok = [], []
            for rec in records:
                ss = rec["samples"]
                answers = [s["answer"] for s in ss]
                w = [1.0] * len(ss) if pr is None else [float(np.nan_to_num(x)) for x in pr[rec["row"]]]
                m = len(ss) if rule == "fixed" else adaptive_stop(answers, w, wave=min(wave, len(ss)),
                                                                  max_n=len(ss), rule=rule, confidence=conf)
                best = weighted_vote(answers[:m], w[:m])
                acc.append(float(best is not None and any(s["correct"] for s in ss if s["answer"] == best)))
                tok.append(sum(s["tokens"] for s in ss[:m]))
            key = f"{vote_name} vote, {'fixed n' if rule == 'fixed' else f'{rule} {conf:g}'}"
            out[key] = {"accuracy": float(np.mean(acc)), "tokens": float(np.mean(tok))}
    return out


def _report(records: list[dict], probs: dict[int, list[float]]) -> dict[str, Any]:
    """Held-out metrics of the probe against the plain baselines, with bootstrap standard errors."""

    from .metrics import auroc

    hits = rule_hits(records, probs)
    labels = [s["correct"] for r in records for s in r["samples"]]
    p_all = [v for r in records for v in probs[r["row"]]]
    lp_all = [s["scores"]["mean_log_max_prob"] for r in records for s in r["samples"]]
    lp_rules = [k for k in hits if k.startswith("vote by ")]
    best_lp = max(lp_rules, key=lambda k: hits[k].mean())
    maj, pv = hits["majority vote"], hits["probe vote"]
    return {"rows": len(records), "samples": len(labels),
            "adaptive": adaptive_report(records, probs),
            "accuracy": {k: float(v.mean()) for k, v in hits.items()},
            "se": {k: bootstrap_se(v) for k, v in hits.items()},
            "best_logprob_vote": best_lp,
            "probe_vote_minus_majority": {"mean": float((pv - maj).mean()), "se": bootstrap_se(pv, maj)},
            "probe_vote_minus_best_logprob_vote": {"mean": float((pv - hits[best_lp]).mean()),
                                                   "se": bootstrap_se(pv, hits[best_lp])},
            "auroc": {"probe": auroc(p_all, labels), "mean_log_max_prob": auroc(lp_all, labels)}}


def _fit(feats: dict, by_row: dict, rows: list[int], layers: int, l2: float, center: bool, positions: str = "mean"):
    import numpy as np

    from ..signals.probe import KVProbe, probe_pooling

    x = np.nan_to_num(np.concatenate([feats[r] for r in rows]))
    y = np.array([s["correct"] for r in rows for s in by_row[r]["samples"]], dtype=float)
    groups = np.concatenate([np.full(len(feats[r]), r) for r in rows]) if center else None
    return KVProbe.fit(x, y, probe_pooling(layers, positions), l2=l2, groups=groups)


def _predict(probe, feats: dict, rows: list[int]) -> dict[int, list[float]]:
    import numpy as np

    return {r: [float(v) for v in probe.predict(np.nan_to_num(feats[r]))] for r in rows}


def _folds(rows: list[int], k: int, seed: int) -> list[list[int]]:
    order = list(rows)
    random.Random(seed + 1).shuffle(order)
    return [sorted(order[i::k]) for i in range(k)]


def choose_l2(feats: dict, by_row: dict, rows: list[int], layers: int, cfg: TrainProbeConfig) -> dict[str, Any]:
    """The L2 penalty of ``cfg.l2`` whose probe vote, cross-fitted over ``cfg.folds`` folds of ``rows``, is best
    (the larger penalty on a tie); every candidate's cross-validated vote accuracy is returned."""

    if len(cfg.l2) == 1:
        return {"l2": cfg.l2[0], "cv_vote_accuracy": {}}
    folds = _folds(rows, cfg.folds, cfg.seed)
    acc = {}
    for l2 in cfg.l2:
        probs: dict[int, list[float]] = {}
        for i, test in enumerate(folds):
            fit_rows = [r for j, f in enumerate(folds) if j != i for r in f]
            probs.update(_predict(_fit(feats, by_row, fit_rows, layers, l2, cfg.center, cfg.positions), feats, test))
        acc[l2] = float(rule_hits([by_row[r] for r in rows], probs)["probe vote"].mean())
    best = max(sorted(acc, reverse=True), key=lambda k: acc[k])
    return {"l2": best, "cv_vote_accuracy": {str(k): v for k, v in acc.items()}, "folds": cfg.folds}


def train_probe(cfg: TrainProbeConfig, llm=None) -> dict[str, Any]:
    """Sample, grade, train and report (see the module docstring); returns the report. ``llm``: a ``KVModel`` to use
    instead of loading ``cfg.model``."""
    import numpy as np

    from ..model import KVModel
    from ..signals.artifact import fingerprint
    from ..signals.probe import pooling_tag

    grade, parse = load_grader(cfg.grader)
    rows = _rows(cfg)
    train_i, held_i = split_rows(len(rows), cfg.holdout, cfg.seed)
    train_rows, held_rows = [rows[i]["row"] for i in train_i], [rows[i]["row"] for i in held_i]
    llm = llm or KVModel.from_pretrained(cfg.model, dtype=cfg.dtype, device=cfg.device)
    out = Path(cfg.out)
    work = out.with_name(out.name + ".work")
    records, layers = _collect(llm, cfg, rows, work, grade, parse)
    by_row = {r["row"]: r for r in records}
    tag = pooling_tag(cfg.positions)
    feats = {row: np.load(work / "features" / f"{row}{tag}.npy") for row in by_row}
    y = np.array([s["correct"] for r in train_rows for s in by_row[r]["samples"]], dtype=float)
    if not 0 < y.mean() < 1:
        raise ValueError(f"the {len(y)} training samples are all {'right' if y.mean() else 'wrong'}: a probe needs "
                         "both; use harder or easier questions, more rows, or check the grader")
    chosen = choose_l2(feats, by_row, train_rows, layers, cfg)
    probe = _fit(feats, by_row, train_rows, layers, chosen["l2"], cfg.center, cfg.positions)
    report = _report([by_row[r] for r in held_rows], _predict(probe, feats, held_rows))
    report["train"] = {"rows": len(train_rows), "samples": int(len(y)), "positive_rate": float(y.mean()),
                       "l2": chosen["l2"], "cv_vote_accuracy": chosen["cv_vote_accuracy"], "center": cfg.center,
                       "positions": cfg.positions}
    if cfg.crossfit:
        all_rows = sorted(by_row)
        probs: dict[int, list[float]] = {}
        for test in _folds(all_rows, cfg.folds, cfg.seed):
            fit_rows = sorted(set(all_rows) - set(test))
            l2 = choose_l2(feats, by_row, fit_rows, layers, cfg)["l2"]  # nested: chosen without the test fold
            probs.update(_predict(_fit(feats, by_row, fit_rows, layers, l2, cfg.center, cfg.positions), feats, test))
        report["crossfit"] = _report([by_row[r] for r in all_rows], probs)
    training = {"data": cfg.data, "question_field": cfg.question_field, "answer_field": cfg.answer_field,
                "grader": cfg.grader, "n": cfg.n, "train_rows": train_rows, "holdout_rows": held_rows,
                "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                "instruction": cfg.instruction, "positions": cfg.positions}
    probe.save(out, fingerprint(llm, None), training=training, metrics=report)
    return report


def format_report(report: dict[str, Any]) -> str:
    def table(rep, title):
        au = rep["auroc"]
        lines = [f"{title}: {rep['rows']} questions, {rep['samples']} samples",
                 f"  AUROC: probe {au['probe']:.3f}, mean_log_max_prob {au['mean_log_max_prob']:.3f}",
                 "  accuracy of the picked answer (bootstrap SE over questions):"]
        lines += [f"    {k:<34} {v:6.1%}  +- {rep['se'][k]:.1%}" for k, v in rep["accuracy"].items()]
        d1, d2 = rep["probe_vote_minus_majority"], rep["probe_vote_minus_best_logprob_vote"]
        lines.append(f"  probe vote - majority vote: {d1['mean']:+.1%} +- {d1['se']:.1%}; - best probability vote "
                     f"({rep['best_logprob_vote']}): {d2['mean']:+.1%} +- {d2['se']:.1%}")
        if rep.get("adaptive"):
            lines.append("  adaptive best-of-n (waves of 2, replayed on the recorded samples): accuracy, generated "
                         "tokens per question")
            lines += [f"    {k:<34} {v['accuracy']:6.1%}  {v['tokens']:7.0f}" for k, v in rep["adaptive"].items()]
        return lines

    t = report["train"]
    lines = [f"trained on {t['rows']} questions ({t['positive_rate']:.0%} of samples correct), "
             f"{'centred' if t.get('center') else 'absolute'} probe over {t.get('positions', 'mean')} KV, "
             f"l2 {t['l2']:g}"]
    lines += table(report, "held-out")
    if "crossfit" in report:
        lines += table(report["crossfit"], "every row, cross-fitted")
    return "\n".join(lines)
