"""What every source hands to preprocessing, and the checks that turn bad files into clear errors.

A source reads its own files and returns `SourceData`: one event LazyFrame with the
columns `user_id` (String), `time` (Datetime), `_row` (1-based row in its file,
for error messages), `_file`, and one column per schema field, named after the field.
Column types by field kind: categorical and text String, numeric Float64 (null where
missing), codes a List of integers (recsys2025: Int16) of the field's fixed length (null where the event has none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from datamodules.config import DataConfig
from datamodules.schema import EventSchema


class DataError(ValueError):
    """Bad input data; the message names the file, the column and the row."""


@dataclass
class SourceData:
    name: str
    events: pl.LazyFrame
    schema: EventSchema
    labels: pl.DataFrame | None  # column `user_id` (String) + label columns
    files: list[Path] = field(default_factory=list)  # every file read (errors name the first)
    counts: dict[str, int] = field(default_factory=dict)  # rows dropped or fixed while loading, by reason
    relevant_users: list[str] | None = None  # users to export embeddings for (the challenge's relevant clients); kept in meta.json
    column_types: dict[str, str] = field(default_factory=dict)  # "user" / "time" -> kind of the raw column (`dtype_kind`)


@dataclass(frozen=True)
class UserRange:
    """The users whose id, read as a string, lies in [first, last]: one chunk of a run over sorted users.

    Sources apply it while scanning their files, so only that chunk's rows reach memory.
    """

    first: str
    last: str

    def keeps(self, column: str) -> pl.Expr:
        return pl.col(column).cast(pl.String).is_between(pl.lit(self.first), pl.lit(self.last))


@dataclass(frozen=True)
class Source:
    """A source as the `data` config reaches it.

    files: every file it reads (cheap, no parsing: the cache key);
    load: its events, all users or one `UserRange` of them;
    users: its distinct user ids (String), listed without loading the events.
    """

    files: Callable[[DataConfig], list[Path]]
    load: Callable[[DataConfig, UserRange | None], SourceData]
    users: Callable[[DataConfig], pl.Series]


def dtype_kind(dtype: pl.DataType) -> str:
    """integer, float, string, temporal or the dtype itself: what a raw id or time column holds, widths aside."""
    if dtype.is_integer():
        return "integer"
    if dtype.is_float():
        return "float"
    if dtype == pl.String:
        return "string"
    if dtype.is_temporal():
        return "temporal"
    return str(dtype)


def first_row(frame: pl.LazyFrame, condition: pl.Expr) -> int | None:
    """1-based `_row` of the first row where `condition` holds, or None."""
    hit = frame.filter(condition).select("_row").head(1).collect()
    return int(hit["_row"][0]) if hit.height else None


def require_columns(path: Path, present: list[str], needed: dict[str, str]) -> None:
    """`needed` maps column -> what it is for (e.g. 'schema.time')."""
    import difflib

    for column, role in needed.items():
        if column not in present:
            near = difflib.get_close_matches(column, present, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise DataError(f"{path}: column {column!r} ({role}) not found; columns are {present}{hint}")


def parse_time(frame: pl.LazyFrame, column: str, time_format: str | None, path: Path) -> pl.LazyFrame:
    """Add a Datetime column `time` from `column`.

    time_format: 'epoch_s' / 'epoch_ms' for integer epochs, a strftime pattern for strings
    or for integers that spell a date (19970101 with %Y%m%d), or None for a column that
    already is a Date/Datetime (or an ISO string).
    """
    dtype = frame.collect_schema()[column]
    src = pl.col(column)
    if time_format in ("epoch_s", "epoch_ms"):
        if not (dtype.is_numeric() or dtype == pl.String):
            raise DataError(f"{path}: column {column!r} has dtype {dtype}; {time_format} needs integers")
        seconds = src.cast(pl.Float64, strict=False)
        unit = "s" if time_format == "epoch_s" else "ms"
        bad = seconds.is_null() | seconds.is_nan() | seconds.is_infinite()
        parsed = pl.when(bad).then(None).otherwise(pl.from_epoch(seconds.cast(pl.Int64, strict=False), time_unit=unit))
    elif dtype in (pl.Date,) or isinstance(dtype, pl.Datetime):
        parsed = src.cast(pl.Datetime("us"))
    elif dtype == pl.String or (dtype.is_integer() and time_format):  # 19970101 read as an integer, with %Y%m%d
        text = src.cast(pl.String)
        if time_format:
            parsed = text.str.strptime(pl.Datetime("us"), time_format, strict=False)
        else:
            parsed = text.str.to_datetime(strict=False, time_unit="us")
    else:
        raise DataError(
            f"{path}: column {column!r} has dtype {dtype}; set schema.time_format to epoch_s or epoch_ms "
            "for epoch numbers, or a strftime pattern (e.g. %Y%m%d) for dates written as text or digits"
        )
    frame = frame.with_columns(parsed.cast(pl.Datetime("us")).alias("time")).collect().lazy()  # parsed once, not per query
    row = first_row(frame, pl.col("time").is_null() & src.is_not_null())
    if row is not None:
        raw = frame.filter(pl.col("_row") == row).select(src.cast(pl.String)).collect().item()
        fmt = f" with format {time_format!r}" if time_format else ""
        raise DataError(f"{path}: column {column!r}, row {row}: cannot parse time {raw!r}{fmt}")
    return frame
