"""InstructUE's instruction-tuned variant: a few learnable instruction tokens fitted with the prototype loss.

A trained InstructUEJoint stays frozen (every parameter, every buffer); only `n` instruction-token
embeddings train. They go where the instruction text goes (`Instruction: [n tokens]` right before
`<USER>`), and the prototype loss on the probe's FIT users pulls each user vector to its class
mean and pushes it from the other classes' means. The tuning functions take FIT batches and a
row -> class map of FIT users only, so EVAL labels cannot reach them; the tuned tokens then embed
any users (`embed_tuned`), the EVAL half included, without labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from datamodules.instruct_batches import HistoryInputs, InstructDataModule
from datamodules.text_batches import IGNORE
from datamodules.user_inputs import INSTRUCTION_PREFIX
from lit_modules.instruct_ue import InstructUEJoint
from lit_modules.instruct_ue_loss import prototype_loss


def rows_loader(dm: InstructDataModule, rows: Sequence[int], shuffle: bool = False) -> torch.utils.data.DataLoader:
    """Universal embedding batches (no instruction) of the given store rows; shuffled with the data seed if asked."""
    dataset = HistoryInputs(dm.formatter(), np.asarray(rows, dtype=np.int64), "")
    return dm.loader(dataset, train=shuffle, with_answers=False, shard=False)


def with_instruction_slots(batch: dict, tokenizer: Any, n: int) -> dict:
    """A copy of a batch built without instruction, `Instruction: ` + n slot positions inserted before each row's <USER>.

    `instruction_slots` (bool [B, T']) marks the n slots; `InstructUEJoint.embed(batch, tokens)` writes the tokens there.
    """
    prefix = list(tokenizer(INSTRUCTION_PREFIX, add_special_tokens=False)["input_ids"])
    suffix = list(tokenizer("\n", add_special_tokens=False)["input_ids"])
    template = torch.tensor(prefix + [tokenizer.pad_token_id] * n + suffix, dtype=torch.long)
    width = len(template)
    ids = batch["input_ids"]
    rows, length = ids.shape
    j = torch.arange(length + width)[None]
    pos = batch["user_pos"][:, None]
    offset = j - pos
    inside = (offset >= 0) & (offset < width)
    source = torch.where(j < pos, j, (j - width).clamp(min=0)).expand(rows, -1)
    out = dict(batch)
    inserted = {"input_ids": template[offset.clamp(0, width - 1)], "attention_mask": 1, "labels": IGNORE, "slots": -1}
    for key, value in inserted.items():
        if key in batch:
            out[key] = torch.where(inside, torch.as_tensor(value, dtype=batch[key].dtype), batch[key].gather(1, source))
    out["instruction_slots"] = inside & (offset >= len(prefix)) & (offset < len(prefix) + n)
    out["user_pos"] = batch["user_pos"] + width
    return out


def initial_tokens(module: InstructUEJoint, tokenizer: Any, n_tokens: int | None, instruction: str, seed: int) -> torch.Tensor:
    """[n, H] starting tokens: the embedding rows of `instruction`'s tokens (cycled or cut to n_tokens), else the
    mean embedding row plus seeded noise (so the n tokens start apart)."""
    weight = module.llm.get_input_embeddings().weight.detach().float()
    ids = list(tokenizer(instruction, add_special_tokens=False)["input_ids"]) if instruction else []
    n = n_tokens if n_tokens is not None else len(ids)
    if n < 1:
        raise ValueError("instruction tuning needs n_tokens >= 1 or a non-empty instruction to start from")
    if ids:
        return weight[torch.tensor([ids[i % len(ids)] for i in range(n)])].clone()
    noise = torch.randn(n, weight.shape[1], generator=torch.Generator().manual_seed(seed))
    return weight.mean(0).expand(n, -1) + 0.1 * weight.std() * noise


def labelled(batches: Iterable[dict], labels: Mapping[int, int]) -> list[tuple[dict, torch.Tensor]]:
    """Each batch with its users' classes; a user without a FIT label is an error (no silent EVAL users)."""
    out = []
    for batch in batches:
        rows = batch["index"].tolist()
        missing = [r for r in rows if r not in labels]
        if missing:
            raise ValueError(f"instruction tuning: users {missing[:5]} of the FIT batches have no FIT label")
        out.append((batch, torch.tensor([labels[r] for r in rows], dtype=torch.long)))
    return out


def tune_instruction(
    module: InstructUEJoint,
    fit_batches: Iterable[dict],
    fit_labels: Mapping[int, int],
    tokenizer: Any,
    n_tokens: int | None = None,
    instruction: str = "",
    steps: int = 50,
    lr: float = 1e-2,
    temperature: float = 0.07,
    seed: int = 0,
) -> torch.Tensor:
    """Tuned instruction tokens [n, H], fitted on FIT users only with everything else in `module` frozen.

    fit_batches: universal embedding batches of FIT users (`rows_loader`); fit_labels: store row ->
    class of exactly those users. Steps cycle over the batches (Adam, lr). The module's
    requires_grad flags and train/eval mode are restored afterwards.
    """
    data = labelled(fit_batches, fit_labels)
    if not data:
        raise ValueError("instruction tuning: no FIT batches")
    tokens = initial_tokens(module, tokenizer, n_tokens, instruction, seed)
    data = [(move_data_to_device(with_instruction_slots(b, tokenizer, len(tokens)), module.device), y) for b, y in data]
    tokens = torch.nn.Parameter(tokens.to(module.device))
    optimizer = torch.optim.Adam([tokens], lr=lr)
    flags = [(p, p.requires_grad) for p in module.parameters()]
    was_training = module.training
    module.requires_grad_(False).eval()
    try:
        for step in range(steps):
            batch, y = data[step % len(data)]
            loss = prototype_loss(module.embed(batch, tokens), y.to(tokens.device), temperature)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"instruction tuning: non-finite prototype loss at step {step}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)
    return tokens.detach()


@torch.no_grad()
def embed_tuned(module: InstructUEJoint, batches: Iterable[dict], tokenizer: Any, tokens: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(store rows, user vectors [N, H]) of universal batches embedded with the tuned instruction tokens instead (eval mode)."""
    was_training = module.training
    module.eval()
    rows, vectors = [], []
    try:
        for batch in batches:
            rows.append(batch["index"].numpy())
            slotted = move_data_to_device(with_instruction_slots(batch, tokenizer, len(tokens)), module.device)
            vectors.append(module.embed(slotted, tokens.to(module.device)).cpu())
    finally:
        module.train(was_training)
    return np.concatenate(rows), torch.cat(vectors)


def tuned_embeddings(module: InstructUEJoint, dm: InstructDataModule, seed: int, fractions: Sequence[float]) -> dict[str, np.ndarray]:
    """Target -> every user's embedding [U, H] with that target's tuned instruction (`model.tuned_targets`).

    The tokens fit on the target's FIT users of the probe's own split (same seed and fractions),
    so the VAL/TEST users the probe scores never lend a label to the tuning.
    """
    from evaluation.probe import fit_side

    config, targets = dm.config, {t.name: t for t in dm.data.targets}
    out = {}
    for name in config.tuned_targets:
        if name not in targets:
            raise ValueError(f"model.tuned_targets: {name!r} is no probe target; the targets are {list(targets)}")
        _, fit, y = fit_side(targets[name], seed, fractions)
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError(f"model.tuned_targets: {name!r} is multi-label; the prototype loss needs one class per user")
        rows = np.flatnonzero(fit & (y >= 0))
        tokens = tune_instruction(
            module, rows_loader(dm, rows, shuffle=True), {int(r): int(y[r]) for r in rows}, dm.tokenizer,
            n_tokens=config.tune_tokens, instruction=config.instructions.get(name, ""), steps=config.tune_steps,
            lr=config.tune_lr, temperature=config.tune_temperature, seed=seed,
        )  # fmt: skip
        _, vectors = embed_tuned(module, rows_loader(dm, np.arange(len(dm.data.store))), dm.tokenizer, tokens)
        out[name] = vectors.numpy()
    return out
