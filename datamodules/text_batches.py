"""Token budgets, datasets and batches of user texts for language models.

Token budgets cut whole events, oldest first, never part of a line. Batches for causal
LMs are padded (right or left) or packed several users per row; packed documents are kept
apart by position ids restarting at 0 (what transformers' Qwen2/Llama sdpa/eager/flash
paths read when no 2-D mask and no KV cache is given) or by a 4-D block-diagonal causal
mask for models that ignore position ids when masking (BERT-style decoders). The tokenizer
is always an object the caller loaded (`lit_modules.lm.load_tokenizer`): the data side
never loads models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from datamodules.preprocess import Prepared
from datamodules.text import Rendered, Renderer, check_formats, check_padding_side

IGNORE = -100  # label of positions that are not trained (pads, the first token of a document)


# -------------------------------------------------------------------- token budget


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens the model reads for `text`, special tokens (BOS/CLS/SEP) included."""
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def fit_count(render: Callable[[int], str], n_events: int, tokenizer: Any, max_tokens: int, extra_tokens: int = 0) -> int:
    """The largest n <= n_events whose render(n) fits max_tokens (minus `extra_tokens`, e.g. an EOS).

    render(n) must render the n most recent events (like `Rendered.text`), so the cut
    always drops whole events, oldest first, never half a line. Binary search over n:
    O(log n) tokenizations instead of one per event; the n returned was measured, so its
    text fits even if token counts were not monotone in n. Raises when not even the head
    with zero events fits, or when the head fits but not one event after it.
    """
    budget = max_tokens - extra_tokens

    def fits(n: int) -> bool:
        return count_tokens(tokenizer, render(n)) <= budget

    if fits(n_events):
        return n_events
    if not fits(0):
        raise ValueError(f"max_tokens={max_tokens}: even the header alone does not fit")
    if not fits(1):  # the header alone would give every user the same text, hence the same embedding
        head = count_tokens(tokenizer, render(0))
        raise ValueError(f"max_tokens={max_tokens}: the header takes {head} tokens and not one event fits after it; raise max_tokens or set header=false")
    lo, hi = 1, n_events  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def fit_budget(render: Callable[[int], str], n_events: int, tokenizer: Any, max_tokens: int, extra_tokens: int = 0) -> str:
    """render(n) for the most recent events that fit max_tokens (`fit_count`): one window, older events dropped."""
    return render(fit_count(render, n_events, tokenizer, max_tokens, extra_tokens))


def fit_windows(rendered: Rendered, tokenizer: Any, max_tokens: int, extra_tokens: int = 0) -> list[tuple[str, int]]:
    """(text, events) of consecutive windows that together hold every event of `rendered`, oldest first.

    For a reader with fewer positions than the user's text has tokens: each window is the
    head, a run of whole events (lines) and the tail, within max_tokens (minus `extra_tokens`).
    Windows fill from the most recent event back, so a user whose events fit gets the one
    text `fit_budget` keeps. Each event's tokens are counted once (one batched call) to
    guess a window's events; the guess is measured on the window's own text and shrunk an
    event at a time until it fits: usually one tokenization per window (token counts of
    lines nearly add up) instead of a binary search over ever longer texts. Where they do
    not quite add up a window may hold one event fewer than it could; every event is still read.
    """
    budget = max_tokens - extra_tokens
    events = rendered.events
    per_event = [len(ids) for ids in tokenizer(events, add_special_tokens=False)["input_ids"]] if events else []
    fixed = count_tokens(tokenizer, "\n".join([*rendered.head, *rendered.tail]))

    def fits(start: int, end: int) -> bool:
        return count_tokens(tokenizer, window(start, end)) <= budget

    def window(start: int, end: int) -> str:
        return Rendered(rendered.head, events[start:end], rendered.tail, rendered.empty).text()

    windows: list[tuple[str, int]] = []
    end = len(events)
    while end > 0 or not windows:
        start, used = end, fixed
        while start > 0 and used + per_event[start - 1] <= budget:
            start -= 1
            used += per_event[start]
        start = min(start, end - 1) if end > 0 else 0
        while end - start > 1 and not fits(start, end):
            start += 1
        if end > 0 and end - start == 1 and not fits(start, end):
            raise ValueError(f"max_tokens={max_tokens}: the header and one event take {count_tokens(tokenizer, window(start, end))} tokens; raise max_tokens")
        windows.append((window(start, end), end - start))
        end = start
    return windows[::-1]


def fit_lines(text: str, tokenizer: Any, max_tokens: int, extra_tokens: int = 0) -> str | None:
    """The most recent (last) whole lines of `text` that fit max_tokens (minus `extra_tokens`), as `fit_budget`
    cuts events; None when `text` is blank or not even its last line fits. For texts made elsewhere (LLM
    rewrites), where one line is the closest thing to one event; surrounding whitespace is dropped."""
    lines = text.strip().splitlines()
    if not lines or count_tokens(tokenizer, lines[-1]) > max_tokens - extra_tokens:
        return None
    return fit_budget(Rendered([], lines, []).text, len(lines), tokenizer, max_tokens, extra_tokens)


def encode(tokenizer: Any, text: str, append_eos: bool = True) -> list[int]:
    """Token ids of `text` with the tokenizer's special tokens, plus EOS so the LM learns where a user ends."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if append_eos and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


# -------------------------------------------------------------------- datasets and batches


class UserTextDataset(torch.utils.data.Dataset):
    """Items {"index": store row, "input_ids": list[int]}: one per (user, format), rendered and
    tokenized on access (in DataLoader workers), the most recent events that fit `max_tokens`.

    Several `formats` put each user in the epoch once per format (the format augmentation);
    `extra` (store row, text) pairs are more items, texts used as given (already within the
    budget, e.g. `fit_lines` of LLM rewrites), after the rendered ones. With `windows` an item
    is {"index", "windows": list of token id lists, "events": events read} instead: every one
    of the last `max_events` events, in as many windows of `max_tokens` as it takes
    (`fit_windows`), for a reader that pools over all of them. `fields` and `drop_unknown`
    shape the text as in `datamodules.text.Renderer`.
    """

    def __init__(
        self,
        prepared: Prepared,
        rows: Sequence[int],
        tokenizer: Any,
        max_tokens: int,
        formats: Sequence[str] = ("plain",),
        max_events: int | None = None,
        header: bool = True,
        append_eos: bool = True,
        extra: Sequence[tuple[int, str]] = (),
        windows: bool = False,
        fields: Sequence[str] | None = None,
        drop_unknown: bool = False,
    ):
        check_formats(formats, "formats")
        if windows and "json" in formats:
            raise ValueError("windows: a JSON list cut into windows is not valid JSON; use plain, markdown, yaml or html")
        self.renderer = Renderer(prepared, fields)
        self.items = [(int(r), f) for r in rows for f in formats]
        self.extra = [(int(r), t) for r, t in extra]
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.max_events = max_events
        self.header = header
        self.append_eos = append_eos and tokenizer.eos_token_id is not None
        self.windows = windows
        self.drop_unknown = drop_unknown

    def __len__(self) -> int:
        return len(self.items) + len(self.extra)

    def row(self, i: int) -> int:
        return self.items[i][0] if i < len(self.items) else self.extra[i - len(self.items)][0]

    def rendered(self, i: int) -> Rendered:
        row, fmt = self.items[i]
        return self.renderer.render(row, fmt, self.max_events, self.header, self.drop_unknown)

    def text(self, i: int) -> str:
        if i >= len(self.items):
            return self.extra[i - len(self.items)][1]
        rendered = self.rendered(i)
        return fit_budget(rendered.text, len(rendered), self.tokenizer, self.max_tokens, extra_tokens=int(self.append_eos))

    def window_texts(self, i: int) -> list[tuple[str, int]]:
        """(text, events) of item i's windows, oldest first (`fit_windows`)."""
        return fit_windows(self.rendered(i), self.tokenizer, self.max_tokens, extra_tokens=int(self.append_eos))

    def __getitem__(self, i: int) -> dict:
        if self.windows and i < len(self.items):
            parts = self.window_texts(i)
            ids = [encode(self.tokenizer, t, self.append_eos) for t, _ in parts]
            return {"index": self.row(i), "windows": ids, "events": sum(n for _, n in parts)}
        return {"index": self.row(i), "input_ids": encode(self.tokenizer, self.text(i), self.append_eos)}


def block_causal_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T], True where query t may attend key s: s <= t and both in the same document.

    Pads (seq_idx -1) form one more block, so no row is fully masked (no NaN in softmax).
    sdpa takes this bool mask as is; eager attention adds masks, so convert it to 0 / -inf-like
    floats there (lit_modules.llm4es does).
    """
    T = seq_idx.shape[1]
    same = seq_idx[:, :, None] == seq_idx[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=seq_idx.device).tril()
    return (same & causal)[:, None]


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item positions, longest items first, each into the first bin with room."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"a document of {n} tokens does not fit pack_length={capacity}; keep max_tokens <= pack_length")
        b = next((b for b, r in enumerate(room) if r >= n), None)
        if b is None:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= n
    return bins


class TextBatchBuilder:
    """collate_fn: `UserTextDataset` items -> a batch for a causal LM.

    Padded (pack_length None): one user per row, in item order, padded on `padding_side`:
        index LongTensor[B], input_ids, attention_mask (1 = real), position_ids (0.. over real
        tokens, so left padding does not shift positions), labels [B, T].
    Packed (pack_length L): the batch's users packed first-fit-decreasing into as many rows of
    exactly L tokens as needed (batch_size = users per step, not rows):
        index LongTensor[D] (store rows of the D documents), input_ids, position_ids
        (restart at 0 per document), seq_idx (document number into `index`, -1 at pads),
        labels [R, L], and with `block_mask` attention_mask bool [R, 1, L, L] from
        `block_causal_mask`. Without it there is deliberately no attention_mask: transformers
        detects packed documents from position_ids only when the 2-D mask is None and no
        KV cache is in use (pass use_cache=False).
    Labels are the input ids with -100 at pads and at each document's first token (it would be
    predicted from a pad or from the previous document), so no loss crosses documents.
    Windowed items (`UserTextDataset(windows=True)`) are padded one window per row, in item
    order, plus window_user LongTensor[R] (the user of each row: a position in `index`) and
    events LongTensor[B] (events each user's windows hold).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pack_length: int | None = None, block_mask: bool = False):
        check_padding_side(padding_side)
        if block_mask and pack_length is None:
            raise ValueError("block_mask needs pack_length")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pack_length = pack_length
        self.block_mask = block_mask

    def __call__(self, items: Sequence[dict]) -> dict:
        if "windows" in items[0]:
            if self.pack_length:
                raise ValueError("windowed texts are read, not trained on: build their batches without pack_length")
            return self.pad_windows(items)
        return self.pack(items) if self.pack_length else self.pad(items)

    def pad_windows(self, items: Sequence[dict]) -> dict:
        rows = [{"index": u, "input_ids": w} for u, it in enumerate(items) for w in it["windows"]]
        batch = self.pad(rows)
        batch["window_user"] = batch["index"]
        batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
        batch["events"] = torch.tensor([it["events"] for it in items], dtype=torch.long)
        return batch

    def pad(self, items: Sequence[dict]) -> dict:
        docs = [list(it["input_ids"]) for it in items]
        T = max(len(d) for d in docs)
        B = len(docs)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)
        for b, d in enumerate(docs):
            span = slice(T - len(d), T) if self.padding_side == "left" else slice(0, len(d))
            input_ids[b, span] = torch.tensor(d)
            mask[b, span] = 1
            positions[b, span] = torch.arange(len(d))
        labels = torch.where((mask == 1) & (positions > 0), input_ids, IGNORE)
        index = torch.tensor([it["index"] for it in items], dtype=torch.long)
        return {"index": index, "input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "labels": labels}

    def pack(self, items: Sequence[dict]) -> dict:
        L = self.pack_length
        bins = first_fit_decreasing([len(it["input_ids"]) for it in items], L)
        R = len(bins)
        input_ids = torch.full((R, L), self.pad_token_id, dtype=torch.long)
        positions = torch.zeros(R, L, dtype=torch.long)
        seq_idx = torch.full((R, L), -1, dtype=torch.long)
        order: list[int] = []
        for r, members in enumerate(bins):
            at = 0
            for i in members:
                d = items[i]["input_ids"]
                input_ids[r, at : at + len(d)] = torch.tensor(d)
                positions[r, at : at + len(d)] = torch.arange(len(d))
                seq_idx[r, at : at + len(d)] = len(order)
                order.append(i)
                at += len(d)
            positions[r, at:] = torch.arange(L - at)  # the pad tail is one more "document"
        labels = torch.where((seq_idx >= 0) & (positions > 0), input_ids, IGNORE)
        batch = {
            "index": torch.tensor([items[i]["index"] for i in order], dtype=torch.long),
            "input_ids": input_ids,
            "position_ids": positions,
            "seq_idx": seq_idx,
            "labels": labels,
        }
        if self.block_mask:
            batch["attention_mask"] = block_causal_mask(seq_idx)
        return batch
