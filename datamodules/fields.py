"""Which event fields a method reads: a model config's field names resolved against the prepared data.

Kept on the data side so every method resolves `fields: null`, the `event_type` alias and
the time index the same way, and errors name what the data actually holds.
"""

from __future__ import annotations

from typing import Any

from datamodules.schema import DAY_FIELD, WEEK_FIELD

TIME_CHOICES = ("none", DAY_FIELD, WEEK_FIELD)


def event_fields(store: Any) -> list[str]:
    """Every token field of the events, without the derived day/week index fields."""
    return [f for f in store.tokens if f not in (DAY_FIELD, WEEK_FIELD)]


def resolve_fields(requested: list[str] | None, schema: Any, store: Any, time: str = "none", key: str = "model.fields") -> list[str]:
    """Field names for `requested`: null means every event token field; 'event_type' names the schema's.

    A codes field (e.g. the product name codes of the sku_text variant) must be the only
    field, so `time` (the index field the model adds in front) must then be none.
    """
    known = [*store.tokens, *store.codes]
    if requested is None:
        return event_fields(store)
    fields = []
    for name in requested:
        if name == "event_type" and "event_type" not in known:
            if schema.event_type is None:
                raise ValueError(f"{key}: 'event_type' asked for, but the data schema has no event_type")
            name = schema.event_type
        if name not in known:
            raise ValueError(f"{key}: {name!r} is not a field of this data; fields are {sorted(known)}")
        fields.append(name)
    if any(f in store.codes for f in fields) and len(with_time(fields, time)) > 1:
        raise ValueError(f"{key}: a codes field is read alone (time: none); got {with_time(fields, time)}")
    return fields


def check_time(time: str) -> None:
    if time not in TIME_CHOICES:
        raise ValueError(f"time must be one of {TIME_CHOICES}, got {time!r}")


def with_time(fields: list[str], time: str) -> list[str]:
    """The fields a sequence model embeds: the time index field first (day or week), then `fields`."""
    check_time(time)
    return ([time] if time != "none" else []) + list(fields)


def check_value_fields(names: list[str], store: Any, key: str) -> None:
    """Numeric fields whose raw values a model reads must exist as values in the data."""
    for name in names:
        if name not in store.values:
            raise ValueError(f"{key}: {name!r} is not a numeric field of this data; numeric fields are {sorted(store.values)}")
