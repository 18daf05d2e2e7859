"""Hand-made features on a 3-user store whose every value is worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.sequences import SequenceStore
from evaluation.baselines import random_embeddings
from evaluation.handcrafted import handcrafted_features

D = 86_400


def make_store() -> SequenceStore:
    # user 0: 3 events on days 0, 0, 2; user 1: 1 event on day 5; user 2: days 3 (+100 s) and 1, out of order.
    return SequenceStore(
        user_ids=np.array(["u0", "u1", "u2"]),
        offsets=np.array([0, 3, 4, 6], dtype=np.int64),
        tokens={
            "a": np.array([5, 5, 6, 1, 6, 2], dtype=np.int32),
            "day": np.array([10, 10, 12, 15, 13, 11], dtype=np.int32),
        },
        values={"amount": np.array([1.0, 3.0, np.nan, np.nan, 2.0, 4.0], dtype=np.float32)},
        times=np.array([0, D // 2, 2 * D, 5 * D, 3 * D + 100, D], dtype=np.int64),
        vocab_sizes={"a": 7, "day": 100},
    )


def close(got: np.ndarray, want) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_features_exact_values_and_names():
    x, names = handcrafted_features(make_store())
    assert names == (
        ["log_count", "recency_days", "span_days", "log_distinct_days"]
        + [f"hist/a/{i}" for i in range(1, 7)]
        + ["distinct/day", "mean/amount", "std/amount"]
    )
    assert x.shape == (3, len(names)) and x.dtype == np.float32
    col = {n: x[:, i] for i, n in enumerate(names)}
    close(col["log_count"], np.log1p([3, 1, 2]))
    close(col["recency_days"], [3.0, 0.0, 2.0 - 100 / D])  # reference = latest event (day 5)
    close(col["span_days"], [2.0, 0.0, 2.0 + 100 / D])
    close(col["log_distinct_days"], np.log1p([2, 1, 2]))
    hist = x[:, names.index("hist/a/1") : names.index("hist/a/6") + 1]
    close(hist, [[0, 0, 0, 0, 2 / 3, 1 / 3], [1, 0, 0, 0, 0, 0], [0, 0.5, 0, 0, 0, 0.5]])
    close(col["distinct/day"], [2 / 3, 1.0, 1.0])
    close(col["mean/amount"], [2.0, 0.0, 3.0])  # NaNs ignored; user 1 has no finite value
    close(col["std/amount"], [1.0, 0.0, 1.0])


def test_reference_time_and_wide_vocab_histogram():
    x, names = handcrafted_features(make_store(), reference_time=10 * D, max_hist_vocab=100)
    np.testing.assert_allclose(x[:, names.index("recency_days")], [8.0, 5.0, 7.0 - 100 / D], rtol=1e-6)
    assert "distinct/day" not in names
    assert x.shape == (3, 4 + 6 + 99 + 2)
    np.testing.assert_allclose(x[:, names.index("hist/day/12")], [1 / 3, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(x[:, names.index("hist/day/15")], [0.0, 1.0, 0.0], rtol=1e-6)


def test_rejects_ids_outside_vocab_and_empty_users():
    store = make_store()
    store.tokens["a"][0] = 7
    with pytest.raises(ValueError, match="'a'"):
        handcrafted_features(store)
    store = make_store()
    store.offsets = np.array([0, 3, 3, 6], dtype=np.int64)
    with pytest.raises(ValueError, match="at least one event"):
        handcrafted_features(store)


def test_random_embeddings_deterministic_per_seed():
    a, b, c = random_embeddings(50, 8, seed=1), random_embeddings(50, 8, seed=1), random_embeddings(50, 8, seed=2)
    assert a.shape == (50, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert abs(a.mean()) < 0.3 and 0.7 < a.std() < 1.3
