"""UQABench's alignment ("UQABench", Liu et al. 2025): a frozen user encoder speaks to an LLM through soft prompt tokens.

The encoder is a finished next_item_rec run's (loaded from its model.safetensors, every parameter
frozen, kept in eval mode). An adapter turns its states over the user's events (cut at the
question's `end`) into soft tokens of the LLM's width, written into the prompt's slots
(`datamodules.uqa_batches`): `MeanAdapter` (linear + masked mean: 1 token) or `QFormer` (`queries`
learned queries cross-attending the states, then linear: 16 tokens in the paper). Strategies
(`llm`): the adapter alone (LLM frozen), adapter + LoRA (peft, as LLM4ES), adapter + the whole LLM.
`mode=text` is the TextN baseline: no encoder, the last N events as text in the prompt.

Training: teacher-forced answers of the training users' questions, loss on the answer tokens only.
Scoring (`run_metrics`, after fit with the best val/loss weights, on the TEST held-out users):
each candidate's length-normalised log-likelihood given the prompt ranks the candidates
(`qa/<subtask>|<group>|overall/acc`), the reference code's prefix metric beside it
(`qa_prefix/...`, see `prefix_hit`) and the prompt length (`qa/prompt_tokens`).
The user embedding (`embed`) is the mean of the soft tokens (text mode: the LLM's last hidden
layer averaged over the user's text).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.uqa_questions import GROUPS, Question
from lit_modules.contract import adamw_with_schedule, log_losses
from lit_modules.llm4es import masked_mean, next_token_loss, padded_position_ids
from lit_modules.lm import MINILM, load_causal_lm, with_lora
from lit_modules.uqa_align_config import check_uqa_align

log = logging.getLogger(__name__)


class MeanAdapter(nn.Module):
    """Linear to the LLM width, then the mean over real events: one soft token [B, 1, W]; pads never enter (`where`)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, h: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        return masked_mean(self.proj(h), real)[:, None, :]


class QFormerBlock(nn.Module):
    """Pre-norm: self-attention over the queries, cross-attention from the queries to the real encoder states, MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, q: torch.Tensor, h: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        x = self.norm_self(q)
        q = q + self.self_attn(x, x, x, need_weights=False)[0]
        q = q + self.cross_attn(self.norm_cross(q), h, h, key_padding_mask=~real, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q))


class QFormer(nn.Module):
    """`queries` learned queries cross-attend the encoder states; each comes out as one soft token [B, queries, W]."""

    def __init__(self, d_in: int, d_out: int, queries: int = 16, layers: int = 1, heads: int = 2):
        super().__init__()
        if d_in % heads:
            raise ValueError(f"model.qformer_heads ({heads}) must divide the encoder width ({d_in})")
        self.queries = nn.Parameter(torch.randn(queries, d_in) * 0.02)
        self.blocks = nn.ModuleList(QFormerBlock(d_in, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_in)
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, h: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        q = self.queries[None].expand(len(h), -1, -1)
        for block in self.blocks:
            q = block(q, h, real)
        return self.proj(self.norm(q))


def candidate_scores(logits: torch.Tensor, input_ids: torch.Tensor, cand_mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """[N] mean log-probability of each row's candidate tokens (`cand_mask`) given everything before them.

    `logits` [N, T - offset, V] are the outputs at positions offset.. (each predicts the next token);
    the softmax runs only where a candidate token is predicted.
    """
    target, mask = input_ids[:, offset + 1 :], cand_mask[:, offset + 1 :]
    picked = logits[:, :-1][mask].float()  # [M, V]: the positions right before candidate tokens
    logp = F.log_softmax(picked, dim=-1).gather(-1, target[mask][:, None]).squeeze(-1)
    rows = torch.nonzero(mask)[:, 0]
    sums = torch.zeros(len(input_ids), device=logits.device).index_add_(0, rows, logp)
    return sums / mask.sum(1).clamp(min=1)


def ranked_choice(scores: torch.Tensor, row_question: torch.Tensor, n_questions: int) -> torch.Tensor:
    """[N] bool: the row each question picks (highest score among its rows; a tie goes to its first row)."""
    best = torch.full((n_questions,), float("-inf"), dtype=scores.dtype, device=scores.device).scatter_reduce(0, row_question, scores, "amax")
    top = scores == best[row_question]
    first = torch.full((n_questions,), len(scores), device=scores.device).scatter_reduce(
        0, row_question, torch.where(top, torch.arange(len(scores), device=scores.device), len(scores)), "amin"
    )
    return torch.arange(len(scores), device=scores.device) == first[row_question]


def prefix_hit(generated: str, answer: str) -> bool:
    """The reference code's metric: one token generated greedily is a hit when it starts with the gold answer.

    Since only ONE token is generated, an answer that takes several tokens can never be credited
    (a trajectory "from Drama to Comedy", three genres, most titles): it scores 0 whatever the model
    believes. Compared without case and outer spaces (MiniLM's tokenizer is uncased). Kept and labelled
    `qa_prefix/...` only to compare with the paper's numbers; `qa/...` (likelihood ranking) is the accuracy.
    """
    out, gold = generated.strip().lower(), answer.strip().lower()
    return bool(gold) and out.startswith(gold)


def qa_metrics(questions: Sequence[Question], correct: Sequence[bool], prefix: Sequence[bool], prompt_tokens: Sequence[int]) -> dict[str, float]:
    """Accuracy per sub-task, per group (over the group's questions) and overall, for both metrics; mean prompt tokens."""
    buckets: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        for key in (q.subtask, GROUPS[q.subtask], "overall"):
            buckets[key].append(i)
    out: dict[str, float] = {}
    for key, idx in buckets.items():
        out[f"qa/{key}/acc"] = sum(bool(correct[i]) for i in idx) / len(idx)
        out[f"qa_prefix/{key}/acc"] = sum(bool(prefix[i]) for i in idx) / len(idx)
    out["qa/prompt_tokens"] = float(sum(prompt_tokens) / max(len(prompt_tokens), 1))
    out["qa/questions"] = float(len(questions))
    return out


class UQAAlign(L.LightningModule):
    """Frozen encoder -> adapter -> soft prompt -> LLM answering UQABench questions; or TextN (`mode=text`).

    Arguments: the keys of `UQAAlignConfig` (docs there) but its `data_keys`, plus `encoder_run`
    (the encoder's run directory, resolved by the config's `data_args`; None in text mode).
    """

    def __init__(
        self,
        encoder_run: str | None,
        mode: str = "mean",
        model_path: str = MINILM,
        llm: str = "frozen",
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_targets: list[str] | None = None,
        queries: int = 16,
        qformer_layers: int = 1,
        qformer_heads: int = 2,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        schedule: str = "constant",
    ):
        super().__init__()
        lora_targets = [str(t) for t in lora_targets] if lora_targets is not None else None
        encoder_run = None if encoder_run is None else str(encoder_run)
        self.save_hyperparameters()
        check_uqa_align(self.hparams)
        model = load_causal_lm(model_path)
        width = model.config.hidden_size
        if llm == "frozen":
            model.requires_grad_(False)
        elif llm == "lora":
            model = with_lora(model, lora_r, lora_alpha, lora_dropout, lora_targets)
        self.llm = model.train() if llm != "frozen" else model.eval()
        self.encoder, self.adapter = None, None
        if mode != "text":
            if encoder_run is None:
                raise ValueError(f"model.mode={mode} needs an encoder run (model.encoder_experiment)")
            from experiments.finished_run import load_run

            encoder = load_run(encoder_run).module
            encoder.requires_grad_(False)
            self.encoder = encoder.eval()
            d_enc = int(encoder.hparams.hidden)
            self.adapter = MeanAdapter(d_enc, width) if mode == "mean" else QFormer(d_enc, width, queries, qformer_layers, qformer_heads)

    def train(self, mode: bool = True) -> UQAAlign:
        """The frozen parts stay in eval mode (no dropout) whatever the trainer asks."""
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        if self.hparams.llm == "frozen":
            self.llm.eval()
        return self

    # ---------------------------------------------------------------- forward

    def soft_tokens(self, events: dict) -> torch.Tensor:
        """[B, K, W] adapter output over the frozen encoder's states of each user's events."""
        with torch.no_grad():
            _, lengths, h = self.encoder.states(events)
        real = torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]
        return self.adapter(h, real)

    def forward(self, batch: dict, **kwargs) -> object:
        """The LLM's output on the batch's rows, soft tokens written into the `slots` positions."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        emb = self.llm.get_input_embeddings()(ids)
        if self.adapter is not None and "events" in batch:
            soft = self.soft_tokens(batch["events"])
            if "row_question" in batch:  # scoring: one row per candidate
                soft = soft[batch["row_question"]]
            emb = emb.masked_scatter(batch["slots"][..., None], soft.to(emb.dtype))
        return self.llm(inputs_embeds=emb, attention_mask=mask, position_ids=padded_position_ids(mask), use_cache=False, **kwargs)

    def loss(self, batch: dict) -> torch.Tensor:
        """Next-token cross-entropy on the answer tokens only (labels are IGNORE everywhere else)."""
        return next_token_loss(self(batch).logits, batch["labels"])

    def embed(self, batch: dict) -> torch.Tensor:
        """User vectors [B, W] float32: the soft tokens' mean (align modes; event batches) or the LLM's last layer over the user's text."""
        if self.adapter is not None:
            return self.soft_tokens(batch).mean(1).float()
        out = self(batch, output_hidden_states=True, logits_to_keep=1)  # the LM head is not needed here
        return masked_mean(out.hidden_states[-1].float(), batch["attention_mask"].bool())

    # ---------------------------------------------------------------- scoring

    @torch.no_grad()
    def score(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per question of a scoring batch: (likelihood ranking right [Q] bool, greedy next token after the prompt [Q], prompt tokens [Q])."""
        offset = int(batch["prompt_len"].min()) - 1  # the LM head runs only from the last prompt position of the shortest prompt on
        logits = self(batch, logits_to_keep=batch["input_ids"].shape[1] - offset).logits
        n = len(batch["index"])
        rows = batch["row_question"]
        chosen = ranked_choice(candidate_scores(logits, batch["input_ids"], batch["cand_mask"], offset), rows, n)
        right = torch.zeros(n, dtype=torch.bool, device=logits.device).index_put_((rows[chosen],), batch["gold"][chosen])
        first = torch.zeros(n, dtype=torch.long, device=logits.device).scatter_reduce(0, rows, torch.arange(len(rows), device=rows.device), "amin", include_self=False)
        greedy = logits[first, batch["prompt_len"][first] - 1 - offset].argmax(-1)
        return right, greedy, batch["prompt_len"][first]

    def run_metrics(self, datamodule) -> dict[str, float]:
        """Scores the TEST users' questions with the current (best) weights: `qa/...`, `qa_prefix/...`, `qa/prompt_tokens`."""
        loader = datamodule.score_loader()
        questions = list(loader.dataset)
        if not questions:
            log.warning("UQA: no TEST user question to score")
            return {"qa/questions": 0.0}
        was_training = self.training
        self.eval()
        right, prefix, tokens = [], [], []
        done = 0
        for batch in loader:
            batch = to_device(batch, self.device)
            r, greedy, p = self.score(batch)
            for i, tok in enumerate(greedy.tolist()):
                prefix.append(prefix_hit(datamodule.tokenizer.decode([tok]), questions[done + i].answer))
            right += r.tolist()
            tokens += p.tolist()
            done += len(r)
        self.train(was_training)
        out = qa_metrics(questions, right, prefix, tokens)
        log.info("UQA: %d TEST questions, accuracy %.3f (prefix metric %.3f), %.1f prompt tokens", len(questions), out["qa/overall/acc"], out["qa_prefix/overall/acc"], out["qa/prompt_tokens"])
        return out

    # ---------------------------------------------------------------- lightning

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return log_losses(self, {"answer": self.loss(batch)}, "train", len(batch["input_ids"]))

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return log_losses(self, {"answer": self.loss(batch)}, "val", len(batch["input_ids"]))

    def predict_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> torch.Tensor:
        return self.embed(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        return adamw_with_schedule(self, params, hp.lr, hp.weight_decay, warmup_steps=hp.warmup_steps, schedule=hp.schedule)


def to_device(batch: dict, device: torch.device) -> dict:
    """A (nested) batch dict's tensors on `device`."""
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
