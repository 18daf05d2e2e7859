"""Crash and resume: a run killed with SIGKILL mid-epoch and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from datamodules.sequences import LengthBucketBatchSampler
from experiments.config import ConfigError, compose
from experiments.rundirs import resume_dir, unfinished_runs

REPO = Path(__file__).resolve().parents[1]


def tiny_args(out: Path, cache: Path) -> list[str]:
    """GRU-AE on ml100k, small enough for seconds per epoch; last.ckpt every 5 steps (about 43 steps per epoch).

    Two layers with dropout between them, so training draws from the torch RNG and a resume
    that did not restore it would diverge.
    """
    return [
        "experiment=gru_ae_ml100k", f"output_dir={out}", f"data.cache_dir={cache}", "data.batch_size=16", "data.max_len=32", "model.hidden=16",
        "model.emb_dim=8", "model.layers=2", "model.dropout=0.3", "trainer.max_epochs=2", "trainer.early_stopping_patience=null",
        "trainer.checkpoint_every_n_steps=5", "logger.wandb=false", "probe.baselines=[]", "probe.C=1.0", "seed=3",
    ]  # fmt: skip


def launch(args: list[str]) -> subprocess.Popen:
    # one thread: the same float order in all three runs, and no OpenMP spinning on a shared 2-core machine
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return err


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, ml100k_cache):
    out = tmp_path / "out"
    finish(launch(tiny_args(out, ml100k_cache) + ["run_name=straight"]))

    victim = launch(tiny_args(out, ml100k_cache) + ["run_name=killed"])
    last = out / "gru_ae_ml100k" / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    run_dir = last.parent.parent
    assert not (run_dir / "metrics.json").exists()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    position = ckpt["callbacks"]["ResumeState"]["position"]
    assert position["resume_at"] > 0, f"the checkpoint should be mid-epoch, got {position} at step {ckpt['global_step']}"
    assert unfinished_runs(out, "gru_ae_ml100k") == [run_dir]

    crashed_csv = run_dir / "csv" / "metrics.csv"
    before = crashed_csv.read_text() if crashed_csv.exists() else None
    err = finish(launch(tiny_args(out, ml100k_cache) + ["resume=true"]))
    # our own checkpoints and a sampler that ResumeState replays: Lightning's three resume warnings would be noise
    for noise in ("exists and is not empty", "dataloader is not resumable"):
        assert noise not in err, err[-3000:]
    assert (crashed_csv.read_text() if crashed_csv.exists() else None) == before  # the rows before the crash survive the resume
    assert "val/loss" in (run_dir / "csv_resume1" / "metrics.csv").read_text()
    straight = json.loads((out / "gru_ae_ml100k" / "straight" / "metrics.json").read_text())
    resumed = json.loads((run_dir / "metrics.json").read_text())
    compared = [k for k in straight if k.startswith(("probe_val/", "probe_test/", "val/loss"))]
    assert len(compared) >= 18  # (val, test) x 4 targets x (auc, ks) + val/loss, val/loss_best
    for key in compared:
        assert resumed[key] == pytest.approx(straight[key], abs=1e-5), key
    a = np.stack(pl.read_parquet(out / "gru_ae_ml100k" / "straight" / "embeddings.parquet")["embedding"].to_numpy())
    b = np.stack(pl.read_parquet(run_dir / "embeddings.parquet")["embedding"].to_numpy())
    assert np.abs(a - b).max() < 1e-5
    assert unfinished_runs(out, "gru_ae_ml100k") == []

    # SIGTERM (a preemption): the run saves last.ckpt at the batch it stopped after, exits 143, and resumes from there
    victim = launch(tiny_args(out, ml100k_cache) + ["run_name=termed"])
    last = out / "gru_ae_ml100k" / "termed" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    first_save = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=300)
    assert victim.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err and str(last.parent.parent) in err
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    position = ckpt["callbacks"]["ResumeState"]["position"]
    # still in the first epoch (of about 43 steps): the batches done are the steps taken
    assert position == {"epoch": 0, "resume_at": ckpt["global_step"]} and ckpt["global_step"] >= first_save, (ckpt["global_step"], position)
    finish(launch(tiny_args(out, ml100k_cache) + ["resume=true"]))
    termed = json.loads((last.parent.parent / "metrics.json").read_text())
    for key in compared:
        assert termed[key] == pytest.approx(straight[key], abs=1e-5), key


def test_sampler_resumes_mid_epoch_with_the_same_batches():
    lengths = np.random.default_rng(0).integers(1, 50, size=103)
    full = LengthBucketBatchSampler(lengths, 8, seed=5)
    epochs = [list(full), list(full)]
    resumed = LengthBucketBatchSampler(lengths, 8, seed=5)
    resumed.load_state_dict({"epoch": 1, "resume_at": 4})
    assert list(resumed) == epochs[1][4:]
    assert resumed.epoch == 2 and resumed.resume_at == 0  # the epoch after continues as usual
    done = LengthBucketBatchSampler(lengths, 8, seed=5)
    done.load_state_dict({"epoch": 0, "resume_at": len(done)})  # a complete epoch: the next one starts at its first batch
    assert list(done) == epochs[1]


def fake_run(out: Path, name: str, args: list[str], finished: bool = False) -> Path:
    """A run directory as an interrupted run leaves it: config.yaml and checkpoints/last.ckpt."""
    from omegaconf import OmegaConf

    run_dir = out / "gru_ae_ml100k" / name
    (run_dir / "checkpoints").mkdir(parents=True)
    OmegaConf.save(compose(args), run_dir / "config.yaml", resolve=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    if finished:
        (run_dir / "metrics.json").write_text("{}")
    return run_dir


def test_resume_picks_the_newest_unfinished_run_and_checks_it(tmp_path):
    out = tmp_path / "out"
    base = [f"output_dir={out}", "model.hidden=16"]
    with pytest.raises(ConfigError, match="no unfinished run"):
        resume_dir(compose(base + ["resume=true"]))
    old = fake_run(out, "a", base)
    time.sleep(0.01)
    new = fake_run(out, "b", base)
    fake_run(out, "c", base, finished=True)
    assert resume_dir(compose(base + ["resume=true"])) == new
    assert resume_dir(compose(base + [f"resume={old}"])) == old
    with pytest.raises(ConfigError, match="model.hidden was 16 .* now 32"):
        resume_dir(compose([f"output_dir={out}", "model.hidden=32", "resume=true"]))
    with pytest.raises(ConfigError, match="finished"):
        resume_dir(compose(base + [f"resume={out / 'gru_ae_ml100k' / 'c'}"]))
    with pytest.raises(ConfigError, match="not found"):
        resume_dir(compose(base + [f"resume={tmp_path / 'nowhere'}"]))
