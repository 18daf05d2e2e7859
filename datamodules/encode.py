"""Events -> per-user token sequences with a fitted preprocessing: the one encoding shared by training and new data.

`datamodules.preprocess.build` fits the state (vocabularies, bucket edges, time origin,
code ranges) on the training users and encodes the cache with it; `encode_events` applies
a saved state to events it has never seen, without refitting: a value outside the
vocabulary, a day outside the fitted range or a code above the fitted one becomes the
rare id, and is counted. Both go through `event_order`, `token_exprs` and
`sequences_of`, so the same events give the same sequences either way.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import polars as pl

from datamodules.schema import DAY_FIELD, FIRST_ID, MISSING, RARE, WEEK_FIELD, EventSchema, FieldSpec
from datamodules.sources.base import DataError

STATE_KEYS = (
    "version", "source", "schema", "vocabs", "edges", "vocab_sizes", "value_fields", "code_fields",
    "t0", "cutoff", "max_len", "event_types", "drop_duplicates", "column_types",
)  # fmt: skip
"""The part of a cache's meta.json a run saves as preprocess.json: all that encoding new events needs."""


@dataclass
class EventOrder:
    """Events sorted by (user, time), stably, and which ones repeat an earlier event exactly."""

    users: pl.Series  # distinct user ids, sorted
    user: np.ndarray  # int32 [N]: each event's position in `users`
    time_us: np.ndarray  # int64 [N]
    order: np.ndarray  # [N]: event rows by user, then time; equal times keep the source's order
    duplicate: np.ndarray  # bool [N]: dropped as an exact repeat of an earlier event
    repeats: int  # exact repeats found (dropped or, with drop_duplicates=none, kept)


DUPLICATE_MODES = ("exact", "none")


def event_order(raw: pl.DataFrame, fields: list[str], drop_duplicates: str = "exact") -> EventOrder:
    """Users are ranked to integers, so the one sort is numpy's over numbers, not strings.

    `duplicate` marks the exact repeats to drop (drop_duplicates=exact) and is all False for
    drop_duplicates=none; `repeats` counts the exact repeats either way.
    """
    if drop_duplicates not in DUPLICATE_MODES:
        raise DataError(f"data.drop_duplicates: {drop_duplicates!r} is not one of {DUPLICATE_MODES}")
    users = raw["user_id"].unique().sort()
    user = rank_of(raw["user_id"], users)
    time_us = raw["time"].dt.epoch("us").to_numpy()
    order = np.lexsort((time_us, user))
    repeats = duplicate_events(raw, order, user[order], time_us[order], ["user_id", "time", *fields])
    duplicate = repeats if drop_duplicates == "exact" else np.zeros_like(repeats)
    return EventOrder(users, user, time_us, order, duplicate, int(repeats.sum()))


def rank_of(values: pl.Series, sorted_values: pl.Series) -> np.ndarray:
    """Each value's position in `sorted_values` (which holds every value, once), as int32: sorting by it sorts by value.

    A binary search per value: half the time of a hash lookup (replace_strict) on string ids.
    """
    return sorted_values.search_sorted(values, side="left").cast(pl.Int32).to_numpy()


def duplicate_events(events: pl.DataFrame, order: np.ndarray, user: np.ndarray, time: np.ndarray, columns: list[str]) -> np.ndarray:
    """Mask of events equal on all `columns` to an earlier event (the first one stays).

    `order` sorts the events by user and time; `user` and `time` are in that order. Only
    neighbours there with equal user and time can be duplicates, so the full comparison
    (list columns included, slow to hash) runs on those few only.
    """
    duplicate = np.zeros(events.height, dtype=bool)
    same = (user[1:] == user[:-1]) & (time[1:] == time[:-1])
    if not same.any():
        return duplicate
    shared = np.zeros(events.height, dtype=bool)
    shared[1:] |= same
    shared[:-1] |= same
    candidate = np.zeros(events.height, dtype=bool)
    candidate[order[shared]] = True
    # A mask filter keeps the source's order ("first" = first in the files) and, unlike a gather, does not copy every chunk.
    first = events.select(columns).filter(pl.Series(candidate)).select(pl.struct(columns).is_first_distinct()).to_series().to_numpy()
    duplicate[np.flatnonzero(candidate)[~first]] = True
    return duplicate


def last_events(order: np.ndarray, user: np.ndarray, max_len: int) -> pl.Series:
    """Rows of each user's last `max_len` events, by user then time: `order` lists the rows to consider, sorted."""
    ranked = user[order]
    n = np.bincount(ranked)  # users without events count 0
    pos = np.arange(order.size) - (np.cumsum(n) - n)[ranked]
    return pl.Series(order[pos >= (n - max_len)[ranked]], dtype=pl.UInt32)


def check_codes(events: pl.LazyFrame, f: FieldSpec) -> None:
    """Every event's codes of field `f`: `f.length` non-negative integers, or null; else an error naming file and row."""
    bad = events.filter(pl.col(f.name).is_not_null() & ((pl.col(f.name).list.len() != f.length) | (pl.col(f.name).list.min() < 0)))
    hit = bad.select("_file", "_row", pl.col(f.name).cast(pl.List(pl.String)).list.join(" ")).head(1).collect()
    if hit.height:
        file, row, raw = hit.row(0)
        raise DataError(f"{file}: column {f.name!r}, row {row}: expected {f.length} non-negative codes, got [{raw}]")


def token_exprs(schema: EventSchema, vocabs: dict, edges: dict, vocab_sizes: dict, t0: dt.datetime) -> list[pl.Expr]:
    """Columns `tok_<f>` (ids), `val_<f>` (raw numbers) and `cod_<f>` (code ids, from `with_code_ids`) of the events, by the fitted state.

    `vocab_sizes` bounds the code ids, and the day and week ids once it holds them (new
    data): anything past the fitted range is RARE. While fitting, the day range is not
    known yet and every day is in range.
    """
    exprs = []
    for f in schema.of_kind("categorical"):
        values = vocabs[f.name]
        ids = pl.col(f.name).replace_strict(values, range(FIRST_ID, FIRST_ID + len(values)), default=RARE, return_dtype=pl.Int32)
        exprs.append(pl.when(pl.col(f.name).is_null()).then(MISSING).otherwise(ids).cast(pl.Int32).alias(f"tok_{f.name}"))
    for f in schema.of_kind("numeric"):
        bucket = pl.lit(pl.Series(edges[f.name], dtype=pl.Float64)).search_sorted(pl.col(f.name), side="right")
        exprs.append(pl.when(pl.col(f.name).is_null()).then(MISSING).otherwise(bucket.cast(pl.Int32) + FIRST_ID).cast(pl.Int32).alias(f"tok_{f.name}"))
        exprs.append(pl.col(f.name).cast(pl.Float32).alias(f"val_{f.name}"))
    for f in schema.of_kind("codes"):
        exprs.append(pl.col(f"cod_{f.name}"))  # made by `with_code_ids` (in numpy: a list.eval per event was 2 s per 3M events)
    day = (pl.col("time") - pl.lit(t0)).dt.total_days().cast(pl.Int32)
    for name, index in ((DAY_FIELD, day), (WEEK_FIELD, day // 7)):
        token = index + FIRST_ID
        if name in vocab_sizes:
            token = pl.when((pl.col("time") >= pl.lit(t0)) & (token < vocab_sizes[name])).then(token).otherwise(RARE)
        exprs.append(token.cast(pl.Int32).alias(f"tok_{name}"))
    return exprs


def with_code_ids(events: pl.DataFrame, schema: EventSchema, vocab_sizes: dict) -> pl.DataFrame:
    """`events` with `cod_<f>` (Array[Int32, length]) for each codes field: code + FIRST_ID, RARE from `vocab_sizes[f]` up
    (and for a null code), MISSING x length for an event without codes. The codes were checked (`check_codes`)."""
    columns = []
    for f in schema.of_kind("codes"):
        col = events[f.name]
        present = col.is_not_null().to_numpy()
        flat = col.drop_nulls().explode().cast(pl.Int32).fill_null(vocab_sizes[f.name]).to_numpy()
        ids = flat.reshape(-1, f.length) + FIRST_ID
        ids[ids >= vocab_sizes[f.name]] = RARE
        out = np.full((events.height, f.length), MISSING, dtype=np.int32)
        out[present] = ids
        columns.append(pl.Series(f"cod_{f.name}", out))
    return events.with_columns(columns)


CHUNK_EVENTS = 1_000_000  # events encoded and grouped at a time: the intermediate columns stay this size, whatever the data's


def sequences_of(events: pl.DataFrame, keep: pl.Series, user: np.ndarray, schema: EventSchema, vocab_sizes: dict, exprs: list[pl.Expr]) -> pl.DataFrame:
    """The users.parquet frame of `events` rows `keep` (sorted by user), encoded and grouped in chunks of whole users.

    Gathering, encoding and grouping every kept event at once held three copies of them
    (codes: 64 bytes per event and field); chunk by chunk only the grouped result grows.
    """
    ranked = user[keep.to_numpy()]
    cuts = [0]
    while cuts[-1] + CHUNK_EVENTS < ranked.size:
        cut = int(np.searchsorted(ranked, ranked[cuts[-1] + CHUNK_EVENTS], side="left"))
        cuts.append(cut if cut > cuts[-1] else int(np.searchsorted(ranked, ranked[cuts[-1]], side="right")))
    cuts.append(ranked.size)
    texts = [f.name for f in schema.of_kind("text")]
    parts = [sequence_frame(with_code_ids(events[keep[a:b]], schema, vocab_sizes), exprs, texts) for a, b in zip(cuts[:-1], cuts[1:])]
    return pl.concat(parts, rechunk=False)


def sequence_frame(events: pl.DataFrame, exprs: list[pl.Expr], texts: list[str]) -> pl.DataFrame:
    """One row per user (list columns) from events already ordered by (`_user`, time): the cached users.parquet layout."""
    return (
        events.lazy()
        .select(pl.col("_user").set_sorted(), "user_id", pl.col("time").dt.epoch("s").alias("time"), *exprs, *[pl.col(t).alias(f"txt_{t}") for t in texts])
        .group_by("_user", maintain_order=True)
        .agg(pl.col("user_id").first(), pl.exclude("_user", "user_id"))
        .drop("_user")
        .collect()
    )


def schema_of(state: dict) -> EventSchema:
    s = state["schema"]
    return EventSchema(s["user"], s["time"], [FieldSpec(**f) for f in s["fields"]], s["event_type"])


def of_event_types(raw: pl.DataFrame, event_type: str | None, types: list[str] | None) -> np.ndarray:
    """bool [N]: the events whose type is in `types` (all of them when `types` is empty or None)."""
    if not types:
        return np.ones(raw.height, dtype=bool)
    if event_type is None:
        raise DataError(f"data.event_types {types}: the schema has no event_type field to filter on")
    column = raw[event_type].cast(pl.String)
    unknown = sorted(set(types) - set(column.unique().drop_nulls().to_list()))
    if unknown:
        raise DataError(f"data.event_types: {unknown} never occur in the {event_type!r} column; types are {sorted(column.unique().drop_nulls().to_list())}")
    return column.is_in(types).fill_null(False).to_numpy()


def encode_events(raw: pl.DataFrame, state: dict, until: dt.datetime | None = None) -> tuple[pl.DataFrame, dict[str, int], dict[str, int]]:
    """New events (a source's frame) -> (users.parquet-style frame, counts, unseen values per field) with a run's state.

    As in training: exact duplicates dropped, events at or after `until` and events of
    other types than the run's `event_types` left out, each user's last max_len events kept. The unseen counts are the kept events whose value
    the run's vocabulary does not hold (mapped to RARE), per field.
    """
    schema = schema_of(state)
    for f in schema.of_kind("codes"):
        check_codes(raw.lazy(), f)
    o = event_order(raw, [f.name for f in schema.fields], state["drop_duplicates"])
    use = ~o.duplicate
    if until is not None:
        use &= (raw["time"] < until).to_numpy()  # as the cache's cutoff: the same comparison, the same events
    use &= of_event_types(raw, schema.event_type, state["event_types"])
    keep = last_events(o.order[use[o.order]], o.user, state["max_len"])
    t0 = dt.datetime.fromisoformat(state["t0"])
    exprs = token_exprs(schema, state["vocabs"], state["edges"], state["vocab_sizes"], t0)
    columns = ["user_id", "time", "_user", *(f.name for f in schema.fields)]
    frame = sequences_of(raw.with_columns(_user=pl.Series(o.user)).select(columns), keep, o.user, schema, state["vocab_sizes"], exprs)
    counts = {
        "events": raw.height,
        "duplicate_events": int(o.duplicate.sum()),
        "duplicate_events_kept": o.repeats - int(o.duplicate.sum()),
        "events_at_or_after_until": int((~o.duplicate).sum() - use.sum()),
        "truncated_events": int(use.sum()) - keep.len(),
        "users": frame.height,
    }
    unseen = {}
    for name in [*(f.name for f in schema.of_kind("categorical")), DAY_FIELD, WEEK_FIELD]:
        unseen[name] = int((frame[f"tok_{name}"].explode() == RARE).sum()) if frame.height else 0
    for name in state["code_fields"]:
        unseen[name] = int(frame[f"cod_{name}"].explode().arr.contains(RARE).sum()) if frame.height else 0
    return frame, counts, unseen


def state_of(meta: dict) -> dict:
    """The preprocessing state inside a cache's meta.json (what a run saves as preprocess.json)."""
    return {k: meta[k] for k in STATE_KEYS}

