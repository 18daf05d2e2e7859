"""The RecSys Challenge 2025 protocol as the organisers run it: submission from all events, churn
population, relevant-client scoring, classes and popularity from the training side, their files."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl

from experiments.config import compose
from experiments.run import export_submission, run


def test_submission_uses_events_after_the_cutoff(recsys_dir, tmp_path):
    """A purchase in the last 14 days (after the run's history cutoff) changes that client's submitted vector only."""
    from datamodules.config import DataConfig
    from datamodules.preprocess import prepare
    from experiments.config import to_dataclass
    from experiments.finished_run import load_run

    data = tmp_path / "data"
    shutil.copytree(recsys_dir, data)
    args = ["experiment=gru_ae_recsys2025", "trainer.fast_dev_run=true", "logger.wandb=false", f"output_dir={tmp_path / 'out'}",
            "run_name=sub", "export_submission=true", "probe.baselines=[]", "model.hidden=16", "model.emb_dim=16",
            f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = compose(args)
    result = run(cfg)
    before = np.load(result.run_dir / "submission" / "embeddings.npy").astype(np.float32)
    ids = np.load(result.run_dir / "submission" / "client_ids.npy")
    prepared = prepare(to_dataclass(cfg.data, DataConfig), cfg.seed)
    assert prepared.meta["cutoff"] is not None

    buys = pl.read_parquet(data / "product_buy.parquet")
    last = buys["timestamp"].max()
    client = int(ids[0])
    sku = buys["sku"][0]
    pl.concat([buys, pl.DataFrame({"client_id": [client], "timestamp": [last], "sku": [sku]}, schema=buys.schema)]).write_parquet(
        data / "product_buy.parquet"
    )
    export_submission(prepared, None, tmp_path / "again", load_run(result.run_dir))
    after = np.load(tmp_path / "again" / "embeddings.npy").astype(np.float32)
    assert (np.load(tmp_path / "again" / "client_ids.npy") == ids).all()
    assert not np.allclose(after[0], before[0])  # the new event is in the submission
    np.testing.assert_allclose(after[1:], before[1:], atol=1e-3)  # nobody else moved
