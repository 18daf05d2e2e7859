"""The RecSys Challenge 2025 source, the synthetic generator of its layout, and the submission writer."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from datamodules.schema import FIRST_ID
from datamodules.sources import recsys2025
from datamodules.sources.base import DataError
from datamodules.synthetic import EVENT_TABLES, generate_recsys2025, main

SMALL = {"clients": 200, "skus": 2000, "urls": 500}


def ints(text: str) -> list[int]:
    """The test's own reading of a "[a b c]" string, independent of the source's Polars parser."""
    return [int(x) for x in text.strip("[]").split()]


def set_value(path: Path, column: str, row: int, value, dtype: pl.DataType | None = None) -> None:
    """Rewrite one cell (1-based row) of a parquet table."""
    frame = pl.read_parquet(path)
    new = pl.lit(value, dtype=dtype or frame.schema[column])
    frame.with_columns(pl.when(pl.int_range(pl.len()) == row - 1).then(new).otherwise(pl.col(column)).alias(column)).write_parquet(path)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    folder = tmp_path_factory.mktemp("rs25")
    return folder, generate_recsys2025(folder, seed=0, **SMALL)


@pytest.fixture(scope="module")
def events(layout) -> pl.DataFrame:
    return recsys2025.load(layout[0]).events.collect()


@pytest.fixture
def copy(layout, tmp_path) -> Path:
    """A private copy of the layout to damage."""
    return Path(shutil.copytree(layout[0], tmp_path / "data"))


def test_load_merges_every_table(layout, events):
    folder, counts = layout
    heights = {t: pl.read_parquet(folder / f"{t}.parquet").height for t in EVENT_TABLES}
    assert heights == {t: counts[t] for t in EVENT_TABLES}
    assert events.height == sum(heights.values())
    per_type = dict(events.group_by("event_type").len().iter_rows())
    assert per_type == heights
    assert events.schema["user_id"] == pl.String and events.schema["time"] == pl.Datetime("us")
    assert events.schema["name"] == pl.List(pl.Int16) and events.schema["query"] == pl.List(pl.Int16)
    assert [f.name for f in recsys2025.SCHEMA.fields] == ["event_type", "sku", "url", "category", "price", "name", "query"]
    assert events.select(pl.col("_row").min().over("_file")).to_series().unique().to_list() == [1]


def test_product_event_gets_its_properties(layout, events):
    folder, _ = layout
    raw = pl.read_parquet(folder / "add_to_cart.parquet").row(4, named=True)
    props = pl.read_parquet(folder / "product_properties.parquet").filter(pl.col("sku") == raw["sku"]).row(0, named=True)
    event = events.filter(pl.col("_file").str.ends_with("add_to_cart.parquet") & (pl.col("_row") == 5)).row(0, named=True)
    assert event["user_id"] == str(raw["client_id"]) and str(event["time"]) == raw["timestamp"]
    assert (event["event_type"], event["sku"], event["category"], event["price"]) == ("add_to_cart", str(raw["sku"]), str(props["category"]), str(props["price"]))
    assert event["name"] == ints(props["name"]) and len(event["name"]) == 16
    assert event["url"] is None and event["query"] is None


def test_query_and_page_visit_fields(layout, events):
    folder, _ = layout
    query = pl.read_parquet(folder / "search_query.parquet").row(2, named=True)
    event = events.filter(pl.col("_file").str.ends_with("search_query.parquet") & (pl.col("_row") == 3)).row(0, named=True)
    assert event["query"] == ints(query["query"])
    assert (event["sku"], event["category"], event["price"], event["name"], event["url"]) == (None,) * 5
    searches = events.filter(pl.col("event_type") == "search_query")["query"]
    assert searches.null_count() == 0 and (searches.list.len() == 16).all()
    assert searches.list.min().min() >= 0 and searches.list.max().max() <= 255
    visit = pl.read_parquet(folder / "page_visit.parquet").row(0, named=True)
    event = events.filter(pl.col("_file").str.ends_with("page_visit.parquet") & (pl.col("_row") == 1)).row(0, named=True)
    assert event["url"] == str(visit["url"]) and event["sku"] is None and event["query"] is None


def test_relevant_clients(layout, events, copy):
    folder, counts = layout
    source = recsys2025.load(folder)
    ids = np.load(folder / "input" / "relevant_clients.npy")
    assert ids.dtype == np.int64 and len(ids) == counts["relevant_clients"]
    assert source.relevant_users == [str(i) for i in ids]
    assert set(source.relevant_users) <= set(events["user_id"].to_list())
    assert [p.name for p in recsys2025.files(folder)][-1] == "relevant_clients.npy"
    (copy / "input" / "relevant_clients.npy").unlink()
    assert recsys2025.load(copy).relevant_users is None and len(recsys2025.files(copy)) == 6


def test_preprocessing_keeps_the_relevant_clients(copy, tmp_path):
    """The submission's client list lives in the cache (meta.json), so exporting never re-reads the source."""
    from datamodules.config import DataConfig
    from datamodules.preprocess import prepare

    cfg = DataConfig(source="recsys2025", path=str(copy), cache_dir=str(tmp_path / "cache"))
    relevant = recsys2025.read_relevant(copy / "input" / "relevant_clients.npy")
    built, cached = prepare(cfg), prepare(cfg)
    assert cached.path == built.path and len(relevant) > 0
    assert built.meta["relevant_users"] == cached.meta["relevant_users"] == relevant
    (copy / "input" / "relevant_clients.npy").unlink()
    without = prepare(cfg)
    assert without.path != built.path and without.meta["relevant_users"] is None


def test_event_types_keep_one_kind_of_history_and_new_data_follows(copy, events, tmp_path):
    """data.event_types filters the history before the last-max_len cut; embedding new events applies the same filter."""
    from datamodules.config import DataConfig
    from datamodules.encode import encode_events, state_of
    from datamodules.preprocess import prepare

    cfg = DataConfig(source="recsys2025", path=str(copy), cache_dir=str(tmp_path / "cache"), max_len=8, event_types=["search_query"])
    prepared = prepare(cfg)
    searchers = events.filter(pl.col("event_type") == "search_query")["user_id"].unique()
    assert sorted(prepared.store.user_ids.tolist()) == sorted(searchers.to_list())
    types = prepared.meta["vocabs"]["event_type"]
    kept = {types[int(i) - FIRST_ID] for i in prepared.store.tokens["event_type"]}
    assert kept == {"search_query"}
    assert prepared.meta["counts"]["history_events_of_other_types"] > 0
    frame, counts, _ = encode_events(recsys2025.load(copy).events.collect(), state_of(prepared.meta))
    assert frame["user_id"].sort().to_list() == sorted(searchers.to_list())
    with pytest.raises(DataError, match=r"data.event_types: \['serach_query'\] never occur"):
        prepare(dataclasses.replace(cfg, event_types=["serach_query"]))


def test_datetime_timestamps_and_list_queries_are_accepted(copy, events):
    path = copy / "search_query.parquet"
    frame = pl.read_parquet(path)
    frame.with_columns(
        pl.col("timestamp").str.to_datetime("%Y-%m-%d %H:%M:%S"),
        pl.col("query").str.strip_chars("[]").str.split(" ").cast(pl.List(pl.Int32)),
    ).write_parquet(path)
    again = recsys2025.load(copy).events.collect().filter(pl.col("event_type") == "search_query").drop("_file")
    assert again.equals(events.filter(pl.col("event_type") == "search_query").drop("_file"))


def test_generator_is_deterministic(layout, tmp_path):
    folder, _ = layout
    same, other = tmp_path / "same", tmp_path / "other"
    generate_recsys2025(same, seed=0, **SMALL)
    generate_recsys2025(other, seed=1, **SMALL)
    for table in (*EVENT_TABLES, "product_properties"):
        assert pl.read_parquet(same / f"{table}.parquet").equals(pl.read_parquet(folder / f"{table}.parquet"))
    assert np.array_equal(np.load(same / "input" / "relevant_clients.npy"), np.load(folder / "input" / "relevant_clients.npy"))
    assert not pl.read_parquet(other / "product_buy.parquet").equals(pl.read_parquet(folder / "product_buy.parquet"))


def top_share(products: pl.DataFrame, k: int = 6) -> float:
    """Mean over clients with 10+ product events of the share of their k most frequent categories."""
    per = products.group_by("user_id", "category").len().sort("len", descending=True)
    tops = per.group_by("user_id").agg(pl.col("len").head(k).sum().alias("top"), pl.col("len").sum().alias("n"))
    return float(tops.filter(pl.col("n") >= 10).select((pl.col("top") / pl.col("n")).mean()).item())


def test_planted_structure(events):
    products = events.filter(pl.col("sku").is_not_null())
    shuffled = products.with_columns(pl.col("category").shuffle(seed=0))
    assert top_share(products) > top_share(shuffled) + 0.25  # clients stick to their archetype's categories

    catalogue = products.unique("sku")
    names, cats = np.stack(catalogue["name"].to_list()), catalogue["category"].to_numpy()
    within = np.mean([names[cats == c].std(axis=0).mean() for c in np.unique(cats) if (cats == c).sum() > 1])
    assert within < 0.3 * names.std(axis=0).mean()  # names' codes follow the category

    by_user = {}
    for table, column in (("search_query", "query"), ("product", "name")):
        rows = events.filter(pl.col(column).is_not_null())
        users = rows["user_id"].to_numpy()
        codes = np.stack(rows[column].to_list()).astype(float)
        order = np.unique(users)
        by_user[table] = {u: codes[users == u].mean(axis=0) for u in order}
    both = sorted(set(by_user["search_query"]) & set(by_user["product"]))
    q = np.stack([by_user["search_query"][u] for u in both])
    n = np.stack([by_user["product"][u] for u in both])
    own = np.abs(q - n).mean()
    others = np.abs(q - np.roll(n, 1, axis=0)).mean()
    assert own < 0.8 * others  # searches look like the names of what the client buys

    end = events["time"].max()
    days = (pl.lit(end) - pl.col("time")).dt.total_days()
    per_user = events.group_by("user_id").agg((days >= 60).sum().alias("early"), (days < 14).sum().alias("late"))
    assert per_user.filter((pl.col("early") >= 20) & (pl.col("late") == 0)).height >= 5  # churners go quiet


def test_cli_writes_the_layout(tmp_path, capsys):
    main(["recsys2025", "--clients", "30", "--out", str(tmp_path), "--seed", "3", "--days", "90", "--skus", "300", "--urls", "50"])
    printed = capsys.readouterr().out
    assert "events/s" in printed and "product_buy" in printed
    assert len(recsys2025.files(tmp_path)) == 7
    times = recsys2025.load(tmp_path).events.select(pl.col("time").max() - pl.col("time").min()).collect().item()
    assert 60 < times.days < 90
    with pytest.raises(SystemExit) as exit_info:
        main(["recsys2025", "--help"])
    assert exit_info.value.code == 0 and "--clients" in capsys.readouterr().out


def test_missing_table(copy):
    (copy / "page_visit.parquet").unlink()
    for call in (recsys2025.files, recsys2025.load):
        with pytest.raises(DataError, match=r"page_visit\.parquet: file not found"):
            call(copy)


@pytest.mark.parametrize(
    "raw",
    ["[1 2 x]", "[" + " ".join(["7"] * 15) + "]", "[" + " ".join(["7"] * 15 + ["300"]) + "]", "[]", "[1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 -1]"],
    ids=["not-int", "15-ints", "value-300", "empty", "negative"],
)
def test_malformed_query(copy, raw):
    set_value(copy / "search_query.parquet", "query", 3, raw)
    with pytest.raises(DataError) as err:
        recsys2025.load(copy)
    message = str(err.value)
    assert "search_query.parquet" in message and "'query'" in message and "row 3:" in message and repr(raw) in message


@pytest.mark.parametrize("raw", ["[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]", "[ 1  2 3 4 5 6 7 8 9 10 11 12 13 14 15\t16 ]"], ids=["commas", "blank-runs"])
def test_query_with_other_separators(copy, raw):
    """The fast path splits on single spaces; other separators take the general parse and give the same codes."""
    set_value(copy / "search_query.parquet", "query", 3, raw)
    events = recsys2025.load(copy).events.collect()
    row = events.filter((pl.col("event_type") == "search_query") & (pl.col("_row") == 3))
    assert row["query"].to_list() == [list(range(1, 17))]


def test_malformed_name(copy):
    set_value(copy / "product_properties.parquet", "name", 2, "[1 2 3]")
    with pytest.raises(DataError, match=r"product_properties\.parquet: column 'name', row 2: .*'\[1 2 3\]'"):
        recsys2025.load(copy)


def test_sku_missing_from_properties(copy):
    set_value(copy / "product_buy.parquet", "sku", 2, 987654321)
    with pytest.raises(DataError, match=r"product_buy\.parquet: column 'sku', row 2: sku 987654321 is not in product_properties"):
        recsys2025.load(copy)


def test_sku_listed_twice_in_properties(copy):
    path = copy / "product_properties.parquet"
    first = pl.read_parquet(path)["sku"][0]
    set_value(path, "sku", 5, first)
    with pytest.raises(DataError, match=rf"product_properties\.parquet: column 'sku', row 5: sku {first} is listed more than once"):
        recsys2025.load(copy)


def test_duplicate_relevant_clients(copy):
    path = copy / "input" / "relevant_clients.npy"
    np.save(path, np.array([11, 42, 7, 42], dtype=np.int64))
    with pytest.raises(DataError, match=r"relevant_clients\.npy: client id 42 appears more than once \(positions 1 and 3\)"):
        recsys2025.load(copy)


@pytest.mark.parametrize(("table", "column", "row"), [("add_to_cart", "client_id", 4), ("page_visit", "timestamp", 6)])
def test_null_client_or_time(copy, table, column, row):
    set_value(copy / f"{table}.parquet", column, row, None)
    with pytest.raises(DataError, match=rf"{table}\.parquet: column '{column}', row {row}: null"):
        recsys2025.load(copy)


def test_bad_timestamp(copy):
    set_value(copy / "remove_from_cart.parquet", "timestamp", 7, "2022-13-01 00:00:00")
    with pytest.raises(DataError, match=r"remove_from_cart\.parquet: column 'timestamp', row 7: cannot parse time '2022-13-01 00:00:00'"):
        recsys2025.load(copy)


def test_write_submission(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 8)).astype(np.float32)
    ids_path, emb_path = recsys2025.write_submission(tmp_path, ["30", "10", "20"], emb)
    ids, saved = np.load(ids_path), np.load(emb_path)
    assert ids.dtype == np.int64 and ids.tolist() == [30, 10, 20]
    assert saved.dtype == np.float16 and saved.shape == (3, 8) and np.allclose(saved, emb, atol=1e-2)
    recsys2025.write_submission(tmp_path, [1, 2], np.ones((2, 2048)))  # overwrites in place
    assert np.load(ids_path).tolist() == [1, 2] and np.load(emb_path).shape == (2, 2048)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client_ids.npy", "embeddings.npy"]  # no temp files left


@pytest.mark.parametrize(
    ("ids", "emb", "message"),
    [
        ([1, 2, 1], np.zeros((3, 4)), "duplicate client ids, e.g. 1"),
        ([1, 2], np.zeros((2, 2049)), "2049 columns"),
        ([1, 2], np.array([[0.0, np.nan], [1.0, 2.0]]), "finite"),
        ([1, 2], np.array([[0.0, 1e6], [1.0, 2.0]]), "overflow float16"),
        ([1, 2, 3], np.zeros((2, 4)), r"shape \(3, dim\)"),
        (["a", "b"], np.zeros((2, 4)), "integers"),
    ],
    ids=["duplicates", "too-wide", "nan", "float16-overflow", "rows", "not-ints"],
)
def test_write_submission_refuses(tmp_path, ids, emb, message):
    with pytest.raises(ValueError, match=message):
        recsys2025.write_submission(tmp_path / "out", ids, emb)
    assert not (tmp_path / "out").exists()
