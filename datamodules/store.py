"""All users' event sequences as flat numpy arrays + offsets (no torch: preprocessing and reports load it cheaply)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl


@dataclass
class SequenceStore:
    """All users' event sequences, concatenated. User u owns rows offsets[u]:offsets[u+1]."""

    user_ids: np.ndarray  # [U]
    offsets: np.ndarray  # int64 [U+1]
    tokens: dict[str, np.ndarray]  # int32 [N] per token field
    values: dict[str, np.ndarray]  # float32 [N] per numeric field, NaN where missing
    times: np.ndarray  # int64 [N], epoch seconds
    vocab_sizes: dict[str, int]  # token and codes fields
    codes: dict[str, np.ndarray] = field(default_factory=dict)  # int32 [N, L] per codes field

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_events(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_frame(
        cls, users: pl.DataFrame, vocab_sizes: dict[str, int], value_fields: Sequence[str], code_fields: Sequence[str] = ()
    ) -> "SequenceStore":
        """Build from the cached one-row-per-user frame (list columns `tok_<f>`, `val_<f>`, `cod_<f>`, `time`)."""
        lengths = users["time"].list.len().to_numpy().astype(np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])

        def flat(col: str, dtype: type) -> np.ndarray:
            return users[col].explode().to_numpy().astype(dtype, copy=False)

        return cls(
            user_ids=users["user_id"].to_numpy(),
            offsets=offsets,
            tokens={f: flat(f"tok_{f}", np.int32) for f in vocab_sizes if f not in code_fields},
            values={f: flat(f"val_{f}", np.float32) for f in value_fields},
            times=flat("time", np.int64),
            vocab_sizes=dict(vocab_sizes),
            codes={f: users[f"cod_{f}"].explode().to_numpy().astype(np.int32) for f in code_fields},  # Array column -> [N, L]
        )
