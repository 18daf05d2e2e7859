"""Users as text for language models (LLM4ES; the LM block of "Encode Me If You Can"): rendering.

A user's events become a header naming the fields plus one readable entry per event:
time as "YYYY-mm-dd HH:MM" (UTC), categorical ids mapped back to their values (MISSING ->
"unknown", RARE -> "other"), raw numeric values, text fields, codes as their integers (an event
without codes: "unknown"). The day/week index fields are derived from the time, so they are not
rendered; `fields` picks which event fields are (the LM blocks read a few columns), and the
plain line format can leave out a line's unknown values (`drop_unknown`: a page visit has no
price), which keeps lines short enough that a token budget holds many events. Five formats
(plain, json, markdown, yaml, html); rendering one user in several of them is LLM4ES's format
augmentation, offline and deterministic (an instruct LM's rewrites are `lit_modules.rewrite`).
Token budgets, datasets and LM batches are in `datamodules.text_batches`.
"""

from __future__ import annotations

import functools
import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import yaml

from datamodules.preprocess import Prepared
from datamodules.schema import FIRST_ID, MISSING, RARE

FORMATS = ("plain", "json", "markdown", "yaml", "html")
FORMAT_NAMES = {"plain": "plain text", "json": "JSON", "markdown": "a Markdown table", "yaml": "YAML", "html": "an HTML table"}
UNKNOWN, OTHER = "unknown", "other"


PADDING_SIDES = ("right", "left")


def check_padding_side(padding_side: str) -> None:
    """Where LM batches put their pads; checked by the text configs and the batch builder alike."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")


def check_formats(formats: Sequence[str], key: str) -> None:
    """A bad format list is an error naming the config key, before any text is rendered or generated."""
    unknown = [f for f in formats if f not in FORMAT_NAMES]
    if unknown or not formats:
        raise ValueError(f"{key} {list(formats)}; choose from {sorted(FORMAT_NAMES)}")


def format_number(v: float) -> str:
    """Readable number: integers without decimals, else two decimals (trailing zeros dropped), tiny values 3 digits."""
    if not np.isfinite(v):
        return UNKNOWN
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    if abs(v) >= 0.01:
        return f"{v:.2f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def one_line(value: str) -> str:
    """Collapse whitespace, so a value never breaks the one-entry-per-event layout."""
    return " ".join(str(value).split())


@dataclass
class EventTable:
    """A user's events as readable strings, oldest first."""

    columns: list[str]
    numeric: list[bool]  # column holds numbers (json/yaml write them unquoted)
    rows: list[list[str]]


@dataclass
class Rendered:
    """A rendered user split into head, one chunk per event (oldest first) and tail.

    `text(n)` keeps the n most recent events; chunks are whole lines, so a cut never
    splits one. In json every chunk but the last ends with a comma; the last (most recent)
    chunk is always kept, so any suffix is valid JSON.
    """

    head: list[str]
    events: list[str]
    tail: list[str]
    empty: str | None = None  # the whole text when no event is kept (yaml: "[]")

    def __len__(self) -> int:
        return len(self.events)

    def text(self, n: int | None = None) -> str:
        n = len(self.events) if n is None else n
        kept = self.events[len(self.events) - n :] if n > 0 else []
        if not kept and self.empty is not None:
            return self.empty
        return "\n".join([*self.head, *kept, *self.tail])


@functools.lru_cache(maxsize=65536)
def _yaml_plain_ok(value: str) -> bool:
    """True when YAML reads `value` back unquoted as this same string."""
    try:
        return yaml.safe_load(f"k: {value}") == {"k": value}
    except yaml.YAMLError:
        return False


# Characters JSON leaves raw but YAML refuses (outside its printable set) or reads as line breaks; \uXXXX escapes them.
_YAML_UNPRINTABLE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff]")


def _yaml_scalar(value: str, numeric: bool) -> str:
    if (numeric and value != UNKNOWN) or _yaml_plain_ok(value):
        return value
    quoted = json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML double-quoted scalar...
    return _YAML_UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", quoted)  # ...once YAML's unprintables are escaped


def _json_value(value: str, numeric: bool) -> str:
    return value if numeric and value != UNKNOWN else json.dumps(value, ensure_ascii=False)


def format_events(table: EventTable, fmt: str = "plain", header: bool = True, drop_unknown: bool = False) -> Rendered:
    """Lay an event table out in one of FORMATS. `header` only matters for plain (the
    other formats name the fields in their structure); plain without header is the
    "Encode Me" line format. `drop_unknown` (plain only: its values carry their names)
    leaves each line's unknown values out."""
    cols, rows = table.columns, table.rows
    if drop_unknown and fmt != "plain":
        raise ValueError(f"drop_unknown needs the plain format (its values carry their field names), not {fmt!r}")
    if fmt == "plain":
        head = [f"fields: {', '.join(cols)}"] if header else []
        lines = ["; ".join(f"{c}: {v}" for c, v in zip(cols, r) if not (drop_unknown and v == UNKNOWN)) for r in rows]
        return Rendered(head, lines, [])
    if fmt == "json":
        objs = ["{" + ", ".join(f"{json.dumps(c, ensure_ascii=False)}: {_json_value(v, n)}" for c, v, n in zip(cols, r, table.numeric)) + "}" for r in rows]
        return Rendered(["["], [o + ("," if i < len(objs) - 1 else "") for i, o in enumerate(objs)], ["]"])
    if fmt == "markdown":

        def cells(values: Sequence[str]) -> str:
            return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

        return Rendered([cells(cols), cells(["---"] * len(cols))], [cells(r) for r in rows], [])
    if fmt == "yaml":
        events = []
        for r in rows:
            lines = [f"{_yaml_scalar(c, False)}: {_yaml_scalar(v, n)}" for c, v, n in zip(cols, r, table.numeric)]
            events.append("\n".join(["- " + lines[0], *("  " + line for line in lines[1:])]))
        return Rendered([], events, [], empty="[]")
    if fmt == "html":

        def tr(tag: str, values: Sequence[str]) -> str:
            return "<tr>" + "".join(f"<{tag}>{html.escape(v, quote=False)}</{tag}>" for v in values) + "</tr>"

        return Rendered(["<table>", tr("th", cols)], [tr("td", r) for r in rows], ["</table>"])
    raise ValueError(f"format {fmt!r}; choose from {FORMATS}")


class Renderer:
    """Reads users' events out of a `Prepared` cache as readable strings.

    Built once per dataset: the id -> value tables are made here, not per user. `fields`
    names the event fields to render, in the data's order (None: all); the time always is.
    """

    def __init__(self, prepared: Prepared, fields: Sequence[str] | None = None):
        self.prepared = prepared
        schema, store = prepared.schema, prepared.store
        ordered = sorted(schema.fields, key=lambda f: f.name != schema.event_type)  # event type first, as in the paper
        present = [f for f in ordered if f.kind != "codes" or f.name in store.codes]
        if fields is not None:
            unknown = sorted(set(fields) - {f.name for f in present})
            if unknown or not fields:
                raise ValueError(f"fields {list(fields)}: {unknown or 'none'} not event fields of this data; choose from {[f.name for f in present]}")
            present = [f for f in present if f.name in fields]
        self.fields = present
        readable = [f.name.replace("_", " ") for f in self.fields]
        self.time_column = "timestamp" if "timestamp" not in readable else "event time"
        slots = self._with_time(self.fields)
        self.columns = [self.time_column if f is None else f.name.replace("_", " ") for f in slots]
        self.numeric = [f is not None and f.kind == "numeric" for f in slots]
        reserved = [""] * FIRST_ID  # PAD, SOS, EOS never occur inside a stored sequence
        reserved[MISSING], reserved[RARE] = UNKNOWN, OTHER
        self.names = {
            f.name: np.array([*reserved, *map(one_line, prepared.vocabs[f.name])], dtype=object)
            for f in self.fields
            if f.kind == "categorical"
        }
        self.reserved_codes = np.array(reserved, dtype=object)  # a code outside the fitted range (RARE) reads "other"

    def _with_time(self, items: list) -> list:
        """`items` (one per field) with a None placeholder where the time column sits."""
        event_type = self.prepared.schema.event_type
        at = 1 if event_type is not None and self.fields and self.fields[0].name == event_type else 0
        return [*items[:at], None, *items[at:]]

    def table(self, row: int, max_events: int | None = None) -> EventTable:
        """Events of store row `row`, the `max_events` most recent ones (all when None)."""
        store = self.prepared.store
        start, end = int(store.offsets[row]), int(store.offsets[row + 1])
        if max_events is not None:
            start = max(start, end - max_events)
        stamps = np.datetime_as_string(store.times[start:end].astype("datetime64[s]"), unit="m")
        per_field: list[list[str]] = []
        for f in self.fields:
            if f.kind == "categorical":
                per_field.append(self.names[f.name][store.tokens[f.name][start:end]].tolist())
            elif f.kind == "numeric":
                per_field.append([format_number(float(v)) for v in store.values[f.name][start:end]])
            elif f.kind == "text":
                texts = self.prepared.users[f"txt_{f.name}"][row].to_list()
                first = start - int(store.offsets[row])
                per_field.append([UNKNOWN if t is None else one_line(t) for t in texts[first : first + end - start]])
            else:  # codes
                per_field.append([self.codes_text(c) for c in store.codes[f.name][start:end]])
        per_field = self._with_time(per_field)
        per_field[per_field.index(None)] = [s.replace("T", " ") for s in stamps]
        return EventTable(self.columns, self.numeric, [list(r) for r in zip(*per_field)])

    def codes_text(self, codes: np.ndarray) -> str:
        """One event's codes as space-separated integers (one short token each); no codes: unknown."""
        if (codes == MISSING).all():
            return UNKNOWN
        return " ".join(str(int(x) - FIRST_ID) if x >= FIRST_ID else self.reserved_codes[x] for x in codes)

    def render(self, row: int, fmt: str = "plain", max_events: int | None = None, header: bool = True, drop_unknown: bool = False) -> Rendered:
        return format_events(self.table(row, max_events), fmt, header, drop_unknown)


def render_user(prepared: Prepared, row: int, fmt: str = "plain", max_events: int | None = None, header: bool = True) -> str:
    """One user (store row) as text; the `max_events` most recent events when given.

    For many users build one `Renderer` and reuse it.
    """
    return Renderer(prepared).render(row, fmt, max_events, header).text()


def augment_formats(
    prepared: Prepared, row: int, formats: Sequence[str] = FORMATS, max_events: int | None = None
) -> dict[str, str]:
    """The same user in several formats: LLM4ES's format augmentation, offline and deterministic."""
    table = Renderer(prepared).table(row, max_events)
    return {fmt: format_events(table, fmt).text() for fmt in formats}

