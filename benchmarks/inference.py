"""Inference: users per second to embed every user, for each registered encoder at its preset size.

Users are read in length-sorted batches (less padding), collated from the sequence store and
embedded under inference_mode; the time covers collation and the forward pass. Before
timing, a few users embedded one by one must match their batched vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import median_time, prepared_recsys, scaled, target
from benchmarks.encoders import token_vocab
from benchmarks.registry import ENCODERS, Report, benchmark

BATCH = 512
GOAL = {"gru_autoencoder": 10_000}


def embed_all(model: Any, store: Any, order: list[np.ndarray]) -> Any:
    import torch

    from datamodules.sequences import Collator

    collate = Collator(store)
    with torch.inference_mode():
        return torch.cat([model.embed(collate(b)) for b in order])


def check_alone(model: Any, store: Any, rows: np.ndarray) -> None:
    import torch

    batched = embed_all(model, store, [rows])
    alone = embed_all(model, store, [rows[i : i + 1] for i in range(len(rows))])
    if not torch.allclose(batched, alone, atol=1e-4, rtol=1e-4):
        raise AssertionError(f"batched and one-by-one embeddings differ by {(batched - alone).abs().max().item():.2e}")


@benchmark("inference")
def inference(scale: float, repeats: int, out_dir: Path) -> Report:
    import torch

    from datamodules.sequences import LengthBucketBatchSampler

    prep = prepared_recsys(scaled(1_000_000, scale, 2000))
    store = prep.store
    n = len(store)
    order = LengthBucketBatchSampler(store.lengths, BATCH, shuffle=False, pool_batches=10**6).batches()
    rows, targets = [], []
    for name, factory in ENCODERS.items():
        torch.manual_seed(0)
        model = factory(token_vocab(store), 128).eval()
        check_alone(model, store, np.arange(min(8, n)))
        secs = median_time(lambda: embed_all(model, store, order), repeats)[0]
        dim = int(embed_all(model, store, order[:1]).shape[1])
        params = sum(p.numel() for p in model.parameters())
        rows.append({"encoder": name, "users": n, "dim": dim, "parameters": params, "seconds": secs, "users_per_s": n / secs})
        if name in GOAL:
            targets.append(target(f"{name} >= {GOAL[name]:,} users/s", n / secs, GOAL[name]))
    return Report(
        {"users": n, "events": store.n_events, "batch_size": BATCH, "max_len": 128, "order": "sorted by length", "torch_threads": torch.get_num_threads()},
        rows,
        targets,
        ["time = collation from the sequence store + embed() under inference_mode, all users, presets gru_ae_all and next_product"],
    )
