"""One report section as a markdown table: each row is the newest finished run of an experiment.

Numbers come from the run's metrics.json, the command from its command.txt; a row without a
finished run stays in the table as "not run yet" with the command to run. The paper's claims
are checked on the Sum column of our rows, and said plainly either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from experiments.rundirs import latest_run


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
    prefixes: dict[str, str] = field(default_factory=dict)  # row label -> metrics.json prefix of its figures (e.g. "instructed/")
    note: str = ""  # printed after the ensemble verdict: what the section's diagnostic rows are for


@dataclass
class Finding:
    """A claim of the paper: the best Sum among `winners` beats the best Sum among `losers`.

    Rows a section does not have are ignored, so one list of findings serves every dataset.
    """

    claim: str
    winners: tuple[str, ...]
    losers: tuple[str, ...]


@dataclass
class Report:
    title: str
    intro: str
    sections: list[Section]
    paper: str  # markdown: the paper's own figures, labelled as such
    ensemble_row: str | None = "ensemble"  # None: the report has no ensemble and prints no ensemble verdict
    single_rows: list[str] = field(default_factory=list)  # rows the ensemble is compared with
    findings: list[Finding] = field(default_factory=list)


@dataclass
class Row:
    label: str
    metrics: dict | None
    cite: str
    data: str | None = None  # "source path" the run was made on


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def run_data(run: Path) -> str | None:
    """'source path' from the run's resolved config, to say which data a table's numbers come from."""
    from omegaconf import OmegaConf

    config = run / "config.yaml"
    if not config.is_file():
        return None
    data = OmegaConf.load(config).get("data", {})
    return f"{data.get('source')} `{data.get('path') or '(built-in copy)'}`"


def section_rows(section: Section, outputs: Path) -> list[Row]:
    rows = []
    for label, experiment in section.rows:
        run = latest_run(outputs, experiment)
        if run is None:
            extra = f" {section.extra_args}" if section.extra_args else ""
            rows.append(Row(label, None, f"not run yet: `python -m experiments.run experiment={experiment}{extra}`"))
            continue
        command = run / "command.txt"
        cite = f"`{run}`: `{command.read_text().strip()}`" if command.is_file() else f"`{run}`"
        metrics = json.loads((run / "metrics.json").read_text())
        prefix = section.prefixes.get(label)
        if prefix:  # a row of another embedding of the same run (InstructUE's instructed/tuned rows)
            metrics = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
            cite += f" (its `{prefix}*` figures)"
        rows.append(Row(label, metrics, cite, run_data(run)))
    base_run = latest_run(outputs, section.baselines_from)
    if base_run:
        base = json.loads((base_run / "metrics.json").read_text())
        for name in ("handcrafted", "random"):
            values = {c.key: base.get(f"baseline/{name}/{c.key}") for c in section.columns}
            rows.append(Row(name, values, f"baseline rows of `{base_run}`", run_data(base_run)))
    return rows


def section_table(section: Section, outputs: Path, report: Report) -> list[str]:
    header = ["row", *[c.label for c in section.columns], "Sum", "run / command"]
    rows = section_rows(section, outputs)
    lines = [f"### {section.title}", "", section.data_note, ""]
    datasets = sorted({r.data for r in rows if r.data})
    if len(datasets) == 1:
        lines += [f"Data of every row: {datasets[0]}.", ""]
    elif datasets:
        lines += ["**The rows ran on different data** (compare with care): " + "; ".join(f"{r.label}: {r.data}" for r in rows if r.data) + ".", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    sums: dict[str, float] = {}
    for row in rows:
        values = [row.metrics.get(c.key) if row.metrics else None for c in section.columns]
        summed = [v for v, c in zip(values, section.columns) if c.in_sum]
        total = sum(summed) if summed and all(v is not None for v in summed) else None
        if total is not None:
            sums[row.label] = total
        lines.append("| " + " | ".join([row.label, *[fmt(v) for v in values], fmt(total), row.cite]) + " |")
    lines += ["", verdict(sums, report.single_rows, report.ensemble_row), ""] if report.ensemble_row else [""]
    lines += [section.note, ""] if section.note else []
    present = {r.label for r in rows}
    checked = [f for f in report.findings if present & set(f.winners) and present & set(f.losers)]
    lines += [finding_line(sums, f) for f in checked]
    return lines + ([""] if checked else [])


def finding_line(sums: dict[str, float], finding: Finding) -> str:
    """The paper's claim checked on this section's Sum: the best winner row against the best loser row."""
    winners = {k: sums[k] for k in finding.winners if k in sums}
    losers = {k: sums[k] for k in finding.losers if k in sums and k not in winners}
    if not winners or not losers:
        return f"- Claim \"{finding.claim}\": not all of its runs are finished, no verdict."
    best, rival = max(winners, key=winners.get), max(losers, key=losers.get)
    holds = "holds" if winners[best] > losers[rival] else "does NOT hold"
    return f"- Claim \"{finding.claim}\" {holds} here: {best} {winners[best]:.3f} vs {rival} {losers[rival]:.3f} (Sum)."


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


def finished_rows(report: Report, outputs: Path) -> int:
    """How many of the report's rows have a finished run under `outputs`."""
    return sum(latest_run(outputs, experiment) is not None for s in report.sections for _, experiment in s.rows)
