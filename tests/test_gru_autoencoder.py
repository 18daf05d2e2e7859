"""GRUAutoencoder on a tiny real store: padding never matters, the loss learns, checkpoints load,
markers and the decoder input are what the paper describes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from datamodules.schema import EOS, FIRST_ID, PAD, SOS
from datamodules.sequences import Collator, SequenceStore
from lit_modules.gru_autoencoder import GRUAutoencoder
from tests.helpers import loader, quiet_trainer, with_pad_columns

N_USERS = 40
VOCAB = {"event": FIRST_ID + 4, "item": FIRST_ID + 8, "unused": FIRST_ID + 3}
FIELDS = ["event", "item"]
SMALL = dict(emb_dim=8, hidden=16, layers=2, dropout=0.0)


def make_store(seed: int = 0) -> SequenceStore:
    """Users of length 1..30; events cycle through 4 types from a random start and each
    type owns two items, so a sequence is fully predictable from its start and length."""
    rng = np.random.default_rng(seed)
    lengths = np.arange(N_USERS) % 30 + 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    events = np.concatenate([(rng.integers(4) + np.arange(n)) % 4 for n in lengths])
    n = int(offsets[-1])
    price = rng.normal(size=n).astype(np.float32)
    price[rng.random(n) < 0.2] = np.nan
    return SequenceStore(
        user_ids=np.arange(N_USERS),
        offsets=offsets,
        tokens={
            "event": (FIRST_ID + events).astype(np.int32),
            "item": (FIRST_ID + 2 * events + rng.integers(2, size=n)).astype(np.int32),
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


def make_model(**kw) -> GRUAutoencoder:
    torch.manual_seed(0)
    return GRUAutoencoder(vocab_sizes=VOCAB, fields=FIELDS, **{**SMALL, **kw})


def total_loss(model: GRUAutoencoder, batch: dict) -> torch.Tensor:
    return torch.stack(list(model.losses(batch).values())).sum()


@pytest.mark.parametrize("markers", [True, False])
@pytest.mark.parametrize("combine", ["sum", "concat"])
@torch.no_grad()
def test_embed_ignores_padding_and_batch_mates(collate: Collator, markers: bool, combine: str) -> None:
    model = make_model(markers=markers, combine=combine).eval()
    rows = [3, 0, 29, 12]  # lengths 4, 1, 30, 13
    batch = collate(rows)
    z = model.embed(batch)
    assert z.shape == (4, 16) and z.dtype == torch.float32
    torch.testing.assert_close(model.embed(with_pad_columns(batch)), z, atol=1e-5, rtol=1e-5)
    for i, row in enumerate(rows):
        torch.testing.assert_close(model.embed(collate([row]))[0], z[i], atol=1e-5, rtol=1e-5)
    # Users of different lengths must not collapse onto one vector.
    assert (z[1] - z[2]).abs().max() > 1e-3


@torch.no_grad()
def test_embed_ignores_unused_fields(collate: Collator) -> None:
    model = make_model().eval()
    batch = collate([5, 17])
    shuffled = {**batch, "tokens": {**batch["tokens"], "unused": batch["tokens"]["unused"].flip(0)}}
    torch.testing.assert_close(model.embed(shuffled), model.embed(batch))


@pytest.mark.parametrize("decoder_input, markers", [("add", True), ("concat", False)])
@torch.no_grad()
def test_loss_ignores_padding(collate: Collator, decoder_input: str, markers: bool) -> None:
    model = make_model(decoder_input=decoder_input, markers=markers).eval()
    batch = collate([7, 0, 22, 29])
    ref = model.losses(batch)
    padded = model.losses(with_pad_columns(batch))
    assert ref.keys() == padded.keys() == set(FIELDS)
    for f in FIELDS:
        torch.testing.assert_close(padded[f], ref[f], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_initial_loss_is_uniform_guess(collate: Collator) -> None:
    model = make_model().eval()
    expected = sum(math.log(VOCAB[f]) for f in FIELDS)  # log 9 + log 13 = 4.762
    loss = total_loss(model, collate(list(range(N_USERS)))).item()
    assert loss == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("decoder_input", ["add", "concat"])
def test_loss_falls_with_training(store: SequenceStore, collate: Collator, decoder_input: str) -> None:
    model = make_model(lr=1e-2, decoder_input=decoder_input)
    full = collate(list(range(N_USERS)))
    with torch.no_grad():
        before = total_loss(model, full).item()
    fit = quiet_trainer(max_epochs=25)
    fit.fit(model, loader(store, shuffle=True))
    assert {"train/loss_epoch", "train/loss_event", "train/loss_item"} <= fit.callback_metrics.keys()
    model.eval()
    with torch.no_grad():
        after = total_loss(model, full).item()
    assert after < 0.5 * before, (before, after)


@torch.no_grad()
def test_encoder_reads_each_field_between_markers(collate: Collator) -> None:
    """SOS, the user's own events, EOS right after their last event, then pads; the vector is the state at EOS."""
    model = make_model().eval()
    rows = [3, 0, 29, 12]
    batch = with_pad_columns(collate(rows))
    tokens, lengths = model._trimmed_view(batch)
    ids, enc_lengths = model._encoder_input(tokens, lengths)
    assert enc_lengths.tolist() == [n + 2 for n in lengths.tolist()] and ids[0].shape[1] == int(lengths.max()) + 2
    for f, wrapped in zip(FIELDS, ids):
        for i, n in enumerate(lengths.tolist()):
            assert wrapped[i, 0] == SOS and wrapped[i, n + 1] == EOS, (f, i)
            assert wrapped[i, 1 : n + 1].tolist() == batch["tokens"][f][i, :n].tolist()
            assert (wrapped[i, n + 2 :] == PAD).all()
    plain = make_model(markers=False).eval()  # same weights: markers add no parameters
    assert plain._encoder_input(tokens, lengths)[1].tolist() == lengths.tolist()
    out, _ = model.encoder(model._events(ids))
    at_eos = out[torch.arange(len(rows)), enc_lengths - 1]
    torch.testing.assert_close(model.embed(batch), at_eos, atol=1e-6, rtol=1e-6)
    assert (model.embed(batch) - plain.embed(batch)).abs().max() > 1e-3


@torch.no_grad()
def test_markers_wrap_the_codes_sequence() -> None:
    codes = torch.tensor([[[7, 8], [9, 10]], [[11, 12], [0, 0]]])
    batch = {"index": torch.arange(2), "lengths": torch.tensor([2, 1]), "tokens": {}, "values": {}, "codes": {"name": codes}}
    model = GRUAutoencoder({"name": 20}, ["name"], emb_dim=8, hidden=16, layers=1, codes_events=2).eval()
    ids, lengths = model._encoder_input(*model._view(batch))
    assert lengths.tolist() == [6, 4]
    assert ids[0].tolist() == [[SOS, 7, 8, 9, 10, EOS], [SOS, 11, 12, EOS, PAD, PAD]]


@torch.no_grad()
def test_decoder_input_add_and_concat(collate: Collator) -> None:
    """add: event vector + the user vector, projected when hidden != event size; concat: the two side by side."""
    batch = collate([1, 2, 3])
    add, concat = make_model(decoder_input="add").eval(), make_model(decoder_input="concat").eval()
    assert add.decoder.input_size == SMALL["emb_dim"] and isinstance(add.user_proj, torch.nn.Linear)
    assert concat.decoder.input_size == SMALL["emb_dim"] + SMALL["hidden"] and isinstance(concat.user_proj, torch.nn.Identity)
    events, z = torch.randn(3, 5, SMALL["emb_dim"]), torch.randn(3, SMALL["hidden"])
    torch.testing.assert_close(add._decoder_input(events, z), events + add.user_proj(z)[:, None])
    torch.testing.assert_close(concat._decoder_input(events, z)[:, 4, SMALL["emb_dim"] :], z)
    la, lc = total_loss(add, batch), total_loss(concat, batch)
    assert torch.isfinite(la) and torch.isfinite(lc) and abs(la - lc) > 1e-4
    same = make_model(decoder_input="add", emb_dim=SMALL["hidden"])  # sizes match: the vector is added as is
    assert isinstance(same.user_proj, torch.nn.Identity)
    torch.testing.assert_close(same._decoder_input(torch.zeros(3, 5, SMALL["hidden"]), z), z[:, None].expand(3, 5, -1))


def test_concat_combine_dims(collate: Collator) -> None:
    """Concatenated field embeddings: emb_dim x fields wide, each field's slice its own lookup."""
    model = make_model(combine="concat").eval()
    width = len(FIELDS) * SMALL["emb_dim"]
    assert model.encoder.input_size == model.decoder.input_size == width == SMALL["hidden"]
    assert isinstance(model.user_proj, torch.nn.Identity)  # 2 x 8 = hidden 16, as the paper's 2 x 64 = 128
    batch = collate([1, 2, 3])
    tokens = [batch["tokens"][f] for f in FIELDS]
    with torch.no_grad():
        events = model._events(tokens)
        assert events.shape == (*tokens[0].shape, width)
        for k, (emb, t) in enumerate(zip(model.embeddings, tokens)):
            torch.testing.assert_close(events[..., k * SMALL["emb_dim"] : (k + 1) * SMALL["emb_dim"]], emb(t))
        assert model.embed(batch).shape == (3, SMALL["hidden"])
        assert torch.isfinite(total_loss(model, batch))
    wide = make_model(combine="concat", decoder_input="concat")
    assert wide.decoder.input_size == width + SMALL["hidden"]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(combine="mean"), "combine"),
        (dict(decoder_input="mul"), "decoder_input"),
        (dict(fields=[]), "at least one"),
        (dict(fields=["event", "nope"]), "nope"),
        (dict(fields=["event", "event"]), "duplicates"),
        (dict(vocab_sizes={"event": 4}, fields=["event"]), "reserved"),
    ],
)
def test_bad_args_raise(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GRUAutoencoder(**{"vocab_sizes": VOCAB, "fields": FIELDS, **kw})


def test_checkpoint_round_trip(store: SequenceStore, collate: Collator, tmp_path) -> None:
    model = make_model(combine="concat", decoder_input="concat", markers=False, dropout=0.1)
    fit = quiet_trainer(max_epochs=1)
    fit.fit(model, loader(store, shuffle=False), loader(store, shuffle=False))
    assert "val/loss" in fit.callback_metrics
    path = tmp_path / "gru_ae.ckpt"
    fit.save_checkpoint(path)
    loaded = GRUAutoencoder.load_from_checkpoint(path, weights_only=True).eval()
    assert loaded.hparams.combine == loaded.hparams.decoder_input == "concat" and not loaded.hparams.markers
    assert loaded.fields == FIELDS
    batch = collate([0, 9, 29])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(batch), model.embed(batch))


def test_codes_tail_takes_last_events_with_codes():
    from datamodules.schema import MISSING
    from lit_modules.gru_autoencoder import codes_tail

    L = 2
    codes = torch.zeros(3, 5, L, dtype=torch.long)
    # user 0: 4 events, codes on events 0, 1, 3 (event 2 has none) -> last 2 are events 1 and 3
    codes[0, :4] = torch.tensor([[10, 11], [12, 13], [MISSING, MISSING], [14, 15]])
    # user 1: one event without codes -> a single MISSING token
    codes[1, 0] = torch.tensor([MISSING, MISSING])
    # user 2: 5 events with codes, pad-free
    codes[2] = torch.arange(20, 30).reshape(5, L)
    tokens, lengths = codes_tail(codes, torch.tensor([4, 1, 5]), k=2)
    assert lengths.tolist() == [4, 1, 4]
    assert tokens[0].tolist() == [12, 13, 14, 15]
    assert tokens[1].tolist() == [MISSING, 0, 0, 0]
    assert tokens[2].tolist() == [26, 27, 28, 29]


def test_codes_field_model_trains_and_is_pad_invariant():
    torch.manual_seed(0)
    B, T, L = 6, 7, 3
    codes = torch.randint(5, 20, (B, T, L))
    lengths = torch.tensor([1, 2, 3, 5, 7, 7])
    codes[torch.arange(T)[None, :] >= lengths[:, None]] = 0
    batch = {"index": torch.arange(B), "lengths": lengths, "tokens": {}, "values": {}, "codes": {"name": codes}}
    model = GRUAutoencoder({"name": 20}, ["name"], emb_dim=8, hidden=16, layers=1, codes_events=2).eval()
    padded = dict(batch, codes={"name": torch.nn.functional.pad(codes, (0, 0, 0, 4))})
    assert torch.allclose(model.embed(batch), model.embed(padded), atol=1e-5)
    assert torch.isfinite(torch.stack(list(model.losses(batch).values()))).all()


@pytest.mark.parametrize("combine, decoder_input, markers", [("sum", "add", True), ("concat", "add", True), ("sum", "concat", False)])
def test_trimmed_path_equals_packed_path(collate: Collator, combine: str, decoder_input: str, markers: bool) -> None:
    """The CPU default (trimmed padding, state read at the last real step) computes what the packed GRUs compute:
    losses, gradients and vectors, on a batch with extra pad columns so the trim has something to cut."""
    batch = with_pad_columns(collate([7, 0, 22, 29, 3]))
    results = {}
    for path in ("packed", "trimmed"):
        model = make_model(combine=combine, decoder_input=decoder_input, markers=markers)  # same seed, same weights; dropout 0 so train mode is deterministic
        model.gru_path = path
        losses = model.losses(batch)
        torch.stack(list(losses.values())).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            results[path] = (losses, grads, model.eval().embed(batch))
    (lp, gp, zp), (lt, gt, zt) = results["packed"], results["trimmed"]
    for f in FIELDS:
        torch.testing.assert_close(lt[f], lp[f], atol=1e-6, rtol=1e-6)
    assert gp.keys() == gt.keys()
    for name in gp:
        torch.testing.assert_close(gt[name], gp[name], atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(zt, zp, atol=1e-6, rtol=1e-6)
    assert (zp[0] - zp[1]).abs().max() > 1e-3


def test_summed_embeddings_equal_per_field_lookups(collate: Collator) -> None:
    """The one-bag sum equals the per-field nn.Embedding sum, and pad rows still get no gradient."""
    model = make_model()
    batch = with_pad_columns(collate([7, 0, 22]))
    tokens = [batch["tokens"][f] for f in FIELDS]
    assert any((t == 0).any() for t in tokens)
    bag = model._events(tokens)
    plain = sum(emb(t) for emb, t in zip(model.embeddings, tokens))
    torch.testing.assert_close(bag, plain, atol=1e-6, rtol=1e-6)
    weights = torch.randn_like(bag)
    (bag * weights).sum().backward()
    bag_grads = [emb.weight.grad.clone() for emb in model.embeddings]
    model.zero_grad()
    (plain * weights).sum().backward()
    for got, want in zip(bag_grads, (emb.weight.grad for emb in model.embeddings)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got[0].abs().max() == 0


def test_unknown_gru_path_raises(collate: Collator) -> None:
    model = make_model()
    model.gru_path = "cudnn"
    with pytest.raises(ValueError, match="gru_path"):
        model.embed(collate([1]))
