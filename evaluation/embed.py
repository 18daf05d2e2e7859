"""Embed every user with a module's `embed`, rows placed by store index, shards gathered across ranks."""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as L
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import Strategy


def _module_device(module: torch.nn.Module) -> torch.device:
    """LightningModules know their device; a plain nn.Module is wherever its first parameter is."""
    if isinstance(module, L.LightningModule):
        return module.device
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def embed_all(module: torch.nn.Module, dataloader: Iterable[dict], strategy: Strategy | None = None) -> np.ndarray:
    """float32 [U, D] with row u = embedding of store row u, whatever order the batches come in.

    The dataloader must cover every row 0..U-1 exactly once; anything else would silently
    misalign embeddings and labels, so it raises. Under a distributed strategy each rank
    embeds its own shard; the shards are gathered so every rank returns all U rows, and a
    row seen twice (the padding that gives every rank the same number of batches) is kept once.
    """
    device = _module_device(module)
    was_training = module.training
    module.eval()
    indices: list[np.ndarray] = []
    chunks: list[np.ndarray] = []
    try:
        with torch.no_grad():
            for batch in dataloader:
                out = module.embed(move_data_to_device(batch, device))
                indices.append(batch["index"].cpu().numpy())
                chunks.append(out.detach().float().cpu().numpy())
    finally:
        module.train(was_training)
    if not chunks:
        raise ValueError("embed_all: the dataloader yielded no batches")
    index = np.concatenate(indices)
    rows = np.concatenate(chunks)
    if rows.ndim != 2 or len(rows) != len(index):
        raise ValueError(f"embed_all: embed() must return [B, D] per batch; got {rows.shape} for {len(index)} rows")
    if strategy is not None and strategy.world_size > 1:
        index, rows = gather_rows(strategy, index, rows)
        index, first = np.unique(index, return_index=True)
        rows = rows[first]
    if not np.array_equal(np.sort(index), np.arange(len(index))):
        raise ValueError(f"embed_all: batch indices must cover rows 0..{len(index) - 1} exactly once")
    out = np.empty_like(rows)
    out[index] = rows
    return out


def gather_rows(strategy: Strategy, index: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (index, rows) concatenated in rank order, on every rank; ranks may hold different counts."""
    device = strategy.root_device

    def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(strategy.world_size)]
        torch.distributed.all_gather(out, t)
        return out

    counts = [int(c) for c in all_gather(torch.tensor([len(index)], device=device))]
    longest = max(counts)
    # all_gather needs the same shape on every rank: pad to the longest shard, cut the padding off after
    idx = torch.zeros(longest, dtype=torch.long, device=device)
    idx[: len(index)] = torch.from_numpy(index.astype(np.int64))
    emb = torch.zeros((longest, rows.shape[1]), dtype=torch.float32, device=device)
    emb[: len(rows)] = torch.from_numpy(rows.astype(np.float32))
    idx_all, emb_all = all_gather(idx), all_gather(emb)
    return (
        torch.cat([t[:n] for t, n in zip(idx_all, counts)]).cpu().numpy(),
        torch.cat([t[:n] for t, n in zip(emb_all, counts)]).cpu().numpy(),
    )
