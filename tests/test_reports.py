"""Reports are rebuilt from run directories: numbers come from metrics.json, commands from command.txt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reports import build, table as reports
from reports.specs import REPORTS


def fake_run(root, experiment, metrics, command):
    run = root / experiment / "r1"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "embeddings.parquet").write_bytes(b"")
    (run / "command.txt").write_text(command + "\n")
    return run


def test_section_rows_sums_commands_and_verdict(tmp_path):
    section = reports.Section(
        title="toy", data_note="note", rows=[("A", "exp_a"), ("B", "exp_b"), ("ensemble", "exp_e"), ("C", "exp_c")],
        columns=[reports.Column("x", "probe_test/x/auc"), reports.Column("y", "probe_test/y/auc")], baselines_from="exp_a",
    )
    fake_run(tmp_path, "exp_a", {"probe_test/x/auc": 0.6, "probe_test/y/auc": 0.7, "baseline/handcrafted/probe_test/x/auc": 0.5,
                                 "baseline/handcrafted/probe_test/y/auc": 0.55}, "python -m experiments.run experiment=exp_a")
    fake_run(tmp_path, "exp_b", {"probe_test/x/auc": 0.65, "probe_test/y/auc": 0.75}, "python -m experiments.run experiment=exp_b")
    fake_run(tmp_path, "exp_e", {"probe_test/x/auc": 0.66, "probe_test/y/auc": 0.7}, "python -m experiments.run experiment=exp_e")
    findings = [reports.Finding("B beats A", ("B",), ("A",)), reports.Finding("A beats B", ("A",), ("B",)),
                reports.Finding("A beats C", ("A",), ("C",)), reports.Finding("unknown rows", ("Z",), ("A",))]
    report = reports.Report(title="t", intro="i", sections=[section], paper="p", single_rows=["A", "B", "handcrafted"], findings=findings)
    text = "\n".join(reports.section_table(section, tmp_path, report))
    assert "| A | 0.600 | 0.700 | 1.300 |" in text
    assert "| handcrafted | 0.500 | 0.550 | 1.050 |" in text
    assert "experiment=exp_b" in text
    assert "| C | — | — | — | not run yet: `python -m experiments.run experiment=exp_c`" in text
    assert "the ensemble's Sum 1.360 is NOT as good as the best single learned block, B (1.400)" in text
    assert "is at least as good as the best single block (handcrafted included), B (1.400)" not in text
    assert '- Claim "B beats A" holds here: B 1.400 vs A 1.300 (Sum).' in text
    assert '- Claim "A beats B" does NOT hold here: A 1.300 vs B 1.400 (Sum).' in text
    assert '- Claim "A beats C": not all of its runs are finished, no verdict.' in text
    assert "unknown rows" not in text  # a claim about rows this section does not have is not printed


def test_verdict_needs_both_sides():
    assert "no verdict" in reports.verdict({"A": 1.0}, ["A"], "ensemble")
    assert "at least as good as the best single learned block, A" in reports.verdict({"A": 1.0, "ensemble": 1.0}, ["A"], "ensemble")
    both = reports.verdict({"A": 1.0, "handcrafted": 1.2, "ensemble": 1.1}, ["A", "handcrafted"], "ensemble")
    assert "at least as good as the best single learned block, A (1.000)" in both
    assert "NOT as good as the best single block (handcrafted included), handcrafted (1.200)" in both


def test_a_group_claim_compares_the_best_of_each_side():
    sums = {"GRU a": 2.0, "GRU b": 2.6, "LM": 2.5, "iALS": 2.1}
    line = reports.finding_line(sums, reports.Finding("GRU beats the rest", ("GRU a", "GRU b"), ("LM", "iALS", "missing")))
    assert line == '- Claim "GRU beats the rest" holds here: GRU b 2.600 vs LM 2.500 (Sum).'


def test_rows_on_different_data_are_flagged(tmp_path):
    section = reports.Section(title="toy", data_note="note", rows=[("A", "exp_a"), ("B", "exp_b")],
                              columns=[reports.Column("x", "probe_test/x/auc")], baselines_from="exp_a")
    for name, path in (("exp_a", "data/one"), ("exp_b", "data/two")):
        run = fake_run(tmp_path, name, {"probe_test/x/auc": 0.6}, f"python -m experiments.run experiment={name}")
        (run / "config.yaml").write_text(f"data:\n  source: recsys2025\n  path: {path}\n")
    report = reports.Report(title="t", intro="i", sections=[section], paper="p")
    text = "\n".join(reports.section_table(section, tmp_path, report))
    assert "**The rows ran on different data**" in text and "A: recsys2025 `data/one`" in text and "B: recsys2025 `data/two`" in text


def test_no_finished_run_leaves_the_committed_report_alone(tmp_path, capsys):
    committed = build.REPORT_DIR / "encode_me.md"
    before = committed.read_bytes()
    assert build.main(["encode_me", "--outputs", str(tmp_path)]) == 1
    assert committed.read_bytes() == before
    err = capsys.readouterr().err
    assert "left as it is" in err and "make report-encode-me" in err


@pytest.mark.parametrize("name", sorted(REPORTS))
def test_every_report_row_is_an_experiment_and_make_runs_it(name):
    """The report, its experiments and its Makefile target stay in sync."""
    root = Path(__file__).parents[1]
    makefile = set((root / "Makefile").read_text().split())
    for section in REPORTS[name].sections:
        for label, experiment in section.rows:
            assert (root / "experiments" / "configs" / "experiment" / f"{experiment}.yaml").is_file(), (label, experiment)
            assert experiment in makefile, f"{experiment} ({label}) is not run by {build.MAKE_TARGETS[name]}"


def test_a_prefixed_row_reads_another_embedding_of_the_same_run_and_no_ensemble_no_verdict(tmp_path):
    section = reports.Section(
        title="toy", data_note="note", rows=[("universal", "exp_a"), ("instructed", "exp_a"), ("tuned", "exp_a")],
        columns=[reports.Column("x", "probe_test/x/auc"), reports.Column("x KS", "probe_test/x/ks", in_sum=False)],
        baselines_from="exp_a", prefixes={"instructed": "instructed/", "tuned": "tuned/"},
    )
    fake_run(tmp_path, "exp_a", {"probe_test/x/auc": 0.6, "probe_test/x/ks": 0.2, "instructed/probe_test/x/auc": 0.7,
                                 "instructed/probe_test/x/ks": 0.3}, "python -m experiments.run experiment=exp_a")
    findings = [reports.Finding("instructed beats universal", ("instructed",), ("universal",)),
                reports.Finding("tuned beats instructed", ("tuned",), ("instructed",))]
    report = reports.Report(title="t", intro="i", sections=[section], paper="p", ensemble_row=None, findings=findings)
    text = "\n".join(reports.section_table(section, tmp_path, report))
    assert "| universal | 0.600 | 0.200 | 0.600 |" in text
    assert "| instructed | 0.700 | 0.300 | 0.700 | `" in text and "(its `instructed/*` figures)" in text
    assert "| tuned | — | — | — |" in text  # the run has no tuned/ figures: empty, never the universal ones
    assert '- Claim "instructed beats universal" holds here: instructed 0.700 vs universal 0.600 (Sum).' in text
    assert '- Claim "tuned beats instructed": not all of its runs are finished, no verdict.' in text
    assert "Ensemble" not in text


def test_the_instructue_figure_is_a_tsne_grid_of_the_runs_embeddings(ml100k_cache, tmp_path):
    """The figure reads the run's own users and labels: a run whose embeddings are of other users is refused."""
    import numpy as np
    import polars as pl
    from omegaconf import OmegaConf

    from datamodules.config import DataConfig
    from datamodules.datamodule import EventDataModule
    from experiments.config import compose, to_dataclass

    cfg = compose(["experiment=instructue_tuned_ml100k", f"data.cache_dir={ml100k_cache}"])
    users = EventDataModule(to_dataclass(cfg.data, DataConfig), seed=cfg.seed).data.store.user_ids
    run = fake_run(tmp_path, build.TSNE_RUN, {"probe_test/gender/auc": 0.61, "tuned/probe_test/gender/auc": 0.7}, "python -m x")
    OmegaConf.save(cfg, run / "config.yaml")
    rng = np.random.default_rng(0)
    for name in ("", "_gender", "_gender_tuned", "_age"):  # age has no tuned file: its panel says so
        pl.DataFrame({"user_id": users, "embedding": rng.normal(size=(len(users), 8)).astype(np.float32)}).write_parquet(run / f"embeddings{name}.parquet")
    png = build.instructue_tsne(run, tmp_path / "tsne.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    pl.DataFrame({"user_id": users[::-1], "embedding": rng.normal(size=(len(users), 8)).astype(np.float32)}).write_parquet(run / "embeddings.parquet")
    with pytest.raises(ValueError, match="not the prepared data's users"):
        build.instructue_tsne(run, tmp_path / "tsne2.png")


def test_the_figure_is_logged_as_a_wandb_image_in_an_offline_run(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("logger:\n  project: my-project\n")
    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "f.png")
    said = build.log_figure_to_wandb(tmp_path / "f.png", run, tmp_path / "out")
    assert "report/instructue_tsne" in said and "project `my-project`" in said
    logged = list((tmp_path / "out" / "reports" / "instructue" / "wandb").glob("offline-run-*/files/media/images/report/instructue_tsne_*.png"))
    assert len(logged) == 1 and logged[0].read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert "not logged" in build.log_figure_to_wandb(tmp_path / "f.png", run, tmp_path / "out2")
