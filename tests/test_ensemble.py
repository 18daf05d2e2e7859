"""Ensemble assembly: alignment by user id, PCA, L2 normalisation, mean imputation, quantile-mapped features;
the paper's presets; blocks made on other data refused."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest
from omegaconf import OmegaConf

from datamodules.config import DataConfig
from datamodules.preprocess import prepare
from evaluation.evaluate import cutoff_epoch
from experiments.config import ConfigError, compose, presets, to_dataclass
from experiments.ensemble import aligned, ensemble_embeddings, reduce_block, resolve_run
from experiments.run import run
from tests.helpers import data_args_for, experiment_section


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


def test_presets_follow_the_paper_and_name_existing_experiments_on_the_same_data():
    """PCA 64 for the GRU-AE variants but day_event_type and the search LM, 128 for the all-interactions LM; none for
    next-event, iALS and LightFM blocks (already 64-d)."""
    for name in ("ensemble_recsys2025", "ensemble_ml100k"):
        data = experiment_section(name, "data")
        blocks = experiment_section(name, "model")["blocks"]
        assert len(blocks) == {"ensemble_recsys2025": 11, "ensemble_ml100k": 8}[name]
        for block in blocks:
            exp = block["experiment"]
            assert exp in presets("experiment"), exp
            assert experiment_section(exp, "data")["source"] == data["source"], exp
            model = experiment_section(exp, "model")["name"]
            paper_pca = 64 if model == "gru_autoencoder" and "day_event_type" not in exp else None
            if model == "lm_features":
                paper_pca = 64 if "search" in exp else 128
            assert block.get("pca") == paper_pca, exp


def generic_data(tmp_path, events, labels) -> list[str]:
    """The CSV fixture with its static label as the one target (the churn window of so few users can hold one class)."""
    return [*data_args_for("generic", (events, labels), None, None, tmp_path), "data.targets=[{name: segment, kind: binary, positive: traveller}]"]


def handcrafted_run(tmp_path, events, labels, name: str, *extra: str):
    """A real finished run, the cheapest kind: an ensemble of handcrafted features only (no training)."""
    data = generic_data(tmp_path, events, labels)
    args = ["experiment=gru_ae_generic_csv", "model=ensemble", f"output_dir={tmp_path / 'out'}", f"run_name={name}",
            "logger.wandb=false", "probe.baselines=[]", *data, *extra]
    return run(compose(args)).run_dir


def test_blocks_made_on_other_data_are_refused_naming_both(tmp_path, csv_data):
    events, labels = csv_data
    moved = tmp_path / "elsewhere.csv"
    moved.write_bytes(events.read_bytes())
    a = handcrafted_run(tmp_path, events, labels, "a")
    b = handcrafted_run(tmp_path, moved, labels, "b")
    c = handcrafted_run(tmp_path, events, labels, "c", "data.cutoff_quantile=0.7")

    cfg = compose(["experiment=gru_ae_generic_csv", "model=ensemble", *generic_data(tmp_path, events, labels)])
    prepared = prepare(to_dataclass(cfg.data, DataConfig))
    data = OmegaConf.to_container(cfg.data, resolve=True)

    def assemble(*runs):
        model = {"blocks": [{"run": str(r), "pca": None} for r in runs], "handcrafted": False, "output_dir": "outputs"}
        return ensemble_embeddings(model, prepared, cutoff_epoch(prepared), data=data, name="ens")

    assert assemble(a, a).shape == (len(prepared.store), 2 * prepared.features.width - 2)
    said = f"{re.escape(str(b))} was made on data.path='{re.escape(str(moved))}' but ens .* uses data.path='{re.escape(str(events))}'"
    with pytest.raises(ValueError, match=said):
        assemble(a, b)
    said = f"{re.escape(str(c))} has history cutoff '[^']+' .* but ens .* has cutoff '{re.escape(prepared.meta['cutoff'])}'"
    with pytest.raises(ValueError, match=said):
        assemble(a, c)
    (a / "preprocess.json").unlink()
    with pytest.raises(ValueError, match="has no preprocess.json; cannot check"):
        assemble(a)
    # through the run command the refusal is a config error, before any run directory is made
    refused = ["experiment=gru_ae_generic_csv", "model=ensemble", f"model.blocks=[{{run: {b}}}]", f"output_dir={tmp_path / 'x'}",
               "logger.wandb=false", *generic_data(tmp_path, events, labels)]
    with pytest.raises(ConfigError, match="experiment 'gru_ae_generic_csv'"):
        run(compose(refused))
    assert not (tmp_path / "x").exists()
