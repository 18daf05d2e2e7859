"""Preprocessing: generated recsys2025 layout -> cached user sequences, Polars pipeline vs the pandas yardstick.

Each side runs in its own process (`python -m benchmarks.preprocess --side ...`), so its peak
RSS (VmHWM) is its own; imports are excluded from the time, included in the memory. Both
sides write one row per user with list columns; the parent checks that the two files hold
the same values before it reports any time. Targets are left out on both sides (they are
not part of the sequence cache the models read). A third side, the floor, only reads the
same tables with Polars, parses the times and sorts the events by (client, time): what no
pipeline over these files can go below on this machine. The table has one row per size and side (short column
names, explained in the notes) so that it stays readable at 100 columns.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RECSYS_SETTINGS, recsys_config, recsys_data, run_child, scaled, target
from benchmarks.registry import Report, benchmark

SIZES = (1_000_000, 3_000_000, 10_000_000, 30_000_000)
LARGEST_SURE = 10_000_000  # larger sizes run only when the memory they would need is free
PANDAS_MAX_EVENTS = 3_500_000  # the pandas yardstick needs ~1.7 GB per 1M events: not run at 10M on a shared 23 GB box
MAX_LEN, TOP_K = RECSYS_SETTINGS["max_len"], RECSYS_SETTINGS["top_k"]  # the pandas side is told the same


def raw_size_mb(folder: Path) -> float:
    """In-memory size of the raw tables as Polars holds them (the yardstick for peak RSS)."""
    import polars as pl

    return sum(pl.read_parquet(p).estimated_size() for p in folder.glob("*.parquet")) / 2**20


def run_polars(data: Path, out: Path) -> int:
    from datamodules.preprocess import build
    from datamodules.sources import load_source

    cfg = recsys_config(data)
    build(load_source(cfg), cfg, 0, "benchmark", out)
    return 0


def run_pandas(data: Path, out: Path) -> int:
    from benchmarks import pandas_reference

    out.mkdir(parents=True, exist_ok=True)
    return pandas_reference.prepare(data, out / "users.parquet", max_len=MAX_LEN, top_k=TOP_K)


def same_users(polars_file: Path, pandas_file: Path) -> None:
    """Raise unless both outputs hold the same users, columns and values (types normalised)."""
    import polars as pl

    a, b = pl.read_parquet(polars_file), pl.read_parquet(pandas_file)
    if a.columns != b.columns:
        raise AssertionError(f"columns differ: polars {a.columns} vs pandas {b.columns}")

    def norm(df: pl.DataFrame) -> pl.DataFrame:
        return df.select(
            pl.col("user_id").cast(pl.String),
            *[pl.col(c).cast(pl.List(pl.List(pl.Int64)) if c.startswith("cod_") else pl.List(pl.Int64)) for c in df.columns[1:]],
        )

    a, b = norm(a), norm(b)
    if a.height != b.height:
        raise AssertionError(f"users differ: polars {a.height} vs pandas {b.height}")
    for c in a.columns:
        if not a[c].equals(b[c]):
            row = int((a[c] != b[c]).arg_true()[0]) if c != "user_id" else 0
            raise AssertionError(f"column {c} differs, first at user {a['user_id'][row]}")


def run_floor(data: Path, out: Path) -> int:
    """The floor: read the same six tables with Polars, parse the times and sort the events by (client, time), nothing else.

    Parsed first because sorting the raw "YYYY-MM-DD HH:MM:SS" strings took 2.5x longer (14.5 s against 5.7 s at 3M events).
    """
    import polars as pl

    tables = [pl.read_parquet(p).with_columns(pl.lit(p.stem).alias("table")) for p in sorted(data.glob("*.parquet")) if p.stem != "product_properties"]
    pl.read_parquet(data / "product_properties.parquet")
    parsed = pl.col("timestamp").str.strptime(pl.Datetime("us"), "%Y-%m-%d %H:%M:%S")
    events = pl.concat(tables, how="diagonal").with_columns(parsed).sort("client_id", "timestamp", maintain_order=True)
    return events.height


def measure(data: Path, side: str, workdir: Path) -> dict:
    out = workdir / side
    shutil.rmtree(out, ignore_errors=True)
    return run_child("benchmarks.preprocess", ["--side", side, "--data", str(data), "--out", str(out)])


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def compare(events: int, repeats: int, sides: list[str]) -> list[dict]:
    """`sides` on about `events` generated events, Polars and pandas outputs checked equal first: one row per side."""
    data, n = recsys_data(events)
    raw_mb = round(raw_size_mb(data), 1)
    with tempfile.TemporaryDirectory(prefix="bench-pre-", dir=data.parent) as tmp:
        work = Path(tmp)
        runs = {s: [measure(data, s, work)] for s in sides}
        if "pandas" in sides:
            same_users(work / "polars" / "users.parquet", work / "pandas" / "users.parquet")
        for _ in range(repeats - 1):
            for s in sides:
                runs[s].append(measure(data, s, work))
    rows = []
    for s in sides:
        secs = statistics.median(r["seconds"] for r in runs[s])
        peak = max(r["peak_rss_mb"] for r in runs[s])
        row = {"events": n, "side": s, "s": round(secs, 2), "ev/s": round(n / secs), "peak_MB": round(peak, 1),
               "import_MB": round(max(r["rss_after_imports_mb"] for r in runs[s]), 1), "raw_MB": raw_mb, "x_raw": round(peak / raw_mb, 2)}  # fmt: skip
        rows.append(row)
    if "pandas" in sides:
        pandas_s = rows[sides.index("pandas")]["s"]
        for row in rows:
            row["x_pd"] = round(pandas_s / row["s"], 2)
    for row in rows:
        row["n"] = repeats
    return rows


def fit_power(rows: list[dict], key: str) -> tuple[float, float]:
    """(a, b) of key = a * events^b, least squares in log-log over `rows`."""
    x = np.log([r["events"] for r in rows])
    y = np.log([r[key] for r in rows])
    b, log_a = np.polyfit(x, y, 1)
    return float(np.exp(log_a)), float(b)


@benchmark("preprocess")
def preprocess(scale: float, repeats: int, out_dir: Path) -> Report:
    rows: list[dict] = []
    for i, size in enumerate(SIZES):
        n = scaled(size, scale, 2000)
        if size > LARGEST_SURE:  # only if the last size's peak, scaled, leaves half of the free memory
            last = [r for r in rows if r["side"] == "polars"][-1]
            need = last["peak_MB"] * n / last["events"]
            if need > available_mb() / 2:
                print(f"preprocess: {n:,} events skipped: ~{need:,.0f} MB needed, {available_mb():,.0f} MB available")
                continue
        sides = ["polars", "floor", *(["pandas"] if n <= PANDAS_MAX_EVENTS else [])]
        rows += compare(n, repeats if i == 0 else 1, sides)
    ours = [r for r in rows if r["side"] == "polars"]
    both = [r for r in rows if r["side"] == "polars" and "x_pd" in r]
    big, small = ours[min(2, len(ours) - 1)], both[-1]  # speed and memory at 10M (scaled), pandas ratio at the largest size both ran
    floor = next(r for r in rows if r["side"] == "floor" and r["events"] == big["events"])
    a, b = fit_power(ours, "s")
    ma, mb = fit_power(ours, "peak_MB")
    projection = {"events": 100_000_000, "s": round(a * 1e8**b, 1), "peak_MB": round(ma * 1e8**mb), "time_exponent": round(b, 3), "rss_exponent": round(mb, 3)}
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "preprocess_scaling.png"
    plot(rows, png)
    targets = [
        target(f"Polars >= 1.5M events/s ({big['events']:,} events)", big["ev/s"], 1.5e6),
        target(f"Polars >= 10x pandas ({small['events']:,} events)", small["x_pd"], 10.0),
        target(f"peak RSS <= 3x raw in-memory size ({big['events']:,} events)", big["x_raw"], 3.0, higher_is_better=False),
        target(f"peak RSS of {big['events']:,} events <= 24 GB", big["peak_MB"] / 1024, 24.0, higher_is_better=False),
    ]
    notes = [
        "columns: s = wall seconds (source load + checks + preprocessing + parquet write, imports excluded); ev/s = events per second;"
        " peak_MB = VmHWM of the side's own process, imports included (import_MB: after imports, before any work); raw_MB = the raw"
        " parquet tables as Polars holds them in memory; x_raw = peak_MB / raw_MB; x_pd = pandas seconds / this side's seconds; n = repeats (medians)",
        "sides: polars = datamodules recsys2025 source + preprocess.build; floor = a bare Polars read of the same six tables, the"
        " times parsed, one sort of the events by (client, time); pandas = benchmarks/pandas_reference.py",
        f"sizes = {', '.join(f'{s:,}' for s in SIZES)} events x --scale {scale}; pandas runs up to {PANDAS_MAX_EVENTS:,} events only (the box is shared)",
        f"100M projection (power law fitted to the polars rows): {projection['s']:,} s ({1e8 / projection['s']:,.0f} events/s),"
        f" peak {projection['peak_MB']:,} MB; exponents {projection['time_exponent']} (time) and {projection['rss_exponent']} (memory)",
        f"floor at {floor['events']:,} events: {floor['s']} s ({floor['ev/s']:,} events/s), peak {floor['peak_MB']:,} MB",
    ]
    params = {"sizes": sorted({r["events"] for r in rows}), "max_len": MAX_LEN, "top_k": TOP_K, "projection_100m": projection}
    return Report(params, rows, targets, notes, [png.name])


def plot(rows: list[dict], path: Path) -> None:
    """Time and peak RSS against events, one line per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for side in ("polars", "floor", "pandas"):
        pts = [r for r in rows if r["side"] == side]
        if pts:
            a.plot([r["events"] for r in pts], [r["s"] for r in pts], marker="o", label=side)
            b.plot([r["events"] for r in pts], [r["peak_MB"] for r in pts], marker="o", label=side)
    raw = [r for r in rows if r["side"] == "polars"]
    b.plot([r["events"] for r in raw], [r["raw_MB"] for r in raw], linestyle="--", color="grey", label="raw tables in memory")
    for ax, label in ((a, "seconds"), (b, "peak RSS (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("events")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Preprocessing: generated recsys2025 layout -> user sequences")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="one side of the preprocessing benchmark, in its own process")
    parser.add_argument("--side", choices=("polars", "floor", "pandas"), required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from benchmarks.common import peak_rss_mb

    fn = {"polars": run_polars, "floor": run_floor, "pandas": run_pandas}[args.side]
    if args.side == "pandas":
        import pandas  # noqa: F401  (imports are not timed)
    else:
        import polars  # noqa: F401
        import datamodules.preprocess  # noqa: F401
    base = peak_rss_mb()
    t0 = time.perf_counter()
    fn(args.data, args.out)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": base}))


if __name__ == "__main__":
    main()
