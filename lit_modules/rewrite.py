"""LLM4ES "creative transformation": an instruct LM rewrites users' rendered histories into other formats.

`rewrite_with_llm` is the generation loop with its parquet cache; `training_rewriter` is what
`experiments.build.build_datamodule` hands to `TextDataModule(rewrite=...)` when
`model.rewriter_path` is set: each training user's plain text (as the LM trains on it) is
rewritten once per `model.rewrite_formats`, and the rewrites join the training texts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import torch

from datamodules.atomic import atomic_write
from datamodules.text import FORMAT_NAMES, check_formats
from lit_modules.lm import load_causal_lm, load_tokenizer, model_dir, resolve_model_path

log = logging.getLogger(__name__)

REWRITE_PROMPT = (
    "Rewrite the following history of a user's events as {target}. "
    "Keep every event and every value, change only the layout. Answer with the rewritten history only.\n\n{text}"
)
REWRITE_CACHE_SCHEMA = {"key": pl.String, "text": pl.String}


def rewrite_with_llm(
    texts: Sequence[str],
    model_path: str,
    cache_path: str | Path,
    formats: Sequence[str] = ("json",),
    temperature: float = 0.6,
    top_p: float = 0.9,
    seed: int = 0,
    max_new_tokens: int = 2048,
    batch_size: int = 8,
    device: str | None = None,
) -> list[list[str]]:
    """Each text rewritten by the instruct LM at `model_path` into each of `formats`: [text][format].

    Results are cached in a parquet file (columns key, text) keyed by a hash of the text,
    the resolved model path, the prompt, the format and every generation setting, so a rerun
    only generates what is new; the model is not even loaded when everything is cached. The
    key holds the path, not the weights: use a new cache file after replacing a model in
    place. Texts are generated in batches (left padding), each batch seeded from `seed` and
    its first key, so outputs depend on batch mates; the cache keeps them fixed. What was
    generated is written even when a later batch fails (not on a hard kill). A generation
    that reaches `max_new_tokens` ends mid-history: set it to cover a whole rewritten text.
    """
    check_formats(formats, "model.rewrite_formats")
    base = {"model": str(model_dir(model_path, "model.rewriter_path")), "prompt": REWRITE_PROMPT, "temperature": temperature,
            "top_p": top_p, "seed": seed, "max_new_tokens": max_new_tokens}  # fmt: skip
    jobs = {}  # key -> (text, format)
    keys = []
    for t in texts:
        row = []
        for fmt in formats:
            key = hashlib.sha256(json.dumps({"text": t, **base, "format": fmt}, sort_keys=True).encode()).hexdigest()
            jobs[key] = (t, fmt)
            row.append(key)
        keys.append(row)
    cache_path = Path(cache_path)
    done = read_rewrite_cache(cache_path)
    todo = [k for k in jobs if k not in done]
    log.info("LLM rewrites: %d from cache %s, %d to generate", len(jobs) - len(todo), cache_path, len(todo))
    if todo:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = resolve_model_path(model_path, "model.rewriter_path")
        tok = load_tokenizer(path, padding_side="left")
        model = load_causal_lm(path, dtype="auto", key="model.rewriter_path").to(device).eval()
        try:
            for i in range(0, len(todo), batch_size):
                batch = todo[i : i + batch_size]
                outs = _generate(tok, model, [jobs[k] for k in batch], base, int(batch[0][:8], 16) ^ seed)
                done.update(zip(batch, outs))
        finally:
            _write_cache(cache_path, done)
    return [[done[k] for k in row] for row in keys]


def _generate(tok: Any, model: Any, jobs: list[tuple[str, str]], params: dict, seed: int) -> list[str]:
    messages = [REWRITE_PROMPT.format(target=FORMAT_NAMES[fmt], text=t) for t, fmt in jobs]
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


def rewrite_cache_path(cache_dir: str | Path, prepared_path: Path) -> Path:
    """Next to the sequence cache it rewrites (`<cache_dir>/rewrites/<source>-<key>.parquet`): new data, new file."""
    return Path(cache_dir) / "rewrites" / f"{prepared_path.name}.parquet"


def training_rewriter(cfg: dict, cache_dir: str | Path, prepared_path: Path, seed: int) -> Callable[[Sequence[str]], list[list[str]]]:
    """`TextDataModule(rewrite=...)` for a text model config with `rewriter_path` set: texts -> their cached rewrites.

    The formats are checked here, before every training user is rendered for the rewriter.
    """
    check_formats(cfg["rewrite_formats"], "model.rewrite_formats")
    return functools.partial(
        rewrite_with_llm,
        model_path=cfg["rewriter_path"],
        cache_path=rewrite_cache_path(cache_dir, prepared_path),
        formats=tuple(cfg["rewrite_formats"]),
        temperature=cfg["rewrite_temperature"],
        top_p=cfg["rewrite_top_p"],
        seed=seed,
        max_new_tokens=cfg["rewrite_max_new_tokens"],
    )
