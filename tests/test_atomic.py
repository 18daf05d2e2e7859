"""Atomic outputs: a writer killed with SIGKILL mid-write leaves the old file or the new one, never a torn one.

Each writer runs in a subprocess that rewrites a large file in a loop; the test kills it
and checks the file. A plain (non-atomic) writer under the same harness is torn, which
shows the harness does catch torn files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from datamodules.preprocess import CACHE_FILES, VERSION, stale_reason

REPO = Path(__file__).resolve().parents[1]
N = 2_000_000  # large enough that a write takes tens of milliseconds

WRITERS = {  # statement writing iteration i to target[kind]
    "plain": "with open(target['plain'], 'w') as f:\n    for _ in range(200):\n        f.write('x' * (N // 200)); f.flush()",
    "metrics": "atomic_write(target['metrics'], lambda p: p.write_text(json.dumps({'i': i, 'pad': 'x' * N})))",
    "embeddings": "write_embeddings(target['embeddings'], np.arange(N // 16), np.full((N // 16, 16), i, dtype=np.float32))",
    "checkpoint": "AtomicCheckpointIO().save_checkpoint({'i': i, 'w': torch.full((N // 2,), float(i))}, target['checkpoint'])",
    "cache": "write_atomic_dir(target['cache'], {f: pl.DataFrame({'v': np.full(N // 8, i)}) for f in CACHE_FILES}, {'key': 'k', 'version': VERSION})",
}
ATOMIC = [k for k in WRITERS if k != "plain"]


def intact(kind: str, target: Path) -> bool:
    """The file holds one complete write (any iteration's)."""
    try:
        if kind == "plain":
            return len(target.read_text()) == N
        if kind == "metrics":
            return len(json.loads(target.read_text())["pad"]) == N
        if kind == "embeddings":
            emb = np.stack(pl.read_parquet(target)["embedding"].to_numpy())
            return emb.shape == (N // 16, 16) and len(np.unique(emb)) == 1
        if kind == "checkpoint":
            ckpt = torch.load(target, weights_only=True)
            return bool((ckpt["w"] == ckpt["i"]).all()) and ckpt["w"].numel() == N // 2
        return stale_reason(target, "k") is None and pl.read_parquet(target / "users.parquet").height == N // 8
    except Exception:
        return False


def kill_mid_write(kinds: list[str], folder: Path) -> tuple[list[str], list[Path]]:
    """Run the writers in a loop, SIGKILL after the first complete round. Returns (torn kinds, temporary leftovers)."""
    targets = {k: folder / ("cache" if k == "cache" else f"out.{k}") for k in kinds}
    body = "\n".join(WRITERS[k] for k in kinds)
    script = f"""
import json
from pathlib import Path
import numpy as np, polars as pl, torch
from callbacks.resume import AtomicCheckpointIO
from datamodules.preprocess import CACHE_FILES, VERSION, write_atomic_dir
from datamodules.atomic import atomic_write
from experiments.run import write_embeddings
N, i = {N}, 0
target = {{k: Path(v) for k, v in { {k: str(v) for k, v in targets.items()}!r}.items()}}
while True:
{textwrap.indent(body, "    ")}
    i += 1
    if i == 1:
        print("wrote", flush=True)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "wrote"
    time.sleep(np.random.default_rng().uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    torn = [k for k, t in targets.items() if not intact(k, t)]
    # what a killed atomic writer leaves: a hidden temporary sibling, never a torn target
    leftovers = list(folder.glob(f".*.tmp-{proc.pid}"))
    for p in leftovers:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return torn, leftovers


def test_killed_writers_leave_whole_files(tmp_path):
    """Kill until a kill has landed mid-write (a kill between two writes proves nothing), at most 12 tries."""
    caught_mid_write = []
    for _ in range(12):
        torn, leftovers = kill_mid_write(ATOMIC, tmp_path)
        assert torn == [], f"torn after SIGKILL: {torn}"
        caught_mid_write += leftovers
        if caught_mid_write:
            break
    assert caught_mid_write, "none of 12 kills landed during a write; the test proved nothing"


def test_plain_writer_is_torn_by_the_same_harness(tmp_path):
    assert any(kill_mid_write(["plain"], tmp_path)[0] for _ in range(3)), "a plain write killed mid-write should be torn"


def test_cache_with_wrong_content_hash_is_rebuilt_with_a_reason(tmp_path, csv_data, caplog):
    from datamodules.preprocess import prepare
    from tests.conftest import generic_config

    events, labels = csv_data
    cfg = generic_config(events, labels, tmp_path / "cache")
    first = prepare(cfg)
    users = first.path / "users.parquet"
    users.write_bytes(users.read_bytes()[:-100])  # torn by something outside the project
    with caplog.at_level("INFO", logger="datamodules.preprocess"):
        again = prepare(cfg)
    assert "users.parquet content hash mismatch" in caplog.text
    assert again.store.n_events == first.store.n_events and stale_reason(again.path, first.meta["key"]) is None


def test_second_builder_of_a_cache_uses_the_first_ones(tmp_path, caplog):
    from datamodules.preprocess import write_atomic_dir

    target = tmp_path / "cache"
    frames = {f: pl.DataFrame({"v": [1, 2]}) for f in CACHE_FILES}
    write_atomic_dir(target, frames, {"key": "k", "version": VERSION, "by": "first"})
    with caplog.at_level("INFO", logger="datamodules.preprocess"):
        write_atomic_dir(target, frames, {"key": "k", "version": VERSION, "by": "second"})
    assert "built by another process meanwhile" in caplog.text
    assert json.loads((target / "meta.json").read_text())["by"] == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # the second build's temporary folder is gone


def test_rewrite_cache_of_wrong_schema_is_regenerated(tmp_path, caplog):
    from lit_modules.rewrite import read_rewrite_cache

    path = tmp_path / "rewrites.parquet"
    pl.DataFrame({"key": ["a"], "value": [1]}).write_parquet(path)
    with caplog.at_level("INFO", logger="lit_modules.rewrite"):
        assert read_rewrite_cache(path) == {}
    assert "has schema" in caplog.text and "regenerating" in caplog.text
    path.write_bytes(b"not parquet")
    with caplog.at_level("INFO", logger="lit_modules.rewrite"):
        assert read_rewrite_cache(path) == {}
    assert "unreadable" in caplog.text
    pl.DataFrame({"key": ["a"], "text": ["t"]}).write_parquet(path)
    assert read_rewrite_cache(path) == {"a": "t"}
