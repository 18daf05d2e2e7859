"""InstructUE batches: UserQA triples (training, validation) and whole histories with an instruction (embedding).

One LLM sequence per user, right-padded:

    [BOS/CLS] <ratings>\\n [k soft slots | the source's text tokens] \\n</ratings>\\n ... <tabular>\\n [...] \\n</tabular>\\n
    Instruction: ...\\n <USER> [answer tokens EOS/SEP]

With modality encoders each block's body is `soft_tokens` placeholder positions (`slots` >= 0 says
which soft token of the row goes there; the module writes the adapters' outputs into them) and
the source texts go to the encoder tokenizer instead (`enc_ids`, `enc_mask`: [B * sources, Te]);
the tabular vector goes as numbers (`tabular`). Without them (text-only) every block is text. Each
source text keeps its newest `max_source_tokens` tokens (the formatter already keeps whole newest
events up to `budget`), the tabular text its first ones, an answer its first `max_answer_tokens`.
`labels` are the answer tokens (IGNORE elsewhere); `answer_ids` / `answer_mask` hold each answer
alone ([BOS] answer [EOS]) for the answer embedding. Tokenizers are objects the caller loaded
(`lit_modules.instruct_ue_tokens.load_tokenizers`): the data side never loads models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch

from datamodules.datamodule import EventDataModule, shard_of
from datamodules.preprocess import Prepared
from datamodules.text_batches import IGNORE
from datamodules.user_history import History
from datamodules.user_inputs import INSTRUCTION_PREFIX, TABULAR, InputConfig, UserFormatter, UserInput, close_tag, open_tag
from datamodules.userqa import QATriple, UserQAConfig, UserQADataset, build_userqa


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded LongTensor [B, T] and its 0/1 mask."""
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), value, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return out, mask


class InstructCollator:
    """collate_fn: `UserInput`s -> an InstructUE batch (see the module docstring for the layout)."""

    def __init__(self, tokenizer: Any, encoder_tokenizer: Any | None, user_token_id: int, config: Any, with_answers: bool):
        self.tok, self.enc_tok, self.user_id, self.with_answers = tokenizer, encoder_tokenizer, user_token_id, with_answers
        self.encoders, self.k = config.modality_encoders, config.soft_tokens
        self.use_sequence, self.use_tabular = config.use_sequence, config.use_tabular
        self.max_source, self.max_answer = config.max_source_tokens, config.max_answer_tokens
        first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        self.start = [] if first is None else [first]
        last = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.end = [] if last is None else [last]
        self._pieces: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def piece(self, text: str) -> list[int]:
        """Token ids of a fixed delimiter string, tokenized once."""
        if text not in self._pieces:
            self._pieces[text] = self.ids(text)
        return self._pieces[text]

    def blocks(self, item: UserInput) -> list[tuple[str, str]]:
        return [(n, t) for n, t in item.blocks() if (self.use_tabular if n == TABULAR else self.use_sequence)]

    def sequence(self, item: UserInput) -> tuple[list[int], list[int], int, list[int]]:
        """(input ids, soft slot per position (-1: a real token), position of <USER>, answer ids) of one input."""
        ids, slots, slot = list(self.start), [-1] * len(self.start), 0

        def add(tokens: list[int]) -> None:
            ids.extend(tokens)
            slots.extend([-1] * len(tokens))

        for name, text in self.blocks(item):
            add(self.piece(f"{open_tag(name)}\n"))
            if self.encoders:
                ids.extend([self.tok.pad_token_id] * self.k)
                slots.extend(range(slot, slot + self.k))
                slot += self.k
            else:
                body = self.ids(text)
                add(body[: self.max_source] if name == TABULAR else body[-self.max_source :])
            add(self.piece(f"\n{close_tag(name)}\n"))
        if item.instruction:
            add(self.ids(f"{INSTRUCTION_PREFIX}{item.instruction}\n"))
        user_pos = len(ids)
        add([self.user_id])
        answer = self.ids(item.answer)[: self.max_answer] + self.end if self.with_answers and item.answer is not None else []
        return ids, slots, user_pos, answer

    def __call__(self, items: Sequence[UserInput]) -> dict:
        seqs = [self.sequence(it) for it in items]
        input_ids, mask = pad_rows([s[0] + s[3] for s in seqs], self.tok.pad_token_id)
        slots, _ = pad_rows([s[1] + [-1] * len(s[3]) for s in seqs], -1)
        labels, _ = pad_rows([[IGNORE] * len(s[0]) + s[3] for s in seqs], IGNORE)
        batch = {
            "index": torch.tensor([it.row for it in items], dtype=torch.long),
            "input_ids": input_ids, "attention_mask": mask, "labels": labels, "slots": slots,
            "user_pos": torch.tensor([s[2] for s in seqs], dtype=torch.long),
        }  # fmt: skip
        if self.encoders and self.use_sequence:
            texts = [t for it in items for n, t in it.blocks() if n != TABULAR]
            enc = self.enc_tok(texts, padding=True, truncation=True, max_length=self.max_source, return_tensors="pt")
            batch["enc_ids"], batch["enc_mask"] = enc["input_ids"], enc["attention_mask"]
        if self.encoders and self.use_tabular:
            batch["tabular"] = torch.from_numpy(np.stack([it.tabular for it in items]).astype(np.float32))
        if all(s[3] for s in seqs):
            batch["answer_ids"], batch["answer_mask"] = pad_rows([self.start + s[3] for s in seqs], self.tok.pad_token_id)
        return batch


class HistoryInputs:
    """Map-style dataset: each row's whole history (as far as the store holds it) with one instruction, no answer."""

    def __init__(self, formatter: UserFormatter, rows: np.ndarray, instruction: str):
        self.formatter, self.rows, self.instruction = formatter, rows, instruction

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> UserInput:
        return self.formatter.user_input(int(self.rows[i]), self.instruction)


class InstructDataModule(L.LightningDataModule):
    """Train on the UserQA triples of the training users, validate on the val users' triples, embed every user.

    `config` is the method's InstructUEConfig (its layout and data keys). train=False (embedding
    new data with a finished run) builds no triples and does not check `instructions` against the
    data's targets (there are none then).
    """

    def __init__(self, events: EventDataModule, tokenizer: Any, encoder_tokenizer: Any | None, user_token_id: int, config: Any, train: bool = True):
        super().__init__()
        self.events, self.config = events, config
        self.tokenizer, self.encoder_tokenizer, self.user_token_id = tokenizer, encoder_tokenizer, user_token_id
        self._triples: tuple[Prepared, list[QATriple]] | None = None
        self._train = train
        if train:
            known = [t.name for t in events.data.targets]
            for target in config.instructions:
                if target not in known:
                    raise ValueError(f"model.instructions.{target}: no probe target of that name; the targets are {known}")

    @property
    def data(self) -> Prepared:
        return self.events.data

    def formatter(self) -> UserFormatter:
        return UserFormatter(History.of(self.data), InputConfig(budget=self.config.budget))

    def triples(self) -> list[QATriple]:
        """Every user's UserQA triples, built once per prepared data."""
        if self._triples is None or self._triples[0] is not self.data:
            c = self.config
            qa = UserQAConfig(
                seed=self.events.seed, questions_per_user=c.questions_per_user, predictive_fraction=c.predictive_fraction,
                future_fraction=c.future_fraction, min_past_events=c.min_past_events, generator_path=c.generator_path,
            )  # fmt: skip
            self._triples = (self.data, build_userqa(self.formatter().history, qa))
        return self._triples[1]

    def loader(self, dataset: Any, train: bool, with_answers: bool, shard: bool = True) -> torch.utils.data.DataLoader:
        collate = InstructCollator(self.tokenizer, self.encoder_tokenizer, self.user_token_id, self.config, with_answers)
        rank, world = shard_of(self.trainer) if shard else (0, 1)
        sampler = None
        if world > 1:
            sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=self.events.seed)
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.events.cfg.batch_size, shuffle=train and sampler is None, sampler=sampler,
            generator=torch.Generator().manual_seed(self.events.seed), collate_fn=collate, num_workers=self.events.cfg.num_workers,
        )  # fmt: skip

    def qa_dataset(self, val: bool) -> UserQADataset:
        """The triples of the val (or training) users; val ones in a fixed seeded order, so batches mix users alike every epoch."""
        chosen = [t for t in self.triples() if bool(self.data.is_val[t.row]) == val]
        if val:
            chosen = [chosen[i] for i in np.random.default_rng(self.events.seed).permutation(len(chosen))]
        return UserQADataset(chosen, self.formatter())

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(self.qa_dataset(val=False), train=True, with_answers=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(self.qa_dataset(val=True), train=False, with_answers=True)

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return self.instruction_loader(self.config.instruction, shard=True)

    def instruction_loader(self, instruction: str, shard: bool = False) -> torch.utils.data.DataLoader:
        """Every user's whole history with `instruction` ("": universal), in store order; unsharded unless asked."""
        rows = np.arange(len(self.data.store))
        return self.loader(HistoryInputs(self.formatter(), rows, instruction), train=False, with_answers=False, shard=shard)

    def encoder_texts(self) -> list[str]:
        """Every distinct source text this datamodule feeds the modality encoder: the training and val triples' inputs and
        every user's whole history (a source's text depends on the user and `end` only, never on the instruction)."""
        if not (self.config.modality_encoders and self.config.use_sequence):
            return []
        formatter = self.formatter()
        ends = {(t.row, t.end) for t in self.triples()} if self._train else set()
        ends |= {(row, None) for row in range(len(self.data.store))}
        texts = dict.fromkeys(t for row, end in sorted(ends, key=lambda x: (x[0], -1 if x[1] is None else x[1]))
                              for t in formatter.user_input(row, end=end).sources.values())  # fmt: skip
        return list(texts)

    def encoder_batches(self, texts: Sequence[str] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(ids, mask) batches of the encoder's inputs for `texts` (default: `encoder_texts`), tokenized as the collator
        does (newest `max_source_tokens` kept), shortest first so a batch carries little padding."""
        texts = self.encoder_texts() if texts is None else list(texts)
        if not texts:
            return []
        ids = self.encoder_tokenizer(texts, truncation=True, max_length=self.config.max_source_tokens)["input_ids"]
        order = np.argsort([len(i) for i in ids], kind="stable")
        size = max(self.events.cfg.batch_size, 32)
        pad = self.encoder_tokenizer.pad_token_id
        return [pad_rows([ids[i] for i in order[s : s + size]], pad) for s in range(0, len(order), size)]

    def instructed_loaders(self) -> dict[str, torch.utils.data.DataLoader]:
        """Probe target -> the loader of every user with that target's instruction (`model.instructions`)."""
        return {target: self.instruction_loader(text) for target, text in self.config.instructions.items()}
