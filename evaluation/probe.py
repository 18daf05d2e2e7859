"""The linear probe: per target a standardised logistic regression on FIT users, ROC-AUC and KS on VAL and TEST.

One probe for every method keeps tables comparable: it measures what is linearly readable
from the embedding, not what a strong head can learn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from datamodules.targets import PROBE_KINDS, Target
from evaluation.metrics import ks_statistic, macro_ovr, roc_auc
from evaluation.splits import DEFAULT_FRACTIONS, FIT, PARTS, UNLABELLED, user_split

CV_GRID = [1e-3, 1e-2, 1e-1, 1.0, 10.0]  # C candidates when the probe picks C itself


def probe_embeddings(
    embeddings: np.ndarray,
    targets: Sequence[Target],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    parts: Sequence[str] = ("val", "test"),
    C: float | None = None,
    seed: int = 0,
    max_iter: int = 1000,
    scores: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, float]:
    """Fit StandardScaler + LogisticRegression on each target's FIT users; AUC and KS on each of `parts`.

    The users of a part are never touched unless the part is asked for, so selection code passes
    parts=("val",) and cannot read TEST. C=None picks the L2 strength per target by stratified
    5-fold cross-validation on the FIT users alone (ROC-AUC over CV_GRID).
    Returns {"probe_<part>/<target>/auc", "probe_<part>/<target>/ks"} (multiclass: macro one-vs-rest).
    `scores`, if given, receives each binary target's TEST (is positive, positive-class probability)
    pair, the input of a ROC curve.
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"parts: {unknown} are not among {sorted(PARTS)}")
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [U, D], got shape {x.shape}")
    results: dict[str, float] = {}
    for t in targets:
        if len(t.labels) != len(x):
            raise ValueError(f"target {t.name!r}: {len(t.labels)} labels for {len(x)} embedding rows")
        if t.kind not in PROBE_KINDS:
            raise ValueError(f"target {t.name!r}: unknown kind {t.kind!r} (expected one of {PROBE_KINDS})")
        split, fit, y_all = fit_side(t, seed, fractions)
        used = fit | np.isin(split, [PARTS[p] for p in parts])
        bad = int((~np.isfinite(x[used])).sum())
        if bad:
            raise ValueError(f"target {t.name!r}: embeddings of its {'/'.join(['FIT', *[p.upper() for p in parts]])} users hold {bad} non-finite values")
        y_fit = y_all[fit]
        if len(np.unique(y_fit)) < 2:
            raise ValueError(f"target {t.name!r}: FIT users hold {len(np.unique(y_fit))} classes; the probe needs 2+")

        if C is None:
            folds = StratifiedKFold(min(5, int(np.bincount(y_fit).min()) or 2), shuffle=True, random_state=seed)
            scoring = "roc_auc" if t.kind == "binary" else "roc_auc_ovr"
            head = LogisticRegressionCV(
                Cs=CV_GRID, l1_ratios=(0.0,), cv=folds, scoring=scoring, max_iter=max_iter, random_state=seed, use_legacy_attributes=False
            )
        else:
            head = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        model = make_pipeline(StandardScaler(), head)
        model.fit(x[fit], y_fit)

        for part in parts:
            rows = (split == PARTS[part]) & (t.labels >= 0)
            y = t.labels[rows]
            # Columns follow the target's classes, so a class missing from FIT scores 0 rather than shifting columns.
            probs = np.zeros((int(rows.sum()), len(t.classes)))
            probs[:, model.classes_] = model.predict_proba(x[rows])
            try:
                if t.kind == "binary":
                    auc, ks = roc_auc(y == 1, probs[:, 1]), ks_statistic(y == 1, probs[:, 1])
                    if scores is not None and part == "test":
                        scores[t.name] = (y == 1, probs[:, 1])
                else:
                    auc, ks = macro_ovr(y, probs, roc_auc), macro_ovr(y, probs, ks_statistic)
            except ValueError as e:
                raise ValueError(f"target {t.name!r} ({part.upper()} users, probe.split={list(fractions)}): {e}") from e
            results[f"probe_{part}/{t.name}/auc"] = auc
            results[f"probe_{part}/{t.name}/ks"] = ks
    return results


def fit_side(t: Target, seed: int, fractions: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(split, rows a head fits on, the labels it fits on) of one target.

    user_split protocol: the FIT users' labels. Challenge protocol (t.fit_labels): every user with a
    first-window label, as the organisers fit on all clients; VAL and TEST are scored on the second
    window, so no label a head fits on or selects with is ever reported. The split is drawn from the
    first-window labels (stratified by them).
    """
    if t.fit_labels is None:
        split = user_split(t.labels, seed, t.name, fractions)
        return split, split == FIT, t.labels
    split = user_split(t.fit_labels, seed, t.name, fractions)
    return split, split != UNLABELLED, t.fit_labels
