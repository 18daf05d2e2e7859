"""The text DataModule: same users and splits as the event DataModule, one plain-text row per user for embedding."""

from __future__ import annotations

import numpy as np
import torch

from datamodules.datamodule import EventDataModule, TextDataModule
from lit_modules.lm import MINILM, load_tokenizer
from tests.conftest import generic_config


def test_text_loaders_cover_the_splits(tmp_path, csv_data):
    events, labels = csv_data
    base = EventDataModule(generic_config(events, labels, tmp_path / "cache"), seed=0)
    text = TextDataModule(base, load_tokenizer(MINILM), max_tokens=64, formats=("plain", "json"), pack_length=128)
    seen = np.concatenate([b["index"].numpy() for b in text.predict_dataloader()])
    assert sorted(seen.tolist()) == list(range(len(base.data.store)))
    val = np.concatenate([b["index"].numpy() for b in text.val_dataloader()])
    assert set(val.tolist()) == set(np.flatnonzero(base.data.is_val).tolist())
    train = list(text.train_dataloader())
    documents = np.concatenate([b["index"].numpy() for b in train])
    assert sorted(documents.tolist()) == sorted(np.flatnonzero(~base.data.is_val).tolist() * 2)  # two formats
    assert all(b["input_ids"].shape[1] == 128 and "position_ids" in b for b in train)  # packed rows
    first = next(iter(text.predict_dataloader()))
    assert first["input_ids"].shape[1] <= 64 and torch.equal(first["attention_mask"].sum(1) > 0, torch.ones(len(first["index"]), dtype=torch.bool))
