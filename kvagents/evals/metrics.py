"""Correctness-prediction metrics of a score: AUROC, FPR at 95 % TPR, AUPR (NumPy only, ties handled)."""

from __future__ import annotations

import numpy as np


def _clean(scores, labels):
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    keep = ~np.isnan(s)
    return s[keep], y[keep]


def auroc(scores, labels) -> float:
    """Probability that a random positive scores above a random negative (ties count 1/2). NaN scores dropped."""
    s, y = _clean(scores, labels)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def fpr_at_95_tpr(scores, labels) -> float:
    """False-positive rate at the highest threshold whose true-positive rate reaches 95 %."""
    s, y = _clean(scores, labels)
    if y.sum() == 0 or (~y).sum() == 0:
        return float("nan")
    thresholds = np.sort(np.unique(s))[::-1]
    for t in thresholds:
        pred = s >= t
        if pred[y].mean() >= 0.95:
            return float(pred[~y].mean())
    return 1.0


def aupr(scores, labels) -> float:
    """Average precision with positives = correct samples (step-wise, as scikit-learn)."""
    s, y = _clean(scores, labels)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.where(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[distinct]
    fp = (distinct + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    recall_prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - recall_prev) * precision))
