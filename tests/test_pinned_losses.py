"""Each method's loss after a few fixed-seed steps on a tiny model, pinned.

A changed number here is a visible decision (a new default, another init, a changed loss),
never a silent drift. The runs go through the same builders and Trainer as a real run.
Pins were measured on the CPU torch wheel in constraints.txt.
"""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch

from datamodules.datamodule import EventDataModule
from experiments.build import build_datamodule, build_module
from lit_modules.gru_autoencoder_config import GRUAutoencoderConfig
from lit_modules.llm4es_config import LLM4ESConfig, LMFeaturesConfig
from lit_modules.next_event_gpt_config import NextEventGPTConfig
from lit_modules.next_item_rec_config import NextItemRecConfig
from tests.conftest import generic_config

STEPS = 3
REL = 1e-4  # float sums may differ in the last digits between thread counts


@pytest.fixture
def events(csv_data, tmp_path) -> EventDataModule:
    events, labels = csv_data
    return EventDataModule(generic_config(events, labels, tmp_path / "cache", batch_size=8), seed=0)


def fit_briefly(config, events: EventDataModule) -> dict[str, float]:
    """STEPS training steps from seed 0, then one validation pass; the logged losses."""
    L.seed_everything(0, verbose=False)
    module = build_module(config, events.data)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=build_datamodule(config, events))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """MiniLM's tokenizer and architecture, 2 layers of width 32, random weights from seed 0."""
    from lit_modules.random_lm import save_random_causal_lm

    out = tmp_path_factory.mktemp("tiny_lm") / "lm"
    return save_random_causal_lm(out, num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)


@pytest.mark.parametrize(
    "pin, options", [("gru_autoencoder", {}), ("gru_autoencoder_concat_no_markers", dict(decoder_input="concat", markers=False))]
)
def test_gru_autoencoder_pinned_loss(events, pin, options):
    """The defaults (user vector added, markers on), and the options that reproduce the earlier model exactly."""
    config = GRUAutoencoderConfig(time="day", emb_dim=8, hidden=16, layers=1, dropout=0.0, **options)
    metrics = fit_briefly(config, events)
    assert {"train/loss_day", "train/loss_event_type", "val/loss_merchant"} <= set(metrics)
    assert metrics["val/loss"] == pytest.approx(PINNED[pin], rel=REL)


def test_next_event_gpt_pinned_loss(events):
    config = NextEventGPTConfig(
        fields=["event_type", "merchant"], value_fields=["amount"], predict_values=["amount"], hidden=16, layers=1, heads=2,
        max_len=16, slice_min=2, slice_max=16, warmup_steps=1, schedule="cosine",
    )
    metrics = fit_briefly(config, events)
    assert {"train/loss_merchant", "train/loss_amount_mae", "val/loss_event_type"} <= set(metrics)
    assert metrics["val/loss"] == pytest.approx(PINNED["next_event_gpt"], rel=REL)


def test_next_event_gpt_event_types_pinned_loss(events):
    """The same model reading and predicting purchases only (refunds dropped from every sequence)."""
    config = NextEventGPTConfig(
        fields=["merchant"], event_types=["purchase"], value_fields=["amount"], predict_values=["amount"], hidden=16, layers=1,
        heads=2, max_len=16, slice_min=2, slice_max=16, warmup_steps=1, schedule="cosine",
    )
    metrics = fit_briefly(config, events)
    assert {"train/loss_merchant", "val/loss_amount_mae"} <= set(metrics)
    assert metrics["val/loss"] == pytest.approx(PINNED["next_event_gpt_event_types"], rel=REL)


@pytest.mark.parametrize(
    "encoder, objective", [("gru4rec", "supervised"), ("sasrec", "supervised"), ("hstu", "supervised"), ("trm", "supervised"),
                           ("mamba", "supervised"), ("trm", "contrastive")],
)  # fmt: skip
def test_next_item_rec_pinned_loss(events, encoder, objective):
    """Each UQABench encoder on merchants as items, event type and amount bucket as side ids, description words as text."""
    config = NextItemRecConfig(
        encoder=encoder, objective=objective, item_field="merchant", side_fields=["event_type", "amount"], text_field="description",
        id_dim=8, side_dim=4, text_dim=4, hidden=16, layers=1, heads=2, max_len=16, state_size=4, text_len=4, warmup_steps=1,
    )
    metrics = fit_briefly(config, events)
    assert {"train/loss_next_item", "val/loss_next_item", "val/recall@10", "val/ndcg@20"} <= set(metrics)
    assert metrics["val/loss"] == pytest.approx(PINNED[f"next_item_rec_{encoder}_{objective}"], rel=REL)


def test_llm4es_pinned_loss(events, tiny_lm):
    config = LLM4ESConfig(model_path=str(tiny_lm), from_layer=-2, lr=1e-3, warmup_steps=1, max_tokens=64)
    metrics = fit_briefly(config, events)
    assert {"train/loss_next_token", "val/loss_next_token"} <= set(metrics)
    assert metrics["val/loss"] == pytest.approx(PINNED["llm4es"], rel=REL)


def test_lm_features_pinned_embedding(events, tiny_lm):
    """Nothing trains: the pin is the first batch's embedding norm from the frozen random LM."""
    config = LMFeaturesConfig(model_path=str(tiny_lm), max_tokens=64)
    module = build_module(config, events.data).eval()
    batch = next(iter(build_datamodule(config, events).predict_dataloader()))
    assert float(torch.linalg.norm(module.embed(batch))) == pytest.approx(PINNED["lm_features"], rel=REL)


PINNED = {
    "gru_autoencoder": 11.035914,
    "gru_autoencoder_concat_no_markers": 11.019826,  # the pin before decoder_input/markers existed
    "next_event_gpt": 6.4127498,
    "next_event_gpt_event_types": 4.4670568,
    "next_item_rec_gru4rec_supervised": 2.0763180,  # 8 merchants: the uniform guess is ln 8 = 2.079
    "next_item_rec_sasrec_supervised": 2.0730486,
    "next_item_rec_hstu_supervised": 2.0591266,
    "next_item_rec_trm_supervised": 2.0780993,
    "next_item_rec_mamba_supervised": 2.0736008,
    "next_item_rec_trm_contrastive": 3.8821645,
    "llm4es": 10.152400,
    "lm_features": 10.305487,  # windows: every event of the users longer than 64 tokens is read (one window only: 10.355422)
}
