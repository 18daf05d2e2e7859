"""The floors every table shows, probed exactly like the model: handcrafted features and random vectors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from datamodules.preprocess import Prepared

BASELINES = ("handcrafted", "random")


def random_embeddings(n_users: int, dim: int, seed: int) -> np.ndarray:
    """Standard-normal float32 [n_users, dim]: the chance-level row of every table, same vectors per seed."""
    return np.random.default_rng(seed).standard_normal((n_users, dim), dtype=np.float32)


def baseline_embeddings(names: Sequence[str], prepared: Prepared, dim: int, seed: int) -> dict[str, np.ndarray]:
    """{name: [U, D] features} for each named baseline; random vectors get the model's width `dim`."""
    from evaluation.evaluate import cutoff_epoch
    from evaluation.handcrafted import handcrafted_features

    out = {}
    for name in names:
        if name == "handcrafted":
            out[name] = handcrafted_features(prepared, reference_time=cutoff_epoch(prepared))[0]
        elif name == "random":
            out[name] = random_embeddings(len(prepared.store), dim, seed)
        else:
            raise ValueError(f"probe.baselines: unknown baseline {name!r}; choose from {BASELINES}")
    return out
