"""Methods by name: the config dataclass of each and where its LightningModule lives.

Kept free of torch and lightning imports so `--help` and config errors answer fast; the
module class is imported only when a run builds it. tests/test_registry.py keeps this
table, the classes and experiments/configs/model/*.yaml in sync.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any

from lit_modules.lm import MINILM


@dataclass
class GRUAutoencoderConfig:
    """GRU autoencoder of "Encode Me If You Can": reconstructs every field of the sequence from one vector."""

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
    """How field embeddings form the event vector: sum | concat."""
    lr: float = 1e-3
    """Learning rate (Adam)."""
    weight_decay: float = 0.0
    """Weight decay."""
    codes_events: int = 4
    """sku_text variant (fields = [a codes field]): read the codes of this many last events carrying codes."""


@dataclass
class NextEventGPTConfig:
    """GPT-2-style next-event model of "Encode Me If You Can" (next product / next url), trained from scratch."""

    name: str = "next_event_gpt"
    """Method name (registry key)."""
    fields: list[str] | None = None
    """Input token fields (null: every categorical and numeric field; 'event_type' means the schema's)."""
    time: str = "none"
    """Time index field added to the input: none | day | week."""
    value_fields: list[str] = field(default_factory=list)
    """Numeric fields whose raw value (signed log1p) is projected into the input."""
    predict_fields: list[str] | None = None
    """Token fields of the next event to predict by cross-entropy (null: the input fields)."""
    predict_values: list[str] = field(default_factory=list)
    """Numeric fields of the next event to predict by MAE."""
    hidden: int = 128
    """Transformer width = user embedding size."""
    layers: int = 4
    """Transformer blocks."""
    heads: int = 4
    """Attention heads."""
    dropout: float = 0.1
    """Dropout."""
    max_len: int = 65
    """Positions; validation and embeddings read the last max_len events."""
    slice_min: int = 33
    """Shortest random training window (paper: 33)."""
    slice_max: int = 65
    """Longest random training window (paper: 65); keep it = max_len so every position is trained."""
    sampled_negatives: int | None = None
    """Sampled softmax with this many negatives for larger vocabularies (paper's next url: 10000)."""
    lr: float = 1e-3
    """Learning rate (AdamW)."""
    weight_decay: float = 0.0
    """Weight decay."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    schedule: str = "constant"
    """constant | cosine (decay to 0 over the run)."""


@dataclass
class LLM4ESConfig:
    """LLM4ES: events rendered as text, a causal LM fine-tuned by next-token prediction, embeddings pooled from it."""

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


@dataclass
class LMFeaturesConfig:
    """The "Encode Me" LM feature extractor: a frozen LM reads the last events as text; mean-pooled hidden states."""

    name: str = "lm_features"
    """Method name (registry key)."""
    model_path: str = MINILM
    """Local model folder (the paper: SmolLM2-135M) or package:NAME."""
    attn_implementation: str | None = None
    """eager | sdpa | flash_attention_2 (null: transformers' default)."""
    max_tokens: int = 512
    """Token budget per user text."""
    max_events: int | None = 64
    """The paper renders the last 64 events."""
    header: bool = False
    """The paper's lines carry their field names, no header."""
    padding_side: str = "right"
    """right | left."""


REWRITE_SETTINGS = ("rewriter_path", "rewrite_formats", "rewrite_temperature", "rewrite_top_p", "rewrite_max_new_tokens")
TEXT_SETTINGS = ("max_tokens", "formats", "max_events", "header", "pack_length", "block_mask", "padding_side", *REWRITE_SETTINGS)


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

    name: str = "ensemble"
    """Method name (registry key)."""
    blocks: list[EnsembleBlock] = field(default_factory=list)
    """The blocks, each a finished run on the same data."""
    handcrafted: bool = True
    """Append handcrafted features mapped to uniform by a quantile transform."""
    output_dir: str = "outputs"
    """Where blocks named by experiment are looked up."""


@dataclass
class ModelEntry:
    config: type
    target: str | None  # "module:Class" of the LightningModule; None: nothing to train (ensemble)
    builder: str | None  # name of the function below that turns (config, prepared data) into constructor kwargs


MODELS: dict[str, ModelEntry] = {
    "gru_autoencoder": ModelEntry(GRUAutoencoderConfig, "lit_modules.gru_autoencoder:GRUAutoencoder", "sequence_fields_kwargs"),
    "next_event_gpt": ModelEntry(NextEventGPTConfig, "lit_modules.next_event_gpt:NextEventGPT", "next_event_kwargs"),
    "llm4es": ModelEntry(LLM4ESConfig, "lit_modules.llm4es:LLM4ESFinetune", "text_model_kwargs"),
    "lm_features": ModelEntry(LMFeaturesConfig, "lit_modules.llm4es:LMFeatureExtractor", "text_model_kwargs"),
    "ensemble": ModelEntry(EnsembleConfig, None, None),
}


def resolve_fields(requested: list[str] | None, time: str, schema: Any, store: Any) -> list[str]:
    """Model field list from config: null means every event token field; 'event_type' names the schema's.

    A codes field (e.g. the product name codes of the sku_text variant) must be the only field.
    """
    from datamodules.schema import DAY_FIELD, WEEK_FIELD

    event_fields = [f for f in store.tokens if f not in (DAY_FIELD, WEEK_FIELD)]
    known = [*store.tokens, *store.codes]
    if requested is None:
        fields = event_fields
    else:
        fields = []
        for name in requested:
            if name == "event_type" and "event_type" not in known:
                if schema.event_type is None:
                    raise ValueError("model.fields: 'event_type' asked for, but the data schema has no event_type")
                name = schema.event_type
            if name not in known:
                raise ValueError(f"model.fields: {name!r} is not a field of this data; fields are {sorted(known)}")
            fields.append(name)
    if time not in ("none", DAY_FIELD, WEEK_FIELD):
        raise ValueError(f"model.time: {time!r}; choose none, day or week")
    fields = ([time] if time != "none" else []) + fields
    if any(f in store.codes for f in fields) and len(fields) > 1:
        raise ValueError(f"model.fields: a codes field is read alone (time: none); got {fields}")
    return fields


def sequence_fields_kwargs(cfg: dict, prepared: Any) -> dict:
    kwargs = {k: v for k, v in cfg.items() if k not in ("name", "time")}
    kwargs["fields"] = resolve_fields(cfg["fields"], cfg["time"], prepared.schema, prepared.store)
    kwargs["vocab_sizes"] = {f: prepared.store.vocab_sizes[f] for f in kwargs["fields"]}
    return kwargs


def next_event_kwargs(cfg: dict, prepared: Any) -> dict:
    store = prepared.store
    kwargs = {k: v for k, v in cfg.items() if k not in ("name", "time")}
    kwargs["fields"] = resolve_fields(cfg["fields"], cfg["time"], prepared.schema, store)
    targets = cfg["predict_fields"] if cfg["predict_fields"] is not None else [f for f in kwargs["fields"] if f != cfg["time"]]
    kwargs["predict_fields"] = resolve_fields(targets, "none", prepared.schema, store)
    for name in [*cfg["value_fields"], *cfg["predict_values"]]:
        if name not in store.values:
            raise ValueError(f"model: {name!r} is not a numeric field of this data; numeric fields are {sorted(store.values)}")
    used = dict.fromkeys([*kwargs["fields"], *kwargs["predict_fields"]])
    kwargs["vocab_sizes"] = {f: store.vocab_sizes[f] for f in used}
    return kwargs


def text_model_kwargs(cfg: dict, prepared: Any) -> dict:
    """Constructor kwargs of a text model: everything but the data-side settings (those go to the TextDataModule)."""
    return {k: v for k, v in cfg.items() if k != "name" and k not in TEXT_SETTINGS}


def build_datamodule(cfg: dict, events: Any) -> Any:
    """The DataModule a method reads: the event sequences as they are, or rendered as text for language models."""
    if MODELS[cfg["name"]].builder != "text_model_kwargs":
        return events
    from datamodules.datamodule import TextDataModule
    from lit_modules.lm import load_tokenizer

    settings = {k: cfg[k] for k in TEXT_SETTINGS if k in cfg and k not in REWRITE_SETTINGS}
    if "formats" in settings:
        settings["formats"] = tuple(settings["formats"])
    tokenizer = load_tokenizer(cfg["model_path"], settings.pop("padding_side", "right"))
    rewrite = None
    if cfg.get("rewriter_path") is not None:
        from lit_modules.rewrite import training_rewriter

        rewrite = training_rewriter(cfg, events.cfg.cache_dir, events.data.path, events.seed)
    return TextDataModule(events, tokenizer, rewrite=rewrite, **settings)


def build_module(cfg: Any, prepared: Any):
    """Instantiate the LightningModule named by cfg.name for this data."""
    entry = MODELS[cfg["name"] if isinstance(cfg, dict) else cfg.name]
    plain = asdict(cfg) if not isinstance(cfg, dict) else dict(cfg)
    module_name, cls_name = entry.target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**globals()[entry.builder](plain, prepared))


