"""InstructUE's losses as pure torch functions: the answer-only next-token loss and the masked InfoNCE.

L = alpha_lm * L_lm + alpha_cl * L_cl (the module weighs and logs the parts).

L_cl for user i, with s = cosine similarity / tau:

    -log  exp(s(u_i, a_i)) / ( exp(s(u_i, a_i)) + sum_j!=i m_ij [exp(s(u_i, a_j)) + exp(s(u_i, u_j)) + exp(s(a_i, a_j))] )

Each of the three negative kinds (user->other answers, user->other users, answer->other answers)
can be switched off. A negative whose cosine exceeds cos(u_i, a_i) + margin is masked out
(m_ij = 0): such a "negative" is more likely another user's true match (the same user asked a
different question, two near-identical users) than a negative. The threshold is detached, so
the mask itself sends no gradient, and the positive is never masked. Everything runs in float32
through logsumexp with masked entries at -inf, so tau = 0.01 on fp16 inputs stays finite.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE = -100  # label of positions the next-token loss skips (same as datamodules.text_batches.IGNORE)
NEGATIVE_KINDS = ("user_answer", "user_user", "answer_answer")


def answer_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t's logits against labels[t+1] over labels != IGNORE (the answer tokens only).

    A batch without any answer token gives 0 (not NaN), so a zero-answer batch cannot poison the sum.
    """
    target = labels[:, 1:]
    valid = target != IGNORE
    if not valid.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1][valid].float(), target[valid])


def answer_lm_loss_at(states: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`answer_lm_loss` with the LM head applied only where the loss reads it: position t's final state [.., H] goes
    through `head` where labels[t+1] != IGNORE (the answer tokens), not at prompt and padding positions."""
    target = labels[:, 1:]
    valid = target != IGNORE
    if not valid.any():
        return states.sum() * 0.0
    rows, cols = valid.nonzero(as_tuple=True)
    return F.cross_entropy(head(states[rows, cols]).float(), target[rows, cols])


def similarities(users: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cosine of each positive pair [B] and, per negative kind, the [B, B] cosines row i compares against."""
    u = F.normalize(users.float(), dim=-1)
    a = F.normalize(answers.float(), dim=-1)
    ua = u @ a.T
    return ua.diagonal(), dict(zip(NEGATIVE_KINDS, (ua, u @ u.T, a @ a.T)))


def kept_negatives(positive: torch.Tensor, sims: dict[str, torch.Tensor], margin: float) -> dict[str, torch.Tensor]:
    """Per kind, bool [B, B]: the negatives that stay (off the diagonal, cosine <= the detached positive + margin)."""
    threshold = (positive + margin).detach()[:, None]
    off_diagonal = ~torch.eye(len(positive), dtype=torch.bool, device=positive.device)
    return {k: off_diagonal & (s <= threshold) for k, s in sims.items()}


def masked_info_nce(
    users: torch.Tensor,
    answers: torch.Tensor,
    temperature: float = 0.07,
    margin: float = 0.1,
    user_answer: bool = True,
    user_user: bool = True,
    answer_answer: bool = True,
) -> torch.Tensor:
    """Mean over users of the InfoNCE loss above; users[i] and answers[i] [B, D] are a positive pair.

    With every negative kind off (or one user) the loss is 0: the positive alone in its denominator.
    """
    positive, sims = similarities(users, answers)
    keep = kept_negatives(positive, sims, margin)
    on = dict(zip(NEGATIVE_KINDS, (user_answer, user_user, answer_answer)))
    columns = [positive[:, None] / temperature]
    columns += [(sims[k] / temperature).masked_fill(~keep[k], float("-inf")) for k in NEGATIVE_KINDS if on[k]]
    logits = torch.cat(columns, dim=1)
    return (torch.logsumexp(logits, dim=1) - positive / temperature).mean()


def prototype_loss(user_emb: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Instruction tuning's loss: cross-entropy of softmax_c(cos(u_i, p_c) / tau) against u_i's own class.

    p_c is the mean of the L2-normalised embeddings of class c in the batch (classes present only):
    each user is pulled towards its own class mean and pushed from the others'. A batch with one
    class gives 0. Float32 and logsumexp, so tau = 0.01 stays finite.
    """
    u = F.normalize(user_emb.float(), dim=-1)
    classes, own = torch.unique(labels, return_inverse=True)
    onehot = F.one_hot(own, len(classes)).to(u.dtype)  # [N, C]
    prototypes = F.normalize((onehot.T @ u) / onehot.sum(0)[:, None], dim=-1)
    return F.cross_entropy(u @ prototypes.T / temperature, own)
