"""Implicit ALS as an embedding method: item factors fitted by `implicit`, user vectors by exact ALS fold-in.

The item factors are a buffer, not a parameter: Lightning has nothing to train, the run
embeds directly and model.safetensors holds the fitted factors. A user's vector is the
least-squares user step of iALS against those fixed factors, computed from the batch's
events alone, so training users, validation users and new users are embedded alike.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch

from datamodules.schema import MISSING, PAD
from lit_modules.ials_config import check_ials

log = logging.getLogger(__name__)


def fit_als(user_items: Any, factors: int, regularization: float, iterations: int, alpha: float, random_state: int) -> Any:
    """implicit's CPU AlternatingLeastSquares fitted on `user_items` (users x items CSR), seeded."""
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(
        factors=factors, regularization=regularization, alpha=alpha, iterations=iterations, random_state=random_state
    )
    model.fit(user_items, show_progress=False)
    return model


def fold_in(
    items: torch.Tensor, weights: torch.Tensor, item_factors: torch.Tensor, regularization: float, alpha: float
) -> torch.Tensor:
    """Users' ALS factors from their events: x_u = (Y^T C_u Y + reg I)^-1 Y^T C_u p_u, in float64, batched.

    items [B, T] item ids (PAD and MISSING count as no item), weights [B, T] per event.
    Implicit's convention: a cell's confidence c = alpha x the summed weights of its events;
    p = 1 where c > 0; a negative cell has confidence |c| and p = 0; unobserved cells c = 1, p = 0.
    Each distinct item enters once: items are sorted per user and only a run's first event
    carries the cell, so neither event order nor padding changes the terms.
    """
    y = item_factors.double()
    n_items, k = y.shape
    weights = weights.double() * ((items != PAD) & (items != MISSING))
    cells = torch.zeros(items.shape[0], n_items, dtype=torch.float64, device=items.device).scatter_add_(1, items, weights)
    ordered, _ = items.sort(dim=1)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    c = alpha * cells.gather(1, ordered) * first  # 0 for pads, repeats and cancelled cells
    yu = y[ordered]  # [B, T, k]
    a = y.T @ y + regularization * torch.eye(k, dtype=torch.float64, device=y.device)
    extra = (c.abs() - 1.0) * (c != 0)
    a = a + (yu * extra[..., None]).transpose(1, 2) @ yu
    b = (yu * c.clamp(min=0)[..., None]).sum(1)
    return torch.linalg.solve(a, b)


class IALS(L.LightningModule):
    """Arguments: the keys of IALSConfig (docs there) plus what its data_args derives from the data.

    user_items: the training users x items matrix; with no rows (a finished run rebuilt by
    experiments.embed.load_run) nothing is fitted and the factors are loaded afterwards.
    """

    def __init__(
        self,
        n_items: int,
        event_field: str | None,
        event_weights: list[float],
        user_items: Any,
        field: str = "category",
        weights: dict[str, float] | None = None,
        factors: int = 64,
        regularization: float = 0.01,
        iterations: int = 15,
        alpha: float = 1.0,
        random_state: int = 0,
    ):
        super().__init__()
        check_ials(factors, regularization, iterations, alpha, weights)
        weights = None if weights is None else {str(k): float(v) for k, v in weights.items()}
        event_weights = [float(w) for w in event_weights]
        self.save_hyperparameters(ignore=["user_items"])  # plain types only; the matrix is the data, not a setting
        self.field, self.event_field = field, event_field
        self.register_buffer("item_factors", torch.zeros(n_items, factors))
        self.register_buffer("weight_of_event_type", torch.tensor(event_weights, dtype=torch.float32), persistent=False)
        self.fit_seconds: float | None = None  # None: rebuilt to load fitted factors
        if user_items.shape[0]:
            started = time.perf_counter()
            model = fit_als(user_items, factors, regularization, iterations, alpha, random_state)
            self.item_factors.copy_(torch.from_numpy(np.asarray(model.item_factors)))
            self.fit_seconds = time.perf_counter() - started
            log.info("iALS on %d users x %d %s values: %.1f s", user_items.shape[0], n_items, field, self.fit_seconds)

    def event_weights(self, batch: dict) -> torch.Tensor:
        """Weight of every event of the batch (pads too; fold_in drops them by their item)."""
        items = batch["tokens"][self.field]
        if self.event_field is None:
            return torch.ones(items.shape, dtype=torch.float32, device=items.device)
        return self.weight_of_event_type[batch["tokens"][self.event_field]]

    def embed(self, batch: dict) -> torch.Tensor:
        """Each user's ALS fold-in; a user without a weighted event on an item gets the zero vector (b = 0)."""
        x = fold_in(batch["tokens"][self.field], self.event_weights(batch), self.item_factors, self.hparams.regularization, self.hparams.alpha)
        return x.float()
