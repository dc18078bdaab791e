"""A shared study on a real PostgreSQL server: two processes, a database that is away at start or goes away.

The server is Debian's PostgreSQL (``tests/postgres_server.py``), started by the tests on a free port with a
password, reached through ``postgresql://`` exactly as docs/tune.md tells a user (SQLAlchemy 2.x opens it with
psycopg 3, the ``[distributed]`` extra). ``.ci/run`` installs the server when it is missing and sets
``LIGHTNING_TRICKS_REQUIRE_POSTGRES=1``, so in CI these tests fail rather than skip when it cannot start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
import yaml

from lightning_tricks.tuning.cli import main
from lightning_tricks.tuning.study import open_storage
from tests.helpers import REPO
from tests.postgres_server import PASSWORD, PostgresServer, free_port, why_unavailable
from tests.test_tune import TINY, _files, _states

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # subprocesses; a loaded machine is slow


@pytest.fixture(scope="module")
def server():
    reason = why_unavailable()
    if reason is not None:
        if os.environ.get("LIGHTNING_TRICKS_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here (LIGHTNING_TRICKS_REQUIRE_POSTGRES=1): {reason}")
        pytest.skip(reason)
    pg = PostgresServer()
    yield pg
    pg.close()


def _tune(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lightning_tricks", "tune", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished(study: optuna.Study) -> list:
    return [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]


def _open_together(url: str, workers: int) -> tuple[list, list[str]]:
    """``open_storage(url)`` from ``workers`` threads released at the same moment: (storages, errors)."""
    barrier, errors, storages = threading.Barrier(workers), [], []

    def open_once() -> None:
        barrier.wait()
        try:
            storages.append(open_storage(url))
        except Exception as err:  # collected: an assert in a thread would not fail the test
            errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=open_once) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return storages, errors


def test_workers_opening_a_fresh_database_together_all_get_the_study(server):
    # SQLAlchemy's check-then-create is not atomic: on PostgreSQL all but one of the workers that create
    # Optuna's tables together used to fail with UniqueViolation (every round, before the retry)
    workers = 4
    for round_ in range(3):
        storages, errors = _open_together(server.create_database(f"fresh{round_}"), workers)
        assert errors == [] and len(storages) == workers
        optuna.create_study(storage=storages[0], study_name="one")
        assert [[s.study_name for s in st.get_all_studies()] for st in storages] == [["one"]] * workers


def test_two_processes_share_one_study_on_postgres(server, tmp_path):
    config = {**TINY, "trainer": {**TINY["trainer"], "callbacks": [
        {"class_path": "tests.test_tune.Rendezvous", "init_args": {"folder": str(tmp_path / "signed")}}]}}
    cfg, search = _files(tmp_path, config=config)
    common = ["--config", str(cfg), "--search", str(search), "--trials", "4", "--epochs", "1", "1",
              "--metric", "val_acc", "--pruner", "none", "--storage", server.url, "--study-name", "shared"]
    # two separate commands, as on two machines: each its own run folder, one database
    procs = [_tune([*common, "--run-dir", str(tmp_path / name)], tmp_path) for name in ("a", "b")]
    outputs = [proc.communicate(timeout=800) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert PASSWORD not in out + err
    study = optuna.load_study(study_name="shared", storage=server.url)
    finished = _finished(study)
    assert len(finished) == 4 and "RUNNING" not in _states(study)
    assert sorted(t.user_attrs["stage"] for t in finished) == [1, 1, 1, 2]  # both stages, split 3 + 1
    assert len({t.user_attrs["worker"]["pid"] for t in finished}) == 2  # both processes ran trials
    csv_a, csv_b = ((tmp_path / name / "trials.csv").read_text() for name in ("a", "b"))
    assert csv_a == csv_b and len(csv_a.splitlines()) == 1 + len(study.get_trials())
    best_a, best_b = (yaml.safe_load((tmp_path / name / "best.yaml").read_text()) for name in ("a", "b"))
    assert best_a == best_b
    header = (tmp_path / "a" / "best.yaml").read_text().splitlines()[0]  # "# best trial N of study 'shared' ..."
    winner = study.trials[int(header.split()[3])]
    assert winner.value == max(t.value for t in finished if t.state.name == "COMPLETE")
    assert best_a["model"]["init_args"]["lr"] == winner.params["model.init_args.lr"]
    from lightning_tricks.cli import build_cli

    cli = build_cli(["fit", "--config", str(tmp_path / "a" / "best.yaml")])  # best.yaml runs
    assert cli.trainer.current_epoch == winner.user_attrs["epochs"]


def test_optuna_dashboard_reads_the_study_from_the_same_url(server):
    dashboard = pytest.importorskip("optuna_dashboard")  # in the [distributed] extra
    study = optuna.create_study(study_name="watched", storage=server.url, direction="maximize")
    study.enqueue_trial({"x": 0.5})
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    app = dashboard.wsgi(server.url)  # what `optuna-dashboard postgresql://...` serves

    def get(path: str) -> dict:
        environ: dict = {"REQUEST_METHOD": "GET", "PATH_INFO": path}
        setup_testing_defaults(environ)
        status: list[str] = []
        body = b"".join(app(environ, lambda code, headers, *rest: status.append(code)))
        assert status[0].startswith("200"), status
        return json.loads(body)

    listed = {s["study_name"]: s for s in get("/api/studies")["study_summaries"]}
    assert listed["watched"]["directions"] == ["maximize"]
    detail = get(f"/api/studies/{listed['watched']['study_id']}")
    assert [t["params"][0]["param_internal_value"] for t in detail["trials"]][:1] == [0.5]
    assert len(detail["trials"]) == 2


def test_unreachable_database_is_one_line_with_the_password_masked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg, search = _files(tmp_path)
    url = f"postgresql://tune:{PASSWORD}@127.0.0.1:{free_port()}/tune"  # nobody listens there
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--config", str(cfg), "--search", str(search), "--trials", "2", "--storage", url,
              "--run-dir", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and PASSWORD not in err
    masked = url.replace(PASSWORD, "***")
    assert err.startswith(f"lightning-tricks tune: error: cannot open the study storage '{masked}': "), err
    assert not (tmp_path / "run").exists()  # nothing written


def test_missing_driver_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # a fresh venv without the [distributed] extra
    cfg, search = _files(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--config", str(cfg), "--search", str(search), "--trials", "2",
              "--storage", f"postgresql://tune:{PASSWORD}@127.0.0.1:{free_port()}/tune", "--run-dir", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and PASSWORD not in err
    assert "Failed to import DB access module" in err and "pip install 'lightning-tricks[distributed]'" in err
    assert not (tmp_path / "run").exists()


def test_database_lost_mid_study_then_the_rerun_finishes_it(server, tmp_path):
    config = {**TINY, "trainer": {**TINY["trainer"], "callbacks": [
        {"class_path": "tests.test_tune.Sleep", "init_args": {"seconds": 1.0}}]}}
    cfg, search = _files(tmp_path, config=config)
    args = ["--config", str(cfg), "--search", str(search), "--trials", "3", "--epochs", "1", "1",
            "--metric", "val_acc", "--pruner", "none", "--storage", server.url, "--study-name", "lost",
            "--run-dir", str(tmp_path / "run")]
    proc = _tune(args, tmp_path)
    storage = optuna.storages.RDBStorage(server.url)  # one connection for the polling
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # stop the server once a trial is done and one runs
        time.sleep(0.5)
        try:
            states = _states(optuna.load_study(study_name="lost", storage=storage))
        except KeyError:  # the study is not recorded yet
            continue
        if states.get("COMPLETE", 0) >= 1 and states.get("RUNNING", 0) == 1:
            break
    storage.engine.dispose()
    server.stop("immediate")
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        server.start()
    assert proc.returncode == 2, err[-3000:]
    assert PASSWORD not in out + err and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"lightning-tricks tune: error: lost the study storage '{server.url.replace(PASSWORD, '***')}'")
    assert "rerun the same command" in line and "OperationalError" in line  # the driver's own first line
    print(line)  # quoted in docs/reliability.md
    study = optuna.load_study(study_name="lost", storage=server.url)
    assert _states(study).get("RUNNING") == 1  # the interrupted trial, as the database last saw it
    rerun = _tune(args, tmp_path)
    out, err = rerun.communicate(timeout=800)
    assert rerun.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="lost", storage=server.url)
    states = _states(study)
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 3 and "RUNNING" not in states
    failed = [t for t in study.get_trials() if t.state.name == "FAIL"]
    assert len(failed) == 1 and "worker process died" in failed[0].user_attrs["reason"]
    table = (tmp_path / "run" / "trials.csv").read_text()
    assert "worker process died" in table  # the failed trial's reason is in the table
