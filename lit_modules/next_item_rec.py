"""UQABench's user encoders, pretrained on next-item prediction ("UQABench", Liu et al. 2025).

Each event's item goes through `ItemInput` (id + side ids + text bag -> width), an encoder
from `seq_encoders` reads the sequence causally, and the state at every position predicts
the next item: a softmax over the tied item table (`ItemInput` applied to every item id,
or to sampled negatives) or InfoNCE against the other next items of the batch. The user
vector is the state at the user's last real event (or the mean over real events): causal
encoders on right-padded sequences make it independent of padding and batch mates.
"""

from __future__ import annotations

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F

from datamodules.schema import FIRST_ID
from lit_modules.contract import adamw_with_schedule, log_losses
from lit_modules.next_event_gpt import take_windows
from lit_modules.next_item_rec_config import check_next_item_rec
from lit_modules.seq_encoders import ItemInput, build_encoder, pool


class NextItemRec(L.LightningModule):
    """Item input -> causal encoder -> next-item loss at every position; Recall@K / NDCG@K on val users' held-out items.

    Held-out items follow leave-one-out: each epoch logs val/recall@K and val/ndcg@K of every val
    user's second-to-last item; after fit, `run_metrics` adds them to metrics.json together with
    test/recall@K and test/ndcg@K of the last item, which no per-epoch metric reads.

    Arguments: the keys of `NextItemRecConfig` (docs there) plus what its `data_args` derives:
    `n_items` and `side_sizes` (vocabulary sizes) and the per-item tables `side_table`
    [n_items, S] and `text_table` [n_items, text_len] (numpy or tensors; saved as buffers,
    not hyperparameters, so a finished run rebuilt without data gets them from its weights).
    """

    def __init__(
        self,
        n_items: int,
        side_sizes: list[int],
        side_table: np.ndarray,
        text_table: np.ndarray,
        encoder: str = "trm",
        item_field: str = "item",
        side_fields: list[str] | tuple[str, ...] = ("genre", "year"),
        text_field: str | None = "title",
        item_inputs: str = "full",
        text_vocab: int = 4096,
        text_len: int = 16,
        id_dim: int = 64,
        side_dim: int = 16,
        text_dim: int = 32,
        hidden: int = 64,
        layers: int = 2,
        heads: int = 2,
        dropout: float = 0.1,
        max_len: int = 50,
        state_size: int = 16,
        conv_kernel: int = 4,
        expand: int = 2,
        objective: str = "supervised",
        sampled_negatives: int | None = None,
        temperature: float = 0.1,
        pooling: str = "last",
        top_k: list[int] | tuple[int, ...] = (10, 20),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        schedule: str = "constant",
    ):
        super().__init__()
        n_items, side_sizes = int(n_items), [int(n) for n in side_sizes]
        side_fields, top_k = [str(f) for f in side_fields], [int(k) for k in top_k]
        sampled_negatives = None if sampled_negatives is None else int(sampled_negatives)
        self.save_hyperparameters(ignore=["side_table", "text_table"])  # plain types only; the tables are buffers
        check_next_item_rec(self.hparams)
        if n_items <= FIRST_ID:
            raise ValueError(f"model.item_field: {item_field!r} has no item ids (vocabulary size {n_items})")
        side_table, text_table = torch.as_tensor(np.asarray(side_table)), torch.as_tensor(np.asarray(text_table))
        if side_table.shape != (n_items, len(side_sizes)) or text_table.ndim != 2 or len(text_table) != n_items:
            raise ValueError(f"item tables of shapes {tuple(side_table.shape)}, {tuple(text_table.shape)} do not fit {n_items} items: build the model through its config's data_args")
        self.item_input = ItemInput(n_items, side_sizes, text_vocab, text_table.shape[1], hidden, id_dim, side_dim, text_dim, item_inputs)
        self.item_input.set_tables(side_table, text_table)
        self.encoder = build_encoder(encoder, hidden, layers, heads, dropout, max_len, state_size, conv_kernel, expand)

    # ---------------------------------------------------------------- forward

    def states(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(items [B, T], lengths [B], states [B, T, hidden]) of each user's last `max_len` events."""
        items = batch["tokens"][self.hparams.item_field].to(self.device)
        lengths = batch["lengths"].to(self.device)
        n = self.hparams.max_len
        if lengths.max() > n:
            cut = lengths.clamp(max=n)
            items, lengths = take_windows(items, lengths - cut, cut), cut
        else:  # only pad columns lie beyond max_len
            items = items[:, :n]
        return items, lengths, self.encoder(self.item_input(items), lengths)

    def item_table(self) -> torch.Tensor:
        """[n_items, hidden]: every item id through the item input (the tied output table)."""
        return self.item_input(torch.arange(self.hparams.n_items, device=self.device))

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """[N, n_items] logits of every item for states h [N, hidden]; reserved ids (pad, missing, rare, ...) at -inf."""
        logits = h @ self.item_table().T
        return logits.masked_fill(torch.arange(logits.shape[1], device=h.device) < FIRST_ID, float("-inf"))

    def embed(self, batch: dict) -> torch.Tensor:
        """User vectors [B, hidden] float32 (`pooling` over the states); call in eval mode."""
        _, lengths, h = self.states(batch)
        return pool(h, lengths, self.hparams.pooling).float()

    # ---------------------------------------------------------------- losses

    def losses(self, batch: dict, train: bool = False, computed: tuple | None = None) -> dict[str, torch.Tensor]:
        """{"next_item": loss}: each state predicts the next real item (ids >= FIRST_ID), averaged over those targets.

        Supervised: cross-entropy over all items, or (training with `sampled_negatives`) over the
        true item and shared uniform negatives. Contrastive: InfoNCE between the normalised state
        and the normalised next items of all positions of the batch, temperature `temperature`;
        another position with the same next item is not counted as a negative. `computed`: the
        batch's `states(batch)` when the caller already has them (validation reuses them for metrics).
        """
        items, lengths, h = computed if computed is not None else self.states(batch)
        out, target = next_item_pairs(items, lengths, h)
        if len(target) == 0:  # only 1-event users: nothing to predict
            return {"next_item": h.sum() * 0.0}
        hp = self.hparams
        if hp.objective == "contrastive":
            q, p = F.normalize(out, dim=-1), F.normalize(self.item_input(target), dim=-1)
            logits = q @ p.T / hp.temperature
            same = (target[:, None] == target[None, :]) & ~torch.eye(len(target), dtype=torch.bool, device=h.device)
            labels = torch.arange(len(target), device=h.device)
            return {"next_item": F.cross_entropy(logits.masked_fill(same, float("-inf")), labels)}
        k = hp.sampled_negatives
        if train and k is not None:
            negatives = torch.randint(FIRST_ID, hp.n_items, (k,), device=h.device)
            cand = self.item_input(torch.cat([target, negatives]))
            true = (out * cand[: len(target)]).sum(-1, keepdim=True)
            neg = (out @ cand[len(target):].T).masked_fill(negatives[None, :] == target[:, None], float("-inf"))
            zeros = torch.zeros(len(target), dtype=torch.long, device=h.device)
            return {"next_item": F.cross_entropy(torch.cat([true, neg], dim=1), zeros)}
        return {"next_item": F.cross_entropy(self.scores(out), target)}

    def heldout_metrics(self, items: torch.Tensor, lengths: torch.Tensor, h: torch.Tensor, skip: int = 0) -> dict[str, torch.Tensor]:
        """Per user with a real held-out item and an event before it: Recall@K and NDCG@K of that item from the state before it.

        The held-out item is the last (`skip=0`) or the one `skip` events before it: the causal
        state before it has read nothing after it, whatever follows in the batch.
        """
        last = lengths - 1 - skip
        keep = (last >= 1) & (items[torch.arange(len(lengths), device=h.device), last.clamp(min=0)] >= FIRST_ID)
        rows = torch.nonzero(keep).squeeze(1)
        target = items[rows, last[rows]]
        return recall_ndcg(self.scores(h[rows, last[rows] - 1]), target, self.hparams.top_k)

    @torch.no_grad()
    def run_metrics(self, datamodule) -> dict[str, float]:
        """With the current (best val/loss) weights, over every val user: `val/recall@K`, `val/ndcg@K` of the second-to-last
        item (what the validation loop logs each epoch) and `test/recall@K`, `test/ndcg@K` of the last item, which no
        selection metric reads (val/loss does read it, as one position among each val user's others)."""
        was_training = self.training
        self.eval()
        sums: dict[str, float] = {}
        counts = {"val": 0, "test": 0}
        for batch in datamodule.val_dataloader():
            items, lengths, h = self.states(batch)
            for split, skip in (("val", 1), ("test", 0)):
                metrics = self.heldout_metrics(items, lengths, h, skip)
                counts[split] += len(next(iter(metrics.values())))
                for name, per_user in metrics.items():
                    sums[f"{split}/{name}"] = sums.get(f"{split}/{name}", 0.0) + float(per_user.sum())
        self.train(was_training)
        out = {k: v / counts[k.split("/")[0]] for k, v in sums.items() if counts[k.split("/")[0]]}
        out.update({f"{split}/heldout_users": float(n) for split, n in counts.items()})
        return out

    # ---------------------------------------------------------------- lightning

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return log_losses(self, self.losses(batch, train=True), "train", len(batch["lengths"]))

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        items, lengths, h = self.states(batch)
        loss = log_losses(self, self.losses(batch, computed=(items, lengths, h)), "val", len(lengths))
        metrics = self.heldout_metrics(items, lengths, h, skip=1)  # the second-to-last item: the last is test/ (run_metrics)
        n = len(next(iter(metrics.values())))
        if n:
            for name, per_user in metrics.items():
                self.log(f"val/{name}", per_user.mean(), on_epoch=True, batch_size=n, sync_dist=True)
        return loss

    def predict_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> torch.Tensor:
        return self.embed(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        hp = self.hparams
        return adamw_with_schedule(self, self.parameters(), hp.lr, hp.weight_decay, warmup_steps=hp.warmup_steps, schedule=hp.schedule)


def next_item_pairs(items: torch.Tensor, lengths: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(states [N, D], next items [N]) of every position t with a real next item (t + 1 < length, id >= FIRST_ID)."""
    target = items[:, 1:]
    steps = torch.arange(target.shape[1], device=h.device)[None, :]
    has_next = (steps + 1 < lengths[:, None]) & (target >= FIRST_ID)
    return h[:, :-1][has_next], target[has_next]


def recall_ndcg(scores: torch.Tensor, target: torch.Tensor, ks: list[int]) -> dict[str, torch.Tensor]:
    """Per row: recall@K (1 if the target ranks in the top K) and NDCG@K (1 / log2(rank + 2) if so), rank counted from 0.

    The rank is the number of items scored strictly above the target: ties are resolved in the target's favour.
    """
    rank = (scores > scores.gather(1, target[:, None])).sum(1)
    gain = 1.0 / torch.log2(rank.float() + 2.0)
    out = {}
    for k in ks:
        hit = (rank < k).float()
        out[f"recall@{k}"], out[f"ndcg@{k}"] = hit, hit * gain
    return out
