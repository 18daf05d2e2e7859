"""A finished run, loaded to embed events it has not seen: `load_run(dir).embed(path_or_frame)`.

A finished run holds all that embedding needs: config.yaml (the method and its data
settings), preprocess.json (vocabularies, bucket edges, time origin, ranges: the state
preprocessing fitted, applied here without refitting) and model.safetensors, so the
sequence cache may be gone. Users go through in chunks of `chunk_users`, in sorted order:
the source reads one range of users per chunk while scanning its files, so peak memory
follows the chunk, not the input. The command around it: experiments/embed.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from datamodules.atomic import atomic_write
from datamodules.config import DataConfig, LabelsConfig
from datamodules.sources.base import DataError, UserRange
from experiments.config import ConfigError, to_dataclass

STATE_FILE, WEIGHTS_FILE = "preprocess.json", "model.safetensors"
CHUNK_USERS = 20_000  # about 2 GB on 10M generated challenge events (docs/benchmarks.md)


class RunError(ValueError):
    """A run directory that cannot embed: the message names the directory or file."""


@dataclass
class Embedded:
    """One chunk's result."""

    user_ids: np.ndarray
    vectors: np.ndarray  # float32 [n, D]
    counts: dict[str, int]
    unseen: dict[str, int]


class EmbeddingRun:
    """A finished run's method, ready to embed new data the way the run saw its own.

    Built from a run directory by `load_run`, or from the parts in memory
    (experiments.run's challenge export, right after training).
    """

    def __init__(self, run_dir: Path, cfg: Any, state: dict, module: Any, device: str = "cpu"):
        from datamodules.datamodule import EventDataModule
        from experiments.build import build_datamodule

        self.run_dir, self.cfg, self.state = Path(run_dir), cfg, state
        self.data_cfg = to_dataclass(cfg.data, DataConfig)
        self.method = OmegaConf.to_object(cfg.model)
        self.module = module.to(resolve_device(device)).eval()
        self.events = EventDataModule(self.data_cfg, seed=cfg.seed)
        self.datamodule = build_datamodule(self.method, self.events, train=False)  # a tokenizer is loaded once, here

    def data_config(self, path: str | Path | None) -> DataConfig:
        """The run's data settings on other events: path replaced, labels and targets dropped (nothing is probed here)."""
        cfg = dataclasses.replace(self.data_cfg, labels=LabelsConfig(), targets=[])
        return cfg if path is None else dataclasses.replace(cfg, path=str(path))

    def until_time(self, until: str | dt.datetime | None) -> dt.datetime | None:
        if until is None or isinstance(until, dt.datetime):
            return until
        if until == "cutoff":
            if self.state["cutoff"] is None:
                raise ConfigError(f"until=cutoff: the run {self.run_dir} had no history cutoff")
            return dt.datetime.fromisoformat(self.state["cutoff"])
        try:
            return dt.datetime.fromisoformat(until)
        except ValueError:
            raise ConfigError(f"until: {until!r} is neither 'cutoff' nor an ISO datetime such as 2024-07-01") from None

    def chunks(
        self, data: str | Path | pl.DataFrame | None = None, *, until: str | dt.datetime | None = None, users: Sequence[str] | None = None,
        chunk_users: int = CHUNK_USERS, batch_size: int | None = None, progress: bool = False,
    ) -> Iterator[Embedded]:
        """Embeddings of the users of `data` (or of `users` among them), one chunk of sorted users at a time."""
        from tqdm import tqdm

        from datamodules.encode import encode_events
        from datamodules.preprocess import prepared_of
        from datamodules.sources import load_source, source_users
        from datamodules.sources.generic import frame_source
        from evaluation.embed import embed_all

        if chunk_users < 1:
            raise ConfigError(f"chunk_users must be >= 1, got {chunk_users}")
        cut = self.until_time(until)
        cfg = self.data_config(None if isinstance(data, pl.DataFrame) else data)
        if isinstance(data, pl.DataFrame):
            if cfg.source != "generic":
                raise ConfigError(f"data: the run read source {cfg.source!r}; pass its files' path (an in-memory frame is read as the generic source)")
            listed = data[cfg.schema.user].cast(pl.String).unique().drop_nulls()

            def load(only: UserRange) -> Any:
                return frame_source(data, cfg, only)
        else:
            listed = source_users(cfg)

            def load(only: UserRange) -> Any:
                return load_source(cfg, only)
        if users is not None:
            listed = listed.filter(listed.is_in(pl.Series(list(map(str, users)), dtype=pl.String).implode()))
        listed = listed.sort()
        if listed.len() == 0:
            raise DataError(f"{cfg.path or 'data'}: no users to embed")
        self.events.cfg = dataclasses.replace(self.data_cfg, batch_size=batch_size or self.data_cfg.batch_size)
        bar, embedded = None, 0
        try:
            for start in range(0, listed.len(), chunk_users):
                chunk = listed.slice(start, chunk_users)
                source = load(UserRange(chunk[0], chunk[-1]))
                self.check_columns(source, cfg)
                if bar is None:  # after the first chunk read well: most bad input fails before any bar is drawn
                    bar = tqdm(total=listed.len(), unit="user", desc="embed", disable=not progress, file=sys.stderr)
                raw = source.events.filter(pl.col("user_id").is_in(chunk.implode())).collect()  # the range may hold users not asked for
                frame, counts, unseen = encode_events(raw, self.state, cut)
                del source, raw
                if frame.height == 0:  # every event of the chunk at or after `until`
                    bar.update(chunk.len())
                    continue
                self.events.prepared = prepared_of(frame, self.state)
                vectors = embed_all(self.module, counted(self.datamodule.predict_dataloader(), bar))
                bar.update(chunk.len() - frame.height)  # users left without events
                embedded += frame.height
                yield Embedded(frame["user_id"].to_numpy(), vectors, counts, unseen)
        finally:
            self.events.prepared = None
            if bar is not None:
                bar.close()
        if not embedded:
            raise DataError(f"{cfg.path or 'data'}: no user has an event to embed" + (f" before until={cut}" if cut else ""))

    def check_columns(self, source: Any, cfg: DataConfig) -> None:
        """A user or time column read as another kind than in training would silently give other ids or times."""
        trained = self.state["column_types"]
        for role, kind in source.column_types.items():
            if trained.get(role) not in (None, kind):
                where = source.files[0] if source.files else (cfg.path or "data")
                raise DataError(f"{where}: the {role} column holds {kind} values; the run {self.run_dir} was trained on {trained[role]} values")

    def embed(self, data: str | Path | pl.DataFrame | None = None, **options: Any) -> pl.DataFrame:
        """user_id (String) + embedding (Array[Float32, D]) for every user of `data` with events; see `chunks` for the options."""
        parts = [embeddings_frame(c.user_ids, c.vectors) for c in self.chunks(data, **options)]
        return pl.concat(parts)

    def embed_to(self, out: str | Path | None, data: str | Path | pl.DataFrame | None = None, **options: Any) -> dict:
        """Write the embeddings to `out` (parquet, atomically: whole or not at all) and a summary to <out>.json; returns the summary."""
        started = time.perf_counter()
        cfg = self.data_config(None if isinstance(data, pl.DataFrame) else data)
        digest = data_hash(data, cfg)
        out = Path(out) if out is not None else self.run_dir / "embed" / f"{digest[:16]}.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        parts_dir = out.with_name(f".{out.name}.parts-{os.getpid()}")
        shutil.rmtree(parts_dir, ignore_errors=True)
        parts_dir.mkdir()
        counts: dict[str, int] = {}
        unseen: dict[str, int] = {}
        try:
            for i, c in enumerate(self.chunks(data, **options)):
                embeddings_frame(c.user_ids, c.vectors).write_parquet(parts_dir / f"part-{i:05d}.parquet")
                add_counts(counts, c.counts)
                add_counts(unseen, c.unseen)
            parts = sorted(parts_dir.glob("part-*.parquet"))
            atomic_write(out, lambda p: pl.scan_parquet(parts).sink_parquet(p))  # streamed: the parts are never all in memory
        finally:
            shutil.rmtree(parts_dir, ignore_errors=True)
        summary = {
            "out": str(out),
            "run": str(self.run_dir),
            "data": "<DataFrame>" if isinstance(data, pl.DataFrame) else str(cfg.path) if cfg.path else f"the run's own {cfg.source} data",
            "data_hash": digest,
            "rows": counts.get("users", 0),
            "dim": int(pl.read_parquet_schema(out)["embedding"].size),
            "counts": counts,
            "unseen_values": unseen,
            "until": str(self.until_time(options.get("until"))) if options.get("until") else None,
            "seconds": round(time.perf_counter() - started, 3),
        }
        atomic_write(out.with_suffix(".json"), lambda p: p.write_text(json.dumps(summary, indent=1)))
        return summary


def counted(batches: Iterable[dict], bar: Any) -> Iterator[dict]:
    """The batches, moving the progress bar by each batch's users."""
    for batch in batches:
        yield batch
        bar.update(len(batch["index"]))


def add_counts(total: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0) + v


def embeddings_frame(user_ids: np.ndarray, vectors: np.ndarray) -> pl.DataFrame:
    """The layout of a run's embeddings.parquet: user_id (String) and embedding (Array[Float32, D])."""
    return pl.DataFrame({"user_id": pl.Series(user_ids, dtype=pl.String), "embedding": np.asarray(vectors, dtype=np.float32)})


def data_hash(data: Any, cfg: DataConfig) -> str:
    """sha256 over the input files' names and contents (or an in-memory frame's Arrow bytes)."""
    from datamodules.preprocess import file_hash
    from datamodules.sources import source_files

    h = hashlib.sha256()
    if isinstance(data, pl.DataFrame):
        h.update(data.write_ipc(None).getvalue())
    else:
        for path in sorted(source_files(cfg)):
            h.update(f"{path.name}:{file_hash(path)}\n".encode())
    return h.hexdigest()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: no CUDA device here; use device=cpu")
    return device


def read_state(run_dir: Path) -> dict:
    from datamodules.preprocess import VERSION

    path = run_dir / STATE_FILE
    if not path.is_file():
        raise RunError(f"{run_dir}: no {STATE_FILE}; it is not a finished run directory, or one written before runs saved their preprocessing (retrain it)")
    state = json.loads(path.read_text())
    if state.get("version") != VERSION:
        raise RunError(f"{path}: written by preprocessing version {state.get('version')}, this code reads version {VERSION}; retrain the run or embed with the code that trained it")
    return state


def load_weights(module: Any, path: Path) -> None:
    """model.safetensors (or any .safetensors), or a Lightning checkpoint's state_dict, mapped to CPU, weights only."""
    import torch
    from safetensors.torch import load_model

    try:
        if path.suffix == ".safetensors":
            missing, unexpected = load_model(module, str(path), strict=False, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing, unexpected = module.load_state_dict(state.get("state_dict", state), strict=False)
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        raise RunError(f"{path}: cannot load weights: {str(err).splitlines()[0]}") from None
    if missing or unexpected:
        which = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise RunError(f"{path}: weights do not fit the run's model ({which})")


def empty_store(state: dict) -> Any:
    """A store with the run's fields and vocabulary sizes and no users: what building the module reads of the data."""
    from datamodules.store import SequenceStore

    lengths = {f["name"]: f["length"] for f in state["schema"]["fields"] if f["kind"] == "codes"}
    return SequenceStore(
        user_ids=np.array([], dtype=object), offsets=np.zeros(1, dtype=np.int64),
        tokens={f: np.zeros(0, np.int32) for f in state["vocab_sizes"] if f not in state["code_fields"]},
        values={f: np.zeros(0, np.float32) for f in state["value_fields"]},
        times=np.zeros(0, np.int64), vocab_sizes=dict(state["vocab_sizes"]),
        codes={f: np.zeros((0, lengths[f]), np.int32) for f in state["code_fields"]},
    )  # fmt: skip


def load_run(run_dir: str | Path, weights: str | Path | None = None, device: str = "cpu") -> EmbeddingRun:
    """A finished run directory, ready to embed new data: `load_run(dir).embed(path_or_frame)`."""
    from datamodules.encode import schema_of
    from datamodules.preprocess import Prepared
    from experiments.build import build_module
    from lit_modules.registry import METHODS

    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir}: no config.yaml; not a run directory")
    state = read_state(run_dir)
    try:
        cfg = OmegaConf.load(run_dir / "config.yaml")
        model = OmegaConf.merge(OmegaConf.structured(METHODS[cfg.model.name].config), cfg.model)
    except (OmegaConfBaseException, KeyError) as err:
        raise RunError(f"{run_dir / 'config.yaml'}: does not match this code's config ({str(err).splitlines()[0]})") from None
    cfg.model = model
    method = OmegaConf.to_object(model)
    if method.inputs == "runs":
        raise RunError(f"{run_dir}: an ensemble has no weights of its own; embed the new data with each of its blocks' runs")
    path = Path(weights).expanduser() if weights is not None else run_dir / WEIGHTS_FILE
    if not path.is_file():
        hint = "" if weights is not None else f" (did the run finish? a checkpoint works too: weights={run_dir / 'checkpoints' / 'last.ckpt'})"
        raise RunError(f"{path}: no weights{hint}")
    prepared = Prepared(empty_store(state), schema_of(state), state["vocabs"], [], np.zeros(0, dtype=bool), state, None, pl.DataFrame())
    module = build_module(method, prepared)
    load_weights(module, path)
    return EmbeddingRun(run_dir, cfg, state, module, device)
