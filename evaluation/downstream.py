"""The RecSys Challenge 2025 downstream protocol: one FIXED MLP head per task on frozen user embeddings.

Every embedding method is scored with the same head, optimiser and budget, so differences in the
table come from the embeddings. The head, the metrics and the score follow the organisers' public
evaluation code (github.com/Synerise/recsys2025, `training_pipeline/`: model.py, metrics.py,
metric_calculators.py, metrics_containers.py, constants.py) and /work/shared/REFERENCES.md
("Encode Me If You Can" -> "Challenge evaluation"). Where the two differ, the organisers' code wins;
every deviation from it is listed here:

- Protocol (data.protocol=challenge, recsys2025.yaml's default): as the organisers, the head trains on
  every labelled client's labels of the first 14-day window after the history and is scored on the
  same clients' labels of the following 14 days. The organisers keep the epoch best on the very labels
  they report, which leaks them into the result; here the scored clients are split (probe.split) into
  VAL, whose second-window labels choose the epoch (and nothing else), and TEST, whose second-window
  labels are only reported. The head still trains on every client's first-window labels (TEST's too:
  an earlier window, never a reported label). Propensity classes and popularity come from that first
  window (or the organisers' target/ files). data.protocol=user_split keeps one window: FIT users'
  labels train, VAL users' select, TEST users' are reported, classes and popularity from FIT users.
- Epoch selection: by the organisers' criterion (the task's score), on VAL users only.
- Inputs are standardised with the mean/std of the FIT users (the organisers feed raw embeddings).
- Training batches are shuffled with a seeded generator (the organisers' train loader does not shuffle).
- Metrics: see evaluation/challenge_metrics.py (one deviation in multi-label AUROC).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from evaluation.challenge_metrics import popularity_of, task_metrics

PAPER_WIDTH, PAPER_EXPANSION, PAPER_BLOCKS = 2048, 2, 3  # organisers' head: 2048 -> 4096 -> 2048, 3 blocks


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


# ---------------------------------------------------------------- training


def _predict(model: DownstreamMLP, x: torch.Tensor, batch_size: int) -> np.ndarray:
    """float64 logits [N, n_outputs] in eval mode, without building a graph."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()


def _selection_score(logits: np.ndarray, y: np.ndarray, popularity: np.ndarray | None) -> float:
    """What picks the best epoch, as the organisers' compute_weighted_metric: AUROC (binary) or the challenge score."""
    metrics = task_metrics(logits, y, popularity)
    return metrics["score"] if popularity is not None else metrics["auroc"]


@dataclass
class DownstreamResult:
    """The head of the best VAL epoch: its metrics on VAL users and, if asked, on TEST users."""

    val: dict[str, float]
    test: dict[str, float] | None
    best_epoch: int  # 0-based


def train_downstream(
    embeddings: np.ndarray,
    labels: np.ndarray,
    fit: np.ndarray,
    val: np.ndarray,
    test: np.ndarray | None = None,
    popularity: np.ndarray | None = None,
    fit_labels: np.ndarray | None = None,
    width: int = 256,
    blocks: int = 3,
    expansion: int = 2,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> DownstreamResult:
    """Train the fixed head on FIT users, keep the epoch best on VAL users, score it on VAL and TEST users.

    labels: [U, K] 0/1 (multi-label, a propensity task) or [U] 0/1 (binary, e.g. churn: pass only
    active users in the masks). BCE with logits, AdamW(lr), `epochs` epochs; after each epoch the
    head is scored on the VAL users and the weights of the best epoch are kept; "best" is the
    organisers' criterion, the task's score (challenge_score for multi-label, AUROC for binary).
    TEST users (None: none) are scored once, after the choice. fit_labels (the challenge
    protocol's first window; default: labels) are what the head trains on; with them FIT may
    hold VAL and TEST users too (same users, an earlier window). popularity defaults to
    popularity_of(the labels trained on, fit). Deterministic for a seed at a given torch thread count.
    Metrics: {"auroc", "novelty", "diversity", "score"} (multi-label) or {"auroc"} (binary).
    """
    x = np.asarray(embeddings)
    y = np.asarray(labels)
    masks = {"fit": np.asarray(fit), "val": np.asarray(val)}
    if test is not None:
        masks["test"] = np.asarray(test)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [U, D], got shape {x.shape}")
    if y.ndim not in (1, 2) or len(y) != len(x):
        raise ValueError(f"labels must be [U] or [U, K] with U={len(x)}, got shape {y.shape}")
    for name, mask in masks.items():
        if mask.dtype != bool or mask.shape != (len(x),):
            raise ValueError(f"{name} must be a bool mask of shape ({len(x)},), got {mask.dtype} {mask.shape}")
        if not mask.any():
            raise ValueError(f"{name}: no users selected")
    disjoint = masks if fit_labels is None else {k: m for k, m in masks.items() if k != "fit"}
    overlap = sum(m.astype(int) for m in disjoint.values()) > 1
    if overlap.any():
        raise ValueError(f"{int(overlap.sum())} users are in more than one of {sorted(disjoint)}")
    y_fit = y if fit_labels is None else np.asarray(fit_labels)
    if y_fit.shape != y.shape:
        raise ValueError(f"fit_labels must have the shape of labels {y.shape}, got {y_fit.shape}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    used = np.logical_or.reduce(list(masks.values()))
    scored = np.logical_or.reduce([m for k, m in masks.items() if k != "fit"])
    if not np.isin(y[scored], (0, 1)).all() or not np.isin(y_fit[masks["fit"]], (0, 1)).all():
        raise ValueError(f"labels of {'/'.join(masks)} users must be 0 or 1")
    if not np.isfinite(x[used]).all():
        raise ValueError(f"embeddings of {'/'.join(masks)} users hold {int((~np.isfinite(x[used])).sum())} non-finite values")

    fit = masks["fit"]
    multilabel = y.ndim == 2
    if not multilabel and popularity is not None:
        raise ValueError("popularity is only used by multi-label tasks; labels are binary [U]")
    if multilabel and popularity is None:
        popularity = popularity_of(y_fit, fit)
    y2 = y.reshape(len(y), -1).astype(np.float32)
    target = y2 if multilabel else y2[:, 0]  # what the metrics compare logits against

    mean = x[fit].mean(axis=0, dtype=np.float64)
    std = x[fit].std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0  # constant dimensions carry nothing; leave them at 0
    xs = torch.from_numpy(((x - mean) / std).astype(np.float32))
    ys = torch.from_numpy(y_fit.reshape(len(y_fit), -1).astype(np.float32))
    val_rows = np.flatnonzero(masks["val"])

    with torch.random.fork_rng(devices=[]):  # seeded init without resetting the caller's global RNG
        torch.manual_seed(seed)
        model = DownstreamMLP(x.shape[1], y2.shape[1], width=width, blocks=blocks, expansion=expansion)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    train_index = torch.from_numpy(np.flatnonzero(fit))
    best_score, best_state, best_epoch = -np.inf, None, 0
    for epoch in range(epochs):
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
            raise ValueError(f"VAL users ({len(val_rows)}): {e}") from e
        if score > best_score:
            best_score, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)
    scored: dict[str, dict[str, float]] = {}
    for name in ("val", "test"):
        if name in masks:
            rows = np.flatnonzero(masks[name])
            try:
                scored[name] = task_metrics(_predict(model, xs[rows], batch_size), target[rows], popularity)
            except ValueError as e:
                raise ValueError(f"{name.upper()} users: {e}") from e
    return DownstreamResult(scored["val"], scored.get("test"), best_epoch)
