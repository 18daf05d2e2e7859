"""GRU sequence autoencoder ("Encode Me If You Can", RecSys Challenge 2025).

An encoder GRU reads a user's events, each field's ids wrapped in start/end markers
(SOS e_1 .. e_n EOS, `markers`); its last layer's state at EOS is the user vector. A
decoder GRU, every layer started from that vector, reconstructs the events field by
field with teacher forcing: step t reads event t-1 (SOS at t=0) plus the user vector and
predicts event t, then EOS. The user vector enters each decoder step as the paper has it,
added to the event vector (`decoder_input="add"`), or concatenated to it ("concat").
Field embeddings are summed into the event vector, or concatenated (`combine`, the
paper's day_event_type). Unlike the reference code, a user's vector never sees pad steps
and does not depend on the batch it was computed in.

Two GRU paths compute the same numbers (`gru_path`): "packed" runs both GRUs on packed
sequences; "trimmed" cuts the batch to its longest user, runs the GRUs over the
remaining right padding and reads each user's state at its last real step (a
unidirectional GRU's state there cannot depend on later pad steps; decoder states at
pad steps are never scored). "auto" takes packed on CUDA (cuDNN) and trimmed elsewhere:
on CPU, autograd through a packed GRU slices the packed data once per step and each
slice's backward zero-fills and adds a full-size gradient, which made a training epoch
1.5-1.8x slower than the trimmed path on the same length-bucketed batches
(docs/benchmarks.md). Summed field embeddings are one `embedding_bag` over a
concatenated table instead of a stack of per-field lookups (forward 13x faster on CPU in a trial).

Off CUDA, "auto" runs the encoder through `fast_gru.last_states` whenever no gradient is
needed (embed, validation) and dropout is inactive: the same nn.GRU parameters, users sorted
longest first so no pad step is computed, one GEMM per step (docs/benchmarks.md has its
speed). "trimmed" always runs nn.GRU; training (autograd) always does.
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from datamodules.fields import with_time
from datamodules.schema import EOS, MISSING, PAD, SOS
from lit_modules.contract import log_losses
from lit_modules.fast_gru import last_states
from lit_modules.gru_autoencoder_config import check_gru_autoencoder

GRU_PATHS = ("auto", "packed", "trimmed")


class GRUAutoencoder(L.LightningModule):
    """Per-field embeddings -> encoder GRU -> user vector -> decoder GRU -> per-field heads.

    Batches follow `datamodules.sequences` (tokens right-padded with PAD, real `lengths`);
    token fields not in `fields` and `values` are ignored. Arguments: the keys of
    `GRUAutoencoderConfig` (docs there) plus `vocab_sizes`; `fields` are resolved event
    fields, and the `time` index field (day or week) is read in front of them.

    With decoder_input="add" and hidden != event size (emb_dim, or emb_dim x fields with
    combine="concat"), `user_proj` (a learned linear map, hidden -> event size) brings the
    user vector to the event vector's size before the sum; with equal sizes the vector is
    added as is, as in the reference code. The exported user vector is the encoder state
    itself, never its projection.
    """

    def __init__(
        self,
        vocab_sizes: dict[str, int],
        fields: list[str],
        time: str = "none",
        emb_dim: int = 64,
        hidden: int = 128,
        layers: int = 2,
        dropout: float = 0.1,
        combine: str = "sum",
        decoder_input: str = "add",
        markers: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        codes_events: int = 4,
    ):
        super().__init__()
        # Plain types before save_hyperparameters (it reads these locals), so the
        # checkpoint loads with weights_only=True.
        vocab_sizes = {str(f): int(n) for f, n in vocab_sizes.items()}
        fields = [str(f) for f in fields]
        check_gru_autoencoder(combine, time, decoder_input)
        self.save_hyperparameters()
        fields = with_time(fields, time)
        _check_fields(vocab_sizes, fields)
        self.fields = fields
        self.combine = combine

        # ModuleLists in `fields` order: field names need not be valid module attribute names.
        # The embeddings are shared by encoder and decoder input.
        self.embeddings = nn.ModuleList(nn.Embedding(vocab_sizes[f], emb_dim, padding_idx=PAD) for f in fields)
        event_dim = emb_dim * len(fields) if combine == "concat" else emb_dim
        gru_dropout = dropout if layers > 1 else 0.0
        self.encoder = nn.GRU(event_dim, hidden, num_layers=layers, dropout=gru_dropout, batch_first=True)
        add = decoder_input == "add"
        self.decoder = nn.GRU(event_dim if add else event_dim + hidden, hidden, num_layers=layers, dropout=gru_dropout, batch_first=True)
        self.user_proj = nn.Linear(hidden, event_dim) if add and hidden != event_dim else nn.Identity()
        self.heads = nn.ModuleList(nn.Linear(hidden, vocab_sizes[f]) for f in fields)
        # Where each field's rows start in the concatenated table of `_events`; not saved
        # (derived from the vocab sizes), so checkpoints keep their keys.
        starts = torch.tensor([0] + [vocab_sizes[f] for f in fields[:-1]]).cumsum(0)
        self.register_buffer("field_starts", starts, persistent=False)
        # Not a hyperparameter: every path computes the same losses and vectors.
        self.gru_path = "auto"

    def _events(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """Per-field ids [B, T] (in `fields` order) -> event vectors [B, T, event_dim].

        "sum" is one embedding_bag over the fields' tables concatenated: PAD of every field
        maps to row 0 of the first table, the bag's padding_idx, so pads add zero and get
        no gradient, exactly like each nn.Embedding's padding_idx row.
        """
        if self.combine == "concat":
            return torch.cat([emb(t) for emb, t in zip(self.embeddings, tokens)], dim=-1)
        weight = torch.cat([emb.weight for emb in self.embeddings]) if len(self.embeddings) > 1 else self.embeddings[0].weight
        ids = torch.stack(tokens, dim=-1)
        ids = torch.where(ids == PAD, 0, ids + self.field_starts[: len(tokens)])
        return F.embedding_bag(ids.reshape(-1, ids.shape[-1]), weight, mode="sum", padding_idx=0).view(*ids.shape[:-1], -1)

    def _packed(self) -> bool:
        """Which GRU path to take (see the module docstring)."""
        if self.gru_path not in GRU_PATHS:
            raise ValueError(f"gru_path must be one of {GRU_PATHS}, got {self.gru_path!r}")
        if self.gru_path == "auto":
            return self.field_starts.device.type == "cuda"
        return self.gru_path == "packed"

    def _view(self, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The sequence this model reads: per-field ids [B, T] and lengths.

        A codes field (the paper's sku_text variant) is read as one token sequence: the
        codes of the user's last `codes_events` events that carry codes, concatenated.
        """
        field = self.fields[0]
        if field in batch.get("codes", {}):
            tokens, lengths = codes_tail(batch["codes"][field], batch["lengths"], self.hparams.codes_events)
            return [tokens], lengths
        return [batch["tokens"][f] for f in self.fields], batch["lengths"]

    def _trimmed_view(self, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`_view` cut to the batch's longest user: steps after it are pads for everyone."""
        tokens, lengths = self._view(batch)
        longest = int(lengths.max())
        return [t[:, :longest] for t in tokens], lengths

    def _encoder_input(self, tokens: list[torch.Tensor], lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """What the encoder reads: the events, wrapped in markers when `markers` is on."""
        return with_markers(tokens, lengths) if self.hparams.markers else (tokens, lengths)

    def _encode(self, tokens: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        """The encoder's last-layer state at each user's last real step (EOS with markers) [B, hidden]."""
        tokens, lengths = self._encoder_input(tokens, lengths)
        if self._fast():
            return self._encode_fast(tokens, lengths)
        x = self._events(tokens)
        if self._packed():
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            _, h_n = self.encoder(packed)  # [layers, B, hidden], already back in batch order
            return h_n[-1]
        out, _ = self.encoder(x)
        return out[torch.arange(len(lengths), device=out.device), lengths.to(out.device) - 1]

    def _fast(self) -> bool:
        """The no-gradient encoder path: "auto" off CUDA, no autograd, no active dropout (see the module docstring)."""
        if self.gru_path != "auto" or self._packed() or torch.is_grad_enabled():
            return False
        return not (self.training and self.encoder.dropout > 0)

    def _encode_fast(self, tokens: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        """`_encode` through `last_states`: users sorted longest first, events time-major, vectors back in batch order."""
        lengths = lengths.to(tokens[0].device)
        order = torch.argsort(lengths, descending=True, stable=True)
        x = self._events([t.index_select(0, order).t() for t in tokens])  # [T, B, event_dim]
        z = last_states(self.encoder, x, lengths[order])
        return torch.empty_like(z).index_copy_(0, order, z)

    def embed(self, batch: dict) -> torch.Tensor:
        """User vectors [B, hidden] float32 in batch order; independent of padding and batch mates.

        Call in eval mode: in train mode, inter-layer dropout makes them random.
        """
        return self._encode(*self._trimmed_view(batch)).float()

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Reconstruction cross-entropy per field, each averaged over real target positions.

        Decoder step t reads event t-1 (SOS at t=0) and predicts event t; the target after
        the last event is EOS, so a user of n events gives n+1 positions.
        """
        tokens, lengths = self._trimmed_view(batch)
        z = self._encode(tokens, lengths).float()
        B, T = tokens[0].shape
        dec_lengths = lengths + 1

        prev = [F.pad(t, (1, 0), value=SOS) for t in tokens]
        x = self._decoder_input(self._events(prev), z)
        # Every decoder layer starts from the user vector (not the encoder's lower layers'
        # states), so all the decoder knows about the user passes through the exported vector.
        h_0 = z[None].expand(self.hparams.layers, B, z.shape[-1]).contiguous()
        if self._packed():
            packed = pack_padded_sequence(x, dec_lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.decoder(packed, h_0)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=T + 1)
        else:
            out, _ = self.decoder(x, h_0)  # states at pad steps are computed and never scored

        # Only real positions reach the heads: pads are neither scored nor paid for.
        real = torch.arange(T + 1, device=out.device)[None, :] < dec_lengths[:, None].to(out.device)
        return self.field_losses(out[real], real, tokens, lengths)

    def _decoder_input(self, events: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Each step's decoder input [B, T, *]: its event vector plus, or next to, the user vector."""
        if self.hparams.decoder_input == "add":
            return events + self.user_proj(z)[:, None, :]
        return torch.cat([events, z[:, None, :].expand(*events.shape[:2], z.shape[-1])], dim=-1)

    def field_losses(self, out: torch.Tensor, real: torch.Tensor, tokens: list[torch.Tensor], lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy per field over the decoder states of real positions: every event, then EOS after the last."""
        losses = {}
        for f, head, t in zip(self.fields, self.heads, tokens):
            target = F.pad(t, (0, 1), value=PAD).scatter(1, lengths[:, None], EOS)
            losses[f] = F.cross_entropy(head(out), target[real])
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return log_losses(self, self.losses(batch), "train", len(batch["index"]))

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return log_losses(self, self.losses(batch), "val", len(batch["index"]))

    def predict_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> torch.Tensor:
        return self.embed(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def _check_fields(vocab_sizes: dict[str, int], fields: list[str]) -> None:
    if not fields:
        raise ValueError("fields must name at least one token field")
    if len(set(fields)) != len(fields):
        raise ValueError(f"fields has duplicates: {fields}")
    for f in fields:
        if f not in vocab_sizes:
            raise ValueError(f"field {f!r} has no vocabulary size; known fields: {sorted(vocab_sizes)}")
        if vocab_sizes[f] <= EOS:
            raise ValueError(f"vocab size of {f!r} is {vocab_sizes[f]}; it must cover the reserved ids 0..{EOS}")


def with_markers(tokens: list[torch.Tensor], lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Right-padded ids [B, T] per field -> [B, T+2] as SOS e_1 .. e_n EOS PAD .., and lengths + 2.

    EOS goes right after each user's own last event (not at the batch's last column), so
    the encoder's state at the new last real step has read no pad.
    """
    end = (lengths + 1)[:, None].to(tokens[0].device)
    wrapped = [F.pad(F.pad(t, (1, 0), value=SOS), (0, 1), value=PAD).scatter(1, end, EOS) for t in tokens]
    return wrapped, lengths + 2


def codes_tail(codes: torch.Tensor, lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, L] codes -> [B, k*L] ids of the last k events that carry codes, oldest first, and their lengths.

    A user without any such event gets a single MISSING token, so every sequence is non-empty.
    """
    B, T, L = codes.shape
    real = torch.arange(T, device=codes.device)[None, :] < lengths[:, None].to(codes.device)
    has = real & (codes[..., 0] != MISSING) & (codes[..., 0] != PAD)
    from_end = has.flip(1).cumsum(1).flip(1)  # code-carrying events at or after each step
    keep = has & (from_end <= k)
    n = keep.sum(1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]  # kept steps first, in time order
    picked = codes.gather(1, order[..., None].expand(-1, -1, L))
    slot = torch.arange(order.shape[1], device=codes.device)[None, :] < n[:, None]
    tokens = (picked * slot[..., None]).reshape(B, -1)
    empty = n == 0
    tokens[empty, 0] = MISSING
    return tokens, torch.where(empty, torch.ones_like(n), n * L)
