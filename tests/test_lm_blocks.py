"""The "Encode Me" LM blocks: every named event read (windows), the search block's searches only, any backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from datamodules.config import DataConfig
from datamodules.datamodule import EventDataModule
from datamodules.schema import FIRST_ID, RARE
from datamodules.text import Renderer
from datamodules.text_batches import TextBatchBuilder, UserTextDataset, count_tokens, fit_budget, fit_windows
from experiments.build import build_datamodule
from experiments.config import compose, to_dataclass
from lit_modules.llm4es import LMFeatureExtractor
from lit_modules.llm4es_config import LMFeaturesConfig
from lit_modules.lm import MINILM, load_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MINILM)


def text_data(experiment: str, recsys_dir, cache, model_dir, *extra: str):
    """An LM preset's TextDataModule on the generated challenge layout (its own data and text keys)."""
    cfg = compose([f"experiment={experiment}", f"data.path={recsys_dir}", f"data.cache_dir={cache}", f"model.model_path={model_dir}", *extra])
    events = EventDataModule(to_dataclass(cfg.data, DataConfig), seed=cfg.seed)
    return build_datamodule(OmegaConf.to_object(cfg.model), events, train=False)


@pytest.fixture(scope="module")
def all_events(recsys_dir, tmp_path_factory, tiny_minilm_dir):
    return text_data("lm_all_recsys2025", recsys_dir, tmp_path_factory.mktemp("cache"), tiny_minilm_dir, "model.max_tokens=128")


@pytest.fixture(scope="module")
def tiny_reader(tiny_minilm_dir):
    return LMFeatureExtractor(model_path=str(tiny_minilm_dir))


def dataset(dm, rows, **changes) -> UserTextDataset:
    settings = {**dm.settings, **changes}
    return UserTextDataset(dm.data, rows, dm.tokenizer, formats=(dm.embed_format,), **settings)


def embed_rows(reader: LMFeatureExtractor, dm, rows, **changes) -> torch.Tensor:
    ds = dataset(dm, rows, **changes)
    return reader.embed(TextBatchBuilder(dm.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))]))


def test_windows_hold_every_event_in_order_within_the_budget(all_events, tokenizer):
    rendered = Renderer(all_events.data).render(0, "plain", None, False, drop_unknown=True)
    for budget in (60, 128, 300, 10_000):
        windows = fit_windows(rendered, tokenizer, budget)
        assert "\n".join(t for t, _ in windows) == rendered.text()  # consecutive, nothing lost or repeated
        assert sum(n for _, n in windows) == len(rendered)
        assert all(count_tokens(tokenizer, t) <= budget for t, _ in windows)
        assert windows[-1][0] == fit_budget(rendered.text, len(rendered), tokenizer, budget)  # the newest window is the one-window text
    assert len(fit_windows(rendered, tokenizer, 10_000)) == 1
    with pytest.raises(ValueError, match="max_tokens=10: the header and one event"):
        fit_windows(rendered, tokenizer, 10)


def test_a_user_longer_than_one_window_is_read_completely(all_events, tiny_reader, monkeypatch):
    """Changing the oldest of the last 64 events changes the vector; one window would never have seen it."""
    store = all_events.data.store
    row = int(np.argmax(store.lengths))
    item = dataset(all_events, [row])[0]
    assert len(item["windows"]) > 1 and item["events"] == min(int(store.lengths[row]), 64)
    oldest = int(store.offsets[row + 1]) - item["events"]
    before, before_one = embed_rows(tiny_reader, all_events, [row]), embed_rows(tiny_reader, all_events, [row], windows=False)
    tokens = store.tokens["event_type"].copy()  # the cached arrays are read-only
    tokens[oldest] = FIRST_ID + (int(tokens[oldest]) - FIRST_ID + 1) % len(all_events.data.vocabs["event_type"])
    monkeypatch.setitem(store.tokens, "event_type", tokens)
    after, after_one = embed_rows(tiny_reader, all_events, [row]), embed_rows(tiny_reader, all_events, [row], windows=False)
    assert not torch.allclose(before, after, atol=1e-6)
    assert torch.equal(before_one, after_one)  # the old single window never reached that event


def test_vector_is_the_token_weighted_mean_over_windows_with_a_decoder_backbone(all_events, tiny_causal_lm_dir):
    """A Llama (the paper's SmolLM2 architecture) reads the windows; pooling weighs each window by its real tokens."""
    reader = LMFeatureExtractor(model_path=str(tiny_causal_lm_dir))
    store = all_events.data.store
    rows = [int(r) for r in np.argsort(-store.lengths)[:3]]
    ds = dataset(all_events, rows)
    items = [ds[i] for i in range(len(ds))]
    pooled = reader.embed(TextBatchBuilder(all_events.tokenizer.pad_token_id)(items))
    assert pooled.shape == (3, 16) and torch.isfinite(pooled).all()
    for u, item in enumerate(items):  # each window embedded alone, then averaged by token counts
        alone = reader.embed(TextBatchBuilder(0)([{"index": i, "input_ids": w} for i, w in enumerate(item["windows"])]))
        weights = torch.tensor([len(w) for w in item["windows"]], dtype=torch.float32)
        assert torch.allclose(pooled[u], (alone * weights[:, None]).sum(0) / weights.sum(), atol=1e-5)
    assert reader.embed_stats()["lm/windows_per_user"] > 1


def test_search_block_reads_only_searches_from_the_whole_history(recsys_dir, tmp_path, tiny_minilm_dir):
    dm = text_data("lm_search_recsys2025", recsys_dir, tmp_path / "cache", tiny_minilm_dir, "model.max_tokens=128")
    data = dm.data
    names = np.array(["", "", "", "", "", *data.vocabs["event_type"]], dtype=object)
    assert set(names[data.store.tokens["event_type"]]) == {"search_query"}
    ds = dataset(dm, range(len(data.store)))
    for i in range(len(ds)):
        parts = ds.window_texts(i)
        rows = [line for text, _ in parts for line in text.splitlines()[2:]]
        assert all(t.splitlines()[0] == "| timestamp | query |" for t, _ in parts)  # every window keeps the table header
        assert len(rows) == min(int(data.store.lengths[i]), 90)
        assert all(len(r.strip("| ").split(" | ")[1].split()) == 16 for r in rows)  # time, then the query's 16 codes


def test_codes_render_compactly_and_unknown_values_drop(all_events):
    renderer = Renderer(all_events.data, fields=["event_type", "query", "sku"])
    assert renderer.columns == ["event type", "timestamp", "sku", "query"]
    codes = np.full(16, FIRST_ID + 7)
    codes[3] = RARE
    assert renderer.codes_text(codes) == "7 7 7 other " + " ".join(["7"] * 12)
    lines = renderer.render(0, "plain", None, False, drop_unknown=True).events
    assert lines and not any("unknown" in line for line in lines)
    assert all(line.startswith("event type: ") for line in lines)


def test_positions_and_config_checks(tiny_reader):
    with pytest.raises(ValueError, match="model.max_tokens: a text of 600 tokens is longer than the model's 512 positions"):
        tiny_reader.embed(TextBatchBuilder(0)([{"index": 0, "input_ids": [5] * 600}]))
    with pytest.raises(ValueError, match="model.drop_unknown needs model.embed_format plain"):
        LMFeaturesConfig(embed_format="markdown", drop_unknown=True)
    with pytest.raises(ValueError, match="model.embed_format json"):
        LMFeaturesConfig(embed_format="json")
    with pytest.raises(ValueError, match="model.embed_format"):
        LMFeaturesConfig(embed_format="csv")


def test_unknown_fields_are_named(all_events):
    with pytest.raises(ValueError, match=r"fields \['qurey'\]: \['qurey'\] not event fields"):
        Renderer(all_events.data, fields=["qurey"])


def test_the_run_records_what_the_lm_read(recsys_dir, tmp_path, tiny_minilm_dir):
    """metrics.json says how many searches per client the block read and in how many windows: every one of them."""
    from experiments.run import run

    args = ["experiment=lm_search_recsys2025", f"data.path={recsys_dir}", f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}",
            f"model.model_path={tiny_minilm_dir}", "model.max_tokens=128", "logger.wandb=false", "run_name=t"]  # fmt: skip
    cfg = compose(args)
    result = run(cfg)
    lengths = EventDataModule(to_dataclass(cfg.data, DataConfig), seed=cfg.seed).data.store.lengths
    assert result.metrics["lm/events_per_user"] == pytest.approx(np.minimum(lengths, 90).mean())
    assert result.metrics["lm/windows_per_user"] > 1
