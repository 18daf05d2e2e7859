"""Malformed input: a clear one-line error naming file, column and row, and nothing left behind."""

from __future__ import annotations

import polars as pl
import pytest

from datamodules.config import TargetConfig
from datamodules.preprocess import prepare
from datamodules.sources.base import DataError
from tests.conftest import generic_config

GOOD = ("u1", "2024-01-01 00:00:00", "buy", "a", 1.0, "x")
COLUMNS = ["client", "ts", "event_type", "merchant", "amount", "description"]


def write_rows(tmp_path, rows, columns=COLUMNS):
    path = tmp_path / "events.csv"
    pl.DataFrame(rows, schema=columns, orient="row").write_csv(path)
    return path


def assert_fails(cfg, *parts):
    with pytest.raises(DataError) as info:
        prepare(cfg)
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message
    return message


def no_cache_left(tmp_path):
    cache = tmp_path / "cache"
    return not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize(
    "source, path, parts",
    [
        ("parquetz", "x", ["data.source", "'parquetz'", "('ml100k', 'generic', 'recsys2025', 'uqabench')"]),
        ("generic", None, ["data.path", "event file or glob"]),
        ("recsys2025", None, ["data.path", "challenge data directory"]),
    ],
)
def test_unknown_source_or_no_path(tmp_path, source, path, parts):
    cfg = generic_config(tmp_path / "events.csv", None, tmp_path / "cache", source=source, path=path)
    assert_fails(cfg, *parts)
    assert no_cache_left(tmp_path)


def test_data_source_help_names_every_source():
    """`--help` lists data.source's choices from a docstring; a source added to the table must appear there too."""
    from datamodules.config import DataConfig
    from datamodules.sources import SOURCES
    from experiments.config import attribute_docs

    assert attribute_docs(DataConfig)["source"] == " | ".join(SOURCES) + "."


def test_missing_file(tmp_path):
    assert_fails(generic_config(tmp_path / "nope.csv", None, tmp_path / "cache"), "nope.csv", "file not found")
    assert no_cache_left(tmp_path)


def test_misnamed_column_suggests_nearest(tmp_path):
    path = write_rows(tmp_path, [GOOD], ["client", "ts", "event_type", "merchants", "amount", "description"])
    msg = assert_fails(generic_config(path, None, tmp_path / "cache"), "events.csv", "'merchant'", "did you mean 'merchants'")
    assert "schema.fields.merchant" in msg
    assert no_cache_left(tmp_path)


def test_numeric_field_holding_text(tmp_path):
    rows = [GOOD, ("u1", "2024-01-02 00:00:00", "buy", "a", "12,5", "x")]
    path = tmp_path / "events.csv"
    pl.DataFrame([tuple(map(str, r)) for r in rows], schema=COLUMNS, orient="row").write_csv(path)
    assert_fails(generic_config(path, None, tmp_path / "cache"), "events.csv", "'amount'", "row 2", "'12,5' is not a number")
    assert no_cache_left(tmp_path)


def test_null_user(tmp_path):
    path = write_rows(tmp_path, [GOOD, GOOD, (None, "2024-01-02 00:00:00", "buy", "a", 1.0, "x")])
    assert_fails(generic_config(path, None, tmp_path / "cache"), "'client'", "row 3", "null user")


def test_null_time(tmp_path):
    path = write_rows(tmp_path, [GOOD, ("u2", None, "buy", "a", 1.0, "x")])
    assert_fails(generic_config(path, None, tmp_path / "cache"), "'ts'", "row 2", "null time")


def test_unparseable_timestamp(tmp_path):
    path = write_rows(tmp_path, [GOOD, ("u2", "2024-13-45 99:00:00", "buy", "a", 1.0, "x")])
    assert_fails(generic_config(path, None, tmp_path / "cache"), "'ts'", "row 2", "cannot parse time '2024-13-45 99:00:00'")
    assert no_cache_left(tmp_path)


def test_epoch_column_with_text(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("client,ts,event_type,merchant,amount,description\nu1,1700000000,buy,a,1,x\nu1,yesterday,buy,a,1,x\n")
    cfg = generic_config(path, None, tmp_path / "cache")
    cfg.schema.time_format = "epoch_s"
    assert_fails(cfg, "'ts'", "row 2", "'yesterday'")


def test_empty_file_and_header_only(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("")
    assert_fails(generic_config(path, None, tmp_path / "cache"), "events.csv")
    path.write_text(",".join(COLUMNS) + "\n")
    assert_fails(generic_config(path, None, tmp_path / "cache"), "events.csv", "no rows")
    assert no_cache_left(tmp_path)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "events.xlsx"
    path.write_bytes(b"PK")
    assert_fails(generic_config(path, None, tmp_path / "cache"), "unsupported file type '.xlsx'")


def test_non_finite_numbers_become_missing_and_are_counted(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("client,ts,event_type,merchant,amount,description\n"
                    "u1,2024-01-01 00:00:00,buy,a,inf,x\nu1,2024-01-02 00:00:00,buy,a,NaN,x\nu1,2024-01-03 00:00:00,buy,a,2.5,x\n")
    p = prepare(generic_config(path, None, tmp_path / "cache", val_fraction=0.0))
    assert p.meta["counts"]["nonfinite_amount"] == 2
    assert p.store.tokens["amount"].tolist()[:2] == [1, 1]  # MISSING


def test_labelled_user_without_events_is_counted(tmp_path):
    path = write_rows(tmp_path, [GOOD, ("u2", "2024-01-01 00:00:00", "buy", "a", 1.0, "x")])
    labels = tmp_path / "labels.csv"
    labels.write_text("client,segment\nu1,traveller\nu2,homebody\nu3,traveller\n")
    p = prepare(generic_config(path, labels, tmp_path / "cache", val_fraction=0.0))
    assert p.meta["counts"]["labelled_users_without_events"] == 1
    assert list(p.store.user_ids) == ["u1", "u2"]


def test_duplicate_user_in_labels(tmp_path):
    path = write_rows(tmp_path, [GOOD])
    labels = tmp_path / "labels.csv"
    labels.write_text("client,segment\nu1,traveller\nu2,homebody\nu1,homebody\n")
    assert_fails(generic_config(path, labels, tmp_path / "cache"), "labels.csv", "'client'", "row 3", "more than once")


def test_binary_label_that_is_not_binary(tmp_path):
    path = write_rows(tmp_path, [GOOD])
    labels = tmp_path / "labels.csv"
    labels.write_text("client,segment\nu1,traveller\n")
    cfg = generic_config(path, labels, tmp_path / "cache")
    cfg.targets = [TargetConfig("segment", "binary")]
    assert_fails(cfg, "labels.csv", "'segment'", "row 1", "'traveller' is not 0/1")


def test_future_target_needs_cutoff(tmp_path):
    path = write_rows(tmp_path, [GOOD])
    cfg = generic_config(path, None, tmp_path / "cache")
    cfg.targets = [TargetConfig("churn", "churn")]
    assert_fails(cfg, "data.cutoff")
    assert no_cache_left(tmp_path)


def test_cutoff_before_all_events(tmp_path):
    path = write_rows(tmp_path, [GOOD])
    cfg = generic_config(path, None, tmp_path / "cache", cutoff="2020-01-01")
    cfg.targets = [TargetConfig("churn", "churn")]
    assert_fails(cfg, "events.csv", "no events before the cutoff")
