"""Ensemble assembly: alignment by user id, PCA, L2 normalisation, mean imputation, quantile-mapped features."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from experiments.ensemble import aligned, reduce_block, resolve_run


def write_run(path, users, emb):
    path.mkdir(parents=True)
    pl.DataFrame({"user_id": users, "embedding": emb.astype(np.float32)}).write_parquet(path / "embeddings.parquet")
    (path / "metrics.json").write_text("{}")
    return path


def test_alignment_by_user_id_and_missing_users(tmp_path):
    run = write_run(tmp_path / "r", ["c", "a"], np.array([[3.0, 3.0], [1.0, 1.0]]))
    x, present = aligned(run, np.array(["a", "b", "c"]))
    assert present.tolist() == [True, False, True]
    assert x[0].tolist() == [1.0, 1.0] and x[2].tolist() == [3.0, 3.0]


def test_reduce_block_pca_normalise_and_mean_impute():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 10)).astype(np.float32)
    present = np.ones(50, dtype=bool)
    present[[3, 7]] = False
    out = reduce_block(x, present, pca=4, normalize=True, seed=0)
    assert out.shape == (50, 4)
    assert np.allclose(np.linalg.norm(out[present], axis=1), 1.0, atol=1e-5)
    assert np.allclose(out[3], out[present].mean(axis=0)) and np.allclose(out[7], out[3])
    # PCA fitted on present users only: the imputed rows do not move the components
    again = reduce_block(np.where(present[:, None], x, 1e6), present, pca=4, normalize=True, seed=0)
    assert np.allclose(again, out, atol=1e-5)


def test_resolve_run_picks_newest_finished_run(tmp_path):
    import os

    old = write_run(tmp_path / "exp" / "a", ["u"], np.ones((1, 2)))
    new = write_run(tmp_path / "exp" / "b", ["u"], np.ones((1, 2)))
    os.utime(old / "metrics.json", (1, 1))
    (tmp_path / "exp" / "unfinished").mkdir()
    assert resolve_run({"experiment": "exp"}, str(tmp_path)) == new
    with pytest.raises(ValueError, match="no finished run of experiment 'nope'"):
        resolve_run({"experiment": "nope"}, str(tmp_path))
    with pytest.raises(ValueError, match="exactly one of run or experiment"):
        resolve_run({"run": str(old), "experiment": "exp"}, str(tmp_path))


def test_block_from_other_dataset_is_refused(tmp_path):
    run = write_run(tmp_path / "r", ["x", "y"], np.ones((2, 2)))
    with pytest.raises(ValueError, match="shares no users"):
        aligned(run, np.array(["a", "b"]))
