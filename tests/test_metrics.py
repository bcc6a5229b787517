import numpy as np
import pytest

from kvagents.evals.metrics import aupr, auroc, fpr_at_95_tpr


def brute_auroc(s, y):
    pos, neg = [a for a, b in zip(s, y) if b], [a for a, b in zip(s, y) if not b]
    tot = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return tot / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_pairwise_count(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 6, size=40).astype(float)  # many ties
    y = rng.random(40) < 0.4
    assert auroc(s, y) == pytest.approx(brute_auroc(s, y))


def test_hand_computed_values():
    s = [0.9, 0.8, 0.7, 0.6, 0.5]
    y = [1, 0, 1, 0, 0]
    assert auroc(s, y) == pytest.approx(5 / 6)
    # AP: precision at each positive: 1/1, 2/3 -> mean over recall steps 0.5*(1) + 0.5*(2/3)
    assert aupr(s, y) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # 95% TPR needs both positives: threshold 0.7 -> FPR = 1/3
    assert fpr_at_95_tpr(s, y) == pytest.approx(1 / 3)
    assert np.isnan(auroc([1, 2], [1, 1]))
    assert auroc([np.nan, 1, 0], [0, 1, 0]) == 1.0
