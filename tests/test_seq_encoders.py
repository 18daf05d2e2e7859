"""UQABench's encoders and shared layers: causal over positions, the Mamba scan equal to a naive loop, the item input's switches."""

from __future__ import annotations

import pytest
import torch

from lit_modules.next_item_rec_config import ENCODERS
from lit_modules.seq_encoders import ItemInput, build_encoder, pool
from lit_modules.seq_layers import apply_rope, rope_angles, selective_scan, selective_scan_loop

D, T = 16, 9


def tiny_encoder(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_encoder(name, D, layers=2, heads=2, dropout=0.1, max_len=T, state=4, conv=3, expand=2).eval()


@pytest.mark.parametrize("name", ENCODERS)
def test_changing_a_later_event_never_changes_an_earlier_position(name):
    encoder = tiny_encoder(name)
    x = torch.randn(3, T, D)
    lengths = torch.tensor([T, 6, 4])
    later = x.clone()
    later[:, 5:] = torch.randn(3, T - 5, D)  # position 5 onwards changed
    with torch.no_grad():
        a, b = encoder(x, lengths), encoder(later, lengths)
    assert a.shape == (3, T, D)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
    assert not torch.allclose(a[:, 5:], b[:, 5:]), "the changed positions must change: the encoder reads its input"


@pytest.mark.parametrize("name", ENCODERS)
def test_pooled_vector_ignores_padding_and_batch_mates(name):
    encoder = tiny_encoder(name)
    x = torch.randn(2, 5, D)
    lengths = torch.tensor([5, 3])
    padded = torch.cat([x, torch.randn(2, 4, D)], dim=1)  # 4 more columns of garbage after every user
    alone = x[1:, :3]
    with torch.no_grad():
        for how in ("last", "mean"):
            want = pool(encoder(x, lengths), lengths, how)
            torch.testing.assert_close(pool(encoder(padded, lengths), lengths, how), want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(pool(encoder(alone, lengths[1:]), lengths[1:], how), want[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 7, 23])
def test_selective_scan_equals_the_naive_loop_values_and_gradients(steps):
    torch.manual_seed(steps)
    B, E, N = 2, 5, 3
    u = torch.randn(B, steps, E, dtype=torch.float64, requires_grad=True)
    delta = torch.nn.functional.softplus(torch.randn(B, steps, E, dtype=torch.float64)).requires_grad_()
    A = (-torch.rand(E, N, dtype=torch.float64) * 4).requires_grad_()
    Bm, C = torch.randn(B, steps, N, dtype=torch.float64), torch.randn(B, steps, N, dtype=torch.float64)
    D_ = torch.randn(E, dtype=torch.float64)
    y = selective_scan(u, delta, A, Bm, C, D_)
    want = selective_scan_loop(u, delta, A, Bm, C, D_)
    torch.testing.assert_close(y, want)
    grads = torch.autograd.grad(y.square().sum(), (u, delta, A))
    want_grads = torch.autograd.grad(want.square().sum(), (u, delta, A))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


def test_selective_scan_matches_a_hand_computed_recurrence():
    """One channel, one state: h_t = exp(d A) h_{t-1} + d B u_t, y_t = C h_t + D u_t, worked out by hand."""
    u = torch.tensor([[[1.0], [2.0]]])
    delta = torch.tensor([[[0.5], [1.0]]])
    A = torch.tensor([[-2.0]])
    Bm, C, D_ = torch.tensor([[[1.0], [3.0]]]), torch.tensor([[[2.0], [1.0]]]), torch.tensor([0.5])
    h1 = 0.5 * 1.0 * 1.0
    h2 = torch.exp(torch.tensor(-2.0)) * h1 + 1.0 * 3.0 * 2.0
    want = torch.tensor([[[2.0 * h1 + 0.5], [float(h2) + 1.0]]])
    torch.testing.assert_close(selective_scan(u, delta, A, Bm, C, D_), want)


def test_rope_scores_depend_on_the_distance_only():
    torch.manual_seed(0)
    cos, sin = rope_angles(12, 8, torch.device("cpu"))
    q, k = torch.randn(8), torch.randn(8)
    at = lambda x, t: apply_rope(x.view(1, 1, 1, 8).expand(1, 1, 12, 8), cos, sin)[0, 0, t]  # noqa: E731
    assert torch.dot(at(q, 5), at(k, 2)) == pytest.approx(float(torch.dot(at(q, 9), at(k, 6))), rel=1e-5)
    assert torch.dot(at(q, 5), at(k, 2)) != pytest.approx(float(torch.dot(at(q, 5), at(k, 4))), rel=1e-3)


@pytest.mark.parametrize("inputs, reads_side, reads_text", [("full", True, True), ("no_text", True, False), ("no_side", False, True)])
def test_item_input_switches_drop_their_part(inputs, reads_side, reads_text):
    torch.manual_seed(0)
    module = ItemInput(n_items=9, side_sizes=[7, 7], text_vocab=10, text_len=3, width=D, id_dim=4, side_dim=3, text_dim=5, inputs=inputs)
    side = torch.randint(5, 6, (9, 2))
    text = torch.tensor([[1, 2, 0]] * 9)
    module.set_tables(side, text)
    items = torch.tensor([[5, 6, 0]])
    before = module(items)
    module.set_tables(side + 1, text)
    assert (not torch.allclose(module(items), before)) == reads_side
    module.set_tables(side, torch.tensor([[3, 4, 5]] * 9))
    assert (not torch.allclose(module(items), before)) == reads_text


def test_item_input_text_bag_is_the_mean_of_its_tokens_without_padding():
    module = ItemInput(n_items=6, side_sizes=[], text_vocab=4, text_len=3, width=2, id_dim=1, side_dim=1, text_dim=2)
    module.set_tables(torch.zeros(6, 0, dtype=torch.long), torch.tensor([[0, 0, 0]] * 5 + [[1, 3, 0]]))
    bag = module.text(module.text_ids[torch.tensor([5])])
    torch.testing.assert_close(bag, (module.text.weight[1] + module.text.weight[3])[None] / 2)
