"""The `model.*` keys of IALS: defaults, docs (`--help`), checks, and the training matrix it is fitted on.

Torch-free, so `--help` and config errors answer without importing Lightning; the module
(lit_modules/ials.py) takes exactly these keys as constructor arguments, plus `data_args`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from datamodules.schema import FIRST_ID, MISSING, PAD


def check_ials(factors: int, regularization: float, iterations: int, alpha: float, weights: dict[str, float] | None) -> None:
    """Checks shared by the config and the module's constructor."""
    if factors < 1 or iterations < 1:
        raise ValueError(f"factors and iterations must be >= 1, got {factors}, {iterations}")
    if not regularization >= 0:
        raise ValueError(f"regularization must be >= 0, got {regularization}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if weights is not None:
        bad = {k: w for k, w in weights.items() if not math.isfinite(w)}
        if bad or not any(weights.values()):
            raise ValueError(f"weights must be finite and not all 0, got {dict(weights)}")


def item_field(field: str, data: Any, key: str = "model.field") -> str:
    """The categorical token field whose values are the items (the event type alias resolved)."""
    from datamodules.fields import resolve_fields

    (name,) = resolve_fields([field], data.schema, data.store, key=key)
    if name not in data.store.tokens:
        raise ValueError(f"{key}: {name!r} is a codes field; the items must be a categorical field")
    return name


def event_type_weights(weights: dict[str, float] | None, data: Any, key: str = "model.weights") -> tuple[str | None, list[float]]:
    """(event type field, weight of each of its token ids); (None, []) when every event weighs 1.

    Keys are event type values as the data spells them (e.g. product_buy, or a rating "4" on
    ml100k); a value the vocabulary does not hold is an error, not a silently unused key.
    """
    if weights is None:
        return None, []
    field = data.schema.event_type
    if field is None:
        raise ValueError(f"{key}: weights by event type asked for, but the data schema has no event_type")
    values = data.vocabs[field]
    unknown = sorted(set(weights) - set(values))
    if unknown:
        raise ValueError(f"{key}: {unknown} are not values of the event type field {field!r}; its values are {values}")
    by_id = [0.0] * data.store.vocab_sizes[field]
    for i, value in enumerate(values):
        by_id[FIRST_ID + i] = float(weights.get(value, 0.0))
    return field, by_id


def event_weights_of(store: Any, rows: np.ndarray, event_field: str | None, by_id: list[float]) -> np.ndarray:
    """Weight of each event at `rows` of the flat store arrays."""
    if event_field is None:
        return np.ones(len(rows), dtype=np.float32)
    return np.asarray(by_id, dtype=np.float32)[store.tokens[event_field][rows]]


def user_item_matrix(data: Any, field: str, event_field: str | None, by_id: list[float]) -> Any:
    """Training users x items (scipy CSR, float32): each cell the summed weights of the user's events on that item.

    Only training users (not `data.is_val`): validation users stay unseen by the fit, as for
    every other method. Events on no item (PAD, MISSING) and weight-0 events are left out,
    and cells whose weights cancel to 0 are dropped (implicit would read a stored 0 as a
    confidence of 0, below that of an unobserved cell).
    """
    from scipy.sparse import coo_matrix

    store = data.store
    train = ~np.asarray(data.is_val, dtype=bool)
    matrix_row = np.cumsum(train) - 1  # store row -> row among the training users
    owner = np.repeat(np.arange(len(store)), store.lengths)
    rows = np.flatnonzero(train[owner])
    users = matrix_row[owner[rows]]
    items = store.tokens[field][rows]
    w = event_weights_of(store, rows, event_field, by_id)
    keep = (items != PAD) & (items != MISSING) & (w != 0)
    shape = (int(train.sum()), store.vocab_sizes[field])
    matrix = coo_matrix((w[keep], (users[keep], items[keep])), shape=shape, dtype=np.float32).tocsr()
    matrix.eliminate_zeros()
    return matrix


@dataclass
class IALSConfig:
    """Implicit ALS on the user x item matrix of one field ("Encode Me If You Can": iALS categories, iALS page visits).

    Fitted once by implicit on the training users; a user's vector is the exact ALS user step
    (fold-in) against the fitted item factors, so every user, new ones too, is embedded the same way.
    """

    inputs: ClassVar[str] = "events"

    name: str = "ials"
    """Method name (registry key)."""
    field: str = "category"
    """The item field: a categorical field (category, url, sku; item or genre on ml100k)."""
    weights: dict[str, float] | None = None
    """Event type value -> weight of its events (e.g. {product_buy: 3, add_to_cart: 1}; others weigh 0); null: every event weighs 1."""
    factors: int = 64
    """Latent factors = user vector size."""
    regularization: float = 0.01
    """L2 regularization of the factors (implicit's default)."""
    iterations: int = 15
    """ALS iterations (implicit's default)."""
    alpha: float = 1.0
    """Confidence scale: an observed cell's confidence is alpha x its summed weight (implicit's convention)."""
    random_state: int = 0
    """Seed of implicit's initial factors."""

    def __post_init__(self) -> None:
        check_ials(self.factors, self.regularization, self.iterations, self.alpha, self.weights)

    def data_args(self, data: Any) -> dict[str, Any]:
        """The resolved item field, its vocabulary size, the weight of each event type id, and the training matrix."""
        field = item_field(self.field, data)
        event_field, by_id = event_type_weights(self.weights, data)
        matrix = user_item_matrix(data, field, event_field, by_id)
        if matrix.shape[0] and not matrix.nnz:
            raise ValueError(f"model.field={field}, model.weights={self.weights}: no training user has a weighted event on an item")
        return {"field": field, "n_items": matrix.shape[1], "event_field": event_field, "event_weights": by_id, "user_items": matrix}
