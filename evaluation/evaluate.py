"""The evaluate step every table row goes through (the method, each baseline, an ensemble).

The linear probe for binary and multiclass targets, the challenge's fixed downstream MLP for
multi-label ones; both report VAL (for selection) and TEST (for tables) metrics.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig

from datamodules.targets import MULTILABEL, PROBE_KINDS

if TYPE_CHECKING:
    from datamodules.preprocess import Prepared


def cutoff_epoch(prepared: Prepared) -> int | None:
    """The history cutoff as epoch seconds (None without a cutoff): the reference time of recency features."""
    cutoff = prepared.meta["cutoff"]
    return int(dt.datetime.fromisoformat(cutoff).replace(tzinfo=dt.timezone.utc).timestamp()) if cutoff else None


def evaluate(cfg: DictConfig, prepared: Prepared, embeddings: np.ndarray, scores: dict | None = None) -> dict[str, float]:
    """probe_val/* and probe_test/* for binary/multiclass targets, downstream_val/* and downstream_test/* for multi-label ones.

    `cfg` is the run config (its probe section and seed). `scores`, if given, receives each
    binary target's TEST labels and probabilities (ROC curves).
    """
    from evaluation.probe import probe_embeddings

    fractions = list(cfg.probe.split)
    targets = [t for t in prepared.targets if t.kind in PROBE_KINDS]
    out = {}
    if targets:
        out = probe_embeddings(
            embeddings, targets, fractions, C=cfg.probe.C, seed=cfg.seed, max_iter=cfg.probe.max_iter, scores=scores
        )
    for t in prepared.targets:
        if t.kind == MULTILABEL:
            from datamodules.targets import labelled_rows, multilabel_for
            from evaluation.downstream import train_downstream
            from evaluation.probe import fit_side
            from evaluation.splits import TEST, VAL

            split, fit, _ = fit_side(t, cfg.seed, fractions)
            labels, _ = multilabel_for(t, fit)  # classes from the FIT users' labels (or fixed: organisers' files, first window)
            scored = labelled_rows(labels)
            d = cfg.probe.downstream
            result = train_downstream(
                embeddings, labels, fit, (split == VAL) & scored, (split == TEST) & scored, popularity=t.popularity,
                fit_labels=t.fit_labels, width=d.width, blocks=d.blocks, epochs=d.epochs, lr=d.lr, batch_size=d.batch_size, seed=cfg.seed,
            )
            out.update({f"downstream_val/{t.name}/{k}": float(v) for k, v in result.val.items()})
            out.update({f"downstream_test/{t.name}/{k}": float(v) for k, v in result.test.items()})
    return out
