"""`python -m experiments.embed run=<run dir> data.path=<file, glob or folder> [out=FILE] [batch_size=N]`: vectors for new users.

The command around `experiments.finished_run` (what a run saves and how new events are
encoded and embedded with it). In Python:

    from experiments.embed import load_run
    run = load_run("outputs/gru_ae_ml100k/my-run")
    frame = run.embed("events/2024-07/*.parquet")  # polars: user_id, embedding

Heavy libraries are imported inside the functions that need them, so `--help` answers at once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from datamodules.sources.base import DataError
from experiments.config import ConfigError, check_keys, describe, missing_keys
from experiments.overrides import typed_dotlist
from experiments.finished_run import CHUNK_USERS, EmbeddingRun, RunError, load_run

__all__ = ["EmbedConfig", "EmbeddingRun", "RunError", "load_run", "main"]


@dataclass
class EmbedDataConfig:
    """The new events: read with the run's own source and schema."""

    path: str | None = None
    """An event file or glob (generic), the challenge directory (recsys2025) or the ml-100k folder (default: the run's own data)."""


@dataclass
class EmbedConfig:
    """Embed the users of new event data with a finished run."""

    run: str = "???"
    """A finished run directory (config.yaml, preprocess.json, model.safetensors)."""
    data: EmbedDataConfig = field(default_factory=EmbedDataConfig)
    """The events to embed."""
    out: str | None = None
    """Parquet file to write (user_id, embedding), with <out>.json beside it (default: <run>/embed/<data hash>.parquet)."""
    batch_size: int | None = None
    """Users per batch (default: the run's data.batch_size)."""
    chunk_users: int = CHUNK_USERS
    """Users read, encoded and embedded at once: peak memory follows this, not the size of the input (about 2 GB at 20,000 users of 90 events: docs/benchmarks.md)."""
    until: str | None = None
    """Leave out events at or after this time: an ISO datetime, or 'cutoff' for the run's own history cutoff (default: every event)."""
    weights: str | None = None
    """A .safetensors file or a Lightning .ckpt (default: the run's model.safetensors)."""
    device: str = "cpu"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""


def parse(words: list[str]) -> EmbedConfig:
    for word in words:
        if "=" not in word:
            raise ConfigError(f"{word!r}: expected key=value (see --help)")
    try:
        values = OmegaConf.to_container(typed_dotlist(words, EmbedConfig))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_keys(values, EmbedConfig, "")
    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(EmbedConfig), values))
    missing = missing_keys(merged)
    if missing:
        raise ConfigError(f"required key {missing[0]!r} has no value; set it with {missing[0]}=...")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EmbedConfig), values))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError((f"{key}: " if key else "") + str(err).splitlines()[0]) from None


def help_text() -> str:
    return "\n".join([
        "usage: python -m experiments.embed run=<run dir> [data.path=<file, glob or folder>] [out=FILE] [key=value ...]",
        "",
        "Embeds the users of new event data with a finished run: its preprocessing applied without refitting",
        "(values it never saw become the rare id, counted), its weights, its method. Writes user_id + embedding",
        "to a parquet file and a JSON summary beside it (users, unseen values per field, run, data hash).",
        "",
        "keys (default, meaning):",
        *describe(EmbedConfig),
    ])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in args):
        print(help_text())
        return 0
    from experiments.run import quiet_libraries

    quiet_libraries()
    try:
        cfg = parse(args)
        run = load_run(cfg.run, cfg.weights, cfg.device)
        options = dict(until=cfg.until, chunk_users=cfg.chunk_users, batch_size=cfg.batch_size, progress=True)
        summary = run.embed_to(cfg.out, cfg.data.path, **options)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except RunError as err:
        print(f"run error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2
    unseen = ", ".join(f"{k} {v}" for k, v in summary["unseen_values"].items() if v) or "none"
    print(f"embedded {summary['rows']} users ({summary['counts'].get('events', 0)} events) with {summary['run']}")
    print(f"unseen values (mapped to rare): {unseen}")
    print(f"wrote {summary['out']} and {Path(summary['out']).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
