"""Synthetic data in real layouts, with planted structure so that targets are learnable.

    python -m datamodules.synthetic recsys2025 --clients 100000 --out /tmp/rs25 [--seed 0] [--days 120] [--targets] [--split]
    python -m datamodules.synthetic uqabench --users 2000 --out /tmp/uqa [--seed 0] [--items 3000] [--flat-ids]

recsys2025 writes the official RecSys Challenge 2025 layout (see datamodules/sources/recsys2025.py)
with this planted structure, so a good user embedding has something to find:
- 8 client archetypes, each with 6 preferred categories, a price level (where in a
  category's price range it buys) and a pool of typical urls; each client also has one
  personal favourite category among its archetype's;
- product names' codes are noise around a per-category centroid, and search queries' codes
  are noise around the centroid of a category the client likes;
- activity is heavy-tailed (lognormal rates) with a per-client mix of event types; some
  clients join late; 30% are churners whose activity decays and stops 7-56 days before the
  end, so with the default 120 days the last 14 days work as a churn / propensity window.
The ground truth is not written (the layout stays exactly the official one). With --targets the
organisers' target/ files are written too, computed as they describe them from the provided
events: active_clients.npy (relevant clients with >= 1 product_buy), propensity_{category,sku}.npy
(the 100 most bought values) and popularity_propensity_{category,sku}.npy (each one's share of buys).
With --split, also what the organisers' data_utils/split_data.py writes: input/<table>.parquet (events
before the first target window) and target/{train,validation}_target.parquet (purchases of the two
14-day windows, properties joined).
Everything is vectorised numpy (no per-event Python loop) and deterministic given the seed.

uqabench writes UQABench's Arrow files (see datamodules/sources/uqabench.py and `generate_uqabench`):
users of 8 archetypes with preferred categories, a favourite category that changes for the last third
of each sequence (interest drift), items drawn by popularity within a category (so they repeat), and
align files whose questions (last item's category, most frequent category) carry 4 candidates.
Its token lists are built per interaction in Python: meant for small files. Deterministic given the seed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import polars as pl

EVENT_TABLES = ("product_buy", "add_to_cart", "remove_from_cart", "page_visit", "search_query")
EVENT_MIX = np.array([0.10, 0.20, 0.07, 0.50, 0.13])  # mean share of each table in a client's events
START = np.datetime64("2022-06-01T00:00:00", "s").astype(np.int64)  # epoch seconds of day 0
ARCHETYPES, PREFERRED, URL_POOL, CODE_LENGTH = 8, 6, 40, 16
CHURN_RATE = 0.3
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def generate_recsys2025(
    out_dir: str | Path,
    clients: int,
    seed: int = 0,
    days: int = 120,
    skus: int = 20000,
    urls: int = 50000,
    events_per_client: float = 100.0,
    targets: bool = False,
    split: bool = False,
) -> dict[str, int]:
    """Write the layout into out_dir (targets: also the organisers' target/ files); returns the rows written per file."""
    if clients < 1 or days < 60 or skus < 1 or urls < 1 or events_per_client <= 0:
        raise ValueError("generate_recsys2025: need clients >= 1, days >= 60, skus >= 1, urls >= 1, events_per_client > 0")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    (out / "input").mkdir(parents=True, exist_ok=True)

    # Products: category, price bucket near the category's level, name codes near the category centroid.
    n_cat = min(skus, max(2 * PREFERRED + 4, skus // 50))
    cat_of = rng.permutation(np.arange(skus) % n_cat)  # every category has a product
    cat_price = rng.uniform(10, 90, n_cat)
    price = np.clip(np.rint(cat_price[cat_of] + rng.normal(0, 10, skus)), 0, 99).astype(np.int64)
    order = np.lexsort((price, cat_of))  # position j: j-th product sorted by (category, price)
    cat_of, price = cat_of[order], price[order]
    cat_start = np.searchsorted(cat_of, np.arange(n_cat))
    cat_count = np.bincount(cat_of, minlength=n_cat)
    sku_ids = rng.permutation(skus).astype(np.int64)  # the id of position j, unrelated to category
    centroid = rng.integers(0, 256, (n_cat, CODE_LENGTH))
    names = noisy_codes(rng, centroid[cat_of], 12)
    cat_pop = zipf(n_cat, 0.8)[rng.permutation(n_cat)]

    # Clients: archetype, favourite categories, price level, activity, churn.
    client_ids = np.sort(rng.choice(np.int64(clients) * 10, size=clients, replace=False)).astype(np.int64)
    arch = rng.integers(0, ARCHETYPES, clients)
    arch_cats = np.stack([rng.choice(n_cat, PREFERRED, replace=False) for _ in range(ARCHETYPES)])
    arch_price = rng.uniform(0.1, 0.9, ARCHETYPES)
    arch_urls = rng.integers(0, urls, (ARCHETYPES, URL_POOL))
    favourite = arch_cats[arch, rng.integers(0, PREFERRED, clients)]
    start = np.where(rng.random(clients) < 0.2, rng.uniform(0, 0.6 * days, clients), 0.0)
    churner = rng.random(clients) < CHURN_RATE
    start[churner] = 0.0
    stop = np.where(churner, rng.uniform(days - 56, days - 7, clients), float(days))
    rate = events_per_client * rng.lognormal(-0.5, 1.0, clients) * (stop - start) / days
    n_events = rng.multinomial(rng.poisson(rate), rng.dirichlet(20 * EVENT_MIX, clients))  # [clients, tables]

    counts: dict[str, int] = {}
    url_pop = zipf(urls, 1.1)
    for t, table in enumerate(EVENT_TABLES):
        who = np.repeat(np.arange(clients), n_events[:, t])
        u = rng.random(who.size)
        # Churners' density falls linearly to zero at their stop day; the rest is uniform.
        frac = np.where(churner[who], 1 - np.sqrt(1 - u), u)
        seconds = START + ((start[who] + frac * (stop[who] - start[who])) * 86400).astype(np.int64)
        if table == "page_visit":
            typical = arch_urls[arch[who], rng.choice(URL_POOL, who.size, p=zipf(URL_POOL, 1.0))]
            value = np.where(rng.random(who.size) < 0.6, typical, rng.choice(urls, who.size, p=url_pop)).astype(np.int64)
        else:
            cat = liked_category(rng, who, favourite, arch, arch_cats, cat_pop)
            if table == "search_query":
                value = noisy_codes(rng, centroid[cat], 20)
                scramble = rng.random(who.size) < 0.15
                value[scramble] = rng.integers(0, 256, (int(scramble.sum()), CODE_LENGTH))
            else:
                level = np.clip(arch_price[arch[who]] + rng.normal(0, 0.15, who.size), 0, 0.999)
                value = sku_ids[cat_start[cat] + (level * cat_count[cat]).astype(np.int64)]
        by_time = np.argsort(seconds, kind="stable")
        column = {"product_buy": "sku", "add_to_cart": "sku", "remove_from_cart": "sku", "page_visit": "url", "search_query": "query"}[table]
        frame = pl.DataFrame(
            {
                "client_id": client_ids[who[by_time]],
                "timestamp": pl.from_epoch(pl.Series(seconds[by_time]), time_unit="s").dt.strftime("%Y-%m-%d %H:%M:%S"),
                column: codes_to_strings(value[by_time]) if table == "search_query" else value[by_time],
            }
        )
        frame.write_parquet(out / f"{table}.parquet")
        counts[table] = frame.height

    pl.DataFrame(
        {"sku": sku_ids, "category": cat_of.astype(np.int64), "price": price, "name": codes_to_strings(names)}
    ).sort("sku").write_parquet(out / "product_properties.parquet")
    counts["product_properties"] = skus
    # Like the challenge's relevant clients: everyone with product activity (buy, add or remove).
    relevant = client_ids[n_events[:, :3].sum(axis=1) > 0]
    np.save(out / "input" / "relevant_clients.npy", relevant)
    counts["relevant_clients"] = int(relevant.size)
    if targets:
        counts.update(write_target_files(out, relevant))
    if split:
        counts.update(write_split_layout(out))
    return counts


def write_split_layout(out: Path, days_in_target: int = 14) -> dict[str, int]:
    """input/ and target/ as data_utils/split_data.py: the end is the last purchase, windows are whole days."""
    buys = pl.read_parquet(out / "product_buy.parquet").with_columns(pl.col("timestamp").str.to_datetime(TIME_FORMAT).alias("_t"))
    end = buys["_t"].max()
    first = (end - dt.timedelta(days=2 * days_in_target - 1)).replace(hour=0, minute=0, second=0)
    second = first + dt.timedelta(days=days_in_target)
    for table in EVENT_TABLES:
        frame = pl.read_parquet(out / f"{table}.parquet")
        frame.filter(pl.col("timestamp").str.to_datetime(TIME_FORMAT) < first).write_parquet(out / "input" / f"{table}.parquet")
    joined = buys.join(pl.read_parquet(out / "product_properties.parquet"), on="sku", how="left")
    (out / "target").mkdir(exist_ok=True)
    counts = {}
    for name, keep in (("train_target", pl.col("_t").is_between(first, second, closed="left")), ("validation_target", pl.col("_t").is_between(second, end))):
        part = joined.filter(keep).drop("_t")
        part.write_parquet(out / "target" / f"{name}.parquet")
        counts[name] = part.height
    return counts


def write_target_files(out: Path, relevant: np.ndarray, n_classes: int = 100) -> dict[str, int]:
    """target/active_clients.npy, propensity_{category,sku}.npy and their popularity, from the events in `out`."""
    buys = pl.read_parquet(out / "product_buy.parquet").join(pl.read_parquet(out / "product_properties.parquet"), on="sku")
    (out / "target").mkdir(exist_ok=True)
    active = relevant[np.isin(relevant, buys["client_id"].to_numpy())]
    np.save(out / "target" / "active_clients.npy", active)
    counts = {"active_clients": int(active.size)}
    for field in ("category", "sku"):
        top = buys.group_by(field).len().sort(["len", field], descending=[True, False]).head(n_classes)
        np.save(out / "target" / f"propensity_{field}.npy", top[field].to_numpy().astype(np.int64))
        np.save(out / "target" / f"popularity_propensity_{field}.npy", (top["len"] / buys.height).to_numpy())
        counts[f"propensity_{field}"] = top.height
    return counts


def zipf(n: int, exponent: float) -> np.ndarray:
    """Probabilities of a Zipf law over n ranks: a few popular values, a long tail."""
    p = 1.0 / np.arange(1, n + 1) ** exponent
    return p / p.sum()


def noisy_codes(rng: np.random.Generator, centre: np.ndarray, spread: int) -> np.ndarray:
    return np.clip(centre + rng.integers(-spread, spread + 1, centre.shape), 0, 255)


def liked_category(rng: np.random.Generator, who: np.ndarray, favourite: np.ndarray, arch: np.ndarray, arch_cats: np.ndarray, cat_pop: np.ndarray) -> np.ndarray:
    """Per event: the client's favourite (45%), another of its archetype's (35%), or any by popularity (20%)."""
    r = rng.random(who.size)
    of_archetype = arch_cats[arch[who], rng.integers(0, PREFERRED, who.size)]
    anywhere = rng.choice(cat_pop.size, who.size, p=cat_pop)
    return np.where(r < 0.45, favourite[who], np.where(r < 0.8, of_archetype, anywhere))


def codes_to_strings(codes: np.ndarray) -> pl.Series:
    """[n, 16] ints -> the challenge's "[a b ... p]" strings, formatted by Polars (no Python loop)."""
    array = pl.Series(codes.astype(np.int64)).cast(pl.Array(pl.String, codes.shape[1]))
    return pl.select(pl.concat_str([pl.lit("["), pl.lit(array).arr.join(" "), pl.lit("]")])).to_series()


UQA_ARCHETYPES, UQA_PREFERRED, UQA_CANDIDATES = 8, 4, 4
TEXT_COLUMN = "text"  # the align files' JSON chat
BPE_VOCAB = 151936  # Qwen2.5's vocabulary, as UQABench's token ids


def generate_uqabench(
    out_dir: str | Path, users: int, seed: int = 0, items: int = 3000, mean_length: float = 30.0, flat_ids: bool = False
) -> dict[str, int]:
    """Write UQABench's Arrow layout into out_dir (see datamodules/sources/uqabench.py); returns the rows written per file.

    pretrain_data_{train,eval}.arrow: one row per user (9:1); align_data_{train,eval}.arrow: the same users'
    rows again, one per question, with `text` (JSON chat; the question ends with a `Candidates: a | b | c | d`
    line that holds the answer). Id columns hold a one-id list per interaction as the benchmark's loader reads
    them; flat_ids: a bare id per interaction instead.
    """
    if users < 1 or items < 50 or mean_length < 5:
        raise ValueError("generate_uqabench: need users >= 1, items >= 50, mean_length >= 5")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Items: category (popular ones have more items), a brand of that category, a shop, the shop's seller; ids look hashed.
    n_cat, n_shop = max(3 * UQA_PREFERRED, items // 100), max(10, items // 50)
    cat_of = np.sort(np.concatenate([np.arange(n_cat), rng.choice(n_cat, items - n_cat, p=zipf(n_cat, 0.7))]))  # each has an item
    cat_start, cat_count = np.searchsorted(cat_of, np.arange(n_cat)), np.bincount(cat_of, minlength=n_cat)
    brands_per_cat = 3
    brand_of = cat_of * brands_per_cat + rng.integers(0, brands_per_cat, items)
    shop_of = rng.integers(0, n_shop, items)
    seller_of_shop = rng.permutation(n_shop) % max(1, n_shop - 2)  # a few sellers run two shops
    item_ids = rng.choice(1_000_000, items, replace=False).astype(np.int64)
    cate_ids = rng.choice(10_000, n_cat, replace=False).astype(np.int64)
    brand_ids = rng.choice(200_000, n_cat * brands_per_cat, replace=False).astype(np.int64)
    shop_ids = rng.choice(300_000, n_shop, replace=False).astype(np.int64)
    seller_ids = rng.choice(300_000, n_shop, replace=False).astype(np.int64)
    # Token ids: a category's words, its brand's, then one or two of the item's own.
    cat_words, brand_words = rng.integers(0, BPE_VOCAB, (n_cat, 4)), rng.integers(0, BPE_VOCAB, (n_cat * brands_per_cat, 2))
    shop_words = rng.integers(0, BPE_VOCAB, (n_shop, 2))
    own_words = rng.integers(0, BPE_VOCAB, (items, 2))
    n_own = rng.integers(1, 3, items)
    titles = [[*cat_words[cat_of[i], :3], *brand_words[brand_of[i]], *own_words[i, : n_own[i]]] for i in range(items)]

    # Users: an archetype's preferred categories, a favourite among them and, for the last third of the sequence,
    # a new favourite (interest drift); items within a category by popularity (so items repeat).
    arch = rng.integers(0, UQA_ARCHETYPES, users)
    arch_cats = np.stack([rng.choice(n_cat, UQA_PREFERRED, replace=False) for _ in range(UQA_ARCHETYPES)])
    early, late = (arch_cats[arch, rng.integers(0, UQA_PREFERRED, users)] for _ in range(2))
    lengths = np.clip(np.rint(rng.lognormal(np.log(mean_length), 0.5, users)), 8, 8 * mean_length).astype(np.int64)
    who = np.repeat(np.arange(users), lengths)
    position = np.arange(who.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    favourite = np.where(position < np.repeat(2 * lengths // 3, lengths), early[who], late[who])
    r = rng.random(who.size)
    cat = np.where(
        r < 0.55, favourite, np.where(r < 0.85, arch_cats[arch[who], rng.integers(0, UQA_PREFERRED, who.size)], rng.choice(n_cat, who.size, p=zipf(n_cat, 0.7)))
    )
    rank = np.minimum((rng.pareto(1.2, who.size)).astype(np.int64), cat_count[cat] - 1)
    item = cat_start[cat] + rank
    bounds = np.cumsum(lengths)[:-1]

    def per_user(values: np.ndarray) -> list:
        return [part.tolist() for part in np.split(values, bounds)]

    def ids(values: np.ndarray) -> list:
        return per_user(values) if flat_ids else per_user(values[:, None])

    seqs = {
        "uni_seq_item_id": ids(item_ids[item]),
        "uni_seq_cate_id": ids(cate_ids[cat_of[item]]),
        "uni_seq_brand_id": ids(brand_ids[brand_of[item]]),
        "uni_seq_shop_id": ids(shop_ids[shop_of[item]]),
        "uni_seq_seller_id": ids(seller_ids[seller_of_shop[shop_of[item]]]),
    }
    tokens = {
        "title": [titles[i] for i in item],
        "cate": cat_words[cat_of[item], :2].tolist(),
        "shop": shop_words[shop_of[item]].tolist(),
        "brand": brand_words[brand_of[item]].tolist(),
        "seller": shop_words[seller_of_shop[shop_of[item]]].tolist(),
    }
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for name, per_event in tokens.items():
        seqs[f"uni_seq_{name}_bpe_token_ids"] = [[[int(t) for t in x] for x in per_event[a:b]] for a, b in zip(starts[:-1], starts[1:])]
    id_type = pl.List(pl.Int64) if flat_ids else pl.List(pl.List(pl.Int64))
    types = {c: id_type if c.endswith("_id") else pl.List(pl.List(pl.Int64)) for c in seqs}
    table = pl.DataFrame(seqs, schema=types)

    # Questions (align files): the last item's category and the favourite category overall, 4 candidates each.
    cate_seq = [np.asarray(c).ravel() for c in seqs["uni_seq_cate_id"]]
    questions: list[tuple[int, str, str]] = []
    for u in range(users):
        values, counts = np.unique(cate_seq[u], return_counts=True)
        top = values[np.lexsort((values, -counts))][0]
        for question, answer in (
            ("What is the category id of the last item in this user's history?", int(cate_seq[u][-1])),
            ("Which category id occurs most often in this user's history?", int(top)),
        ):
            others = rng.permutation(cate_ids[cate_ids != answer])[: UQA_CANDIDATES - 1].tolist()
            options = [str(v) for v in rng.permutation([answer, *others]).tolist()]
            text = f"{question}\nCandidates: {' | '.join(options)}"
            questions.append((u, text, str(answer)))

    train = rng.random(users) < 0.9
    counts = {}
    for split, keep in (("train", train), ("eval", ~train)):
        rows = np.flatnonzero(keep)
        write_arrow(table[rows.tolist()], out / f"pretrain_data_{split}.arrow")
        counts[f"pretrain_data_{split}"] = int(rows.size)
        asked = [(u, q, a) for u, q, a in questions if keep[u]]
        align = table[[u for u, _, _ in asked]].with_columns(
            pl.Series(TEXT_COLUMN, [json.dumps([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for _, q, a in asked], dtype=pl.String)
        )
        write_arrow(align, out / f"align_data_{split}.arrow")
        counts[f"align_data_{split}"] = len(asked)
    counts["interactions"] = int(lengths.sum())
    return counts


def write_arrow(frame: pl.DataFrame, path: Path) -> None:
    """An Arrow IPC file as pyarrow writes one by default: list (not large_list) and string (not string_view) columns, uncompressed."""
    import pyarrow as pa

    def plain(dtype: pl.DataType) -> pa.DataType:
        if isinstance(dtype, pl.List):
            return pa.list_(plain(dtype.inner))
        return pa.string() if dtype == pl.String else pa.int64()

    table = frame.to_arrow()
    table = table.cast(pa.schema([pa.field(name, plain(dtype)) for name, dtype in frame.schema.items()]))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datamodules.synthetic", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    rs = sub.add_parser("recsys2025", help="the RecSys Challenge 2025 layout (parquet tables + input/relevant_clients.npy)")
    rs.add_argument("--clients", type=int, required=True, help="number of clients (about 88 events each with the defaults)")
    rs.add_argument("--out", type=Path, required=True, help="output directory")
    rs.add_argument("--seed", type=int, default=0)
    rs.add_argument("--days", type=int, default=120, help="length of the log in days (>= 60)")
    rs.add_argument("--skus", type=int, default=20000, help="number of products")
    rs.add_argument("--urls", type=int, default=50000, help="number of distinct urls")
    rs.add_argument("--events-per-client", type=float, default=100.0, help="activity scale (the mean is lower: churners and late joiners)")
    rs.add_argument("--targets", action="store_true", help="also write the organisers' target/ files (active clients, fixed propensity classes, popularity)")
    rs.add_argument("--split", action="store_true", help="also write the organisers' split layout (input/ tables, target/ train and validation windows)")
    uq = sub.add_parser("uqabench", help="UQABench's Arrow layout (pretrain_data_{train,eval}.arrow, align_data_{train,eval}.arrow)")
    uq.add_argument("--users", type=int, required=True, help="number of users (one row each)")
    uq.add_argument("--out", type=Path, required=True, help="output directory")
    uq.add_argument("--seed", type=int, default=0)
    uq.add_argument("--items", type=int, default=3000, help="number of items")
    uq.add_argument("--mean-length", type=float, default=30.0, help="typical interactions per user (lognormal, at least 8)")
    uq.add_argument("--flat-ids", action="store_true", help="id columns as a bare id per interaction instead of a one-id list")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    if args.dataset == "uqabench":
        counts = generate_uqabench(args.out, args.users, args.seed, args.items, args.mean_length, args.flat_ids)
        for name, n in counts.items():
            print(f"{name:>20}: {n:,}")
        print(f"{'seconds':>20}: {time.perf_counter() - began:.1f} -> {args.out}")
        return
    counts = generate_recsys2025(args.out, args.clients, args.seed, args.days, args.skus, args.urls, args.events_per_client, args.targets, args.split)
    seconds = time.perf_counter() - began
    events = sum(counts[t] for t in EVENT_TABLES)
    for name, n in counts.items():
        print(f"{name:>20}: {n:,}")
    print(f"{'events':>20}: {events:,} in {seconds:.1f} s ({events / seconds:,.0f} events/s) -> {args.out}")


if __name__ == "__main__":
    main()
