"""Embedding new users: a finished GRU-AE run embeds a generated recsys2025 layout of ~10M events.

The run (`gru_ae_recsys2025`, trained briefly on a small generated layout of its own, cached
under .cache/benchmarks/runs) meets new users and values it never saw, as it would in use.
Each measurement is its own process (`python -m benchmarks.embedding ...`), so its peak RSS
(VmHWM) is its own: `experiments.embed`'s `embed_to` over the whole layout at several
`chunk_users`, side by side, and, for reference, the source loading every event at once.
If peak RSS follows the chunk, the small chunk's row stays far below the whole-input ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import recsys_config, recsys_data, run_child, scaled
from benchmarks.registry import Report, benchmark

EMBED_EVENTS = 10_000_000
TRAIN_EVENTS = 200_000
TRAIN_BATCHES = 20
CHUNKS = (10_000, 200_000)  # users per chunk; at full size the larger one holds every user (~114k) in one chunk


def train_run(events: int, batches: int) -> Path:
    """A finished gru_ae_recsys2025 run on a generated layout of about `events` events (cached: reruns reuse it)."""
    data, _ = recsys_data(events)
    out = common.DATA_CACHE / "runs"
    run_dir = out / "gru_ae_recsys2025" / f"{data.name}-b{batches}"
    if (run_dir / "metrics.json").is_file() and loads(run_dir):  # metrics.json is written last: a finished run
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [
        "experiment=gru_ae_recsys2025", f"data.path={data}", "data.targets=[]", f"data.cache_dir={common.DATA_CACHE / 'sequences'}",
        "trainer.max_epochs=1", f"trainer.limit_train_batches={batches}", "trainer.limit_val_batches=2",
        f"output_dir={out}", f"run_name={run_dir.name}",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-m", "experiments.run", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (run_dir / "model.safetensors").is_file():
        raise RuntimeError(f"training the benchmark's run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return run_dir


def loads(run_dir: Path) -> bool:
    """Whether this code still loads the cached run (a run made before a model change does not: train it again)."""
    from experiments.finished_run import RunError, load_run

    try:
        load_run(run_dir)
    except RunError:
        return False
    return True


def parquet_mb(folder: Path) -> float:
    """On-disk size of the layout's parquet tables."""
    return sum(p.stat().st_size for p in folder.glob("*.parquet")) / 2**20


def embed_row(run_dir: Path, data: Path, chunk: int, repeats: int, work: Path) -> tuple[dict[str, Any], tuple[int, int]]:
    """`embed_to` over the whole layout at `chunk` users per chunk: median time, highest peak RSS over `repeats` children; (users, events) embedded."""
    import torch

    out = work / f"chunk-{chunk}.parquet"
    args = ["--run", str(run_dir), "--data", str(data), "--chunk", str(chunk), "--out", str(out), "--threads", str(torch.get_num_threads())]
    runs = [run_child("benchmarks.embedding", args) for _ in range(repeats)]
    secs = statistics.median(r["seconds"] for r in runs)
    users, events = runs[0]["users"], runs[0]["events"]
    return {
        "side": "embed", "chunk": chunk, "chunks": -(-runs[0]["listed"] // chunk), "s": round(secs, 1),
        "users/s": round(users / secs), "events/s": round(events / secs),
        "peak_MB": round(max(r["peak_rss_mb"] for r in runs)), "base_MB": round(max(r["base_rss_mb"] for r in runs)),
    }, (users, events)  # fmt: skip


def load_row(data: Path) -> tuple[dict[str, Any], int]:
    """The source loading every event at once (no run, no encoding): what the input alone costs in memory; events read."""
    r = run_child("benchmarks.embedding", ["--load", str(data)])
    return {
        "side": "load", "s": round(r["seconds"], 1), "events/s": round(r["events"] / r["seconds"]),
        "peak_MB": round(r["peak_rss_mb"]), "base_MB": round(r["base_rss_mb"]), "frame_MB": round(r["frame_mb"]),
    }, r["events"]  # fmt: skip


@benchmark("embed")
def embed(scale: float, repeats: int, out_dir: Path) -> Report:
    train_events = scaled(TRAIN_EVENTS, scale, 2000)
    run_dir = train_run(train_events, scaled(TRAIN_BATCHES, scale, 1))
    data, n = recsys_data(scaled(EMBED_EVENTS, scale, 2000))
    chunks = [scaled(c, scale, 2) for c in CHUNKS]
    with tempfile.TemporaryDirectory(prefix="bench-embed-", dir=data.parent) as tmp:
        measured = [embed_row(run_dir, data, c, repeats, Path(tmp)) for c in chunks]
    load, read = load_row(data)
    embedded = {done for _, done in measured}
    if len(embedded) != 1 or read != n:
        raise AssertionError(f"every chunk size must embed the same users and events of the {n:,} generated: embedded {embedded}, loaded {read:,}")
    [(users, events)] = embedded
    rows = [row for row, _ in measured] + [load]
    small, whole = rows[0], rows[len(chunks) - 1]
    notes = [
        f"layout: {n:,} generated events, {parquet_mb(data):,.0f} MB of parquet on disk; run: {run_dir} (new users, values it never saw map to the rare id)",
        f"side embed: {users:,} users, {events:,} events, experiments.embed EmbeddingRun.embed_to over every user, chunk = chunk_users, chunks = chunks read; s = wall seconds "
        "(source scan, encoding, GRU-AE forward, parquet write; imports and load_run excluded), median of the repeats",
        "peak_MB: VmHWM of the child process (imports included); base_MB: its VmHWM after imports (+ load_run for embed), before any work",
        "side load: datamodules.sources.load_source(...).events.collect() of every event at once; frame_MB: that frame's estimated_size; MB = 2**20 bytes",
        f"peak RSS at chunk {small['chunk']:,} is {small['peak_MB'] / whole['peak_MB']:.2f}x that at chunk {whole['chunk']:,} "
        f"({small['chunks']} chunks vs {whole['chunks']})",
    ]
    parameters = {"events": events, "users": users, "chunk_users": chunks, "train_events": recsys_data(train_events)[1], "run": str(run_dir)}
    return Report(parameters, rows, [], notes)


def measure_embed(run_dir: Path, data: Path, chunk: int, out: Path) -> dict[str, Any]:
    from datamodules.sources import source_users
    from experiments.embed import load_run

    run = load_run(run_dir)
    base = common.peak_rss_mb()
    t0 = time.perf_counter()
    summary = run.embed_to(out, data, chunk_users=chunk)
    seconds = time.perf_counter() - t0
    listed = source_users(run.data_config(data)).len()
    return {"seconds": seconds, "users": summary["rows"], "events": summary["counts"]["events"], "listed": listed, "peak_rss_mb": common.peak_rss_mb(), "base_rss_mb": base}


def measure_load(data: Path) -> dict[str, Any]:
    from datamodules.sources import load_source

    base = common.peak_rss_mb()
    t0 = time.perf_counter()
    frame = load_source(recsys_config(data)).events.collect()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "events": frame.height, "frame_mb": frame.estimated_size() / 2**20, "peak_rss_mb": common.peak_rss_mb(), "base_rss_mb": base}


def main() -> None:
    parser = argparse.ArgumentParser(description="one measurement of the embed benchmark, in its own process; prints JSON last")
    parser.add_argument("--run", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--chunk", type=int)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, help="torch threads: the parent's (python -m benchmarks.run --threads N reaches the child)")
    parser.add_argument("--load", type=Path, help="only load every event of this layout with the source")
    args = parser.parse_args()
    import polars  # noqa: F401  (imports count in base_rss_mb, not in the time)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    import datamodules.sources  # noqa: F401

    result = measure_load(args.load) if args.load else measure_embed(args.run, args.data, args.chunk, args.out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
