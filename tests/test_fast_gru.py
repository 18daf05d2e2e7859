"""fast_gru.last_states equals nn.GRU (eval mode) at each user's last real step, and GRU-AE's embed through it
equals its nn.GRU paths on a trained module, with weights loaded from model.safetensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lit_modules.gru_autoencoder as gru_ae
from lit_modules.fast_gru import last_states
from tests.helpers import loader, quiet_trainer, with_pad_columns
from tests.test_gru_autoencoder import make_model, make_store


def reference(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """nn.GRU over the padded batch (batch_first x [B, T, I]), last layer's output at step lengths - 1."""
    out, _ = gru(x)
    return out[torch.arange(len(lengths)), lengths - 1]


@pytest.mark.parametrize("layers, dropout", [(1, 0.0), (2, 0.3), (3, 0.5)])
@pytest.mark.parametrize("lengths", [[1], [9], [12, 12, 7, 5, 3, 2, 1, 1], [4, 1]])
@torch.no_grad()
def test_last_states_equal_nn_gru(layers: int, dropout: float, lengths: list[int]) -> None:
    torch.manual_seed(layers)
    gru = nn.GRU(6, 10, num_layers=layers, dropout=dropout, batch_first=True).eval()
    for p in gru.parameters():  # wider than the default init, so gates saturate on some steps
        p.mul_(3)
    n = torch.tensor(lengths)
    x = torch.randn(len(lengths), max(lengths) + 3, 6) * 2  # three pad steps after the longest user
    want = reference(gru, x, n)
    got = last_states(gru, x.transpose(0, 1), n)
    assert got.shape == want.shape == (len(lengths), 10)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@torch.no_grad()
def test_pad_steps_are_never_read() -> None:
    gru = nn.GRU(4, 8, num_layers=2).eval()
    n = torch.tensor([6, 3, 1])
    x = torch.randn(6, 3, 4)
    poisoned = x.clone()
    poisoned[3:, 1] = float("nan")
    poisoned[1:, 2] = float("inf")
    torch.testing.assert_close(last_states(gru, poisoned, n), last_states(gru, x, n))
    assert torch.isfinite(last_states(gru, poisoned, n)).all()


def test_refuses_what_it_cannot_compute() -> None:
    gru = nn.GRU(4, 8)
    x, n = torch.randn(5, 2, 4), torch.tensor([5, 2])
    with pytest.raises(RuntimeError, match="no backward"):
        last_states(gru, x, n)
    with torch.no_grad():
        with pytest.raises(ValueError, match="longest first"):
            last_states(gru, x, torch.tensor([2, 5]))
        with pytest.raises(ValueError, match="lengths"):
            last_states(gru, x, torch.tensor([6, 2]))
        with pytest.raises(ValueError, match="unidirectional"):
            last_states(nn.GRU(4, 8, bidirectional=True), x, n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[gru_ae.GRUAutoencoder, dict, gru_ae.GRUAutoencoder]:
    """A two-layer GRU-AE (dropout 0.2) trained a few epochs on the tiny store, reloaded from model.safetensors into
    a fresh module; a batch of unsorted lengths with extra pad columns; the trained module itself."""
    from safetensors.torch import load_model, save_model

    store = make_store()
    model = make_model(layers=2, dropout=0.2, lr=1e-2)
    quiet_trainer(max_epochs=3).fit(model, loader(store, shuffle=True))
    path = tmp_path_factory.mktemp("run") / "model.safetensors"
    save_model(model, str(path))
    loaded = make_model(layers=2, dropout=0.2)  # the untrained weights until loaded
    load_model(loaded, str(path))
    model.eval()
    from datamodules.sequences import Collator

    batch = with_pad_columns(Collator(store)([7, 0, 22, 29, 3, 12, 1]))  # lengths 8, 1, 23, 30, 4, 13, 2; unsorted
    return loaded.eval(), batch, model


def embed_with(model: gru_ae.GRUAutoencoder, batch: dict, path: str) -> torch.Tensor:
    model.gru_path = path
    try:
        with torch.inference_mode():
            return model.embed(batch)
    finally:
        model.gru_path = "auto"


def test_embed_through_fast_path_equals_nn_gru_paths(trained, monkeypatch) -> None:
    model, batch, original = trained
    calls = []
    monkeypatch.setattr(gru_ae, "last_states", lambda *a: calls.append(1) or last_states(*a))
    fast = embed_with(model, batch, "auto")
    assert calls, "embed did not take the fast path"
    for path in ("trimmed", "packed"):
        calls.clear()
        want = embed_with(model, batch, path)
        assert not calls
        assert fast.shape == want.shape == (7, 16) and fast.dtype == want.dtype == torch.float32
        torch.testing.assert_close(fast, want, atol=1e-5, rtol=0)
    assert (fast[1] - fast[3]).abs().max() > 1e-3
    torch.testing.assert_close(fast, embed_with(original, batch, "trimmed"), atol=1e-5, rtol=0)  # the loaded weights drive it
    assert (fast - embed_with(make_model(layers=2, dropout=0.2).eval(), batch, "auto")).abs().max() > 1e-3
    for i in (0, 1, 3):  # batch of one, length 1 among them
        one = {**batch, "index": batch["index"][i : i + 1], "lengths": batch["lengths"][i : i + 1], "tokens": {f: t[i : i + 1] for f, t in batch["tokens"].items()}}
        torch.testing.assert_close(embed_with(model, one, "auto")[0], fast[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(markers=False), dict(combine="concat", layers=1)])
def test_other_encoder_inputs(kw: dict) -> None:
    from datamodules.sequences import Collator

    model = make_model(**kw).eval()
    batch = Collator(make_store())([3, 0, 29, 12])
    torch.testing.assert_close(embed_with(model, batch, "auto"), embed_with(model, batch, "trimmed"), atol=1e-5, rtol=0)


def test_parameters_are_read_not_copied(trained) -> None:
    """Changed weights change the fast path's vectors exactly as they change nn.GRU's (no stale copy)."""
    model, batch, _ = trained
    before = embed_with(model, batch, "auto")
    saved = model.encoder.weight_hh_l1.detach().clone()
    try:
        with torch.no_grad():
            model.encoder.weight_hh_l1.add_(0.5)
        after = embed_with(model, batch, "auto")
        assert (after - before).abs().max() > 1e-3
        torch.testing.assert_close(after, embed_with(model, batch, "trimmed"), atol=1e-5, rtol=0)
    finally:
        with torch.no_grad():
            model.encoder.weight_hh_l1.copy_(saved)


def test_training_and_dropout_keep_nn_gru(trained, monkeypatch) -> None:
    """Gradients and active dropout need nn.GRU: the fast path must stay out of their way."""
    model, batch, _ = trained
    monkeypatch.setattr(gru_ae, "last_states", lambda *a: pytest.fail("fast path taken"))
    model.train()
    try:
        assert torch.isfinite(torch.stack(list(model.losses(batch).values())).sum())
        with torch.no_grad():
            model.embed(batch)  # train mode, dropout 0.2 between the layers
    finally:
        model.eval()
