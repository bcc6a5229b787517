"""Which tokens' KV makes the best probe: every pooling recorded in a ``kvagents train probe`` work folder, alone
and joined, chosen on the training rows only and reported on the held-out rows.

For each feature set (the mean over every generated token, the last 16 tokens, the last token, and the mean joined
with each), the L2 penalty is picked by the cross-validated probe vote on the training rows (5 folds, as
``kvagents train probe`` does); the feature set with the best cross-validated vote is the one a user would pick. All
of them are then scored once on the held-out rows beside majority and the best probability vote, with bootstrap
standard errors of the paired differences.

    python bench/compare_probe_poolings.py --work out/probe.work --data ../shared/data/gsm8k.jsonl --rows 0:1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from kvagents.evals.metrics import auroc
from kvagents.evals.train_probe import (
    TrainProbeConfig,
    _fit,
    _predict,
    _rows,
    bootstrap_se,
    choose_l2,
    read_records,
    rule_hits,
    split_rows,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--rows", default="0:1000")
    ap.add_argument("--holdout", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tags", nargs="+", default=["", ".w16", ".last"])
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    cfg = TrainProbeConfig(data=a.data, out=str(a.work.with_suffix("")), rows=a.rows, holdout=a.holdout, seed=a.seed)
    rows = _rows(cfg)
    ti, hi = split_rows(len(rows), cfg.holdout, cfg.seed)
    train_rows, held_rows = [rows[i]["row"] for i in ti], [rows[i]["row"] for i in hi]
    by_row = read_records(a.work, [t + ".npy" for t in a.tags])
    train_rows = [r for r in train_rows if r in by_row]
    held_rows = [r for r in held_rows if r in by_row]
    base = {t: {r: np.load(a.work / "features" / f"{r}{t}.npy") for r in by_row} for t in a.tags}
    sets = {(t or ".mean").lstrip("."): base[t] for t in a.tags}
    for t in a.tags[1:]:
        sets[f"mean+{t.lstrip('.')}"] = {r: np.concatenate([base[""][r], base[t][r]], 1) for r in by_row}
    if len(a.tags) > 2:
        sets["all"] = {r: np.concatenate([base[t][r] for t in a.tags], 1) for r in by_row}
    held = [by_row[r] for r in held_rows]
    plain = rule_hits(held)
    best_lp = max((k for k in plain if k.startswith("vote by ")), key=lambda k: plain[k].mean())
    maj = plain["majority vote"]
    labels = [s["correct"] for r in held for s in r["samples"]]
    print(f"{len(train_rows)} training rows, {len(held_rows)} held-out rows; held-out majority {maj.mean():.1%}, "
          f"best probability vote ({best_lp}) {plain[best_lp].mean():.1%}")
    out = {"train_rows": len(train_rows), "held_rows": len(held_rows), "majority": float(maj.mean()),
           "best_logprob_vote": best_lp, "best_logprob_acc": float(plain[best_lp].mean()), "sets": {}}
    for name, feats in sets.items():
        chosen = choose_l2(feats, by_row, train_rows, 1, cfg)
        cv = chosen["cv_vote_accuracy"][str(chosen["l2"])]
        probe = _fit(feats, by_row, train_rows, 1, chosen["l2"], False)
        probs = _predict(probe, feats, held_rows)
        pv = rule_hits(held, probs)["probe vote"]
        p_all = [v for r in held for v in probs[r["row"]]]
        res = {"cv_vote": cv, "l2": chosen["l2"], "held_vote": float(pv.mean()), "se": bootstrap_se(pv),
               "minus_majority": float((pv - maj).mean()), "se_majority": bootstrap_se(pv, maj),
               "minus_best_lp": float((pv - plain[best_lp]).mean()), "se_best_lp": bootstrap_se(pv, plain[best_lp]),
               "auroc": auroc(p_all, labels)}
        out["sets"][name] = res
        print(f"{name:<12} cv vote {cv:6.1%} (l2 {chosen['l2']:g})  held-out vote {res['held_vote']:6.1%} "
              f"+- {res['se']:.1%}  - majority {res['minus_majority']:+.1%} +- {res['se_majority']:.1%}  "
              f"- best lp {res['minus_best_lp']:+.1%} +- {res['se_best_lp']:.1%}  AUROC {res['auroc']:.3f}", flush=True)
    pick = max(out["sets"], key=lambda k: out["sets"][k]["cv_vote"])
    out["chosen_by_cv"] = pick
    print(f"chosen on the training rows (best cross-validated vote): {pick}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
