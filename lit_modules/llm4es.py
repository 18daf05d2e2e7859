"""LLM4ES: fine-tune a causal LM on users rendered as text, embed users from its hidden states;
and the frozen LM feature extractor of "Encode Me If You Can".

Batches come from `datamodules.text_batches.TextBatchBuilder`: padded (input_ids, attention_mask,
position_ids, labels) or packed (input_ids, position_ids, seq_idx, labels and maybe a 4-D
attention_mask). Models load from local folders only (`lit_modules.lm`); its `MINILM` names the
all-MiniLM-L6-v2 folder shipped in a python package, loaded as a causal decoder.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F

from datamodules.text_batches import IGNORE, block_causal_mask
from lit_modules.contract import adamw_with_schedule, log_losses
from lit_modules.llm4es_config import check_llm4es
from lit_modules.lm import load_causal_lm, resolve_model_path, with_lora

log = logging.getLogger(__name__)


def padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, ... over each row's real tokens (0 at pads): positions do not depend on padding side or amount."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def masked_mean(hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens; `where`, not a product, so NaN/inf at pad rows cannot leak in."""
    summed = torch.where(real[..., None], hidden, 0).sum(1)
    return summed / real.sum(1, keepdim=True).clamp(min=1)


def last_real(hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """State at each row's last real token, wherever the padding is."""
    T = real.shape[1]
    last = T - 1 - real.flip(1).long().argmax(1)
    return hidden[torch.arange(len(hidden), device=hidden.device), last]


def model_inputs(batch: dict, attn_implementation: str) -> dict:
    """Model kwargs for a padded or packed batch.

    Padded: the 2-D mask plus position ids counted over real tokens. Packed (seq_idx in the
    batch): flash-attention kernels separate documents by position_ids alone (no mask);
    everything else gets the 4-D block-diagonal causal mask, built here when the batch has
    none, because not every model separates documents from position_ids (BERT decoders
    don't). sdpa takes the bool mask, eager adds masks, so there it becomes 0 / dtype-min.
    """
    ids = batch["input_ids"]
    if "seq_idx" not in batch:
        mask = batch["attention_mask"]
        position_ids = batch.get("position_ids")
        position_ids = padded_position_ids(mask) if position_ids is None else position_ids
        return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
    if "flash" in attn_implementation:
        return {"input_ids": ids, "position_ids": batch["position_ids"]}
    mask = batch.get("attention_mask")
    mask = block_causal_mask(batch["seq_idx"]) if mask is None else mask
    if attn_implementation == "eager":
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": batch["position_ids"]}


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t's logits against labels[t+1], over labels != -100 only
    (pads and first document tokens never count, whatever sits at pad positions)."""
    target = labels[:, 1:]
    valid = target != IGNORE
    return F.cross_entropy(logits[:, :-1][valid].float(), target[valid])


class LLM4ESFinetune(L.LightningModule):
    """Next-token fine-tuning of a causal LM on user texts; user vector from its hidden states.

    Pooling: "llm4es" (the paper) averages hidden_states[from_layer:] (index 0 = embedding
    output, i = output of layer i; -4 = the last four layers), then averages over real
    tokens; "last_layer_mean" averages the last layer over real tokens; "last_token" takes
    the last layer at the last real token. All read only attention_mask == 1 positions, so
    the vector does not depend on padding side, padding amount or batch mates. `embed`
    needs padded batches (one user per row); packed batches are for training.

    `lora` wraps the model with peft LoRA (only adapter weights train; `lora_targets` None =
    peft's default modules for the architecture, else q_proj/v_proj). GPU runs pick
    precision via the Trainer (e.g. "bf16-true"); `attn_implementation` is passed to
    transformers (None = its default, sdpa).
    """

    def __init__(
        self,
        model_path: str,
        lora: bool = False,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_targets: list[str] | None = None,
        from_layer: int = -4,
        pooling: str = "llm4es",
        gradient_checkpointing: bool = False,
        lr: float = 1e-5,
        betas: tuple[float, float] | list[float] = (0.9, 0.95),
        weight_decay: float = 1e-6,
        warmup_steps: int = 0,
        attn_implementation: str | None = None,
    ):
        super().__init__()
        # Plain types before save_hyperparameters (it reads these locals): weights_only=True loading.
        betas = [float(b) for b in betas]
        lora_targets = [str(t) for t in lora_targets] if lora_targets is not None else None
        check_llm4es(pooling, betas)
        self.save_hyperparameters()

        model = load_causal_lm(model_path, attn_implementation)
        n_states = model.config.num_hidden_layers + 1
        if not -n_states <= from_layer < n_states:
            raise ValueError(f"from_layer {from_layer}: the model has {n_states} hidden states (embeddings + {n_states - 1} layers)")
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora:
            model = with_lora(model, lora_r, lora_alpha, lora_dropout, lora_targets)
        # from_pretrained returns the model in eval mode; Lightning keeps submodule modes, so
        # without this the fine-tuning would run with dropout off.
        self.model = model.train()
        self.attn_implementation = model.config._attn_implementation

    def forward(self, batch: dict, **kwargs: Any) -> Any:
        return self.model(**model_inputs(batch, self.attn_implementation), use_cache=False, **kwargs)

    def loss(self, batch: dict) -> torch.Tensor:
        return next_token_loss(self(batch).logits, batch["labels"])

    def embed(self, batch: dict) -> torch.Tensor:
        """User vectors [B, hidden] float32 in batch order (call in eval mode: dropout is random)."""
        if "seq_idx" in batch:
            raise ValueError("embed reads one user per row; build the batch without pack_length")
        out = self(batch, output_hidden_states=True, logits_to_keep=1)
        states = out.hidden_states
        real = batch["attention_mask"].bool()
        if self.hparams.pooling == "last_token":
            return last_real(states[-1], real).float()
        layers = states[self.hparams.from_layer :] if self.hparams.pooling == "llm4es" else states[-1:]
        hidden = torch.stack([h.float() for h in layers]).mean(0)
        return masked_mean(hidden, real)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return log_losses(self, {"next_token": self.loss(batch)}, "train", len(batch["input_ids"]))

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return log_losses(self, {"next_token": self.loss(batch)}, "val", len(batch["input_ids"]))

    def predict_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> torch.Tensor:
        return self.embed(batch)

    def configure_optimizers(self) -> dict:
        """AdamW over trainable parameters; linear warmup, then cosine to 0 at the trainer's last step."""
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        return adamw_with_schedule(self, params, hp.lr, hp.weight_decay, tuple(hp.betas), hp.warmup_steps, schedule="cosine")


class LMFeatureExtractor(L.LightningModule):
    """"Encode Me If You Can" LM block: a frozen pretrained LM (the paper: SmolLM2-135M reading the
    last 64 events, one per line), user vector = last hidden state averaged over real tokens.

    Any backbone `AutoModel` loads works: an encoder (MiniLM) or a decoder (SmolLM2 is a Llama).
    A user's text over the model's positions comes as several windows (`UserTextDataset(windows=True)`):
    the mean then runs over the real tokens of all of them, so every window counts by its tokens.
    Nothing trains: every parameter has requires_grad False and the backbone stays in eval
    mode, so the run loop skips `fit` and goes straight to embedding. `reading` counts users,
    events, windows and tokens read so far; `embed_stats` reports them per user.
    """

    def __init__(self, model_path: str, attn_implementation: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoModel

        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self.model = AutoModel.from_pretrained(resolve_model_path(model_path), local_files_only=True, **kwargs)
        self.model.requires_grad_(False)
        self.model.eval()
        self.positions = getattr(self.model.config, "max_position_embeddings", None)
        self.reading = {"users": 0, "events": 0, "windows": 0, "tokens": 0}

    def train(self, mode: bool = True) -> "LMFeatureExtractor":
        """Keep the backbone in eval mode (no dropout) whatever the trainer asks."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        """User vectors [B, hidden] float32 in batch order; rows of one user (window_user) pooled together."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.positions is not None and ids.shape[1] > self.positions:
            raise ValueError(f"model.max_tokens: a text of {ids.shape[1]} tokens is longer than the model's {self.positions} positions")
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=padded_position_ids(mask), use_cache=False)
        real = mask.bool()
        sums = torch.where(real[..., None], out.last_hidden_state.float(), 0).sum(1)
        counts = real.sum(1).float()
        users = batch.get("window_user")
        if users is not None:
            B = len(batch["index"])
            sums = torch.zeros(B, sums.shape[1], device=sums.device).index_add_(0, users, sums)
            counts = torch.zeros(B, device=counts.device).index_add_(0, users, counts)
        self.count(batch, len(ids), int(real.sum()))
        return sums / counts[:, None].clamp(min=1)

    def count(self, batch: dict, windows: int, tokens: int) -> None:
        """Add one batch to `reading` (events only where the batch says how many its texts hold)."""
        self.reading["users"] += len(batch["index"])
        self.reading["windows"] += windows
        self.reading["tokens"] += tokens
        if "events" in batch:
            self.reading["events"] += int(batch["events"].sum())

    def embed_stats(self) -> dict[str, float]:
        """Per user so far: events read, windows and tokens; logged, because they show whether the budget held the events."""
        users = max(self.reading["users"], 1)
        kinds = ("events", "windows", "tokens") if self.reading["events"] else ("windows", "tokens")  # one-window batches do not count events
        stats = {f"lm/{k}_per_user": self.reading[k] / users for k in kinds}
        read = ", ".join(f"{self.reading[k] / users:.2f} {k}" for k in kinds)
        log.info("lm_features read per user on average over %d users: %s", self.reading["users"], read)
        return stats

    def predict_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> torch.Tensor:
        return self.embed(batch)
