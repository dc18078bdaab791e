"""Modules written with ``import pytorch_lightning as pl`` (issue 20, point 4).

``pytorch_lightning.LightningModule`` is not a subclass of ``lightning.pytorch.LightningModule``. Lightning
itself does not mix the packages: a ``pytorch_lightning`` module trains in ``pytorch_lightning.Trainer``, and
our callbacks (``lightning.pytorch`` Callbacks) must work there or refuse in one line. Each check below has
its reference: the CLI's metrics against the Trainer's own, the Ensemble's vote against the members' averaged
probabilities computed here, the frozen backbone against the checkpoint it was loaded from.
"""

from __future__ import annotations

import lightning.pytorch as lp
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import lightning_tricks as lt
from lightning_tricks.cli import build_cli
from lightning_tricks.core.lightning_classes import (
    callback_types,
    is_overridden,
    lightning_module_types,
    package_of,
    trainer_types,
    weight_averaging_types,
)
from lightning_tricks.core.validation import ConfigError

ptl = pytest.importorskip("pytorch_lightning")
from tests.pl_legacy_module import LegacyDigits, LegacyNet, digits_split  # noqa: E402

QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.accelerator=cpu"]


def legacy_trainer(tmp_path, **kwargs) -> ptl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    return ptl.Trainer(**{**defaults, **kwargs})


def test_the_class_helpers_know_both_packages():
    assert set(lightning_module_types()) == {lp.LightningModule, ptl.LightningModule}
    assert set(callback_types()) == {lp.Callback, ptl.Callback}
    assert set(trainer_types()) == {lp.Trainer, ptl.Trainer}
    assert set(weight_averaging_types()) == {lp.callbacks.WeightAveraging, ptl.callbacks.WeightAveraging}
    model = LegacyNet()
    assert not isinstance(model, lp.LightningModule) and package_of(model) == "pytorch_lightning"
    assert package_of(lt.ImageClassifier()) == "lightning.pytorch" and package_of(nn.Linear(1, 1)) is None
    assert is_overridden("train_dataloader", model) and not is_overridden("predict_step", model)
    assert is_overridden("train_dataloader", LegacyDigits()) and not is_overridden("predict_dataloader", LegacyDigits())


# -- the CLI ----------------------------------------------------------------------------------------


def _cli_fit(tmp_path, seed: int, *extra: str):
    return build_cli(["fit", "--model", "tests.pl_legacy_module.LegacyNet", "--trainer.max_epochs=2",
                      f"--seed_everything={seed}", f"--trainer.default_root_dir={tmp_path}", *QUIET,
                      "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                      "--trainer.callbacks.monitor=val_acc", "--trainer.callbacks.mode=max",
                      f"--trainer.callbacks.dirpath={tmp_path / f'ckpt{seed}'}", *extra])


def test_cli_fits_a_pytorch_lightning_module_in_its_own_trainer(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = _cli_fit(tmp_path, 0, "--model.hidden=24", "--trainer.callbacks+=Cutout", "--trainer.callbacks.length=2")
    assert type(cli.model) is LegacyNet and cli.model.hparams.hidden == 24 and cli.model.hparams.lr == 0.05
    assert type(cli.trainer) is ptl.Trainer and cli.datamodule is None  # its own loaders, its package's Trainer
    assert cli.trainer.global_step == 2 * 19  # 1200 training images / 64, two epochs
    # Lightning's ModelCheckpoint named as lightning.pytorch's is the Trainer's one checkpoint callback, its twin
    checkpoints = [c for c in cli.trainer.callbacks if "ModelCheckpoint" in type(c).__name__]
    assert len(checkpoints) == 1 and type(checkpoints[0]) is ptl.callbacks.ModelCheckpoint
    assert cli.trainer.checkpoint_callback is checkpoints[0] and checkpoints[0].monitor == "val_acc"
    assert len(list((tmp_path / "ckpt0").glob("*.ckpt"))) == 1
    assert any(type(c) is lt.Cutout for c in cli.trainer.callbacks)
    assert cli.trainer.callback_metrics["val_acc"] > 0.5  # it learned digits (chance: 0.1), under Cutout
    assert cli.model.hparams["_class_path"] == "tests.pl_legacy_module.LegacyNet"  # recorded, as for lightning.pytorch
    assert "Final validation accuracy" in capsys.readouterr().out


def test_cli_refuses_to_mix_packages_between_model_and_data_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        build_cli(["fit", "--model", "tests.pl_legacy_module.LegacyNet", "--data", "DigitsDataModule", *QUIET])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "one package per Trainer" in err and "--data null" in err
    cli = build_cli(["fit", "--model", "tests.pl_legacy_module.LegacyNet", "--data", "tests.pl_legacy_module.LegacyDigits",
                     "--data.batch_size=600", "--trainer.max_epochs=1", *QUIET])
    assert type(cli.datamodule) is LegacyDigits and cli.trainer.global_step == 2


# -- Ensemble members -------------------------------------------------------------------------------


def test_ensemble_of_pytorch_lightning_checkpoints_votes_their_averaged_probabilities(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = []
    for seed in (0, 1):
        _cli_fit(tmp_path, seed)
        paths += [str(p) for p in (tmp_path / f"ckpt{seed}").glob("*.ckpt")]
    ensemble = lt.Ensemble(checkpoints=paths)  # the class is read from the checkpoints the CLI wrote
    loader = DataLoader(digits_split(False), batch_size=200)
    result = lp.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        ensemble, dataloaders=loader, verbose=False)[0]
    x, y = digits_split(False).tensors
    members = [LegacyNet.load_from_checkpoint(p, map_location="cpu").eval() for p in paths]
    with torch.no_grad():
        probs = torch.stack([m(x).softmax(1) for m in members]).mean(0)
        own = [(m(x).argmax(1) == y).float().mean().item() for m in members]
    assert result["test_acc"] == pytest.approx((probs.argmax(1) == y).float().mean().item(), abs=1e-6)
    assert [result["test_acc_member_0"], result["test_acc_member_1"]] == pytest.approx(own, abs=1e-6)
    assert min(own) > 0.5  # trained members (chance: 0.1)


# -- callbacks in pytorch_lightning.Trainer ---------------------------------------------------------


def test_activation_swap_replaces_the_relus_of_a_pytorch_lightning_module(tmp_path):
    model = LegacyNet()
    trainer = legacy_trainer(tmp_path, limit_train_batches=2, limit_val_batches=1,
                             callbacks=[lt.ActivationSwap(to="leaky_relu")])
    trainer.fit(model)
    kinds = [type(m) for m in model.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    assert kinds == [nn.LeakyReLU, nn.LeakyReLU] and trainer.global_step == 2


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_early_stopping_refuses_either_packages_ema_in_one_line(package, tmp_path):
    ema = (ptl if package == "pytorch_lightning" else lp).callbacks.EMAWeightAveraging()
    callbacks = [lt.EarlyStopping(monitor="val_loss", mode="min", restore_best_weights=True), ema]
    trainer = (legacy_trainer if package == "pytorch_lightning" else _lp_trainer)(
        tmp_path, limit_train_batches=2, limit_val_batches=1, callbacks=callbacks)
    model = LegacyNet() if package == "pytorch_lightning" else lt.ImageClassifier()
    data = None if package == "pytorch_lightning" else lt.SyntheticDataModule(num_samples=32, image_shape=[1, 8, 8])
    with pytest.raises(ConfigError) as exc:
        trainer.fit(model, datamodule=data)
    assert "cannot be combined with EMAWeightAveraging" in str(exc.value) and "\n" not in str(exc.value)
    assert trainer.global_step == 0


def _lp_trainer(tmp_path, **kwargs) -> lp.Trainer:
    return lp.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), **kwargs)


def test_finetune_loads_a_pytorch_lightning_checkpoint_and_trains_only_the_head(tmp_path):
    torch.manual_seed(0)
    source = legacy_trainer(tmp_path, limit_train_batches=3, limit_val_batches=0)
    source.fit(LegacyNet())
    path = tmp_path / "pretrained.ckpt"
    source.save_checkpoint(path)
    pretrained = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    torch.manual_seed(1)
    model = LegacyNet()
    trainer = legacy_trainer(tmp_path, limit_train_batches=3, limit_val_batches=0,
                             callbacks=[lt.Finetune(train="head", weights=str(path), num_classes=10)])
    trainer.fit(model)
    state = model.state_dict()
    backbone = [k for k in pretrained if not k.startswith("classifier.")]
    assert backbone and all(torch.equal(state[k], pretrained[k]) for k in backbone)  # loaded, then frozen
    assert not torch.equal(state["classifier.weight"], pretrained["classifier.weight"])  # a new head, trained
    assert trainer.global_step == 3


def test_batch_transform_mixin_on_a_pytorch_lightning_module(tmp_path):
    from tests.regularization_modules import Recorder

    class TupleLegacyNet(lt.BatchTransformMixin, LegacyNet):
        def train_dataloader(self):  # tuple batches: only the mixin lets Mixup replace the targets
            return DataLoader(digits_split(True), batch_size=16, collate_fn=lambda b: tuple(
                torch.stack(t) for t in zip(*b, strict=True)))

    recorder, mixup = Recorder(), lt.Mixup(mode="sample")
    trainer = legacy_trainer(tmp_path, limit_train_batches=2, limit_val_batches=0, callbacks=[mixup, recorder])
    trainer.fit(TupleLegacyNet())
    assert recorder.batch_types == [tuple, tuple] and len(recorder.plans) == 2
    assert mixup.state_dict()["batches_seen"] == 2


def test_overfit_check_trains_a_pytorch_lightning_module_in_its_own_trainer(tmp_path):
    from lightning_tricks.monitoring import overfit_check

    report = overfit_check(LegacyNet(lr=0.1), datamodule=LegacyDigits(batch_size=32), num_batches=1, max_epochs=25,
                           accelerator="cpu", default_root_dir=str(tmp_path))
    assert report.num_samples == 32 and report.epochs == 25
    assert report.final_loss < 0.5 * report.initial_loss and report.accuracy > 0.9  # babysit's step 2 works
