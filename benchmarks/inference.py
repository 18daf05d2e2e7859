"""Inference: users per second to embed every user, for each registered encoder at its preset size.

Users are read in length-sorted batches (less padding), collated from the sequence store and
embedded under inference_mode; the headline time covers collation and the forward pass, and
each is also timed alone (forward on batches collated beforehand) to show the split. Every
encoder is measured at 1 and 2 torch threads in the same run (the box has 2 cores). GRU-AE has
two sides, timed one after the other at each thread count: its default CPU path
(lit_modules/fast_gru.py) and the same weights through nn.GRU. Before timing, a few users
embedded one by one must match their batched vectors, and the sides must agree. For GRU-AE the
notes give the arithmetic behind its figure: FLOPs per user against what this CPU's GEMM of
the recurrent step's shape reaches, measured in the same run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RECSYS_SETTINGS, median_time, prepared_recsys, scaled, target
from benchmarks.encoders import preset, token_vocab
from benchmarks.registry import ENCODERS, Report, benchmark

BATCH = 512
GOAL = {"gru_autoencoder": 8_000}  # users/s at 2 threads
# Sides per encoder: its default path, and for GRU-AE the nn.GRU path it had before (gru_path "trimmed").
SIDES = {"gru_autoencoder": {"fast": "auto", "nn.GRU": "trimmed"}}
# The printed table (100 columns): JSON key -> short header; units in the first note.
COLUMNS = {"encoder": "encoder", "side": "side", "threads": "thr", "users_per_s": "users/s", "seconds": "total", "forward_s": "forward", "collate_s": "collate", "collate_share": "share"}


def embed_all(model: Any, store: Any, order: list[np.ndarray]) -> Any:
    """Collate and embed every batch: the headline time."""
    import torch

    from datamodules.sequences import Collator

    collate = Collator(store)
    with torch.inference_mode():
        return torch.cat([model.embed(collate(b)) for b in order])


def forward_all(model: Any, collated: list[dict]) -> Any:
    """Embed batches collated beforehand: the forward pass alone."""
    import torch

    with torch.inference_mode():
        return torch.cat([model.embed(b) for b in collated])


def gemm_gflops(rows: int, inner: int, cols: int, calls: int = 300) -> float:
    """GFLOP/s of torch.mm at [rows, inner] @ [inner, cols] with the current threads: a recurrent GRU step's matmul."""
    import torch

    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    for _ in range(20):
        torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(calls):
        torch.mm(a, b)
    return 2 * rows * inner * cols * calls / (time.perf_counter() - t0) / 1e9


def check_alone(model: Any, store: Any, rows: np.ndarray) -> None:
    import torch

    batched = embed_all(model, store, [rows])
    alone = embed_all(model, store, [rows[i : i + 1] for i in range(len(rows))])
    if not torch.allclose(batched, alone, atol=1e-4, rtol=1e-4):
        raise AssertionError(f"batched and one-by-one embeddings differ by {(batched - alone).abs().max().item():.2e}")


def check_sides(model: Any, store: Any, order: list[np.ndarray], sides: dict[str, str]) -> None:
    """Every side gives the same vectors for the first batches (within 1e-5) before any is timed."""
    import torch

    first = order[:2]
    vectors = {}
    for side, path in sides.items():
        model.gru_path = path
        vectors[side] = embed_all(model, store, first)
    base = next(iter(vectors.values()))
    for side, v in vectors.items():
        if not torch.allclose(v, base, atol=1e-5, rtol=0):
            raise AssertionError(f"side {side!r} differs from the others by {(v - base).abs().max().item():.2e}")


@benchmark("inference")
def inference(scale: float, repeats: int, out_dir: Path) -> Report:
    import torch

    from datamodules.sequences import Collator, LengthBucketBatchSampler

    prep = prepared_recsys(scaled(1_000_000, scale, 2000))
    store = prep.store
    n = len(store)
    order = LengthBucketBatchSampler(store.lengths, BATCH, shuffle=False, pool_batches=10**6).batches()
    collate = Collator(store)
    collate_secs = median_time(lambda: [collate(b) for b in order], repeats)[0]
    collated = [collate(b) for b in order]
    default_threads = torch.get_num_threads()
    thread_counts = sorted({1, min(2, os.cpu_count() or 1)})
    rows, targets, notes = [], [], []
    try:
        for name, factory in ENCODERS.items():
            torch.manual_seed(0)
            model = factory(token_vocab(store), 128).eval()
            check_alone(model, store, np.arange(min(8, n)))
            sides = SIDES.get(name, {"-": None})
            if len(sides) > 1:
                check_sides(model, store, order, sides)
            dim = int(embed_all(model, store, order[:1]).shape[1])
            params = sum(p.numel() for p in model.parameters())
            for threads in thread_counts:
                torch.set_num_threads(threads)
                for side, path in sides.items():  # sides one after the other at the same thread count
                    if path is not None:
                        model.gru_path = path
                    secs = median_time(lambda: embed_all(model, store, order), repeats)[0]
                    fwd = median_time(lambda: forward_all(model, collated), repeats)[0]
                    rows.append(
                        {"encoder": name, "side": side, "threads": threads, "users": n, "dim": dim, "parameters": params, "seconds": secs, "users_per_s": n / secs,
                         "forward_s": fwd, "collate_s": collate_secs, "collate_share": collate_secs / (collate_secs + fwd)}
                    )
                if name in GOAL:
                    mine = rows[-len(sides)]
                    if threads == 2:
                        targets.append(target(f"{name} >= {GOAL[name]:,} users/s (2 threads)", mine["users_per_s"], GOAL[name]))
                    notes.append(gru_arithmetic(store, BATCH, rows[-len(sides) :], threads))
    finally:
        torch.set_num_threads(default_threads)
    return Report(
        {"users": n, "events": store.n_events, "batch_size": BATCH, "max_len": RECSYS_SETTINGS["max_len"], "order": "sorted by length", "torch_threads": thread_counts, "columns": COLUMNS},
        rows,
        targets,
        [
            f"users/s = users embedded per second, collation included; total, forward, collate = wall seconds, medians of {repeats}: "
            "total = collation from the sequence store + embed() under inference_mode, all users, presets gru_ae_all and next_product; "
            "forward = embed() alone on batches collated beforehand; collate = collation alone (single-threaded numpy); share = collate / (collate + forward). "
            "Sides: fast = GRU-AE's default CPU path (lit_modules/fast_gru.py), nn.GRU = the same weights through nn.GRU (gru_path trimmed), checked equal within 1e-5 first",
            *notes,
        ],
    )


def gru_arithmetic(store: Any, batch: int, rows: list[dict], threads: int) -> str:
    """Why GRU-AE's users/s is what it is: FLOPs per user against the GEMM rate of its recurrent step, measured now."""
    cfg = preset("gru_ae_all")
    emb, hidden, layers = cfg["emb_dim"], cfg["hidden"], cfg["layers"]
    steps = float(np.mean(store.lengths)) + 2 * bool(cfg.get("markers", True))  # SOS and EOS
    per_step = 3 * (emb * hidden + hidden * hidden) * 2 + (layers - 1) * 3 * 2 * hidden * hidden * 2
    per_user = steps * per_step
    gemm = gemm_gflops(batch, hidden, 3 * hidden)
    reached = ", ".join(f"{r['side']} {r['users'] * per_user / r['forward_s'] / 1e9:.1f} GFLOP/s ({r['users_per_s']:,.0f} users/s)" for r in rows)
    ratio = f"; fast / nn.GRU = {rows[0]['users_per_s'] / rows[1]['users_per_s']:.2f}x" if len(rows) > 1 else ""
    return (
        f"GRU-AE at {threads} thread(s): {steps:.1f} steps/user (events + SOS, EOS) x 3 gates x ({emb}x{hidden} + {hidden}x{hidden}) x 2 x {layers} layer(s) "
        f"= {per_user / 1e6:.2f} MFLOP/user; {GOAL['gru_autoencoder']:,} users/s needs {GOAL['gru_autoencoder'] * per_user / 1e9:.0f} GFLOP/s of GRU matmuls alone. "
        f"Forward reached: {reached}{ratio}. torch.mm at the recurrent step's shape [{batch}x{hidden}]@[{hidden}x{3 * hidden}] reaches {gemm:.1f} GFLOP/s here, "
        f"a ceiling of {gemm * 1e9 / per_user:,.0f} users/s before gates, embeddings and collation"
    )
