"""A new user's path: an ordinary transaction log run from the command line exactly as docs/data.md shows it."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).parents[1]
SPEED = ["trainer.max_epochs=1", "model.hidden=16", "model.emb_dim=8", "logger.wandb=false"]  # tiny, same command otherwise


def documented_command(heading: str) -> list[str]:
    """The words of the first bash block under `heading` in docs/data.md, line continuations joined."""
    text = (ROOT / "docs" / "data.md").read_text()
    section = text[text.index(heading) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def write_transactions(folder: Path, n_customers: int = 60, seed: int = 0) -> None:
    """customer_id,date (YYYYMMDD digits),quantity,amount; premium customers spend more; some equal rows on one day."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    start = dt.date(1997, 1, 1)
    for c in range(n_customers):
        premium = c % 3 == 0
        labels.append((f"c{c:03d}", "premium" if premium else "standard"))
        last_day = int(rng.integers(200, 365))  # some customers stop early: churners
        for _ in range(int(rng.integers(8, 30))):
            day = start + dt.timedelta(days=int(rng.integers(0, last_day)))
            amount = round(float(rng.gamma(2.0, 40.0 if premium else 10.0)), 2)
            rows.append((f"c{c:03d}", int(day.strftime("%Y%m%d")), int(rng.integers(1, 4)), amount))
        rows.append(rows[-1])  # the same purchase twice on one day: real in a transaction log
    pl.DataFrame(rows, schema=["customer_id", "date", "quantity", "amount"], orient="row").write_csv(folder / "transactions.csv")
    pl.DataFrame(labels, schema=["customer_id", "segment"], orient="row").write_csv(folder / "labels.csv")


def test_integer_dated_transaction_log_from_the_documented_command(tmp_path):
    write_transactions(tmp_path)
    words = documented_command("### A transaction log with dates written as digits")
    assert words[:3] == ["python", "-m", "experiments.run"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *words[1:], *SPEED], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout
    assert re.search(r"segment\s+│\s+\d\.\d{3} / \d\.\d{3}", table) and re.search(r"churn\s+│\s+\d\.\d{3} / \d\.\d{3}", table), table
    assert "handcrafted" in table and "run directory: outputs/gru_ae_generic_csv/" in table
    run_dir = tmp_path / table.split("run directory: ")[1].strip()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data/duplicate_events_kept"] == 60 and metrics.get("data/duplicate_events", 0) == 0
    assert 0.0 <= metrics["probe_test/segment/auc"] <= 1.0


def test_integer_date_that_is_not_a_date_names_its_row(tmp_path):
    import pytest

    from datamodules.sources.base import DataError, parse_time

    frame = pl.LazyFrame({"date": [19970101, 19971301], "_row": [1, 2]})
    assert parse_time(frame.head(1), "date", "%Y%m%d", tmp_path / "t.csv").collect()["time"][0] == dt.datetime(1997, 1, 1)
    with pytest.raises(DataError, match=r"t.csv: column 'date', row 2: cannot parse time '19971301' with format '%Y%m%d'"):
        parse_time(frame, "date", "%Y%m%d", tmp_path / "t.csv")
