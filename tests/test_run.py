"""The run loop end to end: every committed experiment smoke-runs, outputs land, W&B holds the probe metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from experiments.config import compose, presets
from experiments.run import main, run
from tests.helpers import data_args_for, experiment_section, experiment_source


def data_args(source: str, csv_data, ml100k_cache, tmp_path, recsys_dir=None, uqabench_dir=None) -> list[str]:
    """The generic experiments' data in tests: the CSV fixture, whose columns the preset's schema names; uqabench: a generated layout."""
    if source == "uqabench":
        return [f"data.path={uqabench_dir}", f"data.cache_dir={tmp_path / 'cache'}"]
    return data_args_for(source, csv_data, ml100k_cache, recsys_dir, tmp_path) + [
        "data.schema.fields=[{name: event_type}, {name: merchant}, {name: amount, kind: numeric}, {name: description, kind: text}]"
    ] * (source == "generic")


def backbone_args(experiment: str, tiny_minilm_dir, tiny_causal_lm_dir) -> list[str]:
    """The language-model experiments' backbones shrunk for the smoke run: a 4-layer, 64-wide MiniLM-architecture model
    (the same BERT-as-decoder path, tokenizer and LoRA targets as the package's MiniLM, about 30x cheaper to run over
    all 943 users); a rewriter left to the user (???) a tiny Llama. The real MiniLM loads in tests/test_llm4es.py."""
    model = experiment_section(experiment, "model")
    args = []
    if model["name"] == "uqa_align":  # the LLM that reads the soft prompt or the TextN prompt
        args += [f"model.model_path={tiny_minilm_dir}"]
    if model["name"] in ("llm4es", "lm_features"):
        args += [f"model.model_path={tiny_minilm_dir}", "model.max_tokens=128"]  # the header and at least one event in every format
    if model["name"] == "instruct_ue":  # the tiny MiniLM as both the LLM and the modality encoder
        args += [f"model.model_path={tiny_minilm_dir}", f"model.encoder_path={tiny_minilm_dir}"]
    if model.get("rewriter_path") == "???":  # a random 1-layer Llama generates a few tokens per user
        args += [f"model.rewriter_path={tiny_causal_lm_dir}", "model.rewrite_max_new_tokens=8"]
    return args


def smoke_size_args(experiment: str) -> list[str]:
    """Paper-size GRU autoencoders shrunk for the smoke run: the experiment's data, layers and options stay, the widths go to 32.
    The frozen LM reads 8 events per user instead of 64: still several 128-token windows each, an eighth of the forward passes.
    Instruction tuning tunes the preset's first target only; UQABench alignment asks two of the seven sub-tasks."""
    model = experiment_section(experiment, "model")
    if model["name"] == "gru_autoencoder" and model.get("hidden", 0) > 128:
        return ["model.hidden=32", "model.emb_dim=32"]
    if model["name"] == "lm_features":
        return ["model.max_events=8"]
    if model["name"] == "uqa_align":  # two sub-tasks (one per kind of answer: a value, a count) score the whole path
        return ["model.subtasks=[direct_feature,match_feature]"]
    if model.get("tuned_targets"):  # one tuned target shows the whole path; each more costs a tuning loop and an embedding pass
        return [f"model.tuned_targets=[{model['tuned_targets'][0]}]"]
    return []


SMOKE = ["trainer.fast_dev_run=true", "run_name=smoke", "logger.wandb=false"]


@pytest.fixture(scope="session")
def uqabench_dir(tmp_path_factory) -> Path:
    """A small generated UQABench Arrow layout (150 users) for the uqabench presets."""
    from datamodules.synthetic import generate_uqabench

    out = tmp_path_factory.mktemp("uqabench")
    generate_uqabench(out, users=150, seed=0)
    return out


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory) -> dict:
    """Smoke runs of this session by experiment: an ensemble's blocks are the blocks' own smoke runs, made once."""
    return {"out": tmp_path_factory.mktemp("smoke"), "runs": {}}


def smoke_run(name: str, smoke_runs: dict, data_fixtures: tuple, backbones: tuple, tmp_path: Path):
    """(config, result) of experiment `name` at smoke size, run now unless this session already ran it."""
    if name in smoke_runs["runs"]:
        return smoke_runs["runs"][name]
    csv_data, ml100k_cache, recsys_dir, uqabench_dir = data_fixtures
    data = data_args(experiment_source(name), csv_data, ml100k_cache, tmp_path / name, recsys_dir, uqabench_dir)
    args = [f"experiment={name}", *SMOKE, f"output_dir={smoke_runs['out']}", *data, *backbone_args(name, *backbones), *smoke_size_args(name)]
    cfg = compose(args)
    if cfg.model.name == "ensemble":  # its blocks are finished runs: make them first, then point the ensemble at them
        for block in cfg.model.blocks:
            smoke_run(block.experiment, smoke_runs, data_fixtures, backbones, tmp_path)
        cfg = compose(args + [f"model.output_dir={smoke_runs['out']}"])
    if cfg.model.name == "uqa_align" and cfg.model.mode != "text":  # its frozen encoder is a finished run: make it first
        smoke_run(cfg.model.encoder_experiment, smoke_runs, data_fixtures, backbones, tmp_path)
        cfg = compose(args + [f"model.output_dir={smoke_runs['out']}"])
    smoke_runs["runs"][name] = cfg, run(cfg)
    return smoke_runs["runs"][name]


@pytest.mark.parametrize("name", presets("experiment"))
def test_every_experiment_smoke_runs(
    name, smoke_runs, csv_data, ml100k_cache, recsys_dir, uqabench_dir, tiny_minilm_dir, tiny_causal_lm_dir, tmp_path
):
    """Data and backbone come from each experiment's own config (its data source, its model folders)."""
    data = (csv_data, ml100k_cache, recsys_dir, uqabench_dir)
    cfg, result = smoke_run(name, smoke_runs, data, (tiny_minilm_dir, tiny_causal_lm_dir), tmp_path)
    for t in cfg.data.targets:
        key = f"downstream_test/{t.name}/score" if t.kind == "propensity_top" else f"probe_test/{t.name}/auc"
        assert np.isfinite(result.metrics[key]), key
    assert (result.run_dir / "metrics.json").is_file() and (result.run_dir / "embeddings.parquet").is_file()
    own = {"next_item_rec": ["val/recall@10", "test/recall@10", "test/ndcg@10"], "uqa_align": ["qa/overall/acc", "qa_prefix/overall/acc", "qa/prompt_tokens"]}
    for key in own.get(cfg.model.name, []):  # the method's own held-out metrics land in metrics.json
        assert np.isfinite(json.loads((result.run_dir / "metrics.json").read_text())[key]), key
    assert_instruction_rows(cfg, result.run_dir)
    if name in first_experiment_of_each_method():
        assert_embeds_its_own_users_again(result.run_dir, cfg)


def assert_instruction_rows(cfg, run_dir: Path) -> None:
    """InstructUE presets: every instructed and tuned target has its own embeddings file, unlike the universal one, and its own probe row."""
    if cfg.model.name != "instruct_ue":
        return
    universal = pl.read_parquet(run_dir / "embeddings.parquet")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    kinds = {t.name: t.kind for t in cfg.data.targets}
    for group, names, suffix in (("instructed", list(cfg.model.instructions or {}), ""), ("tuned", list(cfg.model.tuned_targets or []), "_tuned")):
        for target in names:
            frame = pl.read_parquet(run_dir / f"embeddings_{target}{suffix}.parquet")
            assert frame["user_id"].to_list() == universal["user_id"].to_list()
            assert np.abs(np.stack(frame["embedding"].to_numpy()) - np.stack(universal["embedding"].to_numpy())).max() > 1e-6, (group, target)
            key = f"{group}/downstream_test/{target}/score" if kinds[target] == "propensity_top" else f"{group}/probe_test/{target}/auc"
            assert np.isfinite(metrics[key]), key


def first_experiment_of_each_method() -> set[str]:
    """One experiment per registered method (the first by name): re-embedding is checked once per method, not per preset."""
    first: dict[str, str] = {}
    for exp in presets("experiment"):
        first.setdefault(experiment_section(exp, "model")["name"], exp)
    return set(first.values()) - {first.get("ensemble")}


def assert_embeds_its_own_users_again(run_dir: Path, cfg) -> None:
    """experiments.embed on the run's own data and history gives the run's own vectors, here for a sample of users in chunks of 7."""
    from experiments.embed import load_run

    saved = pl.read_parquet(run_dir / "embeddings.parquet")
    users = saved["user_id"].gather(np.linspace(0, saved.height - 1, 20).astype(int)).to_list()
    until = "cutoff" if json.loads((run_dir / "preprocess.json").read_text())["cutoff"] else None
    again = load_run(run_dir).embed(until=until, users=users, chunk_users=7)
    assert again["user_id"].to_list() == sorted(users)
    expected = saved.filter(pl.col("user_id").is_in(users)).sort("user_id")["embedding"].to_numpy()
    np.testing.assert_allclose(again["embedding"].to_numpy(), expected, rtol=1e-4, atol=1e-5)


def test_full_run_outputs_and_wandb_summary(csv_data, tmp_path, capfd, caplog):
    events, labels = csv_data
    args = ["experiment=gru_ae_generic_csv", f"output_dir={tmp_path / 'out'}", "run_name=r1", "trainer.max_epochs=2",
            "model.hidden=16", "model.emb_dim=8"] + data_args("generic", csv_data, None, tmp_path)
    args.append("data.targets=[{name: segment, kind: binary, positive: traveller}, {name: churn, kind: churn}]")
    result = run(compose(args))
    run_dir = tmp_path / "out" / "gru_ae_generic_csv" / "r1"
    assert result.run_dir == run_dir
    # W&B: the offline run holds the probe metrics, read back from its summary before it finished;
    # probe_val/* summarise as their maximum (here logged once), TEST and baseline keys as their last value
    for key in ("probe_val/segment/auc", "probe_val/segment/ks", "probe_val/churn/auc"):
        assert result.wandb_summary[key] == {"max": pytest.approx(result.metrics[key])}
    assert result.wandb_summary["probe_test/segment/auc"] == pytest.approx(result.metrics["probe_test/segment/auc"])
    key = "baseline/handcrafted/probe_test/segment/auc"
    assert result.wandb_summary[key] == pytest.approx(result.metrics[key])
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["probe_test/segment/auc"] == result.metrics["probe_test/segment/auc"]
    assert 0.0 <= metrics["probe_test/segment/ks"] <= 1.0
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["hidden"] == 16 and config["data"]["path"] == str(events)
    emb = pl.read_parquet(run_dir / "embeddings.parquet")
    assert emb.height == 40 and emb["embedding"].dtype == pl.Array(pl.Float32, 16)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "model.safetensors").is_file()
    csv_metrics = pl.read_csv(run_dir / "csv" / "metrics.csv")
    assert "probe_test/segment/auc" in csv_metrics.columns and "val/loss" in csv_metrics.columns
    printed = caplog.text + "".join(capfd.readouterr())
    assert "anonymous setting" not in printed and "`weights_only` was not set" not in printed  # noise silenced at its source


def test_same_seed_same_metrics(csv_data, tmp_path):
    base = ["experiment=gru_ae_generic_csv", f"output_dir={tmp_path / 'out'}", "trainer.max_epochs=1", "logger.wandb=false",
            "model.hidden=16", "model.emb_dim=8"] + data_args("generic", csv_data, None, tmp_path)
    a = run(compose(base + ["run_name=a"])).metrics
    b = run(compose(base + ["run_name=b"])).metrics
    assert a["probe_test/churn/auc"] == b["probe_test/churn/auc"] and a["val/loss"] == b["val/loss"]


def test_bad_data_leaves_no_run_directory(tmp_path, capsys):
    events = tmp_path / "events.csv"
    events.write_text("client,ts\nu1,not a time\n")
    out = tmp_path / "out"
    code = main(["experiment=gru_ae_generic_csv", f"data.path={events}", "data.schema.user=client", "data.schema.time=ts",
                 "data.schema.fields=[]", "data.targets=[]", f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}"])
    assert code == 2
    assert "data error:" in capsys.readouterr().err
    assert not out.exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_trainer_without_gpu_is_one_line_and_leaves_nothing(tmp_path, capsys, ml100k_cache):
    out = tmp_path / "out"
    code = main(["experiment=gru_ae_ml100k", "trainer=gpu", f"output_dir={out}", f"data.cache_dir={ml100k_cache}"])
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("INFO ")]  # INFO: preprocessing log
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("config error: trainer.accelerator=gpu: this machine has no GPU") and "trainer=cpu" in errors[0]
    assert not out.exists()


def test_challenge_submission_export(recsys_dir, tmp_path):
    from datamodules.sources.recsys2025 import read_relevant

    args = ["experiment=gru_ae_recsys2025", "trainer.fast_dev_run=true", "logger.wandb=false", f"output_dir={tmp_path / 'out'}",
            "run_name=sub", "export_submission=true", "probe.baselines=[]"] + data_args("recsys2025", None, None, tmp_path, recsys_dir)
    result = run(compose(args))
    ids = np.load(result.run_dir / "submission" / "client_ids.npy")
    emb = np.load(result.run_dir / "submission" / "embeddings.npy")
    assert ids.dtype == np.int64 and emb.dtype == np.float16
    assert [str(i) for i in ids] == read_relevant(recsys_dir / "input" / "relevant_clients.npy")
    assert emb.shape == (len(ids), 128) and np.isfinite(emb).all()
    assert "data/relevant_clients_without_history" in json.loads((result.run_dir / "metrics.json").read_text())


def test_submission_export_needs_recsys_source(tmp_path, ml100k_cache):
    from experiments.config import ConfigError

    with pytest.raises(ConfigError, match="export_submission"):
        run(compose(["export_submission=true", f"data.cache_dir={ml100k_cache}", f"output_dir={tmp_path}"]))
    assert not any(tmp_path.iterdir())
