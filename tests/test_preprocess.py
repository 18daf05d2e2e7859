"""Preprocessing: vocabularies and reserved ids, ordering, truncation, time index, cache, targets."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import numpy as np
import polars as pl
import pytest

from datamodules.config import TargetConfig
from datamodules.preprocess import prepare
from datamodules.schema import DAY_FIELD, FIRST_ID, MISSING, RARE, WEEK_FIELD
from tests.conftest import generic_config


def write(tmp_path, rows, name="events.csv"):
    frame = pl.DataFrame(rows, schema=["client", "ts", "event_type", "merchant", "amount", "description"], orient="row")
    frame.write_csv(tmp_path / name)
    return tmp_path / name


def test_vocab_reserved_ids_rare_and_missing(tmp_path):
    # 'a' x3, 'b' x2, 'c' x1 on one training user; top_k=2 keeps a, b; c is rare; empty is missing.
    rows = [("u1", f"2024-01-0{i + 1} 00:00:00", "buy", m, 1.0, "x") for i, m in enumerate(["a", "a", "a", "b", "b", "c"])]
    rows.append(("u1", "2024-01-08 00:00:00", "buy", None, 1.0, "x"))
    cfg = generic_config(write(tmp_path, rows), None, tmp_path / "cache", top_k=2, val_fraction=0.0)
    p = prepare(cfg)
    assert p.vocabs["merchant"] == ["a", "b"]
    assert p.store.vocab_sizes["merchant"] == FIRST_ID + 2
    assert p.store.tokens["merchant"].tolist() == [5, 5, 5, 6, 6, RARE, MISSING]


def test_vocab_fitted_on_training_users_only(tmp_path):
    rows = [(f"u{u}", "2024-01-01 00:00:00", "buy", f"m{u}", 1.0, "x") for u in range(50)]
    cfg = generic_config(write(tmp_path, rows), None, tmp_path / "cache", val_fraction=0.3)
    p = prepare(cfg)
    assert 0 < p.is_val.sum() < 50
    val_rows = np.flatnonzero(p.is_val)
    # every val user's merchant is unique to them, so it was never seen in training: rare
    assert all(p.store.tokens["merchant"][p.store.offsets[r]] == RARE for r in val_rows)
    assert set(p.vocabs["merchant"]) == {f"m{u}" for u, v in zip(p.store.user_ids, p.is_val) if not v for u in [u[1:]]}


def test_order_ties_and_truncation(tmp_path):
    # out-of-order file rows, two events at the same second (file order kept), max_len 3 keeps the last three
    rows = [
        ("u1", "2024-01-05 00:00:00", "buy", "e", 5.0, "x"),
        ("u1", "2024-01-01 00:00:00", "buy", "a", 1.0, "x"),
        ("u1", "2024-01-03 00:00:00", "buy", "c1", 3.0, "x"),
        ("u1", "2024-01-03 00:00:00", "buy", "c2", 3.5, "x"),
        ("u1", "2024-01-02 00:00:00", "buy", "b", 2.0, "x"),
    ]
    cfg = generic_config(write(tmp_path, rows), None, tmp_path / "cache", max_len=3, val_fraction=0.0)
    p = prepare(cfg)
    inverse = {i + FIRST_ID: v for i, v in enumerate(p.vocabs["merchant"])}
    assert [inverse[t] for t in p.store.tokens["merchant"]] == ["c1", "c2", "e"]
    assert p.store.values["amount"].tolist() == [3.0, 3.5, 5.0]
    assert p.meta["counts"]["truncated_events"] == 2


def test_ties_across_files_keep_the_source_order(tmp_path):
    # the generic source reads a glob's files in sorted order: at equal times, a.csv's event comes first
    write(tmp_path, [("u1", "2024-01-01 00:00:00", "buy", "from_b", 1.0, "x")], "b.csv")
    write(tmp_path, [("u1", "2024-01-01 00:00:00", "buy", "from_a", 1.0, "x"), ("u1", "2024-01-02 00:00:00", "buy", "later_a", 1.0, "x")], "a.csv")
    cfg = generic_config(tmp_path / "*.csv", None, tmp_path / "cache", val_fraction=0.0)
    p = prepare(cfg)
    inverse = {i + FIRST_ID: v for i, v in enumerate(p.vocabs["merchant"])}
    assert [inverse[t] for t in p.store.tokens["merchant"]] == ["from_a", "from_b", "later_a"]


def test_day_and_week_index(tmp_path):
    rows = [("u1", d, "buy", "a", 1.0, "x") for d in ["2024-01-01 10:00:00", "2024-01-02 09:00:00", "2024-01-09 12:00:00", "2024-01-20 00:00:00"]]
    cfg = generic_config(write(tmp_path, rows), None, tmp_path / "cache", val_fraction=0.0)
    p = prepare(cfg)
    days = p.store.tokens[DAY_FIELD] - FIRST_ID
    assert days.tolist() == [0, 0, 8, 18]  # whole days since the first event
    assert (p.store.tokens[WEEK_FIELD] - FIRST_ID).tolist() == [0, 0, 1, 2]
    assert p.store.vocab_sizes[DAY_FIELD] == FIRST_ID + 19


def test_numeric_buckets_keep_raw_value(tmp_path):
    rows = [("u1", f"2024-01-{i + 1:02d} 00:00:00", "buy", "a", float(i), "x") for i in range(20)]
    rows.append(("u1", "2024-01-25 00:00:00", "buy", "a", None, "x"))
    cfg = generic_config(write(tmp_path, rows), None, tmp_path / "cache", val_fraction=0.0)
    p = prepare(cfg)
    tok = p.store.tokens["amount"]
    assert tok[-1] == MISSING and np.isnan(p.store.values["amount"][-1])
    assert (np.diff(tok[:-1]) >= 0).all() and tok[0] == FIRST_ID and tok[-2] == FIRST_ID + 3  # 4 quantile buckets
    assert p.store.values["amount"][:3].tolist() == [0.0, 1.0, 2.0]


def test_duplicates_dropped_and_counted(tmp_path):
    row = ("u1", "2024-01-01 00:00:00", "buy", "a", 1.0, "x")
    cfg = generic_config(write(tmp_path, [row, row, row]), None, tmp_path / "cache", val_fraction=0.0)
    p = prepare(cfg)
    assert p.store.n_events == 1 and p.meta["counts"]["duplicate_events"] == 2


def test_same_user_and_time_is_not_a_duplicate_unless_every_field_matches(tmp_path):
    rows = [
        ("u1", "2024-01-01 00:00:00", "buy", "a", 1.0, "x"),
        ("u2", "2024-01-01 00:00:00", "buy", "a", 1.0, "x"),  # other user: kept
        ("u1", "2024-01-01 00:00:00", "buy", "b", 1.0, "x"),  # other merchant: kept
        ("u1", "2024-01-01 00:00:00", "buy", "a", 2.0, "x"),  # other amount: kept
        ("u1", "2024-01-01 00:00:00", "buy", "b", 1.0, "x"),  # repeats the third row: dropped
        ("u1", "2024-01-02 00:00:00", "buy", "a", 1.0, "x"),  # other time: kept
    ]
    cfg = generic_config(write(tmp_path, rows), None, tmp_path / "cache", val_fraction=0.0)
    p = prepare(cfg)
    assert p.meta["counts"]["duplicate_events"] == 1
    inverse = {i + FIRST_ID: v for i, v in enumerate(p.vocabs["merchant"])}
    u1 = p.store.user_ids.tolist().index("u1")
    events = slice(p.store.offsets[u1], p.store.offsets[u1 + 1])
    assert [inverse[t] for t in p.store.tokens["merchant"][events]] == ["a", "b", "a", "a"]
    assert p.store.values["amount"][events].tolist() == [1.0, 1.0, 2.0, 1.0]


def test_cache_reused_and_keyed_by_content(tmp_path, csv_data):
    events, labels = csv_data
    cfg = generic_config(events, labels, tmp_path / "cache")
    first = prepare(cfg)
    stamp = (first.path / "users.parquet").stat().st_mtime_ns
    again = prepare(cfg)
    assert again.path == first.path and (again.path / "users.parquet").stat().st_mtime_ns == stamp
    # batch size does not change the sequences, so it shares the cache; max_len does not
    cfg.batch_size = 7
    assert prepare(cfg).path == first.path
    cfg.max_len = 5
    assert prepare(cfg).path != first.path
    # editing the file changes the content hash
    cfg.max_len = 128
    events.write_text(events.read_text().replace("grocery_1", "grocery_9"))
    assert prepare(cfg).path != first.path
    assert not list((tmp_path / "cache").glob(".*tmp*"))


def test_corrupt_cache_is_rebuilt(tmp_path, csv_data, caplog):
    events, labels = csv_data
    cfg = generic_config(events, labels, tmp_path / "cache")
    p = prepare(cfg)
    meta = json.loads((p.path / "meta.json").read_text())
    meta["key"] = "something else"
    (p.path / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level("INFO", logger="datamodules.preprocess"):
        again = prepare(cfg)
    assert "key or version mismatch" in caplog.text
    assert json.loads((again.path / "meta.json").read_text())["key"] == p.meta["key"]


def test_static_and_future_targets(tmp_path, csv_data):
    events, labels = csv_data
    cfg = generic_config(events, labels, tmp_path / "cache", cutoff="2024-02-10", window_days=10)
    cfg.targets = [
        TargetConfig("segment", "binary", positive="traveller"),
        TargetConfig("age", "above_median"),
        TargetConfig("churn", "churn"),
        TargetConfig("refunds", "propensity", field="event_type", value="refund"),
    ]
    p = prepare(cfg)
    frame = pl.read_csv(events, try_parse_dates=True)
    cutoff, end = dt.datetime(2024, 2, 10), dt.datetime(2024, 2, 20)
    assert p.store.times.max() < cutoff.replace(tzinfo=dt.timezone.utc).timestamp()
    window = frame.filter((pl.col("ts") >= cutoff) & (pl.col("ts") < end))
    targets = {t.name: t for t in p.targets}
    users = list(p.store.user_ids)
    for i, u in enumerate(users):
        active = u in set(window["client"])
        assert targets["churn"].labels[i] == (0 if active else 1)
        refund = u in set(window.filter(pl.col("event_type") == "refund")["client"])
        assert targets["refunds"].labels[i] == ((1 if refund else 0) if active else -1)
        assert targets["segment"].labels[i] == int(u[1:]) % 2
    ages = np.array([20 + int(u[1:]) for u in users])
    assert (targets["age"].labels == (ages > np.median(ages))).all()


def test_ml100k_source(ml100k_cache):
    from experiments.config import compose, to_dataclass
    from datamodules.config import DataConfig

    cfg = to_dataclass(compose([f"data.cache_dir={ml100k_cache}"]).data, DataConfig)
    p = prepare(cfg)
    assert p.meta["counts"]["raw_events"] == 100_000
    assert p.meta["counts"]["missing_year"] > 0  # the real file has years like 'V'
    assert {t.name for t in p.targets} >= {"gender", "age", "churn"}
    assert p.schema.event_type == "rating" and sorted(p.vocabs["rating"]) == ["1", "2", "3", "4", "5"]
    assert (p.store.lengths <= cfg.max_len).all() and (p.store.lengths >= 1).all()


def test_event_type_filtered_churn_and_multilabel_propensity(tmp_path, csv_data):
    events, labels = csv_data
    cfg = generic_config(events, labels, tmp_path / "cache", cutoff_days_before_end=14, window_days=14)
    cfg.targets = [
        TargetConfig("buy_churn", "churn", event_type="purchase"),
        TargetConfig("merchants", "propensity_top", field="merchant", event_type="purchase", top_k=3),
    ]
    p = prepare(cfg)
    frame = pl.read_csv(events, try_parse_dates=True)
    end = frame["ts"].max()
    cutoff = end - dt.timedelta(days=14)
    window = frame.filter((pl.col("ts") >= cutoff) & (pl.col("ts") < cutoff + dt.timedelta(days=14)) & (pl.col("event_type") == "purchase"))
    targets = {t.name: t for t in p.targets}
    churn, multi = targets["buy_churn"], targets["merchants"]
    assert multi.kind == "multilabel" and multi.labels.shape == (len(p.store), 3)
    # the 3 merchants bought by the most distinct users in the window, most first
    ranked = window.group_by("merchant").agg(pl.col("client").n_unique().alias("n")).sort(["n", "merchant"], descending=[True, False])
    assert multi.classes == ranked["merchant"].head(3).to_list()
    for i, u in enumerate(p.store.user_ids):
        bought = set(window.filter(pl.col("client") == u)["merchant"])
        assert churn.labels[i] == (0 if bought else 1)
        assert multi.labels[i].tolist() == [int(m in bought) for m in multi.classes]


def test_features_cached_beside_the_sequences_in_store_order(tmp_path, csv_data, caplog):
    """The whole-history features are part of the cache: hashed, loaded into Prepared.features, rebuilt when missing."""
    events, labels = csv_data
    cfg = generic_config(events, labels, tmp_path / "cache", max_len=3)
    p = prepare(cfg)
    assert "features.parquet" in p.meta["files"]
    assert p.features["user_id"].to_list() == p.store.user_ids.tolist()
    counts = p.features["count/all/all"].to_numpy()
    assert (counts >= p.store.lengths).all() and counts.max() > 3  # the features are not cut to max_len
    (p.path / "features.parquet").unlink()
    with caplog.at_level("INFO", logger="datamodules.preprocess"):
        again = prepare(cfg)
    assert "missing ['features.parquet']" in caplog.text
    assert again.features.equals(p.features)


# Content hashes of the cache this code writes, recorded from the code before the streaming rewrite
# of `build`: a refactor must leave every value, dtype and order of the outputs the same.
EXPECTED = {
    "ml100k": {"users": "dc616210a5c43cfa", "targets": "a0337c0b8a8278b9", "features": "f34ec2730de5f425", "meta": "fb8d6dd4d842ede1"},
    "recsys_challenge": {"users": "74dfaa9a3782dc1b", "targets": "99e427131d25a77b", "features": "8c4946034584b16a", "meta": "ff887ff3faa55061"},
    "recsys_user_split": {"users": "e6edb1e3ed994fff", "targets": "9b6f4d4967c494d6", "features": "195a08456f7b6431", "meta": "af44f34c5bcd8fed"},
    "generic": {"users": "58c583f590ff5efc", "targets": "05ff6a6684271994", "features": "91426c699b987077", "meta": "2820d15f3b001470"},
}
UNHASHED_META = ("key", "version", "files")  # the cache key embeds VERSION; file digests depend on parquet bytes


def frame_digest(frame: pl.DataFrame) -> str:
    """sha256 of a frame's column names, dtypes and values in row order (independent of the parquet encoding)."""
    payload = json.dumps([str(frame.schema), frame.to_dict(as_series=False)], default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_digests(p) -> dict[str, str]:
    meta = {k: v for k, v in p.meta.items() if k not in UNHASHED_META}
    # Features to 10 significant digits: a mean or std summed in another order moves in the last bits, nothing else may.
    features = p.features.with_columns(pl.col(pl.Float64).round_sig_figs(10))
    return {
        "users": frame_digest(p.users),
        "targets": frame_digest(pl.read_parquet(p.path / "targets.parquet")),
        "features": frame_digest(features),
        "meta": hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16],
    }


def equality_configs(name, ml100k_cache, recsys_dir, csv_data, tmp_path):
    from datamodules.config import DataConfig
    from experiments.config import compose, to_dataclass

    if name == "ml100k":
        return to_dataclass(compose([f"data.cache_dir={ml100k_cache}"]).data, DataConfig)
    if name == "generic":
        events, labels = csv_data
        return generic_config(events, labels, tmp_path / "cache", cutoff_days_before_end=14, window_days=14, max_len=10)
    overrides = [f"data.path={recsys_dir}", f"data.cache_dir={tmp_path / 'cache'}", "data.max_len=32"]
    if name == "recsys_user_split":
        overrides += ["data.protocol=user_split", "data.cutoff_days_before_end=14", "data.targets=[]"]
    return to_dataclass(compose(["experiment=gru_ae_recsys2025", *overrides]).data, DataConfig)


@pytest.mark.parametrize("chunk", [None, 50])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_outputs_equal_the_recorded_ones(name, chunk, ml100k_cache, recsys_dir, csv_data, tmp_path, monkeypatch):
    """users.parquet (as loaded), targets.parquet, features.parquet and meta.json (but key, version, digests) are unchanged,
    also when the events are encoded in chunks of about 50 (cut between users)."""
    if chunk:
        monkeypatch.setattr("datamodules.encode.CHUNK_EVENTS", chunk)
        ml100k_cache = tmp_path / "ml100k"  # not the session's cache: built here, in chunks
    p = prepare(equality_configs(name, ml100k_cache, recsys_dir, csv_data, tmp_path))
    assert cache_digests(p) == EXPECTED[name]
