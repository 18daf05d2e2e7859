"""InstructUE's losses on a batch small enough to compute by hand.

Three users in 2-D, cosines read off the vectors:
    u0 = (1, 0)  a0 = (1, 0)      positive cos 1
    u1 = (0, 1)  a1 = (1, 1)/r2   positive cos r = 0.7071
    u2 = (1, 1)  a2 = (0, 1)      positive cos r
With margin 0.1 the thresholds are 1.1, r + 0.1, r + 0.1. Only two negatives exceed theirs, both
user->answer: s(u1, a2) = 1 and s(u2, a1) = 1. Every other negative cosine is 0 or r.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lit_modules.instruct_ue_loss import IGNORE, answer_lm_loss, kept_negatives, masked_info_nce, similarities

R = math.sqrt(0.5)
U = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
A = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])

# the kept negatives' cosines of each user, by kind, written out from the table above
KEPT = {
    "user_answer": [[R, 0.0], [0.0], [R]],  # u1->a2 and u2->a1 (cos 1) masked
    "user_user": [[0.0, R], [0.0, R], [R, R]],
    "answer_answer": [[R, 0.0], [R, R], [0.0, R]],
}
POSITIVE = [1.0, R, R]


def by_hand(tau: float, kinds: tuple[str, ...] = tuple(KEPT)) -> float:
    losses = []
    for i, pos in enumerate(POSITIVE):
        terms = [pos] + [s for k in kinds for s in KEPT[k][i]]
        losses.append(math.log(sum(math.exp(t / tau) for t in terms)) - pos / tau)
    return sum(losses) / len(losses)


def test_the_mask_removes_exactly_the_negatives_above_the_margin():
    masks = kept_negatives(*similarities(U, A), margin=0.1)
    expected_ua = np.array([[0, 1, 1], [1, 0, 0], [1, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(masks["user_answer"].numpy(), expected_ua)
    off = ~np.eye(3, dtype=bool)
    np.testing.assert_array_equal(masks["user_user"].numpy(), off)
    np.testing.assert_array_equal(masks["answer_answer"].numpy(), off)
    # a wider margin (1 <= r + 0.3) keeps them all; a negative margin drops the equal-to-positive ones too
    assert (kept_negatives(*similarities(U, A), margin=0.3)["user_answer"].numpy() == off).all()
    assert not kept_negatives(*similarities(U, A), margin=-0.01)["answer_answer"].numpy()[1, 0]  # cos r > r - 0.01


@pytest.mark.parametrize("tau", [1.0, 0.5, 0.07])
def test_loss_matches_the_hand_computation(tau):
    got = masked_info_nce(U, A, temperature=tau, margin=0.1).item()
    assert got == pytest.approx(by_hand(tau), rel=1e-5)


def test_the_masked_negatives_are_left_out_of_the_denominator():
    unmasked = masked_info_nce(U, A, temperature=0.5, margin=0.5).item()  # nothing masked at margin 0.5
    with_masked = {**KEPT, "user_answer": [[R, 0.0], [0.0, 1.0], [R, 1.0]]}
    losses = []
    for i, pos in enumerate(POSITIVE):
        terms = [pos] + [s for k in with_masked for s in with_masked[k][i]]
        losses.append(math.log(sum(math.exp(t / 0.5) for t in terms)) - pos / 0.5)
    assert unmasked == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert unmasked > masked_info_nce(U, A, temperature=0.5, margin=0.1).item()


@pytest.mark.parametrize("off", ["user_answer", "user_user", "answer_answer"])
def test_switching_off_each_negative_kind(off):
    kinds = tuple(k for k in KEPT if k != off)
    got = masked_info_nce(U, A, temperature=0.5, margin=0.1, **{off: False}).item()
    assert got == pytest.approx(by_hand(0.5, kinds), rel=1e-5)
    assert got != pytest.approx(by_hand(0.5), rel=1e-3)


def test_no_negatives_no_loss():
    assert masked_info_nce(U, A, user_answer=False, user_user=False, answer_answer=False).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_info_nce(U[:1], A[:1]).item() == pytest.approx(0.0, abs=1e-6)


def test_gradients_reach_the_user_side_the_answer_side_and_the_adapters():
    torch.manual_seed(0)
    user_adapter, answer_adapter = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x_user = torch.randn(5, 4, requires_grad=True)
    x_answer = torch.randn(5, 4, requires_grad=True)
    loss = masked_info_nce(user_adapter(x_user), answer_adapter(x_answer), margin=10.0)  # nothing masked
    loss.backward()
    for grad in (x_user.grad, x_answer.grad, user_adapter.weight.grad, answer_adapter.weight.grad):
        assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()


def test_the_threshold_sends_no_gradient():
    """Only the answer-answer terms involve a; with the others off, a's gradient comes from the positive and a-a terms
    alone. Moving the threshold (margin) without changing which negatives stay must not change any gradient."""
    grads = []
    for margin in (0.35, 0.4):  # both keep every negative (max cosine 1 <= r + 0.35)
        u, a = U.clone().requires_grad_(True), A.clone().requires_grad_(True)
        masked_info_nce(u, a, temperature=0.5, margin=margin).backward()
        grads.append((u.grad, a.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def reference(u: np.ndarray, a: np.ndarray, tau: float, margin: float) -> float:
    """float64 numpy, loops: the loss written as the formula reads."""
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    out = []
    for i in range(len(u)):
        pos = u[i] @ a[i]
        terms = [pos]
        for j in range(len(u)):
            if j != i:
                terms += [s for s in (u[i] @ a[j], u[i] @ u[j], a[i] @ a[j]) if s <= pos + margin]
        z = np.array(terms) / tau
        out.append(np.log(np.exp(z - z.max()).sum()) + z.max() - pos / tau)
    return float(np.mean(out))


def test_stable_at_tau_001_on_fp16_scale_inputs():
    rng = np.random.default_rng(0)
    u = torch.tensor(rng.normal(0, 2e4, (8, 16)), dtype=torch.float16)  # squares overflow fp16: normalising must not
    a = (0.3 * u.float() + torch.tensor(rng.normal(0, 2e4, (8, 16)))).clamp(-6e4, 6e4).half()
    got = masked_info_nce(u, a, temperature=0.01, margin=0.1)
    expected = reference(u.double().numpy(), a.double().numpy(), 0.01, 0.1)
    assert torch.isfinite(got) and expected > 1.0  # logits up to 100: exp() alone would overflow float32
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_lm_loss_reads_the_answer_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), IGNORE)
    labels[0, 3:] = torch.tensor([2, 4])  # predicted from positions 2 and 3
    labels[1, 4] = 6  # predicted from position 3
    logp = torch.log_softmax(logits, -1)
    expected = -(logp[0, 2, 2] + logp[0, 3, 4] + logp[1, 3, 6]) / 3
    torch.testing.assert_close(answer_lm_loss(logits, labels), expected)
    changed = logits.clone()
    changed[:, 0] += 5.0  # a prompt position that predicts no answer token
    torch.testing.assert_close(answer_lm_loss(changed, labels), expected)
    assert answer_lm_loss(logits, torch.full((2, 5), IGNORE)).item() == 0.0
