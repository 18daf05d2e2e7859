"""Scaling with sequence length: one training step (forward + backward) of every registered
encoder on a batch of users whose sequences all have length T, for T from 32 to 512.

Memory is the bytes the autograd graph keeps for backward (tensors saved by the forward,
each storage counted once): the part of training memory that grows with T, measured exactly
instead of through the allocator. The GRU-AE should grow linearly in T; NextEventGPT's
attention is quadratic in time, and in memory only if the attention kernel stores the
T x T weights. The time-and-memory curve against the number of events (preprocessing) is
part of the `preprocess` benchmark (preprocess_scaling.png), so the 10M-event run is not
paid twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import median_time
from benchmarks.registry import ENCODERS, Report, benchmark

LENGTHS = (32, 64, 128, 256, 512)
BATCH = 16
VOCAB = {"event_type": 10, "sku": 1005, "url": 1005, "category": 405, "price": 105}  # recsys2025 preset sizes


def batch_of(T: int, users: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = {f: torch.randint(5, n, (users, T), generator=g) for f, n in VOCAB.items()}
    return {"index": torch.arange(users), "lengths": torch.full((users,), T), "tokens": tokens, "values": {}, "codes": {}}


def saved_bytes(model: Any, batch: dict) -> int:
    """Bytes of the distinct storages the forward saves for backward."""
    import torch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sum(model.losses(batch).values())
    loss.backward()
    return sum(seen.values())


def exponent(xs: list[int], ys: list[float]) -> float:
    """Slope of log y against log x over the three longest lengths (where fixed costs fade)."""
    if len(xs) < 2:
        return float("nan")
    return float(np.polyfit(np.log(xs[-3:]), np.log(ys[-3:]), 1)[0])


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results.items():
        T = [r["length"] for r in rows]
        a.plot(T, [r["step_ms"] for r in rows], marker="o", label=name)
        b.plot(T, [r["saved_mb"] for r in rows], marker="o", label=name)
    for ax, label in ((a, "train step (ms)"), (b, "saved for backward (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Scaling with sequence length (batch {BATCH}, CPU presets)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@benchmark("scaling")
def scaling(scale: float, repeats: int, out_dir: Path) -> Report:
    import torch

    lengths = [T for T in LENGTHS if T <= max(64, 512 * scale)]
    users = max(4, int(BATCH * min(scale, 1.0)))
    rows, results, notes = [], {}, []
    for name, factory in ENCODERS.items():
        results[name] = []
        for T in lengths:
            torch.manual_seed(0)
            model = factory(VOCAB, T).train()
            b = batch_of(T, users)
            mem = saved_bytes(model, b)  # also the warm-up step

            def step() -> None:
                model.zero_grad()
                sum(model.losses(b).values()).backward()

            secs = median_time(step, repeats)[0]
            r = {"encoder": name, "length": T, "users": users, "step_ms": 1000 * secs, "events_per_s": users * T / secs, "saved_mb": mem / 2**20}
            rows.append(r)
            results[name].append(r)
        T = [r["length"] for r in results[name]]
        notes.append(
            f"{name}: time ~ T^{exponent(T, [r['step_ms'] for r in results[name]]):.2f}, "
            f"saved memory ~ T^{exponent(T, [r['saved_mb'] for r in results[name]]):.2f} (fit over T >= {T[-3:][0]})"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "scaling_sequence_length.png"
    plot(results, png)
    return Report({"lengths": lengths, "users": users, "vocab": VOCAB, "step": "forward + backward, no optimizer"}, rows, [], notes, [png.name])
