"""NextItemRec: item tables from the data, next-item targets, Recall/NDCG by hand, pooled vectors free of padding, bad config."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from datamodules.item_features import side_table, text_table, words
from datamodules.store import SequenceStore
from lit_modules.next_item_rec import NextItemRec, next_item_pairs, recall_ndcg
from lit_modules.next_item_rec_config import ENCODERS, NextItemRecConfig
from tests.helpers import with_pad_columns


def hand_data() -> SimpleNamespace:
    """Two training users and one val user; items 5..8, a genre per event, a title per event."""
    items = [[5, 6], [6, 7, 5], [8]]
    genres = [[9, 10], [11, 12, 13], [14]]  # item 6's genre differs between its events: the first training event's counts
    titles = [["Star Wars (1977)", "Alien"], ["Alien", "Heat", "Star Wars (1977)"], ["Zulu"]]
    offsets = np.cumsum([0, *map(len, items)])
    flat = lambda xs: np.array([x for row in xs for x in row], dtype=np.int32)  # noqa: E731
    store = SequenceStore(
        user_ids=np.array(["a", "b", "c"]), offsets=offsets, tokens={"item": flat(items), "genre": flat(genres)}, values={},
        times=np.zeros(offsets[-1], np.int64), vocab_sizes={"item": 9, "genre": 15},
    )  # fmt: skip
    users = pl.DataFrame({"user_id": ["a", "b", "c"], "txt_title": titles})
    return SimpleNamespace(store=store, users=users, is_val=np.array([False, False, True]), schema=SimpleNamespace(event_type=None))


def test_item_tables_come_from_each_items_first_training_event():
    data = hand_data()
    side = side_table(data, "item", ["genre"])
    assert side[:, 0].tolist() == [0, 0, 0, 0, 0, 9, 10, 12, 0]  # item 8 only a val user has: no side id
    # words of the training items: 1977, alien, heat, star, wars (once each); ids by (count desc, word); text_vocab=4 drops 'wars'
    text = text_table(data, "item", "title", text_vocab=4, text_len=2)
    assert text[5].tolist() == [4, 1] and text[6].tolist() == [2, 0] and text[7].tolist() == [3, 0]
    assert text[8].tolist() == [0, 0] and not text[:5].any()
    assert words("Star Wars (1977)") == ["star", "wars", "1977"]


def test_config_data_args_and_bad_fields_name_the_key():
    data = hand_data()
    args = NextItemRecConfig(side_fields=["genre"], text_len=2).data_args(data)
    assert args["n_items"] == 9 and args["side_sizes"] == [15] and args["text_table"].shape == (9, 2)
    with pytest.raises(ValueError, match="model.side_fields"):
        NextItemRecConfig(side_fields=["year"]).data_args(data)
    with pytest.raises(ValueError, match="model.text_field"):
        NextItemRecConfig(side_fields=["genre"], text_field="plot").data_args(data)
    assert NextItemRecConfig(side_fields=["genre"], text_field=None).data_args(data)["text_table"].shape == (9, 0)


@pytest.mark.parametrize(
    "bad, key",
    [(dict(encoder="bert"), "model.encoder"), (dict(item_inputs="text_only"), "model.item_inputs"), (dict(pooling="max"), "model.pooling"),
     (dict(objective="contrastive", sampled_negatives=10), "model.sampled_negatives"), (dict(hidden=30, heads=4), "model.hidden"),
     (dict(top_k=[]), "model.top_k"), (dict(temperature=0.0), "model.temperature")],
)  # fmt: skip
def test_bad_config_is_one_error_naming_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        NextItemRecConfig(**bad)


def test_recall_and_ndcg_against_hand_computed_values():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.8, 0.1], [0.1, 0.2, 0.3, 0.4]])
    target = torch.tensor([2, 2, 0])  # ranks 1 (one item above), 0 (a tie counts in the target's favour), 3
    got = recall_ndcg(scores, target, [1, 2])
    assert got["recall@1"].tolist() == [0.0, 1.0, 0.0]
    assert got["recall@2"].tolist() == [1.0, 1.0, 0.0]
    assert got["ndcg@1"].tolist() == [0.0, 1.0, 0.0]
    assert got["ndcg@2"].tolist() == pytest.approx([1 / np.log2(3), 1.0, 0.0])


def test_next_item_targets_skip_padding_and_reserved_ids():
    items = torch.tensor([[5, 6, 2, 7, 0], [8, 9, 0, 0, 0]])
    lengths = torch.tensor([4, 1])
    h = torch.arange(10.0).view(2, 5, 1)
    out, target = next_item_pairs(items, lengths, h)
    assert target.tolist() == [6, 7]  # 2 (rare) is no target; the 1-event user has none
    assert out.squeeze(1).tolist() == [0.0, 2.0]


def tiny_module(encoder: str, **options) -> NextItemRec:
    torch.manual_seed(0)
    n = 12
    side = np.stack([np.arange(n) % 3 + 5, np.arange(n) % 4 + 5], axis=1)
    text = np.stack([np.arange(n) % 5 + 1, np.zeros(n, dtype=int)], axis=1)
    sizes = dict(hidden=8, layers=1, heads=2, id_dim=4, side_dim=2, text_dim=3, text_vocab=6, text_len=2, max_len=6, state_size=3)
    return NextItemRec(n_items=n, side_sizes=[8, 9], side_table=side, text_table=text, encoder=encoder, **{**sizes, **options}).eval()


def batch_of(rows: list[list[int]]) -> dict:
    width = max(map(len, rows))
    items = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return {"index": torch.arange(len(rows)), "lengths": torch.tensor([len(r) for r in rows]), "tokens": {"item": items}, "values": {}}


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embedding_is_independent_of_padding_batch_mates_and_events_before_the_window(encoder, pooling):
    module = tiny_module(encoder, pooling=pooling)
    rows = [[5, 6, 7], [8, 9, 10, 11, 5, 6, 7, 8, 9]]  # the second user is longer than max_len=6
    with torch.no_grad():
        both = module.embed(batch_of(rows))
        torch.testing.assert_close(module.embed(with_pad_columns(batch_of(rows))), both, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.embed(batch_of(rows[:1])), both[:1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.embed(batch_of([rows[1][-6:]])), both[1:], rtol=1e-5, atol=1e-6)
    assert both.shape == (2, 8) and both.dtype == torch.float32


def test_supervised_loss_is_the_softmax_over_the_tied_item_table():
    module = tiny_module("gru4rec")
    batch = batch_of([[5, 6, 7, 8], [9, 10]])
    with torch.no_grad():
        items, lengths, h = module.states(batch)
        table = module.item_input(torch.arange(12))
        logits = h[0, :3] @ table.T, h[1, :1] @ table.T
        logits = torch.cat(logits)[:, 5:]  # reserved ids never compete
        want = F.cross_entropy(logits, torch.tensor([6, 7, 8, 10]) - 5)
        assert float(module.losses(batch)["next_item"]) == pytest.approx(float(want), rel=1e-5)


def test_contrastive_loss_is_infonce_over_the_batch_with_repeated_items_not_negatives():
    module = tiny_module("trm", objective="contrastive", temperature=0.5)
    batch = batch_of([[5, 6, 7], [9, 6]])  # next items 6, 7, 6: the two 6s are not each other's negatives
    with torch.no_grad():
        _, _, h = module.states(batch)
        q = F.normalize(torch.stack([h[0, 0], h[0, 1], h[1, 0]]), dim=-1)
        p = F.normalize(module.item_input(torch.tensor([6, 7, 6])), dim=-1)
        logits = q @ p.T / 0.5
        logits[0, 2] = logits[2, 0] = float("-inf")
        want = F.cross_entropy(logits, torch.arange(3))
        assert float(module.losses(batch)["next_item"]) == pytest.approx(float(want), rel=1e-5)


def test_sampled_softmax_trains_and_heldout_metrics_skip_one_event_users():
    module = tiny_module("sasrec", sampled_negatives=4).train()
    batch = batch_of([[5, 6, 7, 8], [9]])
    loss = module.losses(batch, train=True)["next_item"]
    loss.backward()
    assert torch.isfinite(loss) and module.item_input.ids.weight.grad.abs().sum() > 0
    with torch.no_grad():
        metrics = module.eval().heldout_metrics(*module.states(batch))
    assert set(metrics) == {"recall@10", "ndcg@10", "recall@20", "ndcg@20"}
    assert len(metrics["recall@10"]) == 1  # the 1-event user has nothing held out
    assert float(metrics["recall@10"][0]) == 1.0  # 7 real items: the held-out one is always in the top 10
