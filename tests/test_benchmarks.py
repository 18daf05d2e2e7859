"""Benchmarks at a tiny scale: correctness only (both sides agree, files written), never timings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from benchmarks import common
from benchmarks.registry import BENCHMARKS, ENCODERS, benchmark, load_all

TINY = ["--scale", "0.002", "--repeats", "1"]


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture
def cache(bench_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(common, "DATA_CACHE", bench_cache)
    return bench_cache


def test_pandas_yardstick_equals_polars_pipeline(cache: Path, tmp_path: Path) -> None:
    from benchmarks.preprocess import run_pandas, run_polars, same_users

    data, events = common.recsys_data(3000)
    assert events > 1000
    run_polars(data, tmp_path / "polars")
    run_pandas(data, tmp_path / "pandas")
    same_users(tmp_path / "polars" / "users.parquet", tmp_path / "pandas" / "users.parquet")
    users = pl.read_parquet(tmp_path / "pandas" / "users.parquet")
    assert users.height > 10 and users["time"].list.len().max() <= 128


def test_output_comparison_catches_one_changed_token(cache: Path, tmp_path: Path) -> None:
    from benchmarks.preprocess import run_polars, same_users

    data, _ = common.recsys_data(3000)
    run_polars(data, tmp_path / "a")
    users = pl.read_parquet(tmp_path / "a" / "users.parquet")
    sku = users["tok_sku"].to_list()
    sku[3][0] += 1
    users.with_columns(pl.Series("tok_sku", sku, dtype=users["tok_sku"].dtype)).write_parquet(tmp_path / "changed.parquet")
    with pytest.raises(AssertionError, match="tok_sku differs"):
        same_users(tmp_path / "a" / "users.parquet", tmp_path / "changed.parquet")


@pytest.mark.parametrize("gru_path", ["packed", "trimmed"])
def test_padded_reference_loss_equals_model_loss(gru_path: str) -> None:
    from benchmarks.scaling import VOCAB, batch_of
    from benchmarks.training import model_losses, padded_losses

    torch.manual_seed(0)
    model = ENCODERS["gru_autoencoder"](VOCAB, 16).eval()
    batch = batch_of(12, 6)
    batch["lengths"] = torch.tensor([9, 3, 7, 1, 9, 5])  # 3 pad columns beyond the longest user
    for f, t in batch["tokens"].items():
        t[torch.arange(12)[None, :] >= batch["lengths"][:, None]] = 0
    with torch.no_grad():
        ours, padded = model_losses(gru_path)(model, batch), padded_losses(model, batch)
    assert model.gru_path == gru_path
    for f in ours:
        assert ours[f].item() == pytest.approx(padded[f].item(), rel=1e-5)


def test_naive_loader_builds_the_same_batch(cache: Path) -> None:
    from benchmarks.loading import NaiveUserDataset, naive_collate, same_batch
    from datamodules.sequences import Collator

    store = common.prepared_recsys(3000).store
    rows = np.array([5, 0, 9, 2])
    naive = NaiveUserDataset(store, rows)
    same_batch(Collator(store)(rows.tolist()), naive_collate([naive[i] for i in range(len(rows))]))
    other = Collator(store)(rows[::-1].tolist())
    with pytest.raises(AssertionError):
        same_batch(other, naive_collate([naive[i] for i in range(len(rows))]))


def test_run_writes_results_and_plots(cache: Path, tmp_path: Path) -> None:
    from benchmarks.run import main

    assert main(["preprocess", "loading", "training", "inference", "scaling", *TINY, "--out", str(tmp_path)]) == 0
    for name in ("preprocess", "loading", "training", "inference", "scaling"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["machine"]["cpu_count"] >= 1 and result["machine"]["versions"]["polars"]
        assert len(result["load_average_before"]) == 3 and result["rows"]
        assert all(isinstance(t["met"], bool) for t in result["targets"])
    pre = json.loads((tmp_path / "preprocess.json").read_text())["rows"]
    assert [r["events"] for r in pre] == sorted(r["events"] for r in pre) and all(r["peak_MB"] > 0 for r in pre)
    assert {r["side"] for r in pre} == {"polars", "floor", "pandas"}
    inference = json.loads((tmp_path / "inference.json").read_text())["rows"]
    assert {r["encoder"] for r in inference} == set(ENCODERS)
    assert {r["threads"] for r in inference} >= {1} and all(0 < r["collate_share"] < 1 for r in inference)
    training = json.loads((tmp_path / "training.json").read_text())
    assert len({r["side"] for r in training["rows"]}) == 3 and any("same loss" in n for n in training["notes"])
    for png in ("preprocess_scaling.png", "scaling_sequence_length.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # trains a run and starts four processes: about a minute of CPU, too much for `make test`'s 15 minutes
def test_embed_benchmark_measures_each_chunk_size(cache: Path, tmp_path: Path) -> None:
    from benchmarks.run import main

    assert main(["embed", *TINY, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "embed.json").read_text())
    assert result["parameters"]["users"] > 0 and result["parameters"]["events"] > result["parameters"]["users"]
    embeds = [r for r in result["rows"] if r["side"] == "embed"]
    assert len({r["chunk"] for r in embeds}) == 2 and embeds[0]["chunks"] > embeds[1]["chunks"] == 1
    for r in embeds:
        assert math.isfinite(r["peak_MB"]) and r["peak_MB"] >= r["base_MB"] > 0
        assert math.isfinite(r["users/s"]) and r["users/s"] > 0
    (load,) = [r for r in result["rows"] if r["side"] == "load"]
    assert load["peak_MB"] > 0 and load["frame_MB"] >= 0


@pytest.mark.slow
def test_llm_packed_and_padded_agree(cache: Path, tmp_path: Path) -> None:
    from benchmarks.run import main

    assert main(["llm", *TINY, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "llm.json").read_text())["rows"]
    by = {(r["model"], r["batches"]): r for r in rows}
    assert len(by) == 4
    for model in {r["model"] for r in rows}:
        assert by[(model, "packed")]["useful_tokens"] == by[(model, "padded")]["useful_tokens"]
        assert by[(model, "packed")]["rows"] <= by[(model, "padded")]["rows"]


def test_registry_rejects_duplicates_and_unknown_names() -> None:
    from benchmarks.run import main

    load_all()
    assert {"preprocess", "loading", "training", "inference", "llm", "scaling", "embed"} <= set(BENCHMARKS)
    with pytest.raises(ValueError, match="registered twice"):
        benchmark("loading")(lambda scale, repeats, out: None)
    with pytest.raises(SystemExit):
        main(["no_such_benchmark"])
