"""The RecSys Challenge 2025 downstream protocol: one FIXED MLP head per task on frozen user embeddings.

Every embedding method is scored with the same head, optimiser and budget, so differences in the
table come from the embeddings. The head, the metrics and the score follow the organisers' public
evaluation code (github.com/Synerise/recsys2025, `training_pipeline/`: model.py, metrics.py,
metric_calculators.py, metrics_containers.py, constants.py) and /work/shared/REFERENCES.md
("Encode Me If You Can" -> "Challenge evaluation"). Where the two differ, the organisers' code wins;
every deviation from it is listed here:

- Epoch selection: the organisers keep the epoch with the best score on the very users they report,
  which leaks the evaluation labels into the result. Here the best epoch is chosen on a seeded
  held-out part of the FIT users (`val_fraction`), by the same criterion (the task's score).
- Inputs are standardised with the mean/std of the FIT users (the organisers feed raw embeddings).
- Training batches are shuffled with a seeded generator (the organisers' train loader does not shuffle).
- Multi-label AUROC skips target columns with a single class among the scored users (the organisers'
  torchmetrics AUROC counts such a column as 0 in the macro mean; with the challenge's top-100
  targets every column has positives, so the two agree there).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from callbacks.metrics import roc_auc

PAPER_WIDTH, PAPER_EXPANSION, PAPER_BLOCKS = 2048, 2, 3  # organisers' head: 2048 -> 4096 -> 2048, 3 blocks
NOVELTY_K = 10  # novelty looks at each user's 10 highest-scored targets
NOVELTY_POWER = 100  # (1 - popularity) ** 100: only predictions far from the popular head score
SCORE_WEIGHTS = {"auroc": 0.8, "novelty": 0.1, "diversity": 0.1}


class _Block(nn.Module):
    """Pre-norm residual inverted bottleneck: x + Linear(GELU(Linear(LayerNorm(x)))), W -> expansion*W -> W."""

    def __init__(self, width: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.expand = nn.Linear(width, expansion * width)
        self.act = nn.GELU()
        self.project = nn.Linear(expansion * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.act(self.expand(self.norm(x))))


class DownstreamMLP(nn.Module):
    """Linear -> LayerNorm -> `blocks` pre-norm residual blocks -> LayerNorm -> Linear, as the organisers' Net.

    Pre-norm (LayerNorm inside the residual branch, one more before the output layer) is the
    organisers' choice and keeps the residual stream unnormalised, so depth does not rescale it.
    Paper sizes: width=PAPER_WIDTH (2048), expansion=PAPER_EXPANSION (2, i.e. 4096), blocks=3;
    the defaults are CPU-sized.
    """

    def __init__(self, in_dim: int, n_outputs: int, width: int = 256, blocks: int = 3, expansion: int = 2):
        super().__init__()
        self.input = nn.Linear(in_dim, width)
        self.input_norm = nn.LayerNorm(width)
        self.blocks = nn.ModuleList([_Block(width, expansion) for _ in range(blocks)])
        self.output_norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(self.input(x))
        for block in self.blocks:
            x = block(x)
        return self.output(self.output_norm(x))


# ---------------------------------------------------------------- metrics (numpy)


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


def _task_metrics(logits: np.ndarray, y: np.ndarray, popularity: np.ndarray | None) -> dict[str, float]:
    """{"auroc"} for a binary task (popularity None), the four propensity metrics for a multi-label one."""
    if popularity is None:
        return {"auroc": roc_auc(y, logits[:, 0])}
    out = {"auroc": multilabel_auroc(y, logits), "novelty": novelty(logits, popularity), "diversity": diversity(logits)}
    out["score"] = challenge_score(out["auroc"], out["novelty"], out["diversity"])
    return out


# ---------------------------------------------------------------- training


def _predict(model: DownstreamMLP, x: torch.Tensor, batch_size: int) -> np.ndarray:
    """float64 logits [N, n_outputs] in eval mode, without building a graph."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()


def _selection_score(logits: np.ndarray, y: np.ndarray, popularity: np.ndarray | None) -> float:
    """What picks the best epoch, as the organisers' compute_weighted_metric: AUROC (binary) or the challenge score."""
    metrics = _task_metrics(logits, y, popularity)
    return metrics["score"] if popularity is not None else metrics["auroc"]


def train_downstream(
    embeddings: np.ndarray,
    labels: np.ndarray,
    fit: np.ndarray,
    evaluate: np.ndarray,
    popularity: np.ndarray | None = None,
    width: int = 256,
    blocks: int = 3,
    expansion: int = 2,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    val_fraction: float = 0.1,
) -> dict[str, float]:
    """Train the fixed head on FIT users, keep the best epoch, score it on the EVALUATE users.

    labels: [U, K] 0/1 (multi-label, a propensity task) or [U] 0/1 (binary, e.g. churn: pass only
    active users in the masks). BCE with logits, AdamW(lr), `epochs` epochs; after each epoch the
    head is scored on a seeded `val_fraction` of the FIT users (never on EVALUATE users) and the
    weights of the best epoch are kept; "best" is the organisers' criterion, the task's score
    (challenge_score for multi-label, AUROC for binary). popularity defaults to popularity_of(labels, fit).
    Deterministic for a seed at a given torch thread count.
    Returns {"auroc", "novelty", "diversity", "score"} (multi-label) or {"auroc"} (binary), on EVALUATE users.
    """
    x = np.asarray(embeddings)
    y = np.asarray(labels)
    fit, evaluate = np.asarray(fit), np.asarray(evaluate)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [U, D], got shape {x.shape}")
    if y.ndim not in (1, 2) or len(y) != len(x):
        raise ValueError(f"labels must be [U] or [U, K] with U={len(x)}, got shape {y.shape}")
    for name, mask in (("fit", fit), ("evaluate", evaluate)):
        if mask.dtype != bool or mask.shape != (len(x),):
            raise ValueError(f"{name} must be a bool mask of shape ({len(x)},), got {mask.dtype} {mask.shape}")
    if (fit & evaluate).any():
        raise ValueError(f"{int((fit & evaluate).sum())} users are in both fit and evaluate")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    used = fit | evaluate
    if not np.isin(y[used], (0, 1)).all():
        raise ValueError("labels of fit/evaluate users must be 0 or 1")
    if not np.isfinite(x[used]).all():
        raise ValueError(f"embeddings of fit/evaluate users hold {int((~np.isfinite(x[used])).sum())} non-finite values")

    multilabel = y.ndim == 2
    if not multilabel and popularity is not None:
        raise ValueError("popularity is only used by multi-label tasks; labels are binary [U]")
    if multilabel and popularity is None:
        popularity = popularity_of(y, fit)
    y2 = y.reshape(len(y), -1).astype(np.float32)
    target = y2 if multilabel else y2[:, 0]  # what the metrics compare logits against

    fit_rows = np.random.default_rng(seed).permutation(np.flatnonzero(fit))
    n_val = int(round(val_fraction * len(fit_rows)))
    if n_val < 1 or n_val == len(fit_rows):
        raise ValueError(f"val_fraction={val_fraction} of {len(fit_rows)} fit users leaves no validation or no training users")
    val_rows, train_rows = np.sort(fit_rows[:n_val]), fit_rows[n_val:]
    eval_rows = np.flatnonzero(evaluate)

    mean = x[fit].mean(axis=0, dtype=np.float64)
    std = x[fit].std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0  # constant dimensions carry nothing; leave them at 0
    xs = torch.from_numpy(((x - mean) / std).astype(np.float32))
    ys = torch.from_numpy(y2)

    with torch.random.fork_rng(devices=[]):  # seeded init without resetting the caller's global RNG
        torch.manual_seed(seed)
        model = DownstreamMLP(x.shape[1], y2.shape[1], width=width, blocks=blocks, expansion=expansion)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    train_index = torch.from_numpy(train_rows)
    best_score, best_state = -np.inf, None
    for _ in range(epochs):
        model.train()
        order = train_index[torch.randperm(len(train_index), generator=generator)]
        for i in range(0, len(order), batch_size):
            batch = order[i : i + batch_size]
            loss = nn.functional.binary_cross_entropy_with_logits(model(xs[batch]), ys[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        try:
            score = _selection_score(_predict(model, xs[val_rows], batch_size), target[val_rows], popularity)
        except ValueError as e:
            raise ValueError(f"validation users ({n_val} of the fit users): {e}") from e
        if score > best_score:
            best_score, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    try:
        return _task_metrics(_predict(model, xs[eval_rows], batch_size), target[eval_rows], popularity)
    except ValueError as e:
        raise ValueError(f"evaluate users: {e}") from e
