"""Logging shared by the sequence modules: one total loss plus its named parts, per stage."""

from __future__ import annotations

import lightning.pytorch as L
import torch


def log_loss_parts(module: L.LightningModule, parts: dict[str, torch.Tensor], stage: str, batch_size: int) -> torch.Tensor:
    """Sum the parts, log `<stage>/loss` and `<stage>/loss_<part>` (per step too while training); return the sum.

    sync_dist: under DDP the logged value is the mean over ranks, so checkpointing and early
    stopping see the loss of all validation users, not of rank 0's shard.
    """
    loss = torch.stack(list(parts.values())).sum()
    on_step = stage == "train"
    module.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=batch_size, sync_dist=True)
    for name, value in parts.items():
        module.log(f"{stage}/loss_{name}", value, on_step=on_step, on_epoch=True, batch_size=batch_size, sync_dist=True)
    return loss
