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


def experiment_section(experiment: str, group: str) -> dict:
    """An experiment's own `data` or `model` section: its preset with the experiment file's overrides on top."""
    from experiments.config import load_yaml

    body = load_yaml("experiment", experiment)
    return {**load_yaml(group, body["defaults"][group]), **(body.get(group) or {})}


def unset_keys(section: dict, prefix: str) -> list[str]:
    """Keys a config leaves to the user (`???`), as `prefix.key`."""
    return [f"{prefix}.{k}" for k, v in section.items() if v == "???"]


def experiment_source(experiment: str) -> str:
    """The data source an experiment names, read from its own config."""
    return experiment_section(experiment, "data")["source"]


def data_args_for(source: str, csv_data, ml100k_cache, recsys_dir, tmp_path) -> list[str]:
    """Where the tests keep data of each source: the shared ml100k cache, a mini recsys layout, the CSV fixture."""
    if source == "ml100k":
        return [f"data.cache_dir={ml100k_cache}"]
    if source == "recsys2025":
        return [f"data.path={recsys_dir}", f"data.cache_dir={tmp_path / 'cache'}"]
    if source == "generic":
        events, labels = csv_data
        return [f"data.path={events}", f"data.labels.path={labels}", "data.schema.user=client", "data.schema.time=ts",
                f"data.cache_dir={tmp_path / 'cache'}"]
    raise ValueError(f"no test data for source {source!r}")
