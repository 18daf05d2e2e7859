"""The method contract: what the run loop, callbacks, probes and exports rely on, and the helpers that keep it.

A method is a LightningModule plus a config dataclass (`lit_modules/<method>_config.py`,
torch-free) registered in `lit_modules/registry.py`:

- Inputs, declared by the config's `inputs` class attribute: "events" (batches of
  `datamodules.sequences.Collator`: index, lengths, tokens, values, codes), "text"
  (batches of `datamodules.text` builders: index, input_ids, attention_mask, labels, ...;
  config keys listed in `data_keys` go to the TextDataModule), "instruct" (InstructUE:
  UserQA triples to train, histories with an instruction to embed), "uqa" (UQABench
  alignment: personal questions over a frozen encoder's inputs or a TextN prompt), or "runs"
  (nothing to train: embeddings assembled from finished runs). Every batch carries `index`, the store
  row of each user, so embeddings land on the right user whatever the batch order.
- Constructor: exactly the config's keys (but `name` and `data_keys`), with the same
  defaults, plus what the config's optional `data_args(prepared)` derives from the data
  (resolved field names, vocabulary sizes). tests/test_methods.py enforces it.
- `embed(batch) -> Tensor[B, D]`: float, one row per user in batch order, independent of
  batch mates and padding; called in eval mode.
- State: everything `embed` needs lives in the module's parameters and buffers (saved as
  model.safetensors). `experiments.embed.load_run` rebuilds the module from its config and
  the run's saved preprocessing with an empty store (no users), then loads those weights:
  a constructor must work without training data. A module without trainable parameters is
  not fitted by Lightning: it is embedded as built (a frozen LM; iALS and LightFM fit
  their factors in the constructor from `data_args` and report `fit_seconds`).
- Losses: logged through `log_losses` only: `<stage>/loss` (`val/loss` is what checkpoints
  and early stopping monitor) and `<stage>/loss_<part>` (what the non-finite guard names).
- Optional extras the run writes to metrics.json: `embed_stats()` (a frozen extractor's
  reading counts) and `run_metrics(datamodule)` (the method's own held-out metrics with the
  best weights: next-item Recall/NDCG, UQABench QA accuracy), printed under the probe table.
- May override `configure_optimizers`; a warmup/cosine schedule comes from `adamw_with_schedule`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import lightning.pytorch as L
import torch


@runtime_checkable
class EmbeddingMethod(Protocol):
    """What downstream code calls: one vector per user of the batch."""

    def embed(self, batch: dict) -> torch.Tensor: ...


def log_losses(module: L.LightningModule, parts: dict[str, torch.Tensor], stage: str, batch_size: int) -> torch.Tensor:
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


def adamw_with_schedule(
    module: L.LightningModule,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup_steps: int = 0,
    schedule: str = "constant",
) -> torch.optim.Optimizer | dict:
    # schedule: "constant" | "cosine", checked by the method's config
    """AdamW; with `warmup_steps` a linear warmup, with schedule="cosine" a cosine decay to 0 at the
    trainer's last estimated step (stepped per optimizer step). Constant without warmup: the bare optimizer."""
    opt = torch.optim.AdamW(list(params), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    warmup, cosine = warmup_steps, schedule == "cosine"
    if not warmup and not cosine:
        return opt
    total = max(int(module.trainer.estimated_stepping_batches), warmup + 1) if cosine else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
