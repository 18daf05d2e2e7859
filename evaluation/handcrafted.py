"""The handcrafted baseline: per-user aggregates an analyst would write in an afternoon.

A learned embedding is only interesting if its probe beats these (counts, recency, category mix).
A prepared cache holds them computed over each user's whole history at preprocessing
(datamodules/history_features.py: windows, week-over-week change, amounts, cart abandonment);
a bare store (or new data without them) falls back to aggregates of its own events, computed
on the flat arrays, so it scales like the data, not the users: they see at most max_len events.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from typing import TYPE_CHECKING

from datamodules.schema import PAD
from datamodules.store import SequenceStore

if TYPE_CHECKING:
    from datamodules.preprocess import Prepared

SECONDS_PER_DAY = 86_400


def _distinct_per_user(user: np.ndarray, ids: np.ndarray, n_users: int) -> np.ndarray:
    """Number of distinct non-negative ids per user, via unique (user, id) pair keys."""
    span = int(ids.max()) + 1 if ids.size else 1
    pairs = np.unique(user * span + ids)
    return np.bincount(pairs // span, minlength=n_users)


def handcrafted_features(
    data: Prepared | SequenceStore,
    reference_time: int | None = None,
    max_hist_vocab: int = 64,
) -> tuple[np.ndarray, list[str]]:
    """Per-user aggregate features, float32 [U, F] in store order, and their names.

    A Prepared with `features` (a cache built by datamodules/preprocess.py): those columns,
    whose reference time is the cache's cutoff (the arguments do not apply). Otherwise the
    store's own events, columns in order:
      log_count, recency_days (reference_time - last event), span_days (last - first event),
      log_distinct_days (UTC calendar days with an event);
      per token field (store order): vocab <= max_hist_vocab -> hist/<field>/<id> for ids 1..V-1
      (share of the user's events; PAD skipped), else distinct/<field> = distinct ids / events;
      per value field: mean/<field> and std/<field> (population) over finite values, 0 when none.
    reference_time defaults to the latest event time in the store.
    """
    store = data if isinstance(data, SequenceStore) else data.store
    features = None if isinstance(data, SequenceStore) else data.features
    if features is not None:
        if not np.array_equal(features["user_id"].cast(pl.String).to_numpy(), np.asarray(store.user_ids).astype(str)):
            raise ValueError("handcrafted_features: prepared.features is not in the store's user order")
        values = features.drop("user_id")
        return values.to_numpy().astype(np.float32), values.columns
    n_users = len(store)
    lengths = store.lengths
    if n_users == 0 or lengths.min() < 1:
        raise ValueError("handcrafted_features: every user needs at least one event")
    user = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    starts = store.offsets[:-1]
    times = store.times.astype(np.int64)
    ref = int(times.max()) if reference_time is None else int(reference_time)
    first = np.minimum.reduceat(times, starts)
    last = np.maximum.reduceat(times, starts)
    days = np.floor_divide(times, SECONDS_PER_DAY)

    # Blocks of [U, k] float32, stacked once at the end (histograms can be wide).
    blocks = [
        np.column_stack(
            [
                np.log1p(lengths),
                (ref - last) / SECONDS_PER_DAY,
                (last - first) / SECONDS_PER_DAY,
                np.log1p(_distinct_per_user(user, days - days.min(), n_users)),
            ]
        ).astype(np.float32)
    ]
    names = ["log_count", "recency_days", "span_days", "log_distinct_days"]

    for field, ids in store.tokens.items():
        vocab = store.vocab_sizes[field]
        ids = ids.astype(np.int64)
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"handcrafted_features: field {field!r} has ids outside [0, {vocab})")
        if vocab <= max_hist_vocab:
            counts = np.bincount(user * vocab + ids, minlength=n_users * vocab).reshape(n_users, vocab)
            counts = counts[:, PAD + 1 :]
            totals = np.maximum(counts.sum(axis=1, keepdims=True), 1)
            blocks.append((counts / totals).astype(np.float32))
            names.extend(f"hist/{field}/{i}" for i in range(PAD + 1, vocab))
        else:
            blocks.append((_distinct_per_user(user, ids, n_users) / lengths).astype(np.float32)[:, None])
            names.append(f"distinct/{field}")

    for field, vals in store.values.items():
        v = vals.astype(np.float64)
        finite = np.isfinite(v)
        n = np.bincount(user[finite], minlength=n_users)
        safe_n = np.maximum(n, 1)
        mean = np.bincount(user[finite], weights=v[finite], minlength=n_users) / safe_n
        # Two passes (deviations from the mean) avoid the cancellation of E[x^2] - E[x]^2.
        dev = v[finite] - mean[user[finite]]
        std = np.sqrt(np.bincount(user[finite], weights=dev * dev, minlength=n_users) / safe_n)
        blocks.append(np.column_stack([mean, std]).astype(np.float32))
        names.extend([f"mean/{field}", f"std/{field}"])

    return np.hstack(blocks), names
