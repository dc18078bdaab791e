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
