"""Shared pieces: the machine description, timing, peak memory, generated data, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datamodules.atomic import atomic_write

RESULTS = Path(__file__).parent / "results"
DATA_CACHE = Path(".cache/benchmarks")
EVENTS_PER_CLIENT = 88  # mean events per client of the recsys2025 generator with its defaults
RECSYS_SETTINGS = {"cutoff_days_before_end": 14, "window_days": 14, "max_len": 128, "top_k": 1000}  # one 14-day cutoff, no targets (the preset's challenge protocol differs only in where the history ends)


def machine() -> dict[str, Any]:
    """CPU, core count, Python and library versions: what a reader needs to compare figures."""
    import numpy
    import polars
    import torch

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__, "polars": polars.__version__, "numpy": numpy.__version__}
    for name in ("pandas", "transformers", "lightning"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "versions": versions,
    }


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Median wall seconds of `fn` over `repeats` calls, and every time."""
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def run_child(module: str, args: list[str]) -> dict[str, Any]:
    """Run `python -m module args` in a fresh process (its peak RSS is its own); its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m {module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def recsys_data(events: int, seed: int = 0) -> tuple[Path, int]:
    """A generated recsys2025 layout of about `events` events (cached under .cache/benchmarks); its path and event count."""
    from datamodules.synthetic import EVENT_TABLES, generate_recsys2025

    clients = max(20, round(events / EVENTS_PER_CLIENT))
    path = DATA_CACHE / f"recsys2025-c{clients}-s{seed}"  # read at call time: tests point it elsewhere
    done = path / "counts.json"
    if not done.is_file():
        counts = generate_recsys2025(path, clients, seed=seed)
        done.write_text(json.dumps(counts))
    counts = json.loads(done.read_text())
    return path, sum(counts[t] for t in EVENT_TABLES)


def scaled(n: float, scale: float, minimum: int = 1) -> int:
    return max(minimum, int(round(n * scale)))


def write_result(name: str, payload: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    """benchmarks/results/<name>.json, written to a temporary name and renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n"))
    return path


def target(description: str, measured: float, goal: float, higher_is_better: bool = True) -> dict[str, Any]:
    met = measured >= goal if higher_is_better else measured <= goal
    return {"target": description, "measured": round(measured, 4), "goal": goal, "met": bool(met)}


def recsys_config(path: Path, **extra: Any) -> Any:
    """The data config every benchmark preprocesses a generated recsys2025 layout with (RECSYS_SETTINGS + `extra`)."""
    from datamodules.config import DataConfig

    return DataConfig(source="recsys2025", path=str(path), **RECSYS_SETTINGS, **extra)


def prepared_recsys(events: int) -> Any:
    """The generated recsys2025 layout of about `events` events, preprocessed as the recsys2025 preset does (cached)."""
    from datamodules.preprocess import prepare

    path, _ = recsys_data(events)
    return prepare(recsys_config(path, batch_size=128, cache_dir=str(DATA_CACHE / "sequences")))
