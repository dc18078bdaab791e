"""Cutout, Mixup and WeightPenalty from YAML through the CLI, on an unmodified user module."""

import json

import pytest
import yaml

from lightning_tricks import Cutout, Mixup, WeightPenalty
from lightning_tricks.cli import build_cli, main
from tests.helpers import REPO, run_cli

QUIET = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
         "enable_checkpointing": False, "enable_model_summary": False}


@pytest.mark.parametrize("callback,cls", [
    ({"class_path": "lightning_tricks.Cutout", "init_args": {"length": 3, "n_holes": 2}}, Cutout),
    ({"class_path": "lightning_tricks.Mixup", "init_args": {"alpha": 0.4, "cutmix_alpha": 1.0, "mode": "sample"}}, Mixup),
    ({"class_path": "lightning_tricks.WeightPenalty", "init_args": {"l1": 1e-5, "l2": 1e-3}}, WeightPenalty),
])
def test_user_module_trains_with_each_callback_from_yaml(callback, cls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {
        "seed_everything": 0,
        "trainer": {**QUIET, "max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 2,
                    "callbacks": [callback]},
        "model": {"class_path": "tests.user_module.UserModule"},  # list batches, plain F.cross_entropy
        "data": {"class_path": "lightning_tricks.zoo.DigitsDataModule", "init_args": {"batch_size": 32}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 3 and "val_acc" in cli.trainer.callback_metrics
    ours = [c for c in cli.trainer.callbacks if isinstance(c, cls)]
    assert len(ours) == 1
    if cls is WeightPenalty:
        assert ours[0].selected_names == ["net.1.weight", "net.3.weight"]
        assert float(cli.trainer.callback_metrics["weight_penalty/loss"]) > 0
    else:
        assert ours[0].state_dict()["batches_seen"] == 3


def test_short_names_and_a_bad_value_on_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    quiet = [f"--trainer.{k}={v}" for k, v in QUIET.items()]
    cli = build_cli(["--trainer.callbacks+=Cutout", "--trainer.callbacks.length=0.5",
                     "--trainer.callbacks+=Mixup", "--trainer.callbacks.alpha=0.3", *quiet], run=False)
    cutout = next(c for c in cli.trainer.callbacks if isinstance(c, Cutout))
    mixup = next(c for c in cli.trainer.callbacks if isinstance(c, Mixup))
    assert cutout.length == 0.5 and mixup.alpha == 0.3
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--trainer.callbacks+=Mixup", "--trainer.callbacks.alpha=0", *quiet])
    assert exc.value.code == 2
    assert "`alpha`=0.0 is invalid: expected a number in (0.0, inf)" in capsys.readouterr().err


@pytest.mark.slow
def test_example_configs_under_two_process_ddp(tmp_path):
    """examples/mixup.yaml plus Cutout, through the CLI with strategy=ddp on 2 CPU processes."""
    out = tmp_path / "ranks"
    proc = run_cli(["fit", "--config", str(REPO / "examples" / "mixup.yaml"), "--trainer.max_epochs=1",
                    "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.logger=false",
                    "--trainer.enable_progress_bar=false", "--trainer.callbacks+=lightning_tricks.Cutout",
                    "--trainer.callbacks.length=3", "--trainer.callbacks+=tests.helpers.RankReport",
                    f"--trainer.callbacks.out_dir={out}"], cwd=tmp_path)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1] and all(r["strategy"] == "DDPStrategy" for r in reports)
    # 300 training images / 2 ranks / batch 32 -> 5 batches on each rank
    assert [r["train_batches"] for r in reports] == [5, 5]
    assert reports[0]["first_weight"] == reports[1]["first_weight"]
    assert "Final validation accuracy:" in proc.stdout
