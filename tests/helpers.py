"""Small helpers shared by the sequence-model tests."""

from __future__ import annotations

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F

from datamodules.sequences import Collator, SequenceStore, UserIndexDataset


def with_pad_columns(batch: dict, extra: int = 7) -> dict:
    """The same batch with `extra` more pad columns on every tokens and values tensor."""
    return {
        **batch,
        "tokens": {f: F.pad(t, (0, extra)) for f, t in batch["tokens"].items()},
        "values": {f: F.pad(t, (0, extra)) for f, t in batch["values"].items()},
    }


def loader(store: SequenceStore, shuffle: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        UserIndexDataset(np.arange(len(store))), batch_size=8, shuffle=shuffle, collate_fn=Collator(store)
    )


def quiet_trainer(max_epochs: int) -> L.Trainer:
    """A CPU Trainer without loggers, checkpoints or progress bars."""
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
