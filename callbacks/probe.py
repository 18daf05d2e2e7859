"""The shared evaluation: embed every user, fit a linear probe per target, report ROC-AUC and KS.

One probe for every method keeps tables comparable: a standardised logistic regression
measures what is linearly readable from the embedding, not what a strong head can learn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import lightning.pytorch as L
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import Strategy

from callbacks.metrics import ks_statistic, macro_ovr, roc_auc
from callbacks.wandb_report import log_metrics
from datamodules.targets import EVAL, FIT, Target

CV_GRID = [1e-3, 1e-2, 1e-1, 1.0, 10.0]  # C candidates when the probe picks C itself


def _module_device(module: torch.nn.Module) -> torch.device:
    """LightningModules know their device; a plain nn.Module is wherever its first parameter is."""
    if isinstance(module, L.LightningModule):
        return module.device
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def embed_all(module: torch.nn.Module, dataloader: Iterable[dict], strategy: Strategy | None = None) -> np.ndarray:
    """float32 [U, D] with row u = embedding of store row u, whatever order the batches come in.

    The dataloader must cover every row 0..U-1 exactly once; anything else would silently
    misalign embeddings and labels, so it raises. Under a distributed strategy each rank
    embeds its own shard; the shards are gathered so every rank returns all U rows, and a
    row seen twice (the padding that gives every rank the same number of batches) is kept once.
    """
    device = _module_device(module)
    was_training = module.training
    module.eval()
    indices: list[np.ndarray] = []
    chunks: list[np.ndarray] = []
    try:
        with torch.no_grad():
            for batch in dataloader:
                out = module.embed(move_data_to_device(batch, device))
                indices.append(batch["index"].cpu().numpy())
                chunks.append(out.detach().float().cpu().numpy())
    finally:
        module.train(was_training)
    if not chunks:
        raise ValueError("embed_all: the dataloader yielded no batches")
    index = np.concatenate(indices)
    rows = np.concatenate(chunks)
    if rows.ndim != 2 or len(rows) != len(index):
        raise ValueError(f"embed_all: embed() must return [B, D] per batch; got {rows.shape} for {len(index)} rows")
    if strategy is not None and strategy.world_size > 1:
        index, rows = gather_rows(strategy, index, rows)
        index, first = np.unique(index, return_index=True)
        rows = rows[first]
    if not np.array_equal(np.sort(index), np.arange(len(index))):
        raise ValueError(f"embed_all: batch indices must cover rows 0..{len(index) - 1} exactly once")
    out = np.empty_like(rows)
    out[index] = rows
    return out


def gather_rows(strategy: Strategy, index: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (index, rows) concatenated in rank order, on every rank; ranks may hold different counts."""
    device = strategy.root_device

    def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(strategy.world_size)]
        torch.distributed.all_gather(out, t)
        return out

    counts = [int(c) for c in all_gather(torch.tensor([len(index)], device=device))]
    longest = max(counts)
    # all_gather needs the same shape on every rank: pad to the longest shard, cut the padding off after
    idx = torch.zeros(longest, dtype=torch.long, device=device)
    idx[: len(index)] = torch.from_numpy(index.astype(np.int64))
    emb = torch.zeros((longest, rows.shape[1]), dtype=torch.float32, device=device)
    emb[: len(rows)] = torch.from_numpy(rows.astype(np.float32))
    idx_all, emb_all = all_gather(idx), all_gather(emb)
    return (
        torch.cat([t[:n] for t, n in zip(idx_all, counts)]).cpu().numpy(),
        torch.cat([t[:n] for t, n in zip(emb_all, counts)]).cpu().numpy(),
    )


def probe_embeddings(
    embeddings: np.ndarray,
    targets: Sequence[Target],
    C: float | None = None,
    seed: int = 0,
    max_iter: int = 1000,
    scores: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, float]:
    """Fit StandardScaler + LogisticRegression on each target's FIT rows; AUC and KS on its EVAL rows.

    C=None picks the L2 strength per target by stratified 5-fold cross-validation on the FIT
    rows alone (ROC-AUC over CV_GRID), so EVAL users never influence the probe.
    Returns {"probe/<target>/auc", "probe/<target>/ks"} per target (multiclass: macro one-vs-rest).
    `scores`, if given, receives each binary target's EVAL (is positive, positive-class
    probability) pair, the input of a ROC curve.
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [U, D], got shape {x.shape}")
    results: dict[str, float] = {}
    for t in targets:
        if len(t.labels) != len(x) or len(t.split) != len(x):
            raise ValueError(
                f"target {t.name!r}: {len(t.labels)} labels / {len(t.split)} split entries for {len(x)} embedding rows"
            )
        if t.kind not in ("binary", "multiclass"):
            raise ValueError(f"target {t.name!r}: unknown kind {t.kind!r} (expected 'binary' or 'multiclass')")
        labelled = t.labels >= 0
        fit = labelled & (t.split == FIT)
        ev = labelled & (t.split == EVAL)
        bad = int((~np.isfinite(x[fit | ev])).sum())
        if bad:
            raise ValueError(f"target {t.name!r}: embeddings of its FIT/EVAL users hold {bad} non-finite values")
        y_fit, y_eval = t.labels[fit], t.labels[ev]
        if len(np.unique(y_fit)) < 2:
            raise ValueError(f"target {t.name!r}: FIT users hold {len(np.unique(y_fit))} classes; the probe needs 2+")

        if C is None:
            folds = StratifiedKFold(min(5, int(np.bincount(y_fit).min()) or 2), shuffle=True, random_state=seed)
            scoring = "roc_auc" if t.kind == "binary" else "roc_auc_ovr"
            head = LogisticRegressionCV(
                Cs=CV_GRID, l1_ratios=(0.0,), cv=folds, scoring=scoring, max_iter=max_iter, random_state=seed, use_legacy_attributes=False
            )
        else:
            head = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        model = make_pipeline(StandardScaler(), head)
        model.fit(x[fit], y_fit)
        # Columns follow the target's classes, so a class missing from FIT scores 0 rather than shifting columns.
        probs = np.zeros((int(ev.sum()), len(t.classes)))
        probs[:, model.classes_] = model.predict_proba(x[ev])

        try:
            if t.kind == "binary":
                auc, ks = roc_auc(y_eval == 1, probs[:, 1]), ks_statistic(y_eval == 1, probs[:, 1])
                if scores is not None:
                    scores[t.name] = (y_eval == 1, probs[:, 1])
            else:
                auc, ks = macro_ovr(y_eval, probs, roc_auc), macro_ovr(y_eval, probs, ks_statistic)
        except ValueError as e:
            raise ValueError(f"target {t.name!r} (EVAL users): {e}") from e
        results[f"probe/{t.name}/auc"] = auc
        results[f"probe/{t.name}/ks"] = ks
    return results


class LinearProbe(L.Callback):
    """Probe every user's embedding at the end of fit, and every N-th validation epoch if asked.

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
        self.results = probe_embeddings(self.embeddings, self.targets, C=self.C, seed=self.seed, max_iter=self.max_iter)
        for logger in trainer.loggers:
            log_metrics(logger, self.results, trainer.global_step)
