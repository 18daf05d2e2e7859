"""The yardstick: the recsys2025 source + preprocessing steps written the straightforward pandas way.

Same steps and same output as `datamodules.sources.recsys2025.load` + `datamodules.preprocess.build`
(without targets): read and check the tables, join product properties, parse the code strings,
drop exact duplicates, cut history 14 days before the end, choose val users by the seeded
hash, fit vocabularies on training users, encode, day/week indexes, sort by (user, time; ties in
the tables' order, then row), keep the last `max_len` events, one row per user with list columns (groupby + list).
It exists only to be measured against; nothing else imports it.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd

TABLES = ("product_buy", "add_to_cart", "remove_from_cart", "page_visit", "search_query")
PRODUCT = ("product_buy", "add_to_cart", "remove_from_cart")
CATEGORICAL = ("event_type", "sku", "url", "category", "price")
FIELD_TOP_K = {"sku": 5000, "url": 5000}
MISSING, RARE, FIRST_ID, CODE_LENGTH = 1, 2, 5, 16


def parse_codes(raw: pd.Series, where: str) -> pd.Series:
    """'[a b ... p]' strings -> lists of 16 ints in 0-255 (None stays None)."""
    def one(s: str | None) -> list[int] | None:
        if s is None:
            return None
        codes = [int(x) for x in s.strip(" []").replace(",", " ").split()]
        if len(codes) != CODE_LENGTH or min(codes) < 0 or max(codes) > 255:
            raise ValueError(f"{where}: expected {CODE_LENGTH} integers in 0-255, got {s!r}")
        return codes

    return raw.map(one)


def read_table(folder: Path, table: str, properties: pd.DataFrame) -> pd.DataFrame:
    path = folder / f"{table}.parquet"
    df = pd.read_parquet(path)
    for col in ("client_id", "timestamp"):
        if df[col].isna().any():
            raise ValueError(f"{path}: column {col!r}: null {col}")
    out = pd.DataFrame(
        {
            "_row": np.arange(1, len(df) + 1),
            "_file": str(path),
            "user_id": df["client_id"].astype(str),
            "time": pd.to_datetime(df["timestamp"], format="%Y-%m-%d %H:%M:%S"),
            "event_type": table,
        }
    )
    out["sku"] = out["url"] = out["category"] = out["price"] = out["name"] = out["query"] = out["query_raw"] = None
    if table in PRODUCT:
        joined = df[["sku"]].merge(properties, on="sku", how="left", validate="many_to_one")
        if joined["category"].isna().any():
            raise ValueError(f"{path}: column 'sku': sku {df['sku'][joined['category'].isna()].iloc[0]} is not in product_properties")
        out["sku"] = df["sku"].astype(str)
        out["category"] = joined["category"].to_numpy()
        out["price"] = joined["price"].to_numpy()
        out["name"] = joined["name"].to_numpy()
    elif table == "page_visit":
        out["url"] = df["url"].astype(str)
    else:
        out["query"] = parse_codes(df["query"], f"{path}: column 'query'")
        out["query_raw"] = df["query"]
    return out


def prepare(folder: str | Path, out_file: str | Path, seed: int = 0, max_len: int = 128, top_k: int = 1000, val_fraction: float = 0.1, days_before_end: int = 14) -> int:
    """Raw layout -> one row per user with list columns, written to `out_file` (parquet); returns the user count."""
    folder = Path(folder)
    props = pd.read_parquet(folder / "product_properties.parquet")
    if props["sku"].duplicated().any():
        raise ValueError(f"{folder}/product_properties.parquet: an sku is listed more than once")
    props = pd.DataFrame(
        {"sku": props["sku"], "category": props["category"].astype(str), "price": props["price"].astype(str), "name": parse_codes(props["name"], "name")}
    )
    events = pd.concat([read_table(folder, t, props) for t in TABLES], ignore_index=True)

    # name is a function of sku and query of query_raw, so these columns identify an event.
    events = events.drop_duplicates(subset=["user_id", "time", "event_type", "sku", "url", "category", "price", "query_raw"], keep="first")
    cutoff = events["time"].max() - pd.Timedelta(days=days_before_end)
    history = events[events["time"] < cutoff]

    users = np.sort(history["user_id"].unique())
    threshold = int(val_fraction * 2**32)
    val_users = {u for u in users if zlib.crc32(f"{seed}:{u}".encode()) < threshold}
    train = history[~history["user_id"].isin(val_users)]

    out = history[["user_id", "_file", "_row"]].copy()
    out["time"] = (history["time"] - pd.Timestamp(0)) // pd.Timedelta(seconds=1)
    for f in CATEGORICAL:
        counts = train[f].dropna().value_counts().rename_axis("value").reset_index(name="n")
        vocab = counts.sort_values(["n", "value"], ascending=[False, True]).head(min(FIELD_TOP_K.get(f, top_k), top_k))["value"]
        ids = dict(zip(vocab, range(FIRST_ID, FIRST_ID + len(vocab))))
        out[f"tok_{f}"] = history[f].map(ids).fillna(RARE).where(history[f].notna(), MISSING).astype("int32")
    for f in ("name", "query"):
        out[f"cod_{f}"] = history[f].map(lambda c: [x + FIRST_ID for x in c] if c is not None else [MISSING] * CODE_LENGTH)
    day = (history["time"] - history["time"].min()).dt.days
    out["tok_day"] = (day + FIRST_ID).astype("int32")
    out["tok_week"] = (day // 7 + FIRST_ID).astype("int32")

    out = out.assign(_t=history["time"], _seq=history.index).sort_values(["user_id", "_t", "_seq"])  # _seq: position in the concatenated tables
    out = out[out.groupby("user_id").cumcount(ascending=False) < max_len]
    columns = ["time", *[f"tok_{f}" for f in CATEGORICAL], "cod_name", "cod_query", "tok_day", "tok_week"]
    frame = out.groupby("user_id", sort=True)[columns].agg(list).reset_index()
    frame.to_parquet(out_file, index=False)
    return len(frame)
