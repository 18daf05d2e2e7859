"""The one DataModule every method trains on: cached sequences, train/val users, batches by length."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch

from datamodules.config import DataConfig
from datamodules.preprocess import Prepared, prepare
from datamodules.sequences import Collator, LengthBucketBatchSampler, UserIndexDataset

log = logging.getLogger(__name__)


def shard_of(trainer: L.Trainer | None) -> tuple[int, int]:
    """(rank, number of ranks) whose share of the batches this process loads; (0, 1) outside a distributed fit.

    The datamodules shard their own batches (the Trainer runs with use_distributed_sampler=False):
    Lightning cannot put its DistributedSampler inside LengthBucketBatchSampler.
    """
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


class EventDataModule(L.LightningDataModule):
    """Train on non-val users, validate on val users, embed (predict) every user."""

    def __init__(self, cfg: DataConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.prepared: Prepared | None = None
        self.train_position: dict[str, int] | None = None  # set by callbacks.resume.ResumeState when a fit resumes

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

    def loader(self, rows: np.ndarray, shuffle: bool) -> torch.utils.data.DataLoader:
        """Batches from a seeded sampler whose epoch order depends only on (seed, epoch): resumable mid-epoch.

        The loader's own generator seeds worker processes, so creating an iterator never
        draws from the global torch RNG (a resumed run would otherwise draw differently).
        """
        store = self.data.store
        rank, world = shard_of(self.trainer)
        sampler = LengthBucketBatchSampler(
            store.lengths[rows], self.cfg.batch_size, shuffle=shuffle, seed=self.seed, by_length=self.cfg.bucket_by_length,
            num_replicas=world, rank=rank,
        )
        return torch.utils.data.DataLoader(
            UserIndexDataset(rows),
            batch_sampler=sampler,
            collate_fn=Collator(store),
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        loader = self.loader(np.flatnonzero(~self.data.is_val), shuffle=True)
        if self.train_position is not None:  # a resumed fit: continue the interrupted epoch where it stopped
            loader.batch_sampler.load_state_dict(self.train_position)
            self.train_position = None
        return loader

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(np.flatnonzero(self.data.is_val), shuffle=False)

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(np.arange(len(self.data.store)), shuffle=False)


class TextDataModule(L.LightningDataModule):
    """Users rendered as text and tokenized for a language model, on the same users and splits as EventDataModule.

    Training batches may be packed (pack_length) and may cycle through several formats (the
    LLM4ES format augmentation); validation and predict batches are one user per row in
    one format (`embed_format`), so `embed` sees every user exactly once. `tokenizer` is loaded by the caller
    (`lit_modules.lm.load_tokenizer`; its padding side pads the batches): the data side
    never loads models.

    `rewrite` (LLM4ES's creative transformation, `lit_modules.rewrite.training_rewriter`)
    maps the training users' plain texts to lists of rewrites; it runs here, once, so a bad
    rewriter fails before training and every rewrite is cached before DDP ranks start. Each
    rewrite is one more training item; one over the token budget keeps its most recent
    whole lines (`fit_lines`), one whose last line alone does not fit, or that is blank, is
    dropped. `rewrite_counts` holds how many were kept, cut and dropped (also logged).
    `embed_format` is the format of validation and predict texts; `windows`, `fields` and
    `drop_unknown` go to `UserTextDataset` (a frozen reader's every event in several windows).
    """

    def __init__(
        self,
        events: EventDataModule,
        tokenizer: Any,
        max_tokens: int = 512,
        formats: tuple[str, ...] = ("plain",),
        max_events: int | None = None,
        header: bool = True,
        pack_length: int | None = None,
        block_mask: bool = False,
        rewrite: Callable[[Sequence[str]], list[list[str]]] | None = None,
        embed_format: str = "plain",
        windows: bool = False,
        fields: Sequence[str] | None = None,
        drop_unknown: bool = False,
    ):
        super().__init__()
        self.events = events
        self.tokenizer = tokenizer
        self.settings = dict(max_tokens=max_tokens, max_events=max_events, header=header, windows=windows, fields=fields, drop_unknown=drop_unknown)
        self.formats, self.embed_format = tuple(formats), embed_format
        self.pack_length, self.block_mask, self.padding_side = pack_length, block_mask, tokenizer.padding_side
        self.rewrites: list[tuple[int, str]] = []
        self.rewrite_counts: dict[str, int] = {}
        if rewrite is not None:
            self.rewrites = self.rewritten(rewrite)

    @property
    def data(self) -> Prepared:
        return self.events.data

    def rewritten(self, rewrite: Callable[[Sequence[str]], list[list[str]]]) -> list[tuple[int, str]]:
        """(store row, text) of every training user's rewrites that fit the token budget."""
        from datamodules.text_batches import UserTextDataset, fit_lines

        rows = np.flatnonzero(~self.data.is_val)
        plain = UserTextDataset(self.data, rows, self.tokenizer, **self.settings)
        extra = int(plain.append_eos)
        kept, cut, dropped = [], 0, 0
        for row, texts in zip(rows, rewrite([plain.text(i) for i in range(len(plain))])):
            for text in texts:
                fitted = fit_lines(text, self.tokenizer, self.settings["max_tokens"], extra)
                if fitted is None:
                    dropped += 1
                    continue
                cut += fitted != text.strip()
                kept.append((int(row), fitted))
        self.rewrite_counts = {"kept": len(kept), "cut": cut, "dropped": dropped}
        log.info("LLM rewrites for training: %d kept (%d cut to max_tokens=%d), %d dropped (blank, or not one line fits)",
                 len(kept), cut, self.settings["max_tokens"], dropped)  # fmt: skip
        return kept

    def loader(self, rows: np.ndarray, train: bool) -> torch.utils.data.DataLoader:
        from datamodules.text_batches import TextBatchBuilder, UserTextDataset

        formats = self.formats if train else (self.embed_format,)
        extra = self.rewrites if train else ()
        dataset = UserTextDataset(self.data, rows, self.tokenizer, formats=formats, extra=extra, **self.settings)
        pack = self.pack_length if train else None
        collate = TextBatchBuilder(self.tokenizer.pad_token_id, self.padding_side, pack, self.block_mask and pack is not None)
        rank, world = shard_of(self.trainer)
        sampler = None
        if world > 1:
            sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=self.events.seed)
        generator = torch.Generator().manual_seed(self.events.seed)  # never the global RNG, even for val/predict
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.events.cfg.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            generator=generator,
            collate_fn=collate,
            num_workers=self.events.cfg.num_workers,
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(np.flatnonzero(~self.data.is_val), train=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(np.flatnonzero(self.data.is_val), train=False)

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(np.arange(len(self.data.store)), train=False)
