"""Flat store -> padded batches, and the length-bucketed batch sampler."""

from __future__ import annotations

import numpy as np
import torch

from datamodules.sequences import Collator, LengthBucketBatchSampler, SequenceStore


def store_of(lengths: list[int]) -> SequenceStore:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    values = np.arange(n, dtype=np.float32)
    values[1] = np.nan
    return SequenceStore(
        user_ids=np.array([f"u{i}" for i in range(len(lengths))]),
        offsets=offsets,
        tokens={"item": (np.arange(n) + 5).astype(np.int32)},
        values={"price": values},
        times=np.arange(n, dtype=np.int64),
        vocab_sizes={"item": n + 5},
    )


def test_collate_pads_right_and_keeps_order():
    store = store_of([3, 1, 2])
    batch = Collator(store)([2, 0])
    assert batch["index"].tolist() == [2, 0]
    assert batch["lengths"].tolist() == [2, 3]
    assert batch["tokens"]["item"].tolist() == [[9, 10, 0], [5, 6, 7]]
    assert batch["tokens"]["item"].dtype == torch.int64
    # NaN (missing) and pad positions are 0.0 in values
    assert batch["values"]["price"].tolist() == [[4.0, 5.0, 0.0], [0.0, 0.0, 2.0]]


def test_bucketing_covers_every_user_once_and_groups_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=1000)
    sampler = LengthBucketBatchSampler(lengths, batch_size=32, seed=0, pool_batches=10)
    batches = list(sampler)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000)) and len(batches) == len(sampler)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    naive = sum(len(b) * lengths[b].max() for b in np.array_split(rng.permutation(1000), len(batches)))
    assert padded < 0.7 * naive  # far less padding than random batches


def test_bucketing_is_seeded_and_changes_per_epoch():
    lengths = np.arange(1, 101)
    a = [b for b in LengthBucketBatchSampler(lengths, 8, seed=3)]
    b = [b for b in LengthBucketBatchSampler(lengths, 8, seed=3)]
    assert a == b
    sampler = LengthBucketBatchSampler(lengths, 8, seed=3)
    first, second = list(sampler), list(sampler)
    assert first != second  # a new order each epoch
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_no_shuffle_is_deterministic_and_drop_last():
    lengths = np.arange(1, 11)
    sampler = LengthBucketBatchSampler(lengths, 4, shuffle=False, drop_last=True)
    batches = list(sampler)
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7]] and len(sampler) == 2
