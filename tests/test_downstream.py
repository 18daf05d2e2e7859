"""The challenge downstream protocol: metrics pinned on hand-computed examples, the fixed MLP, and its training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from evaluation import downstream
from evaluation.challenge_metrics import challenge_score, diversity, multilabel_auroc, novelty, popularity_of
from evaluation.downstream import DownstreamMLP, train_downstream


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP spin-waiting when the other core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def logit(q: float) -> float:
    return float(np.log(q / (1 - q)))


# ---------------------------------------------------------------- diversity


def test_diversity_uniform_is_one():
    # Equal logits -> equal sigmoids -> p = 1/K for every target -> H = log2(K) -> H / log2(K) = 1.
    assert diversity(np.zeros((3, 5))) == pytest.approx(1.0, abs=1e-12)
    assert diversity(np.full((2, 100), 3.7)) == pytest.approx(1.0, abs=1e-12)


def test_diversity_one_hot_is_about_zero():
    # sigmoid(20) ~ 1, sigmoid(-20) ~ 2.06e-9: p ~ (1, 2e-9, 2e-9, 2e-9),
    # H ~ 3 * 2.06e-9 * log2(1 / 2.06e-9) ~ 1.8e-7 bits, / log2(4) ~ 9e-8.
    scores = np.full((2, 4), -20.0)
    scores[0, 0] = scores[1, 2] = 20.0
    assert 0.0 < diversity(scores) < 1e-6


def test_diversity_hand_example_normalises_by_log2_k():
    # User 1: logits (ln 1/3, ln 1/3, 0) -> sigmoids (0.25, 0.25, 0.5), sum 1 -> p = (1/4, 1/4, 1/2),
    #   H = 1/4*2 + 1/4*2 + 1/2*1 = 1.5 bits, / log2(3) = 0.946395...
    # User 2: uniform -> 1.  Mean: (1.5 / log2(3) + 1) / 2.
    scores = np.array([[np.log(1 / 3), np.log(1 / 3), 0.0], [0.0, 0.0, 0.0]])
    assert diversity(scores) == pytest.approx((1.5 / np.log2(3) + 1.0) / 2, abs=1e-12)


# ---------------------------------------------------------------- novelty


def test_novelty_hand_example_k2():
    # K=3, k=2, popularity (0.6, 0.2, 0.2): the 2 largest sum to 0.8 -> normalised (0.75, 0.25, 0.25).
    # User A sigmoids (0.02, 0.01, 0.005): top-2 = targets 0, 1 -> 0.02*0.75 + 0.01*0.25 = 0.0175.
    # User B sigmoids (0.005, 0.01, 0.02): top-2 = targets 2, 1 -> 0.02*0.25 + 0.01*0.25 = 0.0075.
    # Mean 0.0125 -> novelty = (1 - 0.0125)^100 = 0.9875^100 = 0.28427...
    scores = np.array([[logit(0.02), logit(0.01), logit(0.005)], [logit(0.005), logit(0.01), logit(0.02)]])
    popularity = np.array([0.6, 0.2, 0.2])
    expected = 0.9875**100
    assert novelty(scores, popularity, k=2) == pytest.approx(expected, rel=1e-9)
    # Only relative popularity matters (fractions or counts give the same number) ...
    assert novelty(scores, popularity * 1234, k=2) == pytest.approx(expected, rel=1e-9)
    # ... and the power comes after the mean over users: per-user powers would give 0.32...
    assert abs(expected - (0.9825**100 + 0.9925**100) / 2) > 0.03


def test_novelty_extremes():
    confident = np.full((4, 5), 20.0)  # every sigmoid ~ 1
    # Nothing is popular -> 1.
    assert novelty(confident, np.zeros(5)) == 1.0
    # Everything equally popular and predicted with confidence ~1: normalised popularity 1/k each,
    # P_u = k * (1/k) * sigmoid(20) ~ 1 -> (1 - P)^100 ~ 0 (k=10 is capped at K=5).
    assert novelty(confident, np.ones(5)) == pytest.approx(0.0, abs=1e-12)
    # k=1, popularity (1, 0, 0): confidently predicting the popular target -> 0, an unpopular one -> 1.
    assert novelty(np.array([[20.0, -20.0, 0.0]]), np.array([1.0, 0.0, 0.0]), k=1) == pytest.approx(0.0, abs=1e-12)
    assert novelty(np.array([[-20.0, 20.0, 0.0]]), np.array([1.0, 0.0, 0.0]), k=1) == 1.0


def test_metric_input_checks():
    with pytest.raises(ValueError, match="one entry per target"):
        novelty(np.zeros((2, 3)), np.ones(4))
    with pytest.raises(ValueError, match="non-finite"):
        diversity(np.array([[0.0, np.nan]]))


def test_challenge_score_weights():
    assert challenge_score(1.0, 0.0, 0.0) == pytest.approx(0.8)
    assert challenge_score(0.0, 1.0, 0.0) == pytest.approx(0.1)
    assert challenge_score(0.0, 0.0, 1.0) == pytest.approx(0.1)
    assert challenge_score(0.7, 0.2, 0.9) == pytest.approx(0.56 + 0.02 + 0.09)


# ---------------------------------------------------------------- multi-label AUROC, popularity


@pytest.mark.parametrize("seed", range(3))
def test_multilabel_auroc_is_mean_of_sklearn_per_column(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (200, 6))
    y[:, 1] = 0  # single-class columns: skipped
    y[:, 4] = 1
    scores = np.round(rng.normal(size=(200, 6)) + 0.7 * y, 1)  # ties
    want = np.mean([roc_auc_score(y[:, k], scores[:, k]) for k in (0, 2, 3, 5)])
    assert multilabel_auroc(y, scores) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        multilabel_auroc(np.zeros((5, 2)), np.zeros((5, 2)))


def test_popularity_of():
    labels = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 0], [1, 1, 1]])
    # Rows 0, 1, 2: target 0 positive in 2 of 3, target 1 in 1 of 3, target 2 in 1 of 3 (row 3 not counted).
    np.testing.assert_allclose(popularity_of(labels, np.array([True, True, True, False])), [2 / 3, 1 / 3, 1 / 3])


# ---------------------------------------------------------------- the fixed MLP


def test_mlp_shape_and_blocks():
    model = DownstreamMLP(in_dim=12, n_outputs=7, width=16, blocks=4, expansion=2)
    assert model(torch.randn(5, 12)).shape == (5, 7)
    assert len(model.blocks) == 4
    assert all(b.expand.weight.shape == (32, 16) and b.project.weight.shape == (16, 32) for b in model.blocks)
    # Residual: a block whose output projection is zero is the identity.
    block = model.blocks[0]
    with torch.no_grad():
        block.project.weight.zero_()
        block.project.bias.zero_()
        x = torch.randn(3, 16)
        assert torch.equal(block(x), x)


# ---------------------------------------------------------------- training


def planted(n: int = 1000, d: int = 16, k: int = 6, seed: int = 0, signal: bool = True):
    """Multi-label targets that are linear in the embedding (signal) or independent of it; users 50/25/25 fit/val/test."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    logits = x @ rng.normal(size=(d, k)) if signal else rng.normal(size=(n, k))
    y = (logits + 0.3 * rng.normal(size=(n, k)) > 1.0).astype(np.int8)
    part = np.zeros(n, dtype=int)
    order = rng.permutation(n)
    part[order[n // 2 : 3 * n // 4]], part[order[3 * n // 4 :]] = 1, 2
    return x, y, part == 0, part == 1, part == 2


def test_learns_planted_multilabel_signal_and_not_noise():
    x, y, fit, val, test = planted()
    result = train_downstream(x, y, fit, val, test)
    assert set(result.test) == set(result.val) == {"auroc", "novelty", "diversity", "score"}
    assert result.test["auroc"] > 0.8 and result.val["auroc"] > 0.8
    assert result.test["score"] == pytest.approx(challenge_score(result.test["auroc"], result.test["novelty"], result.test["diversity"]))
    noise = train_downstream(*planted(signal=False))
    assert abs(noise.test["auroc"] - 0.5) < 0.07
    assert train_downstream(x, y, fit, val).test is None  # no TEST users asked for: none scored


def test_deterministic_for_a_seed():
    x, y, fit, val, test = planted(n=600)
    torch.manual_seed(123)
    a = train_downstream(x, y, fit, val, test, width=32, seed=3)
    torch.manual_seed(999)  # the caller's global RNG neither matters ...
    state = torch.get_rng_state()
    assert train_downstream(x, y, fit, val, test, width=32, seed=3) == a
    assert torch.equal(torch.get_rng_state(), state)  # ... nor is it touched
    assert train_downstream(x, y, fit, val, test, width=32, seed=4).test["auroc"] != a.test["auroc"]


@pytest.mark.parametrize("binary", [False, True])
def test_test_labels_are_never_used(binary):
    # Flipping the labels of the TEST users leaves the chosen epoch and its head unchanged: VAL metrics
    # are identical, each TEST column's AUROC becomes exactly 1 - AUROC, novelty/diversity stay.
    x, y, fit, val, test = planted(n=600)
    if binary:
        y = y[:, 0]
    flipped = y.copy()
    flipped[test] = 1 - flipped[test]
    a = train_downstream(x, y, fit, val, test, width=32, epochs=4)
    b = train_downstream(x, flipped, fit, val, test, width=32, epochs=4)
    assert (a.val, a.best_epoch) == (b.val, b.best_epoch)
    assert b.test["auroc"] == pytest.approx(1 - a.test["auroc"], abs=1e-12)
    assert {k: v for k, v in a.test.items() if k in ("novelty", "diversity")} == {
        k: v for k, v in b.test.items() if k in ("novelty", "diversity")
    }


def test_users_outside_the_masks_are_ignored():
    x, y, fit, val, test = planted(n=600)
    for mask in (fit, val, test):
        mask[:100] = False
    a = train_downstream(x, y, fit, val, test, width=32)
    x2, y2 = x.copy(), y.copy()
    x2[:100] = 1e6  # would wreck the standardisation if those rows counted
    y2[:100] = -1  # unlabelled
    assert train_downstream(x2, y2, fit, val, test, width=32) == a


def test_binary_mode():
    x, y, fit, val, test = planted()
    result = train_downstream(x, y[:, 0], fit, val, test)
    assert set(result.test) == {"auroc"}
    assert result.test["auroc"] > 0.8


def test_keeps_the_best_validation_epoch(monkeypatch):
    # Training does not depend on validation, so the epoch-1 head of a 3-epoch run is the head of a 1-epoch run.
    x, y, fit, val, test = planted(n=600)
    one_epoch = train_downstream(x, y, fit, val, test, width=32, epochs=1)

    def fake(values):
        it = iter(values)
        return lambda logits, y, popularity: next(it)

    monkeypatch.setattr(downstream, "_selection_score", fake([0.9, 0.1, 0.5]))
    first = train_downstream(x, y, fit, val, test, width=32, epochs=3)
    assert (first.test, first.val, first.best_epoch) == (one_epoch.test, one_epoch.val, 0)
    monkeypatch.setattr(downstream, "_selection_score", fake([0.1, 0.5, 0.9]))
    last = train_downstream(x, y, fit, val, test, width=32, epochs=3)
    assert last.test != one_epoch.test and last.best_epoch == 2  # the last epoch, a different head


def test_bad_inputs_raise():
    x, y, fit, val, test = planted(n=100)
    with pytest.raises(ValueError, match="more than one of"):
        train_downstream(x, y, fit, fit)
    with pytest.raises(ValueError, match="val: no users selected"):
        train_downstream(x, y, fit, np.zeros(len(x), dtype=bool))
    bad = y.copy()
    bad[np.flatnonzero(test)[0], 0] = 2
    with pytest.raises(ValueError, match="0 or 1"):
        train_downstream(x, bad, fit, val, test)
    with pytest.raises(ValueError, match="only used by multi-label"):
        train_downstream(x, y[:, 0], fit, val, popularity=np.ones(6))
