"""The text DataModule: same users and splits as the event DataModule, one plain-text row per user for embedding;
LLM rewrites of the training users as extra training texts."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
import torch

from datamodules.datamodule import EventDataModule, TextDataModule
from datamodules.text_batches import count_tokens, encode
from lit_modules.lm import MINILM, load_tokenizer
from experiments.build import build_datamodule
from lit_modules.llm4es_config import LLM4ESConfig
from tests.conftest import generic_config


def test_text_loaders_cover_the_splits(tmp_path, csv_data):
    events, labels = csv_data
    base = EventDataModule(generic_config(events, labels, tmp_path / "cache"), seed=0)
    text = TextDataModule(base, load_tokenizer(MINILM), max_tokens=64, formats=("plain", "json"), pack_length=128)
    seen = np.concatenate([b["index"].numpy() for b in text.predict_dataloader()])
    assert sorted(seen.tolist()) == list(range(len(base.data.store)))
    val = np.concatenate([b["index"].numpy() for b in text.val_dataloader()])
    assert set(val.tolist()) == set(np.flatnonzero(base.data.is_val).tolist())
    train = list(text.train_dataloader())
    documents = np.concatenate([b["index"].numpy() for b in train])
    assert sorted(documents.tolist()) == sorted(np.flatnonzero(~base.data.is_val).tolist() * 2)  # two formats
    assert all(b["input_ids"].shape[1] == 128 and "position_ids" in b for b in train)  # packed rows
    first = next(iter(text.predict_dataloader()))
    assert first["input_ids"].shape[1] <= 64 and torch.equal(first["attention_mask"].sum(1) > 0, torch.ones(len(first["index"]), dtype=torch.bool))


def training_documents(text: TextDataModule) -> list[tuple[int, list[int]]]:
    """(store row, token ids) of every document in one epoch of padded training batches."""
    docs = []
    for b in text.train_dataloader():
        for row, ids, mask in zip(b["index"].tolist(), b["input_ids"], b["attention_mask"].bool()):
            docs.append((row, ids[mask].tolist()))
    return docs


def test_llm_rewrites_generated_cached_and_trained_on(tmp_path, csv_data, tiny_causal_lm_dir, caplog):
    events, labels = csv_data
    rewriter = shutil.copytree(tiny_causal_lm_dir, tmp_path / "rewriter")  # deleted below; the session's copy stays
    cfg = LLM4ESConfig(max_tokens=64, rewriter_path=str(rewriter), rewrite_formats=["json", "yaml"], rewrite_max_new_tokens=6)
    base = EventDataModule(generic_config(events, labels, tmp_path / "cache"), seed=0)
    train_rows = np.flatnonzero(~base.data.is_val).tolist()
    with caplog.at_level("INFO", logger="lit_modules.rewrite"):
        text = build_datamodule(cfg, base)
    assert f"0 from cache {tmp_path / 'cache' / 'rewrites'}" in caplog.text and f"{2 * len(train_rows)} to generate" in caplog.text
    assert text.rewrite_counts["kept"] + text.rewrite_counts["dropped"] == 2 * len(train_rows)
    assert text.rewrite_counts["kept"] >= len(train_rows) and sorted({r for r, _ in text.rewrites}) == train_rows
    cache = tmp_path / "cache" / "rewrites" / f"{base.data.path.name}.parquet"
    assert pl.read_parquet(cache).height == 2 * len(train_rows)

    docs = training_documents(text)  # plain renderings, then the rewrites, each in the epoch once
    assert len(docs) == len(train_rows) + len(text.rewrites)
    tok = text.tokenizer
    for row, rewritten in text.rewrites:
        assert count_tokens(tok, rewritten) < 64
        assert (row, encode(tok, rewritten)) in docs

    shutil.rmtree(rewriter)  # a rerun reads every rewrite from the cache: it cannot load the model
    caplog.clear()
    with caplog.at_level("INFO", logger="lit_modules.rewrite"):
        again = build_datamodule(cfg, EventDataModule(generic_config(events, labels, tmp_path / "cache"), seed=0))
    assert "0 to generate" in caplog.text
    assert again.rewrites == text.rewrites


def test_over_budget_rewrites_keep_recent_lines_or_are_dropped(tmp_path, csv_data):
    events, labels = csv_data
    base = EventDataModule(generic_config(events, labels, tmp_path / "cache"), seed=0)
    tok = load_tokenizer(MINILM)
    long_line = "word " * 100

    def rewrite(texts: list[str]) -> list[list[str]]:  # fixed outputs of every kind an LLM can give
        return [["short rewrite", "\n".join(f"line {i}" for i in range(40)), long_line, "  "] for _ in texts]

    text = TextDataModule(base, tok, max_tokens=48, header=False, rewrite=rewrite)
    n = int((~base.data.is_val).sum())
    assert text.rewrite_counts == {"kept": 2 * n, "cut": n, "dropped": 2 * n}
    cut = [t for _, t in text.rewrites if t.startswith("line")]
    assert len(cut) == n and cut[0].endswith("line 39") and "line 0\n" not in cut[0]
    assert all(len(encode(tok, t)) <= 48 for _, t in text.rewrites)
    assert len(training_documents(text)) == n + 2 * n


def test_unknown_rewrite_format_is_a_config_error_naming_the_key():
    from experiments.config import ConfigError, compose

    with pytest.raises(ConfigError, match=r"model.rewrite_formats \['xml'\]; choose from"):
        compose(["experiment=llm4es_rewrite", "model.rewriter_path=no/such/model", "model.rewrite_formats=[xml]"])
