"""GRU-AE training: packed sequences + length bucketing against plain padded batches.

The padded side is the reference implementation's way: both GRUs run over every padded
step, the user vector is read at each user's last real step, and the loss is masked to real
positions. With the same weights and batch it computes the same loss as the packed model
(checked before timing), so the comparison is pure speed: same model, same users, one epoch
each, events per second. Both models then score the same val users to show the loss after
the same number of events.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import median_time, prepared_recsys, scaled, target
from benchmarks.encoders import token_vocab
from benchmarks.registry import ENCODERS, Report, benchmark

BATCH = 128


def padded_losses(model: Any, batch: dict) -> dict:
    """GRUAutoencoder.losses without packing: GRUs over all T steps, states read at real positions."""
    import torch
    import torch.nn.functional as F

    from datamodules.schema import SOS

    tokens, lengths = model._view(batch)
    B, T = tokens[0].shape
    enc, _ = model.encoder(model._events(tokens))
    z = enc[torch.arange(B), lengths - 1]
    prev = [F.pad(t, (1, 0), value=SOS) for t in tokens]
    x = torch.cat([model._events(prev), z[:, None, :].expand(B, T + 1, z.shape[-1])], dim=-1)
    out, _ = model.decoder(x, z[None].expand(model.hparams.layers, B, z.shape[-1]).contiguous())
    real = torch.arange(T + 1)[None, :] < (lengths + 1)[:, None]
    return model.field_losses(out[real], real, tokens, lengths)


def batches(store: Any, rows: np.ndarray, bucketed: bool) -> list[dict]:
    """One epoch of collated batches: length buckets, or a plain random split."""
    from datamodules.sequences import Collator, LengthBucketBatchSampler

    collate = Collator(store)
    if bucketed:
        order = LengthBucketBatchSampler(store.lengths[rows], BATCH, seed=0).batches()
    else:
        perm = np.random.default_rng(0).permutation(len(rows))
        order = [perm[i : i + BATCH] for i in range(0, len(rows), BATCH)]
    return [collate(rows[b]) for b in order]


def train_epoch(model: Any, epoch: list[dict], loss_fn: Any) -> None:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=model.hparams.lr)
    model.train()
    for b in epoch:
        opt.zero_grad()
        sum(loss_fn(model, b).values()).backward()
        opt.step()


def val_loss(model: Any, epoch: list[dict]) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        return float(np.mean([sum(model.losses(b).values()).item() for b in epoch]))


@benchmark("training")
def training(scale: float, repeats: int, out_dir: Path) -> Report:
    import copy

    import torch

    prep = prepared_recsys(scaled(1_000_000, scale, 2000))
    store = prep.store
    train_rows = np.flatnonzero(~prep.is_val)[: scaled(2000, scale, 64)]
    val_rows = np.flatnonzero(prep.is_val)[: scaled(1000, scale, 32)]
    torch.manual_seed(0)
    init = ENCODERS["gru_autoencoder"](token_vocab(store), 128)

    check = batches(store, train_rows[:BATCH], bucketed=False)[0]
    init.eval()
    with torch.no_grad():
        a, b = sum(init.losses(check).values()).item(), sum(padded_losses(init, check).values()).item()
    if abs(a - b) > 1e-4 * max(1.0, abs(a)):
        raise AssertionError(f"packed loss {a} != padded loss {b} on the same batch and weights")

    sides = {
        "packed + length buckets": (True, type(init).losses),
        "padded, random batches (reference)": (False, padded_losses),
    }
    events = int(store.lengths[train_rows].sum())
    val = batches(store, val_rows, bucketed=True)
    rows, speed = [], {}
    for name, (bucketed, loss_fn) in sides.items():
        epoch = batches(store, train_rows, bucketed)
        steps = sum(int(b["lengths"].max()) * len(b["lengths"]) for b in epoch)
        models = []

        def run() -> None:
            m = copy.deepcopy(init)
            train_epoch(m, epoch, loss_fn)
            models.append(m)

        secs = median_time(run, repeats)[0]
        speed[name] = events / secs
        rows.append(
            {"side": name, "events": events, "padded_steps": steps, "seconds": secs, "events_per_s": events / secs, "val_loss_after_epoch": val_loss(models[0], val)}
        )
    ratio = speed["packed + length buckets"] / speed["padded, random batches (reference)"]
    gap = abs(rows[0]["val_loss_after_epoch"] - rows[1]["val_loss_after_epoch"]) / rows[1]["val_loss_after_epoch"]
    return Report(
        {"model": "gru_ae_all", "batch_size": BATCH, "train_users": len(train_rows), "val_users": len(val_rows), "events": events, "loop": "plain PyTorch (forward, backward, AdamW), collation excluded"},
        rows,
        [target("packed + buckets >= 1.5x padded events/s", ratio, 1.5)],
        [
            f"same loss on the same batch and weights: packed {a:.6f}, padded {b:.6f}",
            f"val loss after the same {events:,} events differs by {gap:.1%} (batch composition differs, the math does not)",
        ],
    )
