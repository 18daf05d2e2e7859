"""The RecSys Challenge 2025 propensity metrics in numpy: multi-label AUROC, novelty, diversity and their score.

They follow the organisers' public evaluation code (github.com/Synerise/recsys2025,
`training_pipeline/`: metrics.py, metric_calculators.py, metrics_containers.py) and
/work/shared/REFERENCES.md ("Encode Me If You Can" -> "Challenge evaluation"). One deviation:
multi-label AUROC skips target columns with a single class among the scored users (the organisers'
torchmetrics AUROC counts such a column as 0 in the macro mean; with the challenge's top-100
targets every column has positives, so the two agree there).
"""

from __future__ import annotations

import numpy as np

from evaluation.metrics import roc_auc

NOVELTY_K = 10  # novelty looks at each user's 10 highest-scored targets
NOVELTY_POWER = 100  # (1 - popularity) ** 100: only predictions far from the popular head score
SCORE_WEIGHTS = {"auroc": 0.8, "novelty": 0.1, "diversity": 0.1}


def _sigmoid(scores: np.ndarray) -> np.ndarray:
    """Logits -> probabilities without overflow, and without rounding very negative logits to exactly 0."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be [U, K] logits, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores hold {int((~np.isfinite(s)).sum())} non-finite values")
    return np.exp(-np.logaddexp(0.0, -s))


def diversity(scores: np.ndarray) -> float:
    """Mean normalised entropy of each user's predictions: 1 = all K targets equally likely, 0 = one target.

    scores are logits [U, K]. Per user p = sigmoid(scores) / sum(sigmoid(scores)) (L1 over the K
    targets), H(p) = -sum_k p_k log2 p_k (0 log 0 = 0), divided by log2(K); mean over users.
    REFERENCES.md and the organisers write log2(100) because their K is 100; log2(K) is the same
    normalisation for any K. (The organisers add 1e-9 inside the log; exact entropy differs by < 1e-8.)
    """
    p = _sigmoid(scores)
    if p.shape[1] < 2:
        raise ValueError(f"diversity needs at least 2 targets, got {p.shape[1]}")
    p /= p.sum(axis=1, keepdims=True)
    entropy = -(p * np.log2(np.where(p > 0, p, 1.0))).sum(axis=1)
    return float(entropy.mean() / np.log2(p.shape[1]))


def novelty(scores: np.ndarray, popularity: np.ndarray, k: int = NOVELTY_K) -> float:
    """1 when users' top-k predictions avoid popular targets, ~0 when they confidently predict the popular head.

    The organisers' formula (metrics.py, Novelty), which REFERENCES.md abbreviates as
    "(1 - popularity of the top-10 predicted targets)^100":
      pop_k   = popularity_k / (sum of the k largest popularities), so that confidently
                predicting exactly the k most popular targets gives 1; the scale of
                `popularity` (fractions or counts) therefore does not matter;
      P_u     = sum over user u's k highest-scored targets of sigmoid(score) * pop_k
                (confidence-weighted, not a plain mean of popularities);
      novelty = (1 - mean_u P_u) ** 100  (the power is applied after averaging over users).
    k is capped at K. Ties in the top-k go to the lower target index (stable sort). If every
    popularity is 0 nothing is popular and novelty is 1.0 (the organisers would divide by zero).
    """
    s = _sigmoid(scores)
    pop = np.asarray(popularity, dtype=np.float64)
    if pop.shape != (s.shape[1],):
        raise ValueError(f"popularity must have one entry per target ({s.shape[1]}), got shape {pop.shape}")
    if not np.isfinite(pop).all() or (pop < 0).any():
        raise ValueError("popularity must be finite and non-negative")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, s.shape[1])
    top_total = np.sort(pop)[-k:].sum()
    if top_total == 0:
        return 1.0
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    weighted = (np.take_along_axis(s, top, axis=1) * pop[top]).sum(axis=1) / top_total
    return float((1.0 - weighted.mean()) ** NOVELTY_POWER)


def challenge_score(auroc: float, novelty: float, diversity: float) -> float:
    """The propensity tasks' score: 0.8 AUROC + 0.1 novelty + 0.1 diversity (metrics_containers.py)."""
    w = SCORE_WEIGHTS
    return w["auroc"] * auroc + w["novelty"] * novelty + w["diversity"] * diversity


def multilabel_auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """The challenge's multi-label AUROC: binary ROC-AUC per target column, macro mean over columns.

    Columns with a single class among these users have no AUROC and are skipped (see the module
    docstring for how that differs from the organisers' torchmetrics call).
    """
    y = np.asarray(y_true)
    s = np.asarray(scores)
    if y.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"y_true and scores must both be [U, K]; got {y.shape} and {s.shape}")
    positives = (y == 1).sum(axis=0)
    both = np.flatnonzero((positives > 0) & (positives < len(y)))
    if both.size == 0:
        raise ValueError(f"none of the {y.shape[1]} target columns has both classes among these {len(y)} users")
    return float(np.mean([roc_auc(y[:, k], s[:, k]) for k in both]))


def popularity_of(labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float64 [K]: the fraction of the selected (training) users with each target positive."""
    y = np.asarray(labels)
    mask = np.asarray(rows, dtype=bool)
    if y.ndim != 2 or mask.shape != (len(y),):
        raise ValueError(f"labels must be [U, K] and rows a bool mask [U]; got {y.shape} and {mask.shape}")
    if not mask.any():
        raise ValueError("popularity_of: no rows selected")
    return (y[mask] == 1).mean(axis=0, dtype=np.float64)


def task_metrics(logits: np.ndarray, y: np.ndarray, popularity: np.ndarray | None) -> dict[str, float]:
    """{"auroc"} for a binary task (popularity None), the four propensity metrics for a multi-label one."""
    if popularity is None:
        return {"auroc": roc_auc(y, logits[:, 0])}
    out = {"auroc": multilabel_auroc(y, logits), "novelty": novelty(logits, popularity), "diversity": diversity(logits)}
    out["score"] = challenge_score(out["auroc"], out["novelty"], out["diversity"])
    return out
