"""Source events -> cached per-user sequences (Polars, lazy).

Steps: drop exact duplicate events; cut history at the cutoff (later events only make
future-window targets); split users into train/val by a seeded hash; fit vocabularies
(top-K, reserved ids) and numeric quantile buckets on training users' history only;
encode; day and week indexes; stable sort by (user, time); keep the last max_len events;
one row per user with list columns. The result is cached as parquet + meta.json under a
key hashed from the source files' content, the schema and every setting that changes it,
written to a temporary folder and renamed, so a crash never leaves a torn cache.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from datamodules.config import DataConfig
from datamodules.schema import DAY_FIELD, FIRST_ID, MISSING, RARE, WEEK_FIELD, EventSchema, FieldSpec
from datamodules.store import SequenceStore
from datamodules.sources import load_source, source_files
from datamodules.sources.base import DataError, SourceData
from datamodules.targets import FUTURE_KINDS, KINDS, MULTILABEL, STATIC_KINDS, Target, evaluation_kind, future_labels, static_labels

log = logging.getLogger(__name__)

VERSION = 3  # bump when the cached layout or its meaning changes (3: meta.json holds relevant_users)
CACHE_IRRELEVANT = ("batch_size", "bucket_by_length", "num_workers", "cache_dir")
CACHE_FILES = ("users.parquet", "targets.parquet")


@dataclass
class Prepared:
    """Everything a DataModule needs, loaded from the cache."""

    store: SequenceStore
    schema: EventSchema
    vocabs: dict[str, list[str]]  # field -> values of ids FIRST_ID, FIRST_ID+1, ...
    targets: list[Target]
    is_val: np.ndarray  # bool [U]
    meta: dict
    path: Path
    users: pl.DataFrame  # the cached frame (text fields for renderers live here)


def cache_key(cfg: DataConfig, seed: int, files: list[Path]) -> str:
    """Hash of the source files' names and content, the settings and the seed: a changed file never reuses a stale cache."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in CACHE_IRRELEVANT}
    data = [[path.name, file_hash(path)] for path in sorted(files)]
    payload = json.dumps({"version": VERSION, "seed": seed, "settings": settings, "data": data}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def prepare(cfg: DataConfig, seed: int = 0) -> Prepared:
    """Load the cached sequences for this config, building them first if needed."""
    key = cache_key(cfg, seed, source_files(cfg))
    path = Path(cfg.cache_dir) / f"{cfg.source}-{key}"
    reason = stale_reason(path, key)
    if reason:
        log.info("building sequence cache %s (%s)", path, reason)
        build(load_source(cfg), cfg, seed, key, path)
    return load(path)


def stale_reason(path: Path, key: str) -> str | None:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return "no cache yet"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return "meta.json unreadable"
    if meta.get("key") != key or meta.get("version") != VERSION:
        return "key or version mismatch"
    missing = [f for f in CACHE_FILES if not (path / f).is_file()]
    if missing:
        return f"missing {missing}"
    for name, digest in meta.get("files", {}).items():  # a torn, truncated or edited file does not load silently
        if file_hash(path / name) != digest:
            return f"{name} content hash mismatch"
    if set(meta.get("files", {})) != set(CACHE_FILES):
        return "no content hashes in meta.json"
    return None


def file_hash(path: Path) -> str:
    """sha256 of a file's content, read in blocks (source files can be gigabytes)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def is_val_user(user_ids: pl.Series, seed: int, fraction: float) -> np.ndarray:
    """Stable per-user choice: a user stays in val when other users are added."""
    threshold = int(fraction * 2**32)
    return np.array([zlib.crc32(f"{seed}:{u}".encode()) < threshold for u in user_ids.to_list()], dtype=bool)


def resolve_cutoff(events: pl.LazyFrame, cfg: DataConfig) -> dt.datetime | None:
    if cfg.cutoff:
        try:
            return dt.datetime.fromisoformat(cfg.cutoff)
        except ValueError:
            raise DataError(f"data.cutoff: {cfg.cutoff!r} is not an ISO datetime such as 1998-03-01 or 1998-03-01T12:00") from None
    if cfg.cutoff_days_before_end:
        return events.select(pl.col("time").max()).collect().item() - dt.timedelta(days=cfg.cutoff_days_before_end)
    if cfg.cutoff_quantile is not None:
        if not 0 < cfg.cutoff_quantile < 1:
            raise DataError(f"data.cutoff_quantile: {cfg.cutoff_quantile} must be in (0, 1)")
        return events.select(pl.col("time").quantile(cfg.cutoff_quantile, "nearest")).collect().item()
    return None


def fit_vocab(train: pl.LazyFrame, name: str, top_k: int) -> pl.LazyFrame:
    """Most frequent values first; ties broken by value so the vocabulary is deterministic."""
    counts = train.select(pl.col(name)).drop_nulls().group_by(name).len()
    return counts.sort(["len", name], descending=[True, False]).head(top_k).select(name)


def bucket_edges(values: np.ndarray, n_buckets: int) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.array([], dtype=np.float64)
    return np.unique(np.quantile(finite, np.linspace(0, 1, n_buckets + 1)[1:-1]))


def build(source: SourceData, cfg: DataConfig, seed: int, key: str, path: Path) -> None:
    """Source events -> users.parquet, targets.parquet and meta.json in `path` (atomically).

    The events are collected once and every later step works on that frame in memory
    (over the source's lazy plan, each of the ~20 small queries below would re-run parsing):
    history, training users and duplicates are boolean columns, not copies. Users are
    ranked to integers, so the one sort is numpy's over numbers, not strings. Events with
    equal times keep the order the source gives them (its files as listed, then rows).
    """
    schema = source.schema
    for t in cfg.targets:
        if t.kind not in KINDS:
            raise DataError(f"data.targets.{t.name}: unknown kind {t.kind!r}; choose from {KINDS}")
    if any(t.kind in FUTURE_KINDS for t in cfg.targets) and not (cfg.cutoff or cfg.cutoff_quantile is not None or cfg.cutoff_days_before_end):
        raise DataError("data.cutoff: future-window targets need data.cutoff, data.cutoff_quantile or data.cutoff_days_before_end")

    counts = dict(source.counts)
    raw = source.events.collect()
    all_users = raw["user_id"].unique().sort()
    user = rank_of(raw["user_id"], all_users)
    time_us = raw["time"].dt.epoch("us").to_numpy()
    order = np.lexsort((time_us, user))  # stable: ties keep the source's event order
    duplicate = duplicate_events(raw, order, user[order], time_us[order], ["user_id", "time", *(f.name for f in schema.fields)])
    raw = raw.with_columns(_user=pl.Series(user), _kept=pl.Series(~duplicate))
    counts["raw_events"] = raw.height
    counts["duplicate_events"] = int(duplicate.sum())

    events = raw.lazy().filter(pl.col("_kept"))
    cutoff = resolve_cutoff(events, cfg)
    future = None
    in_history = ~duplicate
    if cutoff is not None:
        in_history = raw.select(pl.col("_kept") & (pl.col("time") < cutoff)).to_series().to_numpy()
        window_end = cutoff + dt.timedelta(days=cfg.window_days)
        future = events.filter((pl.col("time") >= cutoff) & (pl.col("time") < window_end)).collect()
        counts["events_after_cutoff"] = int((~duplicate).sum() - in_history.sum())

    per_user = np.bincount(user[in_history], minlength=all_users.len())
    ranks = np.flatnonzero(per_user)
    users = all_users.gather(ranks)  # sorted, like the ranks
    if users.len() == 0:
        raise DataError(f"{source.files[0]}: no events before the cutoff {cutoff}" if cutoff else f"{source.files[0]}: no events")
    val = is_val_user(users, seed, cfg.val_fraction)
    is_train = np.zeros(all_users.len(), dtype=bool)
    is_train[ranks] = ~val
    raw = raw.with_columns(_history=pl.Series(in_history), _train=pl.Series(in_history & is_train[user]))
    history, train = raw.lazy().filter(pl.col("_history")), raw.lazy().filter(pl.col("_train"))

    vocabs: dict[str, list[str]] = {}
    encoded = []
    cats = schema.of_kind("categorical")
    fitted = pl.collect_all([fit_vocab(train, f.name, min(f.top_k or cfg.top_k, cfg.top_k)) for f in cats])
    for f, vocab in zip(cats, fitted):
        values = vocab[f.name].to_list()
        vocabs[f.name] = values
        ids = pl.col(f.name).replace_strict(values, range(FIRST_ID, FIRST_ID + len(values)), default=RARE, return_dtype=pl.Int32)
        encoded.append(pl.when(pl.col(f.name).is_null()).then(MISSING).otherwise(ids).cast(pl.Int32).alias(f"tok_{f.name}"))
    for f in schema.of_kind("numeric"):
        train_values = train.select(pl.col(f.name)).collect()[f.name].to_numpy().astype(np.float64)
        edges = bucket_edges(train_values, f.n_buckets or cfg.n_buckets)
        bounds = [-np.inf, *edges.tolist(), np.inf]
        vocabs[f.name] = [f"[{lo:g}, {hi:g})" for lo, hi in zip(bounds[:-1], bounds[1:])]
        bucket = pl.lit(pl.Series(edges, dtype=pl.Float64)).search_sorted(pl.col(f.name), side="right")
        encoded.append(pl.when(pl.col(f.name).is_null()).then(MISSING).otherwise(bucket.cast(pl.Int32) + FIRST_ID).cast(pl.Int32).alias(f"tok_{f.name}"))
        encoded.append(pl.col(f.name).cast(pl.Float32).alias(f"val_{f.name}"))

    codes = schema.of_kind("codes")
    for f in codes:
        encoded.append(encode_codes(history, f))
    tops = history.select(pl.col("time").min().alias("t0"), *[pl.col(f.name).list.max().max().alias(f.name) for f in codes]).collect().row(0, named=True)
    for f in codes:
        top = tops[f.name]
        vocabs[f.name] = [str(c) for c in range(int(top) + 1)] if top is not None else []

    t0 = tops["t0"]
    day = (pl.col("time") - pl.lit(t0)).dt.total_days().cast(pl.Int32)
    encoded += [(day + FIRST_ID).alias(f"tok_{DAY_FIELD}"), (day // 7 + FIRST_ID).alias(f"tok_{WEEK_FIELD}")]
    texts = [f.name for f in schema.of_kind("text")]

    keep = last_events(order[in_history[order]], user, cfg.max_len)
    columns = ["user_id", "time", "_user", *(f.name for f in schema.fields)]
    frame = (
        raw.select(columns)[keep]
        .lazy()
        .select(pl.col("_user").set_sorted(), "user_id", pl.col("time").dt.epoch("s").alias("time"), *encoded, *[pl.col(t).alias(f"txt_{t}") for t in texts])
        .group_by("_user", maintain_order=True)
        .agg(pl.col("user_id").first(), pl.exclude("_user", "user_id"))
        .drop("_user")
        .collect()
    )
    counts["history_events"] = int(in_history.sum())
    counts["truncated_events"] = counts["history_events"] - keep.len()
    del raw, events, history, train

    max_day = int(frame[f"tok_{DAY_FIELD}"].list.max().max()) - FIRST_ID
    vocab_sizes = {f.name: FIRST_ID + len(vocabs[f.name]) for f in schema.of_kind("categorical", "numeric", "codes")}
    vocab_sizes[DAY_FIELD] = FIRST_ID + max_day + 1
    vocab_sizes[WEEK_FIELD] = FIRST_ID + max_day // 7 + 1

    targets, classes = pl.DataFrame({"user_id": frame["user_id"]}), {}
    for t in cfg.targets:
        if t.kind in STATIC_KINDS:
            label, names = static_labels(t, source.labels, frame["user_id"])
        else:
            label, names = future_labels(t, future, frame["user_id"], schema.event_type)
        targets = targets.with_columns(label.alias(t.name))
        classes[t.name] = names
    if source.labels is not None:
        counts["labelled_users_without_events"] = int((~source.labels["user_id"].is_in(frame["user_id"].implode())).sum())

    meta = {
        "key": key,
        "version": VERSION,
        "source": source.name,
        "schema": dataclasses.asdict(schema),
        "vocabs": vocabs,
        "vocab_sizes": vocab_sizes,
        "value_fields": schema.value_fields,
        "code_fields": [f.name for f in schema.of_kind("codes")],
        "targets": {t.name: {"kind": t.kind, "classes": classes[t.name]} for t in cfg.targets},
        "cutoff": cutoff.isoformat() if cutoff else None,
        "t0": t0.isoformat(),
        "n_users": frame.height,
        "n_val_users": int(val.sum()),
        "counts": counts,
        "relevant_users": source.relevant_users,  # kept here so export never re-reads the source
    }
    for reason, n in counts.items():
        if n and reason not in ("raw_events", "history_events"):
            log.info("%s: %d %s", source.name, n, reason.replace("_", " "))
    write_atomic_dir(path, {"users.parquet": frame, "targets.parquet": targets.with_columns(is_val=pl.Series(val))}, meta)


def rank_of(values: pl.Series, sorted_values: pl.Series) -> np.ndarray:
    """Each value's position in `sorted_values` (which holds every value), as int32: sorting by it sorts by value."""
    return values.replace_strict(sorted_values, pl.int_range(sorted_values.len(), eager=True), return_dtype=pl.Int32).to_numpy()


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


def encode_codes(history: pl.LazyFrame, f: FieldSpec) -> pl.Expr:
    """Fixed-length integer codes -> ids (code + FIRST_ID) as Array[L]; an event without codes gets MISSING x L."""
    bad = history.filter(pl.col(f.name).is_not_null() & ((pl.col(f.name).list.len() != f.length) | (pl.col(f.name).list.min() < 0)))
    hit = bad.select("_file", "_row", pl.col(f.name).cast(pl.List(pl.String)).list.join(" ")).head(1).collect()
    if hit.height:
        file, row, raw = hit.row(0)
        raise DataError(f"{file}: column {f.name!r}, row {row}: expected {f.length} non-negative codes, got [{raw}]")
    ids = pl.col(f.name).list.eval(pl.element() + FIRST_ID).cast(pl.List(pl.Int32))
    missing = pl.lit([MISSING] * f.length, dtype=pl.List(pl.Int32))
    return pl.when(pl.col(f.name).is_null()).then(missing).otherwise(ids).list.to_array(f.length).alias(f"cod_{f.name}")


def write_atomic_dir(path: Path, frames: dict[str, pl.DataFrame], meta: dict) -> None:
    """Write into a temporary sibling, then rename: readers see the old cache or the new, never half.

    meta.json records each file's sha256, so a file changed after the rename is caught
    (`stale_reason`). Two processes building the same cache at once: whoever renames
    second finds the folder taken by a valid cache and drops its own copy.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, frame in frames.items():
            frame.write_parquet(tmp / name, compression="lz4")  # 2x faster to write than zstd here, as fast to read
        meta = {**meta, "files": {name: file_hash(tmp / name) for name in frames}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        if path.exists() and stale_reason(path, meta["key"]) is None:
            log.info("sequence cache %s was built by another process meanwhile; using it", path)
            return
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:  # another process renamed its build into place between our check and our rename
            if stale_reason(path, meta["key"]) is not None:
                raise
            log.info("sequence cache %s was built by another process meanwhile; using it", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(path: Path) -> Prepared:
    meta = json.loads((path / "meta.json").read_text())
    users = pl.read_parquet(path / "users.parquet")
    table = pl.read_parquet(path / "targets.parquet")
    store = SequenceStore.from_frame(users, meta["vocab_sizes"], meta["value_fields"], meta["code_fields"])
    targets = []
    for name, info in meta["targets"].items():
        kind = evaluation_kind(info["kind"], len(info["classes"]))
        if kind == MULTILABEL:
            labels = table[name].to_numpy().astype(np.int8)
        else:
            labels = table[name].fill_null(-1).to_numpy().astype(np.int64)
        targets.append(Target(name, kind, labels, info["classes"]))
    s = meta["schema"]
    schema = EventSchema(s["user"], s["time"], [FieldSpec(**f) for f in s["fields"]], s["event_type"])
    return Prepared(store, schema, meta["vocabs"], targets, table["is_val"].to_numpy(), meta, path, users)
