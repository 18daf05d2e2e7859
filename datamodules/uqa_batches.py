"""UQABench question batches for UQAAlign: teacher-forced answers to train, one row per candidate to score.

One LLM sequence per question (per candidate when scoring), right-padded:

    [CLS/BOS] user: [K soft slots | the last N events as text] \\n question: Q \\n options: a; b; c; d \\n answer: [answer EOS]

`slots` marks the K positions the module fills with its adapter's soft tokens (K = 1 for the mean
adapter, `queries` for the Q-Former, 0 in text mode); the encoder reads the question's user from
the event store, cut at the question's `end` (`events`: the `Collator`'s batch with `lengths` = end
and every later token zeroed). Text mode renders the last `text_events` events before `end` with
InstructUE's formatter (one line per event) and keeps the newest tokens that fit the prompt budget.
`labels` are the answer tokens (IGNORE elsewhere): the loss reads nothing else. A scoring batch has
`row_question` (which question of the batch each row is), `cand_mask` (the candidate's tokens, the
ones its log-likelihood sums) and `prompt_len` (real prompt positions, a soft token counting one).

Users: questions of the training users train; the held-out (val) users are split by a seeded hash of
their id into VAL (validation loss: checkpoint selection) and TEST (the reported accuracy), so the
accuracy is never read on the users that chose the checkpoint. Tokenizers are objects the caller
loaded (experiments/build.py): the data side never loads models.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch

from datamodules.datamodule import EventDataModule, shard_of
from datamodules.instruct_batches import pad_rows
from datamodules.preprocess import Prepared
from datamodules.sequences import Collator
from datamodules.text_batches import IGNORE
from datamodules.user_history import History
from datamodules.user_inputs import InputConfig, UserFormatter
from datamodules.uqa_questions import Question, UQAConfig, build_questions

TEST_SHARE = 0.5  # of the held-out users: the rest is VAL (the validation loss)


def is_test_user(user_id: str, seed: int) -> bool:
    """Held-out users whose questions are scored (TEST); stable when users are added, seeded, independent of any answer.

    sha256, not the crc32 that picks the val users: crc32 is affine in its input, so a crc32 of
    another string of the same id would be correlated with that choice (it put no val user in TEST).
    """
    digest = hashlib.sha256(f"{seed}:uqa-test:{user_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") < TEST_SHARE * 2**32


def soft_count(config: Any) -> int:
    """Soft tokens per prompt: 1 (mean adapter), `queries` (Q-Former), 0 (text mode)."""
    return {"mean": 1, "qformer": config.queries, "text": 0}[config.mode]


def cut_events(batch: dict, ends: Sequence[int]) -> dict:
    """The Collator's batch read only up to each row's `end`: lengths = end, later tokens and values zeroed."""
    lengths = torch.minimum(batch["lengths"], torch.as_tensor(list(ends), dtype=torch.long))
    keep = torch.arange(batch["lengths"].max())[None, :] < lengths[:, None]
    return {
        **batch, "lengths": lengths,
        "tokens": {f: t * keep for f, t in batch["tokens"].items()},
        "values": {f: v * keep for f, v in batch["values"].items()},
        "codes": {f: c * keep[..., None] for f, c in batch["codes"].items()},
    }  # fmt: skip


class UQACollator:
    """collate_fn: `Question`s -> a training batch (`train=True`) or a candidate-scoring batch (see the module docstring)."""

    def __init__(self, tokenizer: Any, history: History, config: Any, scoring: bool = False):
        self.tok, self.history, self.scoring = tokenizer, history, scoring
        self.k, self.text = soft_count(config), config.mode == "text"
        self.max_answer = config.max_answer_tokens
        self.max_prompt = min(config.max_prompt_tokens, getattr(tokenizer, "model_max_length", None) or config.max_prompt_tokens)
        self.formatter = UserFormatter(history, InputConfig(budget=config.text_events)) if self.text else None
        self.events = Collator(history.store)
        first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        self.start = [] if first is None else [first]
        last = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.end = [] if last is None else [last]
        self.user_piece = self.ids("user:")

    def ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def user_text(self, row: int, end: int | None) -> str:
        """The last `text_events` events before `end` as text lines (text mode)."""
        return "\n".join(self.formatter.user_input(row, end=end).sources.values())

    def prompt(self, q: Question) -> tuple[list[int], list[bool]]:
        """(prompt ids, soft slot per position) of one question: everything before its answer."""
        options = "; ".join(q.candidates)
        tail = self.ids(f"\nquestion: {q.question}\noptions: {options}\nanswer:")
        if self.text:
            room = max(0, self.max_prompt - self.max_answer - len(self.start) - len(self.user_piece) - len(tail))
            body = self.ids(self.user_text(q.row, q.end))
            body = body[len(body) - min(room, len(body)) :]  # the newest tokens that fit
            ids = self.start + self.user_piece + body + tail
            return ids, [False] * len(ids)
        pad = self.tok.pad_token_id
        ids = self.start + self.user_piece + [pad] * self.k + tail
        slots = [False] * len(self.start + self.user_piece) + [True] * self.k + [False] * len(tail)
        return ids, slots

    def answer(self, text: str) -> list[int]:
        return self.ids(f" {text}")[: self.max_answer]

    def __call__(self, questions: Sequence[Question]) -> dict:
        prompts = [self.prompt(q) for q in questions]
        if self.scoring:  # one row per candidate; the candidate's tokens only (no EOS) make its likelihood
            rows, which, gold = [], [], []
            for i, (q, p) in enumerate(zip(questions, prompts)):
                for c in q.candidates:
                    rows.append((p, self.answer(c)))
                    which.append(i)
                    gold.append(c == q.answer)
        else:
            rows = [(p, self.answer(q.answer) + self.end) for q, p in zip(questions, prompts)]
        input_ids, mask = pad_rows([p[0] + a for p, a in rows], self.tok.pad_token_id)
        slots, _ = pad_rows([[int(s) for s in p[1]] + [0] * len(a) for p, a in rows], 0)
        answer_mask, _ = pad_rows([[0] * len(p[0]) + [1] * len(a) for p, a in rows], 0)
        labels = torch.where(answer_mask.bool(), input_ids, IGNORE)
        batch = {
            "index": torch.tensor([q.row for q in questions], dtype=torch.long),
            "input_ids": input_ids, "attention_mask": mask, "labels": labels, "slots": slots.bool(),
            "prompt_len": torch.tensor([len(p[0]) for p, _ in rows], dtype=torch.long),
        }  # fmt: skip
        if self.k:
            batch["events"] = cut_events(self.events([q.row for q in questions]), [q.end for q in questions])
        if self.scoring:
            batch["row_question"] = torch.tensor(which, dtype=torch.long)
            batch["gold"] = torch.tensor(gold, dtype=torch.bool)
            batch["cand_mask"] = answer_mask.bool()
        return batch


class UserTexts:
    """Map-style dataset for text-mode embedding: each row's last `text_events` events as a prompt, no question."""

    def __init__(self, collator: UQACollator, rows: np.ndarray):
        self.collator, self.rows = collator, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return int(self.rows[i])

    def collate(self, rows: Sequence[int]) -> dict:
        c = self.collator
        room = max(1, c.max_prompt - len(c.start) - len(c.user_piece))
        texts = [c.ids(c.user_text(r, None)) for r in rows]
        ids, mask = pad_rows([c.start + c.user_piece + t[len(t) - min(room, len(t)) :] for t in texts], c.tok.pad_token_id)
        return {"index": torch.tensor(list(rows), dtype=torch.long), "input_ids": ids, "attention_mask": mask}


class UQADataModule(L.LightningDataModule):
    """Train on the training users' questions, validate on the VAL users', score the TEST users'; embed every user.

    `config` is the method's UQAAlignConfig. Embedding goes through the event batches (align modes:
    the encoder and adapter) or the users' texts (text mode). train=False (a finished run embedding
    new data) builds no questions.
    """

    def __init__(self, events: EventDataModule, tokenizer: Any, config: Any, train: bool = True):
        super().__init__()
        self.events, self.tokenizer, self.config = events, tokenizer, config
        self._questions: tuple[Prepared, list[Question]] | None = None

    @property
    def data(self) -> Prepared:
        return self.events.data

    def history(self) -> History:
        return History.of(self.data)

    def questions(self) -> list[Question]:
        """Every user's questions, built once per prepared data."""
        if self._questions is None or self._questions[0] is not self.data:
            c = self.config
            qa = UQAConfig(self.events.seed, c.n_candidates, tuple(c.subtasks), c.held_out, c.short_window)
            self._questions = (self.data, build_questions(self.history(), qa))
        return self._questions[1]

    def split(self, part: str) -> list[Question]:
        """The questions of the training users ("train"), of the VAL or of the TEST held-out users."""
        val, seed = self.data.is_val, self.events.seed
        if part == "train":
            return [q for q in self.questions() if not val[q.row]]
        test = part == "test"
        return [q for q in self.questions() if val[q.row] and is_test_user(q.user_id, seed) == test]

    def loader(self, items: Sequence, train: bool, collate: Any, batch_size: int | None = None, shard: bool = True) -> torch.utils.data.DataLoader:
        rank, world = shard_of(self.trainer) if shard else (0, 1)
        sampler = None
        if world > 1:
            sampler = torch.utils.data.DistributedSampler(items, num_replicas=world, rank=rank, shuffle=train, seed=self.events.seed)
        return torch.utils.data.DataLoader(
            items, batch_size=batch_size or self.events.cfg.batch_size, shuffle=train and sampler is None, sampler=sampler,
            generator=torch.Generator().manual_seed(self.events.seed), collate_fn=collate, num_workers=self.events.cfg.num_workers,
        )  # fmt: skip

    def collator(self, scoring: bool = False) -> UQACollator:
        return UQACollator(self.tokenizer, self.history(), self.config, scoring)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(self.split("train"), True, self.collator())

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(self.split("val"), False, self.collator())

    def score_loader(self) -> torch.utils.data.DataLoader:
        """The TEST users' questions, one row per candidate, unsharded (rank 0 scores)."""
        return self.loader(self.split("test"), False, self.collator(scoring=True), self.config.eval_batch_size, shard=False)

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        if self.config.mode != "text":
            self.events.trainer = self.trainer
            return self.events.predict_dataloader()
        texts = UserTexts(self.collator(), np.arange(len(self.data.store)))
        return self.loader(texts, False, texts.collate)
