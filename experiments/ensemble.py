"""The "Encode Me If You Can" ensemble: finished runs' embeddings combined into one vector per user.

Per block: align to this data's users, PCA to k components (fitted on the users the block
has), L2-normalise each user, then fill users the block lacks with the block's mean row
(the paper found mean imputation better than zeros). Handcrafted features go through a
quantile transform to uniform. Blocks are concatenated in config order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import polars as pl

from experiments.rundirs import latest_run


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


def ensemble_embeddings(cfg: dict, prepared, reference_time: int | None, seed: int = 0) -> np.ndarray:
    """[U, D] ensemble vectors for the users of `prepared`, in store order."""
    from sklearn.preprocessing import QuantileTransformer

    from evaluation.handcrafted import handcrafted_features

    if not cfg["blocks"] and not cfg["handcrafted"]:
        raise ValueError("model.blocks: an ensemble needs at least one block or handcrafted=true")
    parts = []
    for block in cfg["blocks"]:
        x, present = aligned(resolve_run(block, cfg["output_dir"]), prepared.store.user_ids)
        parts.append(reduce_block(x, present, block.get("pca"), block.get("normalize", True), seed))
    if cfg["handcrafted"]:
        features, _ = handcrafted_features(prepared.store, reference_time=reference_time)
        quantiles = QuantileTransformer(n_quantiles=min(1000, len(features)), output_distribution="uniform", random_state=seed)
        parts.append(quantiles.fit_transform(features).astype(np.float32))
    return np.concatenate(parts, axis=1)
