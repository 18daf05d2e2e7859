"""What a checkpoint needs beyond Lightning's own state for a resumed run to equal an uninterrupted one.

Lightning restores weights, optimizer, schedulers, loop counters and callback states.
Two things it does not: the position inside the epoch of our batch sampler (its epoch and
how many batches of it were already trained on) and the random number generators
(torch, numpy, python) that dropout and random slicing draw from. `ResumeState` saves
both in the checkpoint and puts them back just before training continues. Everything
is stored as plain lists and tensors, so the checkpoint loads with `weights_only=True`.
`AtomicCheckpointIO` makes every checkpoint write a rename.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from datamodules.atomic import atomic_write


def capture_rng() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states as weights_only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(L.Callback):
    """Saves the sampler position and the RNG states in every checkpoint; restores them when a fit resumes.

    The position goes to the DataModule's `train_position` (EventDataModule hands it to the
    batch sampler of the train loader it builds next, before any batch is drawn, worker
    processes included); the RNG states are restored when training starts.
    """

    def __init__(self, last_checkpoint: Path | None = None) -> None:
        self.position = {"epoch": 0, "resume_at": 0}  # next batch to train: epoch and batches of it already done
        self.pending_rng: dict[str, Any] | None = None
        self.last_checkpoint = last_checkpoint  # written when a SIGTERM stops the fit

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        done = batch_idx + 1
        if done >= trainer.num_training_batches:  # the epoch is complete (also when limit_train_batches cut it)
            self.position = {"epoch": trainer.current_epoch + 1, "resume_at": 0}
        else:
            self.position = {"epoch": trainer.current_epoch, "resume_at": done}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning stops a SIGTERM'd fit (a scheduler's preemption) with SIGTERMException after a whole batch;
        # the state there is a resumable one, so keep it: resume=true continues from this batch, not the last N-step save.
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and self.last_checkpoint is not None:
            trainer.save_checkpoint(self.last_checkpoint, weights_only=False)

    def state_dict(self) -> dict[str, Any]:
        return {"position": dict(self.position), "rng": capture_rng()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Runs while Lightning restores, before the train loader exists.
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            return
        self.position = dict(state["position"])
        self.pending_rng = state["rng"]
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "train_position"):
            trainer.datamodule.train_position = dict(self.position)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the sanity check, before the first training batch: nothing draws random numbers in between.
        if self.pending_rng is not None:
            restore_rng(self.pending_rng)
            self.pending_rng = None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary sibling and renamed, so a kill mid-save leaves the previous last.ckpt whole.

    (Lightning's own save renames from the system temp folder, which is a copy, not a
    rename, when that folder is on another filesystem.)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
