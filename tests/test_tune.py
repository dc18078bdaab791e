"""`lightning-tricks tune`: a study of tiny trials end to end, restart after a kill, two workers, bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_tricks.tuning.cli import main, tune_main
from tests.helpers import REPO

TINY = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False, "limit_train_batches": 4,
                "limit_val_batches": 2, "callbacks": [{"class_path": "tests.test_tune.FailWhen",
                                                       "init_args": {"value": 5}}]},
    "model": {"class_path": "lightning_tricks.zoo.ImageClassifier",
              "init_args": {"backbone": "mlp", "num_classes": 4, "in_channels": 1, "image_size": 4, "lr": 0.05,
                            "schedule": "none"}},
    "data": {"class_path": "lightning_tricks.zoo.SyntheticDataModule",
             "init_args": {"num_samples": 96, "num_classes": 4, "image_shape": [1, 4, 4], "batch_size": 8}},
}
SPACE = {"model.init_args.lr": {"log_uniform": [1.0e-3, 1.0e-1]},
         "model.init_args.weight_decay": {"choice": [0, 1.0e-4]}}


class FailWhen(Callback):
    """Raises at fit start when ``value`` is below 3 (a trial whose code raises)."""

    def __init__(self, value: int = 5) -> None:
        self.value = value

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.value < 3:
            raise RuntimeError(f"FailWhen: value {self.value} < 3")


class ImageLogger(CSVLogger):
    """A CSV logger that takes images: records each ``log_image`` call as a file (the figures' logger path)."""

    def log_image(self, key: str, images: list, step: int = 0) -> None:
        Path(self.save_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.save_dir) / f"{key.replace('/', '_')}-{images[0].shape[2]}.img").touch()


class Sleep(Callback):
    """Makes each training epoch last at least ``seconds`` (so two workers overlap)."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        time.sleep(self.seconds)


class Rendezvous(Callback):
    """Each worker process signs ``folder`` at its first trial and waits (up to ``timeout`` s) for ``parties`` signatures:
    the workers are then inside trials at the same time."""

    def __init__(self, folder: str, parties: int = 2, timeout: float = 120.0) -> None:
        self.folder, self.parties, self.timeout = Path(folder), parties, timeout

    def on_fit_start(self, trainer, pl_module) -> None:
        signature = self.folder / str(os.getpid())
        if signature.exists():  # a later trial of this worker: wait only once, or a worker that died costs every trial
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        signature.touch()
        deadline = time.time() + self.timeout
        while len(list(self.folder.iterdir())) < self.parties and time.time() < deadline:
            time.sleep(0.1)


def _files(tmp_path: Path, space: dict | None = None, config: dict | None = None) -> tuple[Path, Path]:
    cfg, search = tmp_path / "tiny.yaml", tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump(config or TINY))
    search.write_text(yaml.safe_dump(space or SPACE))
    return cfg, search


def _study(run_dir: Path, name: str = "search") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")


def _states(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials():
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def test_study_end_to_end_prunes_divergence_records_failures_and_writes_a_runnable_best(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    space = {"model.init_args.lr": {"choice": [0.05, 1000.0]},  # 1000: the loss explodes at once
             "trainer.callbacks.FailWhen.value": {"int": [0, 9]},  # below 3: the trial raises
             "model.init_args.momentum": {"uniform": [0.5, 0.9]}}
    config = {**TINY, "trainer": {**TINY["trainer"], "logger": {"class_path": "tests.test_tune.ImageLogger",
                                                                 "init_args": {"save_dir": "logs"}}}}
    cfg, search = _files(tmp_path, space, config)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--config", str(cfg), "--search", str(search), "--trials", "6", "--epochs", "1", "2",
              "--metric", "val_acc", "--pruner", "none", "--seed", "3", "--run-dir", str(run_dir)])
    assert exc.value.code == 0
    study = _study(run_dir)
    trials = study.get_trials()
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 6
    for t in trials:
        if t.state.name == "FAIL":
            assert t.params["trainer.callbacks.FailWhen.value"] < 3 and "FailWhen: value" in t.user_attrs["reason"]
        elif t.params["model.init_args.lr"] == 1000.0:
            assert t.state.name == "PRUNED" and t.user_attrs["reason"].startswith("diverged")
            loss = t.user_attrs["curves"]["train_loss"]
            assert len(loss) <= 2  # stopped at the step whose loss exploded
        else:
            assert t.state.name == "COMPLETE" and 0.0 <= t.value <= 1.0
            assert t.value == max(v for _, v in t.user_attrs["curves"]["metric"])
    assert {t.user_attrs["stage"] for t in finished} == {1, 2}
    assert sum(t.user_attrs["stage"] == 1 for t in finished) == 4
    assert all(t.user_attrs["epochs"] == (1 if t.user_attrs["stage"] == 1 else 2) for t in finished)
    out = capsys.readouterr().out
    assert "trial  state" in out and "best: trial" in out
    rows = (run_dir / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("trial,state,stage,epochs,val_acc,") and len(rows) == 1 + len(trials)
    for png in ("curves.png", "params.png", "ranges.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in run_dir.glob("*.img")) == ["tune_curves-3.img", "tune_params-3.img",
                                                             "tune_ranges-3.img"]  # RGB images to the logger
    assert sorted(p.name for p in (run_dir / "trials").iterdir()) == [f"trial-{t.number:04d}" for t in trials]
    # best.yaml is a complete config that fit runs as is, with the best trial's values
    best = yaml.safe_load((run_dir / "best.yaml").read_text())
    winner = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert best["model"]["init_args"]["momentum"] == winner.params["model.init_args.momentum"]
    from lightning_tricks.cli import build_cli

    cli = build_cli(["fit", "--config", str(run_dir / "best.yaml")])
    assert cli.trainer.current_epoch == winner.user_attrs["epochs"]
    assert not any(p.is_relative_to(REPO) for p in [run_dir])


@pytest.mark.parametrize("extra,message", [
    (["--trials", "-3"], "`--trials`=-3 is invalid"),
    (["--storage", "sqlite:////no/such/folder/study.db"], "cannot open the study storage"),
    (["--epochs", "1"], "`--epochs`=[1] is invalid"),
])
def test_bad_options_are_one_line_and_write_nothing(extra, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg, search = _files(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--config", str(cfg), "--search", str(search), "--run-dir", str(tmp_path / "run"), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lightning-tricks tune: error: ") and message in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("space,message", [
    ({"model.init_args.lrr": {"log_uniform": [1e-3, 1e-1]}}, "valid keys nearby: model.init_args.lr"),
    ({"model.init_args.lr": {"log_uniform": [0, 1e-1]}}, "needs low > 0"),
])
def test_bad_search_space_is_one_line_and_writes_nothing(space, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg, search = _files(tmp_path, space)
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--config", str(cfg), "--search", str(search), "--run-dir", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run").exists()


def test_rerun_of_a_finished_study_adds_nothing_and_other_settings_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg, search = _files(tmp_path)
    args = ["--config", str(cfg), "--search", str(search), "--trials", "2", "--stages", "1",
            "--run-dir", str(tmp_path / "run"), "--metric", "val_acc"]
    assert tune_main([*args, "--epochs", "1"]) == 0
    assert tune_main([*args, "--epochs", "1"]) == 0
    assert _states(_study(tmp_path / "run")) == {"COMPLETE": 2}
    with pytest.raises(SystemExit) as exc:
        main(["tune", *args, "--epochs", "2"])
    assert exc.value.code == 2 and "started with other settings (stage_epochs differ)" in capsys.readouterr().err


def _tune_process(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lightning_tricks", "tune", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_killed_study_completes_with_exactly_the_requested_trials(tmp_path):
    config = {**TINY, "trainer": {**TINY["trainer"], "callbacks": [
        {"class_path": "tests.test_tune.Sleep", "init_args": {"seconds": 0.4}}]}}
    cfg, search = _files(tmp_path, config=config)
    run_dir = tmp_path / "run"
    args = ["--config", str(cfg), "--search", str(search), "--trials", "5", "--epochs", "1", "2",
            "--run-dir", str(run_dir), "--metric", "val_acc", "--pruner", "none"]
    proc = _tune_process(args, tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once two trials are done and a third runs
        time.sleep(0.5)
        if (run_dir / "study.db").exists():
            try:
                states = _states(_study(run_dir))
            except (KeyError, sqlalchemy.exc.OperationalError):  # the file exists before the study is in it
                continue
            if states.get("COMPLETE", 0) >= 2 and states.get("RUNNING", 0) == 1:
                break
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    before = _states(_study(run_dir))
    assert before.get("RUNNING") == 1 and before.get("COMPLETE", 0) < 5
    rerun = _tune_process(args, tmp_path)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    study = _study(run_dir)
    after = _states(study)
    assert after.get("COMPLETE", 0) + after.get("PRUNED", 0) == 5 and "RUNNING" not in after
    assert after.get("FAIL") == 1 and "marked failed" in out
    dead = next(t for t in study.get_trials() if t.state.name == "FAIL")
    assert "worker process died" in dead.user_attrs["reason"]


@pytest.mark.slow
def test_two_workers_share_one_study_without_running_a_trial_twice(tmp_path):
    config = {**TINY, "trainer": {**TINY["trainer"], "callbacks": [
        {"class_path": "tests.test_tune.Rendezvous", "init_args": {"folder": str(tmp_path / "signed")}}]}}
    cfg, search = _files(tmp_path, config=config)
    run_dir = tmp_path / "run"
    proc = _tune_process(["--config", str(cfg), "--search", str(search), "--trials", "6", "--epochs", "1", "2",
                          "--run-dir", str(run_dir), "--metric", "val_acc", "--workers", "2", "--pruner", "none"],
                         tmp_path)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    trials = _study(run_dir).get_trials()
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 6
    ran = [t for t in trials if not t.user_attrs.get("reason", "").startswith("surplus")]
    # every trial that ran has its own folder, written by exactly one worker process
    folders = sorted(p.name for p in (run_dir / "trials").iterdir())
    assert folders == [f"trial-{t.number:04d}" for t in ran]
    pids = {t.user_attrs["worker"]["pid"] for t in ran}
    assert len(pids) == 2  # both workers ran trials (they met inside their first ones)
    assert out.count("best: trial") == 1  # one report, by the first worker


def test_grid_sampler_tries_the_square_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, search = _files(tmp_path)
    assert tune_main(["--config", str(cfg), "--search", str(search), "--trials", "4", "--stages", "1", "--epochs", "1",
                      "--sampler", "grid", "--run-dir", str(tmp_path / "run"), "--metric", "val_acc",
                      "--pruner", "none"]) == 0
    tried = {(t.params["model.init_args.lr"], t.params["model.init_args.weight_decay"])
             for t in _study(tmp_path / "run").get_trials()}
    assert tried == {(lr, wd) for lr in (1.0e-3, 1.0e-1) for wd in (0, 1.0e-4)}


def test_optuna_internals_reach_a_trial_by_number_through_the_public_storage_methods():
    """The one module that touches Optuna's private state: the id found by number is the trial's own, a user
    attribute set on another process's running trial shows in the public FrozenTrial once it failed, and an Optuna without
    ``Study._storage`` skips the attribute instead of failing."""
    import types

    import optuna

    from lightning_tricks.tuning import _optuna_internals as internals

    study = optuna.create_study(study_name="ids")
    for _ in range(3):
        study.tell(study.ask(), 1.0)
    orphan = study.ask()  # left RUNNING by a worker that died
    storage = internals.study_storage(study)
    assert [internals.trial_id(storage, "ids", t.number) for t in study.trials] == [t._trial_id for t in study.trials]
    assert internals.set_trial_user_attr(study, orphan.number, "reason", "its worker process died (killed?)")
    study.tell(orphan.number, state=optuna.trial.TrialState.FAIL)
    failed = orphan
    assert study.trials[failed.number].user_attrs == {"reason": "its worker process died (killed?)"}
    assert not internals.set_trial_user_attr(types.SimpleNamespace(study_name="ids"), 0, "reason", "x")
    assert internals.rdb_engine(storage) is None  # in memory: no engine, WAL mode is skipped


def test_optunas_private_attributes_are_reached_only_from_the_guarded_module():
    import re
    from pathlib import Path

    import lightning_tricks

    package = Path(lightning_tricks.__file__).parent
    private = re.compile(r"\._storage\b|\b_trial_id\b|\b_study_id\b|[\"']_(storage|trial_id|study_id)[\"']")
    found = [f"{path.relative_to(package)}:{i}" for path in sorted(package.rglob("*.py"))
             if path.name != "_optuna_internals.py"
             for i, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert found == []
    assert private.search("study._storage.set_trial_user_attr(t._trial_id, ...)")  # the pattern finds what it must
