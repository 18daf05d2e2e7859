"""Reports are rebuilt from run directories: numbers come from metrics.json, commands from command.txt."""

from __future__ import annotations

import json

from reports import build as reports


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
    report = reports.Report(title="t", intro="i", sections=[section], paper="p", single_rows=["A", "B", "handcrafted"],
                            claims=[("B", "A"), ("A", "B"), ("A", "C")])
    text = "\n".join(reports.section_table(section, tmp_path, report))
    assert "| A | 0.600 | 0.700 | 1.300 |" in text
    assert "| handcrafted | 0.500 | 0.550 | 1.050 |" in text
    assert "experiment=exp_b" in text
    assert "| C | — | — | — | not run yet: `python -m experiments.run experiment=exp_c`" in text
    assert "the ensemble's Sum 1.360 is NOT as good as the best single learned block, B (1.400)" in text
    assert "is at least as good as the best single block (handcrafted included), B (1.400)" not in text
    assert '- Claim "B beats A" holds here: Sum 1.400 vs 1.300.' in text
    assert '- Claim "A beats B" does NOT hold here: Sum 1.300 vs 1.400.' in text
    assert "- A vs C: not both runs are finished, no verdict." in text


def test_verdict_needs_both_sides():
    assert "no verdict" in reports.verdict({"A": 1.0}, ["A"], "ensemble")
    assert "at least as good as the best single learned block, A" in reports.verdict({"A": 1.0, "ensemble": 1.0}, ["A"], "ensemble")
    both = reports.verdict({"A": 1.0, "handcrafted": 1.2, "ensemble": 1.1}, ["A", "handcrafted"], "ensemble")
    assert "at least as good as the best single learned block, A (1.000)" in both
    assert "NOT as good as the best single block (handcrafted included), handcrafted (1.200)" in both
