"""Instruction tuning of InstructUEJoint: the prototype loss by hand, and tuning end to end on ml100k with the tiny MiniLM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lit_modules.instruct_tuning import embed_tuned, rows_loader, tune_instruction, with_instruction_slots
from lit_modules.instruct_ue_loss import prototype_loss

# Four users in 2-D: class 0 = (1,0), (0,1); class 1 = (-1,0), (0,-1) (unnormalised below: the loss normalises).
# Prototypes: (1,1)/sqrt2 and (-1,-1)/sqrt2; each user's cosine is +1/sqrt2 to its own, -1/sqrt2 to the other,
# so every user's loss is log(1 + exp(-sqrt2 / tau)).
USERS = torch.tensor([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0], [0.0, -7.0]])
LABELS = torch.tensor([0, 0, 1, 1])
# Labels [0, 1, 1, 1]: prototype 0 = (1,0); prototype 1 = normalise(mean((0,1), (-1,0), (0,-1))) = (-1,0).
# Users 1 and 3 have cosines (+1, -1) to own and other: log(1 + e^(-2/tau)) each; users 2 and 4 have 0 and 0: log 2 each.
ALONE = torch.tensor([0, 1, 1, 1])


def test_prototype_loss_by_hand():
    assert prototype_loss(USERS, LABELS, 1.0).item() == pytest.approx(0.2176217, abs=1e-6)  # log(1 + e^-1.4142136)
    assert prototype_loss(USERS, LABELS, 0.5).item() == pytest.approx(0.0574249, abs=1e-6)  # log(1 + e^-2.8284271)
    assert prototype_loss(USERS, torch.tensor([7, 7, 2, 2]), 1.0).item() == pytest.approx(0.2176217, abs=1e-6)  # any class ids
    assert prototype_loss(USERS, ALONE, 1.0).item() == pytest.approx(0.4100376, abs=1e-6)  # (2 * 0.1269280 + 2 * 0.6931472) / 4
    assert prototype_loss(USERS, torch.zeros(4, dtype=torch.long), 1.0).item() == pytest.approx(0.0, abs=1e-7)  # one class


def test_prototype_loss_gradient_and_small_temperature():
    users = USERS.clone().requires_grad_(True)
    prototype_loss(users, LABELS, 0.5).backward()
    assert users.grad is not None and users.grad.abs().sum() > 0
    assert (users.grad[0] * torch.tensor([0.0, 1.0])).sum() < 0  # descent moves user 1 towards its class mean (1,1)
    half = (USERS * 1000).half()  # fp16-scale inputs
    assert prototype_loss(half, LABELS, 0.01).item() == pytest.approx(0.0, abs=1e-6)  # log(1 + e^-141.4)
    assert prototype_loss(half, ALONE, 0.01).item() == pytest.approx(math.log(2) / 2, rel=1e-5)


@pytest.fixture(scope="module")
def trained(ml100k_cache, tiny_minilm_dir):
    """A tiny InstructUEJoint after one training step, its datamodule, and a seeded 50/50 FIT/EVAL split of labelled users.

    Mean pooling: the random tiny backbone gives every user the same final <USER> state (cosine 1 to five digits),
    which leaves the prototype loss flat at log 2; the mean over the prompt carries each user's soft tokens.
    """
    from datamodules.config import DataConfig
    from datamodules.datamodule import EventDataModule
    from experiments.build import build_datamodule, build_module
    from experiments.config import compose, to_dataclass
    from lit_modules.instruct_ue_config import InstructUEConfig

    cfg = compose([f"data.cache_dir={ml100k_cache}", "data.batch_size=8"])
    events = EventDataModule(to_dataclass(cfg.data, DataConfig), seed=0)
    config = InstructUEConfig(model_path=str(tiny_minilm_dir), encoder_path=str(tiny_minilm_dir), pooling="mean")
    torch.manual_seed(0)
    module, dm = build_module(config, events.data), build_datamodule(config, events)
    module.train()
    optimizer = torch.optim.AdamW(module.param_groups(), lr=1e-3)
    sum(module.losses(next(iter(dm.train_dataloader()))).values()).backward()
    optimizer.step()
    module.eval()
    target = events.data.targets[0]
    labels = np.asarray(target.labels)
    rows = np.flatnonzero(labels >= 0)
    rows = np.random.default_rng(0).permutation(rows)[:32]
    return module, dm, target, labels, rows[:16], rows[16:]


def test_the_slots_hold_the_instruction_where_the_collator_puts_its_text(trained):
    """Tuned tokens equal to an instruction's embedding rows give exactly the embedding of that instruction as text."""
    module, dm, _, _, fit, _ = trained
    text = "which genres does this user prefer?"
    ids = dm.tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = module.llm.get_input_embeddings().weight[torch.tensor(ids)].detach()
    with torch.no_grad():
        batch = next(iter(rows_loader(dm, fit)))
        slotted = with_instruction_slots(batch, dm.tokenizer, len(ids))
        assert (slotted["instruction_slots"].sum(1) == len(ids)).all()
        assert (slotted["input_ids"][torch.arange(len(fit[:8])), slotted["user_pos"]] == module.user_token_id).all()
        asked = dm.instruction_loader(text)
        as_text = module.embed(asked.collate_fn([asked.dataset[int(r)] for r in fit[:8]]))
        tuned = module.embed(slotted, tokens)
        universal = module.embed(batch)
    torch.testing.assert_close(tuned, as_text, rtol=1e-4, atol=1e-5)
    assert (tuned - universal).abs().max() > 1e-3


def fit_loss(module, dm, rows, labels, tokens) -> float:
    _, vectors = embed_tuned(module, rows_loader(dm, rows), dm.tokenizer, tokens)
    return prototype_loss(vectors, torch.from_numpy(labels[rows]), 0.07).item()


def test_tuning_fits_only_the_instruction_tokens_on_fit_users(trained):
    module, dm, _, labels, fit, evaluation = trained
    fit_labels = {int(r): int(labels[r]) for r in fit}  # FIT users only: EVAL labels never reach the tuning
    before = {k: v.clone() for k, v in module.state_dict().items()}
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    start = tune_instruction(module, rows_loader(dm, fit, shuffle=True), fit_labels, dm.tokenizer, n_tokens=3, steps=0, seed=1)
    tokens = tune_instruction(module, rows_loader(dm, fit, shuffle=True), fit_labels, dm.tokenizer, n_tokens=3, steps=30, lr=0.05, seed=1)
    assert start.shape == tokens.shape == (3, 64) and (tokens != start).any()
    assert fit_loss(module, dm, fit, labels, tokens) < fit_loss(module, dm, fit, labels, start) - 1e-3
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every weight and buffer of the model unchanged
    assert {n: p.requires_grad for n, p in module.named_parameters()} == flags and not module.training
    rows, vectors = embed_tuned(module, rows_loader(dm, evaluation), dm.tokenizer, tokens)
    assert rows.tolist() == evaluation.tolist() and vectors.shape == (len(evaluation), 64) and torch.isfinite(vectors).all()
    with torch.no_grad():
        universal = torch.cat([module.embed(b) for b in rows_loader(dm, evaluation)])
    assert (vectors - universal).abs().max() > 1e-3


def test_tuning_refuses_users_without_a_fit_label_and_starts_from_text(trained):
    module, dm, _, labels, fit, evaluation = trained
    fit_labels = {int(r): int(labels[r]) for r in fit}
    with pytest.raises(ValueError, match="no FIT label"):
        tune_instruction(module, rows_loader(dm, evaluation), fit_labels, dm.tokenizer, n_tokens=2, steps=1)
    text = "gender of this user"
    ids = dm.tokenizer(text, add_special_tokens=False)["input_ids"]
    start = tune_instruction(module, rows_loader(dm, fit), fit_labels, dm.tokenizer, instruction=text, steps=0)
    torch.testing.assert_close(start, module.llm.get_input_embeddings().weight[torch.tensor(ids)].detach())


@pytest.mark.slow  # the experiment smoke test runs this preset and checks its tuned rows; this one adds nothing but time
def test_the_tuned_preset_writes_and_probes_tuned_embeddings(ml100k_cache, tiny_minilm_dir, tmp_path):
    import json

    import polars as pl

    from experiments.config import compose
    from experiments.run import run

    args = ["experiment=instructue_tuned_ml100k", "trainer.fast_dev_run=true", "logger.wandb=false", "probe.baselines=[]",
            f"output_dir={tmp_path / 'out'}", "run_name=r", f"model.model_path={tiny_minilm_dir}", f"model.encoder_path={tiny_minilm_dir}",
            f"data.cache_dir={ml100k_cache}", "model.tuned_targets=[gender]", "model.tune_steps=2", "model.instructions={gender: 'Woman or man?'}"]  # fmt: skip
    result = run(compose(args))
    universal = pl.read_parquet(result.run_dir / "embeddings.parquet")
    tuned = pl.read_parquet(result.run_dir / "embeddings_gender_tuned.parquet")
    assert tuned["user_id"].to_list() == universal["user_id"].to_list()
    assert np.abs(np.stack(tuned["embedding"].to_numpy()) - np.stack(universal["embedding"].to_numpy())).max() > 1e-4
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert np.isfinite(metrics["tuned/probe_test/gender/auc"])
    assert {k.split("/")[2] for k in metrics if k.startswith("tuned/")} == {"gender"}


def test_bad_tuning_keys_name_themselves():
    from lit_modules.instruct_ue_config import InstructUEConfig

    for key, value in (("tune_tokens", 0), ("tune_steps", -1), ("tune_temperature", 0.0)):
        with pytest.raises(ValueError, match=f"model.{key}"):
            InstructUEConfig(**{key: value})
