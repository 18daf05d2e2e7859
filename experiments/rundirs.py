"""Run directories: who writes one, and finding finished runs (embeddings.parquet and metrics.json exist)."""

from __future__ import annotations

import os
from pathlib import Path


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
