"""Sources by name: one table, so a new source is one module (exposing `SOURCE`) and one line here."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from datamodules.config import DataConfig
from datamodules.sources import generic, ml100k, recsys2025, uqabench
from datamodules.sources.base import DataError, Source, SourceData, UserRange

SOURCES: dict[str, Source] = {
    "ml100k": ml100k.SOURCE,
    "generic": generic.SOURCE,
    "recsys2025": recsys2025.SOURCE,
    "uqabench": uqabench.SOURCE,
}


def source_of(cfg: DataConfig) -> Source:
    if cfg.source not in SOURCES:
        raise DataError(f"data.source: unknown source {cfg.source!r}; choose one of {tuple(SOURCES)}")
    return SOURCES[cfg.source]


def source_files(cfg: DataConfig) -> list[Path]:
    """Every file the source reads; missing ones are an error here, before any work."""
    files = source_of(cfg).files(cfg)
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: file not found")
    return files


def load_source(cfg: DataConfig, only: UserRange | None = None) -> SourceData:
    """The source's events: every user, or the users of one `UserRange` (read while scanning)."""
    return source_of(cfg).load(cfg, only)


def source_users(cfg: DataConfig) -> pl.Series:
    """The source's distinct user ids as strings, listed without loading its events."""
    return source_of(cfg).users(cfg)
