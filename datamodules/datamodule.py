"""The one DataModule every method trains on: cached sequences, train/val users, batches by length."""

from __future__ import annotations

import lightning.pytorch as L
import numpy as np
import torch

from datamodules.config import DataConfig
from datamodules.preprocess import Prepared, prepare
from datamodules.sequences import Collator, LengthBucketBatchSampler, UserIndexDataset


class EventDataModule(L.LightningDataModule):
    """Train on non-val users, validate on val users, embed (predict) every user."""

    def __init__(self, cfg: DataConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.prepared: Prepared | None = None

    def prepare_data(self) -> None:
        prepare(self.cfg, self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.prepared is None:
            self.prepared = prepare(self.cfg, self.seed)

    @property
    def data(self) -> Prepared:
        if self.prepared is None:
            self.setup()
        return self.prepared

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return self.data.store.vocab_sizes

    def loader(self, rows: np.ndarray, shuffle: bool) -> torch.utils.data.DataLoader:
        store = self.data.store
        if self.cfg.bucket_by_length:
            lengths = store.lengths[rows]
            sampler = LengthBucketBatchSampler(lengths, self.cfg.batch_size, shuffle=shuffle, seed=self.seed)
        else:
            base = torch.utils.data.RandomSampler(rows, generator=torch.Generator().manual_seed(self.seed)) if shuffle else range(len(rows))
            sampler = torch.utils.data.BatchSampler(base, self.cfg.batch_size, drop_last=False)
        return torch.utils.data.DataLoader(
            UserIndexDataset(rows),
            batch_sampler=sampler,
            collate_fn=Collator(store),
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(np.flatnonzero(~self.data.is_val), shuffle=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(np.flatnonzero(self.data.is_val), shuffle=False)

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(np.arange(len(self.data.store)), shuffle=False)
