"""A method's LightningModule and DataModule from its config and the prepared data.

The one place where config keys become constructor arguments (see lit_modules/contract.py):
every key but `name` and the config's `data_keys`, plus what `data_args` derives from the
data. The DataModule follows the config's declared `inputs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lit_modules.registry import METHODS


def constructor_args(config: Any, prepared: Any) -> dict[str, Any]:
    """Keyword arguments of the method's module: its config keys plus the data-derived ones."""
    skip = {"name", *getattr(config, "data_keys", ())}
    kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in skip}
    if hasattr(config, "data_args"):
        kwargs.update(config.data_args(prepared))
    return kwargs


def build_module(config: Any, prepared: Any) -> Any:
    """The LightningModule of `config.name` for this data."""
    return METHODS[config.name].module_class()(**constructor_args(config, prepared))


def build_datamodule(config: Any, events: Any, train: bool = True) -> Any:
    """The DataModule the method declared (`config.inputs`): the event sequences as they are, or rendered as text.

    train=False (embedding only) skips what only training reads, such as LLM4ES's rewrites.
    """
    if config.inputs == "events":
        return events
    if config.inputs == "instruct":  # InstructUE: UserQA triples to train, histories with an instruction to embed
        from datamodules.instruct_batches import InstructDataModule
        from lit_modules.instruct_ue_tokens import load_tokenizers

        return InstructDataModule(events, *load_tokenizers(config), config, train=train)
    if config.inputs == "uqa":  # UQAAlign: UQABench questions to train and score, event batches or user texts to embed
        from datamodules.uqa_batches import UQADataModule
        from lit_modules.lm import load_tokenizer

        return UQADataModule(events, load_tokenizer(config.model_path), config, train=train)
    if config.inputs != "text":
        raise ValueError(f"model.name={config.name}: inputs {config.inputs!r} are not read through a DataModule")
    from datamodules.datamodule import TextDataModule
    from lit_modules.lm import load_tokenizer
    from lit_modules.llm4es_config import REWRITE_KEYS

    settings = {k: getattr(config, k) for k in config.data_keys if k not in REWRITE_KEYS}
    if "formats" in settings:
        settings["formats"] = tuple(settings["formats"])
    tokenizer = load_tokenizer(config.model_path, settings.pop("padding_side", "right"))
    rewrite = None
    if train and getattr(config, "rewriter_path", None) is not None:
        from lit_modules.rewrite import training_rewriter

        rewrite = training_rewriter(dataclasses.asdict(config), events.cfg.cache_dir, events.data.path, events.seed)
    return TextDataModule(events, tokenizer, rewrite=rewrite, **settings)
