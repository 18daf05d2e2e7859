"""Finding finished runs: a run is finished when its embeddings.parquet and metrics.json exist."""

from __future__ import annotations

from pathlib import Path


def finished_runs(output_dir: str | Path, experiment: str) -> list[Path]:
    """Finished runs of an experiment, oldest first (by the time their metrics were written)."""
    root = Path(output_dir) / experiment
    done = [p for p in root.glob("*") if (p / "embeddings.parquet").is_file() and (p / "metrics.json").is_file()]
    return sorted(done, key=lambda p: (p / "metrics.json").stat().st_mtime)


def latest_run(output_dir: str | Path, experiment: str) -> Path | None:
    runs = finished_runs(output_dir, experiment)
    return runs[-1] if runs else None
