"""Users as text for language models (LLM4ES; the LM block of "Encode Me If You Can").

A user's events become a header naming the fields plus one readable entry per event:
time as "YYYY-mm-dd HH:MM" (UTC), categorical ids mapped back to their values (MISSING ->
"unknown", RARE -> "other"), raw numeric values, text fields, codes as their integers. The
day/week index fields are derived from the time, so they are not rendered. Five formats
(plain, json, markdown, yaml, html); rendering one user in several of them is the offline
stand-in for LLM4ES's "creative transformation", `rewrite_with_llm` is the real one.

Token budgets cut whole events, oldest first, never part of a line. Batches for causal
LMs are padded (right or left) or packed several users per row; packed documents are kept
apart by position ids restarting at 0 (what transformers' Qwen2/Llama sdpa/eager/flash
paths read when no 2-D mask and no KV cache is given) or by a 4-D block-diagonal causal
mask for models that ignore position ids when masking (BERT-style decoders).
"""

from __future__ import annotations

import functools
import hashlib
import html
import importlib.util
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import yaml

from datamodules.atomic import atomic_write
from datamodules.preprocess import Prepared
from datamodules.schema import FIRST_ID, MISSING, RARE

log = logging.getLogger(__name__)

FORMATS = ("plain", "json", "markdown", "yaml", "html")
FORMAT_NAMES = {"plain": "plain text", "json": "JSON", "markdown": "a Markdown table", "yaml": "YAML", "html": "an HTML table"}
UNKNOWN, OTHER = "unknown", "other"
IGNORE = -100  # label of positions that are not trained (pads, the first token of a document)
PACKAGE_PREFIX = "package:"  # model_path "package:<python package>" = the model folder shipped inside that package
REWRITE_PROMPT = (
    "Rewrite the following history of a user's events as {target}. "
    "Keep every event and every value, change only the layout. Answer with the rewritten history only.\n\n{text}"
)


# -------------------------------------------------------------------- model paths


def model_dir(model_path: str) -> Path:
    """Absolute folder named by `model_path`; "package:NAME" means NAME's bundled `model/` folder."""
    if model_path.startswith(PACKAGE_PREFIX):
        name = model_path[len(PACKAGE_PREFIX) :]
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model_path {model_path!r}: python package {name!r} is not installed")
        return (Path(next(iter(spec.submodule_search_locations))) / "model").resolve()
    return Path(model_path).expanduser().resolve()


def resolve_model_path(model_path: str) -> str:
    """`model_dir`, which must exist: models are never downloaded, so a path that is not a local
    folder is an error here rather than a hub lookup later."""
    path = model_dir(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model_path {model_path!r}: {path} is not a local model folder (models are never downloaded)")
    return str(path)


def load_tokenizer(model_path: str, padding_side: str = "right") -> Any:
    """The model folder's tokenizer; models without a pad token (Llama, SmolLM2) pad with EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(model_path), local_files_only=True, padding_side=padding_side)
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {model_path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


# -------------------------------------------------------------------- rendering


def format_number(v: float) -> str:
    """Readable number: integers without decimals, else two decimals (trailing zeros dropped), tiny values 3 digits."""
    if not np.isfinite(v):
        return UNKNOWN
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    if abs(v) >= 0.01:
        return f"{v:.2f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def one_line(value: str) -> str:
    """Collapse whitespace, so a value never breaks the one-entry-per-event layout."""
    return " ".join(str(value).split())


@dataclass
class EventTable:
    """A user's events as readable strings, oldest first."""

    columns: list[str]
    numeric: list[bool]  # column holds numbers (json/yaml write them unquoted)
    rows: list[list[str]]


@dataclass
class Rendered:
    """A rendered user split into head, one chunk per event (oldest first) and tail.

    `text(n)` keeps the n most recent events; chunks are whole lines, so a cut never
    splits one. In json every chunk but the last ends with a comma; the last (most recent)
    chunk is always kept, so any suffix is valid JSON.
    """

    head: list[str]
    events: list[str]
    tail: list[str]
    empty: str | None = None  # the whole text when no event is kept (yaml: "[]")

    def __len__(self) -> int:
        return len(self.events)

    def text(self, n: int | None = None) -> str:
        n = len(self.events) if n is None else n
        kept = self.events[len(self.events) - n :] if n > 0 else []
        if not kept and self.empty is not None:
            return self.empty
        return "\n".join([*self.head, *kept, *self.tail])


@functools.lru_cache(maxsize=65536)
def _yaml_plain_ok(value: str) -> bool:
    """True when YAML reads `value` back unquoted as this same string."""
    try:
        return yaml.safe_load(f"k: {value}") == {"k": value}
    except yaml.YAMLError:
        return False


# Characters JSON leaves raw but YAML refuses (outside its printable set) or reads as line breaks; \uXXXX escapes them.
_YAML_UNPRINTABLE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff]")


def _yaml_scalar(value: str, numeric: bool) -> str:
    if (numeric and value != UNKNOWN) or _yaml_plain_ok(value):
        return value
    quoted = json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML double-quoted scalar...
    return _YAML_UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", quoted)  # ...once YAML's unprintables are escaped


def _json_value(value: str, numeric: bool) -> str:
    return value if numeric and value != UNKNOWN else json.dumps(value, ensure_ascii=False)


def format_events(table: EventTable, fmt: str = "plain", header: bool = True) -> Rendered:
    """Lay an event table out in one of FORMATS. `header` only matters for plain (the
    other formats name the fields in their structure); plain without header is the
    "Encode Me" line format."""
    cols, rows = table.columns, table.rows
    if fmt == "plain":
        head = [f"fields: {', '.join(cols)}"] if header else []
        return Rendered(head, ["; ".join(f"{c}: {v}" for c, v in zip(cols, r)) for r in rows], [])
    if fmt == "json":
        objs = ["{" + ", ".join(f"{json.dumps(c, ensure_ascii=False)}: {_json_value(v, n)}" for c, v, n in zip(cols, r, table.numeric)) + "}" for r in rows]
        return Rendered(["["], [o + ("," if i < len(objs) - 1 else "") for i, o in enumerate(objs)], ["]"])
    if fmt == "markdown":

        def cells(values: Sequence[str]) -> str:
            return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

        return Rendered([cells(cols), cells(["---"] * len(cols))], [cells(r) for r in rows], [])
    if fmt == "yaml":
        events = []
        for r in rows:
            lines = [f"{_yaml_scalar(c, False)}: {_yaml_scalar(v, n)}" for c, v, n in zip(cols, r, table.numeric)]
            events.append("\n".join(["- " + lines[0], *("  " + line for line in lines[1:])]))
        return Rendered([], events, [], empty="[]")
    if fmt == "html":

        def tr(tag: str, values: Sequence[str]) -> str:
            return "<tr>" + "".join(f"<{tag}>{html.escape(v, quote=False)}</{tag}>" for v in values) + "</tr>"

        return Rendered(["<table>", tr("th", cols)], [tr("td", r) for r in rows], ["</table>"])
    raise ValueError(f"format {fmt!r}; choose from {FORMATS}")


class Renderer:
    """Reads users' events out of a `Prepared` cache as readable strings.

    Built once per dataset: the id -> value tables are made here, not per user.
    """

    def __init__(self, prepared: Prepared):
        self.prepared = prepared
        schema, store = prepared.schema, prepared.store
        ordered = sorted(schema.fields, key=lambda f: f.name != schema.event_type)  # event type first, as in the paper
        self.fields = [f for f in ordered if f.kind != "codes" or f.name in store.codes]
        readable = [f.name.replace("_", " ") for f in self.fields]
        self.time_column = "timestamp" if "timestamp" not in readable else "event time"
        slots = self._with_time(self.fields)
        self.columns = [self.time_column if f is None else f.name.replace("_", " ") for f in slots]
        self.numeric = [f is not None and f.kind == "numeric" for f in slots]
        reserved = [""] * FIRST_ID  # PAD, SOS, EOS never occur inside a stored sequence
        reserved[MISSING], reserved[RARE] = UNKNOWN, OTHER
        self.names = {
            f.name: np.array([*reserved, *map(one_line, prepared.vocabs[f.name])], dtype=object)
            for f in self.fields
            if f.kind == "categorical"
        }

    def _with_time(self, items: list) -> list:
        """`items` (one per field) with a None placeholder where the time column sits."""
        at = 1 if self.prepared.schema.event_type is not None else 0
        return [*items[:at], None, *items[at:]]

    def table(self, row: int, max_events: int | None = None) -> EventTable:
        """Events of store row `row`, the `max_events` most recent ones (all when None)."""
        store = self.prepared.store
        start, end = int(store.offsets[row]), int(store.offsets[row + 1])
        if max_events is not None:
            start = max(start, end - max_events)
        stamps = np.datetime_as_string(store.times[start:end].astype("datetime64[s]"), unit="m")
        per_field: list[list[str]] = []
        for f in self.fields:
            if f.kind == "categorical":
                per_field.append(self.names[f.name][store.tokens[f.name][start:end]].tolist())
            elif f.kind == "numeric":
                per_field.append([format_number(float(v)) for v in store.values[f.name][start:end]])
            elif f.kind == "text":
                texts = self.prepared.users[f"txt_{f.name}"][row].to_list()
                first = start - int(store.offsets[row])
                per_field.append([UNKNOWN if t is None else one_line(t) for t in texts[first : first + end - start]])
            else:  # codes
                codes = store.codes[f.name][start:end]
                per_field.append([UNKNOWN if c[0] == MISSING else " ".join(str(int(x) - FIRST_ID) for x in c) for c in codes])
        per_field = self._with_time(per_field)
        per_field[per_field.index(None)] = [s.replace("T", " ") for s in stamps]
        return EventTable(self.columns, self.numeric, [list(r) for r in zip(*per_field)])

    def render(self, row: int, fmt: str = "plain", max_events: int | None = None, header: bool = True) -> Rendered:
        return format_events(self.table(row, max_events), fmt, header)


def render_user(prepared: Prepared, row: int, fmt: str = "plain", max_events: int | None = None, header: bool = True) -> str:
    """One user (store row) as text; the `max_events` most recent events when given.

    For many users build one `Renderer` and reuse it.
    """
    return Renderer(prepared).render(row, fmt, max_events, header).text()


def augment_formats(
    prepared: Prepared, row: int, formats: Sequence[str] = FORMATS, max_events: int | None = None
) -> dict[str, str]:
    """The same user in several formats: LLM4ES's format augmentation, offline and deterministic."""
    table = Renderer(prepared).table(row, max_events)
    return {fmt: format_events(table, fmt).text() for fmt in formats}


# -------------------------------------------------------------------- token budget


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens the model reads for `text`, special tokens (BOS/CLS/SEP) included."""
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def fit_budget(render: Callable[[int], str], n_events: int, tokenizer: Any, max_tokens: int, extra_tokens: int = 0) -> str:
    """render(n) for the largest n <= n_events whose text fits max_tokens (minus `extra_tokens`, e.g. an EOS).

    render(n) must render the n most recent events (like `Rendered.text`), so the cut
    always drops whole events, oldest first, never half a line. Binary search over n:
    O(log n) tokenizations instead of one per event; the text returned was measured,
    so it fits even if token counts were not monotone in n. Raises when not even the
    head with zero events fits, or when the head fits but not one event after it.
    """
    budget = max_tokens - extra_tokens

    def fits(n: int) -> bool:
        return count_tokens(tokenizer, render(n)) <= budget

    if fits(n_events):
        return render(n_events)
    if not fits(0):
        raise ValueError(f"max_tokens={max_tokens}: even the header alone does not fit")
    if not fits(1):  # the header alone would give every user the same text, hence the same embedding
        head = count_tokens(tokenizer, render(0))
        raise ValueError(f"max_tokens={max_tokens}: the header takes {head} tokens and not one event fits after it; raise max_tokens or set header=false")
    lo, hi = 1, n_events  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return render(lo)


def encode(tokenizer: Any, text: str, append_eos: bool = True) -> list[int]:
    """Token ids of `text` with the tokenizer's special tokens, plus EOS so the LM learns where a user ends."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if append_eos and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


# -------------------------------------------------------------------- LLM rewrite


def rewrite_with_llm(
    texts: Sequence[str],
    model_path: str,
    cache_path: str | Path,
    target_format: str = "json",
    temperature: float = 0.6,
    top_p: float = 0.9,
    seed: int = 0,
    max_new_tokens: int = 2048,
    batch_size: int = 8,
    device: str | None = None,
) -> list[str]:
    """LLM4ES "creative transformation": an instruct LM rewrites each text into `target_format`.

    Results are cached in a parquet file (columns key, text) keyed by a hash of the text,
    the resolved model path, the prompt and every generation setting, so a rerun only
    generates what is new; the model is not even loaded when everything is cached. The
    key holds the path, not the weights: use a new cache file after replacing a model in
    place. Texts are generated in batches (left padding), each batch seeded from `seed` and
    its first text, so outputs depend on batch mates; the cache keeps them fixed. What was
    generated is written even when a later batch fails (not on a hard kill).
    """
    if target_format not in FORMAT_NAMES:
        raise ValueError(f"target_format {target_format!r}; choose from {sorted(FORMAT_NAMES)}")
    params = {"model": str(model_dir(model_path)), "prompt": REWRITE_PROMPT, "format": target_format, "temperature": temperature,
              "top_p": top_p, "seed": seed, "max_new_tokens": max_new_tokens}  # fmt: skip
    keys = [hashlib.sha256(json.dumps({"text": t, **params}, sort_keys=True).encode()).hexdigest() for t in texts]
    cache_path = Path(cache_path)
    done = read_rewrite_cache(cache_path)
    todo = list(dict.fromkeys(k for k in keys if k not in done))
    if todo:
        by_key = dict(zip(keys, texts))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tok, model = _load_rewriter(resolve_model_path(model_path), device)
        try:
            for i in range(0, len(todo), batch_size):
                batch = todo[i : i + batch_size]
                outs = _generate(tok, model, [by_key[k] for k in batch], params, int(batch[0][:8], 16) ^ seed)
                done.update(zip(batch, outs))
        finally:
            _write_cache(cache_path, done)
    return [done[k] for k in keys]


def _load_rewriter(path: str, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto").to(device).eval()
    return tok, model


def _generate(tok: Any, model: Any, texts: list[str], params: dict, seed: int) -> list[str]:
    target = FORMAT_NAMES[params["format"]]
    messages = [REWRITE_PROMPT.format(target=target, text=t) for t in texts]
    if tok.chat_template:
        prompts = [tok.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True) for m in messages]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        enc = tok([m + "\n\n" for m in messages], return_tensors="pt", padding=True)
    enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    cuda = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=params["temperature"],
            top_p=params["top_p"],
            max_new_tokens=params["max_new_tokens"],
            pad_token_id=tok.pad_token_id,
        )
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


REWRITE_CACHE_SCHEMA = {"key": pl.String, "text": pl.String}


def read_rewrite_cache(path: Path) -> dict[str, str]:
    """The cached rewrites; an unreadable file or one of another schema is logged and regenerated, never trusted."""
    if not path.is_file():
        return {}
    try:
        cached = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as err:
        log.info("LLM rewrite cache %s is unreadable (%s); regenerating it", path, str(err).splitlines()[0])
        return {}
    if dict(cached.schema) != REWRITE_CACHE_SCHEMA:
        log.info("LLM rewrite cache %s has schema %s, expected %s; regenerating it", path, dict(cached.schema), REWRITE_CACHE_SCHEMA)
        return {}
    return dict(zip(cached["key"].to_list(), cached["text"].to_list()))


def _write_cache(path: Path, done: dict[str, str]) -> None:
    """Whole file or none: a reader never sees a torn cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, pl.DataFrame({"key": list(done), "text": list(done.values())}, schema=REWRITE_CACHE_SCHEMA).write_parquet)


# -------------------------------------------------------------------- datasets and batches


class UserTextDataset(torch.utils.data.Dataset):
    """Items {"index": store row, "input_ids": list[int]}: one per (user, format), rendered and
    tokenized on access (in DataLoader workers), the most recent events that fit `max_tokens`.

    Several `formats` put each user in the epoch once per format (the format augmentation).
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
    ):
        unknown = [f for f in formats if f not in FORMATS]
        if unknown or not formats:
            raise ValueError(f"formats {list(formats)}; choose from {FORMATS}")
        self.renderer = Renderer(prepared)
        self.items = [(int(r), f) for r in rows for f in formats]
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.max_events = max_events
        self.header = header
        self.append_eos = append_eos and tokenizer.eos_token_id is not None

    def __len__(self) -> int:
        return len(self.items)

    def text(self, i: int) -> str:
        row, fmt = self.items[i]
        rendered = self.renderer.render(row, fmt, self.max_events, self.header)
        return fit_budget(rendered.text, len(rendered), self.tokenizer, self.max_tokens, extra_tokens=int(self.append_eos))

    def __getitem__(self, i: int) -> dict:
        return {"index": self.items[i][0], "input_ids": encode(self.tokenizer, self.text(i), self.append_eos)}


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
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pack_length: int | None = None, block_mask: bool = False):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side {padding_side!r}; choose right or left")
        if block_mask and pack_length is None:
            raise ValueError("block_mask needs pack_length")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pack_length = pack_length
        self.block_mask = block_mask

    def __call__(self, items: Sequence[dict]) -> dict:
        return self.pack(items) if self.pack_length else self.pad(items)

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
