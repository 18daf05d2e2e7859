"""Sweep workers sharing a real PostgreSQL server (Debian's postgresql package), started here in a temp dir."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest

from tests.test_sweeps import ONE_THREAD, REPO, tiny_sweep


def postgres_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return found[-1].parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway server on a free port: initdb + pg_ctl as an unprivileged user (postgres refuses to run as root)."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found under /usr/lib/postgresql (Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg is not installed (pip install psycopg[binary])")
    root = Path(tempfile.mkdtemp(prefix="sweeps-pg-"))  # not under pytest's 0700 tmp: the server user must reach it
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
        shutil.chown(root, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    os.chmod(root, 0o755)
    data, port = root / "data", free_port()
    try:
        init = subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"],
                              capture_output=True, text=True, timeout=120)
        if init.returncode:
            pytest.skip(f"initdb failed: {init.stderr.strip()[-500:]}")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        start = subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "-t", "60", "start"],
                               capture_output=True, text=True, timeout=120)
        if start.returncode:
            log = (root / "log").read_text()[-800:] if (root / "log").exists() else ""
            pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[-300:]} {log}")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_a_postgresql_study(postgres_url, tmp_path, ml100k_cache):
    sweep = tiny_sweep(tmp_path, n_trials=2)
    out = tmp_path / "sweeps"
    cmd = [sys.executable, "-m", "sweeps.run", f"sweep={sweep}", "study=pg", f"storage={postgres_url}", f"sweeps_dir={out}",
           f"data.cache_dir={ml100k_cache}", "logger.wandb=false", "--workers", "2"]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ONE_THREAD, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]

    study = optuna.load_study(study_name="pg", storage=postgres_url)
    State = optuna.trial.TrialState
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (State.COMPLETE, State.PRUNED)]
    assert 2 <= len(finished) <= 3, [(t.number, t.state) for t in trials]  # two workers may both start the last one
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # both workers ran trials on the one storage
    assert all(t.state != State.RUNNING for t in trials)
    assert (out / "pg" / "trials.csv").read_text().count("\n") == len(trials) + 1
    assert not (out / "pg" / "study.db").exists()  # nothing went to the default SQLite file
