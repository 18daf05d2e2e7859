"""Per-item input tables from a Prepared: each item's side-information ids and its text as token ids.

An item (an id of the item field) gets, per side field, the id that field has at the
item's first training event (on ml100k: its primary genre and its release-year bucket), and
the words of its text field (the title) as ids of a word vocabulary. The vocabulary is the
`text_vocab` most frequent words of the training users' items, ties by word, ids from 1 (0
pads): fitted on training users like every other vocabulary, no tokenizer or model files,
and its size is fixed by the config, so a finished run rebuilds its tables' shapes without
data (the tables themselves are saved with the weights). Torch-free.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np

from datamodules.schema import FIRST_ID

WORD = re.compile(r"[a-z0-9]+")


def words(text: str | None) -> list[str]:
    """Lower-cased runs of letters and digits: 'Star Wars (1977)' -> ['star', 'wars', '1977']."""
    return WORD.findall(text.lower()) if text else []


def training_events(data: Any) -> np.ndarray:
    """Flat store rows of the training users' events (val users are never read)."""
    store = data.store
    owner = np.repeat(np.arange(len(store)), store.lengths)
    return np.flatnonzero(~np.asarray(data.is_val, dtype=bool)[owner])


def first_event_of_each_item(items: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct item ids >= FIRST_ID, the flat row of each one's first event among `rows`)."""
    ids, first = np.unique(items[rows], return_index=True)
    keep = ids >= FIRST_ID
    return ids[keep], rows[first[keep]]


def side_table(data: Any, item_field: str, side_fields: list[str]) -> np.ndarray:
    """int64 [n_items, len(side_fields)]: each item's id of each side field; 0 for items no training user has."""
    store = data.store
    table = np.zeros((store.vocab_sizes[item_field], len(side_fields)), dtype=np.int64)
    if len(store) == 0:
        return table
    ids, rows = first_event_of_each_item(store.tokens[item_field], training_events(data))
    for j, f in enumerate(side_fields):
        table[ids, j] = store.tokens[f][rows]
    return table


def text_table(data: Any, item_field: str, text_field: str, text_vocab: int, text_len: int) -> np.ndarray:
    """int64 [n_items, text_len]: the first `text_len` in-vocabulary words of each item's text as ids (1..text_vocab), 0-padded."""
    store = data.store
    table = np.zeros((store.vocab_sizes[item_field], text_len), dtype=np.int64)
    if len(store) == 0 or text_len == 0:
        return table
    column = f"txt_{text_field}"
    if column not in data.users.columns:
        known = sorted(c.removeprefix("txt_") for c in data.users.columns if c.startswith("txt_"))
        raise ValueError(f"model.text_field: {text_field!r} is not a text field of this data; text fields are {known}")
    texts = data.users[column].explode().to_numpy()  # aligned with the store's flat event arrays
    ids, rows = first_event_of_each_item(store.tokens[item_field], training_events(data))
    item_words = [words(texts[r]) for r in rows]
    counts = Counter(w for ws in item_words for w in ws)
    vocab = {w: i + 1 for i, (w, _) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:text_vocab])}
    for item, ws in zip(ids, item_words):
        known = [vocab[w] for w in ws if w in vocab][:text_len]
        table[item, : len(known)] = known
    return table


def check_side_fields(data: Any, item_field: str, side_fields: list[str]) -> None:
    """Side fields must be token fields of the data other than the item field."""
    for f in side_fields:
        if f not in data.store.tokens:
            raise ValueError(f"model.side_fields: {f!r} is not a token field of this data; token fields are {sorted(data.store.tokens)}")
        if f == item_field:
            raise ValueError(f"model.side_fields: {f!r} is the item field itself")

