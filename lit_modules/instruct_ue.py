"""InstructUEJoint: a user's sources as soft tokens in an LLM, the user vector read at an added `<USER>` token.

Each textual source goes through a BERT-style encoder (frozen by default); its token states are
cut into `soft_tokens` consecutive chunks (older to newer events), each mean-pooled, and a
one-layer adapter (a linear map, one per source) projects every chunk into the LLM's embedding
space: a source becomes `soft_tokens` soft tokens that keep a coarse time order, whatever its
length. The tabular vector (mixed units: log counts, shares, ratings, prices) is standardised
with running statistics of the training batches (`Standardizer`) and an MLP adapter makes it
`soft_tokens` soft tokens too. The LLM reads them between their delimiters' text tokens, then
`Instruction: ...` and `<USER>` (datamodules/instruct_batches.py builds the sequence). The
user vector is the final-layer state at `<USER>` (pooling "mean": the mean over every prompt
token); the answer vector is the same LLM's last-token state on the answer alone. Causal
attention means the answer after `<USER>` in training never changes the user vector.

A frozen encoder's chunk means are cached per distinct source text (`model.encoder_cache`, filled and saved
to disk before training, see `on_fit_start`), and the answer loss runs the LM head only at answer positions
(`answer_head`): a training step costs the adapters and the LLM, not the encoder.

`<USER>` is a real added special token: the tokenizer grows, the embedding matrix grows when it
has no spare row (new rows start at the mean embedding) and the row trains: with LoRA the
matrix stays trainable with every gradient but `<USER>`'s zeroed (and no weight decay on it).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lit_modules.contract import adamw_with_schedule, log_losses
from lit_modules.instruct_ue_config import check_instruct_ue
from lit_modules.instruct_ue_loss import answer_lm_loss, answer_lm_loss_at, masked_info_nce
from lit_modules.llm4es import last_real, masked_mean, padded_position_ids
from lit_modules.instruct_ue_tokens import add_user_row, llm_tokenizer
from lit_modules.lm import MINILM, load_causal_lm, resolve_model_path, with_lora

log = logging.getLogger(__name__)


def chunk_means(states: torch.Tensor, real: torch.Tensor, k: int) -> torch.Tensor:
    """[N, T, D] -> [N, k, D]: the real tokens of each row cut into k consecutive chunks, each averaged
    (a row with fewer than k real tokens fills its empty chunks with the mean of all of them)."""
    n = real.sum(1, keepdim=True).clamp(min=1)
    chunk = ((real.long().cumsum(1) - 1).clamp(min=0) * k) // n
    weights = nn.functional.one_hot(chunk, k).to(states.dtype) * real[..., None].to(states.dtype)  # [N, T, k]
    sums = torch.einsum("ntk,ntd->nkd", weights, states)
    counts = weights.sum(1)[..., None]
    whole = masked_mean(states, real)[:, None]
    return torch.where(counts > 0, sums / counts.clamp(min=1), whole)


class Standardizer(nn.Module):
    """x -> (x - mean) / std with the exact running mean and variance of every training batch seen (eval: frozen),
    so an embedding never depends on its batch mates; clipped to +-10 (a value far outside training)."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("m2", torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():  # Chan et al.'s merge of the batch's moments into the running ones
                nb, mb = float(len(x)), x.float().mean(0)
                delta, total = mb - self.mean, self.count + nb
                self.m2 += ((x.float() - mb) ** 2).sum(0) + delta**2 * self.count * nb / total
                self.mean += delta * nb / total
                self.count += nb
        std = (self.m2 / self.count.clamp(min=1)).sqrt().clamp(min=1e-2) if self.count > 0 else torch.ones_like(self.mean)
        return ((x.float() - self.mean) / std).clamp(-10, 10)


class InstructUEJoint(L.LightningModule):
    """InstructUE trained jointly: next-token loss on the answer + masked InfoNCE between user and answer vectors."""

    def __init__(
        self,
        n_sources: int,
        n_tabular: int,
        model_path: str = MINILM,
        encoder_path: str = MINILM,
        modality_encoders: bool = True,
        use_sequence: bool = True,
        use_tabular: bool = True,
        soft_tokens: int = 4,
        train_encoder: bool = False,
        lora: bool = True,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_targets: list[str] | None = None,
        pooling: str = "user_token",
        alpha_lm: float = 1.0,
        alpha_cl: float = 1.0,
        temperature: float = 0.07,
        margin: float = 0.1,
        user_answer_negatives: bool = True,
        user_user_negatives: bool = True,
        answer_answer_negatives: bool = True,
        lr: float = 2e-4,
        betas: tuple[float, float] | list[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        attn_implementation: str | None = None,
        encoder_cache: bool = True,
    ):
        super().__init__()
        betas = [float(b) for b in betas]  # plain types for save_hyperparameters: weights_only=True loading
        lora_targets = [str(t) for t in lora_targets] if lora_targets is not None else None
        check_instruct_ue(pooling, alpha_lm, alpha_cl, temperature, use_sequence, use_tabular, soft_tokens, betas)
        self.save_hyperparameters()
        tok = llm_tokenizer(model_path)
        llm = load_causal_lm(model_path, attn_implementation)
        self.user_token_id = add_user_row(llm, tok, model_path)
        hidden = llm.config.hidden_size
        self.max_positions = getattr(llm.config, "max_position_embeddings", None)
        if lora:
            llm = with_lora(llm, lora_r, lora_alpha, lora_dropout, lora_targets)
            weight = llm.get_input_embeddings().weight
            only_user = torch.zeros(weight.shape[0], 1)
            only_user[self.user_token_id] = 1.0
            weight.requires_grad_(True)
            weight.register_hook(lambda grad: grad * only_user.to(grad.device, grad.dtype))
        self.llm = llm.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes
        self._head: Any = False  # answer_head(): built on first use
        self._head_checked = False
        k = soft_tokens
        self.encoder = self.source_adapters = self.standardize = self.tabular_adapter = None
        if modality_encoders and use_sequence:
            from transformers import AutoModel

            path = resolve_model_path(encoder_path, "model.encoder_path")
            self.encoder = AutoModel.from_pretrained(path, local_files_only=True, is_decoder=False, add_pooling_layer=False)
            self.encoder.requires_grad_(train_encoder)
            self.source_adapters = nn.ModuleList(nn.Linear(self.encoder.config.hidden_size, hidden) for _ in range(n_sources))
        # a frozen encoder's chunk means are a pure function of a source's token ids: kept per distinct input
        # (not a buffer: never in a checkpoint; emptied when other encoder weights are loaded)
        self.encoder_cache: dict[bytes, torch.Tensor] | None = {} if self.encoder is not None and encoder_cache and not train_encoder else None
        if modality_encoders and use_tabular:
            self.standardize = Standardizer(n_tabular)
            self.tabular_adapter = nn.Sequential(nn.Linear(n_tabular, hidden), nn.GELU(), nn.Linear(hidden, k * hidden))

    def train(self, mode: bool = True) -> InstructUEJoint:
        """A frozen encoder stays in eval mode (no dropout) whatever the trainer asks."""
        super().train(mode)
        if self.encoder is not None and not self.hparams.train_encoder:
            self.encoder.eval()
        return self

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Loading other encoder weights empties the encoder cache (its entries came from the weights before); loading the
        same frozen encoder (the best checkpoint after fit) keeps it."""
        before = self.encoder_identity() if self.encoder_cache else None
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if before is not None and self.encoder_identity() != before:
            self.encoder_cache.clear()
        return out

    def encode_sources(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N, k, De] float32: the encoder's states of N source texts cut into k chunks and averaged (`chunk_means`)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.hparams.train_encoder):
            states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            return chunk_means(states.float(), mask.bool(), self.hparams.soft_tokens)

    @staticmethod
    def cache_keys(ids: torch.Tensor, mask: torch.Tensor) -> list[bytes]:
        """One key per row: a 16-byte digest of its real (unpadded) token ids."""
        ids, lengths = ids.cpu().numpy(), mask.sum(1).cpu().numpy()
        return [hashlib.blake2b(ids[i, : lengths[i]].astype("int64").tobytes(), digest_size=16).digest() for i in range(len(ids))]

    def cached_sources(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`encode_sources` through the cache: rows never seen are encoded together (trimmed to their longest) and kept."""
        keys = self.cache_keys(ids, mask)
        cache = self.encoder_cache
        missing = list(dict.fromkeys(i for i, key in enumerate(keys) if key not in cache))
        if missing:
            rows = torch.tensor(missing, device=ids.device)
            width = int(mask[rows].sum(1).max())
            with torch.no_grad():
                out = self.encode_sources(ids[rows, :width], mask[rows, :width]).cpu()
            for j, i in enumerate(missing):
                cache.setdefault(keys[i], out[j].clone())
        return torch.stack([cache[key] for key in keys]).to(ids.device)

    @torch.no_grad()
    def fill_encoder_cache(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Encode every (ids, mask) batch of source texts into the cache up front (eval mode); returns the entries added."""
        if self.encoder_cache is None:
            return 0
        before = len(self.encoder_cache)
        self.encoder.eval()
        for ids, mask in batches:
            self.cached_sources(ids.to(self.device), mask.to(self.device))
        return len(self.encoder_cache) - before

    def encoder_identity(self) -> str:
        """sha256 of what the cached values depend on: the soft token count and every encoder weight and buffer."""
        digest = hashlib.sha256(f"chunk_means k={self.hparams.soft_tokens}".encode())
        for name, tensor in [*self.encoder.named_parameters(), *self.encoder.named_buffers()]:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:24]

    def save_encoder_cache(self, path: Path) -> None:
        """The cache as one safetensors file (keys [N, 16] uint8, values [N, k, De] float32), written atomically."""
        from datamodules.atomic import atomic_write

        keys = torch.tensor([list(k) for k in self.encoder_cache], dtype=torch.uint8)
        values = torch.stack(list(self.encoder_cache.values()))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({"keys": keys, "values": values.contiguous()}, str(tmp)))

    def load_encoder_cache(self, path: Path) -> int:
        """Add a saved cache's entries (a file of this very encoder: `encoder_identity` names it); returns how many."""
        saved = load_file(str(path))
        before = len(self.encoder_cache)
        for key, value in zip(saved["keys"].numpy(), saved["values"]):
            self.encoder_cache.setdefault(key.tobytes(), value)
        return len(self.encoder_cache) - before

    def on_fit_start(self) -> None:
        """Fill the encoder cache with every source text the datamodule will feed (training, validation, embedding).

        The chunk means persist in `<data.cache_dir>/../instructue_encoder/<encoder_identity>.safetensors`, so the next run with the
        same frozen encoder (an ablation, a resumed run) reads them instead of running the encoder again.
        """
        dm = getattr(self.trainer, "datamodule", None)
        if self.encoder_cache is None or not hasattr(dm, "encoder_batches"):
            return
        started = time.perf_counter()
        path = Path(dm.events.cfg.cache_dir).parent / "instructue_encoder" / f"{self.encoder_identity()}.safetensors"
        loaded = self.load_encoder_cache(path) if path.is_file() else 0
        added = self.fill_encoder_cache(dm.encoder_batches())
        if added and self.trainer.is_global_zero:
            self.save_encoder_cache(path)
        log.info("encoder cache: %d source texts read from %s, %d encoded, in %.0f s before training", loaded, path, added, time.perf_counter() - started)

    def soft_inputs(self, batch: dict) -> torch.Tensor | None:
        """[B, blocks * k, H]: each source's soft tokens in input order, the tabular block's last; None in text-only mode."""
        k, parts = self.hparams.soft_tokens, []
        if self.encoder is not None:
            if self.encoder_cache is not None:
                chunks = self.cached_sources(batch["enc_ids"], batch["enc_mask"])
            else:
                chunks = self.encode_sources(batch["enc_ids"], batch["enc_mask"])  # [B * S, k, De]
            chunks = chunks.view(len(batch["index"]), len(self.source_adapters), k, -1)
            parts += [adapter(chunks[:, s]) for s, adapter in enumerate(self.source_adapters)]
        if self.tabular_adapter is not None:
            out = self.tabular_adapter(self.standardize(batch["tabular"]))
            parts.append(out.view(len(out), k, -1))
        return torch.cat(parts, dim=1) if parts else None

    def final_states(
        self, batch: dict, logits_from: int | None = None, instruction: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-layer states [B, T, H] of the prompt(+answer) sequences and the logits of positions >= logits_from (else the last).

        `instruction` [n, H]: learnable instruction tokens written, in order, into each row's n
        `instruction_slots` positions (lit_modules/instruct_tuning.py makes them).
        """
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.max_positions is not None and ids.shape[1] > self.max_positions:
            raise ValueError(
                f"an input of {ids.shape[1]} tokens exceeds the {self.max_positions} positions of {self.hparams.model_path!r}; "
                "lower model.max_source_tokens, model.max_answer_tokens or model.budget"
            )
        embeds = self.llm.get_input_embeddings()(ids)
        soft = self.soft_inputs(batch)
        if soft is not None:
            b, t = (batch["slots"] >= 0).nonzero(as_tuple=True)
            embeds = embeds.index_put((b, t), soft[b, batch["slots"][b, t]].to(embeds.dtype))
        if instruction is not None:
            b, t = batch["instruction_slots"].nonzero(as_tuple=True)  # row-major: each row's n slots in order
            embeds = embeds.index_put((b, t), instruction.to(embeds.dtype).repeat(len(ids), 1))
        keep = 1 if logits_from is None else ids.shape[1] - logits_from
        out = self.llm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=padded_position_ids(mask), output_hidden_states=True,
            use_cache=False, logits_to_keep=keep,
        )  # fmt: skip
        return out.hidden_states[-1], out.logits

    def user_vectors(self, states: torch.Tensor, batch: dict) -> torch.Tensor:
        """[B, H] float32: the state at <USER>, or the mean over the prompt (every real token up to <USER>)."""
        pos = batch["user_pos"]
        if self.hparams.pooling == "user_token":
            return states[torch.arange(len(states), device=states.device), pos].float()
        prompt = batch["attention_mask"].bool() & (torch.arange(states.shape[1], device=states.device)[None] <= pos[:, None])
        return masked_mean(states.float(), prompt)

    def answer_vectors(self, batch: dict) -> torch.Tensor:
        """[B, H]: the LLM's final state at the last token of each answer read alone."""
        if "answer_ids" not in batch:
            raise ValueError("the contrastive loss needs every example's answer (answer_ids); embedding batches have none")
        mask = batch["answer_mask"]
        out = self.llm(
            input_ids=batch["answer_ids"], attention_mask=mask, position_ids=padded_position_ids(mask), output_hidden_states=True,
            use_cache=False, logits_to_keep=1,
        )  # fmt: skip
        return last_real(out.hidden_states[-1].float(), mask.bool())

    def answer_head(self) -> Any:
        """hidden [N, H] -> logits [N, V] of the backbone's own LM head, or None where it cannot be rebuilt here.

        BERT-style heads transform the states first (`cls.predictions.transform`). Under LoRA, a head tied to the
        input embeddings multiplies by the detached matrix plus a zero-valued term carrying `<USER>`'s row, so
        backward computes the one row's gradient the hook keeps instead of the whole matrix's. `losses` checks the
        head once against the model's own logits and falls back to them if they differ.
        """
        if self._head is not False:
            return self._head
        out = self.llm.get_output_embeddings()
        base = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        transform = getattr(getattr(getattr(base, "cls", None), "predictions", None), "transform", None)
        pre = transform if transform is not None else (lambda h: h)
        if type(out) is not nn.Linear:
            self._head = None
        elif self.hparams.lora and out.weight is self.llm.get_input_embeddings().weight:
            user = self.user_token_id

            def head(h: torch.Tensor) -> torch.Tensor:
                x = pre(h)
                w = out.weight
                logits = nn.functional.linear(x, w.detach(), out.bias)
                row = w[user] - w[user].detach()  # zero: the value is unchanged, the gradient reaches <USER>'s row only
                return logits.index_add(1, torch.tensor([user], device=x.device), (x @ row)[:, None])

            self._head = head
        else:
            self._head = lambda h: out(pre(h))
        return self._head

    def head_agrees(self, head: Any, states: torch.Tensor, logits: torch.Tensor) -> bool:
        """Once per module: does `head` on the last position's states give the model's own last-position logits?"""
        if not self._head_checked:
            with torch.no_grad():
                ours = head(states[:, -1]).float()
            self._head_checked = True
            if not torch.allclose(ours, logits[:, -1].float(), rtol=1e-4, atol=1e-4):
                log.warning("InstructUE: the rebuilt LM head differs from %s's logits; computing every position's logits instead", self.hparams.model_path)
                self._head = None
                return False
        return True

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """The weighted parts: lm = alpha_lm * next-token loss on the answer, cl = alpha_cl * masked InfoNCE (a part with weight 0 is skipped)."""
        hp = self.hparams
        head = self.answer_head() if hp.alpha_lm > 0 else None
        states, logits = self.final_states(batch, int(batch["user_pos"].min()) if hp.alpha_lm > 0 and head is None else None)
        if head is not None and not self.head_agrees(head, states, logits):
            head = None
            states, logits = self.final_states(batch, int(batch["user_pos"].min()))
        parts = {}
        if hp.alpha_lm > 0 and head is not None:  # the head only at the answer positions
            parts["lm"] = hp.alpha_lm * answer_lm_loss_at(states, batch["labels"], head)
        elif hp.alpha_lm > 0:
            parts["lm"] = hp.alpha_lm * answer_lm_loss(logits, batch["labels"][:, -logits.shape[1] :])
        if hp.alpha_cl > 0:
            users, answers = self.user_vectors(states, batch), self.answer_vectors(batch)
            parts["cl"] = hp.alpha_cl * masked_info_nce(
                users, answers, hp.temperature, hp.margin, hp.user_answer_negatives, hp.user_user_negatives, hp.answer_answer_negatives
            )
        return parts

    def embed(self, batch: dict, instruction: torch.Tensor | None = None) -> torch.Tensor:
        """User vectors [B, H] float32 in batch order, for the instruction the batch was built with (call in eval mode),
        or for tuned instruction tokens [n, H] put in the batch's `instruction_slots`."""
        states, _ = self.final_states(batch, instruction=instruction)
        return self.user_vectors(states, batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return log_losses(self, self.losses(batch), "train", len(batch["index"]))

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return log_losses(self, self.losses(batch), "val", len(batch["index"]))

    def predict_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> torch.Tensor:
        return self.embed(batch)

    def param_groups(self) -> list[dict]:
        """Trainable parameters; the embedding matrix apart without weight decay (under LoRA only its <USER> row gets
        gradients, and decay would still shrink every frozen row)."""
        emb = self.llm.get_input_embeddings().weight
        rest = [p for p in self.parameters() if p.requires_grad and p is not emb]
        return [{"params": rest}] + ([{"params": [emb], "weight_decay": 0.0}] if emb.requires_grad else [])

    def configure_optimizers(self) -> Any:
        """AdamW with warmup and cosine decay over `param_groups`."""
        hp = self.hparams
        return adamw_with_schedule(self, self.param_groups(), hp.lr, hp.weight_decay, tuple(hp.betas), hp.warmup_steps, schedule="cosine")
