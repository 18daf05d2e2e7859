"""NextEventGPT on a tiny real store: padding never matters, the loss learns, windows and
sampled softmax behave, checkpoints load, `event_types` filters what the model reads
(here and on the recsys2025 layout, as next_url trains)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import lightning.pytorch as L
import torch
import torch.nn.functional as F

import lit_modules.next_event_gpt as gpt_module
from datamodules.schema import FIRST_ID, MISSING, SOS
from datamodules.sequences import Collator, SequenceStore
from lit_modules.next_event_gpt import NextEventGPT, front, random_windows, sampled_softmax_loss, signed_log1p, take_windows
from lit_modules.next_event_gpt_config import NextEventGPTConfig
from tests.helpers import data_args_for, loader, quiet_trainer, with_pad_columns

N_USERS = 40
VOCAB = {"event": FIRST_ID + 4, "item": FIRST_ID + 8, "price": FIRST_ID + 4, "unused": FIRST_ID + 3}
ARGS = dict(
    vocab_sizes=VOCAB,
    fields=["event", "item", "price"],
    value_fields=["price"],
    predict_fields=["event", "item"],
    predict_values=["price"],
    event_type_field=None,
    event_type_ids=None,
)
SMALL = dict(hidden=16, layers=2, heads=2, dropout=0.0, max_len=48, slice_min=4, slice_max=16)
TOL = dict(atol=1e-5, rtol=1e-5)


def only_types(model_kw: dict, types: list[int]) -> dict:
    """`model_kw` plus a filter on event types `types` (0..3) of the tiny store's `event` field."""
    return {**model_kw, "event_types": [f"t{t}" for t in types], "event_type_field": "event", "event_type_ids": [FIRST_ID + t for t in types]}


def make_store(seed: int = 0) -> SequenceStore:
    """Users of length 1..40; events cycle through 4 types from a random start, each type owns
    two items, and the heavy-tailed price (about 5 * 4**type) is missing 20% of the time,
    with a MISSING price token there, like preprocessing makes it."""
    rng = np.random.default_rng(seed)
    lengths = np.arange(N_USERS) + 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    events = np.concatenate([(rng.integers(4) + np.arange(n)) % 4 for n in lengths])
    n = int(offsets[-1])
    price = (5.0 * 4.0**events * rng.lognormal(0.0, 0.1, size=n)).astype(np.float32)
    missing = rng.random(n) < 0.2
    price[missing] = np.nan
    return SequenceStore(
        user_ids=np.arange(N_USERS),
        offsets=offsets,
        tokens={
            "event": (FIRST_ID + events).astype(np.int32),
            "item": (FIRST_ID + 2 * events + rng.integers(2, size=n)).astype(np.int32),
            "price": np.where(missing, MISSING, FIRST_ID + events).astype(np.int32),
            "unused": rng.integers(FIRST_ID, FIRST_ID + 3, size=n).astype(np.int32),
        },
        values={"price": price},
        times=np.arange(n, dtype=np.int64),
        vocab_sizes=VOCAB,
    )


@pytest.fixture(scope="module")
def store() -> SequenceStore:
    return make_store()


@pytest.fixture(scope="module")
def collate(store: SequenceStore) -> Collator:
    return Collator(store)


def make_model(**kw) -> NextEventGPT:
    torch.manual_seed(0)
    return NextEventGPT(**{**ARGS, **SMALL, **kw})


def total_loss(model: NextEventGPT, batch: dict, train: bool = False) -> torch.Tensor:
    return torch.stack(list(model.losses(batch, train=train).values())).sum()


@torch.no_grad()
def test_embed_ignores_padding_and_batch_mates(collate: Collator) -> None:
    model = make_model().eval()
    rows = [3, 0, 39, 12]  # lengths 4, 1, 40, 13
    batch = collate(rows)
    z = model.embed(batch)
    assert z.shape == (4, 16) and z.dtype == torch.float32
    torch.testing.assert_close(model.embed(with_pad_columns(batch)), z, **TOL)
    for i, row in enumerate(rows):
        torch.testing.assert_close(model.embed(collate([row]))[0], z[i], **TOL)
    torch.testing.assert_close(model.predict_step(batch), z)
    # The vector is the last real event's state: users of different lengths differ.
    assert (z[1] - z[2]).abs().max() > 1e-3


@torch.no_grad()
def test_long_histories_use_their_last_max_len_events(collate: Collator) -> None:
    model = make_model(max_len=16).eval()
    batch = collate([39, 5])  # lengths 40 and 6
    tail = {
        **batch,
        "lengths": torch.tensor([16, 6]),
        "tokens": {f: torch.stack([t[0, 24:40], F.pad(t[1, :6], (0, 10))]) for f, t in batch["tokens"].items()},
        "values": {f: torch.stack([v[0, 24:40], F.pad(v[1, :6], (0, 10))]) for f, v in batch["values"].items()},
    }
    torch.testing.assert_close(model.embed(batch), model.embed(tail), **TOL)
    torch.testing.assert_close(total_loss(model, batch), total_loss(model, tail), **TOL)


@torch.no_grad()
def test_loss_ignores_padding(collate: Collator) -> None:
    model = make_model().eval()
    batch = collate([7, 0, 22, 39])
    ref = model.losses(batch)
    padded = model.losses(with_pad_columns(batch))
    assert ref.keys() == padded.keys() == {"event", "item", "price_mae"}
    for part in ref:
        torch.testing.assert_close(padded[part], ref[part], **TOL)


@torch.no_grad()
def test_initial_loss_is_uniform_guess(store: SequenceStore, collate: Collator) -> None:
    model = make_model().eval()
    parts = model.losses(collate(list(range(N_USERS))))
    assert parts["event"].item() == pytest.approx(math.log(VOCAB["event"]), rel=0.02)
    assert parts["item"].item() == pytest.approx(math.log(VOCAB["item"]), rel=0.02)
    # The value head starts near 0, so its MAE is the mean |signed_log1p| of the real next prices.
    starts = store.offsets[:-1]
    is_target = np.ones(store.n_events, dtype=bool)
    is_target[starts] = False  # a user's first event is nobody's next event
    price = store.values["price"][is_target & np.isfinite(store.values["price"])]
    expected = float(signed_log1p(torch.from_numpy(price)).abs().mean())
    assert parts["price_mae"].item() == pytest.approx(expected, abs=0.1)


def test_loss_falls_with_training(store: SequenceStore, collate: Collator) -> None:
    model = make_model(lr=1e-2)
    full = collate(list(range(N_USERS)))
    with torch.no_grad():
        before = total_loss(model.eval(), full).item()
    model.train()
    fit = quiet_trainer(max_epochs=10)
    fit.fit(model, loader(store, shuffle=True))
    logged = {"train/loss_epoch", "train/loss_event", "train/loss_item", "train/loss_price_mae"}
    assert logged <= fit.callback_metrics.keys()
    with torch.no_grad():
        parts = model.eval().losses(full)
    after = torch.stack(list(parts.values())).sum().item()
    assert after < 0.6 * before, (before, after)
    # The cycle is learned from the history, not just the event marginal (log 4 = 1.39).
    assert parts["event"].item() < 0.3, parts


def test_random_windows_fit_and_vary_with_seed() -> None:
    lengths = torch.arange(1, 101)
    starts, size = random_windows(lengths, 5, 9, torch.Generator().manual_seed(0))
    assert (size <= 9).all() and (size <= lengths).all() and (size >= lengths.clamp(max=5)).all()
    assert (starts >= 0).all() and (starts + size <= lengths).all()
    assert set(size[lengths >= 9].tolist()) == set(range(5, 10))  # every window length occurs
    assert (starts[lengths > 20] > 0).any()  # windows are not all at the start
    again = random_windows(lengths, 5, 9, torch.Generator().manual_seed(0))
    other = random_windows(lengths, 5, 9, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], starts) and torch.equal(again[1], size)
    assert not (torch.equal(other[0], starts) and torch.equal(other[1], size))

    x = torch.arange(3 * 10).reshape(3, 10)
    out = take_windows(x, torch.tensor([2, 0, 5]), torch.tensor([3, 1, 5]))
    assert out.tolist() == [[2, 3, 4, 0, 0], [10, 0, 0, 0, 0], [25, 26, 27, 28, 29]]


@torch.no_grad()
def test_training_path_reads_random_windows(collate: Collator) -> None:
    model = make_model().eval()  # eval: dropout off, only the windows are random
    batch = collate([39, 30, 25, 20])
    torch.manual_seed(0)
    a = total_loss(model, batch, train=True)
    torch.manual_seed(0)
    assert torch.equal(total_loss(model, batch, train=True), a)
    torch.manual_seed(1)
    assert not torch.equal(total_loss(model, batch, train=True), a)
    assert not torch.equal(total_loss(model, batch), a)  # validation reads whole histories


def test_users_without_a_next_event_give_zero_not_nan(collate: Collator) -> None:
    model = make_model(sampled_negatives=10)
    batch = collate([0, 0])  # one event each: nothing to predict
    for train in (False, True):
        loss = total_loss(model, batch, train=train)
        assert loss.item() == 0.0
    loss.backward()


def test_sampled_softmax_equals_full_softmax_with_all_negatives() -> None:
    torch.manual_seed(0)
    V, H = 11, 6
    h, weight, bias = torch.randn(20, H), torch.randn(V, H), torch.randn(V)
    target = torch.randint(1, V, (20,))
    full = F.cross_entropy(h @ weight.T + bias, target)
    torch.testing.assert_close(sampled_softmax_loss(h, weight, bias, target, torch.arange(V)), full)


def test_sampled_softmax_touches_only_sampled_and_true_rows() -> None:
    torch.manual_seed(0)
    V, H = 50, 6
    h = torch.randn(8, H)
    weight, bias = torch.randn(V, H, requires_grad=True), torch.randn(V, requires_grad=True)
    target = torch.tensor([7, 7, 9, 12, 9, 7, 30, 12])
    negatives = torch.tensor([3, 9, 41])  # 9 is an accidental hit for two rows
    loss = sampled_softmax_loss(h, weight, bias, target, negatives)
    loss.backward()
    assert torch.isfinite(loss)
    touched = set(torch.nonzero(weight.grad.abs().sum(1)).flatten().tolist())
    assert touched == {3, 7, 9, 12, 30, 41}
    assert set(torch.nonzero(bias.grad).flatten().tolist()) == touched


def test_model_uses_sampled_softmax_only_in_training(collate: Collator, monkeypatch, caplog) -> None:
    calls = []

    def spy(h, weight, bias, target, negatives):
        calls.append((weight.shape[0], len(negatives)))
        return sampled_softmax_loss(h, weight, bias, target, negatives)

    monkeypatch.setattr(gpt_module, "sampled_softmax_loss", spy)
    with caplog.at_level("WARNING", logger=gpt_module.__name__):
        model = make_model(sampled_negatives=10)  # event (9 ids) fits: full softmax; item (13 ids): sampled
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["event"]  # the full-softmax field is named
    batch = collate([39, 30, 12])
    parts = model.losses(batch, train=True)
    assert calls == [(VOCAB["item"], 10)]
    assert all(torch.isfinite(v) for v in parts.values())
    total_loss(model, batch, train=True).backward()  # the sampled loss trains
    assert model.heads[1].weight.grad is not None
    model.losses(batch, train=False)
    assert len(calls) == 2  # one more from the training call above, none from validation


def test_checkpoint_round_trip(store: SequenceStore, collate: Collator, tmp_path) -> None:
    model = make_model(dropout=0.1, warmup_steps=2, schedule="cosine", sampled_negatives=10)
    fit = quiet_trainer(max_epochs=1)
    fit.fit(model, loader(store, shuffle=False), loader(store, shuffle=False))
    assert "val/loss" in fit.callback_metrics
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine decayed to 0 at the end
    path = tmp_path / "gpt.ckpt"
    fit.save_checkpoint(path)
    loaded = NextEventGPT.load_from_checkpoint(path, weights_only=True).eval()
    assert loaded.hparams.sampled_negatives == 10 and loaded.predict_values == ["price"]
    batch = collate([0, 9, 39])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(batch), model.embed(batch))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(hidden=15, heads=2), r"hidden \(15\) must be divisible"),
        (dict(fields=["event", "nope"]), "nope"),
        (dict(predict_fields=["nope"]), "nope"),
        (dict(fields=[], value_fields=[]), "input"),
        (dict(predict_fields=[], predict_values=[]), "nothing to predict"),
        (dict(fields=["event", "event"]), "duplicates"),
        (dict(vocab_sizes={**VOCAB, "event": 4}), "reserved"),
        (dict(slice_min=20, slice_max=10), "slice_min"),
        (dict(slice_min=1), "slice_min"),
        (dict(slice_max=64, max_len=48), "max_len"),
        (dict(sampled_negatives=0), "sampled_negatives"),
        (dict(schedule="linear"), "schedule"),
        (dict(event_types=["t1"]), "do not match"),
        (dict(event_type_field="event", event_type_ids=[FIRST_ID]), "do not match"),
        (dict(event_types=[], event_type_field="event", event_type_ids=[]), "event_types"),
        (dict(event_types=["t1"], event_type_ids=[FIRST_ID]), "event_type_field"),
    ],
)
def test_bad_args_raise(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NextEventGPT(**{**ARGS, **SMALL, **kw})


# ---------------------------------------------------------------- event_types


def store_of_types(store: SequenceStore, types: list[int]) -> tuple[SequenceStore, np.ndarray]:
    """The store's events of these types only, users without any left out; and the rows kept."""
    keep = np.isin(store.tokens["event"], [FIRST_ID + t for t in types])
    counts = np.add.reduceat(keep, store.offsets[:-1])
    rows = np.flatnonzero(counts)
    offsets = np.concatenate([[0], np.cumsum(counts[rows])]).astype(np.int64)
    sub = SequenceStore(
        user_ids=store.user_ids[rows], offsets=offsets, tokens={f: t[keep] for f, t in store.tokens.items()},
        values={f: v[keep] for f, v in store.values.items()}, times=store.times[keep], vocab_sizes=VOCAB,
    )  # fmt: skip
    return sub, rows


def test_front_moves_kept_entries_first_in_order() -> None:
    x = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    keep = torch.tensor([[False, True, False, True], [False, False, False, False], [True, False, False, False]])
    assert front(x, keep).tolist() == [[2, 4], [0, 0], [9, 0]]


@torch.no_grad()
def test_event_types_read_exactly_the_events_of_those_types(store: SequenceStore, collate: Collator) -> None:
    """Filtered inside the model = an unfiltered model (same weights) on a store holding only those events."""
    sub, rows = store_of_types(store, [1, 3])
    filtered = make_model(**only_types({}, [1, 3]), max_len=16).eval()
    plain = make_model(max_len=16).eval()
    picks = [0, 1, len(rows) - 1, 7]  # short users and the longest (cut to max_len after filtering)
    full, part = collate(rows[picks].tolist()), Collator(sub)(picks)
    torch.testing.assert_close(filtered.embed(full), plain.embed(part), **TOL)
    for name, value in filtered.losses(full).items():
        torch.testing.assert_close(value, plain.losses(part)[name], **TOL)
    torch.manual_seed(3)
    a = total_loss(filtered, full, train=True)
    torch.manual_seed(3)
    torch.testing.assert_close(a, total_loss(plain, part, train=True), **TOL)  # training windows too


@torch.no_grad()
def test_user_without_those_events_gets_the_sos_state(store: SequenceStore, collate: Collator) -> None:
    """A one-event sequence of SOS tokens: the same vector for every such user, whatever the batch, and no loss."""
    lone = [r for r in range(N_USERS) if store.lengths[r] == 1][0]
    absent = [t for t in range(4) if store.tokens["event"][store.offsets[lone]] != FIRST_ID + t]
    model = make_model(**only_types({}, absent[:1])).eval()
    z = model.embed(collate([lone, 39, 12]))
    assert torch.isfinite(z).all()
    torch.testing.assert_close(model.embed(collate([lone]))[0], z[0], **TOL)
    sos = {"lengths": torch.tensor([1]), "tokens": {f: torch.full((1, 1), SOS) for f in store.tokens}, "values": {"price": torch.zeros(1, 1)}}
    torch.testing.assert_close(make_model().eval().embed(sos)[0], z[0], **TOL)
    assert (z[0] - z[1]).abs().max() > 1e-3
    assert total_loss(model, collate([lone, lone])).item() == 0.0


def test_bad_event_types_name_the_known_values(recsys_prepared) -> None:
    with pytest.raises(ValueError, match=r"\['page_vist'\] not event types of this data; known: .*'page_visit'"):
        NextEventGPTConfig(event_types=["page_visit", "page_vist"]).data_args(recsys_prepared)


@pytest.fixture(scope="module")
def recsys_prepared(recsys_dir, tmp_path_factory):
    from datamodules.config import DataConfig
    from datamodules.preprocess import prepare
    from experiments.config import compose, to_dataclass

    cfg = compose(["experiment=next_url_recsys2025", *data_args_for("recsys2025", None, None, recsys_dir, tmp_path_factory.mktemp("gpt"))])
    return prepare(to_dataclass(cfg.data, DataConfig), cfg.seed)


def test_next_url_trains_and_validates_on_page_visits_only(recsys_prepared) -> None:
    """What the preset's model reads in a training and a validation step: per user, a window (or the tail)
    of their page visits' urls, in order; never a purchase's missing url."""
    from omegaconf import OmegaConf

    from experiments.build import build_module
    from experiments.config import compose

    config = OmegaConf.to_object(compose(["experiment=next_url_recsys2025", "model.hidden=16", "model.layers=1", "model.heads=2"]).model)
    assert config.event_types == ["page_visit"]
    model = build_module(config, recsys_prepared)
    store = recsys_prepared.store
    page_visit = FIRST_ID + recsys_prepared.vocabs["event_type"].index("page_visit")
    read, original = [], model._view
    model._view = lambda batch, train: read.append((train, batch["index"], original(batch, train))) or read[-1][2]
    rows = np.arange(len(store))
    fit = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    fit.fit(model, loader(store, shuffle=True), torch.utils.data.DataLoader(rows, batch_size=32, collate_fn=Collator(store)))
    assert {train for train, *_ in read} == {True, False}
    for train, index, (tokens, _, lengths) in read:
        for i, row in enumerate(index.tolist()):
            events = slice(store.offsets[row], store.offsets[row + 1])
            urls = store.tokens["url"][events][store.tokens["event_type"][events] == page_visit].tolist()
            got = tokens["url"][i, : lengths[i]].tolist()
            assert MISSING not in got and urls, row
            assert is_window(got, urls) if train else got == urls[-config.max_len :], row


def is_window(part: list, whole: list) -> bool:
    return any(whole[s : s + len(part)] == part for s in range(len(whole) - len(part) + 1))
