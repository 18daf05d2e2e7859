"""The sequence encoders the inference and scaling benchmarks measure, at their CPU preset sizes.

A factory takes the vocabulary sizes of the token fields (`token_vocab(store)`) and the longest sequence
the model must read, and returns a module with `embed(batch)` and `losses(batch)`.
Hyperparameters come from the model presets in experiments/configs/model/, so the
benchmarks measure what `python -m experiments.run` trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.registry import encoder

PRESETS = Path(__file__).resolve().parent.parent / "experiments" / "configs" / "model"
TIME_FIELDS = ("day", "week")


def preset(name: str) -> dict[str, Any]:
    """A model preset as a plain dict, without the registry keys."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(PRESETS / f"{name}.yaml"))
    return {k: v for k, v in cfg.items() if k not in ("name", "time")}


@encoder("gru_autoencoder")
def gru_autoencoder(vocab_sizes: dict[str, int], max_len: int) -> Any:
    """gru_ae_all: every event field, hidden 128, one GRU layer (the CPU default)."""
    from lit_modules.gru_autoencoder import GRUAutoencoder

    kwargs = preset("gru_ae_all")
    fields = [f for f in vocab_sizes if f not in TIME_FIELDS] if kwargs.pop("fields") is None else kwargs.pop("fields")
    return GRUAutoencoder(vocab_sizes={f: vocab_sizes[f] for f in fields}, fields=fields, **kwargs)


@encoder("next_event_gpt")
def next_event_gpt(vocab_sizes: dict[str, int], max_len: int) -> Any:
    """next_product: event type, category, price; hidden 128, 4 blocks, 4 heads; positions = max_len.

    Every event is read (no event_types filter): the factory knows vocabulary sizes, not the event types' names.
    """
    from lit_modules.next_event_gpt import NextEventGPT

    kwargs = preset("next_product")
    kwargs.update(event_types=None, event_type_field=None, event_type_ids=None)
    fields = kwargs.pop("fields")
    predict = kwargs.pop("predict_fields") or fields
    kwargs.update(max_len=max_len, slice_min=min(kwargs["slice_min"], max_len), slice_max=max_len)
    return NextEventGPT(vocab_sizes={f: vocab_sizes[f] for f in dict.fromkeys([*fields, *predict])}, fields=fields, predict_fields=predict, **kwargs)


def token_vocab(store: Any) -> dict[str, int]:
    """Vocabulary sizes of the store's token fields (codes fields are not sequence inputs here)."""
    return {f: store.vocab_sizes[f] for f in store.tokens}
