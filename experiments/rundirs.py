"""Run directories: who writes one, finding finished runs (embeddings.parquet and metrics.json exist) and unfinished ones to resume."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


RUN_DIR_ENV = "EXPERIMENTS_RUN_DIR"  # rank 0's run directory, for the DDP ranks it starts


def launched_as_rank_zero() -> bool:
    """Whether this process is global rank 0, known before any process group exists.

    Only rank 0 makes the run directory, the loggers and the files. torchrun sets RANK;
    Lightning's own DDP launcher leaves the process it was started from without LOCAL_RANK
    and starts the other ranks of a node with LOCAL_RANK=1..N-1, and each node of a
    multi-node run is started with NODE_RANK (or GROUP_RANK).
    """
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))
    return node == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0


def finished_runs(output_dir: str | Path, experiment: str) -> list[Path]:
    """Finished runs of an experiment, oldest first (by the time their metrics were written)."""
    root = Path(output_dir) / experiment
    done = [p for p in root.glob("*") if (p / "embeddings.parquet").is_file() and (p / "metrics.json").is_file()]
    return sorted(done, key=lambda p: (p / "metrics.json").stat().st_mtime)


def latest_run(output_dir: str | Path, experiment: str) -> Path | None:
    runs = finished_runs(output_dir, experiment)
    return runs[-1] if runs else None


def unfinished_runs(output_dir: str | Path, experiment: str) -> list[Path]:
    """Runs that saved checkpoints/last.ckpt but never wrote metrics.json (crashed or killed), oldest first."""
    root = Path(output_dir) / experiment
    runs = [p for p in root.glob("*") if (p / "checkpoints" / "last.ckpt").is_file() and not (p / "metrics.json").exists()]
    return sorted(runs, key=lambda p: (p / "checkpoints" / "last.ckpt").stat().st_mtime)


RESUME_FREE_KEYS = ("resume", "run_name")  # may differ between the interrupted run and its resumption


def resume_dir(cfg: Any) -> Path | None:
    """The run directory `cfg.resume` asks to continue, checked: unfinished, with last.ckpt and the same config.

    resume=true picks the newest unfinished run of cfg.experiment under cfg.output_dir;
    resume=<dir> names one. Everything but `resume` and `run_name` must equal the saved
    config.yaml, so a resumed run cannot silently train something else.
    """
    from omegaconf import OmegaConf

    from experiments.config import ConfigError

    if cfg.resume is None or cfg.resume is False:
        return None
    if cfg.resume is True:
        runs = unfinished_runs(cfg.output_dir, cfg.experiment)
        if not runs:
            raise ConfigError(f"resume=true: no unfinished run of {cfg.experiment!r} under {cfg.output_dir} (none has checkpoints/last.ckpt without metrics.json)")
        run_dir = runs[-1]
    else:
        run_dir = Path(str(cfg.resume)).expanduser()
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            raise ConfigError(f"resume={cfg.resume}: {run_dir / 'checkpoints' / 'last.ckpt'} not found")
        if (run_dir / "metrics.json").exists():
            raise ConfigError(f"resume={cfg.resume}: that run finished (metrics.json exists); start a new run instead")
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"resume: {saved_path} not found; cannot check the run was made with this config")
    saved = OmegaConf.to_container(OmegaConf.load(saved_path))
    now = OmegaConf.to_container(cfg, resolve=True)
    for key in RESUME_FREE_KEYS:
        saved.pop(key, None)
        now.pop(key, None)
    diff = first_difference(saved, now)
    if diff is not None:
        key, a, b = diff
        raise ConfigError(f"resume: {key} was {a!r} in {saved_path}, now {b!r}; resume with the same settings")
    return run_dir


def first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, a's value, b's value) of the first place two nested configs differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if a == b else (prefix.rstrip("."), a, b)
