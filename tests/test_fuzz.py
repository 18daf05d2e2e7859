"""Property-based tests (hypothesis): any event file either loads with the documented handling or fails with DataError.

Random column orders and types, nulls, unicode, huge and empty strings, duplicate
timestamps, single-event users, CSV or parquet, through the whole preprocessing (the
generic loader, the schema, vocabularies, the cache) and then the text renderers. No input
may end in a bare Polars, numpy or torch exception. Each test prints how many cases it
tried (`pytest -s tests/test_fuzz.py`); docs/reliability.md records the counts.
"""

from __future__ import annotations

import datetime as dt
import json
import string
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datamodules.config import DataConfig, SchemaConfig, TargetConfig
from datamodules.preprocess import prepare
from datamodules.schema import FIELD_KINDS, FieldSpec
from datamodules.sources.generic import event_schema
from datamodules.sources.base import DataError
from datamodules.text import FORMATS, EventTable, Renderer, format_events, format_number, one_line

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
START = dt.datetime(2024, 3, 1)
COUNTS: dict[str, dict[str, int]] = {}

texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
wild_texts = st.one_of(texts, st.just(""), st.text(alphabet="ab \n|\"'{}:-#<>&", max_size=12), st.just("ü" * 5000))


def tally(test: str, outcome: str) -> None:
    COUNTS.setdefault(test, {}).setdefault(outcome, 0)
    COUNTS[test][outcome] += 1


def report(test: str) -> None:
    counts = COUNTS.get(test, {})
    print(f"\nfuzz {test}: {sum(counts.values())} cases {counts}")


@st.composite
def event_tables(draw) -> tuple[pl.DataFrame, dict]:
    """A random event log and the schema settings that describe it (sometimes wrongly)."""
    n_users = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(1, 8), min_size=n_users, max_size=n_users))
    n = sum(lengths)
    user_kind = draw(st.sampled_from(["int", "str", "unicode"]))
    names = {"int": [str(i) for i in range(n_users)], "str": [f"u{i}" for i in range(n_users)], "unicode": draw(st.lists(texts, min_size=n_users, max_size=n_users, unique=True))}[user_kind]
    users: list = [names[u] for u, k in enumerate(lengths) for _ in range(k)]
    if user_kind == "int":
        users = [int(u) for u in users]
    if draw(st.booleans()) and draw(st.integers(0, 4)) == 0:
        users[draw(st.integers(0, n - 1))] = None
    # times: few distinct values, so duplicate timestamps are common
    offsets = draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    time_kind = draw(st.sampled_from(["fmt", "fmt", "epoch_s", "iso", "iso", "garbage"]))
    stamps = [START + dt.timedelta(hours=o) for o in offsets]
    if time_kind == "fmt":
        times: list = [t.strftime("%Y-%m-%d %H:%M:%S") for t in stamps]
    elif time_kind == "epoch_s":
        times = [int(t.timestamp()) for t in stamps]
    else:
        times = [t.isoformat() for t in stamps]
        if time_kind == "garbage":
            times[draw(st.integers(0, n - 1))] = draw(texts)
    if draw(st.integers(0, 9)) == 0:
        times[draw(st.integers(0, n - 1))] = None
    cats = draw(st.lists(st.one_of(st.none(), wild_texts), min_size=n, max_size=n))
    number_kind = draw(st.sampled_from(["float", "float", "text_numbers", "garbage", "all_null"]))
    floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=64))
    if number_kind == "float":
        nums: list = draw(st.lists(floats, min_size=n, max_size=n))
    elif number_kind == "text_numbers":
        nums = [None if v is None else repr(v) for v in draw(st.lists(floats, min_size=n, max_size=n))]
    elif number_kind == "garbage":
        nums = draw(st.lists(st.one_of(texts, st.just("12")), min_size=n, max_size=n))
    else:
        nums = [None] * n
    notes = draw(st.lists(st.one_of(st.none(), wild_texts), min_size=n, max_size=n))
    columns = {"user": users, "ts": times, "cat": cats, "num": nums, "note": notes}
    order = draw(st.permutations(list(columns)))
    frame = pl.DataFrame({c: columns[c] for c in order}, strict=False)
    settings_ = {
        "time_format": {"fmt": "%Y-%m-%d %H:%M:%S", "epoch_s": "epoch_s"}.get(time_kind),
        "fields": draw(st.lists(st.sampled_from(GOOD_FIELDS * 3 + BAD_FIELDS), max_size=3, unique=True)),
        "event_type": draw(st.sampled_from([None, None, None, "cat"])),
        "future": draw(st.booleans()),
        "format": draw(st.sampled_from(["csv", "parquet"])),
    }
    return frame, settings_


GOOD_FIELDS = [("cat", "categorical"), ("num", "numeric"), ("note", "text")]
BAD_FIELDS = [("cat", "numeric"), ("missing", "categorical")]  # text read as numbers; a column that is not there


def config_for(path: Path, s: dict, cache: Path) -> DataConfig:
    fields = [FieldSpec(n, k, n_buckets=3) for n, k in s["fields"]]  # a name twice is a schema error, as it should be
    return DataConfig(
        source="generic",
        path=str(path),
        schema=SchemaConfig(user="user", time="ts", time_format=s["time_format"], fields=fields, event_type=s["event_type"]),
        targets=[TargetConfig("churn", "churn")] if s["future"] else [],
        cutoff_quantile=0.5 if s["future"] else None,
        window_days=1,
        cache_dir=str(cache),
        val_fraction=0.3,
    )


def test_generic_loader_loads_or_fails_clearly():
    check_event_table()
    report("generic_loader")
    assert sum(COUNTS["generic_loader"].values()) >= 140


@FUZZ
@given(case=event_tables())
def check_event_table(case):
    frame, s = case
    with tempfile.TemporaryDirectory() as tmp:
        load_and_render(frame, s, Path(tmp))


def load_and_render(frame: pl.DataFrame, s: dict, folder: Path) -> None:
    path = folder / f"events.{s['format']}"
    if s["format"] == "csv":
        frame.write_csv(path)
    else:
        frame.write_parquet(path)
    try:
        prepared = prepare(config_for(path, s, folder / "cache"))
    except DataError as err:
        assert str(err), "a DataError must say what is wrong"
        tally("generic_loader", "DataError")
        return
    store = prepared.store
    assert len(store) >= 1 and (store.lengths >= 1).all()
    assert set(map(str, store.user_ids)) <= {str(u) for u in frame["user"].to_list()}
    renderer = Renderer(prepared)
    for row in range(len(store)):
        for fmt in FORMATS:
            text = renderer.render(row, fmt).text()
            if fmt == "json":
                assert len(json.loads(text)) == store.lengths[row]
            if fmt == "yaml":
                assert len(yaml.safe_load(text)) == store.lengths[row]
    tally("generic_loader", "loaded")


def test_schema_builds_or_fails_clearly():
    check_schema()
    report("schema")
    assert sum(COUNTS["schema"].values()) >= 140


@FUZZ
@given(
    fields=st.lists(
        st.fixed_dictionaries({"name": st.one_of(texts, st.sampled_from(["a", "b", "day"])), "kind": st.sampled_from([*FIELD_KINDS, "weird"]),
                               "length": st.one_of(st.none(), st.integers(-1, 3))}),  # fmt: skip
        max_size=4,
    ),
    event_type=st.one_of(st.none(), st.sampled_from(["a", "zzz"])),
)
def check_schema(fields, event_type):
    cfg = DataConfig(source="generic", schema=SchemaConfig(fields=fields, event_type=event_type))
    try:
        schema = event_schema(cfg)
    except DataError as err:
        assert str(err).startswith("data.schema")
        tally("schema", "DataError")
        return
    assert [f.name for f in schema.fields] == [f["name"] for f in fields]
    tally("schema", "built")


def test_renderers_round_trip_any_values():
    check_renderers()
    report("renderers")
    assert sum(COUNTS["renderers"].values()) >= 150


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    columns=st.lists(st.text(alphabet=string.ascii_lowercase + " ", min_size=1, max_size=8), min_size=1, max_size=4, unique=True),
    data=st.data(),
)
def check_renderers(columns, data):
    numeric = data.draw(st.lists(st.booleans(), min_size=len(columns), max_size=len(columns)))
    n_rows = data.draw(st.integers(0, 5))
    values = st.floats(allow_nan=True, allow_infinity=True).map(format_number)
    rows = [[data.draw(values) if num else one_line(data.draw(wild_texts)) for num in numeric] for _ in range(n_rows)]
    table = EventTable(columns, numeric, rows)
    for fmt in FORMATS:
        rendered = format_events(table, fmt)
        assert len(rendered) == n_rows
        for n in range(n_rows + 1):  # every cut keeps whole events and stays parseable
            text = rendered.text(n)
            if fmt == "json":
                assert [[str(v) if not isinstance(v, str) else v for v in d.values()] for d in json.loads(text)] == [
                    [_as_number_text(v, num) for v, num in zip(r, numeric)] for r in rows[n_rows - n :]]  # fmt: skip
            elif fmt == "yaml":
                assert len(yaml.safe_load(text)) == n
    tally("renderers", "rendered")


def _as_number_text(value: str, numeric: bool) -> str:
    """What a JSON reader gives back as text for a rendered value: numbers via Python's own repr."""
    if numeric and value != "unknown":
        return str(json.loads(value))
    return value


def test_single_event_users_and_a_10000_event_user(tmp_path):
    """Edge lengths end to end: users with one event, one user with 10,000 (truncated to max_len, counted)."""
    rng = np.random.default_rng(0)
    n_big = 10_000
    users = ["big"] * n_big + [f"solo{i}" for i in range(20)]
    times = [START + dt.timedelta(minutes=int(m)) for m in rng.integers(0, 60 * 24 * 30, size=len(users))]
    frame = pl.DataFrame({"user": users, "ts": [t.strftime("%Y-%m-%d %H:%M:%S") for t in times], "cat": rng.choice(["a", "b", "ü"], len(users))})
    frame.write_csv(tmp_path / "events.csv")
    s = {"time_format": "%Y-%m-%d %H:%M:%S", "fields": [("cat", "categorical")], "event_type": None, "future": False}
    cfg = config_for(tmp_path / "events.csv", s, tmp_path / "cache")
    prepared = prepare(cfg)
    lengths = dict(zip(map(str, prepared.store.user_ids), prepared.store.lengths))
    assert lengths["big"] == cfg.max_len and all(lengths[f"solo{i}"] == 1 for i in range(20))
    counts = prepared.meta["counts"]
    assert counts["truncated_events"] == n_big - counts["duplicate_events"] - cfg.max_len  # same user, minute and value: one event
    assert Renderer(prepared).render(0, "json").text().count("{") >= 1
