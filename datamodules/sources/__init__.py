"""Sources by name. Each knows its files (for the cache key, cheap) and how to load them (validated, lazy)."""

from __future__ import annotations

import glob
from pathlib import Path

from datamodules.config import DataConfig
from datamodules.schema import EventSchema, FieldSpec
from datamodules.sources.base import DataError, SourceData

SOURCES = ("ml100k", "generic", "recsys2025")


def event_schema(cfg: DataConfig) -> EventSchema:
    """The generic source's schema from config (FieldSpec entries may arrive as dicts)."""
    s = cfg.schema
    fields = [f if isinstance(f, FieldSpec) else FieldSpec(**f) for f in s.fields]
    try:
        return EventSchema(user=s.user, time=s.time, fields=fields, event_type=s.event_type)
    except ValueError as err:
        raise DataError(f"data.{err}") from None


def source_files(cfg: DataConfig) -> list[Path]:
    """Every file the source reads; missing ones are an error here, before any work."""
    if cfg.source == "ml100k":
        from datamodules.sources import ml100k

        folder = Path(cfg.path).expanduser() if cfg.path else ml100k.default_dir()
        files = [folder / f"ml-100k.{ext}" for ext in ("inter", "item", "user")]
    elif cfg.source == "recsys2025":
        from datamodules.sources import recsys2025

        if not cfg.path:
            raise DataError("data.path: the recsys2025 source needs the challenge data directory")
        files = recsys2025.files(Path(cfg.path).expanduser())
    elif cfg.source == "generic":
        if not cfg.path:
            raise DataError("data.path: the generic source needs an event file or glob")
        matches = sorted(glob.glob(str(Path(cfg.path).expanduser())))
        files = [Path(m) for m in matches] or [Path(cfg.path).expanduser()]
        if cfg.labels.path:
            files.append(Path(cfg.labels.path).expanduser())
    else:
        raise DataError(f"data.source: unknown source {cfg.source!r}; choose one of {SOURCES}")
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: file not found")
    return files


def load_source(cfg: DataConfig) -> SourceData:
    if cfg.source == "ml100k":
        from datamodules.sources import ml100k

        return ml100k.load(cfg.path)
    if cfg.source == "recsys2025":
        from datamodules.sources import recsys2025

        return recsys2025.load(Path(cfg.path).expanduser())
    from datamodules.sources import generic

    files = source_files(cfg)
    events = files[:-1] if cfg.labels.path else files
    static_columns = [t.column or t.name for t in cfg.targets if t.kind in ("binary", "above_median", "classes")]
    return generic.load(
        events,
        event_schema(cfg),
        time_format=cfg.schema.time_format,
        separator=cfg.schema.separator,
        labels_path=cfg.labels.path,
        labels_user=cfg.labels.user,
        label_columns=static_columns,
    )
