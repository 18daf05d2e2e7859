"""Next-event GPT ("Encode Me If You Can", RecSys Challenge 2025, "next product" / "next url").

A GPT-2-style causal transformer, trained from scratch, reads a user's events and predicts
each next event's fields from the state at the current one. The user vector is the
final-layer state at the user's last real event. The causal mask plus an explicit padding
mask mean a user's vector never sees pad columns and does not depend on its batch mates.

Numeric values enter and are predicted as `signed_log1p(x) = sign(x) * log1p(|x|)`:
heavy-tailed prices (1 .. 1e5) become 0.7 .. 11.5, so neither the input projection nor
the MAE is dominated by a few huge values. A missing value is 0.0 in the batch, the same
as a real 0; the model learns missingness from the same-named token field (numeric fields
are bucketed with MISSING at missing values) when that field is in `fields`.
"""

from __future__ import annotations

import logging

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2Model

from datamodules.fields import with_time
from datamodules.schema import EOS, MISSING, PAD, SOS
from lit_modules.contract import adamw_with_schedule, log_losses
from lit_modules.next_event_gpt_config import check_next_event_gpt

INIT_STD = 0.02  # GPT-2's initializer_range, used for the layers added around GPT2Model

log = logging.getLogger(__name__)


class NextEventGPT(L.LightningModule):
    """Summed field embeddings + projected values -> GPT-2 -> next-event heads; user vector = last real state.

    Batches follow `datamodules.sequences` (tokens right-padded with PAD, real `lengths`).
    Training reads one random contiguous window of `slice_min`..`slice_max` events (the
    paper's 33-65, clamped to the user's length) from anywhere in each user's history, new
    every step, so the model sees many sub-histories. Validation, `embed` and
    `predict_step` read the last `max_len` events (longer histories are cut from the left).

    Position embeddings of positions >= `slice_max` get no training signal (windows start at
    position 0), so with `slice_max < max_len` users longer than `slice_max` are embedded
    through untrained position rows; set `slice_max = max_len` when that matters.

    With `event_types`, every path (training, validation, `embed`) first drops the events of
    other types and reads the rest in their order (`only_event_types`), so the model reads
    and predicts only those events. A user with none of them is read as one event whose
    every token is SOS: their vector is that state, the same for all such users.

    Arguments: the keys of `NextEventGPTConfig` (docs there) plus `vocab_sizes`; `fields`
    are resolved event fields, and the `time` index field (day or week) is read in front;
    `event_type_field` and `event_type_ids` are `event_types` as the batch's token ids.
    """

    def __init__(
        self,
        vocab_sizes: dict[str, int],
        fields: list[str],
        event_type_field: str | None,
        event_type_ids: list[int] | None,
        time: str = "none",
        event_types: list[str] | None = None,
        value_fields: list[str] | tuple[str, ...] = (),
        predict_fields: list[str] | None = None,
        predict_values: list[str] | tuple[str, ...] = (),
        hidden: int = 128,
        layers: int = 4,
        heads: int = 4,
        dropout: float = 0.1,
        max_len: int = 65,
        slice_min: int = 33,
        slice_max: int = 65,
        sampled_negatives: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        schedule: str = "constant",
    ):
        super().__init__()
        # Plain types before save_hyperparameters (it reads these locals), so the
        # checkpoint loads with weights_only=True.
        vocab_sizes = {str(f): int(n) for f, n in vocab_sizes.items()}
        fields, value_fields = [str(f) for f in fields], [str(f) for f in value_fields]
        predict_fields = list(fields) if predict_fields is None else [str(f) for f in predict_fields]
        predict_values = [str(f) for f in predict_values]
        sampled_negatives = None if sampled_negatives is None else int(sampled_negatives)
        event_types = None if event_types is None else [str(t) for t in event_types]
        event_type_ids = None if event_type_ids is None else [int(i) for i in event_type_ids]
        event_type_field = None if event_type_field is None else str(event_type_field)
        self.save_hyperparameters()
        check_next_event_gpt(self.hparams)
        fields = with_time(fields, time)
        _check_fields(self.hparams, fields)
        _check_event_types(self.hparams)
        _note_full_softmax(self.hparams)
        self.fields, self.value_fields = fields, value_fields
        self.predict_fields, self.predict_values = predict_fields, predict_values

        # ModuleLists in field order: field names need not be valid module attribute names.
        self.embeddings = nn.ModuleList(nn.Embedding(vocab_sizes[f], hidden, padding_idx=PAD) for f in fields)
        self.value_proj = nn.Linear(len(value_fields), hidden) if value_fields else None
        config = GPT2Config(
            vocab_size=1,  # inputs arrive as inputs_embeds; GPT-2's own token table stays unused
            n_positions=max_len,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            activation_function="gelu_pytorch_tanh",  # GPT-2's gelu_new as one fused op: ~2x faster on CPU
            bos_token_id=None,  # no token vocabulary: GPT-2's 50256 would be out of range
            eos_token_id=None,
            use_cache=False,
        )
        self.gpt = GPT2Model(config)
        self.gpt.wte.requires_grad_(False)
        self.heads = nn.ModuleList(nn.Linear(hidden, vocab_sizes[f]) for f in predict_fields)
        self.value_head = nn.Linear(hidden, len(predict_values)) if predict_values else None
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 initialisation for the added layers: small inputs next to the position
        embeddings, and near-zero logits so the first loss is the uniform guess."""
        for m in [*self.embeddings, *self.heads, self.value_proj, self.value_head]:
            if m is None:
                continue
            nn.init.normal_(m.weight, std=INIT_STD)
            if isinstance(m, nn.Embedding):
                m.weight.data[PAD].zero_()
            else:
                nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------- inputs

    def _inputs(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """The fields this model uses, of the events of `event_types` only (all events without it)."""
        lengths = batch["lengths"].to(self.device)
        tok_names = {*self.fields, *self.predict_fields, *(f for f in self.predict_values if f in batch["tokens"])}
        tokens = {f: batch["tokens"][f] for f in tok_names}
        values = {f: batch["values"][f] for f in {*self.value_fields, *self.predict_values}}
        if self.hparams.event_type_ids is None:
            return tokens, values, lengths
        ids = torch.tensor(self.hparams.event_type_ids, device=lengths.device)
        return only_event_types(tokens, values, lengths, batch["tokens"][self.hparams.event_type_field], ids)

    def _view(self, batch: dict, train: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """Tokens, values and lengths the model reads (see `_inputs`): a random window per user
        when `train`, else the last `max_len` events."""
        tokens, values, lengths = self._inputs(batch)
        if train:
            starts, new_lengths = random_windows(lengths, self.hparams.slice_min, self.hparams.slice_max)
        elif lengths.max() > self.hparams.max_len:
            new_lengths = lengths.clamp(max=self.hparams.max_len)
            starts = lengths - new_lengths
        else:  # only pad columns can lie beyond max_len: drop them
            n = self.hparams.max_len
            return {f: t[:, :n] for f, t in tokens.items()}, {f: v[:, :n] for f, v in values.items()}, lengths
        tokens = {f: take_windows(t, starts, new_lengths) for f, t in tokens.items()}
        values = {f: take_windows(v, starts, new_lengths) for f, v in values.items()}
        return tokens, values, new_lengths

    def _hidden(
        self, tokens: dict[str, torch.Tensor], values: dict[str, torch.Tensor], lengths: torch.Tensor
    ) -> torch.Tensor:
        """Final-layer states [B, T, hidden] (states at pad columns are meaningless)."""
        x = sum(emb(tokens[f]) for f, emb in zip(self.fields, self.embeddings))
        if self.value_proj is not None:
            v = torch.stack([signed_log1p(values[f]) for f in self.value_fields], dim=-1)
            x = x + self.value_proj(v)
        T = x.shape[1]
        mask = (torch.arange(T, device=x.device)[None, :] < lengths[:, None]).long()
        return self.gpt(inputs_embeds=x, attention_mask=mask).last_hidden_state

    # ---------------------------------------------------------------- outputs

    def embed(self, batch: dict) -> torch.Tensor:
        """User vectors [B, hidden] float32: the state at each user's last real event.

        Call in eval mode: in train mode, dropout makes them random.
        """
        tokens, values, lengths = self._view(batch, train=False)
        h = self._hidden(tokens, values, lengths)
        return h[torch.arange(len(lengths), device=h.device), lengths - 1].float()

    def losses(self, batch: dict, train: bool = False) -> dict[str, torch.Tensor]:
        """Next-event losses: cross-entropy per `predict_fields` field (key: field name) and
        MAE of signed_log1p value per `predict_values` field (key: `<field>_mae`).

        Position t predicts event t+1, for t+1 < length; a value target also needs its
        same-named token (when the batch has it) not to be MISSING. Each part is averaged over
        its real targets. `train` reads random windows and uses sampled softmax when configured.
        """
        tokens, values, lengths = self._view(batch, train)
        h = self._hidden(tokens, values, lengths)[:, :-1]  # states that have a next event slot
        T = h.shape[1]
        has_next = torch.arange(T, device=h.device)[None, :] + 1 < lengths[:, None]
        out = h[has_next]  # [N, hidden]
        k = self.hparams.sampled_negatives
        losses = {}
        for f, head in zip(self.predict_fields, self.heads):
            target = tokens[f][:, 1:][has_next]
            if train and k is not None and head.out_features > k:
                # Uniform over the whole vocabulary (PAD included: it is never a target).
                negatives = torch.randint(head.out_features, (k,), device=h.device)
                losses[f] = sampled_softmax_loss(out, head.weight, head.bias, target, negatives)
            else:
                n = (target != PAD).sum().clamp(min=1)  # sum / count: a batch of 1-event users gives 0, not NaN
                losses[f] = F.cross_entropy(head(out), target, ignore_index=PAD, reduction="sum") / n
        if self.value_head is not None:
            pred = self.value_head(out)
            for i, f in enumerate(self.predict_values):
                target = signed_log1p(values[f][:, 1:][has_next])
                real = torch.ones_like(target, dtype=torch.bool)
                if f in tokens:
                    real = tokens[f][:, 1:][has_next] != MISSING
                err = (pred[:, i] - target).abs() * real
                losses[f"{f}_mae"] = err.sum() / real.sum().clamp(min=1)
        return losses

    # ---------------------------------------------------------------- lightning

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return log_losses(self, self.losses(batch, train=True), "train", len(batch["lengths"]))

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return log_losses(self, self.losses(batch), "val", len(batch["lengths"]))

    def predict_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> torch.Tensor:
        return self.embed(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        return adamw_with_schedule(self, params, hp.lr, hp.weight_decay, warmup_steps=hp.warmup_steps, schedule=hp.schedule)


# -------------------------------------------------------------------- helpers


def signed_log1p(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * log1p(|x|): tames heavy-tailed values, keeps sign and 0."""
    return torch.sign(x) * torch.log1p(x.abs())


def random_windows(
    lengths: torch.Tensor, slice_min: int, slice_max: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per user a window length uniform in [slice_min, slice_max], clamped to the user's length,
    and a start uniform over the positions where that window fits. Returns (starts, window lengths)."""
    B = len(lengths)
    want = torch.randint(slice_min, slice_max + 1, (B,), generator=generator, device="cpu").to(lengths.device)
    size = torch.minimum(want, lengths)
    room = (lengths - size + 1).double()
    starts = (torch.rand(B, generator=generator, device="cpu", dtype=torch.float64).to(lengths.device) * room).long()
    return starts.clamp(max=(lengths - size)), size  # clamp guards rand()*room rounding up to room


def only_event_types(
    tokens: dict[str, torch.Tensor], values: dict[str, torch.Tensor], lengths: torch.Tensor, event: torch.Tensor, ids: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Each user's real events whose `event` token is in `ids`, moved to the front in their order.

    A user left without events becomes one event of SOS tokens (values 0): the model has a
    position to read, and every such user gets the same vector, whatever the batch.
    """
    steps = torch.arange(event.shape[1], device=event.device)[None, :]
    keep = (steps < lengths[:, None]) & torch.isin(event, ids)
    new_lengths = keep.sum(1)
    empty = (new_lengths == 0)[:, None]
    tokens = {f: front(t, keep) for f, t in tokens.items()}
    tokens = {f: torch.cat([t[:, :1].masked_fill(empty, SOS), t[:, 1:]], dim=1) for f, t in tokens.items()}
    return tokens, {f: front(v, keep) for f, v in values.items()}, new_lengths.clamp(min=1)


def front(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row b of [B, T] `x`: its `keep` entries first, in order, then 0; width max(kept per row, 1)."""
    n = keep.sum(1)
    width = max(int(n.max()), 1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    real = torch.arange(width, device=x.device)[None, :] < n[:, None]
    return torch.where(real, x.gather(1, order), torch.zeros((), dtype=x.dtype, device=x.device))


def take_windows(x: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Row b of [B, T] `x` -> x[b, starts[b] : starts[b] + lengths[b]], right-padded with 0 to max(lengths)."""
    width = int(lengths.max())
    steps = torch.arange(width, device=x.device)[None, :]
    idx = (starts[:, None] + steps).clamp(max=x.shape[1] - 1)
    real = steps < lengths[:, None]
    return torch.where(real, x.gather(1, idx), torch.zeros((), dtype=x.dtype, device=x.device))


def sampled_softmax_loss(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of the true id against shared `negatives` only, over rows of `h` [N, H].

    Logits come from the head's rows: true id and the K negative ids. A negative equal to the
    row's true id (an accidental hit) is masked out. With uniform sampling the logQ
    correction is the same constant for every candidate, so it cancels and is omitted.
    Rows whose target is PAD are skipped.
    """
    keep = target != PAD
    h, target = h[keep], target[keep]
    true_logit = (h * weight[target]).sum(-1, keepdim=True) + bias[target][:, None]  # [N, 1]
    neg_logits = h @ weight[negatives].T + bias[negatives]  # [N, K]
    neg_logits = neg_logits.masked_fill(negatives[None, :] == target[:, None], float("-inf"))
    logits = torch.cat([true_logit, neg_logits], dim=1)
    zeros = torch.zeros(len(target), dtype=torch.long, device=h.device)
    return F.cross_entropy(logits, zeros, reduction="sum") / max(len(target), 1)


def _check_event_types(hp: dict) -> None:
    """`event_types` and their ids come together (the config's data_args maps one to the other)."""
    names, ids = hp["event_types"], hp["event_type_ids"]
    if (names is None) != (ids is None) or (names is not None and len(names) != len(ids)):
        raise ValueError(f"event_types {names} and event_type_ids {ids} do not match: build the model through its config's data_args")
    if ids is not None and hp["event_type_field"] is None:
        raise ValueError("event_type_ids need event_type_field, the token field that holds them")


def _note_full_softmax(hp: dict) -> None:
    """Warn when sampled softmax is configured but a predicted field's vocabulary is not larger
    than the negatives: that field trains with the (exact) full softmax instead. Not an error:
    small data such as the tests' and the synthetic layout legitimately has small vocabularies."""
    k = hp["sampled_negatives"]
    if k is None:
        return
    for f in hp["predict_fields"]:
        if hp["vocab_sizes"][f] <= k:
            log.warning("%s: vocabulary of %d ids <= sampled_negatives %d: trained with the full softmax", f, hp["vocab_sizes"][f], k)


def _check_fields(hp: dict, fields: list[str]) -> None:
    """Checks that need the vocabulary sizes; the rest is `check_next_event_gpt`'s."""
    vocab_sizes = hp["vocab_sizes"]
    if not fields and not hp["value_fields"]:
        raise ValueError("fields and value_fields are both empty: the model needs an input")
    if not hp["predict_fields"] and not hp["predict_values"]:
        raise ValueError("predict_fields and predict_values are both empty: nothing to predict")
    for name in ("value_fields", "predict_fields", "predict_values"):
        if len(set(hp[name])) != len(hp[name]):
            raise ValueError(f"{name} has duplicates: {hp[name]}")
    if len(set(fields)) != len(fields):
        raise ValueError(f"fields has duplicates: {fields}")
    for f in [*fields, *hp["predict_fields"]]:
        if f not in vocab_sizes:
            raise ValueError(f"token field {f!r} has no vocabulary size; known fields: {sorted(vocab_sizes)}")
        if vocab_sizes[f] <= EOS:
            raise ValueError(f"vocab size of {f!r} is {vocab_sizes[f]}; it must cover the reserved ids 0..{EOS}")
