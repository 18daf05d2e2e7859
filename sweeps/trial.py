"""One Optuna trial = one ordinary run of experiments.run, in this process, with its own run directory.

The trial's parameters become `key=value` overrides of the experiment, so a trial is exactly
the run that `python -m experiments.run experiment=E key=value ...` would make (its
command.txt says so). Pruning reads a validation metric after every epoch: val/loss, or
the linear probe's probe_val AUC (probe.every_n_epochs=1 is switched on). Nothing here reads
TEST metrics except to record them, labelled as such, for the report.
"""

from __future__ import annotations

import os
import shlex
import socket
from pathlib import Path
from typing import Any

import yaml

from experiments.config import ConfigError, compose
from sweeps.spec import MEAN_AUC, TEST_GROUPS, SweepSpec, choice_label

VAL_GROUPS = ("probe_val/", "downstream_val/", "val/")  # what a trial records for selection


def format_value(value: Any) -> str:
    """A value as OmegaConf's dotlist parses it back (lists in YAML flow form)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return repr(value) if isinstance(value, float) else str(value)


def suggest(trial, spec: SweepSpec) -> dict[str, Any]:
    """Sample the search space in YAML order; a conditional parameter only when its condition holds."""
    labels: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for key, p in spec.space.items():
        if p.condition and not all(
            k in labels and labels[k] in [choice_label(v) for v in allowed] for k, allowed in p.condition.items()
        ):
            continue
        if p.type == "float":
            values[key] = labels[key] = trial.suggest_float(key, float(p.low), float(p.high), log=p.log, step=p.step)
        elif p.type == "int":
            step = int(p.step) if p.step is not None else 1
            values[key] = labels[key] = trial.suggest_int(key, int(p.low), int(p.high), log=p.log, step=step)
        else:
            options = [choice_label(c) for c in p.choices]
            labels[key] = trial.suggest_categorical(key, options)
            values[key] = p.choices[options.index(labels[key])]
    return values


def objective_value(metrics: dict[str, float], metric: str) -> float:
    """The sweep's objective from a run's metrics, VAL users only (mean_auc: the mean probe_val AUC over its targets)."""
    if metric == MEAN_AUC:
        aucs = [v for k, v in metrics.items() if k.startswith("probe_val/") and k.endswith("/auc") and k.count("/") == 2]
        if not aucs:
            raise ConfigError(f"objective {MEAN_AUC}: the run has no probe_val/<target>/auc (no binary/multiclass targets?)")
        return float(sum(aucs) / len(aucs))
    if metric == "val/loss":
        metric = "val/loss_best" if "val/loss_best" in metrics else metric
    if metric not in metrics:
        have = sorted(k for k in metrics if k.startswith(("probe_val/", "val/")))
        raise ConfigError(f"objective {metric!r} is not among the run's metrics {have}")
    return float(metrics[metric])


def run_args(spec: SweepSpec, values: dict[str, Any], extra: list[str], study_dir: Path, number: int | None) -> list[str]:
    """The experiments.run command-line words of one trial: experiment, fixed overrides, user extras, parameters."""
    args = [f"experiment={spec.experiment}"]
    args += [f"{k}={format_value(v)}" for k, v in spec.overrides.items()]
    args += list(extra)
    args += [f"{k}={format_value(v)}" for k, v in values.items()]
    args += [f"output_dir={study_dir / 'trials'}", f"logger.group={spec.name}"]
    if number is not None:
        args.append(f"run_name={number}")
    if spec.objective.metric.startswith("probe_val/") and spec.pruner.name != "none":
        args.append("probe.every_n_epochs=1")  # the probe's VAL AUC is what the pruner watches
    return args


def check_space(spec: SweepSpec, extra: list[str], study_dir: Path) -> None:
    """Fail before any trial runs: unknown keys, bad values, or a searched key also given on the command line."""
    for word in extra:
        key = word.split("=", 1)[0]
        if key in spec.space:
            raise ConfigError(f"{key}: searched by sweep {spec.name!r}; do not also set it on the command line")
        if key in ("output_dir", "run_name", "logger.group", "experiment"):
            raise ConfigError(f"{key}: set by the sweep for every trial (each trial runs in outputs/sweeps/<study>/trials/)")
    for pick in (0, -1):  # both ends of every range and the first/last choice must make a valid config
        values = {}
        for key, p in spec.space.items():
            values[key] = p.choices[pick] if p.type == "categorical" else (p.low, p.high)[pick]
            if p.type == "int":
                values[key] = int(values[key])
        try:
            compose(run_args(spec, values, extra, study_dir, None))
        except ConfigError as err:
            raise ConfigError(f"sweep {spec.name!r}: {err}") from None


def process_start_time(pid: int) -> str | None:
    """Linux: the process's start tick (field 22 of /proc/PID/stat), so a reused pid is not mistaken for ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def worker_identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start_time(os.getpid())}


def worker_is_dead(identity: dict[str, Any] | None) -> bool:
    """True only when we can see that the worker is gone: same host, and its pid is not that process any more."""
    if not identity or identity.get("host") != socket.gethostname():
        return False  # another machine: the storage heartbeat decides
    pid = int(identity["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    start = identity.get("start")
    return start is not None and process_start_time(pid) not in (None, start)


def make_pruning_callback(trial, metric: str, spec_name: str, labels: dict[str, Any], prune: bool = True):
    """optuna-integration's pruning callback, fed the probe's per-epoch probe_val AUC when the objective is a probe metric.

    With prune=False (pruner: none) it only labels the W&B run and closes it on an exception.
    """
    import torch
    from optuna_integration import PyTorchLightningPruningCallback

    from callbacks.probe import LinearProbe

    class SweepPruning(PyTorchLightningPruningCallback):
        def on_fit_start(self, trainer, pl_module) -> None:
            super().on_fit_start(trainer, pl_module)
            for lg in trainer.loggers:  # the trial's parameters in its W&B run's config
                if type(lg).__name__ == "WandbLogger":
                    lg.experiment.config.update(
                        {"sweep": spec_name, "trial": trial.number, "trial_params": labels},
                        allow_val_change=True,
                    )

        def on_validation_end(self, trainer, pl_module) -> None:
            if not prune:
                return
            if metric.startswith("probe_val/") and not trainer.sanity_checking:
                probe = next((c for c in trainer.callbacks if isinstance(c, LinearProbe)), None)
                if probe is not None and probe.results:
                    trainer.callback_metrics[metric] = torch.tensor(objective_value(probe.results, metric))
            super().on_validation_end(trainer, pl_module)

        def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
            import optuna

            pruned = isinstance(exception, optuna.TrialPruned)
            for lg in trainer.loggers:  # Lightning leaves the W&B run open on an exception: close it, saying why
                if type(lg).__name__ == "WandbLogger":
                    lg.experiment.summary["trial_state"] = "pruned" if pruned else "failed"
                    lg.experiment.finish(exit_code=0 if pruned else 1)

    return SweepPruning(trial, monitor=metric)


def run_trial(trial, spec: SweepSpec, extra: list[str], study_dir: Path) -> float:
    """Sample, run the experiment with a pruning callback, return the objective. Pruning raises optuna.TrialPruned."""
    from experiments.run import run

    trial.set_user_attr("worker", worker_identity())
    trial.set_user_attr("interrupted", False)  # a retry inherits its original's attributes
    values = suggest(trial, spec)
    args = run_args(spec, values, extra, study_dir, trial.number)
    trial.set_user_attr("run_dir", str(study_dir / "trials" / spec.experiment / str(trial.number)))
    cfg = compose(args)
    callback = make_pruning_callback(trial, spec.objective.metric, spec.name, dict(trial.params), spec.pruner.name != "none")
    try:
        result = run(cfg, command=shlex.join(["python", "-m", "experiments.run", *args]), extra_callbacks=[callback])
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)  # retried on the next start, like a killed worker's trial
        raise
    finally:
        finish_wandb_run()
    value = objective_value(result.metrics, spec.objective.metric)
    trial.set_user_attr("metrics", {k: v for k, v in result.metrics.items() if k.startswith(VAL_GROUPS)})
    trial.set_user_attr("test_metrics", {k: v for k, v in result.metrics.items() if k.startswith(TEST_GROUPS)})
    return value


def finish_wandb_run() -> None:
    """A trial that failed outside fit (e.g. in the evaluation) leaves its W&B run open; close it so the next trial gets its own."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1)
