"""Any CSV / parquet / Arrow event log described by a schema in the config: a full run from config alone.

Handling of imperfect data (documented in docs/data.md, counted in the run's metrics):
- null user or time, unparseable time, a numeric field holding text, a missing column,
  a missing or empty file: an error naming file, column and row;
- non-finite numbers (inf, NaN): treated as missing, counted;
- exact duplicate events: dropped in preprocessing, counted;
- labels for users without events: ignored, counted.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from datamodules.config import DataConfig
from datamodules.schema import EventSchema, FieldSpec
from datamodules.sources.base import DataError, Source, SourceData, UserRange, dtype_kind, first_row, parse_time, require_columns

FRAME_NAME = "<DataFrame>"  # how errors name an in-memory table
READERS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet", ".arrow": "ipc", ".ipc": "ipc", ".feather": "ipc"}


def lazy_scan(path: Path, separator: str | None = None) -> pl.LazyFrame:
    """The file as Polars' lazy scan of its type (nothing read yet); a missing file or an unknown type is a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(READERS)}")
    if kind == "csv":
        sep = separator or ("\t" if path.suffix.lower() == ".tsv" else ",")
        return pl.scan_csv(path, separator=sep, infer_schema_length=10000)
    return pl.scan_parquet(path) if kind == "parquet" else pl.scan_ipc(path)


def scan_table(path: Path, separator: str | None = None, only: UserRange | None = None, user: str | None = None) -> pl.LazyFrame:
    """One file read into memory once, with a 1-based `_row`, as a LazyFrame over that memory.

    Validation runs a dozen small queries per file: over a lazy scan each would re-read and
    re-decode the file, over the collected frame each is a pass over memory. `only` keeps
    the rows of a range of users (column `user`) while scanning, so a chunk of users costs
    the memory of that chunk; `_row` still counts every row of the file. Missing,
    unreadable and empty files are DataErrors.
    """
    kind = READERS.get(path.suffix.lower(), "?")
    try:
        frame = lazy_scan(path, separator).with_row_index("_row", offset=1)
        if only is not None:
            require_columns(path, frame.collect_schema().names(), {user: "schema.user"})
            frame = frame.filter(only.keeps(user))
        table = frame.collect(engine="streaming" if only is not None else "auto")
        if table.height == 0 and only is None:
            raise DataError(f"{path}: no rows")
    except (pl.exceptions.NoDataError, pl.exceptions.ComputeError, OSError) as err:
        raise DataError(f"{path}: cannot read as {kind}: {str(err).splitlines()[0]}") from None
    return table.lazy()


def distinct_users(path: Path, column: str, separator: str | None = None) -> pl.Series:
    """The distinct values of a file's user column as strings, from a streaming scan of that column alone.

    A null user is an error naming its row (a chunked run would otherwise skip that row silently).
    """
    kind = READERS.get(path.suffix.lower(), "?")
    try:
        frame = lazy_scan(path, separator)
        require_columns(path, frame.collect_schema().names(), {column: "schema.user"})
        users = frame.select(pl.col(column).cast(pl.String)).unique().collect(engine="streaming").to_series()
    except (pl.exceptions.NoDataError, pl.exceptions.ComputeError, OSError) as err:
        raise DataError(f"{path}: cannot read as {kind}: {str(err).splitlines()[0]}") from None
    if users.null_count():
        row = first_row(frame.with_row_index("_row", offset=1), pl.col(column).is_null())
        raise DataError(f"{path}: column {column!r}, row {row}: null user")
    return users.rename("user_id")


def read_events(
    path: Path, schema: EventSchema, time_format: str | None, separator: str | None = None, only: UserRange | None = None
) -> tuple[pl.LazyFrame, dict[str, int], dict[str, str]]:
    """One event file -> the normalised event frame (see sources/base.py), its counts and the kinds of its user and time columns."""
    return normalise(scan_table(path, separator, only, schema.user), path, schema, time_format)


def normalise(frame: pl.LazyFrame, path: Path | str, schema: EventSchema, time_format: str | None) -> tuple[pl.LazyFrame, dict[str, int], dict[str, str]]:
    """A table with `_row` (read from `path`, or an in-memory frame named by it) -> the normalised event frame, counts, column kinds."""
    present = [c for c in frame.collect_schema().names() if c != "_row"]
    needed = {schema.user: "schema.user", schema.time: "schema.time"}
    needed.update({f.source_column: f"schema.fields.{f.name}" for f in schema.fields})
    require_columns(path, present, needed)

    for column, role in ((schema.user, "user"), (schema.time, "time")):
        row = first_row(frame, pl.col(column).is_null())
        if row is not None:
            raise DataError(f"{path}: column {column!r}, row {row}: null {role}")
    types = frame.collect_schema()
    kinds = {"user": dtype_kind(types[schema.user]), "time": dtype_kind(types[schema.time])}
    frame = parse_time(frame, schema.time, time_format, path)

    counts: dict[str, int] = {}
    columns = [pl.col("_row"), pl.lit(str(path)).alias("_file"), pl.col(schema.user).cast(pl.String).alias("user_id"), pl.col("time")]
    for f in schema.fields:
        src = pl.col(f.source_column)
        if f.kind == "numeric":
            dtype = frame.collect_schema()[f.source_column]
            if not (dtype.is_numeric() or dtype in (pl.String, pl.Null)):
                raise DataError(f"{path}: column {f.source_column!r} has dtype {dtype}; field {f.name!r} is numeric")
            number = src.cast(pl.Float64, strict=False)
            row = first_row(frame, number.is_null() & src.is_not_null())
            if row is not None:
                raw = frame.filter(pl.col("_row") == row).select(src.cast(pl.String)).collect().item()
                raise DataError(f"{path}: column {f.source_column!r}, row {row}: {raw!r} is not a number (field {f.name!r} is numeric)")
            nonfinite = frame.select((number.is_nan() | number.is_infinite()).sum()).collect().item()
            if nonfinite:
                counts[f"nonfinite_{f.name}"] = int(nonfinite)
            columns.append(pl.when(number.is_finite()).then(number).otherwise(None).alias(f.name))
        elif f.kind in ("categorical", "text"):
            columns.append(src.cast(pl.String).alias(f.name))
        else:
            raise DataError(f"{path}: field {f.name!r} has kind {f.kind!r}, which the generic source does not read (codes: recsys2025 only)")
    return frame.select(columns), counts, kinds


def read_labels(path: Path, user: str, columns: Sequence[str], separator: str | None = None) -> pl.DataFrame:
    """A labels table: one row per user (`_row`, `_file` kept for error messages); duplicate or null users are errors."""
    frame = scan_table(path, separator)
    present = [c for c in frame.collect_schema().names() if c != "_row"]
    require_columns(path, present, {user: "labels.user", **{c: "targets.column" for c in columns}})
    row = first_row(frame, pl.col(user).is_null())
    if row is not None:
        raise DataError(f"{path}: column {user!r}, row {row}: null user")
    row = first_row(frame, ~pl.col(user).cast(pl.String).is_first_distinct())
    if row is not None:
        raise DataError(f"{path}: column {user!r}, row {row}: user appears more than once in the labels")
    keep = [pl.col(c) for c in dict.fromkeys(columns) if c != user]
    return frame.select("_row", pl.lit(str(path)).alias("_file"), pl.col(user).cast(pl.String).alias("user_id"), *keep).collect()


def load(
    paths: Sequence[str | Path],
    schema: EventSchema,
    time_format: str | None = None,
    separator: str | None = None,
    labels_path: str | Path | None = None,
    labels_user: str | None = None,
    label_columns: Sequence[str] = (),
    only: UserRange | None = None,
) -> SourceData:
    files = [Path(p).expanduser() for p in paths]
    if not files:
        raise DataError("data.path: no event files given")
    frames, counts, kinds = [], {}, {}
    for path in files:
        frame, file_counts, kinds = read_events(path, schema, time_format, separator, only)
        frames.append(frame)
        for k, v in file_counts.items():
            counts[k] = counts.get(k, 0) + v
    labels = None
    if labels_path is not None:
        lpath = Path(labels_path).expanduser()
        labels = read_labels(lpath, labels_user or schema.user, label_columns, separator)
        files.append(lpath)
    return SourceData("generic", pl.concat(frames, how="vertical_relaxed"), schema, labels, files, counts, column_types=kinds)


def event_schema(cfg: DataConfig) -> EventSchema:
    """The schema from config (FieldSpec entries may arrive as dicts)."""
    s = cfg.schema
    fields = [f if isinstance(f, FieldSpec) else FieldSpec(**f) for f in s.fields]
    try:
        return EventSchema(user=s.user, time=s.time, fields=fields, event_type=s.event_type)
    except ValueError as err:
        raise DataError(f"data.{err}") from None


def event_files(cfg: DataConfig) -> list[Path]:
    """data.path's matches, sorted; a path matching nothing stays as given (then 'file not found')."""
    if not cfg.path:
        raise DataError("data.path: the generic source needs an event file or glob")
    path = Path(cfg.path).expanduser()
    return [Path(m) for m in sorted(glob.glob(str(path)))] or [path]


def load_config(cfg: DataConfig, only: UserRange | None = None) -> SourceData:
    from datamodules.targets import STATIC_KINDS  # here, not at the top: targets imports this package

    return load(
        event_files(cfg),
        event_schema(cfg),
        time_format=cfg.schema.time_format,
        separator=cfg.schema.separator,
        labels_path=cfg.labels.path,
        labels_user=cfg.labels.user,
        label_columns=[t.column or t.name for t in cfg.targets if t.kind in STATIC_KINDS],
        only=only,
    )


def config_files(cfg: DataConfig) -> list[Path]:
    """The event files, then the labels file if any (the order `load` appends them in)."""
    return event_files(cfg) + ([Path(cfg.labels.path).expanduser()] if cfg.labels.path else [])


def frame_source(table: pl.DataFrame, cfg: DataConfig, only: UserRange | None = None) -> SourceData:
    """An in-memory event table in the layout the schema describes, read as the generic source reads a file (named `<DataFrame>`)."""
    schema = event_schema(cfg)
    frame = table.lazy().with_row_index("_row", offset=1)
    require_columns(Path(FRAME_NAME), table.columns, {schema.user: "schema.user"})
    if only is not None:
        frame = frame.filter(only.keeps(schema.user))
    events, counts, kinds = normalise(frame.collect().lazy(), FRAME_NAME, schema, cfg.schema.time_format)
    return SourceData("generic", events, schema, None, [], counts, column_types=kinds)


def config_users(cfg: DataConfig) -> pl.Series:
    """Distinct users of all event files (labels aside)."""
    parts = [distinct_users(path, cfg.schema.user, cfg.schema.separator) for path in event_files(cfg)]
    return pl.concat(parts).unique()


SOURCE = Source(files=config_files, load=load_config, users=config_users)
