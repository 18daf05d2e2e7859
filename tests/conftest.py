"""Shared fixtures: a small transaction log written as CSV (the generic source's input) and its config."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datamodules.config import DataConfig, LabelsConfig, SchemaConfig, TargetConfig  # noqa: E402
from datamodules.schema import FieldSpec  # noqa: E402

START = dt.datetime(2024, 1, 1)


def transactions(n_users: int = 40, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Users of two kinds (grocery vs travel merchants, small vs large amounts); the kind is the label."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for u in range(n_users):
        kind = u % 2
        n = int(rng.integers(3, 25))
        days = np.sort(rng.integers(0, 60, size=n))
        for i, d in enumerate(days):
            merchant = f"{'travel' if kind else 'grocery'}_{rng.integers(0, 4)}"
            amount = float(np.round(rng.lognormal(4 if kind else 2, 0.3), 2))
            etype = "purchase" if rng.random() < 0.8 else "refund"
            ts = START + dt.timedelta(days=int(d), minutes=int(i))
            rows.append((f"u{u:03d}", ts.strftime("%Y-%m-%d %H:%M:%S"), etype, merchant, amount, f"{merchant} #{i}"))
        labels.append((f"u{u:03d}", "traveller" if kind else "homebody", 20 + u))
    events = pl.DataFrame(rows, schema=["client", "ts", "event_type", "merchant", "amount", "description"], orient="row")
    return events, pl.DataFrame(labels, schema=["client", "segment", "age"], orient="row")


@pytest.fixture
def csv_data(tmp_path: Path) -> tuple[Path, Path]:
    events, labels = transactions()
    events.write_csv(tmp_path / "events.csv")
    labels.write_csv(tmp_path / "labels.csv")
    return tmp_path / "events.csv", tmp_path / "labels.csv"


def generic_config(events: Path, labels: Path | None, cache_dir: Path, **overrides) -> DataConfig:
    cfg = DataConfig(
        source="generic",
        path=str(events),
        schema=SchemaConfig(
            user="client",
            time="ts",
            time_format="%Y-%m-%d %H:%M:%S",
            event_type="event_type",
            fields=[
                FieldSpec("event_type"),
                FieldSpec("merchant"),
                FieldSpec("amount", "numeric", n_buckets=4),
                FieldSpec("description", "text"),
            ],
        ),
        labels=LabelsConfig(path=str(labels) if labels else None, user="client"),
        targets=[TargetConfig("segment", "binary", positive="traveller")] if labels else [],
        cache_dir=str(cache_dir),
        val_fraction=0.2,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture
def one_thread():
    """One torch thread for tests that compare runs bit for bit (thread count changes float sums)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ml100k_cache(tmp_path_factory) -> Path:
    """One ml100k preprocessing cache for the whole session (the files never change)."""
    return tmp_path_factory.mktemp("ml100k_cache")


@pytest.fixture(scope="session")
def recsys_dir(tmp_path_factory) -> Path:
    """A small generated RecSys Challenge 2025 layout shared by the session."""
    from datamodules.synthetic import generate_recsys2025

    out = tmp_path_factory.mktemp("recsys2025")
    generate_recsys2025(out, clients=150, seed=0, days=60)
    return out


@pytest.fixture(scope="session")
def tiny_minilm_dir(tmp_path_factory) -> Path:
    """MiniLM's architecture and tokenizer at 4 layers x 64 wide, random weights: the smoke runs' stand-in backbone."""
    from lit_modules.random_lm import save_random_causal_lm

    sizes = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=2, intermediate_size=128)  # 4: LLM4ES pools from layer -4
    return save_random_causal_lm(tmp_path_factory.mktemp("models") / "minilm_tiny", **sizes)


@pytest.fixture(scope="session")
def tiny_causal_lm_dir(tmp_path_factory) -> Path:
    """A one-layer random-weight Llama with the MiniLM tokenizer (from its package): a stand-in instruct LM
    for the LLM rewrite, fast enough to generate for every training user (model.rewriter_path=<this>)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_modules.lm import MINILM, load_tokenizer

    out = tmp_path_factory.mktemp("models") / "tiny_llama"
    tok = load_tokenizer(MINILM)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out
