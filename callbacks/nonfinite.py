"""Non-finite losses and gradients, caught at the step they appear.

`NonFiniteGuard` looks at the loss after the forward pass and at every gradient after the
backward pass, before the optimizer steps (under fp16 mixed precision only at the loss:
the grad scaler expects overflowing gradients and skips those steps itself).
`on_nonfinite=error` stops the run with a `NonFiniteError` naming the global step, the
batch's user ids and the loss parts the module logged (`train/loss_*`);
`on_nonfinite=skip` drops that batch's gradients so the optimizer leaves every parameter
as it was, and counts the skipped batches (metrics.json: `train/nonfinite_skipped`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch

MODES = ("error", "skip")


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient; the message names step, users and loss parts."""


class NonFiniteGuard(L.Callback):
    def __init__(self, mode: str = "error") -> None:
        if mode not in MODES:
            raise ValueError(f"trainer.on_nonfinite: {mode!r}; choose from {MODES}")
        self.mode = mode
        self.skipped = 0
        self.batch: Any = None
        self.loss_finite = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.batch = batch

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self.loss_finite = self.loss_finite and bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        bad = [] if scaled_fp16(trainer) else [name for name, p in pl_module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        loss_finite, self.loss_finite = self.loss_finite, True  # the next step starts clean (accumulated batches included)
        if loss_finite and not bad:
            return
        if self.mode == "error":
            raise NonFiniteError(self.describe(trainer, bad, loss_finite))
        for group in optimizer.param_groups:  # a parameter without a gradient is left untouched by the optimizer
            for p in group["params"]:
                p.grad = None
        self.skipped += 1

    def describe(self, trainer: L.Trainer, bad_grads: list[str], loss_finite: bool) -> str:
        what = "gradient" if loss_finite else "loss"
        parts = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/loss") and not k.endswith("_epoch")}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(parts.items())) or "none logged"
        grads = f"; non-finite gradients in {len(bad_grads)} parameters, first {bad_grads[0]}" if bad_grads else ""
        return (
            f"non-finite {what} at global step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"batch user ids: {batch_users(trainer, self.batch)}; loss parts: {shown}{grads}. "
            "Lower model.lr, set trainer.gradient_clip_val, or set trainer.on_nonfinite=skip to skip such batches."
        )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}  # a resumed run keeps counting

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = int(state_dict["skipped"])


def scaled_fp16(trainer: L.Trainer) -> bool:
    """fp16 mixed precision: the grad scaler expects overflowing gradients now and then and skips those steps itself."""
    return str(trainer.precision) in ("16-mixed", "16")


def batch_users(trainer: L.Trainer, batch: Any, limit: int = 20) -> str:
    """The user ids of a batch (store rows mapped through the DataModule's store), at most `limit` shown."""
    rows = batch.get("index") if isinstance(batch, dict) else None
    if rows is None:
        return "unknown (the batch has no 'index')"
    rows = rows.detach().cpu().tolist()
    data = getattr(trainer.datamodule, "data", None)
    ids = [str(data.store.user_ids[r]) for r in rows] if data is not None else [f"row {r}" for r in rows]
    more = f" ... ({len(ids)} users)" if len(ids) > limit else ""
    return "[" + ", ".join(ids[:limit]) + "]" + more
