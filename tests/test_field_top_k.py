"""data.field_top_k: a per-field vocabulary cap over data.top_k and the schema's own top_k."""

from __future__ import annotations

import polars as pl
import pytest
from omegaconf import OmegaConf

from datamodules.config import DataConfig
from datamodules.preprocess import cache_key, prepare, vocab_cap
from datamodules.schema import FieldSpec
from datamodules.sources.base import DataError
from experiments.config import compose
from tests.conftest import generic_config

# merchant m0 x6, m1 x5, ..., m5 x1; event_type buy x11, view x10: one training user.
COUNTS = {f"m{i}": 6 - i for i in range(6)}


def events_csv(tmp_path) -> str:
    merchants = [m for m, n in COUNTS.items() for _ in range(n)]
    rows = [("u1", f"2024-01-01 00:{i:02d}:00", "buy" if i % 2 == 0 else "view", m, 1.0, "x") for i, m in enumerate(merchants)]
    frame = pl.DataFrame(rows, schema=["client", "ts", "event_type", "merchant", "amount", "description"], orient="row")
    frame.write_csv(tmp_path / "events.csv")
    return tmp_path / "events.csv"


def vocabs(tmp_path, **overrides) -> dict[str, list[str]]:
    cfg = generic_config(events_csv(tmp_path), None, tmp_path / "cache", val_fraction=0.0, **overrides)
    return prepare(cfg).vocabs


def test_field_cap_overrides_data_top_k_for_that_field_only(tmp_path):
    got = vocabs(tmp_path, top_k=1, field_top_k={"merchant": 3})
    assert got["merchant"] == ["m0", "m1", "m2"]
    assert got["event_type"] == ["buy"]  # still data.top_k


def test_null_uncaps_the_field(tmp_path):
    assert vocabs(tmp_path, top_k=2, field_top_k={"merchant": None})["merchant"] == list(COUNTS)


def test_field_cap_overrides_the_schema_cap():
    cfg = DataConfig(top_k=1000, field_top_k={"url": 20000})
    assert vocab_cap(FieldSpec("url", top_k=5000), cfg) == 20000
    assert vocab_cap(FieldSpec("sku", top_k=5000), cfg) == 1000  # no entry: min(schema, data.top_k) as before


@pytest.mark.parametrize("caps, match", [({"merchnat": 3}, "merchnat.*categorical fields are"), ({"amount": 3}, "amount"), ({"merchant": 0}, ">= 1")])
def test_bad_field_caps_are_errors(tmp_path, caps, match):
    with pytest.raises(DataError, match=match):
        vocabs(tmp_path, field_top_k=caps)


def test_cache_key_covers_field_caps(tmp_path):
    path = events_csv(tmp_path)
    keys = {cache_key(DataConfig(field_top_k=caps), 0, [path]) for caps in ({}, {"url": 10}, {"url": None})}
    assert len(keys) == 3


def test_recsys_preset_uncaps_category():
    assert compose(["experiment=next_product_recsys2025"]).data.field_top_k == {"category": None}


def test_next_url_paper_url_vocabulary_exceeds_its_negatives():
    """Otherwise its sampled softmax would never run (a 5,000-id url vocabulary, 10,000 negatives)."""
    cfg = compose(["experiment=next_url_paper_recsys2025"])
    data = OmegaConf.to_object(cfg.data)
    assert data.field_top_k["category"] is None  # the experiment adds to the preset's caps
    assert vocab_cap(FieldSpec("url", top_k=5000), data) > cfg.model.sampled_negatives
