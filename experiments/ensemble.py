"""The "Encode Me If You Can" ensemble: finished runs' embeddings combined into one vector per user.

Per block: align to this data's users, PCA to k components (fitted on the users the block
has), L2-normalise each user, then fill users the block lacks with the block's mean row
(the paper found mean imputation better than zeros). Handcrafted features go through a
quantile transform to uniform. Blocks are concatenated in config order.

Blocks must come from the ensemble's own data: a block run whose data source, path or
history cutoff differs is refused (`check_same_data`), since its users' vectors would
describe other events than the ones the ensemble is evaluated on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import polars as pl

from experiments.rundirs import latest_run

SAME_DATA_KEYS = ("source", "path")  # data keys every block shares with the ensemble (and the resolved cutoff)


@dataclass
class EnsembleBlock:
    """One block of an ensemble: a finished run's embeddings."""

    run: str | None = None
    """Run directory holding embeddings.parquet."""
    experiment: str | None = None
    """Or: the newest finished run of this experiment under output_dir."""
    pca: int | None = None
    """Reduce the block to this many principal components (null: keep it whole)."""
    normalize: bool = True
    """L2-normalise each user's block vector."""


@dataclass
class EnsembleConfig:
    """"Encode Me If You Can" ensemble: PCA-reduced, L2-normalised blocks + quantile-mapped handcrafted features."""

    inputs: ClassVar[str] = "runs"  # finished runs' embeddings: nothing to train

    name: str = "ensemble"
    """Method name (registry key)."""
    blocks: list[EnsembleBlock] = field(default_factory=list)
    """The blocks, each a finished run on the same data."""
    handcrafted: bool = True
    """Append handcrafted features mapped to uniform by a quantile transform."""
    output_dir: str = "outputs"
    """Where blocks named by experiment are looked up."""


def resolve_run(block: dict, output_dir: str) -> Path:
    """A block names a run directory, or an experiment whose newest finished run is used."""
    if bool(block.get("run")) == bool(block.get("experiment")):
        raise ValueError("model.blocks: each block needs exactly one of run or experiment")
    if block.get("run"):
        run = Path(block["run"])
        if not (run / "embeddings.parquet").is_file():
            raise ValueError(f"model.blocks: {run} has no embeddings.parquet (is it a finished run?)")
        return run
    run = latest_run(output_dir, block["experiment"])
    if run is None:
        raise ValueError(f"model.blocks: no finished run of experiment {block['experiment']!r} under {output_dir}; run it first")
    return run


def aligned(run: Path, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The run's embeddings in the order of `user_ids` and a mask of the users it has."""
    frame = pl.read_parquet(run / "embeddings.parquet")
    index = pl.DataFrame({"user_id": user_ids.astype(str)}).with_row_index("row")
    joined = index.join(frame.with_columns(pl.col("user_id").cast(pl.String)), on="user_id", how="inner")
    if joined.height == 0:
        raise ValueError(f"model.blocks: {run} shares no users with this data (was it trained on another dataset?)")
    dim = frame["embedding"].dtype.size
    out = np.zeros((len(user_ids), dim), dtype=np.float32)
    rows = joined["row"].to_numpy()
    out[rows] = joined["embedding"].to_numpy()
    present = np.zeros(len(user_ids), dtype=bool)
    present[rows] = True
    return out, present


def reduce_block(x: np.ndarray, present: np.ndarray, pca: int | None, normalize: bool, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    block = x[present]
    if pca is not None:
        k = min(pca, block.shape[1], block.shape[0])
        block = PCA(n_components=k, random_state=seed).fit_transform(block)
    if normalize:
        block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    out = np.empty((len(x), block.shape[1]), dtype=np.float32)
    out[present] = block
    out[~present] = block.mean(axis=0)
    return out


def same_path(path: str | None) -> str | None:
    """A data path as compared between runs: absolute, so `data/x` and `./data/x` are the same data."""
    return None if path is None else str(Path(path).expanduser().resolve())


def check_same_data(run: Path, data: dict, cutoff: str | None, ensemble: str) -> None:
    """Refuse a block run made on other data than the ensemble's: source, path (config.yaml) or cutoff (preprocess.json)."""
    import yaml

    config, state = run / "config.yaml", run / "preprocess.json"
    for file in (config, state):
        if not file.is_file():
            raise ValueError(f"model.blocks: {run} has no {file.name}; cannot check it was made on the data of {ensemble}")
    block = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    for key in SAME_DATA_KEYS:
        theirs, ours = block.get(key), data.get(key)
        if key == "path":
            theirs, ours = same_path(theirs), same_path(ours)
        if theirs != ours:
            raise ValueError(f"model.blocks: {run} was made on data.{key}={theirs!r} but {ensemble} uses data.{key}={ours!r}; rerun the block on this data")
    theirs = json.loads(state.read_text()).get("cutoff")
    if theirs != cutoff:
        raise ValueError(f"model.blocks: {run} has history cutoff {theirs!r} ({state}) but {ensemble} has cutoff {cutoff!r}; rerun the block with the same data.cutoff settings")


def ensemble_embeddings(cfg: dict, prepared, reference_time: int | None, seed: int = 0, *, data: dict, name: str = "this ensemble") -> np.ndarray:
    """[U, D] ensemble vectors for the users of `prepared`, in store order.

    `data` is the ensemble's resolved data config and `name` what errors call it (its
    experiment and cache folder): every block run must have been made on the same data.
    """
    from sklearn.preprocessing import QuantileTransformer

    from evaluation.handcrafted import handcrafted_features

    if not cfg["blocks"] and not cfg["handcrafted"]:
        raise ValueError("model.blocks: an ensemble needs at least one block or handcrafted=true")
    parts = []
    ensemble = f"{name} (cache {prepared.path})"
    for block in cfg["blocks"]:
        run = resolve_run(block, cfg["output_dir"])
        check_same_data(run, data, prepared.meta["cutoff"], ensemble)
        x, present = aligned(run, prepared.store.user_ids)
        parts.append(reduce_block(x, present, block.get("pca"), block.get("normalize", True), seed))
    if cfg["handcrafted"]:
        features, _ = handcrafted_features(prepared, reference_time=reference_time)
        quantiles = QuantileTransformer(n_quantiles=min(1000, len(features)), output_distribution="uniform", random_state=seed)
        parts.append(quantiles.fit_transform(features).astype(np.float32))
    return np.concatenate(parts, axis=1)
