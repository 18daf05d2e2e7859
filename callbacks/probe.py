"""LinearProbe: the linear probe's VAL metrics during training, the figures sweeps select and prune on.

It never scores TEST users: TEST metrics come only from the final evaluation (evaluation.evaluate).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import lightning.pytorch as L
import numpy as np

from datamodules.targets import Target
from evaluation.embed import embed_all
from evaluation.probe import probe_embeddings
from evaluation.splits import DEFAULT_FRACTIONS
from experiments.loggers import log_metrics


class LinearProbe(L.Callback):
    """Probe every user's embedding at the end of fit, and every N-th validation epoch if asked: probe_val/* only.

    dataloader_fn is called each time (e.g. datamodule.predict_dataloader) so it always sees
    the current data setup. Results go to self.results / self.embeddings and to every logger.
    With at_fit_end=False the caller probes when it chooses (e.g. after loading the best
    checkpoint) by calling `probe(trainer, module)`.
    """

    def __init__(
        self,
        targets: Sequence[Target],
        dataloader_fn: Callable[[], Iterable[dict]],
        every_n_epochs: int | None = None,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        C: float | None = None,
        seed: int = 0,
        max_iter: int = 1000,
        at_fit_end: bool = True,
    ):
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1 or None, got {every_n_epochs}")
        self.targets = list(targets)
        self.dataloader_fn = dataloader_fn
        self.every_n_epochs = every_n_epochs
        self.fractions = list(fractions)
        self.C = C
        self.seed = seed
        self.max_iter = max_iter
        self.at_fit_end = at_fit_end
        self.results: dict[str, float] = {}
        self.embeddings: np.ndarray | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs is None or trainer.sanity_checking:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.probe(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end:
            self.probe(trainer, pl_module)

    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every rank embeds its shard (a collective step: all ranks call this); rank 0 alone fits and logs."""
        # The strategy has already moved the model to CPU by on_fit_end; embed on the training device.
        device = pl_module.device
        pl_module.to(trainer.strategy.root_device)
        try:
            embeddings = embed_all(pl_module, self.dataloader_fn(), trainer.strategy)
        finally:
            pl_module.to(device)
        if not trainer.is_global_zero:
            return
        self.embeddings = embeddings
        self.results = probe_embeddings(
            self.embeddings, self.targets, self.fractions, parts=("val",), C=self.C, seed=self.seed, max_iter=self.max_iter
        )
        for logger in trainer.loggers:
            log_metrics(logger, self.results, trainer.global_step)
