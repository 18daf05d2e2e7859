"""Probe metrics in plain numpy (ROC-AUC, KS, macro one-vs-rest), so any module imports them without sklearn or torch."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _binary(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return (is_positive, scores); the larger of the two labels is positive (as in sklearn)."""
    y = np.asarray(y_true).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true has {y.size} entries but scores has {s.size}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores hold {int((~np.isfinite(s)).sum())} non-finite values")
    classes = np.unique(y)
    if len(classes) != 2:
        raise ValueError(
            f"binary metric needs exactly 2 classes in y_true, found {len(classes)}: {classes.tolist()[:10]}"
            + (" (only one class present: the metric is undefined)" if len(classes) == 1 else "")
        )
    return y == classes[1], s


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney U statistic; tied scores get their average rank (count half)."""
    pos, s = _binary(y_true, scores)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct score: ranks below it + (ties + 1) / 2.
    avg_rank = np.cumsum(counts) - counts + (counts + 1) / 2.0
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    u = avg_rank[inverse][pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def ks_statistic(y_true: np.ndarray, scores: np.ndarray) -> float:
    """max |TPR - FPR| over thresholds, i.e. the two-sample KS distance of positive vs negative scores."""
    pos, s = _binary(y_true, scores)
    uniq, inverse = np.unique(s, return_inverse=True)
    # Empirical CDFs of both classes at every distinct score (ties move together).
    cdf_pos = np.cumsum(np.bincount(inverse[pos], minlength=len(uniq))) / pos.sum()
    cdf_neg = np.cumsum(np.bincount(inverse[~pos], minlength=len(uniq))) / (~pos).sum()
    return float(np.abs(cdf_pos - cdf_neg).max())


def macro_ovr(
    y_true: np.ndarray,
    probs: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
) -> float:
    """Macro one-vs-rest average of a binary metric over the classes present; label k is column k of probs."""
    y = np.asarray(y_true).ravel()
    p = np.asarray(probs)
    if p.ndim != 2 or p.shape[0] != y.size:
        raise ValueError(f"probs must be [N, K] with N={y.size}, got shape {p.shape}")
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError(f"multiclass metric needs at least 2 classes in y_true, found {present.tolist()}")
    if present.min() < 0 or present.max() >= p.shape[1]:
        raise ValueError(f"labels {present.tolist()} do not index the {p.shape[1]} columns of probs")
    return float(np.mean([metric(y == k, p[:, k]) for k in present]))
