"""InstructUEJoint on real ml100k data with the tiny random MiniLM (tests/conftest.py) as LLM and encoder."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from datamodules.instruct_batches import InstructCollator
from datamodules.text_batches import IGNORE
from datamodules.user_inputs import USER_TOKEN
from lit_modules.instruct_ue import Standardizer, chunk_means
from lit_modules.instruct_ue_tokens import llm_tokenizer
from lit_modules.instruct_ue_config import InstructUEConfig
from lit_modules.lm import load_tokenizer


@pytest.fixture(scope="module")
def events(ml100k_cache):
    from datamodules.config import DataConfig
    from datamodules.datamodule import EventDataModule
    from experiments.config import compose, to_dataclass

    cfg = compose([f"data.cache_dir={ml100k_cache}", "data.batch_size=6"])
    return EventDataModule(to_dataclass(cfg.data, DataConfig), seed=0)


def build(events, tiny_minilm_dir, **keys):
    from experiments.build import build_datamodule, build_module

    config = InstructUEConfig(model_path=str(tiny_minilm_dir), encoder_path=str(tiny_minilm_dir), **keys)
    torch.manual_seed(0)
    return build_module(config, events.data), build_datamodule(config, events)


def first_batch(loader) -> dict:
    return next(iter(loader))


def test_user_is_an_added_token_and_its_row_trains_under_lora(events, tiny_minilm_dir):
    base = load_tokenizer(str(tiny_minilm_dir))
    tok = llm_tokenizer(str(tiny_minilm_dir))
    assert len(tok) == len(base) + 1 and USER_TOKEN in tok.all_special_tokens
    assert tok(f"a {USER_TOKEN} b", add_special_tokens=False)["input_ids"][1] == tok.convert_tokens_to_ids(USER_TOKEN)
    module, dm = build(events, tiny_minilm_dir)
    user = module.user_token_id
    assert user == len(base) and module.llm.get_input_embeddings().weight.shape[0] == len(tok)
    before = module.llm.get_input_embeddings().weight.detach().clone()
    opt = torch.optim.AdamW(module.param_groups(), lr=1e-2, weight_decay=0.1)
    batch = first_batch(dm.train_dataloader())
    assert (batch["input_ids"] == user).sum() == len(batch["index"])  # one <USER> per example, at user_pos
    assert (batch["input_ids"][torch.arange(len(batch["index"])), batch["user_pos"]] == user).all()
    module.train()
    sum(module.losses(batch).values()).backward()
    opt.step()
    after = module.llm.get_input_embeddings().weight.detach()
    changed = (after != before).any(1).nonzero().flatten().tolist()
    assert changed == [user]  # the <USER> row trains, every pretrained row stays (LoRA)


def test_gradients_reach_adapters_lora_and_the_user_row_not_the_frozen_encoder(events, tiny_minilm_dir):
    module, dm = build(events, tiny_minilm_dir)
    module.train()
    parts = module.losses(first_batch(dm.train_dataloader()))
    assert set(parts) == {"lm", "cl"} and all(torch.isfinite(v) for v in parts.values())
    sum(parts.values()).backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("source_adapters.0") for n in grads) and any(n.startswith("tabular_adapter") for n in grads)
    assert any("lora_B" in n for n in grads)  # (lora_A's gradient is 0 while lora_B is at its zero init)
    emb_grad = module.llm.get_input_embeddings().weight.grad
    assert emb_grad.abs().sum(1).nonzero().flatten().tolist() == [module.user_token_id]
    assert not any(n.startswith("encoder.") for n in grads)


def test_the_collated_sequence(events, tiny_minilm_dir):
    config = InstructUEConfig(model_path=str(tiny_minilm_dir), encoder_path=str(tiny_minilm_dir), soft_tokens=3)
    from lit_modules.instruct_ue_tokens import load_tokenizers

    tok, enc, user = load_tokenizers(config)
    dm = build(events, tiny_minilm_dir, soft_tokens=3)[1]
    items = [dm.qa_dataset(val=False)[i] for i in range(4)]
    batch = InstructCollator(tok, enc, user, config, with_answers=True)(items)
    for i, item in enumerate(items):
        pos = int(batch["user_pos"][i])
        slots = batch["slots"][i]
        assert slots[slots >= 0].tolist() == list(range(2 * 3))  # ratings then tabular, 3 soft tokens each, in order
        assert (slots[pos:] == -1).all()
        answer = tok(item.answer, add_special_tokens=False)["input_ids"][: config.max_answer_tokens] + [tok.sep_token_id]
        real = batch["attention_mask"][i].bool()
        assert batch["input_ids"][i][real][pos + 1 :].tolist() == answer
        assert batch["labels"][i][real][pos + 1 :].tolist() == answer and (batch["labels"][i][: pos + 1] == IGNORE).all()
        assert batch["answer_ids"][i][batch["answer_mask"][i].bool()].tolist() == [tok.cls_token_id, *answer]
        prompt = tok.decode(batch["input_ids"][i][: pos + 1])
        instruction = tok.decode(tok(item.instruction, add_special_tokens=False)["input_ids"])
        assert instruction in prompt and ("instruction :" in prompt) == bool(item.instruction) and prompt.endswith(USER_TOKEN)
    assert batch["enc_ids"].shape[0] == 4 and batch["tabular"].shape == (4, len(items[0].tabular))
    text_only = dataclasses.replace(config, modality_encoders=False, use_tabular=False)
    batch = InstructCollator(tok, None, user, text_only, with_answers=False)(items[:1])
    assert (batch["slots"] == -1).all() and "enc_ids" not in batch and "tabular" not in batch and "answer_ids" not in batch
    prompt = tok.decode(batch["input_ids"][0])
    assert "< ratings >" in prompt and "tabular" not in prompt and prompt.endswith(USER_TOKEN)


def test_embedding_ignores_batch_mates_and_padding_and_follows_the_instruction(events, tiny_minilm_dir):
    module, dm = build(events, tiny_minilm_dir)
    module.eval()
    universal, asked = dm.instruction_loader(""), dm.instruction_loader("Which genres does this user prefer?")
    with torch.no_grad():
        batch = first_batch(universal)
        together = module.embed(batch)
        collate = universal.collate_fn
        alone = module.embed(collate([universal.dataset[1]]))
        instructed = module.embed(first_batch(asked))
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)
    assert together.shape == (len(batch["index"]), 64)
    assert (instructed - together).abs().max() > 1e-3


def test_the_training_user_vector_is_the_embedding_of_the_prompt(events, tiny_minilm_dir):
    """Causal attention: the answer after <USER> leaves the user vector as `embed` computes it without the answer."""
    module, dm = build(events, tiny_minilm_dir, pooling="mean")
    module.eval()
    items = [dm.qa_dataset(val=True)[i] for i in range(3)]
    with_answer = InstructCollator(dm.tokenizer, dm.encoder_tokenizer, dm.user_token_id, dm.config, with_answers=True)(items)
    without = InstructCollator(dm.tokenizer, dm.encoder_tokenizer, dm.user_token_id, dm.config, with_answers=False)(items)
    with torch.no_grad():
        states, _ = module.final_states(with_answer, int(with_answer["user_pos"].min()))
        torch.testing.assert_close(module.user_vectors(states, with_answer), module.embed(without), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keys", [{"modality_encoders": False, "max_source_tokens": 160}, {"use_sequence": False}, {"use_tabular": False}, {"alpha_lm": 0.0}, {"lora": False}])
def test_ablations_train_one_step(events, tiny_minilm_dir, keys):
    module, dm = build(events, tiny_minilm_dir, **keys)
    module.train()
    parts = module.losses(first_batch(dm.train_dataloader()))
    assert set(parts) == ({"cl"} if keys.get("alpha_lm") == 0 else {"lm", "cl"})
    sum(parts.values()).backward()
    assert (module.encoder is None) == (not keys.get("modality_encoders", True) or not keys.get("use_sequence", True))
    assert (module.tabular_adapter is None) == (not keys.get("modality_encoders", True) or not keys.get("use_tabular", True))
    rows_with_grad = (module.llm.get_input_embeddings().weight.grad.abs().sum(1) > 0).sum().item()
    assert (rows_with_grad > 1) == (keys.get("lora") is False)  # full fine-tuning trains every row the batch reads


def test_bad_configs_name_their_key(events, tiny_minilm_dir):
    with pytest.raises(ValueError, match=r"model.instructions.favourite_colour: no probe target"):
        build(events, tiny_minilm_dir, instructions={"favourite_colour": "What colour?"})
    with pytest.raises(ValueError, match="alpha_lm"):
        InstructUEConfig(alpha_lm=0.0, alpha_cl=0.0)
    with pytest.raises(ValueError, match="use_sequence"):
        InstructUEConfig(use_sequence=False, use_tabular=False)
    with pytest.raises(ValueError, match="model.pooling"):
        InstructUEConfig(pooling="cls")
    module, dm = build(events, tiny_minilm_dir, modality_encoders=False, max_source_tokens=600)
    with pytest.raises(ValueError, match=r"exceeds the 512 positions .*model.max_source_tokens"):
        module.embed(first_batch(dm.instruction_loader("")))


def test_standardizer_keeps_exact_running_moments_and_freezes_in_eval():
    rng = np.random.default_rng(0)
    batches = [rng.normal([1.0, 100.0], [2.0, 30.0], (n, 2)).astype(np.float32) for n in (5, 9, 3)]
    std = Standardizer(2).train()
    for b in batches:
        std(torch.from_numpy(b))
    seen = np.concatenate(batches)
    np.testing.assert_allclose(std.mean.numpy(), seen.mean(0), rtol=1e-5)
    x = torch.tensor([[3.0, 40.0]])
    expected = (x.numpy() - seen.mean(0)) / seen.std(0)
    std.eval()
    np.testing.assert_allclose(std(x).numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(std(x).numpy(), expected, rtol=1e-4)  # eval never updates


def test_chunk_means_by_hand():
    states = torch.arange(12, dtype=torch.float32).view(2, 6, 1)
    real = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out = chunk_means(states, real, 2)[..., 0]
    assert out[0].tolist() == [0.5, 2.5]  # tokens 0,1 | 2,3; pads left out
    assert out[1].tolist() == [6.0, 6.0]  # one token: the chunk it falls in, and the empty chunk takes the whole mean


@pytest.mark.slow  # the experiment smoke test runs instructue_recsys2025 and checks its instructed rows too
def test_a_run_writes_and_probes_each_targets_instructed_embeddings(recsys_dir, tiny_minilm_dir, tmp_path):
    import json

    import polars as pl

    from experiments.config import compose
    from experiments.run import run
    from tests.helpers import data_args_for

    args = ["experiment=instructue_recsys2025", "trainer.fast_dev_run=true", "logger.wandb=false", "probe.baselines=[]",
            f"output_dir={tmp_path / 'out'}", "run_name=r", f"model.model_path={tiny_minilm_dir}", f"model.encoder_path={tiny_minilm_dir}",
            *data_args_for("recsys2025", None, None, recsys_dir, tmp_path)]
    result = run(compose(args))
    universal = pl.read_parquet(result.run_dir / "embeddings.parquet")
    churn = pl.read_parquet(result.run_dir / "embeddings_churn.parquet")
    assert churn["user_id"].to_list() == universal["user_id"].to_list()
    assert np.abs(churn["embedding"].to_numpy() - universal["embedding"].to_numpy()).max() > 1e-3
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert np.isfinite(metrics["instructed/probe_test/churn/auc"])
    assert np.isfinite(metrics["instructed/downstream_test/propensity_category/score"])  # the preset's two instructed targets
    instructed = {k.split("/")[2] for k in metrics if k.startswith("instructed/")}
    assert instructed == {"churn", "propensity_category"}  # each target probed on its own instruction only
    assert (result.run_dir / "embeddings_propensity_category.parquet").is_file()


def test_the_encoder_cache_gives_the_uncached_embeddings_and_losses(events, tiny_minilm_dir):
    """Cached chunk means (filled up front, shortest texts first, or on a miss) equal the encoder run on the batch itself."""
    cached, dm = build(events, tiny_minilm_dir)
    plain, _ = build(events, tiny_minilm_dir, encoder_cache=False)
    assert plain.encoder_cache is None and cached.encoder_cache == {}
    plain.load_state_dict(cached.state_dict())
    cached.eval(), plain.eval()
    loader = dm.instruction_loader("Which genres does this user prefer?")
    batches = [b for _, b in zip(range(2), loader)]
    with torch.no_grad():
        lazy = torch.cat([cached.embed(b) for b in batches])  # misses: encoded with this batch's rows only
        assert len(cached.encoder_cache) == sum(len(b["index"]) for b in batches)  # ml100k: one source per user
        again = torch.cat([cached.embed(b) for b in batches])  # hits
        expected = torch.cat([plain.embed(b) for b in batches])
    torch.testing.assert_close(lazy, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, lazy, rtol=0, atol=0)
    texts = dm.encoder_texts()
    rows = {t.row for t in dm.triples()}
    assert len(texts) >= len(rows) == len(events.data.store)  # every user's whole history, plus the predictive cuts
    cached.load_state_dict(plain.state_dict())  # the same encoder weights (a best checkpoint): the cache stays
    assert len(cached.encoder_cache) == sum(len(b["index"]) for b in batches)
    state = {k: v + 1e-3 if k.startswith("encoder.") and v.is_floating_point() else v for k, v in cached.state_dict().items()}
    cached.load_state_dict(state)  # other encoder weights: the cache is emptied
    assert cached.encoder_cache == {}
    cached.load_state_dict(plain.state_dict())
    added = cached.fill_encoder_cache(dm.encoder_batches(texts))
    assert added == len(cached.encoder_cache) == len(texts)
    train = first_batch(dm.train_dataloader())
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([cached.embed(b) for b in batches]), expected, rtol=0, atol=1e-6)
        cached_loss, plain_loss = cached.losses(train), plain.losses(train)
    assert len(cached.encoder_cache) == len(texts)  # every training input was filled up front: no miss
    for part in plain_loss:
        torch.testing.assert_close(cached_loss[part], plain_loss[part], rtol=0, atol=1e-5)


def test_the_encoder_cache_file_is_named_by_the_encoders_weights(events, tiny_minilm_dir, tmp_path):
    module, dm = build(events, tiny_minilm_dir)
    other, _ = build(events, tiny_minilm_dir)
    module.fill_encoder_cache(dm.encoder_batches(dm.encoder_texts()[:20]))
    path = tmp_path / f"{module.encoder_identity()}.safetensors"
    module.save_encoder_cache(path)
    assert other.encoder_identity() == module.encoder_identity()  # same frozen encoder, same file
    assert other.load_encoder_cache(path) == 20 and other.load_encoder_cache(path) == 0
    for key, value in module.encoder_cache.items():
        assert torch.equal(other.encoder_cache[key], value)
    with torch.no_grad():
        next(other.encoder.parameters()).add_(1e-3)
    assert other.encoder_identity() != module.encoder_identity()  # other weights: another file
    other, _ = build(events, tiny_minilm_dir, soft_tokens=3)
    assert other.encoder_identity() != module.encoder_identity()


@pytest.mark.parametrize("lora", [True, False])
def test_the_head_at_answer_positions_gives_the_full_logits_loss_and_gradients(events, tiny_minilm_dir, lora):
    """The LM head applied only where the answer loss reads it (and, under LoRA, only <USER>'s row of a tied head
    getting a gradient) leaves the loss and every gradient as the model's own logits at every position give them."""
    module, dm = build(events, tiny_minilm_dir, lora=lora)
    module.eval()  # no dropout: both passes see the same network
    batch = first_batch(dm.train_dataloader())
    tied = module.llm.get_output_embeddings().weight is module.llm.get_input_embeddings().weight
    assert tied and module.answer_head() is not None

    def run() -> tuple[dict, dict]:
        module.zero_grad()
        parts = module.losses(batch)
        sum(parts.values()).backward()
        return {k: v.detach() for k, v in parts.items()}, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    fast, fast_grads = run()
    assert module._head_checked and module._head is not None  # the check against the model's logits passed
    module._head = None  # the model's own logits from the first answer position on
    full, full_grads = run()
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == full_grads.keys() and any("lora" in n for n in fast_grads) == lora
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
