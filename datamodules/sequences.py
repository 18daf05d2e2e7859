"""User sequences as flat numpy arrays + offsets, and the batching around them.

No per-user Python objects: a batch is gathered from the flat arrays with one
vectorised index, so loading stays cheap next to a training step.

A batch is a dict:
    index    LongTensor[B]            row of each user in the store
    lengths  LongTensor[B]            real events per user (>= 1)
    tokens   {field: LongTensor[B,T]} vocabulary ids, right-padded with 0 (PAD)
    values   {field: FloatTensor[B,T]} raw numeric values, 0.0 at pad and where missing
    codes    {field: LongTensor[B,T,L]} fixed-length code ids per event (codes fields), 0 at pad
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from datamodules.store import SequenceStore


class UserIndexDataset(torch.utils.data.Dataset):
    """Items are store rows; `Collator` gathers the events of a whole batch at once."""

    def __init__(self, indices: np.ndarray):
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> int:
        return int(self.indices[i])


class Collator:
    """Store rows -> padded batch dict (see module docstring). Picklable for worker processes."""

    def __init__(self, store: SequenceStore):
        self.store = store

    def __call__(self, rows: Sequence[int]) -> dict:
        s = self.store
        rows = np.asarray(rows, dtype=np.int64)
        starts = s.offsets[rows]
        lengths = s.offsets[rows + 1] - starts
        width = int(lengths.max())
        steps = np.arange(width)
        mask = steps[None, :] < lengths[:, None]
        gather = np.where(mask, starts[:, None] + steps[None, :], 0)
        tokens = {f: torch.from_numpy(np.where(mask, s.tokens[f][gather], 0).astype(np.int64)) for f in s.tokens}
        values = {}
        for f, arr in s.values.items():
            v = arr[gather]
            values[f] = torch.from_numpy(np.where(mask & np.isfinite(v), v, 0.0).astype(np.float32))
        codes = {f: torch.from_numpy(np.where(mask[..., None], arr[gather], 0).astype(np.int64)) for f, arr in s.codes.items()}
        return {
            "index": torch.from_numpy(rows),
            "lengths": torch.from_numpy(lengths),
            "tokens": tokens,
            "values": values,
            "codes": codes,
        }


class LengthBucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of similar length, in a seeded random order that changes with the epoch.

    Positions are shuffled, cut into pools of `pool_batches` batches, each pool sorted by
    length (unless `by_length` is off) and cut into batches; the batch order is shuffled
    again. Less padding per batch, still a different mix every epoch. Yields positions into
    `lengths`. The order of epoch e depends only on (seed, e), so a run resumed mid-epoch
    replays the same epoch and skips the batches it already trained on (`load_state_dict`).

    With num_replicas > 1 (DDP) every rank computes the same batch list and takes every
    num_replicas-th batch from position `rank`; the list is first padded by repeating its
    first batches so every rank gets the same number (a rank short of a batch would hang
    the gradient all-reduce). A repeated batch is seen twice in that epoch.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        pool_batches: int = 50,
        drop_last: bool = False,
        by_length: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pool = max(1, pool_batches) * batch_size
        self.drop_last = drop_last
        self.by_length = by_length
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.resume_at = 0  # batches of the next epoch to skip (already trained before a crash)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "resume_at": self.resume_at}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Position of the next epoch: its number and how many of its batches are already done."""
        epoch, done = int(state["epoch"]), int(state["resume_at"])
        if done >= len(self):  # the epoch was complete: start the next one from its first batch
            epoch, done = epoch + 1, 0
        self.epoch, self.resume_at = epoch, done

    def batches(self) -> list[np.ndarray]:
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        out: list[np.ndarray] = []
        for start in range(0, n, self.pool):
            chunk = order[start : start + self.pool]
            if self.by_length:
                chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            out.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        if self.drop_last:
            out = [b for b in out if len(b) == self.batch_size]
        if self.shuffle and self.by_length:
            out = [out[i] for i in rng.permutation(len(out))]
        if self.num_replicas > 1 and out:
            out += [out[i % len(out)] for i in range(-len(out) % self.num_replicas)]
            out = out[self.rank :: self.num_replicas]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the order is drawn at the first batch, after a resume has set the position.
        # Lightning only calls set_epoch on a batch sampler's inner sampler, so advance here.
        batches = self.batches()[self.resume_at :]
        self.epoch += 1
        self.resume_at = 0
        for b in batches:
            yield b.tolist()

    def __len__(self) -> int:
        n = len(self.lengths)
        total = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return -(-total // self.num_replicas)
