"""UQAAlign: adapters, what trains, the answer-only loss, candidate ranking, the prefix metric, the encoder run it needs."""

from __future__ import annotations

import json
import math
import shutil

import lightning.pytorch as L
import pytest
import torch

from datamodules.config import DataConfig
from datamodules.datamodule import EventDataModule
from datamodules.text_batches import IGNORE
from experiments.build import build_datamodule, build_module
from experiments.config import compose, to_dataclass
from lit_modules.uqa_align import MeanAdapter, QFormer, candidate_scores, prefix_hit, qa_metrics, ranked_choice
from lit_modules.uqa_align_config import UQAAlignConfig, encoder_run

PINNED_LOSS = 10.3804703  # val/loss after 3 steps (mean adapter, tiny MiniLM frozen); measured on the CPU torch of constraints.txt


@pytest.fixture(scope="module")
def encoder_out(ml100k_cache, tmp_path_factory):
    """An output folder holding one finished (one-step) uqa_trm_ml100k run: the encoder the align tests read."""
    from experiments.run import run

    out = tmp_path_factory.mktemp("uqa_encoder")
    run(compose([
        "experiment=uqa_trm_ml100k", f"data.cache_dir={ml100k_cache}", "trainer.fast_dev_run=true", "logger.wandb=false",
        f"output_dir={out}", "run_name=enc", "probe.baselines=[]", "model.hidden=16",
    ]))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def events(ml100k_cache) -> EventDataModule:
    cfg = compose([f"data.cache_dir={ml100k_cache}", "data.batch_size=8"])
    return EventDataModule(to_dataclass(cfg.data, DataConfig), seed=0)


def config(encoder_out, tiny_minilm_dir, **kw) -> UQAAlignConfig:
    return UQAAlignConfig(output_dir=str(encoder_out), model_path=str(tiny_minilm_dir), **kw)


def fit_steps(module, datamodule, steps: int, callbacks=()) -> dict[str, float]:
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=steps, limit_val_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, num_sanity_val_steps=0, callbacks=list(callbacks),
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


# ---------------------------------------------------------------- adapters


def test_mean_adapter_masks_padding():
    torch.manual_seed(0)
    adapter = MeanAdapter(8, 12)
    h = torch.randn(2, 5, 8)
    real = torch.arange(5)[None, :] < torch.tensor([3, 5])[:, None]
    out = adapter(h, real)
    assert out.shape == (2, 1, 12)
    garbage = h.clone()
    garbage[0, 3:] = float("nan")  # whatever sits at pads: NaN, huge values, more pad columns
    longer = torch.cat([garbage, torch.full((2, 4, 8), 1e6)], dim=1)
    real_longer = torch.cat([real, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(adapter(longer, real_longer), out)
    torch.testing.assert_close(out[0, 0], adapter.proj(h[0, :3]).mean(0))  # the mean over the real events, by hand


def test_qformer_gives_16_tokens_gradients_reach_the_queries_and_pads_do_not_count():
    torch.manual_seed(0)
    qf = QFormer(16, 24, queries=16, layers=1, heads=2)
    h = torch.randn(3, 7, 16)
    real = torch.arange(7)[None, :] < torch.tensor([2, 7, 4])[:, None]
    out = qf(h, real)
    assert out.shape == (3, 16, 24)
    out.square().mean().backward()
    assert qf.queries.grad is not None and qf.queries.grad.abs().sum() > 0
    padded = torch.where(real[..., None], h, torch.full_like(h, 1e4))
    torch.testing.assert_close(qf(padded, real), out.detach())


# ---------------------------------------------------------------- scoring


def bigram_logits(ids: torch.Tensor, probs: dict[int, dict[int, float]], vocab: int = 5) -> torch.Tensor:
    """A hand-built tiny LM: the next token depends on the current one only, P(next | current) = probs[current]."""
    table = torch.full((vocab, vocab), 1e-9)
    for cur, nxt in probs.items():
        for tok, p in nxt.items():
            table[cur, tok] = p
    return table.log()[ids]


def test_length_normalised_ranking_picks_what_the_tiny_model_makes_most_likely():
    # prompt [4, 0]; candidate A = [1, 2] (two tokens), candidate B = [3] (one token, then a pad 4)
    probs = {0: {1: 0.5, 3: 0.4, 2: 0.05, 4: 0.05}, 1: {2: 0.5, 0: 0.5}, 2: {4: 1.0}, 3: {4: 1.0}, 4: {0: 1.0}}
    ids = torch.tensor([[4, 0, 1, 2], [4, 0, 3, 4]])
    cand = torch.tensor([[False, False, True, True], [False, False, True, False]])
    logits = bigram_logits(ids, probs)
    scores = candidate_scores(logits, ids, cand)
    # by hand: A = (log .5 + log .5) / 2 = log .5; B = log .4. Summed, B would win (log .4 > log .25).
    torch.testing.assert_close(scores, torch.tensor([math.log(0.5), math.log(0.4)]))
    assert ranked_choice(scores, torch.tensor([0, 0]), 1).tolist() == [True, False]
    # the LM head kept only from the last prompt position on (what `score` asks the LLM for) gives the same
    torch.testing.assert_close(candidate_scores(logits[:, 1:], ids, cand, offset=1), scores)


def test_ranked_choice_per_question_and_ties_go_to_the_first_row():
    scores = torch.tensor([0.1, 0.3, 0.3, -1.0, -0.5])
    rows = torch.tensor([0, 0, 0, 1, 1])
    assert ranked_choice(scores, rows, 2).tolist() == [False, True, False, False, True]


def test_prefix_metric_can_never_credit_a_multi_token_answer(tiny_minilm_dir):
    from lit_modules.lm import load_tokenizer

    tok = load_tokenizer(str(tiny_minilm_dir))
    answer = "from Drama to Comedy"  # an interest-trajectory answer
    assert len(tok(answer, add_special_tokens=False)["input_ids"]) > 1
    assert not any(prefix_hit(tok.decode([t]), answer) for t in range(len(tok)))  # whichever single token is generated
    assert prefix_hit(tok.decode(tok(" drama", add_special_tokens=False)["input_ids"][:1]), "Drama")  # a one-token answer can be


def test_qa_metrics_per_subtask_group_and_overall():
    from datamodules.uqa_questions import Question

    def q(subtask):
        return Question(0, "u", subtask, "", "?", "a", ("a", "b"), 1)

    questions = [q("direct_feature"), q("match_feature"), q("match_feature"), q("item_prediction")]
    out = qa_metrics(questions, [True, False, True, False], [False, False, False, True], [3, 5, 5, 7])
    assert out["qa/direct_feature/acc"] == 1.0 and out["qa/match_feature/acc"] == 0.5
    assert out["qa/sequence_understanding/acc"] == pytest.approx(2 / 3) and out["qa/action_prediction/acc"] == 0.0
    assert out["qa/overall/acc"] == 0.5 and out["qa_prefix/overall/acc"] == 0.25 and out["qa/prompt_tokens"] == 5.0


# ---------------------------------------------------------------- batches and training


def test_loss_reads_only_the_answer_tokens(encoder_out, tiny_minilm_dir, events):
    cfg = config(encoder_out, tiny_minilm_dir, mode="mean")
    L.seed_everything(0, verbose=False)
    module, dm = build_module(cfg, events.data), build_datamodule(cfg, events)
    batch = next(iter(dm.val_dataloader()))
    questions = dm.split("val")[: len(batch["index"])]
    tok = dm.tokenizer
    for i, q in enumerate(questions):
        answer = tok(f" {q.answer}", add_special_tokens=False)["input_ids"][: cfg.max_answer_tokens] + [tok.sep_token_id]
        real = int(batch["attention_mask"][i].sum())
        trained = (batch["labels"][i] != IGNORE).nonzero().squeeze(1).tolist()
        assert trained == list(range(real - len(answer), real))  # the answer and its end token, nothing of the prompt
        assert batch["labels"][i, trained].tolist() == answer
        assert int(batch["slots"][i].sum()) == 1 and batch["prompt_len"][i] == real - len(answer)  # one soft token, counted once
    module.eval()
    logits = module(batch).logits
    by_hand = [torch.nn.functional.cross_entropy(logits[i, t - 1], batch["labels"][i, t], reduction="sum") for i in range(len(logits)) for t in (batch["labels"][i] != IGNORE).nonzero().squeeze(1).tolist()]
    torch.testing.assert_close(module.loss(batch), torch.stack(by_hand).mean())


def test_adapter_only_leaves_the_llm_and_encoder_unchanged(encoder_out, tiny_minilm_dir, events):
    cfg = config(encoder_out, tiny_minilm_dir, mode="qformer", lr=1e-2)
    L.seed_everything(0, verbose=False)
    module = build_module(cfg, events.data)
    llm = {k: v.clone() for k, v in module.llm.state_dict().items()}
    enc = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    adapter = {k: v.clone() for k, v in module.adapter.state_dict().items()}
    fit_steps(module, build_datamodule(cfg, events), 2)
    assert all(torch.equal(v, module.llm.state_dict()[k]) for k, v in llm.items())
    assert all(torch.equal(v, module.encoder.state_dict()[k]) for k, v in enc.items())
    assert not torch.equal(adapter["queries"], module.adapter.queries.detach())  # the adapter did train


def test_pinned_loss_after_three_steps(encoder_out, tiny_minilm_dir, events):
    cfg = config(encoder_out, tiny_minilm_dir, mode="mean", lr=1e-3)
    L.seed_everything(0, verbose=False)
    module = build_module(cfg, events.data)
    metrics = fit_steps(module, build_datamodule(cfg, events), 3)
    assert {"train/loss_answer", "val/loss_answer"} <= set(metrics)
    assert metrics["val/loss"] == pytest.approx(PINNED_LOSS, rel=1e-4)


def test_qformer_nan_is_caught_by_the_guard_naming_step_and_users(encoder_out, tiny_minilm_dir, events):
    from callbacks.nonfinite import NonFiniteError, NonFiniteGuard

    cfg = config(encoder_out, tiny_minilm_dir, mode="qformer")
    module = build_module(cfg, events.data)
    with torch.no_grad():
        module.adapter.queries[0, 0] = float("nan")  # what an unstable Q-Former produces
    dm = build_datamodule(cfg, events)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at global step 0 .*batch user ids: \[\d+"):
        fit_steps(module, dm, 1, callbacks=[NonFiniteGuard("error")])


def test_score_and_text_mode_prompt_tokens(encoder_out, tiny_minilm_dir, events):
    """run_metrics scores the TEST users' questions; text mode's prompts hold the events, the align prompts one soft token."""
    mean = config(encoder_out, tiny_minilm_dir, mode="mean")
    text = config(encoder_out, tiny_minilm_dir, mode="text", text_events=5, eval_batch_size=64)
    dm_mean, dm_text = build_datamodule(mean, events), build_datamodule(text, events)
    assert not set(q.user_id for q in dm_mean.split("test")) & set(q.user_id for q in dm_mean.split("val"))
    assert dm_mean.split("test") and dm_mean.split("val")
    module = build_module(text, events.data)
    assert module.encoder is None
    dm_text.split = lambda part: dm_mean.__class__.split(dm_text, part)[:10]  # ten TEST questions are enough here
    out = module.run_metrics(dm_text)
    assert out["qa/questions"] == 10 and 0.0 <= out["qa/overall/acc"] <= 1.0
    soft = next(iter(dm_mean.collator(scoring=True)(dm_mean.split("test")[:10])["prompt_len"]))
    assert out["qa/prompt_tokens"] > soft + 20  # five rendered events cost far more than one soft token


# ---------------------------------------------------------------- the encoder run


def test_missing_encoder_run_is_one_line_and_leaves_nothing(ml100k_cache, tiny_minilm_dir, tmp_path, capsys):
    from experiments.run import main

    out = tmp_path / "out"
    code = main([
        "experiment=uqa_align_mean_ml100k", f"data.cache_dir={ml100k_cache}", f"output_dir={out}",
        f"model.output_dir={tmp_path / 'nothing'}", f"model.model_path={tiny_minilm_dir}", "logger.wandb=false",
    ])  # fmt: skip
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("INFO ")]
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("config error: model.encoder_experiment: no finished run of experiment 'uqa_trm_ml100k'")
    assert not out.exists()


def test_encoder_run_on_other_data_is_refused(encoder_out, events, tmp_path):
    meta = events.data.meta
    assert encoder_run("uqa_trm_ml100k", str(encoder_out), meta).name == "enc"
    for key, change in (("cutoff", lambda s: s.update(cutoff="1990-01-01T00:00:00")), ("'genre'", lambda s: s["vocabs"]["genre"].reverse())):
        other = tmp_path / key.strip("'") / "uqa_trm_ml100k" / "enc"
        shutil.copytree(encoder_out / "uqa_trm_ml100k" / "enc", other)
        state = json.loads((other / "preprocess.json").read_text())
        change(state)
        (other / "preprocess.json").write_text(json.dumps(state))
        with pytest.raises(ValueError, match=key) as err:
            encoder_run("uqa_trm_ml100k", str(other.parents[1]), meta)
        assert "\n" not in str(err.value) and str(other) in str(err.value)


# ---------------------------------------------------------------- next_item_rec's held-out metrics


def test_next_item_val_is_the_second_to_last_item_and_test_the_last(encoder_out, events):
    """val/ reads each val user's history without its last item exactly as if that item did not exist; test/ the last item."""
    from experiments.finished_run import load_run
    from experiments.rundirs import latest_run
    from datamodules.sequences import Collator

    module = load_run(latest_run(encoder_out, "uqa_trm_ml100k")).module.eval()
    rows = [int(r) for r in events.data.is_val.nonzero()[0][:16]]
    batch = Collator(events.data.store)(rows)
    with torch.no_grad():
        val = module.heldout_metrics(*module.states(batch), skip=1)
        shorter = {**batch, "lengths": batch["lengths"] - 1}
        again = module.heldout_metrics(*module.states(shorter), skip=0)
        test = module.heldout_metrics(*module.states(batch), skip=0)
    for k in val:
        torch.testing.assert_close(val[k], again[k])
    assert set(val) == {"recall@10", "ndcg@10", "recall@20", "ndcg@20"} and 0 < len(test["recall@10"]) <= len(rows)  # users with a real last item
    out = module.run_metrics(events)
    assert {"val/recall@10", "val/ndcg@10", "test/recall@10", "test/ndcg@10"} <= set(out)
    assert all(0 < out[f"{split}/heldout_users"] <= events.data.is_val.sum() for split in ("val", "test"))
