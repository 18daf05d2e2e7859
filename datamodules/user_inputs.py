"""InstructUE's input format: a user as separately delimited sources, an optional instruction, then `<USER>`.

    <ratings>
    timestamp: 1997-12-04 15:55; title: Toy Story; genres: Animation Children's Comedy; rating: 4
    ...
    </ratings>
    <tabular>
    log1p events: 4.8; ...; rating mean: 3.6; ...
    </tabular>
    Instruction: What are this user's favourite genres?
    <USER>
    Mostly Drama (40% of ratings), then Comedy (25%) and Action (10%).

Sources: ml100k has `ratings`; recsys2025 has `purchases`, `cart` (add and remove), `page_visits`
and `searches`; any other data one `events` source. Every dataset also has the `tabular` block
(`datamodules.user_history.tabular_features`, computed from the same events as the texts). Each
event is one line (the "Encode Me" plain line format of `datamodules.text`), oldest first.

A `UserInput` keeps the parts apart (per-source texts, the tabular vector, instruction,
answer), so a model can feed each source to its own encoder; `prompt()` / `text()` render it
all as one string (the text-only ablation). The universal mode is the empty instruction:
`formatter.user_input(row)` (or `instruction=UNIVERSAL`) leaves the `Instruction:` line out.
A source with more events than its budget keeps its newest events, whole, and counts the cut.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from datamodules.schema import FIRST_ID, MISSING
from datamodules.text import EventTable, format_events, format_number
from datamodules.user_history import UNKNOWN, History, tabular_features, tabular_names

USER_TOKEN = "<USER>"  # the special token a model adds to its tokenizer; the user embedding is read at it
INSTRUCTION_PREFIX = "Instruction: "
UNIVERSAL = ""  # the instruction of the universal mode
TABULAR = "tabular"
NO_EVENTS = "no events"  # the text of a source the user has no events in (an encoder never gets an empty string)
TIME = "time"


@dataclass(frozen=True)
class SourceSpec:
    """One textual source: the events it takes (by event type; None: all) and the columns each line shows."""

    name: str
    event_types: tuple[str, ...] | None
    columns: tuple[str, ...]  # TIME or field names


SOURCE_SPECS: dict[str, tuple[SourceSpec, ...]] = {
    "ml100k": (SourceSpec("ratings", None, (TIME, "title", "genres", "rating")),),
    "recsys2025": (
        SourceSpec("purchases", ("product_buy",), (TIME, "sku", "category", "price")),
        SourceSpec("cart", ("add_to_cart", "remove_from_cart"), (TIME, "event_type", "sku", "category", "price")),
        SourceSpec("page_visits", ("page_visit",), (TIME, "url")),
        SourceSpec("searches", ("search_query",), (TIME, "query")),
    ),
}


def source_specs(history: History) -> tuple[SourceSpec, ...]:
    """The named datasets' sources; any other data: one `events` source with every field."""
    if history.source in SOURCE_SPECS:
        return SOURCE_SPECS[history.source]
    return (SourceSpec("events", None, (TIME, *(f.name for f in history.schema.fields))),)


def open_tag(name: str) -> str:
    return f"<{name}>"


def close_tag(name: str) -> str:
    return f"</{name}>"


def delimiters(history: History) -> list[str]:
    """Every delimiter string of this dataset's inputs (open and close tags, `<USER>` last), e.g. to add as tokens."""
    names = [s.name for s in source_specs(history)] + [TABULAR]
    return [t for n in names for t in (open_tag(n), close_tag(n))] + [USER_TOKEN]


@dataclass
class InputConfig:
    """How users are laid out as InstructUE inputs."""

    budget: int = 64
    """Events kept per source, newest first (older ones are cut and counted)."""
    budgets: dict[str, int] = field(default_factory=dict)
    """Per-source budgets replacing `budget`, e.g. {page_visits: 32}."""

    def budget_of(self, name: str) -> int:
        return self.budgets.get(name, self.budget)


@dataclass
class UserInput:
    """One user (store row, history cut at `end` events) as an InstructUE input, its parts kept apart."""

    user_id: str
    row: int
    end: int  # events of the user's history this input reads (its first `end`, oldest first)
    sources: dict[str, str]  # textual source -> its event lines (NO_EVENTS when empty), without delimiters
    n_events: dict[str, int]  # events of each source before the budget cut
    cut_events: dict[str, int]  # events each source dropped to fit its budget (the oldest)
    tabular: np.ndarray  # float32 [F], `tabular_names` order
    tabular_names: tuple[str, ...]
    instruction: str = UNIVERSAL
    answer: str | None = None  # training: the target text after <USER>

    @property
    def tabular_text(self) -> str:
        return "; ".join(f"{n.replace('_', ' ')}: {format_number(float(v))}" for n, v in zip(self.tabular_names, self.tabular))

    def blocks(self) -> list[tuple[str, str]]:
        """(name, text) of every source, the tabular block last, in input order."""
        return [*self.sources.items(), (TABULAR, self.tabular_text)]

    def prompt(self) -> str:
        """Everything up to and including `<USER>` as one text (the text-only ablation); no answer."""
        parts = [f"{open_tag(n)}\n{t}\n{close_tag(n)}" for n, t in self.blocks()]
        if self.instruction:
            parts.append(INSTRUCTION_PREFIX + self.instruction)
        return "\n".join([*parts, USER_TOKEN])

    def text(self) -> str:
        """The prompt, then the answer on the next line when there is one (teacher forcing)."""
        return self.prompt() if self.answer is None else f"{self.prompt()}\n{self.answer}"


class UserFormatter:
    """Builds `UserInput`s from a `History`; counts, per source, the events cut by budgets (`cut_counts`)."""

    def __init__(self, history: History, cfg: InputConfig | None = None):
        self.history, self.cfg = history, cfg or InputConfig()
        self.specs = source_specs(history)
        known = [s.name for s in self.specs]
        for name, budget in self.cfg.budgets.items():
            if name not in known:
                raise ValueError(f"inputs.budgets.{name}: not a source of {history.source}; its sources are {known}")
        for name in known:
            if self.cfg.budget_of(name) < 1:
                key = f"inputs.budgets.{name}" if name in self.cfg.budgets else "inputs.budget"
                raise ValueError(f"{key}: {self.cfg.budget_of(name)} must be >= 1")
        self.tabular_names = tabular_names(history)
        self.cut_counts: Counter[str] = Counter()

    def user_input(self, row: int, instruction: str = UNIVERSAL, answer: str | None = None, end: int | None = None) -> UserInput:
        """Store row `row` reading its first `end` events (all when None); empty instruction: the universal mode."""
        h = self.history
        idx = h.events(row, end)
        texts, counts, cuts = {}, {}, {}
        for spec in self.specs:
            own = idx if spec.event_types is None else h.of_types(idx, spec.event_types)
            budget = self.cfg.budget_of(spec.name)
            counts[spec.name], cuts[spec.name] = own.size, max(0, own.size - budget)
            texts[spec.name] = self._lines(spec, own[own.size - min(budget, own.size) :])
            self.cut_counts[spec.name] += cuts[spec.name]
        user = str(h.store.user_ids[row])
        return UserInput(user, row, idx.size, texts, counts, cuts, tabular_features(h, idx), self.tabular_names, instruction, answer)

    def _lines(self, spec: SourceSpec, idx: np.ndarray) -> str:
        if idx.size == 0:
            return NO_EVENTS
        h = self.history
        columns = [self._column(c, idx) for c in spec.columns]
        names = ["timestamp" if c == TIME else c.replace("_", " ") for c in spec.columns]
        numeric = [c in h.store.values for c in spec.columns]
        return format_events(EventTable(names, numeric, [list(r) for r in zip(*columns)]), "plain", header=False).text()

    def _column(self, name: str, idx: np.ndarray) -> list[str]:
        h = self.history
        if name == TIME:
            return [s.replace("T", " ") for s in np.datetime_as_string(h.store.times[idx].astype("datetime64[s]"), unit="m")]
        if name in h.texts:
            return [UNKNOWN if t is None else " ".join(str(t).split()) for t in h.texts[name][idx]]
        if name in h.store.codes:
            return [UNKNOWN if c[0] == MISSING else " ".join(str(int(x) - FIRST_ID) for x in c) for c in h.store.codes[name][idx]]
        if name in h.store.values:
            return [format_number(float(v)) for v in h.store.values[name][idx]]
        return h.names(name)[h.store.tokens[name][idx]].tolist()
