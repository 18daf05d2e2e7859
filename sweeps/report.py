"""The study's report under outputs/sweeps/<study>/, read from the storage (so it always matches the study).

best.json, trials.csv, trials.md, optimization_history.png, param_importances.png (optuna's
matplotlib visualisations), and a W&B summary run (group = the study) holding the same.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

from datamodules.atomic import atomic_write
from sweeps.spec import SweepSpec
from sweeps.storage import retried_numbers

COLUMNS = ["number", "state", "value", "retry_of", "duration_s", "run_dir"]


def trial_rows(study) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per trial: number, state, objective, parameters, which trial it retries, duration, run directory."""
    trials = study.get_trials(deepcopy=False)
    params = list(dict.fromkeys(k for t in trials for k in t.params))
    retried = retried_numbers(trials)
    rows = []
    for t in trials:
        history = t.system_attrs.get("retry_history") or []
        row = {
            "number": t.number,
            "state": t.state.name + (" (retried)" if t.number in retried else ""),
            "value": t.value if t.value is not None or t.state.name != "PRUNED" or t.last_step is None else t.intermediate_values[t.last_step],
            "retry_of": history[-1] if history else None,
            "duration_s": round(t.duration.total_seconds(), 1) if t.duration else None,
            "run_dir": t.user_attrs.get("run_dir"),
        }
        row.update({p: t.params.get(p) for p in params})
        rows.append(row)
    return COLUMNS[:3] + params + COLUMNS[3:], rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def markdown(columns: list[str], rows: list[dict], spec: SweepSpec, best: dict | None) -> str:
    head = [
        f"# Sweep {spec.name}",
        "",
        f"Experiment `{spec.experiment}`; objective `{spec.objective.metric}` ({spec.objective.direction}); "
        f"sampler {spec.sampler.name} (seed {spec.sampler.seed}); pruner {spec.pruner.name}.",
        "For a pruned trial, `value` is its last reported (per-epoch validation) value.",
        "",
        f"Best: trial {best['number']}, value {best['value']:.4f}." if best else "No trial completed yet.",
        "",
        *test_lines(best),
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    return "\n".join(head + ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]) + "\n"


def test_lines(best: dict | None) -> list[str]:
    """The best trial's TEST figures, labelled: chosen on VAL, so these are its honest estimate."""
    metrics = (best or {}).get("test_metrics") or {}
    if not metrics:
        return []
    cells = ", ".join(f"`{k}` {v:.4f}" for k, v in sorted(metrics.items()))
    return [f"Best trial on TEST users (reported only; no trial was chosen or pruned on these): {cells}.", ""]


def best_of(study) -> dict | None:
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    t = study.best_trial
    return {
        "number": t.number, "value": t.value, "params": t.params, "run_dir": t.user_attrs.get("run_dir"),
        "metrics": t.user_attrs.get("metrics", {}),  # VAL users: what the objective and the pruner read
        "test_metrics": t.user_attrs.get("test_metrics", {}),  # TEST users: reported, never used to choose
    }


def plots(study, study_dir: Path) -> dict[str, str]:
    """optuna's matplotlib plots as PNG; importance needs two completed trials that vary a parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    out, notes = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, plot in (("optimization_history", ovm.plot_optimization_history), ("param_importances", ovm.plot_param_importances)):
            path = study_dir / f"{name}.png"
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as err:  # e.g. fewer than two completed trials
                notes[name] = str(err)
                path.unlink(missing_ok=True)
                continue
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
            plt.close(fig)
            out[name] = str(path)
    return {**out, **{f"{k}_skipped": v for k, v in notes.items()}}


def log_to_wandb(study, spec: SweepSpec, study_dir: Path, columns: list[str], rows: list[dict], best: dict | None, files: dict, extra: list[str]) -> dict:
    """A summary run in the study's W&B group: the trials table, both plots, the best value and parameters."""
    import os

    from experiments.config import compose
    from sweeps.trial import run_args

    cfg = compose(run_args(spec, {}, extra, study_dir, None))  # the project/entity the trials logged to
    if not cfg.logger.wandb:
        return {}
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(
        project=cfg.logger.project, entity=cfg.logger.entity, group=spec.name, job_type="sweep-summary",
        name=f"{spec.name}-summary", dir=str(study_dir), reinit="create_new",
        config={"sweep": spec.name, "experiment": spec.experiment, "objective": spec.objective.metric, "direction": spec.objective.direction},
    )
    table = wandb.Table(columns=columns, data=[[None if r[c] is None else (r[c] if isinstance(r[c], (int, float)) else str(r[c])) for c in columns] for r in rows])
    logged: dict[str, Any] = {"trials": table}
    for name in ("optimization_history", "param_importances"):
        if name in files:
            logged[name] = wandb.Image(files[name])
    run.log(logged)
    states = [r["state"] for r in rows]
    run.summary["trials/complete"] = states.count("COMPLETE")
    run.summary["trials/pruned"] = states.count("PRUNED")
    if best:
        run.summary["best/value"] = best["value"]
        run.summary["best/trial"] = best["number"]
        for k, v in best["params"].items():
            run.summary[f"best/{k}"] = v
    summary = dict(run.summary)
    run.finish()
    return summary


def write_report(study, spec: SweepSpec, study_dir: Path, extra: list[str]) -> dict[str, Any]:
    study_dir.mkdir(parents=True, exist_ok=True)
    columns, rows = trial_rows(study)
    best = best_of(study)

    def write_csv(p: Path) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns)
        w.writeheader()
        w.writerows([{c: ("" if r[c] is None else r[c]) for c in columns} for r in rows])
        p.write_text(buf.getvalue())

    atomic_write(study_dir / "trials.csv", write_csv)
    atomic_write(study_dir / "trials.md", lambda p: p.write_text(markdown(columns, rows, spec, best)))
    atomic_write(study_dir / "best.json", lambda p: p.write_text(json.dumps(best, indent=1, default=str)))
    files = plots(study, study_dir)
    wandb_summary = log_to_wandb(study, spec, study_dir, columns, rows, best, files, extra)
    states = [r["state"] for r in rows]
    value = "none yet" if best is None else f"{best['value']:.4f} (trial {best['number']})"
    summary = f"{states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, {len(rows)} trials in all; best {value}"
    if best is not None and not math.isfinite(best["value"]):
        summary += " (not finite)"
    return {"summary": summary, "best": best, "files": files, "wandb_summary": wandb_summary}
