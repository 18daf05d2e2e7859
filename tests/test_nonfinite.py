"""Non-finite losses: the run stops at the step naming users and loss parts, or skips the batch and counts it."""

from __future__ import annotations

import json
import re

import lightning.pytorch as L
import pytest
import torch

from callbacks.nonfinite import NonFiniteError, NonFiniteGuard
from datamodules.datamodule import EventDataModule
from experiments.run import main
from lit_modules.gru_autoencoder import GRUAutoencoder
from tests.conftest import generic_config


def csv_args(csv_data, tmp_path) -> list[str]:
    events, labels = csv_data
    return [
        "experiment=gru_ae_generic_csv", f"data.path={events}", f"data.labels.path={labels}", "data.schema.user=client",
        "data.schema.time=ts", "data.schema.fields=[{name: event_type}, {name: merchant}, {name: amount, kind: numeric}]",
        f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}", "logger.wandb=false", "model.hidden=8",
        "model.emb_dim=4", "trainer.max_epochs=2", "data.batch_size=8", "probe.baselines=[]",
    ]  # fmt: skip


def test_diverging_run_stops_with_step_users_and_loss_parts(csv_data, tmp_path, capsys):
    # A learning rate this large overflows the weights after the first step: a real divergence, not an injected NaN.
    code = main(csv_args(csv_data, tmp_path) + ["model.lr=1e36", "run_name=boom"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "training error: non-finite" in err
    step = int(re.search(r"at global step (\d+)", err).group(1))
    assert step >= 1  # the first step is finite; the overflow shows at a later one
    assert re.search(r"batch user ids: \[u\d{3}", err)
    for part in ("train/loss_event_type", "train/loss_merchant", "train/loss_amount"):
        assert part in err
    assert not (tmp_path / "out" / "gru_ae_generic_csv" / "boom" / "metrics.json").exists()


class PoisonedAutoencoder(GRUAutoencoder):
    """The real GRU-AE whose loss becomes NaN on any batch holding one chosen user (store row)."""

    def __init__(self, *args, poisoned_row: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.poisoned_row = poisoned_row

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * torch.nan if (batch["index"] == self.poisoned_row).any() else loss


class ParamWatch(L.Callback):
    """Records whether the parameters changed over each batch that held the poisoned user."""

    def __init__(self, row: int):
        self.row, self.unchanged = row, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch["index"] == self.row).any():
            self.unchanged.append(all(torch.equal(a, p) for a, p in zip(self.before, pl_module.parameters())))


def test_skip_mode_leaves_weights_untouched_and_counts(csv_data, tmp_path):
    events, labels = csv_data
    dm = EventDataModule(generic_config(events, labels, tmp_path / "cache", batch_size=8), seed=0)
    row = int(torch.tensor(~dm.data.is_val).nonzero()[0])  # a training user
    module = PoisonedAutoencoder(dm.data.store.vocab_sizes, ["merchant", "amount"], emb_dim=4, hidden=8, layers=1, poisoned_row=row)
    guard, watch = NonFiniteGuard("skip"), ParamWatch(row)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[guard, watch])  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert guard.skipped == 3 and watch.unchanged == [True, True, True]  # one poisoned batch per epoch
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert trainer.global_step > 3  # the other batches trained


def test_skip_mode_counts_in_metrics_json(csv_data, tmp_path):
    assert main(csv_args(csv_data, tmp_path) + ["trainer.on_nonfinite=skip", "run_name=ok"]) == 0
    metrics = json.loads((tmp_path / "out" / "gru_ae_generic_csv" / "ok" / "metrics.json").read_text())
    assert metrics["train/nonfinite_skipped"] == 0


def test_error_mode_raises_inside_fit(csv_data, tmp_path):
    events, labels = csv_data
    dm = EventDataModule(generic_config(events, labels, tmp_path / "cache", batch_size=8), seed=0)
    module = PoisonedAutoencoder(dm.data.store.vocab_sizes, ["merchant"], emb_dim=4, hidden=8, layers=1, poisoned_row=int((~dm.data.is_val).nonzero()[0][0]))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[NonFiniteGuard("error")])  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"non-finite loss at global step \d+ .*batch user ids: \[.*u\d{3}"):
        trainer.fit(module, datamodule=dm)


def test_unknown_mode_is_a_config_error():
    from callbacks.nonfinite import MODES
    from experiments.config import NONFINITE_MODES, ConfigError, compose

    assert NONFINITE_MODES == MODES
    with pytest.raises(ConfigError, match="trainer.on_nonfinite: 'ignore'"):
        compose(["trainer.on_nonfinite=ignore"])
