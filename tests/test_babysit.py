"""`lightning-tricks babysit`: steps 1-3 on digits pass; a 100x learning rate fails step 3; a scaled last layer fails step 1."""

import argparse
import math

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from lightning_tricks.tuning.babysit import babysit, check_config, initial_loss_step, lr_step
from lightning_tricks.tuning.cli import load_config, main
from tests.helpers import REPO

DIGITS = str(REPO / "examples" / "digits.yaml")


class ScaleLastLayer(Callback):
    """Multiplies the weights of the model's last Linear layer by ``factor`` at setup (a badly scaled init)."""

    def __init__(self, factor: float = 100.0) -> None:
        self.factor = factor

    def setup(self, trainer, pl_module, stage) -> None:
        last = [m for m in pl_module.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.mul_(self.factor)


def _args(tmp_path, **kw):
    defaults = dict(tolerance=0.25, overfit_batches=2, overfit_epochs=40, overfit_target=0.99, lr_search="grid",
                    lrs=[0.1, 1e-4], lr_steps=60, drop=0.5, factor=3.0, small_decay=1e-4, run_dir=str(tmp_path),
                    out=str(tmp_path / "search.yaml"))
    defaults.update(kw)
    return argparse.Namespace(**defaults)


@pytest.mark.slow
def test_digits_passes_all_steps_and_writes_a_search_space_tune_accepts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(["--config", DIGITS])
    lines: list[str] = []
    results = babysit(config, _args(tmp_path), echo=lines.append)
    assert [r.passed for r in results] == [True, True, True], "\n".join(lines)
    assert abs(results[0].details["observed"] - math.log(10)) < 0.25 * math.log(10)
    assert results[1].details["accuracy"] >= 0.99
    assert results[2].details["best_lr"] == 0.1 and 1e-5 < results[2].details["update_ratio"] < 1.0
    space = yaml.safe_load((tmp_path / "search.yaml").read_text())
    assert space == {"model.init_args.lr": {"log_uniform": [0.01, 0.1]},
                     "model.init_args.weight_decay": {"choice": [0, 1.0e-5, 1.0e-4]}}
    from lightning_tricks.tuning.space import load_search_space, resolve_space

    resolve_space(config, load_search_space(tmp_path / "search.yaml"))  # keys tune accepts


def test_learning_rate_100x_too_large_fails_step_3_with_the_diagnosis(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = check_config(load_config(["--config", DIGITS, "--model.init_args.lr=5.0"]))
    result = lr_step(config, tmp_path, [0.1], steps=40, drop=0.5, factor=3.0, method="grid", small_decay=1e-4)
    assert not result.passed
    assert "learning rate too high" in result.diagnosis and "loss explodes" in result.diagnosis
    assert result.details["own_lr"] == 5.0 and result.details["best_lr"] == 0.1
    assert "try 0.1 or below" in result.diagnosis


def test_scaled_last_layer_fails_step_1_with_both_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(["--config", DIGITS])
    config["trainer"]["callbacks"].append({"class_path": "tests.test_babysit.ScaleLastLayer",
                                           "init_args": {"factor": 100.0}})
    result = initial_loss_step(check_config(config), tmp_path, tolerance=0.25)
    assert not result.passed and result.details["observed"] > 2 * math.log(10)
    assert f"{result.details['observed']:.4f}" in result.measured and "2.3026" in result.measured
    assert "badly scaled" in result.diagnosis
    healthy = initial_loss_step(check_config(load_config(["--config", DIGITS])), tmp_path, tolerance=0.25)
    assert healthy.passed


def test_check_config_turns_off_regularizers_monitors_and_outputs():
    config = load_config(["--config", DIGITS, "--trainer.callbacks+=Cutout", "--trainer.callbacks.length=3"])

    def names(cfg):
        return [c["class_path"].rsplit(".", 1)[-1] for c in cfg["trainer"]["callbacks"]]

    assert names(config) == ["WeightInit", "EarlyStopping", "ModelCheckpoint", "Cutout"]
    assert names(check_config(config)) == ["WeightInit"]  # the init stays: step 1 is about it
    assert check_config(config)["trainer"]["logger"] is False and config["trainer"]["logger"]


def test_bad_babysit_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["babysit", "--config", DIGITS, "--lr-steps", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "lightning-tricks babysit: error: `--lr-steps`=0 is invalid: " \
                                              "expected an integer >= 1."


def test_range_test_picks_candidates_from_lightnings_lr_find(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = check_config(load_config(["--config", DIGITS]))
    result = lr_step(config, tmp_path, [], steps=60, drop=0.5, factor=3.0, method="range_test", small_decay=1e-4)
    tried = [t["lr"] for t in result.details["tried"]]
    assert len(tried) >= 2 and tried == sorted(tried, reverse=True)  # suggestion, lowest-loss rate, a tenth of it
    assert result.passed and result.details["best_lr"] in tried and result.details["best_lr"] > 1e-4


def test_overfit_step_serves_dict_batches_with_the_usual_or_named_keys(tmp_path, monkeypatch):
    from lightning_tricks.monitoring import overfit_check
    from lightning_tricks.regularization import BatchFormatError
    from lightning_tricks.tuning.babysit import overfit_step
    from tests.training_style_modules import DictBatchNet, dict_loader, synthetic

    torch.manual_seed(0)
    model = DictBatchNet(lr=0.1, image_key="pixels", label_key="digit")
    x, y = synthetic(96, 0)
    with torch.no_grad():
        start = torch.nn.functional.cross_entropy(model((x[:32] - 5) / 3), y[:32]).item()  # the first batch, untrained
    odd = dict_loader(seed=0, image_key="pixels", label_key="digit")
    with pytest.raises(BatchFormatError, match="overfit_check looked for the images under 'image', .*set `input_key`"):
        overfit_check(model, train_dataloader=odd, num_batches=1, max_epochs=1, default_root_dir=str(tmp_path))
    report = overfit_check(model, train_dataloader=odd, num_batches=1, max_epochs=30, input_key="pixels",
                           target_key="digit", default_root_dir=str(tmp_path), accelerator="cpu")
    assert report.num_samples == 32 and report.initial_loss == pytest.approx(start, rel=1e-5)
    assert report.passed and report.final_loss < report.initial_loss
    monkeypatch.chdir(tmp_path)
    config = check_config(load_config(["--model=tests.training_style_modules.DictBatchNet",
                                       "--data=tests.training_style_modules.DictData", "--trainer.accelerator=cpu"]))
    result = overfit_step(config, tmp_path, num_batches=1, max_epochs=30, target=0.99)
    assert result.passed and result.details["accuracy"] == 1.0
    config["data"]["init_args"].update(image_key="pixels", label_key="digit")
    config["model"]["init_args"].update(image_key="pixels", label_key="digit")
    named = overfit_step(config, tmp_path, num_batches=1, max_epochs=30, target=0.99, input_key="pixels",
                         target_key="digit")
    assert named.passed
