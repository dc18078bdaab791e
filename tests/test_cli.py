import json
import sys
from pathlib import Path

import pytest

import lightning_tricks
from lightning_tricks.cli import build_cli, main
from tests.helpers import REPO, run_cli

QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
         "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu"]


def test_user_module_from_outside_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", "--model", "tests.user_module.UserModule", "--model.hidden=32",
                     "--data", "lightning_tricks.zoo.DigitsDataModule", "--data.batch_size=64",
                     "--trainer.max_epochs=3", *QUIET])
    from tests.user_module import UserModule

    assert type(cli.model) is UserModule and cli.model.hparams.hidden == 32
    assert cli.trainer.current_epoch == 3
    assert cli.trainer.callback_metrics["val_acc"] > 0.8


def test_defaults_are_the_zoo_and_short_names_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--model=ImageClassifier", "--model.backbone=mlp", "--data=SyntheticDataModule",
                     "--data.image_shape=[1, 8, 8]", "--data.num_samples=64",
                     "--trainer.callbacks+=LearningRateMonitor", "--trainer.fast_dev_run=1", *QUIET], run=False)
    assert type(cli.model) is lightning_tricks.ImageClassifier and cli.model.hparams.backbone == "mlp"
    assert type(cli.datamodule) is lightning_tricks.SyntheticDataModule
    assert any(type(c).__name__ == "LearningRateMonitor" for c in cli.trainer.callbacks)
    plain = build_cli(QUIET, run=False)
    assert type(plain.model) is lightning_tricks.ImageClassifier
    assert type(plain.datamodule) is lightning_tricks.DigitsDataModule


def test_help_lists_our_callbacks(capsys, monkeypatch):
    monkeypatch.setattr(lightning_tricks, "CALLBACKS", ("Cutout", "Mixup"))
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "lightning-tricks callbacks" in out and "Cutout, Mixup" in out
    assert all(cmd in out for cmd in ("fit", "validate", "test", "predict"))


@pytest.mark.parametrize("args,message", [
    (["--model.backbone=resnet_nope"], "`backbone`='resnet_nope' is invalid: expected one of simple_cnn"),
    (["--data=CIFAR10DataModule", "--data.data_dir=/no/such/cifar"],
     "`data_dir`='/no/such/cifar' does not exist: expected a folder with data_batch_1"),
    (["--data.val_fraction=1.5"], "`val_fraction`=1.5 is invalid: expected a number in (0.0, 1.0)"),
])
def test_bad_input_is_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", *args, *QUIET])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lightning-tricks: error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "lightning-tricks"
    assert script.exists(), "pip install -e . should install the lightning-tricks script"


@pytest.mark.slow
def test_ddp_cli_two_processes_sync_metrics(tmp_path):
    out = tmp_path / "ranks"
    proc = run_cli(["fit", "--config", str(REPO / "examples" / "digits_ddp.yaml"), "--trainer.max_epochs=2",
                    "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                    "--trainer.callbacks+=tests.helpers.RankReport", f"--trainer.callbacks.out_dir={out}"],
                   cwd=tmp_path)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 and r["strategy"] == "DDPStrategy" for r in reports)
    # each rank trained on half of the data: 1257 training images / 2 ranks / batch 32 -> 20 batches an epoch
    assert reports[0]["train_batches"] == reports[1]["train_batches"] == 2 * 20
    # metrics are synchronized: both ranks hold the same value; the weights stayed identical
    for key in ("val_acc", "val_loss"):
        assert reports[0]["metrics"][key] == reports[1]["metrics"][key]
    assert reports[0]["first_weight"] == reports[1]["first_weight"]
    assert "Final validation accuracy:" in proc.stdout and proc.stdout.count("Final validation accuracy:") == 1


# ---------------------------------------------------------------------------------------------------
# one-line errors (issue 13)


def _cutout_typo_config(tmp_path: Path) -> str:
    path = tmp_path / "typo.yaml"
    path.write_text("trainer:\n  callbacks:\n    - class_path: lightning_tricks.Cutout\n      init_args:\n"
                    "        lenght: 8\n")
    return str(path)


def _config(tmp_path: Path, class_path: str) -> str:
    path = tmp_path / "callbacks.yaml"
    path.write_text(f"trainer:\n  callbacks:\n    - class_path: {class_path}\n      init_args:\n        monitor: val_acc\n")
    return str(path)


def _missing_config(tmp_path: Path) -> str:
    (tmp_path / "digits.yaml").write_text("trainer: {}\n")
    return str(tmp_path / "digitz.yaml")


def _missing_checkpoint(tmp_path: Path) -> str:
    (tmp_path / "best.ckpt").write_bytes(b"")
    return str(tmp_path / "bset.ckpt")


@pytest.mark.parametrize("make_args,expected", [
    (lambda tmp: ["fit", "--trainer.callbacks+=Cutoutt"],
     ["unknown callback 'Cutoutt'", "did you mean 'Cutout'?", "Choices: ActivationStatistics, ActivationSwap,",
      "ModelCheckpoint"]),
    (lambda tmp: ["fit", "--config", _cutout_typo_config(tmp)],
     ["Cutout has no argument 'lenght'", "did you mean 'length'?", "Its arguments: length, n_holes, p,"]),
    (lambda tmp: ["fit", "--config", _config(tmp, "lightning_tricks.EarlyStoping")],
     ["unknown callback 'lightning_tricks.EarlyStoping'", "did you mean 'EarlyStopping'?", "Choices:"]),
    (lambda tmp: ["fit", "--config", _config(tmp, "EarlyStopping")],
     ["EarlyStopping is ambiguous", "lightning.pytorch.callbacks.EarlyStopping, lightning_tricks.EarlyStopping"]),
    (lambda tmp: ["fit", "--model=ImageClassifer"],
     ["unknown model 'ImageClassifer'", "did you mean 'ImageClassifier'?"]),
    (lambda tmp: ["fit", "--trainer.callbacks+=Cutout", "--trainer.callbacks.lenght=8"],
     ["Cutout has no argument 'lenght'", "did you mean 'length'?"]),
    (lambda tmp: ["fit", "--model.lr=fast"],
     ["--model.lr=fast: expected a value of type float (ImageClassifier's argument lr)"]),
    (lambda tmp: ["fit", "--trainer.max_epochs=ten"], ["--trainer.max_epochs=ten: expected a value of type int"]),
    (lambda tmp: ["fit", "--config", _missing_config(tmp)],
     ["--config: file not found:", "digitz.yaml", "did you mean 'digits.yaml'?", "files in"]),
    (lambda tmp: ["test", "--ckpt_path", _missing_checkpoint(tmp)],
     ["--ckpt_path: file not found:", "bset.ckpt", "did you mean 'best.ckpt'?"]),
    (lambda tmp: ["fit", "--trainer.max_epochz=3"],
     ["unrecognized argument --trainer.max_epochz=3", "did you mean '--trainer.max_epochs'?"]),
], ids=["callback-name", "yaml-key", "yaml-class", "yaml-ambiguous", "model-name", "cli-key", "type", "optional-type", "config-file", "ckpt-path", "option"])
def test_bad_cli_input_is_one_line_with_the_value_and_the_choices(make_args, expected, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(make_args(tmp_path))
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert 1 <= len(lines) <= 3, lines
    assert lines[-1].startswith("lightning-tricks: error: ")
    for part in expected:
        assert part in lines[-1], (part, lines[-1])
    assert "usage:" not in captured.err and "Traceback" not in captured.err


def test_help_still_prints_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--trainer.max_epochs" in out and "--model.help" in out and "--ckpt_path" in out
    assert "--divergence_stop" in out and len(out.splitlines()) > 100


def test_early_stopping_short_name_is_ours_and_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val_acc", *QUIET], run=False)
    stopping = [c for c in cli.trainer.callbacks if type(c).__name__ == "EarlyStopping"]
    assert len(stopping) == 1 and type(stopping[0]) is lightning_tricks.EarlyStopping
    assert stopping[0].monitor == "val_acc"
    err = capsys.readouterr().err
    assert err.count("EarlyStopping is lightning_tricks.EarlyStopping") == 1
    # the full class path keeps Lightning's
    cli = build_cli(["--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
                     "--trainer.callbacks.monitor=val_acc", *QUIET], run=False)
    assert [type(c).__module__ for c in cli.trainer.callbacks if type(c).__name__ == "EarlyStopping"] == [
        "lightning.pytorch.callbacks.early_stopping"]


# ---------------------------------------------------------------------------------------------------
# a diverging run stops (issue 13)


def test_nan_run_stops_at_the_first_non_finite_loss_unless_switched_off(tmp_path, monkeypatch, recwarn):
    monkeypatch.chdir(tmp_path)
    digits = str(REPO / "examples" / "digits.yaml")
    args = ["fit", "--config", digits, "--model.lr=1e6", "--trainer.max_epochs=2", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"]
    cli = build_cli(args)
    stops = [c for c in cli.trainer.callbacks if isinstance(c, lightning_tricks.DivergenceStop)]
    assert len(stops) == 1 and stops[0].factor is None and stops[0].check_finite
    stop = stops[0]
    assert stop.stopped_step is not None and cli.trainer.global_step == stop.stopped_step + 1
    assert cli.trainer.global_step < 20  # 20 batches an epoch: stopped in the first epoch
    messages = [str(w.message) for w in recwarn if "DivergenceStop" in str(w.message)]
    assert messages == [stop.stopping_reason] and "learning rate too high" in stop.stopping_reason
    off = build_cli([*args, "--divergence_stop=false", "--trainer.limit_train_batches=5"])
    assert not any(isinstance(c, lightning_tricks.DivergenceStop) for c in off.trainer.callbacks)
    assert off.trainer.global_step == 10
    # a DivergenceStop of the user's is kept, not doubled
    own = build_cli(["fit", "--trainer.callbacks+=DivergenceStop", "--trainer.callbacks.factor=3",
                     "--trainer.fast_dev_run=1", *QUIET])
    assert [c.factor for c in own.trainer.callbacks if isinstance(c, lightning_tricks.DivergenceStop)] == [3.0]


# ---------------------------------------------------------------------------------------------------
# a module with its own dataloaders (issue 12)


def test_module_with_its_own_dataloaders_trains_on_them(tmp_path, monkeypatch):
    from tests.own_loaders_module import OwnLoadersModule, write_data

    monkeypatch.chdir(tmp_path)
    path = write_data(tmp_path / "data.pt", n=48)
    args = ["fit", "--model", "tests.own_loaders_module.OwnLoadersModule", f"--model.data_path={path}",
            "--trainer.max_epochs=2", *QUIET]
    cli = build_cli(args)
    assert type(cli.model) is OwnLoadersModule and cli.datamodule is None
    assert cli.model.train_batches_served == 2 * 3  # 48 samples / batch 16, two epochs: its own data
    assert cli.trainer.global_step == 6
    explicit = build_cli([*args, "--data", "null"])
    assert explicit.datamodule is None and explicit.model.train_batches_served == 6
    # a datamodule named explicitly is used, and the zoo's model keeps its digits default
    tuned = build_cli(["--model", "tests.user_module.UserModule", "--data.batch_size=32", *QUIET], run=False)
    assert type(tuned.datamodule) is lightning_tricks.DigitsDataModule and tuned.datamodule.batch_size == 32
    zoo = build_cli(QUIET, run=False)
    assert type(zoo.datamodule) is lightning_tricks.DigitsDataModule


def test_module_without_loaders_or_data_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--model", "tests.user_module.UserModule", *QUIET])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) <= 3 and lines[-1] == (
        "lightning-tricks: error: --data: UserModule has no train_dataloader of its own and no --data was given; "
        "name a datamodule: --data DigitsDataModule | CIFAR10DataModule | SyntheticDataModule | "
        "my_package.MyDataModule.")


# ---------------------------------------------------------------------------------------------------
# readable output off a terminal (issue 13)


@pytest.mark.slow
def test_piped_output_is_short_and_keeps_the_users_warnings(tmp_path):
    from tests.own_loaders_module import write_data

    path = write_data(tmp_path / "data.pt", n=64)
    proc = run_cli(["fit", "--model", "tests.own_loaders_module.WarningModule", f"--model.data_path={path}",
                    "--trainer.max_epochs=4", "--trainer.accelerator=cpu"], cwd=tmp_path,
                   env={"PYTHONWARNINGS": ""})  # a user's environment: no filter
    output = proc.stdout + proc.stderr
    lines = output.strip().splitlines()
    assert "my_module: the user's own warning" in output
    assert "Tip:" not in output and "LeafSpec" not in output and "it/s" not in output
    assert [ln.split(":")[0] for ln in lines if ln.startswith("Epoch ")] == [f"Epoch {i}/4" for i in range(1, 5)]
    assert len(lines) <= 40, output
