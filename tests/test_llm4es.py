"""LLM4ES fine-tuning module and the frozen LM feature extractor on tiny local models."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertLMHeadModel, Qwen2Config, Qwen2ForCausalLM

from datamodules.text_batches import IGNORE, TextBatchBuilder
from lit_modules.llm4es import LLM4ESFinetune, LMFeatureExtractor
from lit_modules.llm4es_config import POOLINGS
from lit_modules.lm import MINILM, load_tokenizer, minilm_decoder

VOCAB = 100


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """A tiny Qwen2 (RoPE) and a tiny BERT (absolute positions, saved as an encoder) in local folders."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=1, **small)).save_pretrained(root / "qwen2")
    BertLMHeadModel(BertConfig(hidden_dropout_prob=0.0, **small)).save_pretrained(root / "bert")
    return {"qwen2": str(root / "qwen2"), "bert": str(root / "bert")}


def docs(n: int = 5, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (n,), generator=gen).tolist()
    return [{"index": i, "input_ids": torch.randint(5, VOCAB, (k,), generator=gen).tolist()} for i, k in enumerate(lengths)]


def padded(items: list[dict], side: str = "right", extra: int = 0) -> dict:
    """A padded batch, optionally with `extra` more pad columns on the padding side."""
    batch = TextBatchBuilder(0, padding_side=side)(items)
    if extra:
        pad = (extra, 0) if side == "left" else (0, extra)
        batch = {
            "index": batch["index"],
            "input_ids": F.pad(batch["input_ids"], pad),
            "attention_mask": F.pad(batch["attention_mask"], pad),
            "position_ids": F.pad(batch["position_ids"], pad),
            "labels": F.pad(batch["labels"], pad, value=IGNORE),
        }
    return batch


def module(model_dirs, arch: str = "qwen2", **kw) -> LLM4ESFinetune:
    """The module on a tiny local model; from_layer -2 = both layers (the default -4 needs 3+ layers)."""
    torch.manual_seed(0)
    return LLM4ESFinetune(model_path=model_dirs[arch], **{"from_layer": -2, **kw}).eval()


def test_loads_from_local_folder_offline(model_dirs, tmp_path):
    m = module(model_dirs)
    saved = Qwen2ForCausalLM.from_pretrained(model_dirs["qwen2"])
    assert torch.equal(m.model.model.embed_tokens.weight, saved.model.embed_tokens.weight)
    assert m.hparams.betas == [0.9, 0.95] and m.hparams.lora_targets is None
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        LLM4ESFinetune(model_path="Qwen/Qwen2.5-0.5B")  # a hub id is not a local folder
    with pytest.raises(ValueError, match="from_layer"):
        LLM4ESFinetune(model_path=model_dirs["qwen2"], from_layer=-4)  # 2 layers: 3 hidden states


@pytest.mark.parametrize("arch", ["qwen2", "bert"])
def test_loss_ignores_padding(model_dirs, arch):
    m = module(model_dirs, arch)
    items = docs()
    with torch.no_grad():
        ref = m.loss(padded(items))
        for side, extra in [("right", 6), ("left", 0), ("left", 6)]:
            assert torch.allclose(m.loss(padded(items, side, extra)), ref, atol=1e-5)
        one = torch.stack([m.loss(padded([it])) for it in items])
    n_targets = torch.tensor([len(it["input_ids"]) - 1 for it in items], dtype=torch.float)
    assert torch.allclose((one * n_targets).sum() / n_targets.sum(), ref, atol=1e-5)  # a mean over real targets only


@pytest.mark.parametrize("arch", ["qwen2", "bert"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_embedding_independent_of_padding_and_batch(model_dirs, arch, pooling):
    m = module(model_dirs, arch, pooling=pooling)
    items = docs()
    with torch.no_grad():
        ref = m.embed(padded(items))
        assert ref.dtype == torch.float32 and ref.shape == (len(items), 32)
        for side, extra in [("right", 5), ("left", 0), ("left", 5)]:
            assert torch.allclose(m.embed(padded(items, side, extra)), ref, atol=1e-5)
        alone = torch.cat([m.embed(padded([it])) for it in items])
    assert torch.allclose(alone, ref, atol=1e-5)
    assert (ref[0] - ref[1]).abs().max() > 1e-4  # users differ


def test_poolings_read_the_intended_states(model_dirs):
    items = docs(3)
    batch = padded(items, "left", 2)
    with torch.no_grad():
        states = module(model_dirs)(batch, output_hidden_states=True).hidden_states
        real = batch["attention_mask"].bool()
        mean = lambda h: (h * real[..., None]).sum(1) / real.sum(1, keepdim=True)  # noqa: E731
        assert torch.allclose(module(model_dirs, from_layer=1).embed(batch), mean((states[1] + states[2]) / 2), atol=1e-5)
        assert torch.allclose(module(model_dirs, pooling="last_layer_mean").embed(batch), mean(states[-1]), atol=1e-5)
        assert torch.allclose(module(model_dirs, pooling="last_token").embed(batch), states[-1][:, -1], atol=1e-5)


@pytest.mark.parametrize("arch,impl", [("qwen2", "eager"), ("qwen2", "sdpa"), ("bert", "sdpa")])
def test_packed_training_batches_keep_documents_apart(model_dirs, arch, impl):
    # BERT decoders ignore position_ids when masking: the module's 4-D mask keeps documents apart there too
    m = module(model_dirs, arch, attn_implementation=impl)
    items = docs(6)
    packed = TextBatchBuilder(0, pack_length=24)(items)
    assert len(packed["input_ids"]) < len(items)
    with torch.no_grad():
        logits = m(packed).logits
        for k, row in enumerate(packed["index"].tolist()):
            alone = m(padded([items[row]])).logits[0]
            assert torch.allclose(logits[packed["seq_idx"] == k], alone, atol=1e-5)
        ref = m.loss(padded(items))
        assert torch.allclose(m.loss(packed), ref, atol=1e-5)  # same targets, same loss


def test_lora_trains_only_adapters(model_dirs):
    m = module(model_dirs, lora=True, lora_r=4, lr=1e-2)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable if "layers.0." in n} == {"q_proj", "v_proj"}  # peft's qwen2 default
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    fit(m, padded(docs()), steps=2)
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trainable)


def fit(m: L.LightningModule, batch: dict, steps: int) -> L.Trainer:
    """`steps` optimizer steps on the same batch."""
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None)
    m.train()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(m, loader)
    return trainer


def test_tiny_fit_reduces_loss_and_checkpoint_loads(model_dirs, tmp_path):
    items = [{"index": i, "input_ids": [7, 8, 9, 10, 11, 12, 13, 14]} for i in range(4)]  # the same text, repeated
    eval_batch = padded(items)
    m = module(model_dirs, lr=3e-2, warmup_steps=2)
    with torch.no_grad():
        before = m.loss(eval_batch).item()
    trainer = fit(m, TextBatchBuilder(0, pack_length=16)(items), steps=8)
    assert trainer.optimizers[0].param_groups[0]["lr"] < 1e-4  # cosine ran down to the end
    m.eval()
    with torch.no_grad():
        after = m.loss(eval_batch).item()
        assert after < 0.5 * before
        trainer.save_checkpoint(tmp_path / "m.ckpt")
        loaded = LLM4ESFinetune.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True).eval()
        assert torch.allclose(loaded.embed(eval_batch), m.embed(eval_batch))


def test_minilm_decoder_from_package():
    model = minilm_decoder()
    assert type(model).__name__ == "BertLMHeadModel" and model.config.is_decoder
    tok = load_tokenizer(MINILM)
    texts = ["event type: purchase; timestamp: 2024-01-01 09:05; merchant: grocery", "event type: refund"]
    items = [{"index": i, "input_ids": tok(t)["input_ids"]} for i, t in enumerate(texts)]
    m = LLM4ESFinetune(model_path=MINILM).eval()
    batch = padded(items)
    with torch.no_grad():
        emb = m.embed(batch)
        assert emb.shape == (2, 384) and torch.isfinite(emb).all()
        # causal: changing a later token leaves earlier positions' logits alone
        changed = {**batch, "input_ids": batch["input_ids"].clone()}
        changed["input_ids"][0, 6] = 2000
        a, b = m(batch).logits[0], m(changed).logits[0]
        assert torch.allclose(a[:6], b[:6], atol=1e-5) and not torch.allclose(a[6:], b[6:], atol=1e-3)


def test_feature_extractor_is_frozen_and_deterministic(model_dirs):
    fx = LMFeatureExtractor(model_path=model_dirs["qwen2"])
    assert sum(p.numel() for p in fx.parameters()) > 0
    assert not any(p.requires_grad for p in fx.parameters())
    items = docs()
    first = fx.embed(padded(items))
    fx.train()
    assert not fx.model.training
    assert torch.equal(fx.embed(padded(items)), first)
    assert torch.allclose(fx.predict_step(padded(items, "left", 3)), first, atol=1e-5)
    assert first.shape == (len(items), 32) and torch.isfinite(first).all()


def test_finetuned_model_starts_in_train_mode(tmp_path):
    """from_pretrained returns eval mode; fine-tuning must not silently run with dropout off."""
    model = LLM4ESFinetune(model_path=MINILM)
    assert model.model.training and all(m.training for m in model.model.modules())


def test_random_causal_lm_loads_and_fine_tunes_through_the_same_path(tmp_path):
    from lit_modules.random_lm import save_random_causal_lm

    path = save_random_causal_lm(tmp_path / "rand", MINILM, num_hidden_layers=2)
    model = LLM4ESFinetune(model_path=str(path), from_layer=-2)
    pretrained = minilm_decoder()
    assert type(model.model) is type(pretrained) and model.model.config.is_decoder
    emb = model.model.get_input_embeddings().weight
    assert not torch.allclose(emb, pretrained.get_input_embeddings().weight)
    tok = load_tokenizer(str(path))
    enc = tok(["event type: 5; item: Toy Story"], return_tensors="pt")
    batch = {"index": torch.tensor([0]), "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    assert model.embed(batch).shape == (1, 384)
    assert tok("event type: 5")["input_ids"] == load_tokenizer(MINILM)("event type: 5")["input_ids"]
