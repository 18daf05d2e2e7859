"""The `model.*` keys of NextItemRec (UQABench's encoders pretrained on next-item prediction): defaults, docs, checks.

Torch-free, so `--help` and config errors answer without importing Lightning; the module
(lit_modules/next_item_rec.py) takes exactly these keys as constructor arguments, plus `data_args`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from lit_modules.next_event_gpt_config import SCHEDULES

ENCODERS = ("gru4rec", "sasrec", "hstu", "trm", "mamba")  # lit_modules.seq_encoders.build_encoder's names
ITEM_INPUTS = ("full", "no_text", "no_side")
OBJECTIVES = ("supervised", "contrastive")
POOLINGS = ("last", "mean")


def check_next_item_rec(hp: Mapping[str, Any]) -> None:
    """Checks of the keys alone, shared by the config and the module's constructor; each error names its key."""
    choices = {"encoder": ENCODERS, "item_inputs": ITEM_INPUTS, "objective": OBJECTIVES, "pooling": POOLINGS, "schedule": SCHEDULES}
    for key, allowed in choices.items():
        if hp[key] not in allowed:
            raise ValueError(f"model.{key} must be one of {allowed}, got {hp[key]!r}")
    for key in ("hidden", "layers", "heads", "max_len", "id_dim", "side_dim", "text_dim", "text_vocab", "state_size", "conv_kernel", "expand"):
        if hp[key] < 1:
            raise ValueError(f"model.{key} must be >= 1, got {hp[key]}")
    if hp["text_len"] < 0:
        raise ValueError(f"model.text_len must be >= 0, got {hp['text_len']}")
    if hp["encoder"] in ("sasrec", "hstu", "trm") and hp["hidden"] % hp["heads"]:
        raise ValueError(f"model.hidden ({hp['hidden']}) must be divisible by model.heads ({hp['heads']})")
    if hp["encoder"] == "trm" and (hp["hidden"] // hp["heads"]) % 2:
        raise ValueError(f"model.hidden / model.heads ({hp['hidden']} / {hp['heads']}) must be even: RoPE rotates feature pairs")
    if not 0.0 <= hp["dropout"] < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {hp['dropout']}")
    if hp["sampled_negatives"] is not None and hp["sampled_negatives"] < 1:
        raise ValueError(f"model.sampled_negatives must be null or >= 1, got {hp['sampled_negatives']}")
    if hp["sampled_negatives"] is not None and hp["objective"] != "supervised":
        raise ValueError("model.sampled_negatives: only the supervised objective samples negatives (contrastive uses the batch)")
    if not hp["temperature"] > 0:
        raise ValueError(f"model.temperature must be > 0, got {hp['temperature']}")
    if not hp["top_k"] or any(k < 1 for k in hp["top_k"]):
        raise ValueError(f"model.top_k must be a non-empty list of cutoffs >= 1, got {hp['top_k']}")
    if hp["warmup_steps"] < 0:
        raise ValueError(f"model.warmup_steps must be >= 0, got {hp['warmup_steps']}")


@dataclass
class NextItemRecConfig:
    """UQABench's sequence encoders (GRU4Rec, SASRec, HSTU, Trm++, Mamba4Rec) pretrained on next-item prediction at every position."""

    inputs: ClassVar[str] = "events"

    name: str = "next_item_rec"
    """Method name (registry key)."""
    encoder: str = "trm"
    """gru4rec | sasrec | hstu | trm (Llama-style: RoPE, RMSNorm, SwiGLU) | mamba (pure-PyTorch selective scan; mamba-ssm's kernel on a GPU when installed)."""
    item_field: str = "item"
    """The categorical field whose ids are the items (predicted and tied to the output table)."""
    side_fields: list[str] = field(default_factory=lambda: ["genre", "year"])
    """Token fields of side information, one id per item (its first training event's); ml100k: primary genre, release-year bucket."""
    text_field: str | None = "title"
    """Text field of the item (its words, as a bag of token ids); null: no text."""
    item_inputs: str = "full"
    """Item input: full (id + side + text) | no_text | no_side (the paper's ablations)."""
    text_vocab: int = 4096
    """Word vocabulary of the item texts: the most frequent words of the training users' items."""
    text_len: int = 16
    """Words kept per item text."""
    id_dim: int = 64
    """Item-id embedding width (paper: 128)."""
    side_dim: int = 16
    """Width of each side-id embedding (paper: 64)."""
    text_dim: int = 32
    """Width of the text bag embedding."""
    hidden: int = 64
    """Encoder width = user embedding size."""
    layers: int = 2
    """Encoder layers."""
    heads: int = 2
    """Attention heads (SASRec, HSTU, Trm++)."""
    dropout: float = 0.1
    """Dropout."""
    max_len: int = 50
    """Events read per user: the last max_len (paper: 512)."""
    state_size: int = 16
    """Mamba: state size N per channel."""
    conv_kernel: int = 4
    """Mamba: causal depthwise convolution width."""
    expand: int = 2
    """Mamba: inner width = expand x hidden."""
    objective: str = "supervised"
    """supervised (softmax over the tied item table) | contrastive (InfoNCE against the batch's other next items)."""
    sampled_negatives: int | None = None
    """Supervised only: a sampled softmax with this many uniform negatives for large catalogues (null: the full softmax)."""
    temperature: float = 0.1
    """Contrastive: temperature of the cosine similarities."""
    pooling: str = "last"
    """User vector: last (state at the last real event) | mean (over the real events)."""
    top_k: list[int] = field(default_factory=lambda: [10, 20])
    """Cutoffs K of Recall@K and NDCG@K: val/ on each val user's second-to-last item, test/ on the last (metrics.json)."""
    lr: float = 1e-3
    """Learning rate (AdamW)."""
    weight_decay: float = 0.0
    """Weight decay."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    schedule: str = "constant"
    """constant | cosine (decay to 0 over the run)."""

    def __post_init__(self) -> None:
        check_next_item_rec(asdict(self))

    def data_args(self, data: Any) -> dict[str, Any]:
        """The resolved fields, vocabulary sizes, and the per-item tables (side ids, text ids) built from the training users."""
        from datamodules.item_features import check_side_fields, side_table, text_table
        from lit_modules.ials_config import item_field

        item = item_field(self.item_field, data, key="model.item_field")
        sides = [item_field(f, data, key="model.side_fields") for f in self.side_fields]
        check_side_fields(data, item, sides)
        text_len = self.text_len if self.text_field is not None else 0
        return {
            "item_field": item,
            "side_fields": sides,
            "n_items": data.store.vocab_sizes[item],
            "side_sizes": [data.store.vocab_sizes[f] for f in sides],
            "side_table": side_table(data, item, sides),
            "text_table": text_table(data, item, self.text_field, self.text_vocab, text_len),
        }
