"""Source events -> cached per-user sequences (Polars, lazy).

Steps: drop exact duplicate events (data.drop_duplicates); cut history at the cutoff (later events only make
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
from datamodules.encode import check_codes, event_order, last_events, of_event_types, schema_of, sequences_of, token_exprs
from datamodules.history_features import history_features
from datamodules.schema import DAY_FIELD, FIRST_ID, WEEK_FIELD, EventSchema, FieldSpec
from datamodules.store import SequenceStore
from datamodules.sources import load_source, source_files
from datamodules.sources.base import DataError, SourceData
from datamodules.sources.recsys2025 import TargetFiles, read_target_files, split_start
from datamodules.targets import (
    FIT_SUFFIX, FUTURE_KINDS, KINDS, MULTILABEL, STATIC_KINDS, VALUES_SUFFIX, Target, active_users, evaluation_kind, future_labels,
    only_users, static_labels, two_window_labels,
)

log = logging.getLogger(__name__)

VERSION = 9  # bump when the cached layout or its meaning changes (3: meta.json holds relevant_users; 4: the state runs save, datamodules/encode.py; 5: event_types; 6: features.parquet; 7: churn population, relevant-only labels, propensity_top values and the organisers' target files; 8: drop_duplicates; 9: features grouped over user-sorted runs, float statistics may move in the last bits)
CACHE_IRRELEVANT = ("batch_size", "bucket_by_length", "num_workers", "cache_dir")
CACHE_FILES = ("users.parquet", "targets.parquet", "features.parquet")


@dataclass
class Prepared:
    """Everything a DataModule needs, loaded from the cache."""

    store: SequenceStore
    schema: EventSchema
    vocabs: dict[str, list[str]]  # field -> values of ids FIRST_ID, FIRST_ID+1, ...
    targets: list[Target]
    is_val: np.ndarray  # bool [U]
    meta: dict
    path: Path | None  # the cache folder (None: new data, experiments.embed)
    users: pl.DataFrame  # the cached frame (text fields for renderers live here)
    features: pl.DataFrame | None = None  # user_id + handcrafted features over the whole history, in store order (None: new data)


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


PROTOCOLS = ("user_split", "challenge")


def resolve_cutoff(events: pl.LazyFrame, cfg: DataConfig) -> dt.datetime | None:
    """The end of the history: data.cutoff*, or for the challenge protocol the organisers' start of the first target window."""
    if cfg.protocol not in PROTOCOLS:
        raise DataError(f"data.protocol: {cfg.protocol!r} is not one of {PROTOCOLS}")
    if cfg.protocol == "challenge" and not (cfg.cutoff or cfg.cutoff_quantile is not None or cfg.cutoff_days_before_end):
        start = split_start(cfg.path) if cfg.source == "recsys2025" and cfg.path else None
        if start is not None:  # the organisers' split layout: the history is input/'s tables
            return start
        last = events.select(pl.col("time").max()).collect().item()  # as data_utils/split_data.py: whole days, ending with the last
        return (last - dt.timedelta(days=2 * cfg.window_days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
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


def fit_vocab(train: pl.LazyFrame, name: str, top_k: int | None) -> pl.LazyFrame:
    """Most frequent values first (top_k None: all); ties broken by value so the vocabulary is deterministic."""
    counts = train.select(pl.col(name)).drop_nulls().group_by(name).len()
    return counts.sort(["len", name], descending=[True, False]).head(top_k).select(name)


def vocab_cap(f: FieldSpec, cfg: DataConfig) -> int | None:
    """A categorical field's cap: data.field_top_k's entry (None: uncapped), else the smaller of its schema top_k and data.top_k."""
    if f.name in cfg.field_top_k:
        return cfg.field_top_k[f.name]
    return min(f.top_k or cfg.top_k, cfg.top_k)


def check_field_top_k(cfg: DataConfig, schema: EventSchema) -> None:
    """data.field_top_k must name categorical fields and give caps >= 1: a typo would otherwise change nothing, silently."""
    names = [f.name for f in schema.of_kind("categorical")]
    for name, cap in cfg.field_top_k.items():
        if name not in names:
            raise DataError(f"data.field_top_k: {name!r} is not a categorical field of this data; categorical fields are {names}")
        if cap is not None and cap < 1:
            raise DataError(f"data.field_top_k.{name}: {cap} must be >= 1 or null (uncapped)")


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
    check_field_top_k(cfg, schema)
    for t in cfg.targets:
        if t.kind not in KINDS:
            raise DataError(f"data.targets.{t.name}: unknown kind {t.kind!r}; choose from {KINDS}")
        if t.active_only and t.kind != "churn":
            raise DataError(f"data.targets.{t.name}.active_only: only a churn target has a population to restrict, not {t.kind!r}")
    if cfg.protocol != "challenge" and any(t.kind in FUTURE_KINDS for t in cfg.targets) and not (cfg.cutoff or cfg.cutoff_quantile is not None or cfg.cutoff_days_before_end):
        raise DataError("data.cutoff: future-window targets need data.cutoff, data.cutoff_quantile or data.cutoff_days_before_end")

    counts = dict(source.counts)
    raw = source.events.collect()
    o = event_order(raw, [f.name for f in schema.fields], cfg.drop_duplicates)
    all_users, user, order, duplicate = o.users, o.user, o.order, o.duplicate
    raw = raw.with_columns(_user=pl.Series(user), _kept=pl.Series(~duplicate))
    counts["raw_events"] = raw.height
    counts["duplicate_events"] = int(duplicate.sum())
    counts["duplicate_events_kept"] = o.repeats - int(duplicate.sum())

    events = raw.lazy().filter(pl.col("_kept"))
    cutoff = resolve_cutoff(events, cfg)
    future = None
    in_history = ~duplicate
    official = read_target_files(cfg.path) if source.name == "recsys2025" and cfg.path else TargetFiles()
    active: dict[str, pl.Series] = {}  # churn target -> its population (active_only)
    if cutoff is not None:
        in_history = raw.select(pl.col("_kept") & (pl.col("time") < cutoff)).to_series().to_numpy()
        window = dt.timedelta(days=cfg.window_days)
        future = events.filter((pl.col("time") >= cutoff) & (pl.col("time") < cutoff + window)).collect()
        if cfg.protocol == "challenge":  # the first window fits the heads, the second scores them
            last = events.select(pl.col("time").max()).collect().item()
            if last < cutoff + window:
                raise DataError(
                    f"data.protocol=challenge: the data ends at {last}, before the second target window ({cutoff + window}); "
                    "move data.cutoff* earlier or use protocol=user_split"
                )
            future = (future, events.filter((pl.col("time") >= cutoff + window) & (pl.col("time") < cutoff + 2 * window)).collect())
        past = events.filter(pl.col("time") < cutoff)
        active = {t.name: active_users(t, past, schema.event_type, official.active_clients) for t in cfg.targets if t.active_only}
        counts["events_after_cutoff"] = int((~duplicate).sum() - in_history.sum())
    of_types = of_event_types(raw, schema.event_type, cfg.event_types)
    counts["history_events_of_other_types"] = int((in_history & ~of_types).sum())
    in_history &= of_types

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

    # Fit the state on the training users' history (codes and the time origin: all history).
    vocabs: dict[str, list[str]] = {}
    edges: dict[str, list[float]] = {}
    cats = schema.of_kind("categorical")
    fitted = pl.collect_all([fit_vocab(train, f.name, vocab_cap(f, cfg)) for f in cats])
    for f, vocab in zip(cats, fitted):
        vocabs[f.name] = vocab[f.name].to_list()
    for f in schema.of_kind("numeric"):
        train_values = train.select(pl.col(f.name)).collect()[f.name].to_numpy().astype(np.float64)
        edges[f.name] = bucket_edges(train_values, f.n_buckets or cfg.n_buckets).tolist()
        bounds = [-np.inf, *edges[f.name], np.inf]
        vocabs[f.name] = [f"[{lo:g}, {hi:g})" for lo, hi in zip(bounds[:-1], bounds[1:])]
    codes = schema.of_kind("codes")
    for f in codes:
        check_codes(history, f)
    tops = history.select(pl.col("time").min().alias("t0"), *[pl.col(f.name).list.max().max().alias(f.name) for f in codes]).collect().row(0, named=True)
    for f in codes:
        top = tops[f.name]
        vocabs[f.name] = [str(c) for c in range(int(top) + 1)] if top is not None else []
    vocab_sizes = {f.name: FIRST_ID + len(vocabs[f.name]) for f in schema.of_kind("categorical", "numeric", "codes")}
    t0 = tops["t0"]

    # Handcrafted features see every history event of a user, so they are computed before the last-max_len cut.
    sorted_history = order[in_history[order]]
    features = history_features(by_user(raw, sorted_history, schema), schema, vocabs, cfg.features, cutoff, cfg.event_types)

    keep = last_events(sorted_history, user, cfg.max_len)
    columns = ["user_id", "time", "_user", *(f.name for f in schema.fields)]
    exprs = token_exprs(schema, vocabs, edges, vocab_sizes, t0)
    frame = sequences_of(raw.select(columns), keep, user, schema, vocab_sizes, exprs)
    counts["history_events"] = int(in_history.sum())
    counts["truncated_events"] = counts["history_events"] - keep.len()
    del raw, events, history, train

    max_day = int(frame[f"tok_{DAY_FIELD}"].list.max().max()) - FIRST_ID
    vocab_sizes[DAY_FIELD] = FIRST_ID + max_day + 1
    vocab_sizes[WEEK_FIELD] = FIRST_ID + max_day // 7 + 1

    targets, target_meta = pl.DataFrame({"user_id": frame["user_id"]}), {}
    for t in cfg.targets:
        values, fixed = None, official.classes.get(t.field) if t.kind == "propensity_top" else None
        if t.kind in STATIC_KINDS:
            label, names = static_labels(t, source.labels, frame["user_id"])
        elif cfg.protocol == "challenge":
            label, fit_label, names = two_window_labels(t, future, frame["user_id"], schema.event_type, active.get(t.name), fixed, source.relevant_users)
            targets = targets.with_columns(fit_label.alias(t.name + FIT_SUFFIX))
        else:
            label, names, values = future_labels(t, future, frame["user_id"], schema.event_type, active.get(t.name), fixed)
        if source.relevant_users is not None:  # only the relevant clients are scored, as the organisers do
            label = only_users(label, frame["user_id"], source.relevant_users)
            values = None if values is None else only_users(values, frame["user_id"], source.relevant_users)
        targets = targets.with_columns(label.alias(t.name))
        if values is not None:
            targets = targets.with_columns(values.alias(t.name + VALUES_SUFFIX))
        popularity = official.popularity.get(t.field) if fixed else None
        target_meta[t.name] = {"kind": t.kind, "classes": names, "top_k": t.top_k, "popularity": None if popularity is None else popularity.tolist()}
    if source.labels is not None:
        counts["labelled_users_without_events"] = int((~source.labels["user_id"].is_in(frame["user_id"].implode())).sum())

    meta = {
        "key": key,
        "version": VERSION,
        "source": source.name,
        "schema": dataclasses.asdict(schema),
        "vocabs": vocabs,
        "edges": edges,
        "vocab_sizes": vocab_sizes,
        "value_fields": schema.value_fields,
        "code_fields": [f.name for f in schema.of_kind("codes")],
        "targets": target_meta,
        "cutoff": cutoff.isoformat() if cutoff else None,
        "protocol": cfg.protocol,
        "t0": t0.isoformat(),
        "max_len": cfg.max_len,
        "event_types": cfg.event_types,
        "drop_duplicates": cfg.drop_duplicates,
        "column_types": source.column_types,
        "n_users": frame.height,
        "n_val_users": int(val.sum()),
        "counts": counts,
        "relevant_users": source.relevant_users,  # kept here so export never re-reads the source
    }
    for reason, n in counts.items():
        if n and reason not in ("raw_events", "history_events"):
            log.info("%s: %d %s", source.name, n, reason.replace("_", " "))
    write_atomic_dir(path, {"users.parquet": frame, "targets.parquet": targets.with_columns(is_val=pl.Series(val)), "features.parquet": features}, meta)


def by_user(raw: pl.DataFrame, rows: np.ndarray, schema: EventSchema) -> pl.LazyFrame:
    """The columns history features read, at `rows` (sorted by user), `_user` flagged sorted.

    On a key flagged sorted Polars groups by slicing runs instead of hashing: the features'
    dozens of per-user aggregations took 11 s over 3M events hashed, 4 s sorted (gather included: 6.4 s).
    Codes and text columns are left out (the features do not read them; they are the widest). Means
    and stds of floats move in the last bits (summed over slices, not gathered rows).
    """
    columns = ["_user", "user_id", "time", "_file", "_row", *(f.name for f in schema.fields if f.kind in ("categorical", "numeric"))]
    return raw.select(columns)[pl.Series(rows, dtype=pl.UInt32)].with_columns(pl.col("_user").set_sorted()).lazy()


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
            # lz4: 2x faster to write than zstd here, as fast to read; no column statistics (nothing reads them): 20% of the write
            frame.write_parquet(tmp / name, compression="lz4", statistics=False)
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
    targets = []
    for name, info in meta["targets"].items():
        kind = evaluation_kind(info["kind"], len(info["classes"]))
        fit = table[name + FIT_SUFFIX] if name + FIT_SUFFIX in table.columns else None
        if kind == MULTILABEL:
            labels = table[name].to_numpy().astype(np.int8)
            values = table[name + VALUES_SUFFIX] if name + VALUES_SUFFIX in table.columns else None
            popularity = None if info.get("popularity") is None else np.asarray(info["popularity"], dtype=np.float64)
            fit_labels = None if fit is None else fit.to_numpy().astype(np.int8)
            targets.append(Target(name, kind, labels, info["classes"], values, info.get("top_k", 0), popularity, fit_labels))
        else:
            labels = table[name].fill_null(-1).to_numpy().astype(np.int64)
            fit_labels = None if fit is None else fit.fill_null(-1).to_numpy().astype(np.int64)
            targets.append(Target(name, kind, labels, info["classes"], fit_labels=fit_labels))
    prepared = prepared_of(users, meta, targets, table["is_val"].to_numpy(), path)
    prepared.features = pl.read_parquet(path / "features.parquet")
    if not prepared.features["user_id"].equals(users["user_id"]):
        raise DataError(f"{path / 'features.parquet'}: column 'user_id' is not the users of users.parquet in their order; delete the cache folder to rebuild it")
    return prepared


def prepared_of(users: pl.DataFrame, meta: dict, targets: list[Target] | None = None, is_val: np.ndarray | None = None, path: Path | None = None) -> Prepared:
    """Sequences in the users.parquet layout as `Prepared`; without targets and splits for new data (experiments.embed)."""
    store = SequenceStore.from_frame(users, meta["vocab_sizes"], meta["value_fields"], meta["code_fields"])
    is_val = np.zeros(len(store), dtype=bool) if is_val is None else is_val
    return Prepared(store, schema_of(meta), meta["vocabs"], targets or [], is_val, meta, path, users)
