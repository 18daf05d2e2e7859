"""RecSys Challenge 2025 (Synerise), read from the official data layout in one directory.

    product_buy.parquet, add_to_cart.parquet, remove_from_cart.parquet   client_id, timestamp, sku
    page_visit.parquet                                                   client_id, timestamp, url
    search_query.parquet                                                 client_id, timestamp, query
    product_properties.parquet                                           sku, category, price, name
    input/relevant_clients.npy (optional)                                client ids to embed and export
    target/active_clients.npy (optional)                                 the churn population (read_target_files)
    target/propensity_{category,sku}.npy (optional)                      the 100 fixed classes of each propensity task
    target/popularity_propensity_{category,sku}.npy (optional)           their popularity, for novelty

All event tables become one frame, one row per event, with `event_type` naming its table.
The three product tables get category, price bucket and name from product_properties by
sku; fields that do not apply to an event (url of a purchase, sku of a search) are null.
Ids, category and price bucket are categoricals (String), as in "Encode Me If You Can";
`query` and `name` are codes fields: 16 ints in 0-255, given either as the official string
"[12 5 ... 200]" or as a list column. Timestamps are "YYYY-MM-DD HH:MM:SS" strings or a
datetime column.

Every inconsistency is an error naming file, column and row, nothing is dropped or counted:
the real data is consistent, so a violation means a wrong or damaged file, and silently
dropping events would change the sequences without anyone noticing. Errors: a missing
table; a null client_id or timestamp; a non-integer id column; a query or name that is not
16 ints in 0-255; an sku of an event table missing from product_properties (or null); an
sku listed twice in product_properties; a client id listed twice in relevant_clients.npy.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from datamodules.config import DataConfig
from datamodules.schema import EventSchema, FieldSpec
from datamodules.sources.base import DataError, Source, SourceData, UserRange, dtype_kind, first_row, parse_time, require_columns
from datamodules.sources.generic import distinct_users, scan_table

PRODUCT_TABLES = ("product_buy", "add_to_cart", "remove_from_cart")
EVENT_TABLES = (*PRODUCT_TABLES, "page_visit", "search_query")
PROPERTIES = "product_properties"
RELEVANT = Path("input") / "relevant_clients.npy"
TARGET_DIR = Path("target")
ACTIVE = TARGET_DIR / "active_clients.npy"
PROPENSITY_FIELDS = ("category", "sku")  # the organisers' propensity tasks: propensity_<field>


def class_file(name: str) -> Path:
    """The fixed classes of the propensity task on event field `name`."""
    return TARGET_DIR / f"propensity_{name}.npy"


def popularity_file(name: str) -> Path:
    """The popularity of each fixed class of propensity_<name> (novelty)."""
    return TARGET_DIR / f"popularity_propensity_{name}.npy"


TARGET_FILES = (ACTIVE, *(f(x) for x in PROPENSITY_FIELDS for f in (class_file, popularity_file)))
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
CODE_LENGTH, CODE_MAX = 16, 255
MAX_SUBMISSION_DIM = 2048

SCHEMA = EventSchema(
    user="client_id",
    time="timestamp",
    fields=[
        FieldSpec("event_type", "categorical"),
        FieldSpec("sku", "categorical", top_k=5000),
        FieldSpec("url", "categorical", top_k=5000),
        FieldSpec("category", "categorical"),
        FieldSpec("price", "categorical"),
        FieldSpec("name", "codes", length=CODE_LENGTH),
        FieldSpec("query", "codes", length=CODE_LENGTH),
    ],
    event_type="event_type",
)
CODES = pl.List(pl.Int16)
OUTPUT_TYPES = {"sku": pl.String, "url": pl.String, "category": pl.String, "price": pl.String, "name": CODES, "query": CODES}


SPLIT_TARGETS = (TARGET_DIR / "train_target.parquet", TARGET_DIR / "validation_target.parquet")


def is_split_layout(folder: Path) -> bool:
    """The organisers' split_data.py output: the input window's tables in input/, the two target windows' purchases in target/."""
    return all((folder / "input" / f"{name}.parquet").is_file() for name in EVENT_TABLES) and all((folder / f).is_file() for f in SPLIT_TARGETS)


def event_files(folder: Path) -> list[tuple[Path, str]]:
    """(file, table) of every event file: the five tables, or in the split layout input/'s five plus the target windows' purchases."""
    if is_split_layout(folder):
        return [(folder / "input" / f"{name}.parquet", name) for name in EVENT_TABLES] + [(folder / f, "product_buy") for f in SPLIT_TARGETS]
    return [(folder / f"{name}.parquet", name) for name in EVENT_TABLES]


def split_start(folder: str | Path) -> dt.datetime | None:
    """The split layout's history end: the first day of target/train_target.parquet at midnight (None: not that layout)."""
    folder = Path(folder).expanduser()
    if not is_split_layout(folder):
        return None
    path = folder / SPLIT_TARGETS[0]
    frame = parse_time(scan_table(path).select("_row", "timestamp"), "timestamp", TIME_FORMAT, path)
    first = frame.select(pl.col("time").min()).collect().item()
    if first is None:
        raise DataError(f"{path}: no rows; the split layout's first target window is empty")
    return first.replace(hour=0, minute=0, second=0, microsecond=0)


def files(path: str | Path) -> list[Path]:
    """Every file the source reads (for the cache key); a missing table is an error. No parsing."""
    folder = Path(path).expanduser()
    found = [f for f, _ in event_files(folder)] + [folder / f"{PROPERTIES}.parquet"]
    for f in found:
        if not f.is_file():
            raise DataError(f"{f}: file not found; the recsys2025 source reads the challenge layout ({', '.join(p.name for p in found)})")
    optional = [folder / name for name in (RELEVANT, *TARGET_FILES)]
    return found + [f for f in optional if f.is_file()]


def load(path: str | Path, only: UserRange | None = None) -> SourceData:
    """All event tables as one validated, lazy event frame (see datamodules/sources/base.py); `only`: one range of clients."""
    paths = files(path)
    folder = Path(path).expanduser()
    properties = read_properties(folder / f"{PROPERTIES}.parquet")
    read = [read_events(path, name, properties, only) for path, name in event_files(folder)]
    relevant = folder / RELEVANT
    users = read_relevant(relevant) if relevant in paths else None  # files() decides whether it is there
    time_kinds = {kind for _, kind in read}
    kinds = {"user": "integer", "time": time_kinds.pop() if len(time_kinds) == 1 else "mixed"}
    return SourceData("recsys2025", pl.concat([frame for frame, _ in read], how="vertical"), SCHEMA, None, paths, {}, users, kinds)


def client_ids(path: str | Path) -> pl.Series:
    """Distinct client ids (as strings) of the five event tables, each scanned for that column alone."""
    folder = Path(path).expanduser()
    files(folder)
    return pl.concat([distinct_users(path, "client_id") for path, _ in event_files(folder)]).unique()


def folder_of(cfg: DataConfig) -> Path:
    if not cfg.path:
        raise DataError("data.path: the recsys2025 source needs the challenge data directory")
    return Path(cfg.path).expanduser()


SOURCE = Source(
    files=lambda cfg: files(folder_of(cfg)),
    load=lambda cfg, only=None: load(folder_of(cfg), only),
    users=lambda cfg: client_ids(folder_of(cfg)),
)


def parse_codes(frame: pl.LazyFrame, column: str, path: Path) -> pl.LazyFrame:
    """`frame` with `column` parsed to List(Int16) of CODE_LENGTH ints in 0-255 (null stays null), collected once.

    Vectorised: strip the brackets, split on single spaces (the challenge's format), cast each
    piece; the few strings that do not parse that way (commas, runs of blanks) are parsed
    again with the general separator. A piece that is not an integer becomes null, which the
    check below reports with the raw value. Int16: a quarter of the memory of Int64 once the
    names are joined into every product event.
    """
    dtype = frame.collect_schema()[column]
    src = pl.col(column)
    codes = pl.col("_parsed")
    odd = src.is_not_null() & ((codes.list.len() != CODE_LENGTH) | (codes.list.drop_nulls().list.len() != CODE_LENGTH))
    if dtype == pl.String:
        stripped = src.str.strip_chars(" \t\n[]")
        table = frame.with_columns(stripped.str.split(" ").list.eval(pl.element().cast(pl.Int32, strict=False)).alias("_parsed")).collect()
        if table.select(odd.any()).item():
            general = stripped.str.replace_all(r"[\s,]+", " ").str.split(" ").list.eval(pl.element().cast(pl.Int32, strict=False))
            table = table.update(table.filter(odd).select("_row", general.alias("_parsed")), on="_row")
    elif isinstance(dtype, (pl.List, pl.Array)) and dtype.inner.is_integer():
        wide = pl.List(pl.Int64)
        table = frame.with_columns((src.cast(wide) if isinstance(dtype, pl.List) else src.arr.to_list().cast(wide)).alias("_parsed")).collect()
    else:
        raise DataError(f"{path}: column {column!r} has dtype {dtype}; expected a string '[a b ... ]' or a list of {CODE_LENGTH} ints")
    bad = odd | (codes.list.min() < 0) | (codes.list.max() > CODE_MAX)
    row = first_row(table.lazy(), bad)
    if row is not None:
        raw = table.filter(pl.col("_row") == row).select(src.cast(pl.String) if dtype == pl.String else src.cast(pl.List(pl.Int64))).item()
        raw = raw if isinstance(raw, str) else str(list(raw))
        raise DataError(f"{path}: column {column!r}, row {row}: expected {CODE_LENGTH} integers in 0-{CODE_MAX}, got {raw!r}")
    return table.drop(column).rename({"_parsed": column}).with_columns(pl.col(column).cast(CODES)).lazy()


def require_integer(frame: pl.LazyFrame, column: str, path: Path) -> None:
    dtype = frame.collect_schema()[column]
    if not dtype.is_integer():
        raise DataError(f"{path}: column {column!r} has dtype {dtype}; expected integer ids")


def require_not_null(frame: pl.LazyFrame, columns: Sequence[str], path: Path) -> None:
    for column in columns:
        row = first_row(frame, pl.col(column).is_null())
        if row is not None:
            raise DataError(f"{path}: column {column!r}, row {row}: null {column}")


def read_properties(path: Path) -> pl.LazyFrame:
    """sku -> category, price, name, collected once (it is small and joined into three tables).

    Memoised on the file's path, size and modification time: a run over chunks of clients
    reads it once, not once per chunk.
    """
    stat = path.stat()
    return _properties(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _properties(path_name: str, size: int, mtime_ns: int) -> pl.LazyFrame:
    path = Path(path_name)
    frame = scan_table(path)
    require_columns(path, frame.collect_schema().names(), {c: "product_properties" for c in ("sku", "category", "price", "name")})
    require_integer(frame, "sku", path)
    require_not_null(frame, ["sku"], path)
    row = first_row(frame, ~pl.col("sku").is_first_distinct())
    if row is not None:
        sku = frame.filter(pl.col("_row") == row).select("sku").collect().item()
        raise DataError(f"{path}: column 'sku', row {row}: sku {sku} is listed more than once")
    return (
        parse_codes(frame, "name", path)
        .select(
            pl.col("sku").cast(pl.Int64),
            pl.col("category").cast(pl.String),
            pl.col("price").cast(pl.String),
            pl.col("name"),
        )
        .collect()
        .lazy()
    )


def read_events(path: Path, table: str, properties: pl.LazyFrame, only: UserRange | None = None) -> tuple[pl.LazyFrame, str]:
    """One event table -> the common event columns (product tables joined with their properties) and its time column's kind."""
    frame = scan_table(path, only=only, user="client_id")
    value = "sku" if table in PRODUCT_TABLES else "url" if table == "page_visit" else "query"
    require_columns(path, frame.collect_schema().names(), {"client_id": "schema.user", "timestamp": "schema.time", value: table})
    require_integer(frame, "client_id", path)
    require_not_null(frame, ["client_id", "timestamp"], path)
    time_kind = dtype_kind(frame.collect_schema()["timestamp"])
    frame = parse_time(frame, "timestamp", TIME_FORMAT, path)

    columns = {name: pl.lit(None, dtype=dtype) for name, dtype in OUTPUT_TYPES.items()}
    if table in PRODUCT_TABLES:
        frame = frame.drop("category", "price", "name", strict=False)  # the split layout's target files carry them joined
        require_integer(frame, "sku", path)
        require_not_null(frame, ["sku"], path)
        frame = frame.with_columns(pl.col("sku").cast(pl.Int64))
        unknown = frame.join(properties, on="sku", how="anti").sort("_row").select("_row", "sku").head(1).collect()
        if unknown.height:
            row, sku = unknown.row(0)
            raise DataError(f"{path}: column 'sku', row {row}: sku {sku} is not in {PROPERTIES}.parquet")
        frame = frame.join(properties, on="sku", how="left", maintain_order="left")
        columns.update({c: pl.col(c) for c in ("category", "price", "name")})
        columns["sku"] = pl.col("sku").cast(pl.String)
    elif table == "page_visit":
        require_integer(frame, "url", path)
        columns["url"] = pl.col("url").cast(pl.String)
    else:
        frame = parse_codes(frame, "query", path)
        columns["query"] = pl.col("query")
    events = frame.select(
        pl.col("_row"),
        pl.lit(str(path)).alias("_file"),
        pl.col("client_id").cast(pl.String).alias("user_id"),
        pl.col("time"),
        pl.lit(table).alias("event_type"),
        *[expr.alias(name) for name, expr in columns.items()],
    )
    return events, time_kind


def read_relevant(path: Path) -> list[str]:
    """Client ids (relevant or active clients) as strings like `user_id`; duplicates are an error."""
    ids = load_npy(path)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{path}: expected a 1-D array of integer client ids, got dtype {ids.dtype} and shape {ids.shape}")
    values, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = values[counts > 1][np.argmin(first[counts > 1])]
        where = np.flatnonzero(ids == dup)[:2].tolist()
        raise DataError(f"{path}: client id {int(dup)} appears more than once (positions {where[0]} and {where[1]})")
    return [str(i) for i in ids.tolist()]


@dataclass
class TargetFiles:
    """The organisers' target/ files that are present; each replaces what preprocessing would derive."""

    active_clients: list[str] | None = None  # the churn population (client ids as strings)
    classes: dict[str, list[str]] = field(default_factory=dict)  # field -> the fixed propensity classes
    popularity: dict[str, np.ndarray] = field(default_factory=dict)  # field -> popularity of each class


def read_target_files(folder: str | Path) -> TargetFiles:
    """target/active_clients.npy, propensity_{category,sku}.npy and their popularity, whichever exist; malformed: an error naming the file."""
    folder = Path(folder).expanduser()
    out = TargetFiles()
    if (folder / ACTIVE).is_file():
        out.active_clients = read_relevant(folder / ACTIVE)
    for name in PROPENSITY_FIELDS:
        classes, popularity = folder / class_file(name), folder / popularity_file(name)
        if popularity.is_file() and not classes.is_file():
            raise DataError(f"{popularity}: popularity without its classes {classes.name}")
        if not classes.is_file():
            continue
        values = load_npy(classes)
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer) or values.size == 0:
            raise DataError(f"{classes}: expected a non-empty 1-D array of integer {name} ids, got dtype {values.dtype} and shape {values.shape}")
        if np.unique(values).size != values.size:
            raise DataError(f"{classes}: a {name} id is listed more than once")
        out.classes[name] = [str(v) for v in values.tolist()]
        if popularity.is_file():
            pop = load_npy(popularity)
            if pop.shape != values.shape or not np.issubdtype(pop.dtype, np.number) or not np.isfinite(pop).all():
                raise DataError(
                    f"{popularity}: expected {values.size} finite numbers (one per class of {classes.name}), got dtype {pop.dtype} and shape {pop.shape}"
                )
            out.popularity[name] = pop.astype(np.float64)
    return out


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read as .npy: {str(err).splitlines()[0]}") from None


def write_submission(out_dir: str | Path, client_ids: Sequence[int | str] | np.ndarray, embeddings: np.ndarray) -> tuple[Path, Path]:
    """Write the challenge submission: client_ids.npy (int64) and embeddings.npy (float16, <= 2048 columns).

    Each file is written under a temporary name and renamed, so a crash never leaves a torn
    file under the final name. Duplicate ids, non-finite values (also after the float16
    cast, which overflows beyond 65504), a row count that differs from the ids and more than
    2048 columns are ValueErrors.
    """
    try:
        ids = np.asarray(client_ids).astype(np.int64)
    except (TypeError, ValueError):
        raise ValueError("write_submission: client_ids must be integers (or strings of integers)") from None
    if ids.ndim != 1:
        raise ValueError(f"write_submission: client_ids must be 1-D, got shape {ids.shape}")
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dups = values[counts > 1]
        raise ValueError(f"write_submission: {dups.size} duplicate client ids, e.g. {int(dups[0])}")
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] != ids.size:
        raise ValueError(f"write_submission: embeddings must have shape ({ids.size}, dim), got {emb.shape}")
    if not 1 <= emb.shape[1] <= MAX_SUBMISSION_DIM:
        raise ValueError(f"write_submission: embeddings have {emb.shape[1]} columns; the challenge allows 1 to {MAX_SUBMISSION_DIM}")
    if not np.issubdtype(emb.dtype, np.number) or not np.isfinite(emb).all():
        raise ValueError("write_submission: embeddings must be finite numbers (found NaN, inf or a non-number)")
    with np.errstate(over="ignore"):
        half = emb.astype(np.float16)
    if not np.isfinite(half).all():
        raise ValueError(f"write_submission: embeddings overflow float16 (|value| > {float(np.finfo(np.float16).max):g}); rescale them")

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    targets = {out / "client_ids.npy": ids, out / "embeddings.npy": half}
    temps = {path: path.with_name(f".{path.name}.tmp-{os.getpid()}") for path in targets}
    try:
        for path, array in targets.items():
            with open(temps[path], "wb") as fh:
                np.save(fh, array)
        for path in targets:
            os.replace(temps[path], path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return out / "client_ids.npy", out / "embeddings.npy"
