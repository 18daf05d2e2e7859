"""UQABench's sequence encoders and item input, each usable on its own.

`build_encoder(name, ...)` gives GRU4Rec, SASRec, HSTU, Trm++ or Mamba4Rec with one
interface, `encoder(x, lengths) -> states`: [B, T, D] item inputs (right-padded) and real
lengths in, [B, T, D] states out, causal over positions (the state at t reads items <= t).
`ItemInput` turns item ids into [.., D] vectors from an item's id, its side-information
ids and the bag of its text token ids; the same module scores the catalogue (tied table).
"""

from __future__ import annotations

import torch
from torch import nn

from lit_modules.next_item_rec_config import ENCODERS, ITEM_INPUTS
from lit_modules.seq_layers import CausalSelfAttention, HSTUBlock, MambaMixer, RMSNorm, SwiGLU

INIT_STD = 0.02  # item embeddings, as GPT-2 and SASRec initialise theirs


class GRU4Rec(nn.Module):
    """GRU4Rec (Hidasi et al. 2016): a stacked GRU; a recurrence is causal by construction."""

    def __init__(self, dim: int, layers: int, dropout: float):
        super().__init__()
        self.gru = nn.GRU(dim, dim, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[0]


class SASRec(nn.Module):
    """SASRec (Kang & McAuley 2018): learned absolute positions, pre-norm causal transformer blocks (LayerNorm, GELU)."""

    def __init__(self, dim: int, layers: int, heads: int, dropout: float, max_len: int):
        super().__init__()
        self.positions = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout, llama=False) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.positions.num_embeddings:
            raise ValueError(f"SASRec reads at most model.max_len={self.positions.num_embeddings} positions, got {x.shape[1]}")
        x = self.drop(x + self.positions(torch.arange(x.shape[1], device=x.device))[None])
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class TrmPlusPlus(nn.Module):
    """Trm++ (UQABench): a Llama-style decoder, RMSNorm, rotary positions, SwiGLU, no biases."""

    def __init__(self, dim: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout, llama=True) for _ in range(layers))
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class _Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); Llama parts or SASRec's."""

    def __init__(self, dim: int, heads: int, dropout: float, llama: bool):
        super().__init__()
        norm = (lambda: RMSNorm(dim)) if llama else (lambda: nn.LayerNorm(dim))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = CausalSelfAttention(dim, heads, dropout, rope=llama, bias=not llama)
        self.ffn = SwiGLU(dim, 4 * dim) if llama else nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.ffn(self.norm2(x)))


class HSTU(nn.Module):
    """HSTU (Zhai et al. 2024): stacked HSTU blocks; positions enter through the relative attention bias only."""

    def __init__(self, dim: int, layers: int, heads: int, dropout: float, max_len: int):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(HSTUBlock(dim, heads, dropout, max_len) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Mamba4Rec(nn.Module):
    """Mamba4Rec (Liu et al. 2024): per layer LayerNorm(x + Mamba(x)), then a residual feed-forward with LayerNorm."""

    def __init__(self, dim: int, layers: int, dropout: float, state: int, conv: int, expand: int):
        super().__init__()
        self.mixers = nn.ModuleList(MambaMixer(dim, state, conv, expand) for _ in range(layers))
        self.norms1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.ffns = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim)) for _ in range(layers))
        self.norms2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.drop(x)
        for mixer, n1, ffn, n2 in zip(self.mixers, self.norms1, self.ffns, self.norms2):
            x = n1(x + self.drop(mixer(x)))
            x = n2(x + self.drop(ffn(x)))
        return x


def build_encoder(
    name: str, dim: int, layers: int, heads: int, dropout: float, max_len: int, state: int = 16, conv: int = 4, expand: int = 2
) -> nn.Module:
    """The encoder called `name` (one of ENCODERS); `heads` is unused by GRU4Rec and Mamba4Rec, `state/conv/expand` by all but Mamba4Rec."""
    if name == "gru4rec":
        return GRU4Rec(dim, layers, dropout)
    if name == "sasrec":
        return SASRec(dim, layers, heads, dropout, max_len)
    if name == "hstu":
        return HSTU(dim, layers, heads, dropout, max_len)
    if name == "trm":
        return TrmPlusPlus(dim, layers, heads, dropout)
    if name == "mamba":
        return Mamba4Rec(dim, layers, dropout, state, conv, expand)
    raise ValueError(f"model.encoder must be one of {ENCODERS}, got {name!r}")


class ItemInput(nn.Module):
    """Item id -> [D]: concat(id embedding, side-id embeddings, mean of the text token embeddings) -> linear to D.

    The per-item tables are buffers (saved with the weights, so a finished run rebuilds
    without data): `side_ids` [n_items, S] one id per side field, `text_ids` [n_items, L]
    token ids with 0 as padding (an EmbeddingBag in mean mode skips them; no text: zeros).
    `inputs` drops parts: "no_text" or "no_side" (the paper's ablations), "full" keeps all.
    """

    def __init__(
        self, n_items: int, side_sizes: list[int], text_vocab: int, text_len: int, width: int,
        id_dim: int, side_dim: int, text_dim: int, inputs: str = "full",
    ):  # fmt: skip
        super().__init__()
        if inputs not in ITEM_INPUTS:
            raise ValueError(f"model.item_inputs must be one of {ITEM_INPUTS}, got {inputs!r}")
        self.use_side = inputs != "no_side" and bool(side_sizes)
        self.use_text = inputs != "no_text" and text_len > 0
        self.register_buffer("side_ids", torch.zeros(n_items, len(side_sizes), dtype=torch.long))
        self.register_buffer("text_ids", torch.zeros(n_items, text_len, dtype=torch.long))
        self.ids = nn.Embedding(n_items, id_dim, padding_idx=0)
        self.sides = nn.ModuleList(nn.Embedding(n, side_dim, padding_idx=0) for n in side_sizes) if self.use_side else nn.ModuleList()
        self.text = nn.EmbeddingBag(text_vocab + 1, text_dim, mode="mean", padding_idx=0) if self.use_text else None
        concat = id_dim + side_dim * len(self.sides) + (text_dim if self.use_text else 0)
        self.proj = nn.Linear(concat, width)
        for emb in [self.ids, *self.sides, *([self.text] if self.text is not None else [])]:
            nn.init.normal_(emb.weight, std=INIT_STD)  # small item vectors: the first logits are near the uniform guess
            emb.weight.data[0].zero_()

    def set_tables(self, side_ids: torch.Tensor, text_ids: torch.Tensor) -> None:
        """Fill the per-item tables (built from the data by datamodules.item_features)."""
        self.side_ids.copy_(side_ids)
        self.text_ids.copy_(text_ids)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        parts = [self.ids(items)]
        parts += [emb(self.side_ids[items, j]) for j, emb in enumerate(self.sides)]
        if self.text is not None:
            flat = self.text_ids[items.reshape(-1)]
            parts.append(self.text(flat).view(*items.shape, -1))
        return self.proj(torch.cat(parts, dim=-1))


def pool(states: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """[B, D] user vectors: the state at the last real position ("last") or the mean over real positions ("mean")."""
    if how == "last":
        return states[torch.arange(len(lengths), device=states.device), lengths - 1]
    real = (torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]).to(states.dtype)
    return (states * real[..., None]).sum(1) / lengths[:, None].to(states.dtype)
