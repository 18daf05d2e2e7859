"""Each target's users split three ways: FIT trains the heads, VAL selects, TEST is only reported.

The split is computed when evaluating, from (seed, target name, labels) and the fractions of
`probe.split`, so changing the fractions needs no new preprocessing. Every user draws one
seeded key, independent of any label; within each class the users are ordered by key and cut
at the fractions (stratified). Multi-label targets are cut the same way over all their labelled
users (a row of -1 is unlabelled, e.g. a client outside the relevant ones).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

FIT, VAL, TEST, UNLABELLED = 0, 1, 2, -1
PARTS = {"val": VAL, "test": TEST}  # the parts that are scored; FIT only trains
DEFAULT_FRACTIONS = (0.5, 0.25, 0.25)


def check_fractions(fractions: Sequence[float], key: str = "probe.split") -> tuple[float, float, float]:
    """(fit, val, test) as floats; a ValueError naming `key` unless three non-negative numbers summing to 1."""
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected three numbers [fit, val, test], got {fractions!r}") from None
    if len(values) != 3 or any(not np.isfinite(v) or v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-9:
        raise ValueError(f"{key}: expected three non-negative numbers [fit, val, test] summing to 1, got {list(fractions)}")
    return values


def user_keys(n_users: int, seed: int, name: str) -> np.ndarray:
    """float64 [U] uniform keys, one per store row, seeded per target so targets do not share a split."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())]).random(n_users)


def user_split(labels: np.ndarray, seed: int, name: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> np.ndarray:
    """int8 [U]: FIT, VAL, TEST or UNLABELLED (label -1) per store row; labels [U] (classes) or [U, K] (multi-label)."""
    fit, val, _ = check_fractions(fractions)
    labels = np.asarray(labels)
    keys = user_keys(len(labels), seed, name)
    split = np.full(len(labels), UNLABELLED, dtype=np.int8)
    groups = [np.flatnonzero((labels >= 0).all(axis=1))] if labels.ndim == 2 else [np.flatnonzero(labels == c) for c in np.unique(labels[labels >= 0])]
    for rows in groups:
        ordered = rows[np.argsort(keys[rows], kind="stable")]
        cut_fit, cut_val = (int(round(c * len(ordered))) for c in (fit, fit + val))
        split[ordered[:cut_fit]] = FIT
        split[ordered[cut_fit:cut_val]] = VAL
        split[ordered[cut_val:]] = TEST
    return split
