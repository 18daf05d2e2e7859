"""Data loading: the sequence store + vectorised Collator + length bucketing against a naive
per-user-list dataset (a tensor per user and field, padded per batch with pad_sequence).

Both loaders are first checked to build identical batches from the same users. Then each is
timed over one epoch of the training users (batches per second), and the GRU-AE training
step (forward, backward, AdamW) is timed on the store's batches: the loader must take under
10% of the step time to keep the model fed with num_workers=0.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import median_time, prepared_recsys, scaled, target
from benchmarks.encoders import token_vocab
from benchmarks.registry import ENCODERS, Report, benchmark

BATCH = 128


class NaiveUserDataset:
    """One dict of per-field tensors per user, built up front (the obvious way to write it)."""

    def __init__(self, store: Any, rows: np.ndarray):
        import torch

        self.items = []
        for r in rows:
            a, b = store.offsets[r], store.offsets[r + 1]
            self.items.append(
                {
                    "index": int(r),
                    "tokens": {f: torch.tensor(v[a:b].tolist(), dtype=torch.long) for f, v in store.tokens.items()},
                    "values": {f: torch.tensor(np.nan_to_num(v[a:b], nan=0.0).tolist(), dtype=torch.float32) for f, v in store.values.items()},
                    "codes": {f: torch.tensor(v[a:b].tolist(), dtype=torch.long) for f, v in store.codes.items()},
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def naive_collate(items: list[dict]) -> dict:
    """pad_sequence per field: the same batch layout as datamodules.sequences.Collator."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    first = items[0]
    return {
        "index": torch.tensor([it["index"] for it in items]),
        "lengths": torch.tensor([len(next(iter(it["tokens"].values()))) for it in items]),
        **{
            kind: {f: pad_sequence([it[kind][f] for it in items], batch_first=True) for f in first[kind]}
            for kind in ("tokens", "values", "codes")
        },
    }


def same_batch(a: dict, b: dict) -> None:
    import torch

    for key in ("index", "lengths"):
        if not torch.equal(a[key], b[key]):
            raise AssertionError(f"loaders disagree on {key}")
    for kind in ("tokens", "values", "codes"):
        for f in a[kind]:
            if not torch.equal(a[kind][f], b[kind][f]):
                raise AssertionError(f"loaders disagree on {kind}[{f}]")


def loaders(store: Any, rows: np.ndarray) -> tuple[Any, Any]:
    import torch

    from datamodules.sequences import Collator, LengthBucketBatchSampler, UserIndexDataset

    ours = torch.utils.data.DataLoader(
        UserIndexDataset(rows), batch_sampler=LengthBucketBatchSampler(store.lengths[rows], BATCH, seed=0), collate_fn=Collator(store)
    )
    naive = torch.utils.data.DataLoader(
        NaiveUserDataset(store, rows), batch_size=BATCH, shuffle=True, collate_fn=naive_collate, generator=torch.Generator().manual_seed(0)
    )
    return ours, naive


def step_seconds(model: Any, batches: list[dict], repeats: int) -> float:
    """Median seconds of one GRU-AE training step (forward, backward, AdamW) over `batches`."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()

    def run() -> None:
        for b in batches:
            opt.zero_grad()
            sum(model.losses(b).values()).backward()
            opt.step()

    run()  # warm-up
    return median_time(run, repeats)[0] / len(batches)


@benchmark("loading")
def loading(scale: float, repeats: int, out_dir: Path) -> Report:
    import torch

    from datamodules.sequences import Collator

    prep = prepared_recsys(scaled(1_000_000, scale, 2000))
    store = prep.store
    rows = np.flatnonzero(~prep.is_val)
    began = time.perf_counter()
    ours, naive = loaders(store, rows)
    build_s = time.perf_counter() - began
    probe = rows[: min(BATCH, len(rows))].tolist()
    same_batch(Collator(store)(probe), naive_collate([naive.dataset[i] for i in range(len(probe))]))

    n_batches = len(ours)
    t_ours = median_time(lambda: sum(1 for _ in ours), repeats)[0]
    t_naive = median_time(lambda: sum(1 for _ in naive), repeats)[0]
    torch.manual_seed(0)
    model = ENCODERS["gru_autoencoder"](token_vocab(store), 128)
    steps = list(ours)[: scaled(20, min(scale, 1.0), 3)]
    step = step_seconds(model, steps, repeats)
    per_batch = t_ours / n_batches
    rows_out = [
        {"loader": "store + Collator + length buckets", "batches": n_batches, "batches_per_s": n_batches / t_ours, "ms_per_batch": 1000 * per_batch},
        {"loader": "naive per-user tensors + pad_sequence", "batches": len(naive), "batches_per_s": len(naive) / t_naive, "ms_per_batch": 1000 * t_naive / len(naive)},
        {"loader": "GRU-AE train step (gru_ae_all)", "batches": len(steps), "batches_per_s": 1 / step, "ms_per_batch": 1000 * step},
    ]
    ratio = per_batch / step
    return Report(
        {"users": len(rows), "events": int(store.lengths[rows].sum()), "batch_size": BATCH, "num_workers": 0, "model": "gru_ae_all"},
        rows_out,
        [target("loader time < 10% of GRU-AE step time", ratio, 0.10, higher_is_better=False), target("store loader faster than naive (x)", t_naive / t_ours, 1.0)],
        [f"loader/step = {ratio:.1%}; building the naive per-user tensors up front took {build_s:.1f} s (not in its batches/s)"],
    )
