"""The `model.*` keys of the LightFM block: defaults, docs (`--help`), checks, and the matrices it is fitted on.

Torch-free, so `--help` and config errors answer without importing Lightning; the module
(lit_modules/lightfm_block.py) takes exactly these keys as constructor arguments, plus `data_args`.

Users are described by features only (no per-user identity feature), so a user unseen by
the fit is represented exactly like a training user: the user feature row is
  [the user's summed event weights per item, divided by their absolute sum]
  + for each `user_features` field, the share of each value among the user's events that
    have one (a codes field: each (position, code) pair, e.g. the mean one-hot of the
    user's search-query codes)
and the user's vector is that row times LightFM's user feature embeddings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from datamodules.schema import FIRST_ID, MISSING, PAD
from lit_modules.ials_config import event_type_weights, item_field, user_item_matrix

LOSSES = ("logistic", "bpr", "warp")  # LightFM's losses that take sample weights


def check_lightfm(factors: int, loss: str, learning_rate: float, item_alpha: float, user_alpha: float, epochs: int) -> None:
    """Checks shared by the config and the module's constructor."""
    if factors < 1 or epochs < 1:
        raise ValueError(f"factors and epochs must be >= 1, got {factors}, {epochs}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if not (item_alpha >= 0 and user_alpha >= 0):
        raise ValueError(f"item_alpha and user_alpha must be >= 0, got {item_alpha}, {user_alpha}")


def feature_width(store: Any, name: str) -> int:
    """Features of one field: one per value (categorical), one per (position, value) (codes)."""
    size = store.vocab_sizes[name]
    return size * store.codes[name].shape[1] if name in store.codes else size


def feature_ids(store: Any, name: str, rows: np.ndarray) -> np.ndarray:
    """[len(rows), L] feature ids of the events at `rows` (L = 1 for a categorical field); -1 where the event has no value."""
    if name in store.codes:
        codes = store.codes[name][rows].astype(np.int64)
        ids = codes + store.vocab_sizes[name] * np.arange(codes.shape[1])
    else:
        codes = store.tokens[name][rows].astype(np.int64)[:, None]
        ids = codes
    return np.where((codes == PAD) | (codes == MISSING), -1, ids)


def share_matrix(owner: np.ndarray, ids: np.ndarray, n_rows: int, width: int) -> Any:
    """Rows of value shares (CSR): each row's valid ids counted and divided by the row's total count."""
    from scipy.sparse import coo_matrix

    rows = np.repeat(owner, ids.shape[1])
    ids = ids.ravel()
    keep = ids >= 0
    counts = coo_matrix((np.ones(keep.sum(), np.float32), (rows[keep], ids[keep])), shape=(n_rows, width)).tocsr()
    return scale_rows(counts, 1.0 / np.maximum(np.asarray(counts.sum(1)).ravel(), 1.0))


def scale_rows(matrix: Any, factors: np.ndarray) -> Any:
    from scipy.sparse import diags

    return (diags(factors.astype(np.float32)) @ matrix).tocsr()


def user_feature_matrix(data: Any, user_items: Any, fields: list[str]) -> Any:
    """Training users' feature rows (see the module docstring), in the row order of `user_items`."""
    from scipy.sparse import hstack

    store = data.store
    train = ~np.asarray(data.is_val, dtype=bool)
    owner = np.repeat(np.arange(len(store)), store.lengths)
    rows = np.flatnonzero(train[owner])
    matrix_row = (np.cumsum(train) - 1)[owner[rows]]
    absolute = np.asarray(abs(user_items).sum(1)).ravel()
    blocks = [scale_rows(user_items, 1.0 / np.maximum(absolute, np.finfo(np.float32).tiny))]
    for name in fields:
        blocks.append(share_matrix(matrix_row, feature_ids(store, name, rows), user_items.shape[0], feature_width(store, name)))
    return hstack(blocks, format="csr", dtype=np.float32)


def item_feature_matrix(data: Any, item: str, fields: list[str]) -> Any:
    """Items' feature rows: an identity feature (weight 1) plus, per field, the value of the item's first training event (weight 1 per field, shared by a codes field's positions).

    Items without a value of their own get the identity alone: PAD, MISSING and RARE (one
    id for many products whose names differ).
    """
    from scipy.sparse import hstack, identity

    store = data.store
    n_items = store.vocab_sizes[item]
    owner = np.repeat(np.arange(len(store)), store.lengths)
    rows = np.flatnonzero(~np.asarray(data.is_val, dtype=bool)[owner])
    items = store.tokens[item][rows]
    items, first = np.unique(items[items >= FIRST_ID], return_index=True)
    rows = rows[store.tokens[item][rows] >= FIRST_ID][first]
    blocks = [identity(n_items, dtype=np.float32, format="csr")]
    for name in fields:
        ids = np.full((n_items, store.codes[name].shape[1] if name in store.codes else 1), -1, dtype=np.int64)
        ids[items] = feature_ids(store, name, rows)
        blocks.append(share_matrix(np.arange(n_items), ids, n_items, feature_width(store, name)))
    return hstack(blocks, format="csr", dtype=np.float32)


@dataclass
class LightFMConfig:
    """LightFM on the user x item matrix ("Encode Me If You Can": LightFM on user x sku), users described by features only.

    Fitted once by lightfm on the training users; a user's vector is their feature row (the
    weighted items they touched, and the shares of their `user_features` values) times the
    fitted user feature embeddings, so every user, new ones too, is embedded alike.
    """

    inputs: ClassVar[str] = "events"

    name: str = "lightfm"
    """Method name (registry key)."""
    field: str = "sku"
    """The item field: a categorical field (sku on recsys2025, item on ml100k)."""
    weights: dict[str, float] | None = None
    """Event type value -> weight (paper: {product_buy: 1, add_to_cart: 0.7, remove_from_cart: -0.5}); a cell's weights are summed, > 0 is a positive; null: every event weighs 1."""
    item_features: list[str] = dataclasses.field(default_factory=list)  # `field` is a key here
    """Fields describing an item besides its identity (paper: [name], the product name codes; genre on ml100k)."""
    user_features: list[str] = dataclasses.field(default_factory=list)  # `field` is a key here
    """Fields whose value shares over the user's events describe the user, besides the items (paper: [query], the search-query codes)."""
    factors: int = 64
    """LightFM no_components = user vector size."""
    loss: str = "warp"
    """logistic | bpr | warp (LightFM's losses with sample weights)."""
    learning_rate: float = 0.05
    """Adagrad learning rate (LightFM's default)."""
    item_alpha: float = 0.0
    """L2 penalty on item feature embeddings."""
    user_alpha: float = 0.0
    """L2 penalty on user feature embeddings."""
    epochs: int = 10
    """Passes over the interactions."""
    random_state: int = 0
    """Seed of LightFM's initial embeddings and shuffling (fitted on one thread, so runs repeat)."""

    def __post_init__(self) -> None:
        check_lightfm(self.factors, self.loss, self.learning_rate, self.item_alpha, self.user_alpha, self.epochs)

    def data_args(self, data: Any) -> dict[str, Any]:
        """Resolved fields, feature widths, event type weights, and the training matrices."""
        from datamodules.fields import resolve_fields

        item = item_field(self.field, data)
        item_fields = resolve_fields(self.item_features, data.schema, data.store, key="model.item_features")
        user_fields = resolve_fields(self.user_features, data.schema, data.store, key="model.user_features")
        event_field, by_id = event_type_weights(self.weights, data)
        cells = user_item_matrix(data, item, event_field, by_id)
        if cells.shape[0] and not (cells.data > 0).any():
            raise ValueError(f"model.field={item}, model.weights={self.weights}: no training user has a positive item")
        widths = {f: feature_width(data.store, f) for f in user_fields}
        return {
            "field": item, "item_features": item_fields, "user_features": user_fields, "event_field": event_field,
            "event_weights": by_id, "n_items": cells.shape[1], "feature_widths": widths,
            "fit_data": {
                "cells": cells,
                "user_features": user_feature_matrix(data, cells, user_fields),
                "item_features": item_feature_matrix(data, item, item_fields),
            },
        }  # fmt: skip
