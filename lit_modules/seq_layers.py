"""Layers the sequence encoders share: RMSNorm, RoPE, SwiGLU, causal attention, the HSTU block and a selective scan.

Every layer is causal over positions: the output at position t reads inputs at positions
<= t only. Sequences are right-padded, so pad columns can never reach a real position and
no padding mask is needed.

The selective scan (Mamba) is pure PyTorch: discretisation and read-out are computed for all
steps at once, only the state update h = a h + b runs step by step. On CPU this beat a
chunked closed form (pairwise decays within chunks of 2-8 steps) by 3-10x, forward and
backward at B=64, T=50, E=128, N=16: the closed form does chunk-times more arithmetic. The
mamba-ssm CUDA kernel is used instead only when the package is installed and the tensors
are on a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_cuda_scan = None
if torch.cuda.is_available():  # the fused kernel of the Mamba authors, only where it can run
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_scan
    except (ImportError, OSError):  # not installed, or built for another CUDA: the PyTorch scan
        _cuda_scan = None


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (Llama): no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_angles(length: int, head_dim: int, device: torch.device, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim / 2] of rotary position embeddings."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head's features of x [B, H, T, hd] by position."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): Llama's feed-forward."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class CausalSelfAttention(nn.Module):
    """Multi-head attention over positions <= t; rotary positions on queries and keys when `rope`."""

    def __init__(self, dim: int, heads: int, dropout: float, rope: bool, bias: bool = True):
        super().__init__()
        if dim % heads or (rope and (dim // heads) % 2):
            raise ValueError(f"model.hidden ({dim}) must split into model.heads ({heads}) heads (of even width with RoPE)")
        self.heads, self.dropout, self.rope = heads, dropout, rope
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if self.rope:
            cos, sin = rope_angles(T, D // self.heads, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class HSTUBlock(nn.Module):
    """Hierarchical Sequential Transduction Unit (Zhai et al. 2024): pointwise SiLU attention, gated by U.

    U, V, Q, K = split(silu(f1(norm(x)))); A = silu(Q K^T / sqrt(d) + rab(t - s)) / max_len over
    s <= t; y = x + f2(norm(A V) * U). Dividing by the fixed `max_len` (not the padded width)
    keeps a position's output independent of how much padding follows it.
    """

    def __init__(self, dim: int, heads: int, dropout: float, max_len: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.hidden ({dim}) must be divisible by model.heads ({heads})")
        self.heads, self.max_len = heads, max_len
        self.norm_in, self.norm_attn = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.f1, self.f2 = nn.Linear(dim, 4 * dim), nn.Linear(dim, dim)
        self.rab = nn.Embedding(max_len, heads)  # relative attention bias by distance t - s
        nn.init.zeros_(self.rab.weight)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H, hd = self.heads, D // self.heads
        u, v, q, k = F.silu(self.f1(self.norm_in(x))).chunk(4, dim=-1)
        q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))
        steps = torch.arange(T, device=x.device)
        dist = (steps[:, None] - steps[None, :]).clamp(0, self.max_len - 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + self.rab(dist).permute(2, 0, 1)[None]
        a = F.silu(scores).masked_fill(steps[None, :] > steps[:, None], 0.0) / self.max_len
        y = (a @ v).transpose(1, 2).reshape(B, T, D)
        return x + self.drop(self.f2(self.norm_attn(y) * u))


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """y_t = C_t . h_t + D u_t with h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, h_0 = 0 (Mamba's S6).

    u, delta [B, T, E]; A [E, N] (negative); Bm, C [B, T, N]; D [E] -> y [B, T, E].
    """
    if _cuda_scan is not None and u.is_cuda:
        t = lambda z: z.transpose(1, 2).contiguous()  # noqa: E731 - the kernel's [B, channels, T] layout
        return t(_cuda_scan(t(u), t(delta), A.contiguous(), t(Bm), t(C), D.float()))
    decay = torch.exp(delta[..., None] * A)  # [B, T, E, N], all steps at once
    inputs = (delta * u)[..., None] * Bm[:, :, None, :]  # [B, T, E, N]
    h, states = torch.zeros_like(inputs[:, 0]), []
    for a, b in zip(decay.unbind(1), inputs.unbind(1)):  # unbind: backward stacks once, no full-size zeros per step
        h = torch.addcmul(b, a, h)  # only the recurrence itself is sequential
        states.append(h)
    return (torch.stack(states, dim=1) * C[:, :, None, :]).sum(-1) + u * D


def selective_scan_loop(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The same recurrence computed naively, everything per step: the reference `selective_scan` is tested against."""
    h = torch.zeros(u.shape[0], u.shape[2], A.shape[1], dtype=u.dtype, device=u.device)
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * Bm[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + u[:, t] * D)
    return torch.stack(ys, dim=1)


class MambaMixer(nn.Module):
    """Mamba's selective state-space block (Gu & Dao 2023): causal depthwise conv, input-dependent scan, SiLU gate."""

    def __init__(self, dim: int, state: int, conv: int, expand: int):
        super().__init__()
        inner, self.rank, self.state = expand * dim, math.ceil(dim / 16), state
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = nn.Conv1d(inner, inner, conv, groups=inner, padding=conv - 1)
        self.x_proj = nn.Linear(inner, self.rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(self.rank, inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, dim, bias=False)
        with torch.no_grad():  # Mamba's dt init: softplus(bias) spread log-uniformly over [1e-3, 1e-1]
            dt = torch.exp(torch.rand(inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        h, z = self.in_proj(x).chunk(2, dim=-1)
        h = F.silu(self.conv(h.transpose(1, 2))[..., :T].transpose(1, 2))  # left-padded conv: causal
        dt, Bm, C = self.x_proj(h).split([self.rank, self.state, self.state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        y = selective_scan(h, delta, -torch.exp(self.A_log), Bm, C, self.D)
        return self.out_proj(y * F.silu(z))
