"""The RecSys Challenge 2025 protocol as the organisers run it: submission from all events, churn
population, relevant-client scoring, classes and popularity from the training side, their files."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest

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


def recsys_config(data, cache, *overrides: str):
    from datamodules.config import DataConfig
    from experiments.config import to_dataclass

    cfg = compose(["experiment=gru_ae_recsys2025", f"data.path={data}", f"data.cache_dir={cache}", *overrides])
    return cfg, to_dataclass(cfg.data, DataConfig)


def history_of(data, cutoff: str) -> pl.DataFrame:
    """Every event before the cutoff: client (as the string user_id), table name."""
    frames = [
        pl.read_parquet(data / f"{table}.parquet").select(pl.col("client_id").cast(pl.String), pl.lit(table).alias("table"), "timestamp")
        for table in ("product_buy", "add_to_cart", "remove_from_cart", "page_visit", "search_query")
    ]
    return pl.concat(frames).filter(pl.col("timestamp") < cutoff.replace("T", " "))


def by_name(prepared) -> dict:
    return {t.name: t for t in prepared.targets}


def test_churn_population_is_the_clients_who_bought_before_the_cutoff(recsys_dir, tmp_path):
    from datamodules.preprocess import prepare

    _, data_cfg = recsys_config(recsys_dir, tmp_path / "cache")
    prepared = prepare(data_cfg)
    history = history_of(recsys_dir, prepared.meta["cutoff"])
    buyers = set(history.filter(pl.col("table") == "product_buy")["client_id"])
    relevant = set(prepared.meta["relevant_users"])
    churn = by_name(prepared)["churn"].labels
    users = prepared.store.user_ids
    never = [i for i, u in enumerate(users) if u not in buyers and u in relevant]
    assert never, "the fixture has relevant clients with history but no purchase"
    assert (churn[never] == -1).all()  # a never-buyer is neither a churner nor not
    labelled = [i for i, u in enumerate(users) if u in buyers and u in relevant]
    assert (churn[labelled] >= 0).all() and len(set(churn[labelled])) == 2
    assert int((churn >= 0).sum()) == len(labelled)

    _, everyone = recsys_config(recsys_dir, tmp_path / "cache", "data.targets=[{name: churn, kind: churn, event_type: product_buy}]")
    assert (prepare(everyone).targets[0].labels[never] >= 0).all()  # without active_only every relevant client is labelled


def test_only_relevant_clients_are_scored(recsys_dir, tmp_path):
    """Users outside relevant_clients.npy are unlabelled for every target: their NaN embeddings never reach a probe or the MLP."""
    from datamodules.preprocess import prepare
    from evaluation.evaluate import evaluate
    from evaluation.splits import UNLABELLED, user_split

    data = tmp_path / "data"
    shutil.copytree(recsys_dir, data)
    relevant = np.load(data / "input" / "relevant_clients.npy")
    kept = relevant[::2]
    np.save(data / "input" / "relevant_clients.npy", kept)
    cfg, data_cfg = recsys_config(data, tmp_path / "cache", "probe.downstream.width=16", "probe.C=1.0")
    prepared = prepare(data_cfg)
    outside = ~np.isin(prepared.store.user_ids, [str(k) for k in kept])
    assert outside.sum() > 20
    for t in prepared.targets:
        split = user_split(t.labels, 0, t.name)
        assert (split[outside] == UNLABELLED).all(), t.name
        assert (split[~outside] != UNLABELLED).any(), t.name
    embeddings = np.random.default_rng(0).normal(size=(len(prepared.store), 8))
    embeddings[outside] = np.nan
    metrics = evaluate(cfg, prepared, embeddings)
    assert {"probe_test/churn/auc", "downstream_test/propensity_category/score", "downstream_test/propensity_sku/score"} <= set(metrics)


def test_classes_come_from_the_fit_users_only():
    """A value bought by many evaluation users but no FIT user never becomes a class; popularity follows the FIT labels."""
    from datamodules.targets import MULTILABEL, Target, label_matrix, multilabel_for, top_values
    from evaluation.challenge_metrics import popularity_of
    from evaluation.splits import FIT, user_split

    rng = np.random.default_rng(0)
    n = 200
    lists = [sorted({f"v{k}" for k in rng.integers(0, 6, rng.integers(0, 3))}) for _ in range(n)]
    probe = pl.Series("t.values", lists, dtype=pl.List(pl.String))
    placeholder = label_matrix(probe, top_values(probe, 3))
    split = user_split(placeholder, 0, "t")
    for row in np.flatnonzero(split != FIT):
        lists[row] = [*lists[row], "only_eval"]
    values = pl.Series("t.values", lists, dtype=pl.List(pl.String))
    assert top_values(values, 3)[0] == "only_eval"  # over all users it would be the first class
    target = Target("t", MULTILABEL, label_matrix(values, top_values(values, 3)), top_values(values, 3), values, 3)
    assert (user_split(target.labels, 0, "t") == split).all()  # the split does not depend on the classes
    labels, classes = multilabel_for(target, split == FIT)
    assert "only_eval" not in classes and len(classes) == 3
    assert classes == top_values(values.filter(pl.Series(split == FIT)), 3)
    fit_pop = popularity_of(labels, split == FIT)
    assert fit_pop.shape == (3,) and (fit_pop > 0).all()


def test_the_organisers_target_files_are_read(recsys_dir, tmp_path):
    from datamodules.preprocess import prepare
    from datamodules.sources.base import DataError
    from datamodules.synthetic import write_target_files

    data = tmp_path / "data"
    shutil.copytree(recsys_dir, data)
    relevant = np.load(data / "input" / "relevant_clients.npy")
    write_target_files(data, relevant, n_classes=5)
    active = relevant[::3]  # not what the history says: the file wins
    np.save(data / "target" / "active_clients.npy", active)
    _, data_cfg = recsys_config(data, tmp_path / "cache")
    targets = by_name(prepare(data_cfg))
    for name in ("category", "sku"):
        t = targets[f"propensity_{name}"]
        assert t.classes == [str(v) for v in np.load(data / "target" / f"propensity_{name}.npy")]
        assert t.values is None and t.labels.shape[1] == 5  # fixed: no FIT-side choice
        np.testing.assert_allclose(t.popularity, np.load(data / "target" / f"popularity_propensity_{name}.npy"))
    users = prepare(data_cfg).store.user_ids
    labelled = users[targets["churn"].labels >= 0]
    assert set(labelled) == {str(a) for a in active} & set(users)

    np.save(data / "target" / "popularity_propensity_sku.npy", np.ones(3))
    with pytest.raises(DataError, match="popularity_propensity_sku.npy"):
        prepare(data_cfg)


def test_two_windows_fit_on_the_first_and_report_the_second(recsys_dir, tmp_path):
    """data.protocol=challenge: first-window labels train, TEST users' second-window labels only move TEST figures."""
    import datetime as dt

    from datamodules.preprocess import prepare
    from datamodules.targets import labelled_rows
    from evaluation.evaluate import evaluate
    from evaluation.probe import fit_side
    from evaluation.splits import TEST

    cfg, data_cfg = recsys_config(recsys_dir, tmp_path / "cache", "probe.downstream.width=16", "probe.C=1.0")
    assert data_cfg.protocol == "challenge"
    prepared = prepare(data_cfg)
    cutoff = dt.datetime.fromisoformat(prepared.meta["cutoff"])
    times = [pl.read_parquet(recsys_dir / f"{t}.parquet")["timestamp"].max() for t in ("product_buy", "page_visit", "search_query")]
    last = dt.datetime.fromisoformat(max(times))
    assert cutoff == (last - dt.timedelta(days=27)).replace(hour=0, minute=0, second=0)
    buys = pl.read_parquet(recsys_dir / "product_buy.parquet").with_columns(
        pl.col("client_id").cast(pl.String), pl.col("timestamp").str.to_datetime()
    )
    window = dt.timedelta(days=14)
    first = set(buys.filter(pl.col("timestamp").is_between(cutoff, cutoff + window, closed="left"))["client_id"])
    second = set(buys.filter(pl.col("timestamp").is_between(cutoff + window, cutoff + 2 * window, closed="left"))["client_id"])
    targets = by_name(prepared)
    churn, users = targets["churn"], prepared.store.user_ids
    rows = np.flatnonzero(churn.labels >= 0)
    assert len(rows) > 20 and (churn.fit_labels[rows] >= 0).all()
    assert [churn.fit_labels[i] for i in rows] == [int(users[i] not in first) for i in rows]
    assert [churn.labels[i] for i in rows] == [int(users[i] not in second) for i in rows]
    assert (churn.fit_labels[rows] != churn.labels[rows]).any()
    categories = buys.join(pl.read_parquet(recsys_dir / "product_properties.parquet").select("sku", pl.col("category").cast(pl.String)), on="sku")
    bought_first = set(categories.filter(pl.col("timestamp").is_between(cutoff, cutoff + window, closed="left"))["category"])
    category = targets["propensity_category"]
    assert category.values is None and set(category.classes) <= bought_first  # classes from the window heads fit on
    assert (category.fit_labels[labelled_rows(category.fit_labels)].sum(axis=0) > 0).all()

    embeddings = np.random.default_rng(0).normal(size=(len(prepared.store), 8))
    base = evaluate(cfg, prepared, embeddings)
    for t in prepared.targets:  # flip every TEST user's second-window label; the split is drawn from the first window
        split, _, _ = fit_side(t, cfg.seed, list(cfg.probe.split))
        test = (split == TEST) & labelled_rows(t.labels)
        t.labels[test] = 1 - t.labels[test]
    moved = evaluate(cfg, prepared, embeddings)
    assert base.keys() == moved.keys()
    assert {k: v for k, v in base.items() if "_val/" in k} == {k: v for k, v in moved.items() if "_val/" in k}
    changed = {k.split("/")[1] for k in base if "_test/" in k and k.endswith(("/auc", "/auroc")) and base[k] != moved[k]}
    assert changed == {"churn", "propensity_category", "propensity_sku"}


def test_the_organisers_split_layout_is_read(recsys_dir, tmp_path):
    """input/ tables + target/{train,validation}_target.parquet give the history and labels the full tables give at that cutoff."""
    from datamodules.preprocess import prepare
    from datamodules.synthetic import write_split_layout

    data = tmp_path / "data"
    shutil.copytree(recsys_dir, data)
    write_split_layout(data)
    _, split_cfg = recsys_config(data, tmp_path / "cache")
    split = prepare(split_cfg)
    first = pl.read_parquet(data / "target" / "train_target.parquet")["timestamp"].min()
    assert split.meta["cutoff"] == f"{first[:10]}T00:00:00"
    _, full_cfg = recsys_config(recsys_dir, tmp_path / "cache", f"data.cutoff={split.meta['cutoff']}")
    full = prepare(full_cfg)
    assert (split.store.user_ids == full.store.user_ids).all()
    assert split.users.drop("_user", strict=False).equals(full.users.drop("_user", strict=False))
    for a, b in zip(split.targets, full.targets):
        assert a.name == b.name and a.classes == b.classes
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.fit_labels, b.fit_labels), a.name


def test_challenge_protocol_needs_room_for_two_windows(recsys_dir, tmp_path):
    from datamodules.preprocess import prepare
    from datamodules.sources.base import DataError

    _, data_cfg = recsys_config(recsys_dir, tmp_path / "cache", "data.cutoff_days_before_end=7")
    with pytest.raises(DataError, match="data.protocol=challenge: the data ends at .* before the second target window"):
        prepare(data_cfg)
