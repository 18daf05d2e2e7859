"""Long runs (slow): 50 short fits in one process; memory stays under a bound and no file handles leak.

`make test-slow` runs it (minutes: each fit is a whole run). It goes through `run()` as a
sweep worker would: data module, module, Trainer with checkpoints and the CSV logger,
embedding, probe, run directory.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from experiments.config import compose
from experiments.run import run

FITS, WARMUP = 50, 5
RSS_GROWTH_MB = 100  # after warm-up; a leak of one fitted model, loader or logger per run would pass this in ~50 runs


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_fifty_fits_in_one_process_keep_memory_and_file_handles_flat(csv_data, tmp_path):
    events, labels = csv_data
    base = [
        "experiment=gru_ae_generic_csv", f"data.path={events}", f"data.labels.path={labels}", "data.schema.user=client",
        "data.schema.time=ts", "data.schema.fields=[{name: event_type}, {name: merchant}, {name: amount, kind: numeric}]",
        f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}", "logger.wandb=false", "model.hidden=8",
        "model.emb_dim=4", "trainer.max_epochs=1", "trainer.checkpoint_every_n_steps=2", "data.batch_size=8", "probe.C=1.0",
    ]  # fmt: skip
    rss, fds = [], []
    for i in range(FITS):
        result = run(compose(base + [f"run_name=r{i}", f"seed={i}"]))
        assert (result.run_dir / "metrics.json").is_file()
        gc.collect()
        rss.append(rss_mb())
        fds.append(open_fds())
    print(f"\nsoak: RSS after warm-up {rss[WARMUP - 1]:.0f} MB, at the end {rss[-1]:.0f} MB; open fds {fds[WARMUP - 1]} -> {fds[-1]}")
    assert rss[-1] - rss[WARMUP - 1] < RSS_GROWTH_MB, f"RSS grew from {rss[WARMUP - 1]:.0f} MB to {rss[-1]:.0f} MB"
    assert max(fds[WARMUP:]) <= fds[WARMUP - 1], f"open file descriptors grew: {fds}"
