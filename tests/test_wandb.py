"""The W&B dashboard structure, read back from a real offline run with wandb's own reader (`wandb leet inspect`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from experiments.loggers import evaluation_rows, pca_2d
from experiments.config import compose
from experiments.run import run


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of the run's .wandb transaction log, decoded by the wandb CLI."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    cli = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(cli), "leet", "inspect", "--json", str(log)], capture_output=True, text=True, check=True, timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_every_run_logs_the_dashboard_structure(ml100k_cache, tmp_path):
    args = [f"data.cache_dir={ml100k_cache}", f"output_dir={tmp_path}", "run_name=w", "trainer.max_epochs=2",
            "trainer.limit_train_batches=2", "trainer.early_stopping_patience=null", "model.hidden=16", "probe.C=1.0",
            "probe.baselines=[random]", "probe.every_n_epochs=1"]
    result = run(compose(args))
    records = wandb_records(result.run_dir)
    by_type: dict[str, list[dict]] = {}
    for r in records:
        by_type.setdefault(r["type"], []).append(r[r["type"]])

    # config keys to group and filter by
    config = by_type["run"][0]["config"]["update"]
    assert {k: config[k] for k in ("method", "dataset", "experiment")} == {
        "method": "gru_autoencoder", "dataset": "ml100k", "experiment": "gru_ae_ml100k"}

    # probe_val keys summarised as max, each defined by its exact name before it was logged (wandb-core
    # chooses among matching globs at random, so a "probe/*" glob lost to Lightning's "*" now and then)
    probe_defs = [m for m in by_type["metric"] if m.get("name") == "probe_val/gender/auc"]
    assert probe_defs and all(m["summary"] == {"max": True} and m["step_metric"] == "trainer/global_step" for m in probe_defs)
    # ... and wandb-core applied it: the summary holds the best of the three probes (2 epochs + final)
    csv_metrics = pl.read_csv(result.run_dir / "csv" / "metrics.csv")
    logged = csv_metrics["probe_val/gender/auc"].drop_nulls()
    assert logged.len() == 3
    assert result.wandb_summary["probe_val/gender/auc"] == {"max": pytest.approx(logged.max())}
    # TEST numbers are logged once, at the end, and summarised as that value (no max over epochs)
    assert csv_metrics["probe_test/gender/auc"].drop_nulls().len() == 1
    assert not [m for m in by_type["metric"] if m.get("name") == "probe_test/gender/auc"]
    assert result.wandb_summary["probe_test/gender/auc"] == pytest.approx(result.metrics["probe_test/gender/auc"])
    key = "baseline/random/probe_test/gender/auc"
    assert result.wandb_summary[key] == pytest.approx(result.metrics[key])

    # one history step with the table, a ROC image per binary target and the projection
    (media,) = [h["item"] for h in by_type["history"] if "eval/table._type" in h["item"]]
    assert media["eval/table._type"] == "table-file"
    binary = ["gender", "age", "churn"]  # occupation is multiclass: no ROC
    for key in [f"eval/roc/{t}" for t in binary] + ["eval/embedding_pca"]:
        assert media[f"{key}._type"] == "image-file"
        assert list(result.run_dir.glob(f"wandb/offline-run-*/files/{media[f'{key}.path']}")), key
    assert "eval/roc/occupation._type" not in media
    assert sorted(p.name for p in (result.run_dir / "plots").iterdir()) == ["embedding_pca.png"] + [f"roc_{t}.png" for t in sorted(binary)]
    assert media["eval/embedding_pca.width"] == 4 * 400  # one panel per binary/multiclass target

    # the table holds the final evaluation of every row, as metrics.json does
    (table_file,) = result.run_dir.glob(f"wandb/offline-run-*/files/{media['eval/table.path']}")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["row", "evaluation", "target", "metric", "value"]
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert len(table["data"]) == 2 * 2 * 4 * 2  # rows (method, random) x (val, test) x targets x (auc, ks)
    for row, evaluation, target, metric, value in table["data"]:
        prefix = "" if row == "gru_autoencoder" else f"baseline/{row}/"
        assert value == pytest.approx(metrics[f"{prefix}{evaluation}/{target}/{metric}"])


def test_evaluation_rows_and_projection():
    rows = {"m": {"probe_test/g/auc": 0.7, "downstream_val/c/score": 0.5}, "baseline/random": {"probe_test/g/auc": 0.5}}
    assert evaluation_rows(rows) == [
        ["m", "probe_test", "g", "auc", 0.7], ["m", "downstream_val", "c", "score", 0.5], ["random", "probe_test", "g", "auc", 0.5]]
    rng = np.random.default_rng(0)
    t = rng.normal(size=300)
    x = np.outer(t, [3.0, 0.0, 4.0]) + 0.01 * rng.normal(size=(300, 3))  # one dominant direction
    xy = pca_2d(x)
    assert xy.shape == (300, 2) and abs(np.corrcoef(xy[:, 0], t)[0, 1]) > 0.999
    assert np.allclose(pca_2d(x[:, :1])[:, 1], 0.0)  # a 1-D embedding still plots
