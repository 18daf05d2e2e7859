"""Run benchmarks, print a table per benchmark, write benchmarks/results/<name>.json.

    python -m benchmarks.run                       # every benchmark at full size
    python -m benchmarks.run preprocess loading    # some of them
    python -m benchmarks.run --scale 0.01          # smaller inputs (tests use a tiny scale)

Each JSON holds the machine (CPU model and count, versions), the load average before and
after (the box is shared: compare figures within one file, where both sides ran side by
side), the parameters, the medians over repeats and whether each target was met.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import sys
import time
from pathlib import Path

from benchmarks.registry import BENCHMARKS, MODULES, Report, load_all


def table(name: str, report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, Console().width))
    if report.rows:
        t = Table(title=name)
        # parameters["columns"] (key -> short header) picks and names the printed columns; else every key.
        headers = report.parameters.get("columns") or {k: k for row in report.rows for k in row}
        columns = list(headers)
        for c in columns:
            t.add_column(headers[c], justify="left" if isinstance(report.rows[0].get(c), str) else "right")
        for row in report.rows:
            t.add_row(*[fmt(row.get(c)) for c in columns])
        console.print(t)
    for tg in report.targets:
        status = "[green]met[/green]" if tg["met"] else "[bold red]MISSED[/bold red]"
        console.print(f"  target {tg['target']}: measured {fmt(tg['measured'])} -> {status}")
    for note in report.notes:
        console.print(f"  note: {note}")


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "" if v is None else str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all): " + ", ".join(m.split(".")[-1] for m in MODULES[1:]))
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every input size (events, users, steps)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; figures are medians")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice); 1 is steadier on a loaded box")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where <name>.json and plots go")
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--scale must be > 0, --repeats >= 1 and --threads >= 1")
    load_all()
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
    from benchmarks import common

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    info = common.machine()
    for name in args.names or list(BENCHMARKS):
        load_before = os.getloadavg()
        began = time.perf_counter()
        report = BENCHMARKS[name](args.scale, args.repeats, args.out)
        payload = {
            "benchmark": name,
            "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - began, 1),
            "scale": args.scale,
            "repeats": args.repeats,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "machine": info,
            **dataclasses.asdict(report),
        }
        path = common.write_result(name, payload, args.out)
        table(name, report)
        print(f"  -> {path} ({payload['seconds']} s, load average {payload['load_average_before'][0]} -> {payload['load_average_after'][0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
