"""Handcrafted features over each user's whole pre-cutoff history ("Encode Me If You Can"'s feature block).

Computed while preprocessing, from the deduplicated history events before the last-max_len
cut, so a user with 300 events counts 300, not 128; events at or after the cutoff are not
history and never count. Windows are relative to the cutoff (without one: the last history
event of the data), the same reference for every user. The result is one row per user
with history, in the cache's user order, cached as features.parquet.

Columns (names are the column names):
  count/<type>/<N>d, count/<type>/all  events of each type (and `all`) in the last N days, whole history
  wow/<type>                           log1p(last 7 days) - log1p(the 7 days before): week-over-week change
  recency_days, span_days, active_days, mean_gap_days (span / (events - 1); one event: reference - that event)
  <mean|std|q10|q50|q90>/<field>/<scope>  each numeric or amount field over all events, and over bought and
                                       carted events when data.features names buy and cart (0 when none)
  cart_abandoned, cart_abandonment     carts with no later buy of the same item: count and share of carts
  hist/<field>/<id>                    category mix: share of events with each id (1..V-1) of small vocabularies
  distinct/<field>                     larger vocabularies: distinct values / events
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import polars as pl

from datamodules.config import FeaturesConfig
from datamodules.schema import FIRST_ID, MISSING, PAD, RARE, EventSchema
from datamodules.sources.base import DataError

MAX_HIST_VOCAB = 64  # a categorical field with at most this many ids (reserved ones included) gets a histogram
MAX_EVENT_TYPES = 32  # more types than this: counts of all events only
QUANTILES = (0.1, 0.5, 0.9)
SECONDS_PER_DAY = 86_400


def check_features_config(cfg: FeaturesConfig, schema: EventSchema, types: list[str], kept_types: list[str] | None) -> FeaturesConfig:
    """data.features must name fields and event types of this data: a typo would otherwise drop features silently.

    Returns the config that applies: when data.event_types (`kept_types`) leaves out the buy
    or cart type (a block that reads searches only), bought/carted statistics and cart
    abandonment are dropped, not refused: the preset's data section stays shared.
    """
    names = {f.name: f.kind for f in schema.fields}
    for name in cfg.amounts:
        if names.get(name) != "categorical":
            raise DataError(f"data.features.amounts: {name!r} is not a categorical field of this data (numeric fields are always included); fields are {sorted(names)}")
    if cfg.item is not None and cfg.item not in names:
        raise DataError(f"data.features.item: {cfg.item!r} is not a field of this data; fields are {sorted(names)}")
    if (cfg.cart is None) != (cfg.buy is None) or (cfg.cart is not None and cfg.item is None):
        raise DataError("data.features: cart abandonment needs buy, cart and item together (or none of them)")
    if any(w < 1 for w in cfg.windows_days):
        raise DataError(f"data.features.windows_days: {cfg.windows_days} must be whole days >= 1")
    if kept_types and any(getattr(cfg, key) not in kept_types for key in ("buy", "cart") if getattr(cfg, key) is not None):
        return dataclasses.replace(cfg, buy=None, cart=None, item=None)
    for key in ("buy", "cart"):
        value = getattr(cfg, key)
        if value is not None and value not in types:
            raise DataError(f"data.features.{key}: {value!r} is not an event type seen in training history; types are {types}")
    return cfg


def amounts_of(history: pl.LazyFrame, name: str) -> pl.Expr:
    """An amount field's raw values as floats; a value that is not a number is an error naming file, column and row."""
    value = pl.col(name).cast(pl.String).cast(pl.Float64, strict=False)
    bad = history.filter(value.is_null() & pl.col(name).is_not_null()).select("_file", "_row", pl.col(name).cast(pl.String)).head(1).collect()
    if bad.height:
        file, row, raw = bad.row(0)
        raise DataError(f"{file}: column {name!r}, row {row}: data.features.amounts needs numbers, got {raw!r}")
    return value


def history_features(
    history: pl.LazyFrame, schema: EventSchema, vocabs: dict[str, list], cfg: FeaturesConfig, reference: dt.datetime | None, kept_types: list[str] | None = None
) -> pl.DataFrame:
    """[users with history] x (user_id + float features), in `_user` order (the cache's user order).

    `history` holds the deduplicated history events with columns `_user`, user_id, time,
    `_file`, `_row` and the schema's fields; `vocabs` is the fitted state (event types and
    histogram ids come from the training users, like the models'); `reference` is the cutoff;
    `kept_types` is data.event_types (the history holds only those types).
    """
    if reference is None:
        reference = history.select(pl.col("time").max()).collect().item()
    type_field = schema.event_type
    types = [str(v) for v in vocabs[type_field]] if type_field and len(vocabs[type_field]) <= MAX_EVENT_TYPES else []
    cfg = check_features_config(cfg, schema, types if type_field else [], kept_types)
    age = (pl.lit(reference) - pl.col("time")).dt.total_microseconds() / (SECONDS_PER_DAY * 1e6)
    kind = pl.col(type_field).cast(pl.String) if type_field else None
    every = pl.col("time").is_not_null()  # a column of true (a literal would count once per user)
    scopes = {"all": every} | {t: kind == t for t in types}

    aggs: list[pl.Expr] = []
    for name, scope in scopes.items():
        aggs += [(scope & (age < w)).sum().alias(f"count/{name}/{w}d") for w in cfg.windows_days]
        aggs.append(scope.sum().alias(f"count/{name}/all"))
        week, before = (scope & (age < 7)).sum(), (scope & (age >= 7) & (age < 14)).sum()
        aggs.append((week.cast(pl.Float64).log1p() - before.cast(pl.Float64).log1p()).alias(f"wow/{name}"))
    first, last, n = age.max(), age.min(), pl.len()
    aggs += [
        last.alias("recency_days"),
        (first - last).alias("span_days"),
        pl.col("time").dt.date().n_unique().alias("active_days"),
        pl.when(n > 1).then((first - last) / (n - 1)).otherwise(first).alias("mean_gap_days"),
    ]

    values = {f.name: pl.col(f.name).cast(pl.Float64) for f in schema.of_kind("numeric")}
    values |= {name: amounts_of(history, name) for name in cfg.amounts}
    value_scopes = {"all": every} | {k: kind == getattr(cfg, k) for k in ("buy", "cart") if getattr(cfg, k) is not None}
    for name, value in values.items():
        for scope_name, scope in value_scopes.items():
            v = value.filter(scope & value.is_finite())
            aggs += [v.mean().alias(f"mean/{name}/{scope_name}"), v.std(ddof=0).alias(f"std/{name}/{scope_name}")]
            aggs += [v.quantile(q, "linear").alias(f"q{round(q * 100)}/{name}/{scope_name}") for q in QUANTILES]

    for f in schema.of_kind("categorical"):
        vocab = vocabs[f.name]
        if FIRST_ID + len(vocab) <= MAX_HIST_VOCAB:
            ids = pl.col(f.name).replace_strict(vocab, range(FIRST_ID, FIRST_ID + len(vocab)), default=RARE, return_dtype=pl.Int32)
            ids = pl.when(pl.col(f.name).is_null()).then(MISSING).otherwise(ids)
            aggs += [(ids == i).mean().alias(f"hist/{f.name}/{i}") for i in range(PAD + 1, FIRST_ID + len(vocab))]
        else:
            aggs.append((pl.col(f.name).drop_nulls().n_unique() / n).alias(f"distinct/{f.name}"))

    out = history.group_by("_user").agg(pl.col("user_id").first(), *aggs)
    if cfg.cart is not None:
        out = out.join(cart_abandonment(history, kind, cfg), on="_user", how="left")
    out = out.sort("_user").drop("_user").collect()
    features = out.drop("user_id")
    features = features.with_columns(pl.all().cast(pl.Float64).fill_nan(0.0).fill_null(0.0))
    return pl.concat([out.select("user_id"), features], how="horizontal")


def cart_abandonment(history: pl.LazyFrame, kind: pl.Expr, cfg: FeaturesConfig) -> pl.LazyFrame:
    """Per user: carts with no buy of the same item at or after them (before the cutoff), count and share of carts."""
    item = pl.col(cfg.item)
    buys = history.filter(kind == cfg.buy).group_by("_user", item).agg(pl.col("time").max().alias("_last_buy"))
    carts = history.filter((kind == cfg.cart) & item.is_not_null()).select("_user", item, "time")
    joined = carts.join(buys, on=["_user", cfg.item], how="left")
    abandoned = pl.col("_last_buy").is_null() | (pl.col("_last_buy") < pl.col("time"))
    return joined.group_by("_user").agg(abandoned.sum().alias("cart_abandoned"), abandoned.mean().alias("cart_abandonment"))
