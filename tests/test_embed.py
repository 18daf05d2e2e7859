"""experiments.embed: new users and values from a finished run, chunked, from files or frames, and its refusals.

Every method re-embeds its own users equal to its embeddings.parquet in tests/test_run.py
(the smoke run of every experiment); here one small GRU-AE run on the CSV log serves the rest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from experiments.config import compose
from experiments.embed import RunError, load_run, main
from experiments.run import run
from tests.conftest import transactions

FIELDS = "data.schema.fields=[{name: event_type}, {name: merchant}, {name: amount, kind: numeric}, {name: description, kind: text}]"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A GRU-AE run on 40 users of the CSV log (2 epochs); its run directory."""
    root = tmp_path_factory.mktemp("embed")
    events, labels = transactions()
    events.write_csv(root / "events.csv")
    labels.write_csv(root / "labels.csv")
    args = [
        "experiment=gru_ae_generic_csv", f"data.path={root / 'events.csv'}", f"data.labels.path={root / 'labels.csv'}",
        "data.schema.user=client", "data.schema.time=ts", FIELDS, f"data.cache_dir={root / 'cache'}", f"output_dir={root / 'out'}",
        "run_name=r", "trainer.max_epochs=2", "logger.wandb=false", "probe.baselines=[]",
    ]  # fmt: skip
    return run(compose(args)).run_dir


def new_month(n_users: int = 12) -> pl.DataFrame:
    """Another log in the same layout: users u100.. (none seen in training), a merchant the run never saw, later dates."""
    events, _ = transactions(n_users, seed=7)
    events = events.with_columns(
        pl.col("client").str.replace("u0", "u1"),
        pl.when(pl.col("merchant").str.ends_with("_3")).then(pl.lit("airline_new")).otherwise(pl.col("merchant")).alias("merchant"),
        (pl.col("ts").str.to_datetime() + pl.duration(days=90)).dt.strftime("%Y-%m-%d %H:%M:%S").alias("ts"),
    )
    return events


def test_unseen_users_and_values_embed_and_are_counted(trained, tmp_path):
    events = new_month()
    events.write_csv(tmp_path / "july.csv")
    out = tmp_path / "july.parquet"
    summary = load_run(trained).embed_to(out, tmp_path / "july.csv")
    frame = pl.read_parquet(out)
    assert frame["user_id"].to_list() == sorted(events["client"].unique().to_list())
    assert frame["embedding"].dtype.size == 128 and np.isfinite(frame["embedding"].to_numpy()).all()
    assert summary["unseen_values"]["merchant"] == events.filter(pl.col("merchant") == "airline_new").height > 0
    assert summary["unseen_values"]["event_type"] == 0
    on_disk = json.loads(out.with_suffix(".json").read_text())
    assert on_disk["rows"] == frame.height and on_disk["counts"]["events"] == events.height
    assert on_disk["run"] == str(trained) and len(on_disk["data_hash"]) == 64


def test_chunks_frames_and_files_give_the_same_vectors(trained, tmp_path):
    events = new_month(30)
    events.write_csv(tmp_path / "july.csv")
    model = load_run(trained)
    whole = model.embed(tmp_path / "july.csv", chunk_users=1000)
    chunked = model.embed(tmp_path / "july.csv", chunk_users=4, batch_size=3)
    from_frame = model.embed(events, chunk_users=7)
    assert whole["user_id"].to_list() == chunked["user_id"].to_list() == from_frame["user_id"].to_list()
    np.testing.assert_allclose(chunked["embedding"].to_numpy(), whole["embedding"].to_numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_frame["embedding"].to_numpy(), whole["embedding"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_a_user_is_embedded_from_its_own_events_only(trained, tmp_path):
    """Adding other users to the file leaves a user's vector alone: nothing is fitted on the new data."""
    events = new_month(30)
    model = load_run(trained)
    alone = model.embed(events.filter(pl.col("client") == "u105"))
    among = model.embed(events).filter(pl.col("user_id") == "u105")
    np.testing.assert_allclose(alone["embedding"].to_numpy(), among["embedding"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_checkpoint_written_on_another_device_loads_on_cpu(trained, tmp_path):
    """A Lightning checkpoint whose tensors are tagged cuda:0 (as one saved on a GPU box): read with map_location=cpu, weights only."""
    import torch

    model = load_run(trained)
    ckpt = tmp_path / "gpu.ckpt"

    def as_cuda(obj):  # the location tag torch.save writes for a CUDA tensor
        return "cuda:0" if getattr(obj, "device", None) is not None and obj.device.type == "cpu" else None

    torch.serialization.register_package(0, as_cuda, lambda obj, location: None)
    try:
        torch.save({"state_dict": model.module.state_dict(), "epoch": 1}, ckpt)
    finally:
        torch.serialization._package_registry[:] = [p for p in torch.serialization._package_registry if p[1] is not as_cuda]
    if not torch.cuda.is_available():  # the file really claims CUDA: loading it as saved fails here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(ckpt, weights_only=True)
    events = new_month()
    expected = model.embed(events)
    again = load_run(trained, weights=ckpt).embed(events)
    np.testing.assert_array_equal(again["embedding"].to_numpy(), expected["embedding"].to_numpy())


def test_command_writes_parquet_and_summary(trained, tmp_path, capsys):
    new_month().write_csv(tmp_path / "july.csv")
    out = tmp_path / "result" / "july.parquet"
    assert main([f"run={trained}", f"data.path={tmp_path / 'july.csv'}", f"out={out}", "batch_size=5", "chunk_users=5"]) == 0
    printed = capsys.readouterr().out
    assert "embedded 12 users" in printed and "merchant" in printed and str(out) in printed
    assert pl.read_parquet(out).height == 12 and json.loads(out.with_suffix(".json").read_text())["rows"] == 12
    assert sorted(p.name for p in out.parent.iterdir()) == ["july.json", "july.parquet"]  # no chunk parts left behind


def bad_runs(trained: Path, tmp_path: Path) -> dict[str, Path]:
    no_weights = tmp_path / "no_weights"
    shutil.copytree(trained, no_weights)
    (no_weights / "model.safetensors").unlink()
    old = tmp_path / "old"
    shutil.copytree(trained, old)
    state = json.loads((old / "preprocess.json").read_text())
    (old / "preprocess.json").write_text(json.dumps({**state, "version": 1}))
    return {"no_weights": no_weights, "old": old}


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_field", "column 'merchant' (schema.fields.merchant) not found"),
        ("user_type", "the user column holds integer values; the run"),
        ("time_type", "column 'ts', row 1: cannot parse time '1711843200' with format"),  # epoch seconds against the run's pattern
        ("no_weights", "model.safetensors: no weights (did the run finish?"),
        ("old", "written by preprocessing version 1"),
        ("unknown_key", "unknown config key 'chunk_user'; did you mean 'chunk_users'?"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, capsys, case, message):
    events = new_month()
    data = tmp_path / "july.csv"
    run_dir = bad_runs(trained, tmp_path).get(case, trained)
    if case == "missing_field":
        events = events.drop("merchant")
    if case == "user_type":
        events = events.with_columns(pl.col("client").str.slice(1).cast(pl.Int64))
    if case == "time_type":
        events = events.with_columns(pl.col("ts").str.to_datetime().dt.epoch("s"))
    events.write_csv(data)
    out = tmp_path / "out" / "july.parquet"
    extra = ["chunk_user=5"] if case == "unknown_key" else []
    assert main([f"run={run_dir}", f"data.path={data}", f"out={out}", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert str(data if case in ("missing_field", "user_type", "time_type") else run_dir) in err or case == "unknown_key"
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_an_ensemble_run_says_to_embed_with_its_blocks(tmp_path):
    run_dir = tmp_path / "ens"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 0\nmodel: {name: ensemble, blocks: []}\n")
    from datamodules.preprocess import VERSION

    (run_dir / "preprocess.json").write_text(json.dumps({"version": VERSION}))
    with pytest.raises(RunError, match="each of its blocks' runs"):
        load_run(run_dir)


def test_until_before_every_event_is_an_error_and_writes_nothing(trained, tmp_path):
    from datamodules.sources.base import DataError

    new_month().write_csv(tmp_path / "july.csv")
    out = tmp_path / "out" / "july.parquet"
    with pytest.raises(DataError, match="no user has an event to embed before until=2000-01-01"):
        load_run(trained).embed_to(out, tmp_path / "july.csv", until="2000-01-01")
    assert not any(out.parent.iterdir())
