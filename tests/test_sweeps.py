"""Optuna sweeps: specs are validated, trials prune, a killed sweep resumes without losing finished trials."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from experiments.config import ConfigError
from sweeps.run import main, parse_argv
from sweeps.spec import load_spec, parse_spec, presets
from sweeps.trial import check_space, format_value

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
# Tiny models gain nothing from two threads, and on a busy 2-core box OpenMP's spinning threads make them 3x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# A GRU-AE on ml100k small enough for a test: short sequences, 8-16 wide, 2 epochs of 3 batches.
TINY = {
    "trainer.max_epochs": 2, "trainer.limit_train_batches": 3, "trainer.early_stopping_patience": None,
    "data.max_len": 16, "data.batch_size": 128, "model.emb_dim": 8, "probe.C": 1.0, "probe.baselines": [],
}


def tiny_sweep(tmp_path: Path, **changes) -> Path:
    spec = {
        "experiment": "gru_ae_ml100k",
        "objective": {"metric": "probe_val/mean_auc", "direction": "maximize"},
        "space": {
            "model.hidden": {"type": "categorical", "choices": [8, 16]},
            "model.lr": {"type": "float", "low": 1e-5, "high": 3e-2, "log": True},
            "model.fields": {"type": "categorical", "choices": [None, ["item", "rating"]]},
        },
        "overrides": TINY,
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 6},
        "pruner": {"name": "median", "params": {"n_startup_trials": 1, "n_warmup_steps": 0}},
        "n_trials": 6,
        "max_retries": 2,
        **changes,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_presets_parse_and_compose(tmp_path):
    for name in presets():
        spec = load_spec(name)
        check_space(spec, [], tmp_path)  # both ends of every range make a valid run config
    assert {"gru_ae_ml100k", "next_item_ml100k", "llm4es_ml100k"} <= set(presets())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"objectiv": {}}, "unknown key 'objectiv'; did you mean 'objective'"),
        ({"space": {"model.hidden": {"type": "int", "low": 8}}}, "space.model.hidden: int needs 'low' and 'high'"),
        ({"space": {"model.lr": {"type": "float", "low": 0, "high": 1, "log": True}}}, "log scale needs low > 0"),
        ({"space": {"model.hidden": {"type": "categorical", "choices": [8], "hgih": 2}}}, "unknown key 'hgih'; did you mean 'high'"),
        ({"space": {"data.path": {"type": "categorical", "choices": ["a", "b"]}}}, "'data.path' is path-valued"),
        ({"space": {"model.dropout": {"type": "float", "low": 0, "high": 1, "condition": {"model.layers": [2]}}}},
         "condition names 'model.layers', which is not a parameter listed before it"),
        ({"objective": {"metric": "probe_val/gender/ks"}}, "objective.metric 'probe_val/gender/ks'"),
        ({"objective": {"metric": "probe/gender/auc"}}, "objective.metric 'probe/gender/auc': use probe_val/mean_auc"),
        ({"objective": {"metric": "probe_test/gender/auc"}}, "objective.metric 'probe_test/gender/auc': TEST metrics are only reported"),
        ({"objective": {"metric": "downstream_test/c/score"}}, "objective.metric 'downstream_test/c/score': TEST metrics"),
        ({"pruner": {"name": "median", "params": {"n_startup": 1}}}, None),  # caught when the pruner is built
    ],
)
def test_bad_sweep_files_fail_naming_the_key(change, message):
    raw = {"experiment": "gru_ae_ml100k", "space": {"model.hidden": {"type": "categorical", "choices": [8, 16]}}}
    raw.update(change)
    if message is None:
        from sweeps.run import make_pruner

        with pytest.raises(ConfigError, match="pruner.params of median"):
            make_pruner(parse_spec(raw, "x", "x.yaml"))
        return
    with pytest.raises(ConfigError) as err:
        parse_spec(raw, "x", "x.yaml")
    assert message in str(err.value)


def test_unknown_run_key_and_searched_key_on_command_line_fail_before_any_trial(tmp_path, capsys):
    sweep = tiny_sweep(tmp_path)
    assert main([f"sweep={sweep}", f"sweeps_dir={tmp_path / 's'}", "model.hiden=3"]) == 2
    assert "model.hiden" in capsys.readouterr().err
    assert main([f"sweep={sweep}", f"sweeps_dir={tmp_path / 's'}", "model.hidden=3"]) == 2
    assert "searched by sweep" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing half-made
    with pytest.raises(ConfigError, match="--workers"):
        parse_argv([f"sweep={sweep}", "--workers=0"])


def test_format_value_round_trips_through_the_run_config():
    assert format_value(None) == "null" and format_value(True) == "true" and format_value(1e-5) == "1e-05"
    assert format_value(["item", "rating"]) == "[item, rating]"


def test_in_process_sweep_conditional_params_wandb_and_report(tmp_path, ml100k_cache, one_thread):
    """Two trials in this process: a conditional parameter, W&B runs grouped by study, the report matches the study."""
    sweep = tiny_sweep(
        tmp_path,
        objective={"metric": "val/loss", "direction": "minimize"},
        space={
            "model.layers": {"type": "int", "low": 1, "high": 2},
            "model.dropout": {"type": "float", "low": 0.1, "high": 0.5, "condition": {"model.layers": [2]}},
            "model.hidden": {"type": "categorical", "choices": [8, 16]},
        },
        sampler={"name": "random", "seed": 5},  # seed 5 samples layers 1 then 2: both branches of the condition
        pruner={"name": "none"},  # both trials must complete (pruning has its own test)
        n_trials=2,
    )
    out = tmp_path / "sweeps"
    assert main([f"sweep={sweep}", "study=inproc", f"sweeps_dir={out}", f"data.cache_dir={ml100k_cache}"]) == 0
    study = optuna.load_study(study_name="inproc", storage=f"sqlite:///{out / 'inproc' / 'study.db'}")
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.params["model.layers"] for t in trials) == [1, 2]
    for t in trials:
        assert ("model.dropout" in t.params) == (t.params["model.layers"] == 2)
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir == out / "inproc" / "trials" / "gru_ae_ml100k" / str(t.number)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert t.value == pytest.approx(metrics["val/loss_best"])
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["model"]["layers"] == t.params["model.layers"] and config["logger"]["group"] == "inproc"
        # the trial's W&B run: grouped by study, its parameters in the config
        logged = {}
        for record in wandb_records(run_dir):
            if record["type"] in ("run", "config"):
                logged.update(record[record["type"]].get("config", record[record["type"]]).get("update", {}))
        assert logged["sweep"] == "inproc" and logged["trial"] == t.number and logged["logger"]["group"] == "inproc"
        assert logged["trial_params"] == t.params
    best = json.loads((out / "inproc" / "best.json").read_text())
    assert best["value"] == pytest.approx(study.best_value) and best["number"] == study.best_trial.number
    # the best trial's TEST figures are shown apart from what it was chosen on, and labelled
    assert set(best["test_metrics"]) == {f"probe_test/{t}/{m}" for t in ("gender", "age", "occupation", "churn") for m in ("auc", "ks")}
    assert not any(k.startswith("probe_test/") for k in best["metrics"])
    assert "Best trial on TEST users (reported only" in (out / "inproc" / "trials.md").read_text()
    assert list((out / "inproc" / "wandb").glob("offline-run-*/run-*.wandb"))  # the summary run
    # resuming a finished study runs nothing more
    assert main([f"sweep={sweep}", "study=inproc", f"sweeps_dir={out}", f"data.cache_dir={ml100k_cache}"]) == 0
    assert len(optuna.load_study(study_name="inproc", storage=f"sqlite:///{out / 'inproc' / 'study.db'}").trials) == 2


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of the run's offline .wandb log, decoded by the wandb CLI."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    cli = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(cli), "leet", "inspect", "--json", str(log)], capture_output=True, text=True, check=True, timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def wait_for(condition, timeout: float, proc: subprocess.Popen, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_sweep_resumes_with_the_same_command(tmp_path, ml100k_cache):
    """Acceptance: 6 trials, >= 1 pruned, kill -9 mid-trial, the same command again finishes the study, nothing lost."""
    sweep = tiny_sweep(tmp_path)
    out = tmp_path / "sweeps"
    cmd = [sys.executable, "-m", "sweeps.run", f"sweep={sweep}", "study=tiny", f"sweeps_dir={out}",
           f"data.cache_dir={ml100k_cache}", "logger.wandb=false"]
    env = {**os.environ, **ONE_THREAD, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    storage = f"sqlite:///{out / 'tiny' / 'study.db'}"
    State = optuna.trial.TrialState

    def snapshot():
        try:
            return optuna.load_study(study_name="tiny", storage=storage).get_trials()
        except Exception:  # the study or its tables do not exist yet
            return None

    def killable():
        trials = snapshot() or []
        finished = [t for t in trials if t.state.is_finished()]
        running = [t for t in trials if t.state == State.RUNNING and "run_dir" in t.user_attrs]
        started = running and (Path(running[0].user_attrs["run_dir"]) / "config.yaml").is_file()
        return (finished, running[0]) if len(finished) >= 2 and started else None

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        finished, victim = wait_for(killable, 900, proc, "two trials finished and a third running")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    before = {t.number: (t.state, t.value, t.params) for t in snapshot() if t.state.is_finished()}
    assert {t.number for t in finished} <= set(before)
    assert next(t for t in snapshot() if t.number == victim.number).state == State.RUNNING  # the kill left it dangling

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"trials [{victim.number}] were interrupted" in again.stderr

    study = optuna.load_study(study_name="tiny", storage=storage)
    trials = study.get_trials()
    done = [t for t in trials if t.state in (State.COMPLETE, State.PRUNED)]
    assert len(done) == 6, [(t.number, t.state) for t in trials]
    assert any(t.state == State.PRUNED for t in trials)
    assert all(t.state != State.RUNNING for t in trials)
    killed = trials[victim.number]
    assert killed.state == State.FAIL and killed.user_attrs["interrupted"]
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.params == killed.params and retry.state in (State.COMPLETE, State.PRUNED)
    for number, (state, value, params) in before.items():  # no finished trial lost or changed
        assert (trials[number].state, trials[number].value, trials[number].params) == (state, value, params)

    # the report matches the study
    with open(out / "tiny" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in rows] == [t.number for t in trials]
    assert [r["state"].split()[0] for r in rows] == [t.state.name for t in trials]
    best = json.loads((out / "tiny" / "best.json").read_text())
    assert best["number"] == study.best_trial.number and best["value"] == pytest.approx(study.best_value)
    assert f"Best: trial {study.best_trial.number}, value {study.best_value:.4f}." in (out / "tiny" / "trials.md").read_text()
    for png in ("optimization_history.png", "param_importances.png"):
        assert (out / "tiny" / png).read_bytes()[:8] == PNG, png


def test_journal_storage_recovers_dead_local_and_stale_remote_trials(tmp_path):
    """Without training: a RUNNING trial of a dead local process, one of another host with a stale heartbeat file,
    and one with a fresh heartbeat; only the first two are failed and re-enqueued, each at most max_retries times."""
    from sweeps.run import remaining
    from sweeps.storage import GRACE_PERIOD, open_storage, recover_interrupted, resolve
    from sweeps.trial import worker_identity

    info = resolve(f"journal:{tmp_path / 'j' / 'study.log'}", tmp_path)
    study = optuna.create_study(study_name="j", storage=open_storage(info, max_retries=1))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    identities = [
        {"host": worker_identity()["host"], "pid": int(gone), "start": None},  # this host, process gone
        {"host": "elsewhere", "pid": 1, "start": None},  # another machine, heartbeat stale
        {"host": "elsewhere", "pid": 2, "start": None},  # another machine, heartbeat fresh
        worker_identity(),  # this very process: alive
    ]
    for i, identity in enumerate(identities):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        trial.set_user_attr("worker", identity)
        (info.heartbeat_dir / str(trial.number)).touch()
        if i == 1:
            old = time.time() - GRACE_PERIOD - 5
            os.utime(info.heartbeat_dir / str(trial.number), (old, old))
    assert recover_interrupted(study, info, max_retries=1) == [0, 1]
    State = optuna.trial.TrialState
    trials = study.get_trials()
    assert [t.state for t in trials[:4]] == [State.FAIL, State.FAIL, State.RUNNING, State.RUNNING]
    retries = trials[4:]
    assert [t.state for t in retries] == [State.WAITING, State.WAITING]
    assert [t.params for t in retries] == [trials[0].params, trials[1].params]
    assert remaining(study, 4) == 4 - 2  # two running; failed-and-retried trials do not count
    assert recover_interrupted(study, info, max_retries=1) == []  # nothing re-enqueued twice
    assert len(study.get_trials()) == 6
