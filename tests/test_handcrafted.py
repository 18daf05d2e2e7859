"""Handcrafted features: over the whole pre-cutoff history (cached) and a bare store's events, every value worked out by hand."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest

from datamodules.config import FeaturesConfig
from datamodules.history_features import history_features
from datamodules.preprocess import prepare
from datamodules.schema import EventSchema, FieldSpec
from datamodules.sequences import SequenceStore
from datamodules.sources.base import DataError
from evaluation.baselines import random_embeddings
from evaluation.handcrafted import handcrafted_features
from tests.conftest import generic_config

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


# --- whole-history features computed while preprocessing (datamodules/history_features.py) ---

REF = dt.datetime(2024, 3, 1)


def history_frame() -> pl.LazyFrame:
    """3 users, days before REF (the cutoff) worked out by hand; 'price' is an amount, 'sku' the item."""
    rows = [  # user, days before REF, type, sku, price
        ("a", 1.0, "buy", "s1", "10"),
        ("a", 2.0, "cart", "s1", "10"),  # bought later (day 1): not abandoned
        ("a", 3.0, "cart", "s2", "30"),  # never bought: abandoned
        ("a", 10.0, "view", None, None),
        ("a", 40.0, "view", None, None),
        ("b", 8.0, "view", None, None),
        ("b", 9.0, "cart", "s3", "20"),  # bought before it was carted (day 12), not after: abandoned
        ("b", 12.0, "buy", "s3", "20"),
        ("c", 0.5, "view", None, None),
    ]
    users = {"a": 0, "b": 1, "c": 2}
    return pl.DataFrame(
        {
            "_user": [users[r[0]] for r in rows],
            "user_id": [r[0] for r in rows],
            "time": [REF - dt.timedelta(days=r[1]) for r in rows],
            "event_type": [r[2] for r in rows],
            "sku": [r[3] for r in rows],
            "price": [r[4] for r in rows],
            "_file": "events.csv",
            "_row": list(range(len(rows))),
        }
    ).lazy()


SCHEMA = EventSchema("user", "time", [FieldSpec("event_type"), FieldSpec("sku"), FieldSpec("price")], event_type="event_type")
VOCABS = {"event_type": ["view", "cart", "buy"], "sku": ["s1", "s3"], "price": ["10", "20", "30"]}
PAPER = FeaturesConfig(windows_days=[7, 30], amounts=["price"], buy="buy", cart="cart", item="sku")


def test_windows_week_over_week_gaps_amounts_and_abandonment_by_hand():
    f = history_features(history_frame(), SCHEMA, VOCABS, PAPER, REF)
    assert f["user_id"].to_list() == ["a", "b", "c"]
    col = {n: f[n].to_numpy() for n in f.columns[1:]}
    close(col["count/all/7d"], [3, 0, 1])
    close(col["count/all/30d"], [4, 3, 1])
    close(col["count/all/all"], [5, 3, 1])
    close(col["count/cart/7d"], [2, 0, 0])
    close(col["count/view/30d"], [1, 1, 1])
    close(col["count/buy/all"], [1, 1, 0])
    close(col["wow/all"], np.log1p([3, 0, 1]) - np.log1p([1, 3, 0]))  # last 7 days vs days 7-14 before
    close(col["recency_days"], [1.0, 8.0, 0.5])
    close(col["span_days"], [39.0, 4.0, 0.0])
    close(col["mean_gap_days"], [39.0 / 4, 4.0 / 2, 0.5])  # one event: the time since it
    close(col["active_days"], [5, 3, 1])
    close(col["mean/price/all"], [50 / 3, 20.0, 0.0])  # views have no price; c has none at all
    close(col["mean/price/cart"], [20.0, 20.0, 0.0])
    close(col["std/price/cart"], [10.0, 0.0, 0.0])
    close(col["q50/price/buy"], [10.0, 20.0, 0.0])
    close(col["q90/price/all"], [26.0, 20.0, 0.0])  # linear interpolation of 10, 10, 30
    close(col["cart_abandoned"], [1, 1, 0])
    close(col["cart_abandonment"], [0.5, 1.0, 0.0])
    close(col["hist/event_type/5"], [2 / 5, 1 / 3, 1.0])  # id 5 = view, the vocabulary's first value
    close(col["hist/sku/2"], [0.2, 0.0, 0.0])  # s2 is not in the vocabulary: rare (id 2)
    close(col["hist/sku/1"], [0.4, 1 / 3, 1.0])  # events without a sku: missing (id 1)
    close(col["hist/sku/6"], [0.0, 2 / 3, 0.0])  # s3


def test_features_config_and_amounts_are_checked():
    with pytest.raises(DataError, match="data.features.amounts: 'sku2'"):
        history_features(history_frame(), SCHEMA, VOCABS, FeaturesConfig(amounts=["sku2"]), REF)
    with pytest.raises(DataError, match="data.features.buy: 'purchase'"):
        history_features(history_frame(), SCHEMA, VOCABS, FeaturesConfig(buy="purchase", cart="cart", item="sku"), REF)
    with pytest.raises(DataError, match="events.csv: column 'sku', row 0: data.features.amounts needs numbers, got 's1'"):
        history_features(history_frame(), SCHEMA, VOCABS, FeaturesConfig(amounts=["sku"]), REF)
    # a history of views only (data.event_types) drops the bought/carted statistics instead of refusing the shared preset
    views = history_frame().filter(pl.col("event_type") == "view")
    f = history_features(views, SCHEMA, {**VOCABS, "event_type": ["view"]}, PAPER, REF, kept_types=["view"])
    assert "cart_abandonment" not in f.columns and "mean/price/buy" not in f.columns and "count/view/all" in f.columns
    with pytest.raises(DataError, match="data.features.buy: 'buy' is not an event type seen in training history; types are \\['view'\\]"):
        history_features(views, SCHEMA, {**VOCABS, "event_type": ["view"]}, PAPER, REF)


def long_history(tmp_path):
    """u0: 300 buys, one an hour, then 5 refunds after the cutoff; u1..u9: 3 buys and a refund each before it."""
    start = dt.datetime(2024, 1, 1)
    rows = [("u0", start + dt.timedelta(hours=i), "buy", "m", 1.0, "x") for i in range(300)]
    rows += [("u0", dt.datetime(2024, 2, 1) + dt.timedelta(hours=i), "refund", "m", 1.0, "x") for i in range(5)]
    rows += [(f"u{u}", start + dt.timedelta(days=d), "refund" if d == 3 else "buy", "m", 2.0, "x") for u in range(1, 10) for d in range(4)]
    frame = pl.DataFrame(rows, schema=["client", "ts", "event_type", "merchant", "amount", "description"], orient="row")
    frame = frame.with_columns(pl.col("ts").dt.strftime("%Y-%m-%d %H:%M:%S"))
    frame.write_csv(tmp_path / "events.csv")
    return generic_config(tmp_path / "events.csv", None, tmp_path / "cache", cutoff="2024-02-01", max_len=128)


def test_prepared_features_count_the_whole_history_before_the_cutoff(tmp_path):
    prepared = prepare(long_history(tmp_path))
    x, names = handcrafted_features(prepared)
    assert prepared.store.lengths[0] == 128  # the sequence is cut, the features are not
    col = {n: x[:, i] for i, n in enumerate(names)}
    assert col["count/all/all"][0] == 300 and col["count/buy/all"][0] == 300
    assert col["count/refund/all"][0] == 0  # every refund is at or after the cutoff
    assert col["count/all/7d"][0] == 0  # the last history event is 2024-01-13 11:00, 18 days 13 hours before the cutoff
    assert col["count/all/30d"][0] == 275  # after 2024-01-02 00:00: hours 25..299 (hour 24 is exactly 30 days before)
    np.testing.assert_allclose(col["recency_days"][0], 18.5 + 1 / 24, rtol=1e-6)
    assert col["count/all/all"][1:].tolist() == [4.0] * 9 and col["count/refund/all"][1:].tolist() == [1.0] * 9
    # a bare store (no cache) falls back to its own events: the truncated tail
    assert handcrafted_features(prepared.store)[0][0, 0] == np.float32(np.log1p(128))
