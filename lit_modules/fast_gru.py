"""A GRU forward for inference that does little besides the matmuls: each user's last-layer state at its last real step.

`nn.GRU` on CPU reached about a third of the GEMM rate of its recurrent step here
(docs/benchmarks.md): per step it allocates and chains about ten elementwise kernels over
the gates, and it runs every user over the batch's full padded length. This path reads the
same parameters of the `nn.GRU` (no copies, so loaded weights drive it) and per layer:

- projects the inputs of CHUNK steps at once: one GEMM over [CHUNK * B, input], with the
  recurrent bias of the reset and update gates folded in (r and z see b_i + b_h);
- takes users sorted longest first (the caller sorts), so at step t only the first
  `active[t]` rows are still real: a finished user is never stepped over padding and its
  state stays put;
- per step runs one GEMM, accumulated in place into that step's projected inputs (whose
  new-gate columns hold b_hn, so they become W_hn h + b_hn), then six elementwise kernels,
  all in place and none allocating: sigmoid over r and z, n = tanh(x_n + r * (W_hn h + b_hn))
  as addcmul, sigmoid, two scalar passes, and h' = n + z (h - n) as one lerp into the state.

No autograd (everything is in place): callers use it only when no gradient is needed.
Inter-layer dropout is not applied, so it equals `nn.GRU` in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

CHUNK = 16  # time steps per input-projection GEMM


def last_states(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Last-layer state [B, hidden] of `gru` at step lengths - 1 of each user, for time-major inputs x [T, B, input].

    Users must come longest first (`lengths` non-increasing, each in 1..T); steps at or after
    a user's length are never read for that user. Equals `gru(x.transpose(0, 1))[0][b, lengths[b] - 1]`
    for a batch_first, unidirectional, biased `gru` in eval mode.
    """
    if gru.bidirectional or not gru.bias or gru.proj_size:
        raise ValueError("last_states supports unidirectional GRUs with biases and no projection")
    if torch.is_grad_enabled() and any(p.requires_grad for p in gru.parameters()):
        raise RuntimeError("last_states has no backward: call it under torch.no_grad() or torch.inference_mode()")
    lengths = lengths.to(x.device)
    if len(lengths) > 1 and bool((lengths[1:] > lengths[:-1]).any()):
        raise ValueError("last_states needs users sorted longest first")
    steps = int(lengths[0])
    if steps > x.shape[0] or int(lengths[-1]) < 1:
        raise ValueError(f"lengths must be in 1..{x.shape[0]}, got {lengths[-1].item()}..{steps}")
    # active[t] = how many users (longest first) have a real step t.
    active = (lengths[None, :] > torch.arange(steps, device=x.device)[:, None]).sum(1).tolist()
    out = x[:steps]
    for layer in range(gru.num_layers - 1):
        out = _layer(gru, layer, out, active, keep=True)
    return _layer(gru, gru.num_layers - 1, out, active, keep=False)


def _layer(gru: nn.GRU, layer: int, x: torch.Tensor, active: list[int], keep: bool) -> torch.Tensor:
    """One layer over time-major x [T, B, input] (users longest first): its states [T, B, hidden] if `keep`
    (the next layer's input; rows past a user's length unwritten), else each user's state after its last step [B, hidden].

    The state is updated in place, only for users still active, so a finished user's row keeps
    its last real state. Steps run in chunks of CHUNK: each chunk's input projection is one
    GEMM into a buffer small enough for malloc to reuse (a whole batch's, ~50 MB, was mapped
    and page-faulted afresh on every call). tanh(a) is computed as 2 sigmoid(2a) - 1: this
    CPU's tanh kernel took about four times sigmoid's time per element.
    """
    w_ih, w_hh = getattr(gru, f"weight_ih_l{layer}"), getattr(gru, f"weight_hh_l{layer}")
    b_ih, b_hh = getattr(gru, f"bias_ih_l{layer}"), getattr(gru, f"bias_hh_l{layer}")
    T, B, _ = x.shape
    H = w_hh.shape[1]
    bias = torch.cat([b_ih[: 2 * H] + b_hh[: 2 * H], b_ih[2 * H :]])  # r and z see b_i + b_h
    w_ih_t, w_hh_t = w_ih.t(), w_hh.t()
    h = x.new_zeros(B, H)
    out = x.new_empty(T, B, H) if keep else None
    for c in range(0, T, CHUNK):
        C = min(CHUNK, T - c)
        gates = torch.addmm(bias, x[c : c + C].reshape(C * B, -1), w_ih_t).view(C, B, 3 * H)
        new = gates[..., 2 * H :].mul(2)  # 2 (x W_in^T + b_in), kept apart from r (W_hn h + b_hn)
        gates[..., 2 * H :] = b_hh[2 * H :]  # so the step's GEMM, accumulated in place, gives W_hn h + b_hn there
        for t in range(C):
            k = active[c + t]
            g, n, hk = gates[t, :k], new[t, :k], h[:k]
            g.addmm_(hk, w_hh_t)
            rz = torch.sigmoid(g[:, : 2 * H], out=g[:, : 2 * H])
            n.addcmul_(rz[:, :H], g[:, 2 * H :], value=2).sigmoid_().mul_(2).sub_(1)  # tanh(x_n + r (W_hn h + b_hn))
            torch.lerp(n, hk, rz[:, H:], out=hk)  # h' = n + z (h - n)
            if keep:
                out[c + t, :k] = hk
    return out if keep else h
