"""The `model.*` keys of the language-model methods (LLM4ESFinetune, LMFeatureExtractor): defaults, docs, checks.

Torch-free, so `--help` and config errors answer without importing Lightning. Keys in
`data_keys` shape the text the model reads and go to the TextDataModule (the rewrite keys
to the rewriter it is given); every other key (but `name`) is a constructor argument of
the module in lit_modules/llm4es.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from datamodules.text import check_formats, check_padding_side
from lit_modules.lm import MINILM

POOLINGS = ("llm4es", "last_token", "last_layer_mean")
TEXT_KEYS = ("max_tokens", "formats", "max_events", "header", "pack_length", "block_mask", "padding_side")
REWRITE_KEYS = ("rewriter_path", "rewrite_formats", "rewrite_temperature", "rewrite_top_p", "rewrite_max_new_tokens")


def check_llm4es(pooling: str, betas: list[float]) -> None:
    """Checks shared by the config and the module's constructor."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if len(betas) != 2:
        raise ValueError(f"betas must be two numbers, got {list(betas)}")


@dataclass
class LLM4ESConfig:
    """LLM4ES: events rendered as text, a causal LM fine-tuned by next-token prediction, embeddings pooled from it."""

    inputs: ClassVar[str] = "text"
    data_keys: ClassVar[tuple[str, ...]] = (*TEXT_KEYS, *REWRITE_KEYS)

    name: str = "llm4es"
    """Method name (registry key)."""
    model_path: str = MINILM
    """Local model folder (Qwen2.5, SmolLM2, Llama on GPU machines) or package:NAME for a model shipped by a package."""
    lora: bool = False
    """Train LoRA adapters only (peft) instead of the full model."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_targets: list[str] | None = None
    """LoRA target modules (null: peft's default for the architecture)."""
    from_layer: int = -4
    """LLM4ES pooling: average hidden states from this layer to the last (0 = embeddings output)."""
    pooling: str = "llm4es"
    """llm4es | last_token | last_layer_mean."""
    gradient_checkpointing: bool = False
    """Trade compute for memory."""
    lr: float = 1e-5
    """AdamW learning rate (paper: 1e-5)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas (paper: 0.9, 0.95)."""
    weight_decay: float = 1e-6
    """Weight decay (paper: 1e-6)."""
    warmup_steps: int = 0
    """Linear warmup steps before the cosine decay."""
    attn_implementation: str | None = None
    """eager | sdpa | flash_attention_2 (null: transformers' default)."""
    max_tokens: int = 512
    """Token budget per user text: the most recent events that fit."""
    formats: list[str] = field(default_factory=lambda: ["plain"])
    """Training formats (several = the format augmentation): plain, json, markdown, yaml, html."""
    max_events: int | None = None
    """Render at most this many recent events (null: as many as fit)."""
    header: bool = True
    """Start each text with a header naming the fields."""
    pack_length: int | None = None
    """Pack training texts into rows of this many tokens (documents kept apart); null: padded batches."""
    block_mask: bool = False
    """With packing: a 4-D block-diagonal mask (for attention kernels that do not read position ids)."""
    padding_side: str = "right"
    """right | left."""
    rewriter_path: str | None = None
    """LLM4ES creative transformation: an instruct LM (local folder or package:NAME) rewrites each training user's text; null: off."""
    rewrite_formats: list[str] = field(default_factory=lambda: ["json"])
    """Formats the rewriter writes, one rewrite per training user each; the rewrites are extra training texts."""
    rewrite_temperature: float = 0.6
    """Rewriter sampling temperature (paper: 0.6)."""
    rewrite_top_p: float = 0.9
    """Rewriter nucleus sampling top-p (paper: 0.9)."""
    rewrite_max_new_tokens: int = 1024
    """Longest rewrite generated; a rewrite over max_tokens keeps its most recent whole lines, so cover a whole text."""

    def __post_init__(self) -> None:
        check_llm4es(self.pooling, self.betas)
        check_padding_side(self.padding_side)
        check_formats(self.formats, "model.formats")
        check_formats(self.rewrite_formats, "model.rewrite_formats")


def check_lm_features(embed_format: str, windows: bool, drop_unknown: bool) -> None:
    """A text layout the windowed reader can cut: windows need a format whose events are whole lines."""
    check_formats([embed_format], "model.embed_format")
    if windows and embed_format == "json":
        raise ValueError("model.embed_format json: a JSON list cut into windows is not valid JSON; use plain, markdown, yaml or html")
    if drop_unknown and embed_format != "plain":
        raise ValueError(f"model.drop_unknown needs model.embed_format plain (its values carry their field names), not {embed_format!r}")


@dataclass
class LMFeaturesConfig:
    """The "Encode Me" LM feature extractor: a frozen LM reads the last events as text; mean-pooled hidden states."""

    inputs: ClassVar[str] = "text"
    data_keys: ClassVar[tuple[str, ...]] = ("max_tokens", "max_events", "header", "padding_side", "embed_format", "windows", "fields", "drop_unknown")

    name: str = "lm_features"
    """Method name (registry key)."""
    model_path: str = MINILM
    """Local model folder (the paper: SmolLM2-135M) or package:NAME."""
    attn_implementation: str | None = None
    """eager | sdpa | flash_attention_2 (null: transformers' default)."""
    max_tokens: int = 512
    """Tokens per window the model reads at once (at most its positions: 512 for MiniLM, 2048 or more for SmolLM2-135M)."""
    max_events: int | None = 64
    """The paper renders the last 64 events (null: every stored event, up to data.max_len)."""
    windows: bool = True
    """Read every one of the last max_events events: a text over max_tokens is cut at event lines into consecutive windows, token states pooled over all (false: only the most recent events that fit one window)."""
    header: bool = False
    """The paper's lines carry their field names, no header."""
    embed_format: str = "plain"
    """Text layout: plain (one "name: value; ..." line per event), markdown (a table with a header row), yaml or html."""
    fields: list[str] | None = None
    """Event fields rendered, besides the timestamp (null: all), e.g. [query] for the search-query block."""
    drop_unknown: bool = False
    """Leave a line's unknown values out (plain only): a page visit has no price, a purchase no query."""
    padding_side: str = "right"
    """right | left."""

    def __post_init__(self) -> None:
        check_padding_side(self.padding_side)
        check_lm_features(self.embed_format, self.windows, self.drop_unknown)
