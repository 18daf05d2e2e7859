"""The `model.*` keys of GRUAutoencoder: defaults, docs (`--help`) and checks.

Torch-free, so `--help` and config errors answer without importing Lightning; the module
(lit_modules/gru_autoencoder.py) takes exactly these keys as constructor arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from datamodules.fields import check_time, resolve_fields, with_time

COMBINE_MODES = ("sum", "concat")
DECODER_INPUTS = ("add", "concat")


def check_gru_autoencoder(combine: str, time: str, decoder_input: str) -> None:
    """Checks shared by the config and the module's constructor."""
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
    if decoder_input not in DECODER_INPUTS:
        raise ValueError(f"decoder_input must be one of {DECODER_INPUTS}, got {decoder_input!r}")
    check_time(time)


@dataclass
class GRUAutoencoderConfig:
    """GRU autoencoder of "Encode Me If You Can": reconstructs every field of the sequence from one vector."""

    inputs: ClassVar[str] = "events"

    name: str = "gru_autoencoder"
    """Method name (registry key)."""
    fields: list[str] | None = None
    """Event fields to embed and reconstruct (null: every categorical and numeric field; 'event_type' means the schema's)."""
    time: str = "none"
    """Time index field added to the input: none | day | week."""
    emb_dim: int = 64
    """Embedding size per field."""
    hidden: int = 128
    """GRU hidden size = user embedding size."""
    layers: int = 2
    """Stacked GRU layers in encoder and decoder."""
    dropout: float = 0.1
    """Dropout between GRU layers."""
    combine: str = "sum"
    """How field embeddings form the event vector: sum (emb_dim wide) | concat (emb_dim x fields; the paper's day_event_type)."""
    decoder_input: str = "add"
    """Decoder input per step: add = event vector + user vector (the paper; a linear map brings the user vector to the
    event vector's size when hidden differs from it) | concat = the two side by side."""
    markers: bool = True
    """Encoder reads each field as SOS e_1 .. e_n EOS (the paper) and the user vector is its state at EOS; false: e_1 .. e_n."""
    lr: float = 1e-3
    """Learning rate (AdamW)."""
    weight_decay: float = 0.0
    """Weight decay."""
    codes_events: int = 4
    """sku_text variant (fields = [a codes field]): read the codes of this many last events carrying codes."""

    def __post_init__(self) -> None:
        check_gru_autoencoder(self.combine, self.time, self.decoder_input)

    def data_args(self, data: Any) -> dict[str, Any]:
        """Constructor arguments that come from the data: resolved field names and their vocabulary sizes."""
        fields = resolve_fields(self.fields, data.schema, data.store, self.time)
        return {"fields": fields, "vocab_sizes": {f: data.store.vocab_sizes[f] for f in with_time(fields, self.time)}}
