"""`python -m sweeps.run sweep=NAME [n_trials=N] [storage=URL] [study=NAME] [--workers K] [key=value ...]`.

An Optuna study around experiments.run: every trial is an ordinary run with its own run
directory and W&B run (group = the study name). Running the same command again resumes the
study: finished trials are kept, interrupted ones are marked failed and retried (at most
max_retries times), and only the missing trials run. Other `key=value` words are run-config
overrides applied to every trial (e.g. trainer.max_epochs=5 data.cache_dir=/tmp/cache).
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import zlib
from pathlib import Path

from experiments.config import ConfigError, split_words
from sweeps.spec import SWEEP_KEYS, SweepSpec, load_spec, presets
from sweeps.storage import StorageInfo, open_storage, recover_interrupted, resolve, retried_numbers

log = logging.getLogger("sweeps")

USAGE = f"""usage: python -m sweeps.run sweep=NAME [n_trials=N] [storage=URL] [study=NAME] [max_retries=R]
                           [sweeps_dir=DIR] [--workers K] [--report-only] [key=value ...]

  sweep=NAME      a preset in sweeps/configs/ ({', '.join(presets())}) or a path to a sweep YAML
  n_trials=N      trials that must end COMPLETE or PRUNED (default: the sweep file's)
  storage=URL     default sqlite:///<sweeps_dir>/<study>/study.db; postgresql://user@host:port/db for many
                  machines; journal:/shared/disk/<study>.log for a shared disk
  study=NAME      study name (default: the sweep's); outputs go to <sweeps_dir>/<study>/
  sweeps_dir=DIR  default outputs/sweeps
  --workers K     K local worker processes on the same storage (then the report)
  --report-only   rewrite the report of the study as it stands, run nothing
  key=value       run-config overrides for every trial (see python -m experiments.run --help)

Running the same command again resumes the study."""


def parse_argv(argv: list[str]) -> tuple[str, dict[str, str], list[str], int, bool, int]:
    """-> sweep name, sweep options, run-config overrides, workers, report_only, worker index."""
    workers, report_only, index, plain = 1, False, 0, []
    words = list(argv)
    while words:
        word = words.pop(0)
        if word == "--report-only":
            report_only = True
        elif word.startswith(("--workers", "--worker-index")):
            flag, _, value = word.partition("=")
            if not value:
                if not words:
                    raise ConfigError(f"{flag}: expected a number")
                value = words.pop(0)
            if not value.isdigit() or (flag == "--workers" and int(value) < 1):
                raise ConfigError(f"{flag}: expected a positive integer, got {value!r}")
            if flag == "--workers":
                workers = int(value)
            else:
                index = int(value)
        elif word.startswith("-"):
            raise ConfigError(f"{word}: unknown option (see --help)")
        else:
            plain.append(word)
    sweep, options, extra = split_words(plain, "sweep", SWEEP_KEYS)
    if sweep is None:
        raise ConfigError(f"sweep=NAME is required; presets: {presets()}")
    return sweep, options, extra, workers, report_only, index


def apply_options(spec: SweepSpec, options: dict[str, str]) -> tuple[SweepSpec, Path, str | None]:
    for key in ("n_trials", "max_retries"):
        if key in options:
            if not options[key].isdigit():
                raise ConfigError(f"{key}={options[key]}: expected a whole number")
            setattr(spec, key, int(options[key]))
    if spec.n_trials < 1:
        raise ConfigError("n_trials must be at least 1 (use --report-only to only write the report)")
    if "study" in options:
        if not options["study"] or "/" in options["study"]:
            raise ConfigError(f"study={options['study']!r}: a plain name, no slashes")
        spec.name = options["study"]
    study_dir = Path(options.get("sweeps_dir", "outputs/sweeps")) / spec.name
    return spec, study_dir, options.get("storage")


def make_sampler(spec: SweepSpec, seed: int):
    import optuna

    if spec.sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.sampler.n_startup_trials)


def make_pruner(spec: SweepSpec):
    import optuna

    kinds = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner}
    if spec.pruner.name == "none":
        return optuna.pruners.NopPruner()
    try:
        return kinds[spec.pruner.name](**spec.pruner.params)
    except TypeError as err:
        raise ConfigError(f"pruner.params of {spec.pruner.name}: {err}") from None


def open_study(spec: SweepSpec, info: StorageInfo, seed: int):
    """Create the study, or load it when it exists (a resume); its direction must match the sweep file's."""
    import optuna

    storage = open_storage(info, spec.max_retries)
    try:
        study = optuna.create_study(
            study_name=spec.name, storage=storage, direction=spec.objective.direction,
            sampler=make_sampler(spec, seed), pruner=make_pruner(spec), load_if_exists=True,
        )
    except ValueError as err:
        raise ConfigError(f"study {spec.name!r} in {info.url}: {err}") from None
    if study.direction.name.lower() != spec.objective.direction:
        raise ConfigError(f"study {spec.name!r} in {info.url} was created to {study.direction.name.lower()}, the sweep says {spec.objective.direction}")
    return study


def remaining(study, n_trials: int) -> int:
    """Trials still to start: n_trials minus finished ones (errored count, retried ones do not) minus running ones."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    finished = sum(
        1 for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and t.number not in retried)
    )
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return n_trials - finished - running


def work(study, spec: SweepSpec, info: StorageInfo, extra: list[str], study_dir: Path) -> None:
    """One worker: recover interrupted trials, then run one trial at a time until the study has enough."""
    from sweeps.storage import FileHeartbeat
    from sweeps.trial import run_trial

    def objective(trial):
        if info.heartbeat_dir is None:
            return run_trial(trial, spec, extra, study_dir)
        with FileHeartbeat(info.heartbeat_dir, trial.number):
            return run_trial(trial, spec, extra, study_dir)

    while True:
        failed = recover_interrupted(study, info, spec.max_retries)
        if failed:
            log.warning("trials %s were interrupted (their worker is gone): marked FAIL and re-enqueued", failed)
        if remaining(study, spec.n_trials) <= 0:
            return
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the process that spawned it dies, so a killed sweep leaves no orphans."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn_workers(argv: list[str], workers: int) -> int:
    """K local workers on the same storage; returns the worst exit code."""
    base = [w for w in argv if not w.startswith(("--workers", "--worker-index"))]
    if "--workers" in argv:  # "--workers K" as two words
        i = argv.index("--workers")
        base = [w for j, w in enumerate(argv) if j not in (i, i + 1) and not w.startswith("--worker-index")]
    procs = [
        subprocess.Popen([sys.executable, "-m", "sweeps.run", *base, "--workers=1", f"--worker-index={i + 1}"], preexec_fn=_die_with_parent)
        for i in range(workers)
    ]
    return max(p.wait() for p in procs)


def sweep(argv: list[str]) -> int:
    from sweeps.report import write_report
    from sweeps.trial import check_space

    name, options, extra, workers, report_only, index = parse_argv(argv)
    spec, study_dir, storage = apply_options(load_spec(name), options)
    info = resolve(storage, study_dir)
    check_space(spec, extra, study_dir)
    study = open_study(spec, info, spec.sampler.seed)
    if not report_only:
        study_dir.mkdir(parents=True, exist_ok=True)
        if workers > 1:
            code = spawn_workers(argv, workers)
            if code:
                print(f"a worker exited with code {code}", file=sys.stderr)
                return code
        else:
            # a resumed or parallel worker must not replay the first worker's random startup samples
            start = len(study.get_trials(deepcopy=False))
            seed = spec.sampler.seed if start == 0 and index == 0 else zlib.crc32(f"{spec.sampler.seed}:{start}:{index}".encode())
            study = open_study(spec, info, seed)
            work(study, spec, info, extra, study_dir)
    if index == 0:  # spawned workers leave the report to their parent
        paths = write_report(study, spec, study_dir, extra)
        print(f"study {spec.name}: {paths['summary']}")
        print(f"report: {study_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in args):
        print(USAGE)
        return 0
    from experiments.run import quiet_libraries

    quiet_libraries()
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, retry callback
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        return sweep(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume (the running trial is retried)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
