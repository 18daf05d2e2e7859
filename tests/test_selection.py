"""Selection never reads TEST users: change only their labels, and everything that selects stays bit-identical.

Two real sweeps (SQLite storage, median pruner on probe_val/mean_auc) run on two copies of the same
preprocessing cache. In the second copy the labels of TEST users, and only theirs, are changed for
every target. Whatever chooses something (the per-epoch probe, the pruner's reports, the objective,
the trial parameters, the best checkpoint, the downstream MLP's epoch) must be identical; the TEST
metrics the tables report must move. A selection path that read a TEST label would fail this.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import optuna
import polars as pl
import pytest
import torch
import yaml

from datamodules.preprocess import file_hash, load
from evaluation.downstream import train_downstream
from evaluation.splits import FIT, TEST, UNLABELLED, VAL, user_keys, user_split
from sweeps.run import main
from tests.conftest import transactions

TARGETS = (
    "[{name: segment, kind: binary, positive: traveller}, {name: tier, kind: classes, top_k: 3},"
    " {name: churn, kind: churn}, {name: merchants, kind: propensity_top, field: merchant, top_k: 3}]"
)
SELECTION = ("probe_val/", "downstream_val/", "val/")
REPORTED = ("probe_test/", "downstream_test/")


def run_args(data_dir: Path, cache_dir: Path) -> list[str]:
    return [
        f"data.path={data_dir / 'events.csv'}", f"data.labels.path={data_dir / 'labels.csv'}", "data.schema.user=client",
        "data.schema.time=ts", "data.schema.fields=[{name: event_type}, {name: merchant}, {name: amount, kind: numeric}]",
        f"data.targets={TARGETS}", f"data.cache_dir={cache_dir}", "logger.wandb=false",
    ]


def sweep_file(tmp_path: Path) -> Path:
    spec = {
        "experiment": "gru_ae_generic_csv",
        "objective": {"metric": "probe_val/mean_auc", "direction": "maximize"},
        "space": {"model.hidden": {"type": "categorical", "choices": [8, 16]}, "model.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}},
        "overrides": {"trainer.max_epochs": 3, "trainer.early_stopping_patience": None, "model.emb_dim": 8, "probe.baselines": ["random"],
                      "probe.downstream.width": 32},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "median", "params": {"n_startup_trials": 1, "n_warmup_steps": 0}},
        "n_trials": 3,
    }
    path = tmp_path / "selection.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def relabel_test_users(labels: np.ndarray, name: str, seed: int) -> np.ndarray:
    """New labels differing from `labels` only on TEST users, chosen so the FIT/VAL/TEST split stays the same.

    The split orders each class's users by a label-free key and cuts at the fractions; TEST users whose
    key is above every FIT/VAL user's key stay TEST whichever class they join, so their labels are
    rotated among themselves (class counts kept). Multi-label targets are split without labels: all
    TEST users' labels are flipped.
    """
    split = user_split(labels, seed, name)
    out = labels.copy()
    if labels.ndim == 2:
        out[split == TEST] = 1 - out[split == TEST]
        return out
    keys = user_keys(len(labels), seed, name)
    chosen = split == TEST
    chosen &= keys > keys[(split != TEST) & (split != UNLABELLED)].max()
    rows = np.flatnonzero(chosen)
    out[rows] = np.roll(labels[rows], 1)
    return out


def relabelled_cache(cache: Path, seed: int) -> Path:
    """A copy of the cache whose targets.parquet holds relabel_test_users' labels (meta.json's content hash updated)."""
    copy = cache.parent.parent / "cache_b" / cache.name
    shutil.copytree(cache, copy)
    table = pl.read_parquet(copy / "targets.parquet")
    for t in load(copy).targets:
        labels = relabel_test_users(t.labels, t.name, seed)
        assert (user_split(labels, seed, t.name) == user_split(t.labels, seed, t.name)).all(), t.name
        changed = (labels != t.labels).reshape(len(labels), -1).any(axis=1)
        assert changed.sum() >= 4 and (user_split(t.labels, seed, t.name)[changed] == TEST).all(), t.name
        column = table[t.name]
        if t.values is not None:  # the window values the heads choose FIT-side classes from: rotated among TEST users
            rows = np.flatnonzero(user_split(t.labels, seed, t.name) == TEST)
            original, lists = t.values.to_list(), t.values.to_list()
            for row, other in zip(rows, np.roll(rows, 1)):
                lists[row] = original[other]
            table = table.with_columns(pl.Series(t.values.name, lists, dtype=t.values.dtype))
        if labels.ndim == 2:
            table = table.with_columns(pl.Series(t.name, labels, dtype=column.dtype))
        else:
            table = table.with_columns(pl.Series(t.name, labels, dtype=column.dtype).set(pl.Series(labels < 0), None))
    table.write_parquet(copy / "targets.parquet")
    meta = json.loads((copy / "meta.json").read_text())
    meta["files"]["targets.parquet"] = file_hash(copy / "targets.parquet")
    (copy / "meta.json").write_text(json.dumps(meta))
    return copy


def csv_column(run_dir: Path, prefix: str) -> dict[str, list[str]]:
    """Every logged value of the metrics under `prefix`, as csv/metrics.csv holds them (text: exact)."""
    frame = pl.read_csv(run_dir / "csv" / "metrics.csv", infer_schema=False)
    return {c: frame[c].drop_nulls().to_list() for c in frame.columns if c.startswith(prefix)}


def test_selection_never_reads_test_labels(tmp_path, one_thread):
    events, labels = transactions(n_users=120)
    labels.with_columns(tier=pl.Series([f"t{i % 3}" for i in range(labels.height)])).write_csv(tmp_path / "labels.csv")
    events.write_csv(tmp_path / "events.csv")
    sweep = sweep_file(tmp_path)
    out_a, out_b = tmp_path / "sweeps_a", tmp_path / "sweeps_b"
    assert main([f"sweep={sweep}", "study=s", f"sweeps_dir={out_a}", *run_args(tmp_path, tmp_path / "cache_a")]) == 0
    (cache,) = (tmp_path / "cache_a").iterdir()
    copy = relabelled_cache(cache, seed=0)
    written = file_hash(copy / "targets.parquet")
    assert main([f"sweep={sweep}", "study=s", f"sweeps_dir={out_b}", *run_args(tmp_path, copy.parent)]) == 0
    assert file_hash(copy / "targets.parquet") == written  # B ran on the relabelled cache: it was not rebuilt

    study_a, study_b = (optuna.load_study(study_name="s", storage=f"sqlite:///{out / 's' / 'study.db'}") for out in (out_a, out_b))
    trials_a, trials_b = study_a.get_trials(), study_b.get_trials()
    assert len(trials_a) == len(trials_b) == 3
    test_moved = set()
    for a, b in zip(trials_a, trials_b):
        # what the sampler, the pruner and the objective saw
        assert (a.state, a.params, a.value, a.intermediate_values) == (b.state, b.params, b.value, b.intermediate_values)
        assert len(a.intermediate_values) >= 1
        run_a, run_b = Path(a.user_attrs["run_dir"]), Path(b.user_attrs["run_dir"])
        # the LinearProbe callback's per-epoch results: VAL only, identical
        per_epoch = csv_column(run_a, "probe_val/")
        assert per_epoch and per_epoch == csv_column(run_b, "probe_val/")
        # TEST appears only in the final evaluation, which a pruned trial never reaches
        assert all(len(v) == (a.state.name == "COMPLETE") for v in csv_column(run_a, "probe_test/").values())
        if a.state.name != "COMPLETE":  # pruned at its first report, before any checkpoint
            continue
        # the best checkpoint (min val/loss) holds the same weights
        best_a, best_b = (torch.load(r / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"] for r in (run_a, run_b))
        assert best_a.keys() == best_b.keys() and all(torch.equal(best_a[k], best_b[k]) for k in best_a)
        metrics_a, metrics_b = (json.loads((r / "metrics.json").read_text()) for r in (run_a, run_b))
        assert metrics_a.keys() == metrics_b.keys()
        selection = [k for k in metrics_a if k.startswith(SELECTION) or k.startswith(tuple(f"baseline/random/{p}" for p in SELECTION))]
        assert len(selection) >= 2 * 3 * 2 + 4  # (method, random) x 3 probe targets x (auc, ks) + downstream_val
        assert {k: metrics_a[k] for k in selection} == {k: metrics_b[k] for k in selection}
        test_moved |= {k.split("/")[-2] for k in metrics_a if k.endswith(("/auc", "/auroc")) and "_test/" in k and metrics_a[k] != metrics_b[k]}

        # the downstream MLP's chosen epoch, on the run's own embeddings and each cache's labels
        emb = np.stack(pl.read_parquet(run_a / "embeddings.parquet")["embedding"].to_numpy())
        assert np.array_equal(emb, np.stack(pl.read_parquet(run_b / "embeddings.parquet")["embedding"].to_numpy()))
        chosen = []
        for path in (cache, copy):
            (t,) = [t for t in load(path).targets if t.name == "merchants"]
            split = user_split(t.labels, 0, t.name)
            chosen.append(train_downstream(emb, t.labels, split == FIT, split == VAL, split == TEST, width=32, epochs=5))
        assert (chosen[0].best_epoch, chosen[0].val) == (chosen[1].best_epoch, chosen[1].val)
        assert chosen[0].test != chosen[1].test
    assert study_a.best_trial.number == study_b.best_trial.number
    assert test_moved == {"segment", "tier", "churn", "merchants"}  # every target's TEST metric moved: the relabelling bit
    best_a, best_b = (json.loads((out / "s" / "best.json").read_text()) for out in (out_a, out_b))
    assert best_a["metrics"] == best_b["metrics"] and best_a["test_metrics"] != best_b["test_metrics"]

