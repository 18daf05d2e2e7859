"""The LightFM block as an embedding method: fitted by lightfm-next, users embedded from their features.

LightFM's user feature embeddings are a buffer, not a parameter: Lightning has nothing to
train, the run embeds directly and model.safetensors holds them. Users carry no identity
feature (lit_modules/lightfm_block_config.py says what their features are), so a user's
vector is computed from the batch's events alone, for training, validation and new users alike.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch

from datamodules.schema import MISSING, PAD
from lit_modules.lightfm_block_config import check_lightfm

log = logging.getLogger(__name__)


def fit_lightfm(fit_data: dict[str, Any], factors: int, loss: str, learning_rate: float, item_alpha: float, user_alpha: float, epochs: int, random_state: int) -> Any:
    """lightfm's LightFM fitted on one thread (so a seed repeats the fit): cells > 0 are positives, |cell| their sample weight."""
    from lightfm import LightFM
    from scipy.sparse import coo_matrix

    cells = fit_data["cells"].tocoo()
    weights = coo_matrix((np.abs(cells.data), (cells.row, cells.col)), shape=cells.shape, dtype=np.float32)
    model = LightFM(
        no_components=factors, loss=loss, learning_rate=learning_rate, item_alpha=item_alpha, user_alpha=user_alpha, random_state=random_state
    )
    model.fit(cells, user_features=fit_data["user_features"], item_features=fit_data["item_features"], sample_weight=weights, epochs=epochs, num_threads=1)
    return model


def value_shares(ids: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] share of each feature id among a user's valid ids ([B, N], -1 where none); zeros without any."""
    valid = ids >= 0
    counts = torch.zeros(ids.shape[0], width, device=ids.device).scatter_add_(1, ids.clamp(min=0), valid.float())
    return counts / counts.sum(1, keepdim=True).clamp(min=1.0)


class LightFMBlock(L.LightningModule):
    """Arguments: the keys of LightFMConfig (docs there) plus what its data_args derives from the data.

    fit_data: the training matrices (cells, user_features, item_features); with no users (a
    finished run rebuilt by experiments.embed.load_run) nothing is fitted and the embeddings are loaded afterwards.
    """

    def __init__(
        self,
        n_items: int,
        event_field: str | None,
        event_weights: list[float],
        feature_widths: dict[str, int],
        fit_data: dict[str, Any],
        field: str = "sku",
        weights: dict[str, float] | None = None,
        item_features: list[str] = (),
        user_features: list[str] = (),
        factors: int = 64,
        loss: str = "warp",
        learning_rate: float = 0.05,
        item_alpha: float = 0.0,
        user_alpha: float = 0.0,
        epochs: int = 10,
        random_state: int = 0,
    ):
        super().__init__()
        check_lightfm(factors, loss, learning_rate, item_alpha, user_alpha, epochs)
        weights = None if weights is None else {str(k): float(v) for k, v in weights.items()}
        event_weights, item_features, user_features = [float(w) for w in event_weights], [str(f) for f in item_features], [str(f) for f in user_features]
        feature_widths = {str(f): int(n) for f, n in feature_widths.items()}
        self.save_hyperparameters(ignore=["fit_data"])  # plain types only; the matrices are the data, not settings
        self.field, self.event_field, self.user_fields, self.widths = field, event_field, user_features, feature_widths
        n_features = n_items + sum(feature_widths[f] for f in user_features)
        self.register_buffer("user_feature_embeddings", torch.zeros(n_features, factors))
        self.register_buffer("weight_of_event_type", torch.tensor(event_weights, dtype=torch.float32), persistent=False)
        self.fit_seconds: float | None = None  # None: rebuilt to load fitted embeddings
        if fit_data["cells"].shape[0]:
            started = time.perf_counter()
            model = fit_lightfm(fit_data, factors, loss, learning_rate, item_alpha, user_alpha, epochs, random_state)
            self.user_feature_embeddings.copy_(torch.from_numpy(np.asarray(model.user_embeddings)))
            self.fit_seconds = time.perf_counter() - started
            log.info("LightFM on %d users x %d %s values: %.1f s", fit_data["cells"].shape[0], n_items, field, self.fit_seconds)

    def item_shares(self, batch: dict) -> torch.Tensor:
        """[B, n_items] the user's summed event weights per item, divided by their absolute sum (zeros without any)."""
        items = batch["tokens"][self.field]
        if self.event_field is None:
            w = torch.ones(items.shape, device=items.device)
        else:
            w = self.weight_of_event_type[batch["tokens"][self.event_field]]
        w = w * ((items != PAD) & (items != MISSING))
        cells = torch.zeros(items.shape[0], self.hparams.n_items, device=items.device).scatter_add_(1, items, w)
        return cells / cells.abs().sum(1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)

    def feature_ids(self, batch: dict, name: str) -> torch.Tensor:
        """[B, T * L] feature ids of the field's values on every event (as the config's feature_ids), -1 where none."""
        if name in batch["codes"]:
            codes = batch["codes"][name]
            vocab = self.widths[name] // codes.shape[-1]
            ids = codes + vocab * torch.arange(codes.shape[-1], device=codes.device)
        else:
            codes = ids = batch["tokens"][name][..., None]
        return torch.where((codes == PAD) | (codes == MISSING), -1, ids).flatten(1)

    def embed(self, batch: dict) -> torch.Tensor:
        """The user's feature row times the user feature embeddings; a user with neither weighted items nor feature values gets zeros."""
        rows = [self.item_shares(batch), *(value_shares(self.feature_ids(batch, f), self.widths[f]) for f in self.user_fields)]
        return torch.cat(rows, 1) @ self.user_feature_embeddings
