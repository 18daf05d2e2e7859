"""A user's history without leakage, and the per-user statistics UserQA and the tabular input block share.

`History.of(prepared)` keeps the store (events before the cutoff: preprocessing never puts a
later event there), the schema, the vocabularies and the cached text fields. It never keeps
`Prepared.targets`, the labels table or the future window, so nothing built on a History can
read them. Every statistic takes explicit event indices of one user, so a predictive question
can read only the part of a history before its cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from datamodules.preprocess import Prepared
from datamodules.schema import FIRST_ID, MISSING, RARE, EventSchema
from datamodules.sources.recsys2025 import PRODUCT_TABLES
from datamodules.store import SequenceStore

UNKNOWN, OTHER = "unknown", "other"
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
DAY_PARTS = ("night", "morning", "afternoon", "evening")  # hours 0-6, 6-12, 12-18, 18-24 (UTC)
TOP_CATEGORIES = 10  # category shares in the tabular block: the vocabulary's most frequent values


@dataclass(frozen=True)
class Roles:
    """Which field plays which part in questions and aggregates (None: the data has no such field)."""

    item: str | None = None  # categorical item id (ml100k item, recsys sku)
    item_text: str | None = None  # text field naming the item readably (ml100k title)
    category: str | None = None  # ml100k genre, recsys category
    category_word: str = ""  # the category's name in questions when the field's name does not read as one (uqabench "cate")
    category_noun: str = "categories"
    level: str | None = None  # a field whose values read as numbers: rating, price bucket
    level_types: tuple[str, ...] = ()  # event types whose level counts (empty: every event)
    event_type: str | None = None  # the event-kind field when it names actions
    purchase: str | None = None  # the event type of a purchase
    events_noun: str = "events"
    category_events_noun: str = "events"  # the events that carry a category and a level
    category_prefix: str = ""  # shown before a category value (recsys categories are bare ids)
    item_repeats: bool = False  # users meet the same item again (not ml100k: one rating per movie)


ROLES = {
    "ml100k": Roles(
        item="item", item_text="title", category="genre", category_noun="genres", level="rating", events_noun="ratings",
        category_events_noun="ratings",
    ),
    "recsys2025": Roles(
        item="sku", category="category", category_noun="product categories", level="price", level_types=PRODUCT_TABLES,
        event_type="event_type", purchase="product_buy", category_events_noun="product events", category_prefix="category ",
        item_repeats=True,
    ),
    # UQABench (Taobao): items and categories are bare ids; titles are BPE token ids (no readable item text).
    "uqabench": Roles(
        item="item", category="cate", category_word="category", category_noun="categories", events_noun="interactions", category_events_noun="interactions",
        category_prefix="category ", item_repeats=True,
    ),
}  # fmt: skip


def roles_for(source: str, schema: EventSchema) -> Roles:
    """The named sources' roles; any other data: its first other categorical field as category, first numeric as level."""
    if source in ROLES:
        return ROLES[source]
    cats = [f.name for f in schema.of_kind("categorical") if f.name != schema.event_type]
    nums = [f.name for f in schema.of_kind("numeric")]
    return Roles(category=cats[0] if cats else None, level=nums[0] if nums else None, event_type=schema.event_type)


@dataclass
class History:
    """Events before the cutoff, per user, with their decoded values; nothing else of a `Prepared`."""

    store: SequenceStore
    schema: EventSchema
    vocabs: dict[str, list[str]]
    texts: dict[str, np.ndarray]  # text field -> object array aligned with the store's events
    roles: Roles
    source: str
    _names: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _numbers: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # id -> float value of a level field

    @classmethod
    def of(cls, prepared: Prepared) -> History:
        """Reads the store, schema, vocabularies and text columns only (never targets or labels)."""
        texts = {
            f.name: np.array(prepared.users[f"txt_{f.name}"].explode().to_list(), dtype=object) for f in prepared.schema.of_kind("text")
        }
        source = prepared.meta["source"]
        return cls(prepared.store, prepared.schema, prepared.vocabs, texts, roles_for(source, prepared.schema), source)

    def __len__(self) -> int:
        return len(self.store)

    def length(self, row: int) -> int:
        return int(self.store.offsets[row + 1] - self.store.offsets[row])

    def events(self, row: int, end: int | None = None) -> np.ndarray:
        """Indices (into the flat store) of the row's first `end` events, oldest first (all when None)."""
        start, stop = int(self.store.offsets[row]), int(self.store.offsets[row + 1])
        return np.arange(start, stop if end is None else min(stop, start + end))

    def names(self, name: str) -> np.ndarray:
        """id -> readable value of a categorical field (missing: unknown, rare: other)."""
        if name not in self._names:
            reserved = [""] * FIRST_ID
            reserved[MISSING], reserved[RARE] = UNKNOWN, OTHER
            self._names[name] = np.array([*reserved, *(" ".join(str(v).split()) for v in self.vocabs[name])], dtype=object)
        return self._names[name]

    def of_types(self, idx: np.ndarray, types: tuple[str, ...]) -> np.ndarray:
        """The events among `idx` whose event type is one of `types` (all of them without an event-type field)."""
        kind = self.schema.event_type
        if not types or kind is None:
            return idx
        ids = np.flatnonzero(np.isin(self.names(kind), list(types)))
        return idx[np.isin(self.store.tokens[kind][idx], ids)]

    def level_values(self, idx: np.ndarray) -> np.ndarray:
        """Level of each event among `idx` that has one (level_types only), as floats; unreadable values dropped."""
        lvl = self.roles.level
        if lvl is None:
            return np.zeros(0)
        idx = self.of_types(idx, self.roles.level_types)
        if lvl in self.store.values:
            vals = self.store.values[lvl][idx].astype(np.float64)
        else:
            if lvl not in self._numbers:
                self._numbers[lvl] = np.array([_number(v) for v in self.names(lvl)], dtype=np.float64)
            vals = self._numbers[lvl][self.store.tokens[lvl][idx]]
        return vals[np.isfinite(vals)]

    def ranked(self, name: str, idx: np.ndarray) -> list[tuple[str, int]]:
        """Values of a categorical field among `idx`, most frequent first (ties: vocabulary order), unknown/other left out."""
        ids = self.store.tokens[name][idx]
        counts = np.bincount(ids[ids >= FIRST_ID], minlength=FIRST_ID)
        order = sorted(np.flatnonzero(counts), key=lambda i: (-counts[i], i))
        return [(str(self.names(name)[i]), int(counts[i])) for i in order]


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("nan")


def repeat_share(ids: np.ndarray) -> float:
    """Share of events whose value occurred earlier in the same events (unknown/other never count); NaN without events."""
    ids = ids[ids >= FIRST_ID]
    if ids.size == 0:
        return float("nan")
    _, first = np.unique(ids, return_index=True)
    return 1.0 - first.size / ids.size


@dataclass
class Rhythm:
    """When a user is active: weekday and part-of-day counts (UTC), active days and the span they cover."""

    weekdays: np.ndarray  # [7] events per weekday, Monday first
    parts: np.ndarray  # [4] events per DAY_PARTS
    active_days: int
    span_days: int  # calendar days from the first to the last event, both counted


def rhythm(times: np.ndarray) -> Rhythm:
    days = times // 86400
    return Rhythm(
        weekdays=np.bincount((days + 3) % 7, minlength=7),  # 1970-01-01 was a Thursday
        parts=np.bincount((times % 86400) // 21600, minlength=4),
        active_days=int(np.unique(days).size),
        span_days=int(days.max() - days.min() + 1) if times.size else 0,
    )


def tabular_names(history: History) -> tuple[str, ...]:
    """Names of `tabular_features`' columns: fixed per dataset (they depend on the schema and vocabularies only)."""
    r = history.roles
    names = ["log1p_events", "log1p_active_days", "log1p_span_days", "events_per_active_day", "weekend_share"]
    names += [f"{p}_share" for p in DAY_PARTS]
    if r.event_type:
        names += [f"share_{t}" for t in history.vocabs[r.event_type]]
    if r.level:
        names += [f"{r.level}_mean", f"{r.level}_std"]
    if r.category:
        names += [f"log1p_distinct_{r.category}", f"repeat_{r.category}_share"]
        names += [f"share_{r.category}_{v}" for v in history.vocabs[r.category][:TOP_CATEGORIES]]
    if r.item:
        names += [f"repeat_{r.item}_share"]
    return tuple(names)


def tabular_features(history: History, idx: np.ndarray) -> np.ndarray:
    """Aggregates of the events `idx` (one user's, possibly cut): counts as log1p, shares in [0, 1], the level in
    its own units (0 where the user has none); float32, in `tabular_names` order."""
    r, store = history.roles, history.store
    n = max(idx.size, 1)
    rh = rhythm(store.times[idx])
    out = [np.log1p(idx.size), np.log1p(rh.active_days), np.log1p(rh.span_days), idx.size / max(rh.active_days, 1)]
    out += [(rh.weekdays[5] + rh.weekdays[6]) / n, *(rh.parts / n)]
    if r.event_type:
        ids = store.tokens[r.event_type][idx]
        out += list(np.bincount(ids, minlength=FIRST_ID + len(history.vocabs[r.event_type]))[FIRST_ID:] / n)
    if r.level:
        vals = history.level_values(idx)
        out += [vals.mean(), vals.std()] if vals.size else [0.0, 0.0]
    if r.category:
        ids = store.tokens[r.category][idx]
        known = ids[ids >= FIRST_ID]
        k = min(TOP_CATEGORIES, len(history.vocabs[r.category]))
        top = np.bincount(ids, minlength=FIRST_ID + k)[FIRST_ID : FIRST_ID + k]
        out += [np.log1p(np.unique(known).size), _or0(repeat_share(ids)), *(top / max(known.size, 1))]
    if r.item:
        out += [_or0(repeat_share(store.tokens[r.item][idx]))]  # events without an item hold MISSING: not counted
    return np.asarray(out, dtype=np.float32)


def _or0(x: float) -> float:
    return 0.0 if not np.isfinite(x) else x
