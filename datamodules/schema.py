"""The event contract: which column is the user, which is the time, and what each field is.

Every source turns its raw tables into one event frame described by an `EventSchema`;
everything downstream (preprocessing, models, renderers) reads the schema, never the
source's own column names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FIELD_KINDS: tuple[str, ...] = ("categorical", "numeric", "text", "codes")

# Reserved ids of every vocabulary; real values start at FIRST_ID.
PAD, MISSING, RARE, SOS, EOS = 0, 1, 2, 3, 4
FIRST_ID = 5

# Token fields derived from the time column by preprocessing.
DAY_FIELD, WEEK_FIELD = "day", "week"


@dataclass
class FieldSpec:
    """One event field.

    categorical: ids or strings mapped to a top-K vocabulary.
    numeric: bucketed into quantiles for embedding; the raw value is kept for losses.
    text: kept as a string for text renderers.
    codes: fixed-length integer codes (e.g. quantized name embeddings).
    """

    name: str
    kind: str = "categorical"
    column: str | None = None  # source column, defaults to `name`
    top_k: int | None = None  # categorical: vocabulary size cap (None: data.top_k)
    n_buckets: int | None = None  # numeric: quantile buckets (None: data.n_buckets)
    length: int | None = None  # codes: how many integer codes each event carries

    @property
    def source_column(self) -> str:
        return self.column or self.name


@dataclass
class EventSchema:
    """User column, time column and typed fields of an event table."""

    user: str
    time: str
    fields: list[FieldSpec] = field(default_factory=list)
    event_type: str | None = None  # a categorical field naming the event kind, when tables are merged

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"schema: duplicate field names {sorted(dup)}")
        for f in self.fields:
            if f.kind not in FIELD_KINDS:
                raise ValueError(f"schema: field {f.name!r} has kind {f.kind!r}; expected one of {FIELD_KINDS}")
            if f.kind == "codes" and not (f.length and f.length > 0):
                raise ValueError(f"schema: codes field {f.name!r} needs a positive length")
            if f.name in (DAY_FIELD, WEEK_FIELD):
                raise ValueError(f"schema: field name {f.name!r} is reserved for the time index")
        if self.event_type is not None and self.event_type not in names:
            raise ValueError(f"schema: event_type {self.event_type!r} is not one of the fields {names}")

    def of_kind(self, *kinds: str) -> list[FieldSpec]:
        return [f for f in self.fields if f.kind in kinds]

    @property
    def value_fields(self) -> list[str]:
        """Fields whose raw float value is kept beside its bucket id."""
        return [f.name for f in self.of_kind("numeric")]
