"""DDP: rank-aware length buckets, and GRU-AE trained with strategy=ddp devices=2 on CPU (gloo).

Two ranks see different batches than one process, so trained weights differ from a
single-process run. What must be identical is the evaluation given the same weights: the
DDP run's gathered embeddings and probe metrics are compared with a single-process embed
and probe of the very weights it saved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from datamodules.sequences import LengthBucketBatchSampler
from experiments.rundirs import launched_as_rank_zero

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("world", [2, 3])
def test_length_buckets_split_every_epoch_across_ranks(world):
    lengths = np.random.default_rng(0).integers(1, 50, 103)
    single = LengthBucketBatchSampler(lengths, 8, seed=4, pool_batches=3)
    ranks = [LengthBucketBatchSampler(lengths, 8, seed=4, pool_batches=3, num_replicas=world, rank=r) for r in range(world)]
    for _ in range(2):  # two epochs: the ranks advance together and stay a partition of the same batch list
        want = [list(b) for b in single]
        got = [[list(b) for b in s] for s in ranks]
        assert all(len(g) == len(s) == -(-len(want) // world) for g, s in zip(got, ranks))  # same count per rank
        padded = want + want[: -len(want) % world]  # the list is padded with its first batches
        assert [got[i % world][i // world] for i in range(len(padded))] == padded
    with pytest.raises(ValueError, match="rank"):
        LengthBucketBatchSampler(lengths, 8, num_replicas=2, rank=2)


@pytest.mark.parametrize("env, zero", [
    ({}, True),                                   # a plain run, or the process Lightning's launcher starts from
    ({"LOCAL_RANK": "1"}, False),                 # a rank Lightning's launcher started
    ({"NODE_RANK": "1"}, False),                  # the first process of node 1 (multi-node, Lightning's launcher)
    ({"GROUP_RANK": "1", "LOCAL_RANK": "0"}, False),
    ({"RANK": "0", "LOCAL_RANK": "0"}, True),     # torchrun
    ({"RANK": "3", "LOCAL_RANK": "0"}, False),
])
def test_only_global_rank_zero_writes(monkeypatch, env, zero):
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launched_as_rank_zero() is zero


def test_ddp_two_ranks_evaluate_like_one_process(ml100k_cache, tmp_path):
    """GRU-AE on ml100k with 2 gloo ranks: one run dir, one W&B run, and the probe of a single-process embed of its weights."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_model

    from datamodules.config import DataConfig
    from datamodules.datamodule import EventDataModule
    from evaluation.embed import embed_all
    from evaluation.evaluate import evaluate
    from experiments.config import compose, to_dataclass
    from experiments.build import build_module

    out = tmp_path / "out"
    args = [f"data.cache_dir={ml100k_cache}", f"output_dir={out}", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
            "model.hidden=16", "probe.C=1.0", "probe.baselines=[]", "probe.every_n_epochs=1"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-m", "experiments.run", "trainer.strategy=ddp", "trainer.devices=2", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr  # the second rank really joined

    # written once: one run directory, one W&B run, metrics.json from rank 0
    (run_dir,) = (out / "gru_ae_ml100k").iterdir()
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and np.isfinite(metrics["val/loss_best"])

    # the same weights embedded and probed by one process
    cfg = compose(args)
    datamodule = EventDataModule(to_dataclass(cfg.data, DataConfig), seed=cfg.seed)
    module = build_module(OmegaConf.to_object(cfg.model), datamodule.data)
    load_model(module, str(run_dir / "model.safetensors"))
    single = embed_all(module, datamodule.predict_dataloader())
    gathered = np.stack(pl.read_parquet(run_dir / "embeddings.parquet")["embedding"].to_numpy())
    assert gathered.shape == single.shape == (len(datamodule.data.store), 16)
    np.testing.assert_allclose(gathered, single, rtol=0, atol=1e-6)
    want = evaluate(cfg, datamodule.data, single)
    assert set(want) == {k for k in metrics if k.startswith(("probe_val/", "probe_test/"))}
    for key, value in want.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key

    # the probe callback during training also gathered both ranks' shards: after the only epoch it
    # probed the weights that became best.ckpt, so its numbers are the final ones (logged once each)
    logged = pl.read_csv(run_dir / "csv" / "metrics.csv").filter(pl.col("probe_val/gender/auc").is_not_null())
    assert logged.height == 2
    for key in ("probe_val/gender/auc", "probe_val/churn/ks", "probe_val/occupation/auc"):
        assert logged[key].to_list() == pytest.approx([metrics[key]] * 2, abs=1e-9)
